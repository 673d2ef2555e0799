"""EDM2's uncertainty-weighted denoising loss (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Eqs. 14–16 and 21; NVlabs/edm2 ``EDM2Loss``):

    L = λ(σ)/e^{u(σ)} · (D(y + σ·n; σ) − T)² + u(σ)          (per element; ln σ ~ N(P_mean, P_std²))

with EDM's weight λ(σ) = (σ² + σ_data²)/(σ·σ_data)² and EDM's preconditioning (EDM2's ``Precond`` has exactly EDM's
c_skip, c_out, c_in and c_noise = ln(σ)/4). u(σ) is a learned log-variance of the loss at σ: for fixed D the loss
is smallest at e^{u(σ)} = E[λ(σ)·(D − T)²], so the network sees every noise level with the same expected loss
(L ≈ 1 + u per element), which Eq. 21 calls the "uncertainty" weighting of the noise levels.

u(σ) is the small head :class:`LogVarianceHead` on c_noise: MP Fourier features (128 channels) and one MP linear
layer to a scalar. It is an ``nn.Module`` owned by the loss: the trainer must optimise its parameters together with
the network's (``[*unet.parameters(), *loss.parameters()]``), move it with ``loss.to(device)``, keep it in training
mode while training (forced weight normalisation), and save ``loss.state_dict()`` in its checkpoints. In an NVlabs
EDM2 snapshot, ``ema.logvar_fourier.{freqs,phases}`` and ``ema.logvar_linear.weight`` are this head's
``logvar_fourier.{freqs,phases}`` and ``logvar_linear.weight``.

T is the clean image unless a ``target(noisy, sigma, images)`` function is given, as for every loss of
:mod:`~diffusers_stf.losses.edm`, so :class:`~diffusers_stf.losses.stable_target_field.StableTargetFieldLoss` takes
this loss as its base (``StableTargetFieldLoss(EDM2Loss())``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..mp_layers import MPConv, MPFourier
from .edm import EDMLoss, per_sample

# EDM2's presets (NVlabs/edm2 train_edm2.py): ImageNet-512 latents and ImageNet-64 pixels
EDM2_SIGMA_PRESETS = {"img512": (-0.4, 1.0), "img64": (-0.8, 1.6)}


class LogVarianceHead(nn.Module):
    """u(σ) = MPLinear(MPFourier(c_noise)) (EDM2 Eq. 21), one scalar per sample.

    Args:
        logvar_channels: Fourier features (EDM2: 128).
    """

    def __init__(self, logvar_channels: int = 128):
        super().__init__()
        if isinstance(logvar_channels, bool) or not isinstance(logvar_channels, int) or logvar_channels < 1:
            raise ValueError(f"logvar_channels must be an integer >= 1, got {logvar_channels!r}")
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        """(B,) c_noise → (B,) u."""
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1)


class EDM2Loss(EDMLoss):
    """λ(σ)/e^{u(σ)}·(D(x̃; σ) − T)² + u(σ) per element, ln σ ~ N(P_mean, P_std²), EDM preconditioning (see the
    module docstring).

    Args:
        P_mean, P_std: mean and std of ln σ (EDM2: −0.4 and 1.0 for ImageNet-512 latents, −0.8 and 1.6 for
            ImageNet-64 pixels; :data:`EDM2_SIGMA_PRESETS`).
        sigma_data: σ_data of the data and the preconditioning (EDM2: 0.5).
        logvar_channels: width of the Fourier features of :class:`LogVarianceHead` (EDM2: 128).
        logvar_head: a module c_noise (B,) → u (B,) in place of :class:`LogVarianceHead`.
        reduction: ``sum`` over C·H·W (EDM2) or ``mean``.
    """

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5,
                 logvar_channels: int = 128, logvar_head: Optional[nn.Module] = None, reduction: str = "sum"):
        super().__init__(P_mean, P_std, sigma_data, reduction)
        self.logvar_head = logvar_head if logvar_head is not None else LogVarianceHead(logvar_channels)

    def parameters(self):
        """The learned parameters of u(σ), to optimise with the network's."""
        return self.logvar_head.parameters()

    def to(self, *args, **kwargs) -> "EDM2Loss":
        self.logvar_head.to(*args, **kwargs)
        return self

    def train(self, mode: bool = True) -> "EDM2Loss":
        self.logvar_head.train(mode)
        return self

    def state_dict(self):
        return self.logvar_head.state_dict()

    def load_state_dict(self, state_dict):
        return self.logvar_head.load_state_dict(state_dict)

    def logvar(self, sigma: torch.Tensor) -> torch.Tensor:
        """u(σ) (B,), from c_noise(σ) = ln(σ)/4."""
        return self.logvar_head(self.preconditioning.c_noise(sigma.float()))

    def per_element(self, denoised: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ)/e^{u(σ)}·(D − T)² + u(σ), per element (EDM2 Eq. 21); reduced over C·H·W and averaged over the batch
        it is EDM2's training loss."""
        u = per_sample(self.logvar(sigma), denoised.ndim).to(denoised.dtype)
        return super().per_element(denoised, target, sigma) / u.exp() + u
