"""Exponential moving averages of the weights, θ_ema ← β · θ_ema + (1 − β) · θ after each optimizer step, with one
of two rules for the decay β. Exactly one rule is in force in a run.

EDM's half-life in images (Karras et al. 2022, Appendix F.1; NVlabs/edm ``training_loop.py``), the default: with
``nimg`` images seen before the step and ``batch`` images in it,

    halflife = min(halflife_kimg · 1000, rampup_ratio · nimg)      (ramp-up; no min when rampup_ratio is 0)
    β        = 0.5 ** (batch / max(halflife, 1e-8))

so the first step copies the weights (β = 0), and early on the average spans a fixed fraction of training.

While the ramp-up binds (halflife = r · nimg, r = ``rampup_ratio``), the weights seen at time τ ≤ t enter the average
with density ∝ (1 − β(τ))·Π β ≈ (ln 2 / (r τ))·(τ/t)^(ln 2 / r) ∝ τ^γ, γ = ln 2 / r − 1: EDM2's power-function
profile (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", §3.1), whose
relative standard deviation σ_rel = √((γ+1)/((γ+2)²(γ+3))) is EDM2's EMA length. So ``--ema_rampup_ratio r`` with a
half-life cap that never binds is EDM2's EMA of length σ_rel (:func:`halflife_ema_std`, :func:`rampup_ratio_for_std`):
r = 0.05 (EDM's default) is σ_rel ≈ 0.063; σ_rel 0.070 (EDM2-S) is r ≈ 0.057; σ_rel 0.125 (EDM2's autoguidance
guide) is r ≈ 0.117.

diffusers' warm-up rule (``EMAModel(use_ema_warmup=True)`` of ``train_unconditional.py --use_ema``): before optimizer
step k (k = 0, 1, …),

    β = 0 for k = 0,   else min(max_decay, 1 − (1 + k / inv_gamma) ** −power)
"""

from __future__ import annotations

import abc
import copy
import math

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


def halflife_ema_std(rampup_ratio: float) -> float:
    """EDM2's EMA length σ_rel of the half-life EMA while its ramp-up binds: the power-function profile of exponent
    γ = ln 2 / ``rampup_ratio`` − 1 (see the module docstring)."""
    from ..phema import exp_to_std

    if not 0 < rampup_ratio < math.log(2):
        raise ValueError(f"--ema_rampup_ratio must be in (0, ln 2) for a power-function profile, got {rampup_ratio}")
    return float(exp_to_std(math.log(2) / rampup_ratio - 1))


def rampup_ratio_for_std(std: float) -> float:
    """The ``--ema_rampup_ratio`` r whose half-life EMA has EDM2's EMA length σ_rel = ``std``: r = ln 2 / (γ + 1),
    γ = EDM2's exponent for σ_rel (with ``--ema_halflife_kimg`` at least r times the run's images / 1000, so the cap
    never binds)."""
    from ..phema import std_to_exp

    return float(math.log(2) / (std_to_exp(std) + 1))


def warmup_ema_beta(step: int, inv_gamma: float = 1.0, power: float = 0.75, max_decay: float = 0.9999) -> float:
    """diffusers' warm-up decay before optimizer step ``step`` (0-based): 0 at the first step, then
    min(max_decay, 1 − (1 + step/inv_gamma)^(−power))."""
    if step <= 0:
        return 0.0
    return max(0.0, min(max_decay, 1 - (1 + step / inv_gamma) ** -power))


class MovingAverage(abc.ABC):
    """A frozen copy of ``model`` (its class, config and device) that follows it; subclasses give the decay rule.

    Args:
        model: the trained network (unwrapped).
    """

    rule = ""

    @property
    def averages(self) -> bool:
        """Whether the copy is an average of past weights (False: it follows the trained weights exactly)."""
        return True

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.beta = 0.0

    @abc.abstractmethod
    def decay(self, nimg: float, batch_images: float, step: int) -> float:
        ...

    @torch.no_grad()
    def update(self, model: nn.Module, nimg: float, batch_images: float, step: int = 0) -> float:
        """Blend ``model``'s weights in after optimizer step ``step`` (0-based) of ``batch_images`` images with
        ``nimg`` seen before it; returns the β used. Buffers are copied."""
        self.beta = self.decay(nimg, batch_images, step)
        for p_ema, p in zip(self.model.parameters(), model.parameters()):
            p_ema.copy_(p.detach().to(p_ema.dtype).lerp(p_ema, self.beta))
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)
        return self.beta

    def to(self, *args, **kwargs) -> "MovingAverage":
        self.model.to(*args, **kwargs)
        return self

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state_dict):
        self.model.load_state_dict(state_dict)


class HalfLifeEMA(MovingAverage):
    """EDM's EMA with a half-life counted in training images (see the module docstring).

    Not diffusers' ``EMAModel``, whose decay counts optimizer steps (that rule is :class:`WarmupEMA`): a half-life
    in images does not change with the batch size.

    Args:
        model: the trained network (unwrapped).
        halflife_kimg: half-life in thousands of images (EDM: 500); 0 makes the copy follow the weights exactly.
        rampup_ratio: the half-life is at most this fraction of the images seen (EDM: 0.05); 0 disables the ramp-up.
    """

    def __init__(self, model: nn.Module, halflife_kimg: float = 500.0, rampup_ratio: float = 0.05):
        super().__init__(model)
        self.halflife_kimg, self.rampup_ratio = float(halflife_kimg), float(rampup_ratio)
        self.rule = (f"EDM half-life EMA (--ema_halflife_kimg {halflife_kimg:g}, --ema_rampup_ratio {rampup_ratio:g})"
                     if halflife_kimg > 0 else "no EMA (--ema_halflife_kimg 0: the saved weights are the trained ones)")

    @property
    def averages(self) -> bool:
        return self.halflife_kimg > 0

    def decay(self, nimg, batch_images, step):
        return ema_beta(nimg, batch_images, self.halflife_kimg, self.rampup_ratio)


class WarmupEMA(MovingAverage):
    """diffusers' ``EMAModel`` decay with warm-up (``--use_ema``; see the module docstring).

    Args:
        model: the trained network (unwrapped).
        inv_gamma, power: the warm-up (diffusers: 1.0 and 3/4).
        max_decay: the largest decay (diffusers: 0.9999).
    """

    def __init__(self, model: nn.Module, inv_gamma: float = 1.0, power: float = 0.75, max_decay: float = 0.9999):
        super().__init__(model)
        self.inv_gamma, self.power, self.max_decay = float(inv_gamma), float(power), float(max_decay)
        self.rule = (f"diffusers' warm-up EMA (--use_ema: --ema_inv_gamma {inv_gamma:g}, --ema_power {power:g}, "
                     f"--ema_max_decay {max_decay:g})")

    def decay(self, nimg, batch_images, step):
        return warmup_ema_beta(step, self.inv_gamma, self.power, self.max_decay)
