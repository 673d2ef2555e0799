"""Classifier-free guidance (Ho & Salimans 2022): one network trained with label dropout is both the conditional
model D_c = D(x; σ, y) and the unconditional one D_u = D(x; σ, ∅) (∅ the null label), and

    D_w = D_u + w·(D_c − D_u),   i.e.   ΔD = (w − 1)·(D_c − D_u)

on top of the conditional evaluation, diffusers' ``guidance_scale`` (w = 1: plain conditional sampling). The
unconditional rows run in the same batched forward pass as the conditional ones (:meth:`network_labels`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .base import GuidanceTerm, GuidedEvaluation, check_weight


class ClassifierFreeGuidance(GuidanceTerm):
    """CFG (module docstring).

    Args:
        guidance_scale: w; 1 switches the term off (one network evaluation per step).
        null_class_label: ∅, the label index the network was trained with for "no class".
        sigma_interval: (σ_lo, σ_hi): guide only there (Kynkäänniemi et al. 2024); default everywhere.
    """

    def __init__(self, guidance_scale: float, null_class_label: int,
                 sigma_interval: Tuple[float, float] = (0.0, math.inf)):
        super().__init__(sigma_interval, interval_name="guidance_interval")
        self.guidance_scale = check_weight("guidance_scale", guidance_scale)
        self.null_class_label = int(null_class_label)

    def weight(self, first_order: bool) -> float:
        return self.guidance_scale - 1

    def network_labels(self, class_labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return torch.full_like(class_labels, self.null_class_label)

    def correction(self, evaluation: GuidedEvaluation) -> torch.Tensor:
        unconditional = evaluation.preconditioning.denoise(evaluation.x, evaluation.extra_outputs[id(self)],
                                                           evaluation.sigma)
        return (self.guidance_scale - 1) * (evaluation.denoised - unconditional).to(torch.float64)
