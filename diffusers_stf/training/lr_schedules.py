"""EDM2's inverse-square-root learning-rate decay (Karras et al. 2024, Section 3 "learning rate decay", Appendix;
NVlabs/edm2 ``learning_rate_schedule``):

    α(t) = α_ref / √max(t/t_ref, 1) · min(t/t_rampup, 1)

constant α_ref until t_ref, then ∝ 1/√t, with a linear ramp-up from 0 over t_rampup (EDM2 counts t in images:
t_ref = 70k batches of 2048 images for ImageNet-512, 35k for ImageNet-64; t_rampup = 10 Mimg). α is evaluated at the
training time *before* each optimizer step, so the first step has α = 0 when there is a ramp-up, as in EDM2.
"""

from __future__ import annotations

import math
from typing import Callable

from torch.optim.lr_scheduler import LambdaLR


def _check(name: str, value: float, allow_zero: bool = True):
    if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")


def inverse_sqrt_factor(t: float, t_ref: float, rampup: float = 0.0) -> float:
    """α(t)/α_ref = min(t/rampup, 1)/√max(t/t_ref, 1); t, t_ref and rampup in one unit (t_ref = 0: no decay,
    rampup = 0: no ramp-up)."""
    factor = 1.0
    if t_ref > 0:
        factor /= math.sqrt(max(t / t_ref, 1.0))
    if rampup > 0:
        factor *= min(t / rampup, 1.0)
    return factor


def inverse_sqrt_lr(t: float, ref_lr: float, t_ref: float, rampup: float = 0.0) -> float:
    """α(t) = α_ref/√max(t/t_ref, 1)·min(t/rampup, 1) (see the module docstring).

    Args:
        t: training time before the step (images, as EDM2, or optimizer steps), >= 0.
        ref_lr: α_ref (EDM2: 0.012 for XS, 0.010 for S, …).
        t_ref: where the decay starts, in the unit of t (EDM2: ``ref_batches``·batch images); 0: no decay.
        rampup: length of the linear ramp-up, in the unit of t (EDM2: 10⁷ images); 0: none.
    """
    for name, value in (("t", t), ("t_ref", t_ref), ("rampup", rampup)):
        _check(name, value)
    _check("ref_lr", ref_lr, allow_zero=False)
    return ref_lr * inverse_sqrt_factor(t, t_ref, rampup)


def inverse_sqrt_lr_lambda(ref_steps: float, num_warmup_steps: float = 0.0) -> Callable[[int], float]:
    """The multiplier of the optimizer's learning rate (= α_ref) before optimizer step k, for ``LambdaLR``.

    In steps: ``ref_steps`` is EDM2's ``ref_batches`` (t_ref/batch) and ``num_warmup_steps`` its ramp-up in images
    divided by the batch (a fraction is kept, so the ramp is the same as counted in images).
    """
    _check("ref_steps", ref_steps)
    _check("num_warmup_steps", num_warmup_steps)
    return lambda step: inverse_sqrt_factor(float(step), ref_steps, num_warmup_steps)


def get_inverse_sqrt_schedule(optimizer, ref_steps: float, num_warmup_steps: float = 0.0,
                              last_epoch: int = -1) -> LambdaLR:
    """A ``LambdaLR`` with EDM2's schedule, stepped once per optimizer step like diffusers' ``get_scheduler``
    schedules; the optimizer's ``lr`` is α_ref.

    For EDM2's recipe at a global batch of B images: ``ref_steps = ref_batches`` (70 000 or 35 000) and
    ``num_warmup_steps = 10e6 / B``.
    """
    return LambdaLR(optimizer, inverse_sqrt_lr_lambda(ref_steps, num_warmup_steps), last_epoch)
