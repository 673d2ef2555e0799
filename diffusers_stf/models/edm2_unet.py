"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", config G: Section 3, Appendix B, Figure 21) as a diffusers ``ModelMixin``.

The network is the raw F of EDM's preconditioning, D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise) with σ_data = 0.5 and
c_noise = ln(σ)/4: EDM2's ``Precond`` is exactly :class:`~diffusers_stf.preconditioning.EDMPreconditioning` (its
learned uncertainty u(σ) belongs to the loss, :class:`~diffusers_stf.losses.edm2.EDM2Loss`).

Structure (every layer from :mod:`~diffusers_stf.mp_layers`; no biases, no learned normalisation):

* embedding: emb = mp_silu(mp_sum(MPLinear(MPFourier(c_noise)), MPLinear(√L·onehot(label)); t = label_balance));
* encoder: a 3×3 conv of [x, 1] (a constant channel), then per level (resolution halved by the ``down`` block of
  each level after the first) ``num_blocks`` encoder blocks; every output is kept as a skip;
* decoder: two blocks at the lowest resolution (``in0`` with attention, ``in1``), then per level an ``up`` block (but
  the lowest) and ``num_blocks + 1`` decoder blocks, each fed mp_cat(x, skip; t = concat_balance);
* output: an MP 3×3 conv scaled by the learned ``out_gain`` (initialised to 0, so F = 0 at initialisation).

A block (Figure 21): resample; encoder blocks project with a 1×1 conv when the width changes and pixel-normalise;
residual branch conv3×3(mp_silu(x)) · (1 + MPLinear(emb)·emb_gain), mp_silu, dropout, conv3×3; mp_sum with the main
branch (t = res_balance); optional cosine attention (pixel-normalised q, k, v; mp_sum with t = attn_balance); the
activations are clipped to ±clip_act.

Parameter and buffer names equal the ``state_dict`` keys of NVlabs/edm2's ``UNet``
(``enc.64x64_block0.conv_res0.weight``, ``emb_fourier.freqs``, ``out_gain`` …), so an EDM2 snapshot's ``ema.unet``
weights load directly.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from ..mp_layers import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample


class Block(nn.Module):
    """One EDM2 encoder (``flavor='enc'``) or decoder (``flavor='dec'``) block with optional self-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: Optional[float] = 256):
        super().__init__()
        self.out_channels, self.flavor = out_channels, flavor
        self.resample_mode, self.resample_filter = resample_mode, tuple(resample_filter)
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, 3 * out_channels, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Cosine self-attention: the 3C channels of the qkv projection are (head, channel, q/k/v), innermost last;
        q, k and v are normalised over the channels of their head."""
        n, c, h, w = x.shape
        qkv = self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = normalize(qkv, dim=2).unbind(3)
        weights = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
        out = torch.einsum("nhqk,nhck->nhcq", weights, v).reshape(n, c, h, w)
        return self.attn_proj(out)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self.attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x


def _check_unit(name: str, value: float, closed_top: bool = True):
    if not (0 <= value <= 1 if closed_top else 0 <= value < 1):
        raise ValueError(f"{name} must lie in [0, 1{']' if closed_top else ')'}, got {value}")


def _check_positive_int(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class EDM2UNet(ModelMixin, ConfigMixin):
    """EDM2's magnitude-preserving U-Net (see the module docstring); NVlabs' ``UNet`` keyword names except where
    diffusers has its own.

    Args:
        sample_size: image (or latent) resolution, square (NVlabs ``img_resolution``); divisible by 2^(levels − 1).
        in_channels, out_channels: image channels (NVlabs ``img_channels``, the same for both in EDM2).
        num_class_embeds: number of classes for class conditioning (NVlabs ``label_dim``), None for an
            unconditional model.
        model_channels: base width (EDM2: XS 128, S 192, M 256, L 320, XL 384, XXL 448).
        channel_mult: width multiplier per level; level i has resolution sample_size / 2^i.
        channel_mult_noise: width of the Fourier noise features (× model_channels); None: channel_mult[0].
        channel_mult_emb: width of the embedding (× model_channels); None: max(channel_mult).
        num_blocks: blocks per level in the encoder (the decoder has one more).
        attn_resolutions: resolutions with self-attention (the lowest level's ``in0`` block always has it).
        label_balance: weight of the class embedding against the noise embedding in mp_sum.
        concat_balance: weight of the skip connection against the main path in mp_cat.
        dropout: dropout probability in the residual branch (EDM2: 0 for XS/S, 0.1 for M and larger).
        res_balance, attn_balance: weights of the residual and attention branches in mp_sum (EDM2: 0.3).
        clip_act: activations are clipped to ±clip_act after each block (EDM2: 256); None: no clipping.
        channels_per_head: attention heads per block = width // channels_per_head (EDM2: 64).
        resample_filter: the separable down/up-sampling filter (EDM2: (1, 1), box / nearest).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 3,
        out_channels: int = 3,
        num_class_embeds: Optional[int] = None,
        model_channels: int = 192,
        channel_mult: Tuple[int, ...] = (1, 2, 3, 4),
        channel_mult_noise: Optional[int] = None,
        channel_mult_emb: Optional[int] = None,
        num_blocks: int = 3,
        attn_resolutions: Tuple[int, ...] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: Optional[float] = 256,
        channels_per_head: int = 64,
        resample_filter: Tuple[float, ...] = (1, 1),
    ):
        super().__init__()
        cblock = self._check_config(sample_size, in_channels, out_channels, num_class_embeds, model_channels,
                                    channel_mult, channel_mult_noise, channel_mult_emb, num_blocks, attn_resolutions,
                                    label_balance, concat_balance, dropout, res_balance, attn_balance, clip_act,
                                    channels_per_head, resample_filter)
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        block_kwargs = dict(resample_filter=resample_filter, channels_per_head=channels_per_head, dropout=dropout,
                            res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)
        self.out_gain = nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb)
        self.emb_label = MPConv(num_class_embeds, cemb) if num_class_embeds else None

        self.enc = nn.ModuleDict()
        width = in_channels + 1  # the image and a constant channel
        for level, channels in enumerate(cblock):
            res = sample_size >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(width, channels, (3, 3))
                width = channels
            else:
                self.enc[f"{res}x{res}_down"] = Block(width, width, cemb, "enc", "down", **block_kwargs)
            for idx in range(num_blocks):
                self.enc[f"{res}x{res}_block{idx}"] = Block(width, channels, cemb, "enc",
                                                            attention=res in attn_resolutions, **block_kwargs)
                width = channels

        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = sample_size >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(width, width, cemb, "dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(width, width, cemb, "dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(width, width, cemb, "dec", "up", **block_kwargs)
            for idx in range(num_blocks + 1):
                self.dec[f"{res}x{res}_block{idx}"] = Block(width + skips.pop(), channels, cemb, "dec",
                                                            attention=res in attn_resolutions, **block_kwargs)
                width = channels
        self.out_conv = MPConv(width, out_channels, (3, 3))

    @staticmethod
    def _check_config(sample_size, in_channels, out_channels, num_class_embeds, model_channels, channel_mult,
                      channel_mult_noise, channel_mult_emb, num_blocks, attn_resolutions, label_balance,
                      concat_balance, dropout, res_balance, attn_balance, clip_act, channels_per_head,
                      resample_filter):
        for name, value in (("sample_size", sample_size), ("in_channels", in_channels),
                            ("out_channels", out_channels), ("model_channels", model_channels),
                            ("num_blocks", num_blocks), ("channels_per_head", channels_per_head)):
            _check_positive_int(name, value)
        if num_class_embeds is not None:
            _check_positive_int("num_class_embeds (None for an unconditional model)", num_class_embeds)
        if len(channel_mult) == 0:
            raise ValueError("channel_mult needs at least one level")
        for name, value in [("channel_mult", m) for m in channel_mult] + [
                ("channel_mult_noise", channel_mult_noise), ("channel_mult_emb", channel_mult_emb)]:
            if value is not None:
                _check_positive_int(name, value)
        if sample_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"sample_size {sample_size} must be divisible by 2^(levels - 1) = "
                             f"{2 ** (len(channel_mult) - 1)} for channel_mult {tuple(channel_mult)}")
        cblock = [model_channels * m for m in channel_mult]
        levels = [sample_size >> level for level in range(len(cblock))]
        bad = [r for r in attn_resolutions if r not in levels]
        if bad:
            raise ValueError(f"attn_resolutions {tuple(attn_resolutions)}: {bad} are not resolutions of this network "
                             f"({levels})")
        for res, channels in zip(levels, cblock):
            if res in attn_resolutions or res == levels[-1]:
                heads = channels // channels_per_head
                if heads == 0 or channels % heads:
                    raise ValueError(f"channels_per_head {channels_per_head} does not fit the attention width "
                                     f"{channels} at {res}x{res} (need width // channels_per_head >= 1 heads that "
                                     f"divide the width)")
        for name, value in (("label_balance", label_balance), ("concat_balance", concat_balance),
                            ("res_balance", res_balance), ("attn_balance", attn_balance)):
            _check_unit(name, value)
        _check_unit("dropout", dropout, closed_top=False)
        if clip_act is not None and not clip_act > 0:
            raise ValueError(f"clip_act must be > 0 or None, got {clip_act}")
        if len(resample_filter) % 2 or not all(f > 0 for f in resample_filter):
            raise ValueError(f"resample_filter must have an even number of positive taps, got {resample_filter}")
        return cblock

    def _class_embedding_input(self, class_labels: Optional[torch.Tensor], batch: int, device,
                               dtype) -> Optional[torch.Tensor]:
        """One-hot rows (B, L) from integer indices (B,) or float rows (B, L); None for an unconditional model."""
        num_classes = self.config.num_class_embeds
        if self.emb_label is None:
            if class_labels is not None:
                raise ValueError("class_labels were given but the model is unconditional (num_class_embeds=None)")
            return None
        if class_labels is None:
            raise ValueError("class_labels should be provided when doing class conditioning")
        class_labels = torch.as_tensor(class_labels, device=device)
        if not class_labels.is_floating_point():
            if class_labels.shape != (batch,):
                raise ValueError(f"integer class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
            in_range = (class_labels >= 0) & (class_labels < num_classes)
            if class_labels.device.type == "cpu" and not bool(in_range.all()):  # no host-device sync on accelerators
                raise ValueError(f"class_labels must lie in 0..{num_classes - 1}")
            return F.one_hot(class_labels.long(), num_classes).to(dtype)
        if class_labels.shape not in ((batch, num_classes), (1, num_classes)):
            raise ValueError(f"float class_labels must be rows of shape ({batch}, {num_classes}), got "
                             f"{tuple(class_labels.shape)}")
        return class_labels.to(dtype).expand(batch, num_classes)

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float],
                class_labels: Optional[torch.Tensor] = None,
                return_dict: bool = True) -> Union[UNet2DOutput, Tuple[torch.Tensor]]:
        """F(x, c_noise).

        Args:
            sample: the preconditioned input c_in·x, (B, in_channels, sample_size, sample_size).
            timestep: c_noise = ln(σ)/4 (EDM2's Precond), a number or a tensor of shape () or (B,).
            class_labels: class indices (B,) (integers) or one-hot/soft rows (B, num_class_embeds) (floats; EDM2's
                convention); required when the model is class-conditional, refused otherwise.
            return_dict: return a ``UNet2DOutput`` (else a tuple).
        """
        batch, factor = sample.shape[0], 2 ** (len(self.config.channel_mult) - 1)
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels or sample.shape[2] % factor or \
                sample.shape[3] % factor:
            raise ValueError(f"sample must have shape (B, {self.config.in_channels}, H, W) with H and W divisible by "
                             f"{factor}, got {tuple(sample.shape)}")
        if torch.is_tensor(timestep):
            floating = timestep.is_floating_point()
            c_noise = timestep.to(sample.device, torch.promote_types(timestep.dtype, torch.float32) if floating
                                  else torch.float32).reshape(-1)
        else:  # a number: in the precision of the sample (at least float32)
            c_noise = torch.tensor([timestep], device=sample.device,
                                   dtype=torch.promote_types(sample.dtype, torch.float32))
        if c_noise.numel() not in (1, batch):
            raise ValueError(f"timestep must be a number or hold one value per sample ({batch}), got "
                             f"{c_noise.numel()} values")
        c_noise = c_noise.expand(batch)

        emb = self.emb_noise(self.emb_fourier(c_noise))
        onehot = self._class_embedding_input(class_labels, batch, sample.device, emb.dtype)
        if onehot is not None:
            emb = mp_sum(emb, self.emb_label(onehot * math.sqrt(onehot.shape[1])), t=self.config.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([sample, torch.ones_like(sample[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.config.concat_balance)
            x = block(x, emb)
        x = self.out_conv(x, gain=self.out_gain)
        return UNet2DOutput(sample=x) if return_dict else (x,)
