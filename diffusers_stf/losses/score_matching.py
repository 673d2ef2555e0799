"""Denoising score matching for noise-conditional score networks (Vincent 2011; Song & Ermon 2019, "NCSN").

A noise-conditional score network s_θ(x, σ) ≈ ∇_x log p_σ(x), p_σ = p_data ∗ N(0, σ²I), is trained with

    ℓ(θ; σ) = ½ E_{y ~ p_data, x ~ N(y, σ²I)} ‖s_θ(x, σ) + (x − y)/σ²‖²                (NCSN eq. 5)
    L(θ)    = E_σ λ(σ)·ℓ(θ; σ),   λ(σ) = σ²                                              (NCSN eq. 6)

How the raw network becomes s_θ is the network's preconditioning (:class:`~diffusers_stf.preconditioning.
NCSNPreconditioning`: what it outputs and what timestep it receives), shared with the samplers. The loss takes the
preconditioned network as a denoiser D(x; σ) (:class:`~diffusers_stf.preconditioning.Denoiser`), whose score is
s_θ = (D − x)/σ² (Tweedie's formula). With x = y + σz the summand becomes

    ½ λ(σ)‖s_θ + (x − y)/σ²‖² = ½‖σ·s_θ + z‖² = ½‖(D(x; σ) − y)/σ‖²,

EDM's VE loss (weight 1/σ²) with NCSN's factor ½ and NCSN's σ distribution.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from .base import LossOutput, add_noise, check_reduction, check_sigma_shape, reduce_per_sample
from .draws import rand, randint


class DenoisingScoreMatchingLoss:
    """NCSN's annealed denoising score matching loss (eqs. 5–6), ½‖(D(y + σz; σ) − y)/σ‖² = ½‖σ·s_θ + z‖² per sample,
    summed over its dimensions (``reduction="sum"``, as NCSN's ``anneal_dsm_score_estimation``, whose loss is then the
    mean over the batch) or averaged over them (``"mean"``).

    Args:
        sigmas: the decreasing table σ_1 > … > σ_L; σ is drawn uniformly from it (NCSN) with
            ``sigma_sampling="discrete"``.
        sigma_min, sigma_max: the range of ``sigma_sampling="log_uniform"`` (log σ ~ U[log σ_min, log σ_max]),
            for networks sampled on continuous schedules (CAS, the VE SDE).
        sigma_sampling: ``discrete`` or ``log_uniform``.
        reduction: ``sum`` (NCSN) or ``mean`` over the dimensions of a sample.
    """

    def __init__(
        self,
        sigmas: Optional[Sequence[float]] = None,
        sigma_min: float = 0.01,
        sigma_max: float = 1.0,
        sigma_sampling: str = "discrete",
        reduction: str = "sum",
    ):
        if sigma_sampling not in ("discrete", "log_uniform"):
            raise ValueError(f"sigma_sampling must be one of ('discrete', 'log_uniform'), got {sigma_sampling!r}")
        if sigma_sampling == "discrete":
            if sigmas is None:
                raise ValueError("sigma_sampling='discrete' needs the table of noise levels (sigmas)")
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
            if len(sigmas) < 1 or not bool((sigmas > 0).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
                raise ValueError("sigmas must be a non-empty, strictly decreasing sequence of positive noise levels")
        elif not (math.isfinite(sigma_max) and sigma_max > sigma_min > 0):
            raise ValueError(f"need sigma_max > sigma_min > 0, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigmas, self.sigma_min, self.sigma_max, self.sigma_sampling = sigmas, sigma_min, sigma_max, sigma_sampling
        self.reduction = check_reduction(reduction)

    def sample_sigmas(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """σ for each sample of a batch (float64), drawn on the generator's device and moved to ``device``."""
        if self.sigma_sampling == "discrete":
            return self.sigmas.to(device)[randint(len(self.sigmas), (batch_size,), generator, device)]
        u = rand(batch_size, generator, device, dtype=torch.float64)
        return torch.exp(math.log(self.sigma_min) + u * math.log(self.sigma_max / self.sigma_min))

    def __call__(
        self,
        denoiser: Callable[..., torch.Tensor],
        images: torch.Tensor,
        sigma: Optional[Union[torch.Tensor, float]] = None,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        **model_kwargs,
    ) -> LossOutput:
        """The per-sample loss and σ.

        Args:
            denoiser: D(x, σ, **model_kwargs), e.g. ``Denoiser(unet, NCSNPreconditioning(...))``.
            images: the clean batch y.
            sigma: σ, a scalar or one per sample; drawn when omitted.
            noise: z ~ N(0, I); drawn on the generator's device when omitted.
            generator: the random generator of σ and z.
        """
        if images.ndim < 2:  # a batch of samples of any shape (images, or vectors for toy densities)
            raise ValueError(f"images must be a batch (B, ...), got shape {tuple(images.shape)}")
        if sigma is None:
            sigma = self.sample_sigmas(images.shape[0], generator, device=images.device)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=images.device).to(images.dtype)
        check_sigma_shape(sigma, images.shape[0])
        sigma = sigma.reshape(-1).expand(images.shape[0])
        denoised = denoiser(add_noise(images, sigma, generator, noise), sigma, **model_kwargs)
        s = sigma.reshape(-1, *([1] * (images.ndim - 1)))
        return LossOutput(loss=0.5 * reduce_per_sample(((denoised - images) / s).pow(2), self.reduction), sigma=sigma)
