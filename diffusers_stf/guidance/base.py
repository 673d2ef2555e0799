"""Guidance as terms. A term corrects the denoiser at one network evaluation,

    D_guided(x; σ) = D(x; σ) + Σ_k ΔD_k(x, σ),

in EDM coordinates (x = y + σ·n). A score correction ∇_x f becomes ΔD = σ²·∇_x f (Tweedie: D = x + σ²·∇ log p_σ).
The pipeline sums the terms active at the current σ and writes the sum into the scheduler's own model output through
:meth:`~diffusers_stf.preconditioning.Preconditioning.output_change` (ΔF = ΔD/c_out), so one mechanism serves every
scheduler. A term that is not active changes nothing: sampling is then bit-identical to unguided sampling.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from ..preconditioning import Preconditioning

Sigma = Union[float, torch.Tensor]


def check_weight(name: str, value) -> float:
    """A finite number >= 0, or a ValueError naming the argument."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_interval(name: str, interval, strict: bool = True) -> Tuple[float, float]:
    """(σ_lo, σ_hi) with 0 <= σ_lo < σ_hi (σ_lo <= σ_hi unless ``strict``; σ_hi may be inf), or a ValueError naming
    the argument."""
    try:
        low, high = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (sigma_lo, sigma_hi), got {interval!r}") from None
    ordered = low < high if strict else low <= high
    if not (0 <= low and ordered):
        raise ValueError(f"{name} must satisfy 0 <= sigma_lo {'<' if strict else '<='} sigma_hi, got {interval!r}")
    return low, high


def per_sample(sigma: Sigma, batch: int) -> Sigma:
    """σ as a python float (one level for the batch) or a float64 tensor (batch,) where it is."""
    if isinstance(sigma, (int, float)):
        return float(sigma)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return sigma.expand(batch) if sigma.ndim == 0 else sigma.reshape(batch)


def squared(sigma: Sigma, like: torch.Tensor):
    """σ² ready to multiply ``like``: a python float, or a per-sample tensor on its device."""
    if isinstance(sigma, float):
        return sigma**2
    return (sigma.to(like.device) ** 2).reshape(-1, *([1] * (like.ndim - 1)))


def sigma_squared_gradient(log_density: Callable, dtype: torch.dtype, sample: torch.Tensor, sigma: Sigma):
    """(σ²·∇_x f(x, σ) in float64, f per sample, detached) for a per-sample log-density f: the gradient w.r.t. the
    input only, in the model's ``dtype``, with autograd on even inside the pipeline's ``no_grad``."""
    sigma = per_sample(sigma, sample.shape[0])
    with torch.enable_grad():
        x = sample.detach().to(dtype).requires_grad_(True)
        value = log_density(x, sigma)
        (grad,) = torch.autograd.grad(value.sum(), x)
    return squared(sigma, sample) * grad.to(torch.float64), value.detach()


@dataclass
class GuidedEvaluation:
    """One network evaluation of a sampler, in EDM coordinates, as the terms see it.

    Args:
        x: the sample x = y + σ·n (the scheduler's state mapped to EDM coordinates).
        sigma: σ of the evaluation: a python float, or one float64 value per sample (DG's boosting).
        model_output: the main network's raw output at this evaluation (its first C channels are F).
        preconditioning: relates ``model_output`` to D(x; σ).
        first_order: whether this is the first-order (Euler) evaluation of a sampler step; False for the corrector
            evaluation of a Heun-like step (DG weighs the two differently).
        extra_outputs: outputs of the main network for the extra label rows a term asked for
            (:meth:`GuidanceTerm.network_labels`), keyed by the term's ``id``.
        model_input, timestep: what the main network was called with (a network of the same parametrisation can be
            evaluated at them).
        class_labels: the labels the main network saw (None for an unconditional one).
    """

    x: torch.Tensor
    sigma: Sigma
    model_output: torch.Tensor
    preconditioning: Preconditioning
    first_order: bool = True
    extra_outputs: Dict[int, torch.Tensor] = field(default_factory=dict)
    model_input: Optional[torch.Tensor] = None
    timestep: Optional[torch.Tensor] = None
    class_labels: Optional[torch.Tensor] = None

    @cached_property
    def denoised(self) -> torch.Tensor:
        """D(x; σ) of the main network, computed once if a term asks for it."""
        return self.preconditioning.denoise(self.x, self.model_output, self.sigma)


class GuidanceTerm(abc.ABC):
    """A guidance method: ΔD(x, σ) for a batch at one network evaluation, inside its σ interval.

    A subclass implements :meth:`correction` and, where it needs them, :meth:`weight` (per evaluation order) and
    :meth:`network_labels` (extra rows of the main network, batched with its forward: classifier-free guidance).

    Args:
        sigma_interval: (σ_lo, σ_hi): the term acts only at evaluations with σ_lo <= σ <= σ_hi.
    """

    def __init__(self, sigma_interval: Tuple[float, float] = (0.0, math.inf), interval_name: str = "sigma_interval"):
        self.sigma_interval = check_interval(interval_name, sigma_interval, strict=False)

    def weight(self, first_order: bool) -> float:
        """The term's weight at an evaluation of this order; 0 switches it off there."""
        return 1.0

    def is_active(self, sigma: float, first_order: bool = True) -> bool:
        """Whether the term changes the evaluation at noise level ``sigma`` (decided on the host)."""
        return self.weight(first_order) != 0 and self.sigma_interval[0] <= sigma <= self.sigma_interval[1]

    def network_labels(self, class_labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Class labels of extra rows for the main network at this evaluation (None: none)."""
        return None

    @abc.abstractmethod
    def correction(self, evaluation: GuidedEvaluation) -> torch.Tensor:
        """ΔD in EDM coordinates, the shape of ``evaluation.x``."""
