"""The score network of a training script, ``--architecture unet2d|ddpmpp|ncsnpp|adm|edm2``, from the shared model
flags (:func:`~diffusers_stf.training.args.add_unet_args`).

=============  ================================================  ==================================================
architecture   class                                             its own flags
=============  ================================================  ==================================================
``unet2d``     diffusers' ``UNet2DModel`` (with ``--augment_p``:  ``--block_out_channels``, ``--attention_levels``,
               :class:`~diffusers_stf.models.                    ``--mid_block_attention``, ``--attention_head_dim``,
               AugmentConditionedUNet2DModel`)                   ``--norm_num_groups``
``ddpmpp``     :class:`~diffusers_stf.models.SongUNet`, DDPM++   ``--model_channels``, ``--channel_mult``,
               (positional noise embedding, [1, 1] resampling)   ``--attn_resolutions``
``ncsnpp``     :class:`~diffusers_stf.models.SongUNet`, NCSN++   the same
               (Fourier embedding, residual input path,
               [1, 3, 3, 1] resampling)
``adm``        :class:`~diffusers_stf.models.DhariwalUNet`       the same
``edm2``       :class:`~diffusers_stf.models.EDM2UNet`           the same and ``--channels_per_head``
=============  ================================================  ==================================================

Every architecture takes ``--layers_per_block`` (= ``--num_blocks``: residual blocks per resolution in the encoder,
one more in the decoder), ``--dropout`` and ``--model_config_name_or_path`` (a ``config.json`` of its class, which
replaces the size flags). A size flag of another architecture is refused, naming it. Without size flags each
architecture has a digits-size default (8×8: two levels of 32 and 64 channels, one block per level, about 0.6–0.8 M
parameters); ``docs/training.md`` has the papers' presets. The script's class conditioning sets
``num_class_embeds`` and its augmentation ``augment_dim`` (EDM2's network has no augmentation input: refused).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .config import UNetConfig, check_count
from .unet import config_file_kwargs, make_unet

ARCHITECTURES = ("unet2d", "ddpmpp", "ncsnpp", "adm", "edm2")
EDM_NETWORKS = ("ddpmpp", "ncsnpp", "adm", "edm2")
# the flags (argparse destinations) of one architecture only
UNET2D_FLAGS = ("block_out_channels", "attention_levels", "mid_block_attention", "attention_head_dim",
                "norm_num_groups")
EDM_FLAGS = ("model_channels", "channel_mult", "attn_resolutions")
EDM2_FLAGS = ("channels_per_head",)
# the SongUNet settings that make DDPM++ and NCSN++ (Song et al. 2021, Appendix H; EDM Appendix F.2)
SONG_VARIANTS = {
    "ddpmpp": dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                   decoder_type="standard", resample_filter=(1, 1)),
    "ncsnpp": dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", decoder_type="standard",
                   resample_filter=(1, 3, 3, 1)),
}
DIGITS_MODEL_CHANNELS, DIGITS_CHANNEL_MULT = 32, (1, 2)
TITLES = {"unet2d": "UNet2DModel", "ddpmpp": "DDPM++ (SongUNet)", "ncsnpp": "NCSN++ (SongUNet)",
          "adm": "ADM (DhariwalUNet)", "edm2": "EDM2 (EDM2UNet)"}


@dataclass
class NetworkConfig:
    """Which network a script trains (``--architecture``) and the size flags of EDM's and EDM2's networks; the
    ``UNet2DModel`` flags and the shared ones (blocks per level, dropout, a config file) are in
    :class:`~diffusers_stf.training.config.UNetConfig`.

    Args:
        architecture: one of :data:`ARCHITECTURES`.
        model_channels: base width (None: 32).
        channel_mult: width multipliers per resolution (None: (1, 2)).
        attn_resolutions: resolutions with self-attention (the lowest resolution always has it).
        channels_per_head: EDM2's attention width per head (64).
        explicit: the flags given on the command line (for the refusals).
    """

    architecture: str = "unet2d"
    model_channels: Optional[int] = None
    channel_mult: Optional[Tuple[int, ...]] = None
    attn_resolutions: Tuple[int, ...] = ()
    channels_per_head: int = 64
    explicit: frozenset = frozenset()

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"--architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        others = {"unet2d": EDM_FLAGS + EDM2_FLAGS, "edm2": UNET2D_FLAGS}.get(self.architecture,
                                                                             UNET2D_FLAGS + EDM2_FLAGS)
        given = [f"--{name}" for name in others if name in self.explicit]
        if given:
            raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --architecture "
                             f"{self.architecture}; {self.flags_note()}")
        check_count("model_channels", self.model_channels)
        check_count("channels_per_head", self.channels_per_head)
        for value in self.channel_mult or ():
            check_count("channel_mult", value)
        if self.channel_mult is not None and not self.channel_mult:
            raise ValueError("--channel_mult needs at least one level")
        for value in self.attn_resolutions:
            check_count("attn_resolutions", value)

    def flags_note(self) -> str:
        """Which size flags the architecture takes."""
        if self.architecture == "unet2d":
            return ("UNet2DModel takes --block_out_channels, --attention_levels, --mid_block_attention, "
                    "--attention_head_dim and --norm_num_groups")
        extra = " and --channels_per_head" if self.architecture == "edm2" else ""
        return f"{TITLES[self.architecture]} takes --model_channels, --channel_mult, --attn_resolutions{extra}"

    @property
    def title(self) -> str:
        """The network's name in the model card, e.g. ``DDPM++ (SongUNet)``."""
        return TITLES[self.architecture]

    def fingerprint(self) -> Dict:
        """The script fingerprint's entry (the model card's table shows it): empty for the default ``unet2d``, so
        runs from before the flag existed still resume."""
        return {} if self.architecture == "unet2d" else {"architecture": self.architecture}


def network_class(architecture: str, augment_dim: int = 0):
    """The model class of ``architecture`` (``unet2d`` with augmentation labels: AugmentConditionedUNet2DModel)."""
    from diffusers import UNet2DModel

    from ..models import AugmentConditionedUNet2DModel, DhariwalUNet, EDM2UNet, SongUNet

    if architecture == "unet2d":
        return AugmentConditionedUNet2DModel if augment_dim else UNet2DModel
    return {"ddpmpp": SongUNet, "ncsnpp": SongUNet, "adm": DhariwalUNet, "edm2": EDM2UNet}[architecture]


def edm_network_kwargs(network: NetworkConfig, unet: UNetConfig) -> Dict:
    """The size arguments of an EDM/EDM2 network from the flags (digits-size defaults)."""
    kwargs = dict(model_channels=network.model_channels or DIGITS_MODEL_CHANNELS,
                  channel_mult=tuple(network.channel_mult or DIGITS_CHANNEL_MULT), num_blocks=unet.layers_per_block,
                  attn_resolutions=tuple(network.attn_resolutions), dropout=unet.dropout)
    if network.architecture == "edm2":
        kwargs["channels_per_head"] = network.channels_per_head
    return {**kwargs, **SONG_VARIANTS.get(network.architecture, {})}


def make_network(network: NetworkConfig, unet: UNetConfig, sample_size: int, channels: int,
                 num_class_embeds: Optional[int] = None, augment_dim: int = 0):
    """The ``--architecture`` network for ``channels``×``sample_size``² images, with ``num_class_embeds`` class
    embeddings (None: unconditional) and ``augment_dim`` augmentation labels (0: none)."""
    cls = network_class(network.architecture, augment_dim)
    inputs = {} if num_class_embeds is None else {"num_class_embeds": num_class_embeds}
    if augment_dim:
        if network.architecture == "edm2":
            raise ValueError("--augment_p conditions the network on EDM's augmentation labels, and EDM2's network has "
                             "no such input (EDM2 trains without augmentation); drop --augment_p or choose another "
                             "--architecture")
        inputs["augment_dim"] = augment_dim
    if network.architecture == "unet2d":
        return make_unet(unet, sample_size, channels, cls=cls, **inputs)
    path = unet.model_config_name_or_path
    if path:
        return cls(**{**config_file_kwargs(cls, path, sample_size, channels), **inputs})
    kwargs = edm_network_kwargs(network, unet)
    if sample_size % 2 ** (len(kwargs["channel_mult"]) - 1):
        raise ValueError(f"resolution {sample_size} must be divisible by 2^(levels-1) = "
                         f"{2 ** (len(kwargs['channel_mult']) - 1)} (--channel_mult {kwargs['channel_mult']})")
    levels = [sample_size >> level for level in range(len(kwargs["channel_mult"]))]
    bad = [r for r in kwargs["attn_resolutions"] if r not in levels]
    if bad:
        raise ValueError(f"--attn_resolutions {kwargs['attn_resolutions']}: {bad} are not resolutions of this network "
                         f"({levels})")
    try:
        return cls(sample_size=sample_size, in_channels=channels, out_channels=channels, **kwargs, **inputs)
    except ValueError as err:  # the class names its argument; say which flags set it
        raise ValueError(f"--architecture {network.architecture}: {err} (from --model_channels, --channel_mult, "
                         f"--layers_per_block, --attn_resolutions, --dropout"
                         f"{', --channels_per_head' if network.architecture == 'edm2' else ''})") from err


def network_summary(model, network: NetworkConfig) -> str:
    """``DDPM++ (SongUNet) with 0.72M parameters``."""
    return f"{network.title} with {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"


def described_config(network: NetworkConfig, unet: UNetConfig) -> Dict:
    """The flags that shaped the network, for the model card's table (``architecture`` first)."""
    if network.architecture == "unet2d":
        return {"architecture": "unet2d"}
    if unet.model_config_name_or_path:
        return {"architecture": network.architecture, "model_config_name_or_path":
                os.fspath(unet.model_config_name_or_path)}
    kwargs = edm_network_kwargs(network, unet)
    return {"architecture": network.architecture,
            **{k: kwargs[k] for k in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions")}}
