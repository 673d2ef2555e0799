"""Exponential moving average of the weights with EDM's half-life in images (Karras et al. 2022, Appendix F.1;
NVlabs/edm ``training_loop.py``).

After each optimizer step, with ``nimg`` images seen before it and ``batch`` images in it:

    halflife = min(halflife_kimg · 1000, rampup_ratio · nimg)      (ramp-up; no min when rampup_ratio is 0)
    β        = 0.5 ** (batch / max(halflife, 1e-8))
    θ_ema    ← β · θ_ema + (1 − β) · θ

so the first step copies the weights (β = 0), and early on the average spans a fixed fraction of training.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_beta(nimg: float, batch_images: float, halflife_kimg: float = 500.0, rampup_ratio: float = 0.05) -> float:
    """EDM's EMA decay β for a step of ``batch_images`` after ``nimg`` images (0 disables the average: β = 0)."""
    if halflife_kimg <= 0:
        return 0.0
    halflife = halflife_kimg * 1000.0
    if rampup_ratio > 0:
        halflife = min(halflife, nimg * rampup_ratio)
    return 0.5 ** (batch_images / max(halflife, 1e-8))


class EMAModel:
    """A frozen copy of ``model`` that follows it with EDM's half-life schedule (see the module docstring).

    Args:
        model: the trained network (unwrapped); the copy keeps its class, config and device.
        halflife_kimg: half-life in thousands of images (EDM: 500); 0 makes the copy follow the weights exactly.
        rampup_ratio: the half-life is at most this fraction of the images seen (EDM: 0.05); 0 disables the ramp-up.
    """

    def __init__(self, model: nn.Module, halflife_kimg: float = 500.0, rampup_ratio: float = 0.05):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.halflife_kimg, self.rampup_ratio = float(halflife_kimg), float(rampup_ratio)
        self.beta = 0.0

    @torch.no_grad()
    def update(self, model: nn.Module, nimg: float, batch_images: float) -> float:
        """Blend ``model``'s weights in; returns the β used. Buffers are copied."""
        self.beta = ema_beta(nimg, batch_images, self.halflife_kimg, self.rampup_ratio)
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.copy_(p.detach().to(p_ema.dtype).lerp(p_ema, self.beta))
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        return self.beta

    def to(self, *args, **kwargs) -> "EMAModel":
        self.model.to(*args, **kwargs)
        return self

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state_dict):
        self.model.load_state_dict(state_dict)
