"""Discriminator Guidance (Kim et al., ICML 2023, eq. 9): s_guided = s_θ + w·∇_x log(d/(1 − d)), i.e.

    ΔD(x; σ) = w·σ²·∇_x log r(x, σ),   r = d/(1 − d) ≈ p_data,σ/p_model,σ.

As DG's ``edm_sampler``: the first-order (Euler) evaluation of each Heun step uses ``weight_first_order`` (DG's
``dg_weight_1st_order``, default 2), the Heun corrector ``weight_second_order`` (default 0), and the discriminator
guides only for σ in DG's VP-time window [0.01, 1] (σ ∈ [0.0447, 152.2]). Since the Heun update averages the two
slopes, the Euler slope's guidance enters a Heun step with weight w₁/2 and the final Euler step with w₁ (as in DG).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..noise_schedules import vp_sigma
from .base import GuidanceTerm, GuidedEvaluation, Sigma, check_weight, per_sample, sigma_squared_gradient

DG_TIME_MIN, DG_TIME_MAX = 0.01, 1.0  # DG generate.py: the VP-time window in which guidance is applied
DG_GUIDANCE_SIGMA_MIN = float(vp_sigma(DG_TIME_MIN))  # ≈ 0.0447
DG_GUIDANCE_SIGMA_MAX = float(vp_sigma(DG_TIME_MAX))  # ≈ 152.2


def discriminator_correction(discriminator, sample: torch.Tensor, sigma: Sigma,
                             class_labels: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """σ²·∇_x log(d/(1 − d))(x, σ), the term that D_guided = D + w·(this) adds (DG eq. 9 in denoiser form).

    The gradient is taken w.r.t. the input only, in the discriminator's dtype, with autograd enabled even inside the
    pipeline's ``no_grad``; d is clipped to [1e-5, 1 − 1e-5] (zero gradient where clipped). The σ ↔ VP-time/input-scale
    translation happens inside the discriminator, so the chain-rule factor of DG's ``-(σ²·mean_vp)·∇_{x_vp}`` is
    included.

    Args:
        discriminator: anything with ``log_ratio(x, σ, labels)`` and a ``dtype`` (:class:`~diffusers_stf.Discriminator`).
        sample: x, the EDM/VE-scale sample, shape (batch, C, H, W).
        sigma: σ, a scalar or one per sample.
        class_labels: for a class-conditional discriminator.

    Returns:
        (correction in float64 with the shape of ``sample``, log(d/(1 − d)) per sample, clipped, detached)
    """
    log_ratio = lambda x, s: discriminator.log_ratio(x, s, class_labels)  # noqa: E731
    return sigma_squared_gradient(log_ratio, discriminator.dtype, sample, sigma)


class DiscriminatorGuidance(GuidanceTerm):
    """DG's correction (module docstring).

    Args:
        discriminator: the discriminator (``log_ratio(x, σ, class_labels)`` on EDM-scale x and σ).
        weight_first_order: w₁, on each step's first-order evaluation (every evaluation of a first-order scheduler).
        weight_second_order: w₂, on the corrector evaluation of a Heun-like step.
        sigma_min, sigma_max: the window of σ in which the discriminator guides.
        class_labels: labels for a class-conditional discriminator (ignored by an unconditional one).
    """

    def __init__(self, discriminator, weight_first_order: float = 2.0, weight_second_order: float = 0.0,
                 sigma_min: float = DG_GUIDANCE_SIGMA_MIN, sigma_max: float = DG_GUIDANCE_SIGMA_MAX,
                 class_labels: Optional[torch.Tensor] = None):
        super().__init__((sigma_min, sigma_max), interval_name="(dg_sigma_min, dg_sigma_max)")
        self.discriminator = discriminator
        self.weights = (check_weight("dg_weight_1st_order", weight_first_order),
                        check_weight("dg_weight_2nd_order", weight_second_order))
        conditional = discriminator.config.get("num_class_embeds") is not None
        self.class_labels = class_labels if conditional else None

    def weight(self, first_order: bool) -> float:
        return self.weights[0] if first_order else self.weights[1]

    def correction_and_log_ratio(self, x: torch.Tensor, sigma: Sigma, weight: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """(w·σ²·∇_x log r, log r) at (x, σ). With one σ per sample, samples outside the window get no guidance and
        log r = +inf (DG's "accepted"); the mask is computed on the device (no host sync)."""
        sigma = per_sample(sigma, x.shape[0])
        low, high = self.sigma_interval
        if isinstance(sigma, float):  # one level: the window is decided on the host
            if not low <= sigma <= high:
                return torch.zeros_like(x, dtype=torch.float64), torch.full((x.shape[0],), math.inf, dtype=torch.float64,
                                                                            device=x.device)
            correction, log_ratio = discriminator_correction(self.discriminator, x, sigma, self.class_labels)
            return weight * correction, log_ratio.to(torch.float64)
        inside = ((sigma >= low) & (sigma <= high)).to(x.device)
        correction, log_ratio = discriminator_correction(self.discriminator, x, sigma, self.class_labels)
        log_ratio = torch.where(inside, log_ratio.to(torch.float64), torch.full_like(log_ratio, math.inf, dtype=torch.float64))
        return weight * correction * inside.reshape(-1, *([1] * (x.ndim - 1))), log_ratio

    def correction(self, evaluation: GuidedEvaluation) -> torch.Tensor:
        return self.correction_and_log_ratio(evaluation.x, evaluation.sigma, self.weight(evaluation.first_order))[0]
