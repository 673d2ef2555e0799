"""Denoising losses of Karras et al. 2022 ("EDM"), Table 1 "Training" rows and NVlabs/edm ``training/loss.py``.

Each loss draws σ, perturbs the images, x̃ = y + σ·n, and regresses the denoiser D(x̃; σ) of
:class:`~diffusers_stf.preconditioning.Denoiser` onto a target (the clean image y for denoising score matching):

    loss = λ(σ) · ‖D(x̃; σ) − target‖²        (EDM eq. 2 with the weight λ(σ) of Table 1)

The losses return the per-element loss (B, C, H, W), as EDM does; the caller reduces it. ``target`` is a hook:
:mod:`~diffusers_stf.losses.stable_target_field` passes the stable target instead of y.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..preconditioning import Denoiser, EDMPreconditioning, VEPreconditioning


def _per_sample(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (ndim - 1)))


class EDMLoss:
    """EDM's loss ("Ours" in Table 1): ln σ ~ N(P_mean, P_std²), λ(σ) = (σ² + σ_data²)/(σ·σ_data)², with EDM's
    preconditioning (so λ(σ) = 1/c_out(σ)² and the network's effective target has unit variance).

    Args:
        P_mean, P_std: mean and std of ln σ (EDM: −1.2, 1.2).
        sigma_data: σ_data of the data and of the preconditioning (EDM: 0.5).
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        if not P_std > 0:
            raise ValueError(f"P_std must be > 0, got {P_std}")
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)
        self.preconditioning = EDMPreconditioning(sigma_data)

    def denoiser(self, model: torch.nn.Module) -> Denoiser:
        """D(x; σ) of a raw network under this loss's preconditioning."""
        return Denoiser(model, self.preconditioning)

    def sample_sigma(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """σ = exp(P_mean + P_std·z), z ~ N(0, 1), shape (batch_size,), float32."""
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        z = torch.randn(batch_size, generator=generator, device=device)
        return (z * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ) = (σ² + σ_data²)/(σ·σ_data)²."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def regression_loss(self, denoiser, noisy: torch.Tensor, sigma: torch.Tensor, target: torch.Tensor,
                        class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """λ(σ)·(D(x̃; σ) − target)², per element."""
        denoised = denoiser(noisy, sigma, class_labels=class_labels)
        return _per_sample(self.weight(sigma), noisy.ndim) * (denoised - target) ** 2

    def __call__(self, denoiser, images: torch.Tensor, sigma: Optional[torch.Tensor] = None,
                 class_labels: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The per-element loss of ``images`` (B, C, H, W).

        Args:
            denoiser: D(x, σ, class_labels=None), e.g. ``loss.denoiser(unet)``.
            images: the clean (possibly augmented) images y.
            sigma: noise levels (B,); drawn with :meth:`sample_sigma` when None.
            class_labels: passed to the denoiser (class labels, or EDM's augmentation labels).
            generator: source of σ and the noise.
            target: regression target (default: ``images``, denoising score matching).
        """
        if sigma is None:
            sigma = self.sample_sigma(images.shape[0], generator, images.device)
        sigma = sigma.to(device=images.device, dtype=torch.float32)
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        noisy = images + _per_sample(sigma, images.ndim).to(images.dtype) * noise
        return self.regression_loss(denoiser, noisy, sigma, images if target is None else target, class_labels)


class VELoss(EDMLoss):
    """The variance-exploding loss of Song et al. 2021 in EDM's form (Table 1 "VE"): ln σ ~ U(ln σ_min, ln σ_max),
    λ(σ) = 1/σ², VE preconditioning (c_skip = 1, c_out = σ).

    Args:
        sigma_min, sigma_max: range of σ (EDM: 0.02, 100).
    """

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.preconditioning = VEPreconditioning(sigma_min, sigma_max)

    def sample_sigma(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """σ = σ_min·(σ_max/σ_min)^u, u ~ U(0, 1)."""
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        u = torch.rand(batch_size, generator=generator, device=device)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ) = 1/σ²."""
        return 1 / sigma**2

