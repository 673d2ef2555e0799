"""Layers of the DDPM++/NCSN++ (Song et al., ICLR 2021, "Score-Based Generative Modeling through Stochastic
Differential Equations", Appendix H) and ADM (Dhariwal & Nichol, NeurIPS 2021, "Diffusion Models Beat GANs on Image
Synthesis", §3) networks, as EDM (Karras et al., NeurIPS 2022, Appendix F.2) trains them.

One residual block (:class:`UNetBlock`) covers the three architectures; they differ in how the noise embedding enters
(added before the second GroupNorm, or ADM's adaptive scale and shift), in the skip scale (√½ for Song's networks), in
the resampling filter and in the initialisation. The attribute names of every layer are those of EDM's
``training/networks.py``, so that its state dicts load unchanged (see :mod:`~diffusers_stf.models.song_unet`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


@dataclass(frozen=True)
class Init:
    """How a layer's weight and bias are drawn: ``mode`` gives the unit distribution for the layer's fan-in/fan-out
    (Glorot & Bengio 2010 for ``xavier_*``, He et al. 2015 for ``kaiming_*`` with gain 1), scaled by ``weight`` and
    ``bias`` (0 gives a zero tensor)."""

    mode: str = "kaiming_normal"
    weight: float = 1.0
    bias: float = 0.0

    def __post_init__(self):
        if self.mode not in INIT_MODES:
            raise ValueError(f"init mode must be one of {INIT_MODES}, got {self.mode!r}")


@torch.no_grad()
def init_(tensor: torch.Tensor, mode: str, fan_in: int, fan_out: int, gain: float) -> torch.Tensor:
    """Fill ``tensor`` in place: uniform on ±√(6/(fan_in + fan_out)) or ±√(3/fan_in), normal with variance
    2/(fan_in + fan_out) or 1/fan_in, times ``gain``."""
    if gain == 0:
        return tensor.zero_()
    if mode == "xavier_uniform":
        return tensor.uniform_(-1, 1).mul_(gain * math.sqrt(6 / (fan_in + fan_out)))
    if mode == "xavier_normal":
        return tensor.normal_().mul_(gain * math.sqrt(2 / (fan_in + fan_out)))
    if mode == "kaiming_uniform":
        return tensor.uniform_(-1, 1).mul_(gain * math.sqrt(3 / fan_in))
    if mode == "kaiming_normal":
        return tensor.normal_().mul_(gain * math.sqrt(1 / fan_in))
    raise ValueError(f"init mode must be one of {INIT_MODES}, got {mode!r}")


def resample_filter_2d(taps: Sequence[float]) -> torch.Tensor:
    """The separable low-pass filter f fᵀ / (Σf)², shape (1, 1, k, k): [1, 1] is the box filter of DDPM++ (average
    pooling, nearest upsampling), [1, 3, 3, 1] the binomial filter of NCSN++ (bilinear resampling)."""
    try:  # checked on the host: the filter may be built under torch.device("meta")
        values = [float(v) for v in taps]
    except (TypeError, ValueError):
        values = []
    if not values or sum(values) == 0:
        raise ValueError(f"resample_filter must be a non-empty list of taps with a non-zero sum, got {list(taps)}")
    f = torch.tensor(values, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum() ** 2)[None, None]


class Linear(nn.Module):
    """y = x Wᵀ + b, W of shape (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init: Init = Init()):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        init_(self.weight, init.mode, in_features, out_features, init.weight)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            init_(self.bias, init.mode, in_features, out_features, init.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """A k×k convolution with optional FIR resampling by 2.

    Resampling applies ``resample_filter`` per channel (Zhang 2019, "Making convolutional networks shift-invariant
    again"): ``down`` filters then keeps every other pixel, ``up`` inserts zeros and filters with 4·f. Either comes
    before the convolution; ``kernel=0`` gives a layer that only resamples. ``fused_resample`` (down only, NCSN++'s
    residual encoder) convolves first, on an input padded by the convolution's and the filter's padding, and then
    filters and strides with no padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init: Init = Init(),
    ):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d resamples up or down, not both")
        if fused_resample and not down:
            raise ValueError("fused_resample is supported for down=True only")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        self.weight = self.bias = None
        if kernel:
            fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
            self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel))
            init_(self.weight, init.mode, fan_in, fan_out, init.weight)
            if bias:
                self.bias = nn.Parameter(torch.empty(out_channels))
                init_(self.bias, init.mode, fan_in, fan_out, init.bias)
        if up or down:
            self.register_buffer("resample_filter", resample_filter_2d(resample_filter))
        else:
            self.resample_filter = None

    def _depthwise(self, x: torch.Tensor, transposed: bool, padding: int) -> torch.Tensor:
        f = self.resample_filter.to(x.dtype)
        if transposed:
            return F.conv_transpose2d(x, (4 * f).expand(x.shape[1], 1, -1, -1), groups=x.shape[1], stride=2,
                                      padding=padding)
        return F.conv2d(x, f.expand(x.shape[1], 1, -1, -1), groups=x.shape[1], stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_pad = self.weight.shape[-1] // 2 if self.weight is not None else 0
        f_pad = (self.resample_filter.shape[-1] - 1) // 2 if self.resample_filter is not None else 0
        if self.fused_resample:
            x = self._depthwise(F.conv2d(x, self.weight, padding=w_pad + f_pad), transposed=False, padding=0)
        else:
            if self.up or self.down:
                x = self._depthwise(x, transposed=self.up, padding=f_pad)
            if self.weight is not None:
                x = F.conv2d(x, self.weight, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.GroupNorm):
    """GroupNorm (Wu & He 2018) with min(``num_groups``, C / ``min_channels_per_group``) groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__(min(num_groups, num_channels // min_channels_per_group), num_channels, eps=eps)


class UNetBlock(nn.Module):
    """Residual block with optional resampling by 2 and multi-head self-attention.

    x' = s·(skip(x) + conv1(dropout(φ(conv0(φ(norm0(x))), e)))), with φ = SiLU and e the embedding, then, with
    attention, x'' = s·(x' + proj(attention(qkv(norm2(x'))))). The embedding enters as
    φ(norm1(h + affine(e))) (DDPM++/NCSN++) or, with ``adaptive_scale``, as φ(norm1(h)·(1 + a) + b) with
    (a, b) = affine(e) (ADM's scale-shift norm). ``skip`` is a 1×1 convolution when the width changes (or always with
    ``resample_proj``), a filter-only resampling when only the resolution changes, and the identity otherwise.

    Attention heads: ``num_heads`` if given, else out_channels // ``channels_per_head`` (none when 0 or when not
    ``attention``). The qkv convolution's channels are laid out as (head, channel, q/k/v).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: Optional[int] = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: Init = Init(),
        init_zero: Init = Init(weight=0.0),
        init_attn: Optional[Init] = None,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, init=init, **resample)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), init=init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, init=init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, init=init, **resample)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, init=init_attn or init)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, init=init_zero)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(qᵀk/√d) v per head (Vaswani et al. 2017) over the H·W positions, d = C / heads."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return a.transpose(1, 2).reshape(b, c, h, w)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None]
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale
        if self.num_heads:
            x = (self.proj(self.attention(self.norm2(x))) + x) * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar t (Vaswani et al. 2017; Ho et al. 2020): frequencies ω_j = M^(−j/D),
    j = 0, …, N/2 − 1, with D = N/2 − 1 when ``endpoint`` (Song et al.'s DDPM++, so that the lowest frequency is
    exactly 1/M) and D = N/2 otherwise (ADM); output [cos ωt, sin ωt], or [sin ωt, cos ωt] with ``sin_first``
    (Song et al.'s order)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False, sin_first: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint
        self.sin_first = sin_first

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        j = torch.arange(half, dtype=t.dtype, device=t.device)
        omega = (1 / self.max_positions) ** (j / (half - (1 if self.endpoint else 0)))
        return _sinusoids(torch.outer(t, omega), self.sin_first)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar t (Tancik et al. 2020; NCSN++ of Song et al. 2021):
    [cos 2πft, sin 2πft] with f ~ N(0, ``scale``²) fixed at initialisation (the buffer ``freqs``), or
    [sin, cos] with ``sin_first``."""

    def __init__(self, num_channels: int, scale: float = 16, sin_first: bool = False):
        super().__init__()
        self.sin_first = sin_first
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return _sinusoids(torch.outer(t, 2 * math.pi * self.freqs.to(t.dtype)), self.sin_first)


def _sinusoids(phase: torch.Tensor, sin_first: bool) -> torch.Tensor:
    pair = (phase.sin(), phase.cos()) if sin_first else (phase.cos(), phase.sin())
    return torch.cat(pair, dim=1)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs of the networks (shared by SongUNet and DhariwalUNet).

_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_sample(sample: torch.Tensor, in_channels: int, num_levels: int) -> None:
    """``sample`` is (B, in_channels, H, W) with H and W divisible by 2^(levels − 1)."""
    factor = 2 ** (num_levels - 1)
    if not torch.is_tensor(sample) or sample.ndim != 4 or sample.shape[1] != in_channels:
        shape = tuple(sample.shape) if torch.is_tensor(sample) else type(sample).__name__
        raise ValueError(f"sample must be a tensor of shape (batch, {in_channels}, H, W), got {shape}")
    if sample.shape[2] % factor or sample.shape[3] % factor:
        raise ValueError(f"sample's height and width must be divisible by {factor} (2^(levels - 1)), "
                         f"got {tuple(sample.shape[2:])}")


def noise_labels(timestep: Union[torch.Tensor, float], batch: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """The noise label c_noise per sample, shape (B,): a 0-d tensor or python number is broadcast to the batch."""
    if not torch.is_tensor(timestep):
        if isinstance(timestep, bool) or not isinstance(timestep, (int, float)):
            raise ValueError(f"timestep must be a number or a tensor of shape () or ({batch},), "
                             f"got {type(timestep).__name__}")
        return torch.full((batch,), float(timestep), dtype=dtype, device=device)
    if not (timestep.is_floating_point() or timestep.dtype in _INT_DTYPES):
        raise ValueError(f"timestep must be a real number tensor, got dtype {timestep.dtype}")
    if timestep.ndim == 0:
        return timestep.to(device=device, dtype=dtype).expand(batch)
    if timestep.shape != (batch,):
        raise ValueError(f"timestep must have shape () or ({batch},), got {tuple(timestep.shape)}")
    return timestep.to(device=device, dtype=dtype)


def class_label_rows(class_labels: Optional[torch.Tensor], label_dim: int, batch: int, dtype: torch.dtype,
                     device: torch.device) -> Optional[torch.Tensor]:
    """Class labels as rows of width ``label_dim`` (EDM's one-hot input): integer indices (B,) are one-hot encoded,
    float rows (B, label_dim) are used as given. Index values are checked for CPU tensors only (no device sync)."""
    if label_dim == 0:
        if class_labels is not None:
            raise ValueError("class_labels were given to an unconditional network (num_class_embeds=None)")
        return None
    if class_labels is None:
        raise ValueError(f"class_labels are required: the network is conditional on {label_dim} classes (pass "
                         f"indices of shape ({batch},) or rows of shape ({batch}, {label_dim}); zero rows drop them)")
    if not torch.is_tensor(class_labels):
        raise ValueError(f"class_labels must be a tensor, got {type(class_labels).__name__}")
    if class_labels.dtype in _INT_DTYPES:
        if class_labels.shape != (batch,):
            raise ValueError(f"integer class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
        if class_labels.device.type == "cpu" and batch and (class_labels.min() < 0 or class_labels.max() >= label_dim):
            raise ValueError(f"class_labels must be in [0, {label_dim - 1}], got values in "
                             f"[{int(class_labels.min())}, {int(class_labels.max())}]")
        classes = torch.arange(label_dim, device=device)
        return (class_labels.to(device)[:, None] == classes).to(dtype)
    if not class_labels.is_floating_point():
        raise ValueError(f"class_labels must be integer indices or float rows, got dtype {class_labels.dtype}")
    if class_labels.shape != (batch, label_dim):
        raise ValueError(f"float class_labels must have shape ({batch}, {label_dim}), got {tuple(class_labels.shape)}")
    return class_labels.to(device=device, dtype=dtype)


def augment_label_rows(augment_labels: Optional[torch.Tensor], augment_dim: int, batch: int, dtype: torch.dtype,
                       device: torch.device) -> Optional[torch.Tensor]:
    """Augmentation labels (B, augment_dim), or None for no augmentation embedding (as EDM at sampling time)."""
    if augment_labels is None:
        return None
    if augment_dim == 0:
        raise ValueError("augment_labels were given to a network without augmentation conditioning (augment_dim=0)")
    if not torch.is_tensor(augment_labels) or not augment_labels.is_floating_point():
        raise ValueError("augment_labels must be a float tensor")
    if augment_labels.shape != (batch, augment_dim):
        raise ValueError(f"augment_labels must have shape ({batch}, {augment_dim}), got {tuple(augment_labels.shape)}")
    return augment_labels.to(device=device, dtype=dtype)


def drop_labels(rows: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022): in training mode each sample's label row is zeroed
    with probability ``p``."""
    if not (training and p):
        return rows
    keep = torch.rand(rows.shape[0], 1, device=rows.device) >= p
    return rows * keep.to(rows.dtype)


def check_choice(name: str, value, allowed: Tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_levels(sample_size: int, channel_mult: Sequence[int]) -> None:
    if len(channel_mult) == 0:
        raise ValueError("channel_mult must have at least one entry")
    factor = 2 ** (len(channel_mult) - 1)
    if sample_size % factor:
        raise ValueError(f"sample_size must be divisible by {factor} (2^(len(channel_mult) - 1)), got {sample_size}")
