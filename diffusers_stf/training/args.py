"""Command-line options shared by the training scripts, as argparse groups.

Each ``add_*_args(parser)`` adds one group; :func:`add_training_args` adds them all. A script sets its own defaults
afterwards with ``parser.set_defaults(...)`` and checks the result with :func:`check_training_args`. The names follow
diffusers' ``train_unconditional.py`` where it has the option.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

LR_SCHEDULERS = ("constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial")


def int_list(text: str):
    """``"32,64"`` → ``(32, 64)``."""
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def float_list(text: str):
    """``"0.01,0.1,1"`` → ``(0.01, 0.1, 1.0)``."""
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def str_list(text: str):
    return tuple(v for v in text.replace(" ", "").split(",") if v)


def add_data_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="Hub dataset id (or local dataset folder) for datasets.load_dataset. "
                        "Default: the embedded 8x8 digits (no network needed).")
    g.add_argument("--dataset_config_name", type=str, default=None, help="configuration of --dataset_name")
    g.add_argument("--dataset_split", type=str, default="train", help="split of --dataset_name / --train_data_dir")
    g.add_argument("--train_data_dir", type=str, default=None, help="folder of images, read with the imagefolder builder")
    g.add_argument("--digits_split", type=str, default="all", choices=("all", "train"),
                   help="embedded digits: all 1797 images, or the 797-image train split of the evaluation")
    g.add_argument("--image_column", type=str, default=None, help="image column (default: image, img or the first Image feature)")
    g.add_argument("--cache_dir", type=str, default=None, help="datasets cache folder")
    g.add_argument("--resolution", type=int, default=None,
                   help="side length of the training images; the shorter side is resized to it. "
                        "Default: the images' own size (they must then all have the same size)")
    g.add_argument("--channels", type=int, default=None, choices=(1, 3),
                   help="1 (grey) or 3 (RGB); default: from the first image")
    g.add_argument("--center_crop", action="store_true", help="center crop instead of a random crop")
    g.add_argument("--random_flip", action="store_true", help="random left-right flips")
    g.add_argument("--max_train_samples", type=int, default=None, help="use only the first N images")
    return g


def add_unet_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("model (UNet2DModel)")
    g.add_argument("--model_config_name_or_path", type=str, default=None,
                   help="a UNet2DModel config.json (or a folder holding one); overrides the options below")
    g.add_argument("--block_out_channels", type=int_list, default=(32, 64), help="channels per level, e.g. 32,64")
    g.add_argument("--layers_per_block", type=int, default=1)
    g.add_argument("--attention_levels", type=int_list, default=(),
                   help="levels (0 = highest resolution) with attention blocks, e.g. 1")
    g.add_argument("--mid_block_attention", action="store_true", help="attention in the middle block")
    g.add_argument("--attention_head_dim", type=int, default=32)
    g.add_argument("--norm_num_groups", type=int, default=None, help="default: min(32, first block's channels)")
    g.add_argument("--dropout", type=float, default=0.0)
    return g


def add_optimization_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=64, help="batch size per process")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="optimizer steps; overrides --num_epochs")
    g.add_argument("--num_epochs", type=int, default=100)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--lr_scheduler", type=str, default="constant_with_warmup", choices=LR_SCHEDULERS,
                   help="EDM: linear warm-up, then constant (constant_with_warmup)")
    g.add_argument("--lr_warmup_steps", type=int, default=None,
                   help="warm-up length in optimizer steps (default: from --lr_rampup_kimg)")
    g.add_argument("--lr_rampup_kimg", type=float, default=6.4,
                   help="EDM's warm-up length in thousands of training images (EDM CIFAR: 10000)")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 disables it")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mixed_precision", type=str, default="no", choices=("no", "fp16", "bf16"))
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when an accelerator is present")
    return g


def add_ema_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("EMA (EDM: half-life in images, with ramp-up)")
    g.add_argument("--ema_halflife_kimg", type=float, default=500.0,
                   help="EMA half-life in thousands of images (EDM: 500); 0 disables the EMA")
    g.add_argument("--ema_rampup_ratio", type=float, default=0.05,
                   help="half-life at most this fraction of the images seen so far (EDM: 0.05); 0 disables the ramp-up")
    return g


def add_checkpoint_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("output and checkpoints")
    g.add_argument("--output_dir", type=str, default="outputs/train")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps; 0: never")
    g.add_argument("--checkpoints_total_limit", type=int, default=2, help="keep at most this many checkpoints")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="'latest' (the newest checkpoint-N in --output_dir; a fresh start when there is none) or a checkpoint folder")
    return g


def add_logging_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("logging and validation")
    g.add_argument("--logging_steps", type=int, default=50, help="write metrics every N steps")
    g.add_argument("--logging_dir", type=str, default="logs", help="metrics folder inside --output_dir")
    g.add_argument("--report_to", type=str, default="auto", choices=("auto", "tensorboard", "wandb", "none"),
                   help="tracker besides the plain metrics files; auto = tensorboard when installed")
    g.add_argument("--sigma_buckets", type=float_list, default=(0.02, 0.1, 0.5, 2.0, 10.0),
                   help="edges of the noise-level buckets of the per-sigma loss log")
    g.add_argument("--validation_steps", type=int, default=500, help="save a sample grid every N steps; 0: only at the end")
    g.add_argument("--num_validation_images", type=int, default=100)
    g.add_argument("--num_inference_steps", type=int, default=18, help="sampler steps of the validation grids")
    g.add_argument("--validation_seed", type=int, default=0)
    g.add_argument("--no_progress_bar", action="store_true")
    return g


def add_hub_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("Hugging Face Hub")
    g.add_argument("--push_to_hub", action="store_true", help="upload the final folder (not the checkpoints)")
    g.add_argument("--hub_model_id", type=str, default=None, help="repo id; default: the name of --output_dir")
    g.add_argument("--hub_token", type=str, default=None, help="default: the token of `huggingface-cli login`")
    g.add_argument("--hub_private_repo", action="store_true")
    return g


def add_training_args(parser: argparse.ArgumentParser, unet: bool = True) -> argparse.ArgumentParser:
    """Add every group (the UNet group only when ``unet``) and return the parser."""
    add_data_args(parser)
    if unet:
        add_unet_args(parser)
    add_optimization_args(parser)
    add_ema_args(parser)
    add_checkpoint_args(parser)
    add_logging_args(parser)
    add_hub_args(parser)
    return parser


def _positive(args, name, allow_zero=False):
    value = getattr(args, name, None)
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else ">= 1"
        raise ValueError(f"--{name} must be {bound}, got {value}")


def check_training_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate the shared options (clear ValueErrors), filling in environment-dependent defaults. Returns ``args``."""
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_epochs", "max_train_steps", "logging_steps",
                 "num_validation_images", "num_inference_steps", "resolution", "max_train_samples"):
        _positive(args, name)
    for name in ("checkpointing_steps", "validation_steps", "lr_warmup_steps", "checkpoints_total_limit"):
        _positive(args, name, allow_zero=True)
    if getattr(args, "learning_rate", 1) <= 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if getattr(args, "ema_halflife_kimg", 0) < 0 or getattr(args, "ema_rampup_ratio", 0) < 0:
        raise ValueError("--ema_halflife_kimg and --ema_rampup_ratio must be >= 0")
    if getattr(args, "max_grad_norm", 0) < 0:
        raise ValueError(f"--max_grad_norm must be >= 0, got {args.max_grad_norm}")
    if getattr(args, "dataset_name", None) and getattr(args, "train_data_dir", None):
        raise ValueError("give either --dataset_name or --train_data_dir, not both")
    buckets = getattr(args, "sigma_buckets", ())
    if list(buckets) != sorted(buckets) or any(b <= 0 for b in buckets):
        raise ValueError(f"--sigma_buckets must be increasing positive numbers, got {buckets}")
    if getattr(args, "block_out_channels", None) is not None and len(args.block_out_channels) == 0:
        raise ValueError("--block_out_channels needs at least one level")
    levels = len(getattr(args, "block_out_channels", ()) or ())
    for level in getattr(args, "attention_levels", ()) or ():
        if not 0 <= level < levels:
            raise ValueError(f"--attention_levels entries must be in [0, {levels - 1}], got {level}")
    if getattr(args, "push_to_hub", False) and not getattr(args, "hub_model_id", None):
        args.hub_model_id = os.path.basename(os.path.normpath(args.output_dir))
    return args


def parse_training_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` followed by :func:`check_training_args`."""
    return check_training_args(parser.parse_args(argv))
