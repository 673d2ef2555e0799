"""Command-line options shared by the training scripts, as argparse groups, and their typed configuration.

Each ``add_*_args(parser)`` adds one group; :func:`add_training_args` adds them all. A script sets its own defaults
afterwards with ``parser.set_defaults(...)`` and parses with :func:`parse_training_args`, which returns the namespace
and the typed :class:`ScriptConfig` (every check names its flag). The names follow diffusers'
``train_unconditional.py`` where it has the option.
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from .data import DATASET_FINGERPRINTS, DataConfig
from .config import ENCODER_MID_BLOCKS, LR_SCHEDULERS, TRACKERS, EncoderConfig, TrainingConfig, UNetConfig
from .config import from_namespace
from .network import ARCHITECTURES, NetworkConfig
from .in_training_eval import add_evaluation_args, evaluation_config
from ..hub.push import check_hub_settings


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


def add_data_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", type=str, default=None,
                   help="Hub dataset id (or local dataset folder) for datasets.load_dataset. "
                        "Default: the embedded 8x8 digits (no network needed).")
    g.add_argument("--dataset_config_name", type=str, default=None, help="configuration of --dataset_name")
    g.add_argument("--dataset_split", type=str, default="train", help="split of --dataset_name / --train_data_dir")
    g.add_argument("--train_data_dir", type=str, default=None, help="folder of images, read with the imagefolder builder")
    g.add_argument("--digits_split", type=str, default="train", choices=("train", "all"),
                   help="embedded digits: the 797-image training split (evaluation scores samples against it and "
                        "holds out the other 1000), or all 1797 images, the held-out ones included")
    g.add_argument("--image_column", type=str, default=None, help="image column (default: image, img or the first Image feature)")
    g.add_argument("--label_column", type=str, default=None,
                   help="column of class labels (default: label, which an image folder's class subfolders fill)")
    g.add_argument("--cache_dir", type=str, default=None, help="datasets cache folder")
    g.add_argument("--resolution", type=int, default=None,
                   help="side length of the training images; the shorter side is resized to it. "
                        "Default: the images' own size (they must then all have the same size)")
    g.add_argument("--channels", type=int, default=None, choices=(1, 3),
                   help="1 (grey) or 3 (RGB); default: the images' own (RGB when grey and colour images are mixed)")
    g.add_argument("--center_crop", action="store_true", help="center crop instead of a random crop")
    g.add_argument("--random_flip", action="store_true", help="random left-right flips")
    g.add_argument("--max_train_samples", type=int, default=None, help="use only the first N images")
    g.add_argument("--dataset_fingerprint", type=str, default="stat", choices=DATASET_FINGERPRINTS,
                   help="what a resume compares of a local image folder: every file's name, size and modification "
                        "time (stat), or its name and the SHA-256 of its bytes (bytes: reads every file)")
    return g


def add_unet_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("model (--architecture; docs/training.md has the papers' presets)")
    g.add_argument("--architecture", type=str, default="unet2d", choices=ARCHITECTURES,
                   help="unet2d: diffusers' UNet2DModel; ddpmpp, ncsnpp: EDM's SongUNet (DDPM++, NCSN++); adm: "
                        "EDM's DhariwalUNet; edm2: EDM2's magnitude-preserving U-Net")
    g.add_argument("--model_config_name_or_path", type=str, default=None,
                   help="a config.json of the --architecture's model class (or a folder holding one); overrides the "
                        "size options")
    g.add_argument("--layers_per_block", "--num_blocks", dest="layers_per_block", type=int, default=1,
                   help="residual blocks per resolution in the encoder (one more in the decoder): UNet2DModel's "
                        "layers_per_block, EDM's num_blocks")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--block_out_channels", type=int_list, default=(32, 64),
                   help="unet2d: channels per level, e.g. 32,64")
    g.add_argument("--attention_levels", type=int_list, default=(),
                   help="unet2d: levels (0 = highest resolution) with attention blocks, e.g. 1")
    g.add_argument("--mid_block_attention", action="store_true", help="unet2d: attention in the middle block")
    g.add_argument("--attention_head_dim", type=int, default=32, help="unet2d: channels per attention head")
    g.add_argument("--norm_num_groups", type=int, default=None,
                   help="unet2d: group-norm groups; default: min(32, first block's channels)")
    g.add_argument("--model_channels", type=int, default=None,
                   help="ddpmpp, ncsnpp, adm, edm2: base width (default 32; EDM CIFAR-10: 128, ADM 64: 192, EDM2-S: "
                        "192)")
    g.add_argument("--channel_mult", type=int_list, default=None,
                   help="ddpmpp, ncsnpp, adm, edm2: width multipliers per resolution (default 1,2; EDM CIFAR-10: "
                        "2,2,2)")
    g.add_argument("--attn_resolutions", type=int_list, default=(),
                   help="ddpmpp, ncsnpp, adm, edm2: resolutions with self-attention (the lowest always has it), e.g. "
                        "16")
    g.add_argument("--channels_per_head", type=int, default=64, help="edm2: attention channels per head")
    return g


def add_encoder_args(group, prefix: str, preconditioning_help: str):
    """The flags of a noise-conditional encoder's architecture, ``--{prefix}_block_out_channels`` and so on (read
    back by :func:`encoder_config`)."""
    group.add_argument(f"--{prefix}_block_out_channels", type=int_list, default=(32, 64), help="widths, e.g. 32,64")
    group.add_argument(f"--{prefix}_layers_per_block", type=int, default=1)
    group.add_argument(f"--{prefix}_attention_levels", type=int_list, default=(), help="levels with attention blocks")
    group.add_argument(f"--{prefix}_mid_block", type=str, default="none", choices=tuple(ENCODER_MID_BLOCKS))
    group.add_argument(f"--{prefix}_norm_num_groups", type=int, default=8)
    group.add_argument(f"--{prefix}_preconditioning", type=str, default="vp", choices=("vp", "edm"),
                       help=preconditioning_help)


def encoder_config(args: argparse.Namespace, prefix: str) -> EncoderConfig:
    """The :class:`EncoderConfig` of the flags :func:`add_encoder_args` added with ``prefix``."""
    return from_namespace(EncoderConfig, args, prefix=prefix, flag_prefix=prefix)


def add_optimization_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=64, help="batch size per process")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="optimizer steps; when given it decides the length, also over --num_epochs")
    g.add_argument("--num_epochs", type=int, default=None,
                   help="passes over the data (default: the script's --default_num_epochs)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=1e-3)
    g.add_argument("--lr_scheduler", type=str, default="constant_with_warmup", choices=LR_SCHEDULERS,
                   help="EDM: linear warm-up, then constant (constant_with_warmup); EDM2: inverse_sqrt, "
                        "lr/sqrt(max(step/--lr_ref_steps, 1)) after the warm-up")
    g.add_argument("--lr_warmup_steps", type=int, default=None,
                   help="warm-up length in optimizer steps (default: from --lr_rampup_kimg)")
    g.add_argument("--lr_rampup_kimg", type=float, default=6.4,
                   help="EDM's warm-up length in thousands of training images (EDM CIFAR: 10000; EDM2: 10000)")
    g.add_argument("--lr_ref_steps", type=float, default=70000.0,
                   help="--lr_scheduler inverse_sqrt: the optimizer step t_ref where the 1/sqrt decay starts "
                        "(EDM2's ref_batches: 70000 for ImageNet-512, 35000 for ImageNet-64); 0: no decay")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 disables it")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mixed_precision", type=str, default="no", choices=("no", "fp16", "bf16"))
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when an accelerator is present")
    g.add_argument("--torch_compile", action="store_true",
                   help="compile the model with torch.compile (inductor); the first steps take minutes on a CPU")
    return g


def add_ema_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("EMA: EDM's half-life in images (default), or diffusers' warm-up rule (--use_ema)")
    g.add_argument("--ema_halflife_kimg", type=float, default=500.0,
                   help="EMA half-life in thousands of images (EDM: 500); 0 disables the EMA")
    g.add_argument("--ema_rampup_ratio", type=float, default=0.05,
                   help="half-life at most this fraction of the images seen so far (EDM: 0.05); 0 disables the ramp-up")
    g.add_argument("--use_ema", action="store_true",
                   help="diffusers' EMAModel decay with warm-up instead of EDM's half-life: "
                        "min(--ema_max_decay, 1 - (1 + step/--ema_inv_gamma)^-ema_power)")
    g.add_argument("--ema_inv_gamma", type=float, default=1.0, help="--use_ema: inverse gamma of the warm-up")
    g.add_argument("--ema_power", type=float, default=0.75, help="--use_ema: power of the warm-up")
    g.add_argument("--ema_max_decay", type=float, default=0.9999, help="--use_ema: the largest decay")
    g.add_argument("--ema_stds", type=float_list, default=(),
                   help="also track EDM2's power-function EMAs with these relative widths σ_rel, each in (0, 0.289) "
                        "(EDM2: 0.05,0.10), for post-hoc reconstruction with python -m diffusers_stf.phema")
    g.add_argument("--ema_snapshot_steps", type=int, default=0,
                   help="--ema_stds: write their snapshots every N steps (and at the last step)")
    g.add_argument("--ema_snapshot_kimg", type=float, default=0.0,
                   help="--ema_stds: write their snapshots every N thousand images (EDM2: 8192), in whole steps")
    return g


# Options of diffusers' examples/unconditional_image_generation/train_unconditional.py that only name ours.
DDPM_FLAGS = ("prediction_type", "ddpm_num_steps", "ddpm_num_inference_steps", "ddpm_beta_schedule")
DIFFUSERS_DEFAULTS = {  # train_unconditional.py's defaults where ours differ
    "learning_rate": 1e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 500, "adam_beta1": 0.95,
    "adam_weight_decay": 1e-6, "train_batch_size": 16, "resolution": 64, "checkpoints_total_limit": None,
    "num_validation_images": 16, "num_epochs": 100,
}


def add_diffusers_args(parser: argparse.ArgumentParser, ddpm: bool = False):
    """The flags of diffusers' ``train_unconditional.py`` that the groups above name differently or do not need,
    so its command lines run unchanged. With ``ddpm``, its DDPM options too (the script maps them onto its own);
    otherwise they are accepted by the parser only to be refused with an explanation."""
    g = parser.add_argument_group("diffusers train_unconditional.py flags (see docs/training.md for the map)")
    g.add_argument("--logger", type=str, default=None, choices=("tensorboard", "wandb"), help="= --report_to")
    g.add_argument("--eval_batch_size", type=int, default=None, help="= --num_validation_images")
    g.add_argument("--save_images_epochs", type=int, default=None,
                   help="a sample grid every N epochs (= --validation_steps N x steps per epoch)")
    g.add_argument("--save_model_epochs", type=int, default=None,
                   help="save the pipeline folder (EMA weights) every N epochs, besides the checkpoints")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="threads reading the next batches ahead from a memory-mapped (over-the-cap) set; no effect "
                        "on a set held in memory")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention in the UNet (needs the xformers package)")
    g.add_argument("--preserve_input_precision", action="store_true",
                   help="keep 16-bit images at 16 bits instead of reducing them to 8 bits (in-memory sets)")
    g.add_argument("--local_rank", type=int, default=-1,
                   help="accepted for compatibility; the process layout comes from the launcher (LOCAL_RANK)")
    ddpm_help = "" if ddpm else "DDPM only (train_sequence_aware.py); refused here"
    g.add_argument("--prediction_type", type=str, default=None, help=ddpm_help or "epsilon (default), sample (x0) or v_prediction")
    g.add_argument("--ddpm_num_steps", type=int, default=None, help=ddpm_help or "= --num_train_timesteps")
    g.add_argument("--ddpm_num_inference_steps", type=int, default=None, help=ddpm_help or "= --num_inference_steps")
    g.add_argument("--ddpm_beta_schedule", type=str, default=None,
                   help=ddpm_help or "= --beta_schedule (linear, scaled_linear, squaredcos_cap_v2)")
    parser.set_defaults(accepts_ddpm_flags=ddpm)
    return g


def add_checkpoint_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("output and checkpoints")
    g.add_argument("--output_dir", type=str, default="outputs/train")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start a new run in an --output_dir that holds another run, deleting what that run recorded "
                        "as its own (checkpoints, logs, grids, final folder) and nothing else (without it such a "
                        "folder is refused)")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps; 0: never")
    g.add_argument("--checkpointing_minutes", type=float, default=0.0,
                   help="also save a checkpoint at the first logging step after this many minutes without one, so a "
                        "killed run loses at most that much; only the newest is kept, outside "
                        "--checkpoints_total_limit; 0: never")
    g.add_argument("--checkpoints_total_limit", type=int, default=2,
                   help="keep at most this many checkpoints by step (--checkpointing_steps)")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="'latest' (the newest intact checkpoint of the run in --output_dir; a fresh start when there is "
                        "none) or a checkpoint folder")
    g.add_argument("--allow_changed_settings", action="store_true",
                   help="resume although settings that change the maths (learning rate, schedule, EMA, clipping, Adam, "
                        "data, processes...) differ from the checkpoint's: print them and apply the new values")
    return g


def add_logging_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("logging and validation")
    g.add_argument("--logging_steps", type=int, default=50, help="write metrics every N steps")
    g.add_argument("--logging_dir", type=str, default="logs",
                   help="the run's logs (metrics, loss.png, tracker files): a subfolder of --output_dir, or a "
                        "folder outside it (e.g. a shared TensorBoard folder) where the run writes only into a "
                        "subfolder of its own, <output_dir name>-<run id>")
    g.add_argument("--report_to", type=str, default="auto", choices=TRACKERS,
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


def training_parser(script_doc: str) -> argparse.ArgumentParser:
    """The parser of a training script: its description is the first paragraph of ``script_doc`` (the script's
    docstring), ``--help`` shows every default, and a flag must be spelled out (``--learning_rat`` is an error, not
    ``--learning_rate``)."""
    return argparse.ArgumentParser(description=script_doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)


def add_training_args(parser: argparse.ArgumentParser, unet: bool = True, default_num_epochs: int = 100,
                      ddpm: bool = False) -> argparse.ArgumentParser:
    """Add every group (the UNet group only when ``unet``; diffusers' DDPM flags are accepted only when ``ddpm``)
    and return the parser. ``default_num_epochs`` is the script's length when neither ``--num_epochs`` nor
    ``--max_train_steps`` is given."""
    add_data_args(parser)
    if unet:
        add_unet_args(parser)
    add_optimization_args(parser)
    add_ema_args(parser)
    add_checkpoint_args(parser)
    add_logging_args(parser)
    add_hub_args(parser)
    add_evaluation_args(parser)
    add_diffusers_args(parser, ddpm)
    parser.set_defaults(default_num_epochs=default_num_epochs)
    return parser


@dataclass
class ScriptConfig:
    """The typed options of a training script: the trainer's, the data's and (scripts that train a score network) the
    network's (``--architecture`` and the EDM networks' sizes in ``network``, the ``UNet2DModel`` and shared ones in
    ``unet``), and which options were given on the command line (``explicit``)."""

    training: TrainingConfig
    data: DataConfig
    unet: Optional[UNetConfig] = None
    explicit: frozenset = frozenset()
    network: Optional[NetworkConfig] = None


def explicit_options(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> frozenset:
    """The destinations of the options given on the command line ``argv`` (not defaults)."""
    probe = copy.deepcopy(parser)
    probe._defaults.clear()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(probe.parse_args(argv)))


def one_of(args, explicit, ours: str, theirs: str):
    """Copy diffusers' ``--theirs`` onto ``--ours`` when only it was given; refuse two different values."""
    values = vars(args)
    if theirs not in explicit:
        return
    if ours in explicit and values[ours] != values[theirs]:
        raise ValueError(f"--{theirs} (diffusers' name) and --{ours} give different values "
                         f"({values[theirs]} and {values[ours]}); give one of them")
    values[ours] = values[theirs]


DDPM_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
DDPM_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def map_ddpm_flags(args: argparse.Namespace, explicit: frozenset):
    """diffusers' DDPM flags onto a DDPM script's ``--num_train_timesteps``, ``--beta_schedule`` (ours: linear,
    scaled_linear, cosine) and ``--num_inference_steps``; ``--prediction_type`` is one of DDPM_PREDICTION_TYPES."""
    values = vars(args)
    if "prediction_type" in explicit and args.prediction_type not in DDPM_PREDICTION_TYPES:
        raise ValueError(f"--prediction_type must be one of {DDPM_PREDICTION_TYPES}, got {args.prediction_type!r}")
    if "ddpm_beta_schedule" in explicit:
        if args.ddpm_beta_schedule not in DDPM_BETA_SCHEDULES:
            raise ValueError(f"--ddpm_beta_schedule must be one of {tuple(DDPM_BETA_SCHEDULES)}, "
                             f"got {args.ddpm_beta_schedule!r}")
        values["ddpm_beta_schedule"] = DDPM_BETA_SCHEDULES[args.ddpm_beta_schedule]
    one_of(args, explicit, "num_train_timesteps", "ddpm_num_steps")
    one_of(args, explicit, "beta_schedule", "ddpm_beta_schedule")
    one_of(args, explicit, "num_inference_steps", "ddpm_num_inference_steps")


def apply_diffusers_flags(args: argparse.Namespace, explicit: frozenset) -> List[str]:
    """Map diffusers' flags onto ours (in ``args``) and refuse those that make no sense here. Returns the lines the
    run prints at its start: the EMA rule in force, and the defaults that differ from diffusers'."""
    if not args.accepts_ddpm_flags:
        for name in DDPM_FLAGS:
            if name in explicit:
                raise ValueError(f"--{name} is an option of DDPM training (train_sequence_aware.py); this script "
                                 "does not train a DDPM noise predictor")
    else:
        map_ddpm_flags(args, explicit)
    if "lr_ref_steps" in explicit and args.lr_scheduler != "inverse_sqrt":
        raise ValueError(f"--lr_ref_steps sets the decay of --lr_scheduler inverse_sqrt; this run's schedule is "
                         f"{args.lr_scheduler}")
    if args.use_ema and explicit & {"ema_halflife_kimg", "ema_rampup_ratio"}:
        raise ValueError("--use_ema (diffusers' warm-up EMA) and --ema_halflife_kimg/--ema_rampup_ratio (EDM's "
                         "half-life EMA) choose two EMA rules; give the options of one")
    if explicit & {"ema_inv_gamma", "ema_power", "ema_max_decay"} and not args.use_ema:
        raise ValueError("--ema_inv_gamma, --ema_power and --ema_max_decay set diffusers' EMA rule: add --use_ema")
    one_of(args, explicit, "report_to", "logger")
    one_of(args, explicit, "num_validation_images", "eval_batch_size")
    values = vars(args)
    for name in ("save_images_epochs", "save_model_epochs", "eval_batch_size"):
        if values[name] is not None and values[name] < 1:
            raise ValueError(f"--{name} must be >= 1, got {values[name]}")
    if "save_images_epochs" in explicit and "validation_steps" in explicit:
        raise ValueError("give either --save_images_epochs (diffusers) or --validation_steps, not both")
    if args.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    notes = []
    differing = []
    for name, theirs in DIFFUSERS_DEFAULTS.items():
        if name in explicit or name not in values:
            continue
        ours = values[name]
        if name == "num_epochs":
            if args.max_train_steps is not None:
                continue
            ours = args.default_num_epochs
        if ours != theirs:
            shown = "the images' own" if name == "resolution" and ours is None else \
                "from --lr_rampup_kimg" if name == "lr_warmup_steps" and ours is None else ours
            differing.append(f"--{name} {shown} (diffusers: {theirs})")
    if not args.use_ema and "ema_halflife_kimg" not in explicit and args.ema_halflife_kimg > 0:
        differing.append("EDM's half-life EMA (diffusers: none unless --use_ema)")
    if differing:
        notes.append("Defaults that differ from diffusers' train_unconditional.py (give the flag to choose):\n"
                     + "\n".join(f"  {line}" for line in differing))
    return notes


def check_finite_options(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Refuse NaN and ±inf in every float option (and float-list option) of ``parser``, naming the flag."""
    values_by_dest = vars(args)
    for action in parser._actions:
        value = values_by_dest.get(action.dest)
        values = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            flag = action.option_strings[-1] if action.option_strings else action.dest
            raise ValueError(f"{flag} must be a finite number, got {value}")


def parse_training_args(parser: argparse.ArgumentParser,
                        argv: Optional[Sequence[str]] = None) -> Tuple[argparse.Namespace, ScriptConfig]:
    """``parser.parse_args(argv)``, the finite-number check of every float option, and the typed configuration
    (which validates the shared options; with ``--push_to_hub`` the token and the repo id are checked too, and
    ``hub_model_id`` becomes ``namespace/name``). Returns ``(args, config)``."""
    args = parser.parse_args(argv)
    check_finite_options(parser, args)
    explicit = explicit_options(parser, argv)
    notes = apply_diffusers_flags(args, explicit)
    has_unet = any(action.dest == "block_out_channels" for action in parser._actions)
    config = ScriptConfig(training=from_namespace(TrainingConfig, args, notes=tuple(notes),
                                                  evaluation=evaluation_config(args, explicit)),
                          data=from_namespace(DataConfig, args),
                          unet=from_namespace(UNetConfig, args) if has_unet else None, explicit=explicit,
                          network=from_namespace(NetworkConfig, args, explicit=explicit) if has_unet else None)
    training = config.training
    training.hub_model_id = check_hub_settings(training.push_to_hub, training.hub_model_id, training.hub_token,
                                               training.output_dir)
    return args, config
