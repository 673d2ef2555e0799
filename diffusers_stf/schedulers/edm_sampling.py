"""The EDM sampler core (Karras et al. 2022, Algorithm 2; Algorithm 1 is the case γ = 0), one function per line group.

Every EDM sampler of the package is built from these functions: :class:`EDMHeunScheduler` and
:class:`EDMStochasticScheduler` call them from ``step`` (one model evaluation per call, as diffusers loops do), and
samplers that need per-sample noise levels, such as Discriminator Guidance's boosting (Kim et al. 2023, Appendix D),
call :func:`heun_step` directly, as NVlabs' ``edm_sampler`` and k-diffusion's ``sample_heun`` do.

Noise levels may be python floats, 0-d tensors or one value per sample (a tensor of shape [batch]); per-sample values
are broadcast over the remaining dimensions of ``x``. The functions compute in the dtype of ``x`` (float64 in the
schedulers, as in EDM) and never synchronise with the device.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

SigmaLike = Union[float, torch.Tensor]

GAMMA_MAX = math.sqrt(2) - 1  # EDM Algorithm 2 line 4: γ_i ≤ √2 − 1 keeps σ̂_i ≤ √2·σ_i


def per_sample(value: SigmaLike, x: torch.Tensor) -> SigmaLike:
    """``value`` ready to multiply ``x``: a python float or 0-d tensor as it is, a [batch] tensor as [batch, 1, …]."""
    if torch.is_tensor(value) and value.ndim > 0:
        return value.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return value


def churn_gamma(
    sigma: SigmaLike, num_steps: int, s_churn: SigmaLike, s_tmin: float = 0.0, s_tmax: float = math.inf
) -> torch.Tensor:
    """γ_i = min(S_churn/N, √2 − 1) if S_tmin ≤ t_i ≤ S_tmax else 0 (EDM Algorithm 2, line 4), elementwise.

    Args:
        sigma: t_i, one level or a tensor of them (the whole schedule).
        num_steps: N.
        s_churn: S_churn, a float or one value per sample (DG boosting churns rejected samples with S_churn = 4).
        s_tmin, s_tmax: the window of levels that are churned.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    gamma = (torch.as_tensor(s_churn, dtype=torch.float64, device=sigma.device) / num_steps).clamp(max=GAMMA_MAX)
    inside = (sigma >= s_tmin) & (sigma <= s_tmax)
    return torch.where(inside, gamma, torch.zeros_like(gamma))


def churn_sigma(
    sigma: SigmaLike, gamma: SigmaLike, round_sigma: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
) -> SigmaLike:
    """t̂_i = t_i + γ_i·t_i (EDM Algorithm 2, line 5), snapped to a trained level by ``round_sigma`` (EDM's
    ``net.round_sigma``) when the network is discrete-time."""
    sigma_hat = sigma + gamma * sigma
    return sigma_hat if round_sigma is None else round_sigma(sigma_hat)


def churn(
    x: torch.Tensor, sigma: SigmaLike, sigma_hat: SigmaLike, s_noise: SigmaLike, noise: torch.Tensor
) -> torch.Tensor:
    """x̂_i = x_i + √(t̂_i² − t_i²)·S_noise·ε_i, ε_i = ``noise`` ~ N(0, I) (EDM Algorithm 2, line 6).

    ``sigma_hat``, ``sigma`` and ``s_noise`` may be per sample; a sample with t̂_i = t_i is returned unchanged.
    """
    if not any(torch.is_tensor(v) for v in (sigma, sigma_hat, s_noise)):
        return x + math.sqrt(max(sigma_hat**2 - sigma**2, 0.0)) * s_noise * noise.to(x.dtype)
    sigma, sigma_hat, s_noise = (
        torch.as_tensor(v, dtype=x.dtype, device=x.device) for v in (sigma, sigma_hat, s_noise)
    )
    scale = (sigma_hat**2 - sigma**2).clamp(min=0).sqrt() * s_noise
    return x + per_sample(scale, x) * noise.to(x.dtype)


def slope(x: torch.Tensor, denoised: torch.Tensor, sigma: SigmaLike) -> torch.Tensor:
    """d = (x − D(x; t))/t, the probability-flow ODE dx/dt for σ(t) = t, s(t) = 1 (EDM Algorithm 2, lines 7 and 10)."""
    return (x - denoised) / per_sample(sigma, x)


def euler_update(x_hat: torch.Tensor, d: torch.Tensor, sigma_hat: SigmaLike, sigma_next: SigmaLike) -> torch.Tensor:
    """x_{i+1} = x̂_i + (t_{i+1} − t̂_i)·d_i (EDM Algorithm 2, line 8)."""
    return x_hat + per_sample(sigma_next - sigma_hat, x_hat) * d


def heun_update(
    x_hat: torch.Tensor, d: torch.Tensor, d_prime: torch.Tensor, sigma_hat: SigmaLike, sigma_next: SigmaLike
) -> torch.Tensor:
    """x_{i+1} = x̂_i + (t_{i+1} − t̂_i)·(½d_i + ½d'_i) (EDM Algorithm 2, line 11)."""
    return x_hat + per_sample(sigma_next - sigma_hat, x_hat) * (0.5 * d + 0.5 * d_prime)


def heun_step(
    denoise: Callable[[torch.Tensor, SigmaLike], torch.Tensor],
    x_hat: torch.Tensor,
    sigma_hat: SigmaLike,
    sigma_next: float,
    correction: Optional[Callable[[torch.Tensor, SigmaLike, bool], torch.Tensor]] = None,
) -> torch.Tensor:
    """One step of EDM Algorithm 2 from the churned state (lines 7–11): an Euler step, then Heun's correction
    unless t_{i+1} = 0.

    Args:
        denoise: D(x; σ), called with a [batch] tensor or a float σ as given here.
        x_hat: x̂_i, the churned state (:func:`churn`).
        sigma_hat: t̂_i, a float or one per sample.
        sigma_next: t_{i+1} of the schedule, a python float (0 for the last step).
        correction: an optional term added to D at each evaluation, called as ``correction(x, σ, first_order)``;
            Discriminator Guidance adds w·σ²·∇ₓ log(d/(1 − d)) (DG eq. 9 in denoiser form), which subtracts
            w·σ·∇ₓ log r from the slope as DG's ``edm_sampler`` does.

    Returns:
        x_{i+1}.
    """
    denoised = denoise(x_hat, sigma_hat)
    if correction is not None:
        denoised = denoised + correction(x_hat, sigma_hat, True)
    d = slope(x_hat, denoised, sigma_hat)
    x_next = euler_update(x_hat, d, sigma_hat, sigma_next)
    if sigma_next > 0:
        denoised = denoise(x_next, sigma_next)
        if correction is not None:
            denoised = denoised + correction(x_next, sigma_next, False)
        d_prime = slope(x_next, denoised, sigma_next)
        x_next = heun_update(x_hat, d, d_prime, sigma_hat, sigma_next)
    return x_next
