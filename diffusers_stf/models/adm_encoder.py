"""The ADM noise-conditional classifier (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"):
guided-diffusion's ``EncoderUNetModel``, the encoder half of the ADM U-Net followed by a pooling head.

Written after openai/guided-diffusion ``guided_diffusion/unet.py`` and ``nn.py`` (MIT; the notice is above the first
definition, so that code generated from this module carries it), with its parameter names, so that its ``state_dict``
files load directly: the classifiers of Dhariwal & Nichol and the discriminator of Discriminator Guidance
(Kim et al. 2023), whose copy of the class (alsdudrla10/DG) adds a class embedding to the time embedding and
multiplies the time by 999 (``time_scale``).

The computation follows guided-diffusion; the precision follows the input: 32-group GroupNorm and the attention
softmax run in float32 for 16-bit inputs and in the model's dtype otherwise (guided-diffusion always uses float32),
so a float64 copy of the model is a float64 reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

# Parts of this module follow openai/guided-diffusion (guided_diffusion/unet.py, nn.py), under this licence:
#
# MIT License
#
# Copyright (c) 2021 OpenAI
#
# Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated
# documentation files (the "Software"), to deal in the Software without restriction, including without limitation the
# rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit
# persons to whom the Software is furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all copies or substantial portions of the
# Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE
# WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR
# COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
# OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class GroupNorm32(nn.GroupNorm):
    """guided-diffusion's ``normalization``: GroupNorm with 32 groups, in float32 for 16-bit inputs."""

    def forward(self, x):
        return super().forward(_at_least_float32(x)).type(x.dtype)


def timestep_embedding(timesteps: torch.Tensor, dim: int, dtype: torch.dtype, max_period: float = 10000.0):
    """[cos(t·ω_k), sin(t·ω_k)] with ω_k = max_period^(−k/(dim/2)), k < dim/2 (cosines first, as guided-diffusion),
    zero-padded to an odd ``dim``; computed in ``dtype`` (float32 unless the model is float64)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=timesteps.device) / half)
    args = timesteps[:, None].to(dtype) * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """guided-diffusion initialises the last layer of each residual and attention branch to zero."""
    for p in module.parameters():
        p.detach().zero_()
    return module


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose residual blocks also take the embedding."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding: GroupNorm–SiLU–conv, then the embedding as a bias or, with
    ``use_scale_shift_norm``, as norm(h)·(1 + scale) + shift, then GroupNorm–SiLU–dropout–conv; ``down`` average-pools
    both paths between the first norm and conv."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_scale_shift_norm=False, down=False):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.down = down
        if down:  # guided-diffusion's Downsample without a convolution: 2×2 average pooling, parameter-free
            self.h_upd = nn.AvgPool2d(kernel_size=2, stride=2)
            self.x_upd = nn.AvgPool2d(kernel_size=2, stride=2)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(32, self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        self.skip_connection = (
            nn.Identity() if self.out_channels == channels else nn.Conv2d(channels, self.out_channels, 1)
        )

    def forward(self, x, emb):
        if self.down:
            h = self.h_upd(self.in_layers[:-1](x))
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def qkv_attention(qkv: torch.Tensor, num_heads: int, heads_first: bool) -> torch.Tensor:
    """softmax(qᵀk/√c)·v per head of a [N, 3·H·C, T] tensor. ``heads_first`` (guided-diffusion's legacy order, which
    its ``AttentionBlock`` uses by default) splits the heads before q, k, v; otherwise (``QKVAttention``, used by the
    attention pooling) q, k, v first."""
    batch, width, length = qkv.shape
    ch = width // (3 * num_heads)
    if heads_first:
        q, k, v = qkv.reshape(batch * num_heads, ch * 3, length).split(ch, dim=1)
    else:
        q, k, v = (t.reshape(batch * num_heads, ch, length) for t in qkv.chunk(3, dim=1))
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
    weight = torch.softmax(_at_least_float32(weight), dim=-1).type(weight.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over the spatial positions, with a residual connection."""

    def __init__(self, channels: int, num_head_channels: int):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"{channels} channels do not split into heads of {num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.norm = GroupNorm32(32, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = qkv_attention(self.qkv(self.norm(x)), self.num_heads, heads_first=True)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling: the spatial mean attends to all positions (plus itself), with a learned positional
    embedding; the output is the mean's token."""

    def __init__(self, spatial_dim: int, embed_dim: int, num_head_channels: int, output_dim: Optional[int] = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_head_channels

    def forward(self, x):
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = qkv_attention(self.qkv_proj(x), self.num_heads, heads_first=False)
        return self.c_proj(x)[:, :, 0]


@dataclass
class EncoderUNetOutput(BaseOutput):
    """Output of :class:`EncoderUNetModel`.

    Args:
        logits: the pooled head's output, shape (batch, out_channels).
    """

    logits: torch.Tensor


class EncoderUNetModel(ModelMixin, ConfigMixin):
    """guided-diffusion's ``EncoderUNetModel`` as its classifiers use it: the ADM encoder with residual downsampling
    and a time embedding (optionally plus a class embedding), then GroupNorm–SiLU–attention pooling to
    ``out_channels`` logits.

    Args:
        sample_size: side of the input images.
        in_channels: input channels.
        model_channels: base width (DG's classifier: 128).
        out_channels: number of logits (1000 for the ADM classifier, 1 for DG's discriminator).
        num_res_blocks: residual blocks per resolution (the ``classifier_depth``).
        attention_resolutions: feature-map sides (in pixels) with self-attention after each residual block;
            guided-diffusion's script converts "32,16,8" to downsampling rates, here the sides are kept.
        dropout: dropout of the residual blocks.
        channel_mult: width multipliers per resolution, with a residual downsampling block between consecutive ones.
        num_head_channels: channels per attention head (guided-diffusion's classifiers: 64).
        use_scale_shift_norm: the embedding scales and shifts the normalised features (else it is added).
        num_class_embeds: rows of a class embedding added to the time embedding (DG's conditional head: 1000);
            None for none.
        time_scale: the timesteps are multiplied by this before the sinusoidal embedding (DG: 999, as its VP time
            τ ∈ (0, 1] is passed; guided-diffusion: 1, for integer timesteps).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        model_channels: int = 128,
        out_channels: int = 1000,
        num_res_blocks: int = 4,
        attention_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4),
        num_head_channels: int = 64,
        use_scale_shift_norm: bool = True,
        num_class_embeds: Optional[int] = None,
        time_scale: float = 1.0,
    ):
        super().__init__()
        if sample_size % 2 ** (len(channel_mult) - 1):
            raise ValueError(f"sample_size {sample_size} is not divisible by 2^{len(channel_mult) - 1} "
                             f"(channel_mult {tuple(channel_mult)})")
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_class_embeds is not None:
            self.label_emb = nn.Embedding(num_class_embeds, emb_dim)
        res = dict(emb_channels=emb_dim, dropout=dropout, use_scale_shift_norm=use_scale_shift_norm)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        side = sample_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, out_channels=int(mult * model_channels), **res)]
                ch = int(mult * model_channels)
                if side in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_head_channels))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(ResBlock(ch, out_channels=ch, down=True, **res)))
                side //= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, **res), AttentionBlock(ch, num_head_channels), ResBlock(ch, **res)
        )
        self.out = nn.Sequential(
            GroupNorm32(32, ch), nn.SiLU(), AttentionPool2d(side, ch, num_head_channels, out_channels)
        )
        self.feature_channels, self.feature_size = ch, side

    def embedding(self, timesteps: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The time embedding of ``timesteps·time_scale``, plus the class embedding (indices, or one-hot rows read
        with argmax as DG does) for a class-conditional model."""
        weight = self.time_embed[0].weight
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        t = timesteps * self.config.time_scale  # in the timesteps' own dtype, as DG
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels, dtype).to(weight.dtype))
        if self.config.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("this model is class-conditional (num_class_embeds is set): pass class_labels")
            labels = class_labels.argmax(dim=1) if class_labels.ndim == 2 else class_labels.long()
            emb = emb + self.label_emb(labels.to(emb.device))
        elif class_labels is not None:
            raise ValueError("class_labels were given but the model is not class-conditional "
                             "(num_class_embeds is None)")
        return emb

    def features(self, sample: torch.Tensor, timesteps: torch.Tensor, class_labels=None) -> torch.Tensor:
        """The feature map after the middle block, before the pooling head (DG's ``feature=True``), in the input's
        dtype: shape (batch, feature_channels, feature_size, feature_size)."""
        timesteps = torch.as_tensor(timesteps, device=sample.device)
        timesteps = timesteps if timesteps.is_floating_point() else timesteps.float()
        timesteps = timesteps.expand(sample.shape[0]) if timesteps.ndim == 0 else timesteps.reshape(sample.shape[0])
        emb = self.embedding(timesteps, class_labels)
        h = sample.to(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
        return self.middle_block(h, emb).to(sample.dtype)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                return_dict: bool = True):
        """Logits of ``sample`` at ``timesteps`` (a scalar or one per sample; multiplied by ``time_scale``).

        Args:
            sample: images (batch, in_channels, sample_size, sample_size).
            timesteps: the noise time.
            class_labels: class indices (batch,) or one-hot rows (batch, K), for a class-conditional model.
            return_dict: return an :class:`EncoderUNetOutput` rather than a tuple.
        """
        logits = self.out(self.features(sample, timesteps, class_labels).to(self.dtype)).to(sample.dtype)
        return EncoderUNetOutput(logits=logits) if return_dict else (logits,)
