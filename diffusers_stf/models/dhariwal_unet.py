"""ADM (Dhariwal & Nichol, NeurIPS 2021, "Diffusion Models Beat GANs on Image Synthesis", §3 and Appendix) as EDM
re-implements it (Karras et al., NeurIPS 2022, Appendix F.2): ``DhariwalUNet``.

The U-Net of Ho et al. (2020) with the improvements of ADM §3: BigGAN residual blocks for up- and downsampling,
adaptive group normalisation (the embedding gives a per-channel scale and shift after the block's second GroupNorm,
"AdaGN"), multi-head self-attention with 64 channels per head at ``attn_resolutions`` (32, 16 and 8 at 64×64), and a
class embedding added to the timestep embedding. EDM's ImageNet-64 network is ``model_channels=192``,
``channel_mult=(1, 2, 3, 4)``, ``num_blocks=3``, ``num_class_embeds=1000``.

Parameter names, module tree and state-dict keys are those of EDM's ``DhariwalUNet`` (``map_noise``, ``map_augment``,
``map_layer0``, ``map_layer1``, ``map_label``, ``enc``/``dec`` dictionaries keyed ``'64x64_conv'``,
``'32x32_down'``, ``'64x64_block0'``, ``'8x8_in0'``, …, ``out_norm``, ``out_conv``), so an EDM state dict loads with
``load_state_dict``. Configuration names: ``sample_size`` is EDM's ``img_resolution`` and ``num_class_embeds`` its
``label_dim`` (None for 0).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from .edm_layers import (
    Conv2d,
    GroupNorm,
    Init,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    augment_label_rows,
    check_levels,
    check_sample,
    class_label_rows,
    drop_labels,
    noise_labels,
)


class DhariwalUNet(ModelMixin, ConfigMixin):
    """The ADM U-Net F(x, c_noise) (Dhariwal & Nichol 2021; EDM Appendix F.2).

    Args:
        sample_size: image side H = W (EDM's ``img_resolution``); names the resolutions of the blocks.
        in_channels: channels of ``sample``.
        out_channels: channels of the output (twice ``in_channels`` for iDDPM's learned variance).
        num_class_embeds: number of classes K (EDM's ``label_dim``), None for an unconditional network.
        augment_dim: width of the augmentation labels, 0 for none.
        model_channels: base width.
        channel_mult: width multipliers per resolution, from ``sample_size`` down by factors of 2.
        channel_mult_emb: embedding width = ``model_channels`` · this.
        num_blocks: residual blocks per resolution in the encoder (the decoder has one more).
        attn_resolutions: resolutions with self-attention (64 channels per head).
        dropout: dropout probability inside the residual blocks.
        label_dropout: probability of zeroing a sample's class label in training (classifier-free guidance).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 64,
        in_channels: int = 3,
        out_channels: int = 3,
        num_class_embeds: Optional[int] = None,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
    ):
        super().__init__()
        check_levels(sample_size, channel_mult)
        if num_class_embeds is not None and num_class_embeds < 0:
            raise ValueError(f"num_class_embeds must be None or >= 0, got {num_class_embeds}")
        if augment_dim < 0:
            raise ValueError(f"augment_dim must be >= 0, got {augment_dim}")
        self.label_dim = num_class_embeds or 0
        emb_channels = model_channels * channel_mult_emb
        # Uniform on ±1/√fan_in for weights and biases (PyTorch's default for Linear and Conv2d); zero for the
        # layers that close a residual branch, so that each block starts as the identity.
        init = Init("kaiming_uniform", weight=math.sqrt(1 / 3), bias=math.sqrt(1 / 3))
        init_zero = Init("kaiming_uniform", weight=0.0, bias=0.0)
        block = partial(UNetBlock, emb_channels=emb_channels, channels_per_head=64, dropout=dropout,
                        init=init, init_zero=init_zero)

        # Mapping network: positional embedding (+ augmentation) → MLP, plus the class embedding (unit normal).
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, init=init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, init=init)
        self.map_layer1 = Linear(emb_channels, emb_channels, init=init)
        self.map_label = None
        if self.label_dim:
            self.map_label = Linear(self.label_dim, emb_channels, bias=False,
                                    init=Init("kaiming_normal", weight=math.sqrt(self.label_dim)))

        # Encoder: a 3×3 convolution, then per resolution a downsampling block (below the top) and num_blocks blocks;
        # every entry leaves a skip connection for the decoder.
        self.enc = nn.ModuleDict()
        skips = []
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = sample_size >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, init=init)
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, down=True)
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = block(cin, cout, attention=res in attn_resolutions)
                skips.append(cout)

        # Decoder: two blocks at the lowest resolution (the first with attention) or an upsampling block, then
        # num_blocks + 1 blocks that each take one skip connection.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = sample_size >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, up=True)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = block(cin, cout, attention=res in attn_resolutions)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, init=init_zero)

    def embedding(self, t: torch.Tensor, labels: Optional[torch.Tensor],
                  augment: Optional[torch.Tensor]) -> torch.Tensor:
        """e = φ(W₁ φ(W₀ (γ(t) + W_a·a)) + W_y·y) with γ the positional embedding, y the one-hot label."""
        dtype = self.map_layer0.weight.dtype
        emb = self.map_noise(t).to(dtype)
        if augment is not None:
            emb = emb + self.map_augment(augment)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if labels is not None:
            emb = emb + self.map_label(drop_labels(labels, self.config.label_dropout, self.training))
        return F.silu(emb)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float],
        class_labels: Optional[torch.Tensor] = None,
        augment_labels: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[UNet2DOutput, tuple]:
        """F(x, c_noise).

        Args:
            sample: x, shape (B, in_channels, H, W), H and W divisible by 2^(len(channel_mult) − 1).
            timestep: the noise label c_noise (EDM's iDDPM preconditioning: the DDPM step index M − 1 − j), a tensor
                of shape (B,) or (), or a number.
            class_labels: class indices (B,) or rows (B, num_class_embeds) (EDM's one-hot); required exactly when
                the network is conditional. Zero rows are the unconditional input of classifier-free guidance.
            augment_labels: augmentation labels (B, augment_dim), or None for no augmentation embedding.
            return_dict: return a ``UNet2DOutput`` rather than a tuple.
        """
        cfg = self.config
        check_sample(sample, cfg.in_channels, len(cfg.channel_mult))
        batch, device, dtype = sample.shape[0], sample.device, self.map_layer0.weight.dtype
        t = noise_labels(timestep, batch, torch.promote_types(dtype, torch.float32), device)
        labels = class_label_rows(class_labels, self.label_dim, batch, dtype, device)
        augment = augment_label_rows(augment_labels, cfg.augment_dim, batch, dtype, device)
        emb = self.embedding(t, labels, augment)

        x, skips = sample, []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith("_conv") else layer(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        out = self.out_conv(F.silu(self.out_norm(x)))

        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)
