"""What every training loss shares: its output (:class:`LossOutput`), its reduction over C·H·W, the one
perturbation x̃ = y + σ·n (:func:`add_noise`), and the argument checks.

**The contract.** A loss is a callable that returns a :class:`LossOutput` (or a subclass with the loss's own fields):
``loss`` is the per-sample loss (B,) after the loss's reduction over C·H·W, and the training objective is its mean
over the batch, ``out.loss.mean()``. ``sigma`` (B,) is each sample's noise level in the EDM coordinates of
:func:`add_noise`, for the loss per noise level in the logs. The trainer takes any of them the same way.

**The perturbation.** Every loss noises its images with :func:`add_noise`, x̃ = y + σ·n (EDM eq. 2). A network that
sees the variance-preserving state (DDPM, SA-DPM, the VP preconditionings) gets x_t = c_in(σ)·x̃ = x̃/√(1 + σ²) =
√ᾱ·y + √(1 − ᾱ)·n with ᾱ = 1/(1 + σ²), the scaling of its
:class:`~diffusers_stf.preconditioning.Preconditioning`.

Validation without host–device syncs: the constructors check their hyperparameters; tensors given to a loss call
(e.g. an explicit σ) are checked only when they live on the CPU, where the check is free (:func:`check_on_host`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from .draws import randn

REDUCTIONS = ("sum", "mean")


@dataclass(kw_only=True)
class LossOutput:
    """What a training loss returns; the :class:`~diffusers_stf.training.Trainer` takes it from a script's loss
    function as it is. Keep everything a tensor on the device: the trainer sums them there and copies them to the host
    once per logging step.

    Args:
        loss: the per-sample loss (B,) after the loss's reduction; the training objective is ``loss.mean()``.
        sigma: each sample's noise level (B,) in the coordinates x̃ = y + σ·n, for the loss per σ bucket; None for a
            loss without one.
        logs: more scalars to log (averaged between writes), e.g. the mean of one term of the loss.
        per_sample_logs: more per-sample values (B,), logged per σ bucket like the loss (e.g. ``{"accuracy":
            correct}`` gives ``accuracy_sigma_<bucket>`` columns).
    """

    loss: torch.Tensor
    sigma: Optional[torch.Tensor] = None
    logs: Dict[str, torch.Tensor] = field(default_factory=dict)
    per_sample_logs: Dict[str, torch.Tensor] = field(default_factory=dict)


def check_reduction(reduction: str) -> str:
    """``reduction``, or a ValueError naming the allowed values."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def reduce_per_sample(per_element: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """(B, C, H, W) → (B,): ``sum`` over C·H·W, as EDM's training loop (whose loss is then the mean over the batch,
    ``loss.sum() / batch_size``), or ``mean`` over C·H·W, as ``F.mse_loss`` (1/(C·H·W) of EDM's scale)."""
    if check_reduction(reduction) == "sum":
        return per_element.flatten(1).sum(1)
    return per_element.flatten(1).mean(1)


def per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) → (B, 1, …, 1) for broadcasting against (B, C, H, W)."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def add_noise(images: torch.Tensor, sigma: torch.Tensor, generator: Optional[torch.Generator] = None,
              noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x̃ = y + σ·n with n ~ N(0, I) (EDM eq. 2's perturbation; σ per sample), in the dtype of ``images``; n is drawn
    with ``generator`` unless given as ``noise`` (shaped like ``images``)."""
    if noise is None:
        noise = randn(images.shape, generator, images.device, images.dtype)
    elif noise.shape != images.shape:
        raise ValueError(f"noise must have the shape of images {tuple(images.shape)}, got {tuple(noise.shape)}")
    return images + per_sample(sigma.to(images.dtype), images.ndim) * noise.to(images.device, images.dtype)


def check_images(images, name: str = "images") -> None:
    """A ValueError naming ``name`` unless ``images`` is a floating-point batch (B, C, H, W) with B >= 1: a single
    (C, H, W) image would otherwise be read as a batch of C one-channel images."""
    shape = tuple(images.shape) if torch.is_tensor(images) else None
    if shape is None or len(shape) != 4 or not images.is_floating_point() or shape[0] == 0:
        got = f"shape {shape} ({images.dtype})" if shape is not None else type(images).__name__
        raise ValueError(f"{name} must be a batch (B, C, H, W) of floating-point images with B >= 1, got {got}; "
                         f"a single (C, H, W) image is the batch {name}[None]")


def check_sigma_shape(sigma: torch.Tensor, batch_size: int) -> None:
    """A ValueError unless ``sigma`` holds one value (for every image) or one per image."""
    if sigma.numel() not in (1, batch_size):
        raise ValueError(f"sigma must hold one value or one per image ({batch_size}), got shape {tuple(sigma.shape)}")


def check_on_host(condition: torch.Tensor, message: str) -> None:
    """Raise ``ValueError(message)`` when ``condition`` is not all true, for a CPU tensor only.

    On an accelerator the check would stall the pipeline on every training step (a host–device sync), so values
    drawn or computed there are trusted; checking them costs nothing on the CPU.
    """
    if condition.device.type == "cpu" and not bool(condition.all()):
        raise ValueError(message)


def check_finite(**values: float) -> None:
    """ValueError naming the first argument that is not a finite number."""
    for name, value in values.items():
        if not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {value}")
