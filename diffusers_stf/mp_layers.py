"""Magnitude-preserving (MP) building blocks of EDM2 (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Section 3 and Appendix B).

Each operation keeps unit expected magnitude (root mean square 1 per element) for inputs of unit magnitude:

    normalize(x)       = x / (ε + ‖x‖/√N)                 (N the number of elements normalised over, ε = 1e-4)
    mp_silu(x)         = silu(x) / 0.596                  (Eq. 81: E[silu(z)²] = 0.596² for z ~ N(0, 1))
    mp_sum(a, b; t)    = ((1 − t)·a + t·b) / √((1 − t)² + t²)                                         (Eq. 88)
    mp_cat(a, b; t)    = [w_a·a, w_b·b],  w_a = C(1 − t)/√N_a,  w_b = C·t/√N_b,
                         C = √((N_a + N_b)/((1 − t)² + t²))                                          (Eq. 103)
    MP Fourier(c)      = √2 · cos(f·c + φ),  f ~ N(0, (2π)²),  φ ~ U(0, 2π)                          (Eq. 75)
    MP conv / linear   = conv(x, ŵ · g/√fan_in),  ŵ = normalize(w) per output channel        (Eq. 47, 66)

Forced weight normalisation (Eq. 66): in training mode every :class:`MPConv` first overwrites its stored weight by
its normalised value, so the weights stay on the sphere whatever the optimizer does and a saved model is exactly the
one that was trained; the forward pass then normalises again (a differentiable projection), in any mode. There are
no biases and no learned normalisation layers.

These blocks are used by the EDM2 network (:mod:`~diffusers_stf.models.edm2_unet`) and by the uncertainty head of
the EDM2 loss (:mod:`~diffusers_stf.losses.edm2`); the parameter and buffer names follow NVlabs/edm2.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-4
SILU_RMS = 0.596  # √E[silu(z)²] for z ~ N(0, 1), as EDM2 rounds it


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or in float64 when it is float64 (half-precision weights are normalised in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def normalize(x: torch.Tensor, dim=None, eps: float = EPS) -> torch.Tensor:
    """x / (ε + rms(x)), the root mean square taken over ``dim`` (default: every dimension but the first) in at
    least float32."""
    dim = tuple(range(1, x.ndim)) if dim is None else dim
    rms = at_least_float32(x).square().mean(dim=dim, keepdim=True).sqrt()
    return x / (eps + rms).to(x.dtype)


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to unit magnitude for unit-variance Gaussian input (EDM2 Eq. 81)."""
    return F.silu(x) / SILU_RMS


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 − t)·a + t·b, rescaled so that independent unit-magnitude inputs give a unit-magnitude sum (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation along ``dim`` with ``b`` weighted by t and ``a`` by 1 − t, each part rescaled by its size so that
    the result has unit magnitude for unit-magnitude inputs (Eq. 103)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    scale = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(n_a)), b * (scale * t / math.sqrt(n_b))], dim=dim)


def resample(x: torch.Tensor, filter: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """Down- or up-sampling by 2 with the separable FIR ``filter`` (normalised to sum 1), or ``keep``.

    With EDM2's filter [1, 1], ``down`` is 2×2 average pooling and ``up`` is nearest-neighbour upsampling.
    """
    if mode == "keep":
        return x
    taps = torch.as_tensor(filter, dtype=torch.float32)
    taps = taps / taps.sum()
    kernel = torch.outer(taps, taps).to(device=x.device, dtype=x.dtype)
    channels, pad = x.shape[1], (len(taps) - 1) // 2
    if mode == "down":
        return F.conv2d(x, kernel.expand(channels, 1, -1, -1), groups=channels, stride=2, padding=pad)
    if mode == "up":
        return F.conv_transpose2d(x, (4 * kernel).expand(channels, 1, -1, -1), groups=channels, stride=2, padding=pad)
    raise ValueError(f"mode must be 'keep', 'down' or 'up', got {mode!r}")


class MPFourier(nn.Module):
    """Magnitude-preserving Fourier features √2·cos(f·c + φ) of a scalar per sample (Eq. 75).

    The random frequencies ``freqs`` (2π·N(0, 1)·bandwidth) and phases ``phases`` (2π·U(0, 1)) are buffers: saved with
    the model, never trained.
    """

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """(B,) → (B, num_channels), computed in at least float32 and returned in the dtype of ``c``."""
        c = c.reshape(-1)
        dtype = torch.promote_types(c.dtype, torch.float32)
        angles = torch.outer(c.to(dtype), self.freqs.to(dtype)) + self.phases.to(dtype)
        return (math.sqrt(2) * angles.cos()).to(c.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (``kernel`` (k, k)) or fully connected layer (``kernel`` ()) without bias
    (Eq. 47), with forced weight normalisation in training mode (Eq. 66).

    ``weight`` has shape (out, in, *kernel), initialised N(0, 1). The effective weight is normalize(weight)·g/√fan_in
    with fan_in = in·∏kernel and ``gain`` g (1, or a learned scalar such as EDM2's ``emb_gain``/``out_gain``), so a
    unit-magnitude input gives a unit-magnitude output for g = 1.

    In training mode the in-place renormalisation happens at every call, as in EDM2, so a layer may be called once per
    backward pass (a second call would modify a weight autograd saved): batch several evaluations into one call.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int] = ()):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def effective_weight(self, gain: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
        """normalize(weight)·gain/√fan_in in at least float32."""
        fan_in = self.weight[0].numel()
        return normalize(at_least_float32(self.weight)) * (gain / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor, gain: Union[float, torch.Tensor] = 1.0) -> torch.Tensor:
        if self.training:
            with torch.no_grad():  # forced weight normalisation: the stored weight itself returns to the sphere
                self.weight.copy_(normalize(at_least_float32(self.weight)))
        w = self.effective_weight(gain).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)
