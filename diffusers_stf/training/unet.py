"""A ``UNet2DModel`` from the shared model options (:class:`~diffusers_stf.training.config.UNetConfig`)."""

from __future__ import annotations

from diffusers import UNet2DModel

from .config import UNetConfig


def config_file_kwargs(cls, path: str, sample_size: int, channels: int) -> dict:
    """The arguments in the ``config.json`` at ``path`` (a file, a folder or a Hub id) of a ``cls`` model, with the
    data's resolution and channels; a ValueError naming the flag when it is unreadable, of another class, or made for
    other images."""
    try:
        loaded = dict(cls.load_config(path))
    except Exception as err:  # diffusers raises several types for missing files and unknown Hub ids
        raise ValueError(f"--model_config_name_or_path {path!r}: cannot read a {cls.__name__} config there "
                         f"({type(err).__name__}: {err})") from err
    found = loaded.get("_class_name")
    if found not in (None, cls.__name__):
        raise ValueError(f"--model_config_name_or_path {path!r} is a {found} config; --architecture needs a "
                         f"{cls.__name__}")
    loaded = {k: v for k, v in loaded.items() if not k.startswith("_")}
    for key, value in (("sample_size", sample_size), ("in_channels", channels), ("out_channels", channels)):
        if loaded.get(key) not in (None, value):
            raise ValueError(f"--model_config_name_or_path has {key}={loaded[key]} but the data needs {value}")
        loaded[key] = value
    return loaded


def unet_config(config: UNetConfig, sample_size: int, channels: int) -> dict:
    """``UNet2DModel`` keyword arguments for ``config`` (no attention unless asked; positional time embedding, which
    takes the float c_noise of the EDM preconditioning)."""
    if config.model_config_name_or_path:
        return config_file_kwargs(UNet2DModel, config.model_config_name_or_path, sample_size, channels)
    blocks = tuple(config.block_out_channels)
    attention = set(config.attention_levels)
    groups = config.norm_num_groups or min(32, blocks[0])
    bad = [c for c in blocks if c % groups]
    if bad:
        raise ValueError(f"--norm_num_groups {groups} must divide every entry of --block_out_channels {blocks}")
    if sample_size % (2 ** (len(blocks) - 1)):
        raise ValueError(f"resolution {sample_size} must be divisible by 2^(levels-1) = {2 ** (len(blocks) - 1)}")
    down = tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(len(blocks)))
    up = tuple("AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(len(blocks))))
    return dict(
        sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=blocks,
        layers_per_block=config.layers_per_block, down_block_types=down, up_block_types=up,
        add_attention=config.mid_block_attention, attention_head_dim=min(config.attention_head_dim, blocks[-1]),
        norm_num_groups=groups, dropout=config.dropout,
    )


def make_unet(config: UNetConfig, sample_size: int, channels: int, cls=UNet2DModel, **overrides):
    """``cls(**unet_config(config, ...), **overrides)``, e.g. ``cls=AugmentConditionedUNet2DModel``."""
    return cls(**{**unet_config(config, sample_size, channels), **overrides})
