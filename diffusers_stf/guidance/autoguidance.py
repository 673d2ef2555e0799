"""Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", eq. 1): a weaker
model D_0 of the same task (smaller, or trained for less) guides the main model D_1,

    D_w = D_0 + w·(D_1 − D_0),   i.e.   ΔD = (w − 1)·(D_1 − D_0)

on top of the main evaluation (w = 1: the main model alone). Unlike classifier-free guidance it needs no labels, so it
guides unconditional models too. The guide shares the main network's parametrisation, so it is evaluated at the main
network's own input and timestep.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from .base import GuidanceTerm, GuidedEvaluation, check_weight


class Autoguidance(GuidanceTerm):
    """Autoguidance (module docstring).

    Args:
        guide: the guide network D_0's raw network, called like the main one: ``guide(model_input, timestep,
            class_labels=...)`` returning ``.sample``.
        guidance_scale: w (``autoguidance_scale`` of the pipelines); 1 switches the term off.
        sigma_interval: (σ_lo, σ_hi): guide only there (Kynkäänniemi et al. 2024); default everywhere.
        conditional: whether the guide takes class labels.
    """

    def __init__(self, guide, guidance_scale: float, sigma_interval: Tuple[float, float] = (0.0, math.inf),
                 conditional: bool = False):
        super().__init__(sigma_interval, interval_name="guidance_interval")
        self.guide = guide
        self.guidance_scale = check_weight("autoguidance_scale", guidance_scale)
        self.conditional = conditional

    def weight(self, first_order: bool) -> float:
        return self.guidance_scale - 1

    def correction(self, evaluation: GuidedEvaluation) -> torch.Tensor:
        labels = evaluation.class_labels if self.conditional else None
        model_input = evaluation.model_input.to(self.guide.dtype)
        timestep = evaluation.timestep.to(device=model_input.device, dtype=torch.float32).expand(model_input.shape[0])
        guide_output = self.guide(model_input, timestep, class_labels=labels).sample
        guide_denoised = evaluation.preconditioning.denoise(evaluation.x, guide_output, evaluation.sigma)
        return (self.guidance_scale - 1) * (evaluation.denoised - guide_denoised).to(torch.float64)
