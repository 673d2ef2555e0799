"""DDPM++ and NCSN++ (Song et al., ICLR 2021, "Score-Based Generative Modeling through Stochastic Differential
Equations", Appendix H) as EDM re-implements them (Karras et al., NeurIPS 2022, Appendix F.2): one U-Net, ``SongUNet``.

The U-Net has BigGAN-style residual blocks (:class:`~diffusers_stf.models.edm_layers.UNetBlock`) with skip connections
rescaled by 1/√2. It has ``num_blocks`` blocks at each of ``len(channel_mult)`` resolutions and one-head self-attention
at ``attn_resolutions`` and at the lowest resolution. Resampling is by an FIR filter: [1, 1] for DDPM++, [1, 3, 3, 1]
for NCSN++. The noise label enters through a sinusoidal embedding (DDPM++) or random Fourier features (NCSN++) and a
two-layer MLP.

Song et al.'s progressive growing (Appendix H, "input skip", "input residual", "output skip") is selected by
``encoder_type`` ('skip': the downsampled image is projected and added at each resolution; 'residual': a strided
convolution carries it, averaged with the main path by 1/√2) and ``decoder_type`` ('skip': every resolution adds its
own 3×3 output head to the upsampled sum).

Parameter names, module tree and state-dict keys are those of EDM's ``SongUNet`` (``map_noise``, ``map_label``,
``map_augment``, ``map_layer0``, ``map_layer1``, ``enc``/``dec`` dictionaries keyed ``'32x32_conv'``,
``'16x16_down'``, ``'16x16_aux_residual'``, ``'32x32_block0'``, ``'32x32_aux_norm'``, …), so an EDM state dict loads
with ``load_state_dict``. Configuration names: ``sample_size`` is EDM's ``img_resolution`` and ``num_class_embeds``
its ``label_dim`` (None for 0).
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
    FourierEmbedding,
    GroupNorm,
    Init,
    Linear,
    PositionalEmbedding,
    UNetBlock,
    augment_label_rows,
    check_choice,
    check_levels,
    check_sample,
    class_label_rows,
    drop_labels,
    noise_labels,
)

EMBEDDING_TYPES = ("positional", "fourier")
ENCODER_TYPES = ("standard", "skip", "residual")
DECODER_TYPES = ("standard", "skip")


class SongUNet(ModelMixin, ConfigMixin):
    """The DDPM++/NCSN++ U-Net F(x, c_noise) (Song et al. 2021; EDM Appendix F.2).

    DDPM++ (EDM's ``--arch=ddpmpp``): ``embedding_type="positional"``, ``channel_mult_noise=1``,
    ``encoder_type="standard"``, ``decoder_type="standard"``, ``resample_filter=(1, 1)``. NCSN++ (``--arch=ncsnpp``):
    ``embedding_type="fourier"``, ``channel_mult_noise=2``, ``encoder_type="residual"``, ``decoder_type="standard"``,
    ``resample_filter=(1, 3, 3, 1)``. EDM trains both on CIFAR-10 with ``model_channels=128``,
    ``channel_mult=(2, 2, 2)``, ``num_blocks=4``, ``attn_resolutions=(16,)``, ``dropout=0.13`` and, with
    augmentation, ``augment_dim=9``.

    Args:
        sample_size: image side H = W (EDM's ``img_resolution``); names the resolutions of the blocks.
        in_channels: channels of ``sample``.
        out_channels: channels of the output.
        num_class_embeds: number of classes K (EDM's ``label_dim``), None for an unconditional network.
        augment_dim: width of the augmentation labels (9 for EDM's augmentation pipeline), 0 for none.
        model_channels: base width; the first convolution's width.
        channel_mult: width multipliers per resolution, from ``sample_size`` down by factors of 2.
        channel_mult_emb: embedding width = ``model_channels`` · this.
        num_blocks: residual blocks per resolution in the encoder (the decoder has one more).
        attn_resolutions: resolutions with self-attention.
        dropout: dropout probability inside the residual blocks.
        label_dropout: probability of zeroing a sample's class label in training (classifier-free guidance).
        embedding_type: ``"positional"`` (DDPM++) or ``"fourier"`` (NCSN++) noise embedding.
        channel_mult_noise: noise-embedding width = ``model_channels`` · this (1 for DDPM++, 2 for NCSN++).
        encoder_type: ``"standard"``, ``"skip"`` or ``"residual"`` (progressive input).
        decoder_type: ``"standard"`` or ``"skip"`` (progressive output).
        resample_filter: FIR taps of the up/down-sampling filter.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        num_class_embeds: Optional[int] = None,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ):
        super().__init__()
        check_choice("embedding_type", embedding_type, EMBEDDING_TYPES)
        check_choice("encoder_type", encoder_type, ENCODER_TYPES)
        check_choice("decoder_type", decoder_type, DECODER_TYPES)
        check_levels(sample_size, channel_mult)
        if num_class_embeds is not None and num_class_embeds < 0:
            raise ValueError(f"num_class_embeds must be None or >= 0, got {num_class_embeds}")
        if augment_dim < 0:
            raise ValueError(f"augment_dim must be >= 0, got {augment_dim}")
        self.label_dim = num_class_embeds or 0
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = Init("xavier_uniform")
        init_zero = Init("xavier_uniform", weight=1e-5)
        init_attn = Init("xavier_uniform", weight=math.sqrt(0.2))
        block = partial(
            UNetBlock, emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping network: noise (and class, augmentation) embedding → two-layer MLP.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True, sin_first=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels, sin_first=True)
        self.map_label = Linear(self.label_dim, noise_channels, init=init) if self.label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, init=init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, init=init)
        self.map_layer1 = Linear(emb_channels, emb_channels, init=init)

        # Encoder: a 3×3 convolution, then per resolution a downsampling block (below the top) and num_blocks blocks;
        # every entry that is not an 'aux' layer leaves a skip connection for the decoder.
        self.enc = nn.ModuleDict()
        skips = []
        cout, caux = model_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = sample_size >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels, cout, kernel=3, init=init)
            else:
                self.enc[f"{res}x{res}_down"] = block(cout, cout, down=True)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, init=init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True,
                        init=init)
                    caux = cout
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = block(cin, cout, attention=res in attn_resolutions)
                skips.append(cout)

        # Decoder: two blocks at the lowest resolution (the first with attention) or an upsampling block, then
        # num_blocks + 1 blocks that each take one skip connection; output heads ('aux') at the top, or at every
        # resolution for decoder_type='skip'.
        self.dec = nn.ModuleDict()
        last = len(channel_mult) - 1
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = sample_size >> level
            if level == last:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout)
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, up=True)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = block(cin, cout, attention=attention)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < last:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, init=init_zero)

    def embedding(self, t: torch.Tensor, labels: Optional[torch.Tensor],
                  augment: Optional[torch.Tensor]) -> torch.Tensor:
        """e = φ(W₁ φ(W₀ (γ(t) + W_y·√K·y + W_a·a))) with γ the noise embedding, y the one-hot label."""
        dtype = self.map_layer0.weight.dtype
        emb = self.map_noise(t).to(dtype)
        if labels is not None:
            labels = drop_labels(labels, self.config.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        if augment is not None:
            emb = emb + self.map_augment(augment)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

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
            timestep: the noise label c_noise (EDM: ln(σ)/4), a tensor of shape (B,) or (), or a number.
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

        # Encoder.
        x, aux, skips = sample, sample, []
        for level in range(len(cfg.channel_mult)):
            res = cfg.sample_size >> level
            if level == 0:
                x = self.enc[f"{res}x{res}_conv"](x)
            else:
                x = self.enc[f"{res}x{res}_down"](x, emb)
                if cfg.encoder_type == "skip":
                    aux = self.enc[f"{res}x{res}_aux_down"](aux)
                    x = x + self.enc[f"{res}x{res}_aux_skip"](aux)
                elif cfg.encoder_type == "residual":
                    x = aux = (x + self.enc[f"{res}x{res}_aux_residual"](aux)) / math.sqrt(2)
            skips.append(x)
            for idx in range(cfg.num_blocks):
                x = self.enc[f"{res}x{res}_block{idx}"](x, emb)
                skips.append(x)

        # Decoder.
        out = None
        last = len(cfg.channel_mult) - 1
        for level in reversed(range(len(cfg.channel_mult))):
            res = cfg.sample_size >> level
            if level == last:
                x = self.dec[f"{res}x{res}_in1"](self.dec[f"{res}x{res}_in0"](x, emb), emb)
            else:
                x = self.dec[f"{res}x{res}_up"](x, emb)
            for idx in range(cfg.num_blocks + 1):
                x = self.dec[f"{res}x{res}_block{idx}"](torch.cat([x, skips.pop()], dim=1), emb)
            if cfg.decoder_type == "skip" or level == 0:
                head = self.dec[f"{res}x{res}_aux_conv"](F.silu(self.dec[f"{res}x{res}_aux_norm"](x)))
                out = head if out is None else self.dec[f"{res}x{res}_aux_up"](out) + head

        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)
