"""The noise-conditional encoder shared by the Discriminator Guidance discriminator and the noise-conditional
classifier: a small U-Net encoder (diffusers down blocks and a time embedding of the noise label, GroupNorm–SiLU–mean
pool–linear head), optionally on top of a frozen feature extractor, whose inputs are the EDM/VE-scale sample x and its
σ mapped by a :class:`~diffusers_stf.preconditioning.Preconditioning` to (c_in(σ)·x, c_noise(σ)) (EDM eq. 7).

Feature extractors (``FEATURE_EXTRACTORS``): ``unet_encoder`` (the down and mid blocks of a pretrained score
``UNet2DModel``, :class:`UNetEncoderFeatures`), ``transformers`` (a vision backbone rebuilt from its config,
:class:`TransformersFeatures`) and ``custom`` (any module called as ``module(c_in·x, c_noise)``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import nn

from ..preconditioning import PRECONDITIONINGS, Preconditioning, make_preconditioning

FEATURE_EXTRACTORS = ("unet_encoder", "transformers", "custom")
_PRECONDITIONING_KEYS = ("sigma_data", "prediction_type", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule")


def _sigma_per_sample(sigma, batch: int, device) -> torch.Tensor:
    """σ as a float64 tensor of shape (batch,) (scalars and 0-d tensors are broadcast).

    σ given as a number (what the pipelines pass) or a CPU tensor is checked to be > 0 on the host; a number is
    filled on ``device`` without a copy, and σ already on an accelerator is not checked, so that a sampler step never
    waits for the device."""
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool):
        if not sigma > 0:
            raise ValueError("sigma must be > 0")
        return torch.full((batch,), float(sigma), dtype=torch.float64, device=device)
    if not torch.is_tensor(sigma) or sigma.device.type == "cpu":
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        if not bool((sigma > 0).all()):
            raise ValueError("sigma must be > 0")
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device)
    if sigma.ndim == 0:
        return sigma.expand(batch)
    if sigma.numel() != batch:
        raise ValueError(f"sigma must be a scalar or have one entry per sample ({batch}), got shape {tuple(sigma.shape)}")
    return sigma.reshape(batch)


def check_encoder_config(block_out_channels, down_block_types, norm_num_groups, mid_block_type, preconditioning):
    """ValueErrors for a :class:`NoiseConditionalEncoder` configuration that cannot be built."""
    if len(block_out_channels) != len(down_block_types) or not block_out_channels:
        raise ValueError(
            f"block_out_channels {tuple(block_out_channels)} and down_block_types {tuple(down_block_types)} "
            "must be non-empty and of equal length"
        )
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"norm_num_groups={norm_num_groups} must divide every block_out_channels entry")
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(f"preconditioning must be one of {PRECONDITIONINGS}, got {preconditioning!r}")
    if mid_block_type not in (None, "UNetMidBlock2D", "UNetMidBlock2DNoAttention"):
        raise ValueError(f"mid_block_type must be None, 'UNetMidBlock2D' or 'UNetMidBlock2DNoAttention', got {mid_block_type!r}")


def check_sample_shape(sample: torch.Tensor, in_channels: int, sample_size: int):
    expected = (in_channels, sample_size, sample_size)
    if sample.ndim != 4 or tuple(sample.shape[1:]) != expected:
        raise ValueError(f"sample must have shape (batch, {', '.join(map(str, expected))}), got {tuple(sample.shape)}")


def _network_inputs(preconditioning: Preconditioning, sample: torch.Tensor, sigma: torch.Tensor, dtype):
    """(c_in(σ)·x, c_noise(σ)) in the network's dtype, with the scalings computed in float64 (EDM eq. 7)."""
    c_in = preconditioning.c_in(sigma).reshape(-1, *([1] * (sample.ndim - 1)))
    return sample.to(dtype) * c_in.to(dtype), preconditioning.c_noise(sigma).to(torch.float32)


def _labels_as_indices(class_labels: torch.Tensor) -> torch.Tensor:
    """Class indices from indices (batch,) or one-hot rows (batch, K), as DG's argmax of one-hot labels."""
    return class_labels.argmax(dim=1) if class_labels.ndim == 2 else class_labels.long()


class NoiseConditionalEncoder(nn.Module):
    """The classifier network: conv_in, diffusers down blocks and an optional mid block conditioned on a sinusoidal
    embedding of the noise label (plus a class embedding, as DG's conditional head adds ``nn.Embedding`` of the label
    to the time embedding), then GroupNorm–SiLU–spatial mean–linear to one logit. It plays the role of guided_diffusion's
    ``EncoderUNetModel`` in DG (with mean pooling instead of attention pooling)."""

    def __init__(
        self,
        in_channels: int,
        block_out_channels: Sequence[int],
        down_block_types: Sequence[str],
        layers_per_block: int,
        norm_num_groups: int,
        attention_head_dim: int,
        mid_block_type: Optional[str],
        num_class_embeds: Optional[int],
        num_outputs: int = 1,
    ):
        super().__init__()
        self.num_outputs = num_outputs
        ch = list(block_out_channels)
        temb = 4 * ch[0]
        self.time_proj = Timesteps(ch[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.class_embedding = nn.Embedding(num_class_embeds, temb) if num_class_embeds else None
        self.conv_in = nn.Conv2d(in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(down_block_types):
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=ch[max(i - 1, 0)],
                    out_channels=ch[i],
                    temb_channels=temb,
                    add_downsample=i < len(ch) - 1,
                    resnet_eps=1e-5,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim,
                    downsample_padding=1,
                )
            )
        self.mid_block = None
        if mid_block_type is not None:
            self.mid_block = UNetMidBlock2D(
                in_channels=ch[-1],
                temb_channels=temb,
                resnet_eps=1e-5,
                resnet_act_fn="silu",
                resnet_groups=norm_num_groups,
                attention_head_dim=attention_head_dim,
                add_attention=mid_block_type == "UNetMidBlock2D",
            )
        self.norm_out = nn.GroupNorm(norm_num_groups, ch[-1], eps=1e-5)
        self.linear_out = nn.Linear(ch[-1], num_outputs)


    @classmethod
    def from_model_config(cls, config, in_channels: int, num_class_embeds: Optional[int] = None, num_outputs: int = 1):
        """The encoder a model's config describes (its block widths and types, layers, norms, attention and mid block),
        as the discriminator's head and the classifier's network both build it.

        Args:
            config: the model's ``config`` (``block_out_channels``, ``down_block_types``, ``layers_per_block``,
                ``norm_num_groups``, ``attention_head_dim``, ``mid_block_type``).
            in_channels: channels of its input (the images, or a feature extractor's map).
            num_class_embeds: number of classes of a class embedding added to the noise embedding (None: none).
            num_outputs: width of the final linear layer (1 logit, or one per class).
        """
        keys = ("block_out_channels", "down_block_types", "layers_per_block", "norm_num_groups", "attention_head_dim")
        return cls(
            in_channels, *(config[key] for key in keys), config["mid_block_type"], num_class_embeds, num_outputs
        )
    def forward(self, h: torch.Tensor, noise_label: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        """Logits of the (already preconditioned) input ``h`` at noise label ``noise_label`` (batch,): shape (batch,)
        with one output (the discriminator), (batch, num_outputs) otherwise (the classifier)."""
        emb = self.time_embedding(self.time_proj(noise_label).to(h.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this discriminator is class-conditional: pass class_labels")
            emb = emb + self.class_embedding(_labels_as_indices(class_labels).to(h.device)).to(h.dtype)
        h = self.conv_in(h)
        for block in self.down_blocks:
            h, _ = block(hidden_states=h, temb=emb)
        if self.mid_block is not None:
            h = self.mid_block(h, emb)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        logits = self.linear_out(h)
        return logits.squeeze(1) if self.num_outputs == 1 else logits


class UNetEncoderFeatures(nn.Module):
    """Feature extractor: the encoder half (conv_in, down blocks, mid block) of a score ``UNet2DModel``, run in the
    score model's own preconditioning, returning the feature map after the mid block (DG takes the ADM classifier's
    features after its middle block). The up blocks and output layers are dropped."""

    def __init__(self, unet_config: dict, preconditioning: dict):
        super().__init__()
        self.unet = UNet2DModel.from_config(unet_config)
        for name in ("up_blocks", "conv_norm_out", "conv_act", "conv_out"):
            delattr(self.unet, name)
        self.preconditioning = make_preconditioning(**preconditioning)

    @property
    def out_channels(self) -> int:
        return self.unet.config.block_out_channels[-1]

    def forward(self, sample: torch.Tensor, sigma: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        unet = self.unet
        x, noise_label = _network_inputs(self.preconditioning, sample, sigma, unet.dtype)
        if unet.config.center_input_sample:
            x = 2 * x - 1.0
        emb = unet.time_embedding(unet.time_proj(noise_label).to(unet.dtype))
        if unet.class_embedding is not None:
            if class_labels is None:
                raise ValueError("the feature extractor's UNet is class-conditional: pass class_labels")
            emb = emb + unet.class_embedding(_labels_as_indices(class_labels)).to(unet.dtype)
        skip = x
        h = unet.conv_in(x)
        for block in unet.down_blocks:
            if hasattr(block, "skip_conv"):
                h, _, skip = block(hidden_states=h, temb=emb, skip_sample=skip)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if unet.mid_block is not None:
            h = unet.mid_block(h, emb)
        return h


class TransformersFeatures(nn.Module):
    """Feature extractor: a ``transformers`` vision model (rebuilt from its config; weights travel with the
    discriminator). It sees c_in(σ)·x of the discriminator's preconditioning, grey images repeated to the model's
    channel count and resized to ``input_resolution``; its last feature map (or its patch tokens laid out on their
    square grid) goes to the head. It is not noise-conditional; the head is."""

    def __init__(self, model_config: dict, preconditioning: Preconditioning, input_resolution: Optional[int] = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        model_config = dict(model_config)
        config = AutoConfig.for_model(model_config.pop("model_type"), **model_config)
        self.model = AutoModel.from_config(config)
        self.input_resolution = input_resolution
        self.preconditioning = preconditioning
        self.num_channels = getattr(config, "num_channels", 3)

    def forward(self, sample: torch.Tensor, sigma: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        x, _ = _network_inputs(self.preconditioning, sample, sigma, self.model.dtype)
        if x.shape[1] != self.num_channels:
            if x.shape[1] != 1:
                raise ValueError(f"the backbone takes {self.num_channels} channels, the images have {x.shape[1]}")
            x = x.expand(-1, self.num_channels, -1, -1)
        if self.input_resolution is not None and x.shape[-1] != self.input_resolution:
            x = F.interpolate(x, size=(self.input_resolution,) * 2, mode="bilinear", align_corners=False)
        out = self.model(pixel_values=x)
        h = out.feature_maps[-1] if getattr(out, "feature_maps", None) is not None else out.last_hidden_state
        if h.ndim == 3:  # (batch, tokens, dim): keep the last side² tokens (the patches), drop CLS/register tokens
            side = math.isqrt(h.shape[1])
            h = h[:, h.shape[1] - side * side :].transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)
        return h


class _CustomFeatures(nn.Module):
    """A user module called as ``module(c_in·x, c_noise)`` (for ``vp``: x_vp and 999·τ, as DG calls its classifier)."""

    def __init__(self, module: nn.Module, preconditioning: Preconditioning):
        super().__init__()
        self.module = module
        self.preconditioning = preconditioning

    def forward(self, sample, sigma, class_labels=None):
        dtype = next(self.module.parameters(), torch.empty(0)).dtype
        x, noise_label = _network_inputs(self.preconditioning, sample, sigma, dtype)
        out = self.module(x, noise_label)
        return out.sample if hasattr(out, "sample") else out
