"""Noise schedules: DDPM β/ᾱ, the VP and VE SDEs' σ(t), and the noise-level techniques of NCSNv2. One formula of each:

* DDPM (Ho et al. 2020) linear and cosine (Nichol & Dhariwal 2021, eq. 17) β schedules as diffusers builds them
  (:func:`betas_for_schedule`), and ᾱ_t = ∏(1 − β_s).
* VP SDE (Song et al. 2021; EDM Table 1): σ(t) = √(exp(½β_d t² + β_min t) − 1), i.e. ᾱ(t) = 1/(1 + σ(t)²)
  (:func:`vp_sigma`, inverse :func:`vp_time`).
* VE SDE (Song et al. 2021, eq. 30): σ(t) = σ_min·(σ_max/σ_min)^t (:func:`ve_sigma`, inverse :func:`ve_time`).
* The cosine ᾱ(t) = cos²((t + s)/(1 + s)·π/2) (:func:`cosine_alpha_bar`), behind diffusers' ``squaredcos_cap_v2``
  and EDM's iDDPM table.
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
        beta_start, beta_end: first and last β of the ``linear`` and ``scaled_linear`` schedules (beta_start <=
            beta_end; an inverted schedule is refused).
        beta_schedule: ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2`` (Nichol & Dhariwal's cosine, β ≤ 0.999).
        trained_betas: explicit βs; overrides the schedule.
    """
    if trained_betas is not None:
        betas = torch.as_tensor(trained_betas, dtype=torch.float64).flatten()
    elif num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    elif beta_schedule in ("linear", "scaled_linear") and not beta_start <= beta_end:
        raise ValueError(f"beta_start must be <= beta_end (the forward process adds more noise at each step), got "
                         f"beta_start={beta_start}, beta_end={beta_end}")
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":  # β_t = min(1 − ᾱ((t + 1)/T)/ᾱ(t/T), 0.999)
        t = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        alpha_bar = cosine_alpha_bar(t)
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
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


def cosine_alpha_bar(t: TensorOrFloat, s: float = 0.008) -> torch.Tensor:
    """ᾱ(t) ∝ cos²((t + s)/(1 + s)·π/2), t ∈ [0, 1] (Nichol & Dhariwal 2021, eq. 17, before the division by ᾱ(0);
    the schedules built on it use ratios ᾱ(t)/ᾱ(t′), where the normalisation cancels)."""
    return torch.cos((_t(t) + s) / (1 + s) * math.pi / 2) ** 2


# ----------------------------------------------------------------------------------------------------------------------
# VP SDE


def vp_sigma(t: TensorOrFloat, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """σ(t) = √(exp(½β_d t² + β_min t) − 1) of the VP SDE (EDM Table 1; ᾱ(t) = 1/(1 + σ²) is Song et al. 2021's
    exp(−½t²(β_max − β_min) − t·β_min) with β_d = β_max − β_min)."""
    t = _t(t)
    return (torch.exp(0.5 * beta_d * t**2 + beta_min * t) - 1).sqrt()


def vp_time(sigma: TensorOrFloat, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """t(σ), the inverse of :func:`vp_sigma`: (√(β_min² + 2β_d·ln(1 + σ²)) − β_min)/β_d."""
    sigma = _t(sigma) if not torch.is_tensor(sigma) else sigma
    return ((beta_min**2 + 2 * beta_d * (1 + sigma**2).log()).sqrt() - beta_min) / beta_d


# ----------------------------------------------------------------------------------------------------------------------
# VE SDE and NCSN


def ve_sigma(t: TensorOrFloat, sigma_min: float = 0.01, sigma_max: float = 50.0) -> torch.Tensor:
    """σ(t) = σ_min·(σ_max/σ_min)^t, the noise scale of the VE SDE (Song et al. 2021, eq. 30)."""
    return sigma_min * (sigma_max / sigma_min) ** _t(t)


def ve_time(sigma: torch.Tensor, sigma_min: float = 0.01, sigma_max: float = 50.0) -> torch.Tensor:
    """t(σ), the inverse of :func:`ve_sigma`."""
    return (sigma / sigma_min).log() / math.log(sigma_max / sigma_min)


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
