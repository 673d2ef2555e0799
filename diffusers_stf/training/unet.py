"""A ``UNet2DModel`` from the shared model options."""

from __future__ import annotations

from diffusers import UNet2DModel


def unet_config(args, sample_size: int, channels: int) -> dict:
    """``UNet2DModel`` keyword arguments from the options of
    :func:`~diffusers_stf.training.args.add_unet_args` (no attention unless asked; positional time embedding, which
    takes the float c_noise of the EDM preconditioning)."""
    if getattr(args, "model_config_name_or_path", None):
        path = args.model_config_name_or_path
        config = dict(UNet2DModel.load_config(path))
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        for key, value in (("sample_size", sample_size), ("in_channels", channels), ("out_channels", channels)):
            if config.get(key) not in (None, value):
                raise ValueError(f"--model_config_name_or_path has {key}={config[key]} but the data needs {value}")
            config[key] = value
        return config
    blocks = tuple(args.block_out_channels)
    attention = set(getattr(args, "attention_levels", ()) or ())
    groups = args.norm_num_groups or min(32, blocks[0])
    bad = [c for c in blocks if c % groups]
    if bad:
        raise ValueError(f"--norm_num_groups {groups} must divide every entry of --block_out_channels {blocks}")
    if sample_size % (2 ** (len(blocks) - 1)):
        raise ValueError(f"resolution {sample_size} must be divisible by 2^(levels-1) = {2 ** (len(blocks) - 1)}")
    down = tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(len(blocks)))
    up = tuple("AttnUpBlock2D" if i in attention else "UpBlock2D" for i in reversed(range(len(blocks))))
    return dict(
        sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=blocks,
        layers_per_block=args.layers_per_block, down_block_types=down, up_block_types=up,
        add_attention=bool(getattr(args, "mid_block_attention", False)),
        attention_head_dim=min(getattr(args, "attention_head_dim", 32), blocks[-1]), norm_num_groups=groups,
        dropout=getattr(args, "dropout", 0.0),
    )


def make_unet(args, sample_size: int, channels: int, cls=UNet2DModel, **overrides):
    """``cls(**unet_config(args, ...), **overrides)``, e.g. ``cls=AugmentConditionedUNet2DModel``."""
    return cls(**{**unet_config(args, sample_size, channels), **overrides})


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())

