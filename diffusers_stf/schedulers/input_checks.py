"""Checks of scheduler inputs: each returns the value or raises a ValueError naming the argument."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def check_positive_finite(name: str, value) -> float:
    """``value`` as a float, or a ValueError naming ``name`` unless it is a real number in (0, ∞)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_nonnegative_finite(name: str, value) -> float:
    """``value`` as a float, or a ValueError naming ``name`` unless it is a real number in [0, ∞)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_sigma_range(sigma_min, sigma_max) -> None:
    """A ValueError unless 0 < ``sigma_min`` < ``sigma_max`` < ∞."""
    if not (math.isfinite(sigma_max) and sigma_max > sigma_min > 0):
        raise ValueError(f"need sigma_max > sigma_min > 0, got sigma_max={sigma_max}, sigma_min={sigma_min}")


def check_sigmas(sigmas) -> torch.Tensor:
    """Explicit noise levels as a float64 CPU vector, or a ValueError unless they are a non-empty, strictly decreasing
    sequence of finite positive numbers."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    valid = bool(torch.isfinite(sigmas).all() and (sigmas > 0).all() and (sigmas[1:] < sigmas[:-1]).all())
    if len(sigmas) < 1 or not valid:
        raise ValueError("sigmas must be a non-empty, strictly decreasing sequence of finite positive levels")
    return sigmas


def check_choices(*checks) -> None:
    """A ValueError for the first ``(name, value, allowed)`` whose ``value`` is not one of ``allowed``."""
    for name, value, allowed in checks:
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_step_count(name: str, value) -> int:
    """``value`` as an int >= 1: python, numpy and 0-d torch integers pass; floats, strings and bools do not."""
    if torch.is_tensor(value) and value.numel() == 1 and not value.is_floating_point() and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_float_tensor(name: str, value: torch.Tensor) -> None:
    """A ValueError unless ``value`` is a floating-point tensor (an int or bool image would be read as noise)."""
    if not torch.is_tensor(value) or not value.is_floating_point():
        kind = value.dtype if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"{name} must be a floating-point tensor, got {kind}")
