"""Noise schedules: DDPM β/ᾱ schedules, the VE and VP SDE marginals, simple diffusion's resolution shift, and the
noise-level techniques of NCSNv2.

* DDPM-style (discrete or continuous t ∈ [0, 1]): linear (Ho et al. 2020; its continuous limit is the VP SDE of
  Song et al. 2021) and cosine (Nichol & Dhariwal 2021, eq. 17) ᾱ(t); SNR(t) = ᾱ/(1 − ᾱ); the resolution-shifted
  SNR of simple diffusion (Hoogeboom et al. 2023, §3.1): SNR_d(t) = SNR_r(t)·(r/d)² for images of side d trained
  with a schedule designed at side r. The discrete β of diffusers' schedulers come from :func:`betas_for_schedule`,
  the one linear/cosine β formula of the package (the preconditionings and losses import it from here).
* VE SDE: σ(t) = σ_min·(σ_max/σ_min)^t (Song et al. 2021, eq. 30).
* NCSN / NCSNv2 (Song & Ermon 2019, 2020): the geometric σ schedule, and NCSNv2's

  - Technique 1 (initial noise scale): σ_1 = the maximum pairwise Euclidean distance of the training data
    (:func:`max_pairwise_distance`);
  - Technique 2 (other noise scales): a geometric schedule whose ratio γ = σ_{i−1}/σ_i > 1 solves
    Φ(√(2D)(γ−1) + 3γ) − Φ(√(2D)(γ−1) − 3γ) = C (:func:`ncsnv2_gamma`, :func:`ncsnv2_sigmas`);
  - Technique 4 (step size): the ε of annealed Langevin that makes Proposition 3's closed-form s_T²/σ_i² closest to 1
    (:func:`ncsnv2_variance_ratio`, :func:`ncsnv2_step_size`).

  Technique 3 (noise conditioning s_θ(x, σ) = s_θ(x)/σ) is a network parametrisation:
  ``NCSNPreconditioning(prediction_type="scaled_score", timestep_type="none")`` in :mod:`diffusers_stf.preconditioning`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

TensorOrFloat = Union[torch.Tensor, float]


def _t(t: TensorOrFloat) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64) if not torch.is_tensor(t) else t.double()


# ----------------------------------------------------------------------------------------------------------------------
# DDPM-style schedules and SNR


def betas_for_schedule(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
    beta_schedule: str = "linear",
    trained_betas: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """DDPM β schedules as diffusers' ``DDPMScheduler`` builds them (float64).

    Args:
        num_train_timesteps: T, the number of discrete training steps.
        beta_start, beta_end: first and last β of the ``linear`` and ``scaled_linear`` schedules.
        beta_schedule: ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2`` (Nichol & Dhariwal's cosine, β ≤ 0.999).
        trained_betas: explicit βs; overrides the schedule.
    """
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten()
    elif num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        T = num_train_timesteps
        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=torch.float64
        )
    else:
        raise ValueError(
            f"beta_schedule must be one of 'linear', 'scaled_linear', 'squaredcos_cap_v2', got {beta_schedule!r}"
        )
    # 0 < β_t < 1 keeps every ᾱ_t in (0, 1): a β outside would give σ_t = 0, ∞ or NaN downstream
    if len(betas) < 1 or not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(
            "the beta schedule must satisfy 0 < beta < 1 at every step (check beta_start, beta_end, trained_betas); "
            f"got betas from {float(betas.min()) if len(betas) else 'none'} to {float(betas.max()) if len(betas) else 'none'}"
        )
    if not float(torch.prod(1 - betas)) > 0:
        raise ValueError("the beta schedule drives alpha_bar_T = prod(1 - beta) to 0 in float64; use smaller betas")
    return betas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s) (Ho et al. 2020, §2)."""
    return torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), dim=0)


def betas_from_alphas_cumprod(alphas_cumprod: torch.Tensor, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = 1 − ᾱ_t/ᾱ_{t−1} (with ᾱ_{−1} = 1), clipped at ``max_beta`` as Nichol & Dhariwal clip the cosine
    schedule."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    prev = torch.cat([ac.new_ones(1), ac[:-1]])
    return (1 - ac / prev).clamp(max=max_beta)


def linear_alpha_bar(t: TensorOrFloat, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """ᾱ(t) = exp(−½t²(β_max − β_min) − t·β_min), t ∈ [0, 1]: the VP SDE (Song et al. 2021, eq. 33), the continuous
    limit of DDPM's linear β from β_min/T to β_max/T (T = 1000: 1e-4 to 2e-2)."""
    t = _t(t)
    return torch.exp(-0.5 * t**2 * (beta_max - beta_min) - t * beta_min)


def vp_beta(t: TensorOrFloat, beta_min: float = 0.1, beta_max: float = 20.0) -> torch.Tensor:
    """β(t) = β_min + t(β_max − β_min), the VP SDE's drift/diffusion rate: dx = −½β(t)x dt + √β(t) dw."""
    return beta_min + _t(t) * (beta_max - beta_min)


def cosine_alpha_bar(t: TensorOrFloat, s: float = 0.008) -> torch.Tensor:
    """ᾱ(t) = f(t)/f(0), f(t) = cos²((t + s)/(1 + s)·π/2) (Nichol & Dhariwal 2021, eq. 17); s = 0 is simple
    diffusion's cosine schedule, log SNR = −2 log tan(πt/2)."""
    t = _t(t)
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (f / math.cos(s / (1 + s) * math.pi / 2) ** 2).clamp(0.0, 1.0)


def alpha_bar(t: TensorOrFloat, schedule: str = "cosine", **kwargs) -> torch.Tensor:
    """ᾱ(t) of a named continuous-time schedule: ``linear`` (kwargs beta_min, beta_max) or ``cosine`` (kwarg s)."""
    if schedule == "linear":
        return linear_alpha_bar(t, **kwargs)
    if schedule == "cosine":
        return cosine_alpha_bar(t, **kwargs)
    raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")


def snr(alphas_cumprod: TensorOrFloat) -> torch.Tensor:
    """SNR = ᾱ/(1 − ᾱ) (Kingma et al. 2021)."""
    ac = _t(alphas_cumprod)
    return ac / (1 - ac)


def log_snr(alphas_cumprod: TensorOrFloat) -> torch.Tensor:
    """log SNR = log ᾱ − log(1 − ᾱ)."""
    ac = _t(alphas_cumprod)
    return torch.log(ac) - torch.log1p(-ac)


def alphas_cumprod_from_log_snr(log_snr_value: TensorOrFloat) -> torch.Tensor:
    """ᾱ = sigmoid(log SNR), the inverse of :func:`log_snr`."""
    return torch.sigmoid(_t(log_snr_value))


def shifted_log_snr(log_snr_value: TensorOrFloat, resolution: int, base_resolution: int = 64) -> torch.Tensor:
    """log SNR_d(t) = log SNR_r(t) + 2·log(r/d), i.e. SNR_d = SNR_r·(r/d)² (simple diffusion, §3.1).

    Args:
        log_snr_value: log SNR_r(t) of the schedule designed for images of side ``base_resolution`` (r).
        resolution: d, the side of the images the shifted schedule is for.
        base_resolution: r (simple diffusion uses 64).
    """
    if resolution < 1 or base_resolution < 1:
        raise ValueError(f"resolution and base_resolution must be >= 1, got {resolution} and {base_resolution}")
    return _t(log_snr_value) + 2 * math.log(base_resolution / resolution)


def shifted_alphas_cumprod(alphas_cumprod: TensorOrFloat, resolution: int, base_resolution: int = 64) -> torch.Tensor:
    """ᾱ of the resolution-shifted schedule, sigmoid(log SNR_r + 2 log(r/d)); works for discrete ᾱ_t or ᾱ(t).
    ᾱ = 0 and ᾱ = 1 (log SNR = ∓∞) stay where they are."""
    return alphas_cumprod_from_log_snr(shifted_log_snr(log_snr(alphas_cumprod), resolution, base_resolution))


def ddpm_betas(
    num_train_timesteps: int = 1000,
    schedule: str = "linear",
    resolution: Optional[int] = None,
    base_resolution: int = 64,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Discrete DDPM β_0..β_{T−1} for training: ``linear``, ``scaled_linear`` or ``cosine`` (= diffusers'
    ``squaredcos_cap_v2``), optionally shifted for resolution d = ``resolution`` (simple diffusion).

    Without a shift this is exactly :func:`betas_for_schedule`. With one, ᾱ_t of that schedule is shifted by
    :func:`shifted_alphas_cumprod` and turned back into β by :func:`betas_from_alphas_cumprod`.
    """
    name = {"cosine": "squaredcos_cap_v2"}.get(schedule, schedule)
    betas = betas_for_schedule(num_train_timesteps, beta_start, beta_end, name)
    if resolution is None or resolution == base_resolution:
        return betas
    ac = shifted_alphas_cumprod(alphas_cumprod_from_betas(betas), resolution, base_resolution)
    return betas_from_alphas_cumprod(ac, max_beta=max_beta)


# ----------------------------------------------------------------------------------------------------------------------
# VE SDE and NCSN


def ve_sigma(t: TensorOrFloat, sigma_min: float = 0.01, sigma_max: float = 50.0) -> torch.Tensor:
    """σ(t) = σ_min·(σ_max/σ_min)^t, the noise scale of the VE SDE (Song et al. 2021, eq. 30)."""
    return sigma_min * (sigma_max / sigma_min) ** _t(t)


def geometric_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> torch.Tensor:
    """σ_1 = σ_max > … > σ_L = σ_min, a geometric sequence (NCSN §4.2), float64."""
    if not (sigma_max > sigma_min > 0):
        raise ValueError(f"need sigma_max > sigma_min > 0, got sigma_max={sigma_max}, sigma_min={sigma_min}")
    if int(num_levels) < 2:
        raise ValueError(f"num_levels must be >= 2, got {num_levels}")
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), int(num_levels), dtype=torch.float64))


def max_pairwise_distance(data: torch.Tensor, chunk_size: int = 1024) -> float:
    """NCSNv2 Technique 1: σ_1 = max_{i,j} ‖x_i − x_j‖₂ over the training data.

    Computed block by block (``chunk_size`` rows against ``chunk_size`` columns), so memory is O(chunk_size²), never
    N×N; time is still O(N²·D). Distances use ‖a‖² + ‖b‖² − 2a·b in float64, then the largest block is recomputed
    exactly by differences.

    Args:
        data: N samples, any shape (N, ...); flattened to (N, D).
        chunk_size: rows (and columns) per block.
    """
    x = torch.as_tensor(data).reshape(len(data), -1).double()
    if len(x) < 2:
        raise ValueError(f"data must hold at least 2 samples, got {len(x)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    sq = (x * x).sum(1)
    best, best_pair = -1.0, (0, 0)
    for i in range(0, len(x), chunk_size):
        xi, sqi = x[i : i + chunk_size], sq[i : i + chunk_size]
        for j in range(i, len(x), chunk_size):  # the upper triangle of blocks suffices
            d2 = sqi[:, None] + sq[None, j : j + chunk_size] - 2 * xi @ x[j : j + chunk_size].T
            value, flat = d2.flatten().max(0)
            if float(value) > best:
                best, best_pair = float(value), (i + int(flat) // d2.shape[1], j + int(flat) % d2.shape[1])
    # the expansion loses precision for nearly equal points; the winning pair's distance is recomputed exactly
    return float((x[best_pair[0]] - x[best_pair[1]]).norm())


def _technique2_lhs(gamma: float, dim: int) -> float:
    from scipy.stats import norm

    a = math.sqrt(2 * dim) * (gamma - 1)
    return float(norm.cdf(a + 3 * gamma) - norm.cdf(a - 3 * gamma))


def ncsnv2_gamma(dim: int, C: float = 0.5) -> float:
    """NCSNv2 Technique 2: the ratio γ = σ_{i−1}/σ_i > 1 that solves Φ(√(2D)(γ−1) + 3γ) − Φ(√(2D)(γ−1) − 3γ) = C.

    The left side is Φ(3) − Φ(−3) ≈ 0.997 at γ = 1 and falls to 0 as γ grows only when √(2D) > 3, i.e. D ≥ 5.

    Args:
        dim: D, the data dimension (e.g. 3072 for CIFAR-10).
        C: the target probability, in (0, Φ(3) − Φ(−3)); NCSNv2 uses 0.5.
    """
    from scipy.optimize import brentq

    dim = int(dim)
    at_one = _technique2_lhs(1.0, dim)
    if not 0 < C < at_one:
        raise ValueError(f"C must be in (0, {at_one:.4f}), got {C}")
    if math.sqrt(2 * dim) <= 3:
        raise ValueError(f"Technique 2 needs sqrt(2*dim) > 3 (dim >= 5), got dim={dim}")
    hi = 2.0
    while _technique2_lhs(hi, dim) > C:
        hi *= 2
        if hi > 1e6:
            raise ValueError(f"no gamma solves Technique 2 for dim={dim}, C={C}")
    return float(brentq(lambda g: _technique2_lhs(g, dim) - C, 1.0, hi, xtol=1e-14, rtol=1e-14))


def ncsnv2_sigmas(sigma_max: float, sigma_min: float, dim: int, C: float = 0.5) -> torch.Tensor:
    """A geometric schedule from σ_1 = ``sigma_max`` (Technique 1) down to ``sigma_min`` whose ratio does not exceed
    Technique 2's γ: L = ⌈log(σ_1/σ_L)/log γ⌉ + 1 levels, evenly spaced in log σ."""
    gamma = ncsnv2_gamma(dim, C)
    if not (sigma_max > sigma_min > 0):
        raise ValueError(f"need sigma_max > sigma_min > 0, got sigma_max={sigma_max}, sigma_min={sigma_min}")
    num_levels = int(math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-12)) + 1
    return geometric_sigmas(sigma_max, sigma_min, max(num_levels, 2))


def ncsnv2_variance_ratio(step_size: float, gamma: float, steps_per_level: int, sigma_min: float) -> float:
    """NCSNv2 Proposition 3: s_T²/σ_i² after T steps of annealed Langevin at level σ_i, started with variance σ_{i−1}²,
    when the data is a single point (score −x/σ_i²) and α_i = ε·σ_i²/σ_L²:

        s_T²/σ_i² = (1 − ε/σ_L²)^{2T}·(γ² − 2ε/(σ_L² − σ_L²(1 − ε/σ_L²)²)) + 2ε/(σ_L² − σ_L²(1 − ε/σ_L²)²)

    with γ = σ_{i−1}/σ_i. (The update is x ← x + α·s + √(2α)·z, as in NCSNv2's Algorithm 1.)
    """
    k = step_size / sigma_min**2
    fixed_point = 2 * step_size / (sigma_min**2 - sigma_min**2 * (1 - k) ** 2)
    return (1 - k) ** (2 * steps_per_level) * (gamma**2 - fixed_point) + fixed_point


def ncsnv2_step_size(gamma: float, steps_per_level: int, sigma_min: float) -> float:
    """NCSNv2 Technique 4: the ε that makes :func:`ncsnv2_variance_ratio` closest to 1 for T = ``steps_per_level``.

    The ratio depends on ε only through κ = ε/σ_L² ∈ (0, 1); a log-spaced grid over κ finds the basin and a bounded
    Brent search refines it.

    Args:
        gamma: σ_{i−1}/σ_i > 1 of the geometric schedule.
        steps_per_level: T ≥ 1.
        sigma_min: σ_L, the smallest noise level.
    """
    from scipy.optimize import minimize_scalar

    if not gamma > 1:
        raise ValueError(f"gamma must be > 1 (sigma_(i-1)/sigma_i), got {gamma}")
    if int(steps_per_level) < 1:
        raise ValueError(f"steps_per_level must be >= 1, got {steps_per_level}")
    if not sigma_min > 0:
        raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
    T = int(steps_per_level)

    def objective(log_k: float) -> float:
        return abs(ncsnv2_variance_ratio(math.exp(log_k) * sigma_min**2, gamma, T, sigma_min) - 1)

    grid = np.linspace(math.log(1e-12), math.log(1 - 1e-9), 4001)
    values = [objective(v) for v in grid]
    best = int(np.argmin(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    res = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-12})
    log_k = float(res.x) if res.fun <= values[best] else float(grid[best])
    return math.exp(log_k) * sigma_min**2
