"""Typed configuration of the training plumbing, filled from the scripts' command lines by
:func:`~diffusers_stf.training.args.parse_training_args`.

Every check names the command-line flag, so ``--learning_rate inf`` or ``--ema_halflife_kimg nan`` stop the run
before it starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

from .in_training_eval import EvaluationConfig

# The seed seeds NumPy's legacy generator too (accelerate's set_seed), which takes 32-bit seeds.
MAX_SEED = 2**32 - 1
# Adam moves every weight by about the learning rate per step; a larger one diverges at the first step, and one past
# float32's range makes the optimizer fail without naming the option.
MAX_LEARNING_RATE = 1.0
LR_SCHEDULERS = ("constant_with_warmup", "constant", "linear", "cosine", "cosine_with_restarts", "polynomial",
                 "inverse_sqrt")
TRACKERS = ("auto", "tensorboard", "wandb", "none")


def check_finite(name: str, value: Optional[float], low: Optional[float] = None, low_inclusive: bool = True,
                 high: Optional[float] = None, high_inclusive: bool = True):
    """Raise a ``ValueError`` naming ``--name`` unless ``value`` is None or a finite number in the given range."""
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"--{name} must be a finite number, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"--{name} must be {'>=' if low_inclusive else '>'} {low:g}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise ValueError(f"--{name} must be {'<=' if high_inclusive else '<'} {high:g}, got {value}")


def check_count(name: str, value: Optional[int], minimum: int = 1):
    """Raise a ``ValueError`` naming ``--name`` unless ``value`` is None or an integer >= ``minimum``."""
    if value is not None and value < minimum:
        raise ValueError(f"--{name} must be >= {minimum}, got {value}")


def check_levels(flag_prefix: str, block_out_channels: Sequence[int], attention_levels: Sequence[int]):
    """Raise a ``ValueError`` naming ``--{flag_prefix}block_out_channels`` / ``--{flag_prefix}attention_levels``
    unless there is at least one level, every level has channels, and every attention level is one of them."""
    if len(block_out_channels) == 0:
        raise ValueError(f"--{flag_prefix}block_out_channels needs at least one level")
    for channels in block_out_channels:
        if channels < 1:
            raise ValueError(f"--{flag_prefix}block_out_channels entries must be >= 1, got {channels}")
    for level in attention_levels:
        if not 0 <= level < len(block_out_channels):
            raise ValueError(f"--{flag_prefix}attention_levels entries must be in [0, {len(block_out_channels) - 1}], "
                             f"got {level}")


def from_namespace(cls, namespace, prefix: str = "", **overrides):
    """An instance of the dataclass ``cls`` from the same-named attributes of an argparse ``namespace`` (named
    ``{prefix}_{field}`` when a ``prefix`` is given).

    A field missing from the namespace raises ``AttributeError``: every option must be declared by the parser.
    """
    values = {f.name: getattr(namespace, f"{prefix}_{f.name}" if prefix else f.name)
              for f in dataclasses.fields(cls) if f.name not in overrides}
    return cls(**values, **overrides)


@dataclass
class UNetConfig:
    """The ``UNet2DModel`` of a training script (see :func:`~diffusers_stf.training.unet.make_unet`).

    Args:
        model_config_name_or_path: a ``config.json`` of a ``UNet2DModel`` (or a folder holding one); when given, it
            replaces the options below.
        block_out_channels: channels per level.
        layers_per_block: ResNet blocks per level.
        attention_levels: levels (0 = highest resolution) with attention blocks.
        mid_block_attention: attention in the middle block.
        attention_head_dim: channels per attention head.
        norm_num_groups: group-norm groups (None: ``min(32, block_out_channels[0])``).
        dropout: dropout probability.
    """

    model_config_name_or_path: Optional[str] = None
    block_out_channels: Tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_levels: Tuple[int, ...] = ()
    mid_block_attention: bool = False
    attention_head_dim: int = 32
    norm_num_groups: Optional[int] = None
    dropout: float = 0.0

    def __post_init__(self):
        path = self.model_config_name_or_path
        looks_local = path is not None and (os.path.isabs(path) or path.startswith(".") or path.endswith(".json")
                                            or path.count("/") != 1)
        if looks_local and not os.path.exists(path):
            raise ValueError(f"--model_config_name_or_path {path!r} does not exist (give a config.json of the "
                             "--architecture's model class, a folder holding one, or a Hub model id)")
        if path is not None and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"--model_config_name_or_path {path!r} is a folder without a config.json")
        check_levels("", self.block_out_channels, self.attention_levels)
        check_count("layers_per_block", self.layers_per_block)
        check_count("attention_head_dim", self.attention_head_dim)
        check_count("norm_num_groups", self.norm_num_groups)
        check_finite("dropout", self.dropout, 0.0, True, 1.0, False)


ENCODER_MID_BLOCKS = {"none": None, "resnet": "UNetMidBlock2DNoAttention", "attention": "UNetMidBlock2D"}


@dataclass
class EncoderConfig:
    """The architecture of a noise-conditional encoder (:class:`~diffusers_stf.models.NoiseConditionalClassifier`,
    or the head of a :class:`~diffusers_stf.models.Discriminator`), from the flags ``--{prefix}_{field}``.

    Args:
        flag_prefix: the flags' prefix (``clf``, ``disc``), for the messages.
        block_out_channels: widths of the down blocks.
        layers_per_block: ResNet layers per down block.
        attention_levels: levels (0 = highest resolution) with attention blocks.
        mid_block: ``none``, ``resnet`` or ``attention``.
        norm_num_groups: GroupNorm groups.
        preconditioning: how (x, σ) enter the network (``vp`` or ``edm``).
    """

    flag_prefix: str
    block_out_channels: Tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_levels: Tuple[int, ...] = ()
    mid_block: str = "none"
    norm_num_groups: int = 8
    preconditioning: str = "vp"

    def __post_init__(self):
        check_levels(f"{self.flag_prefix}_", self.block_out_channels, self.attention_levels)
        check_count(f"{self.flag_prefix}_layers_per_block", self.layers_per_block)
        check_count(f"{self.flag_prefix}_norm_num_groups", self.norm_num_groups)

    def model_kwargs(self) -> dict:
        """The encoder's model arguments: widths, down block types, layers, groups, mid block and preconditioning."""
        return dict(
            block_out_channels=tuple(self.block_out_channels),
            down_block_types=tuple("AttnDownBlock2D" if i in self.attention_levels else "DownBlock2D"
                                   for i in range(len(self.block_out_channels))),
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            mid_block_type=ENCODER_MID_BLOCKS[self.mid_block],
            preconditioning=self.preconditioning,
        )


@dataclass
class TrainingConfig:
    """Everything :class:`~diffusers_stf.training.Trainer` needs besides the model, the loss and the data.

    Length: ``max_train_steps`` when given (it then wins over ``num_epochs``, and the run says so), else
    ``num_epochs`` (else ``default_num_epochs``, the script's default) epochs.

    Args:
        output_dir: the run's folder (checkpoints, logs, grids, the final pipeline).
        overwrite_output_dir: start a new run in an ``output_dir`` that holds another run, deleting what that run
            recorded as created (checkpoints, logs, grids, final folder) and nothing else (without it such a folder is
            refused; see :mod:`~diffusers_stf.training.run_folder`).
        train_batch_size: images per process per micro-step.
        max_train_steps: optimizer steps; wins over ``num_epochs``.
        num_epochs: passes over the data.
        default_num_epochs: the script's length when neither of the two is given.
        gradient_accumulation_steps: micro-steps per optimizer step.
        learning_rate, lr_scheduler, lr_warmup_steps, lr_rampup_kimg: the learning-rate schedule (diffusers'
            ``get_scheduler``, or EDM2's ``inverse_sqrt``; the warm-up from ``lr_rampup_kimg``, EDM's ramp-up in
            thousands of images, when ``lr_warmup_steps`` is None).
        lr_ref_steps: ``inverse_sqrt``: t_ref, the optimizer step where the decay α_ref/√(t/t_ref) starts (EDM2's
            ``ref_batches``; 0: no decay).
        adam_beta1, adam_beta2, adam_weight_decay, adam_epsilon: the default AdamW optimizer.
        max_grad_norm: gradient clipping; 0 disables it.
        seed: the training seed (initialisation, batches, every draw of the loss).
        mixed_precision: ``no``, ``fp16`` or ``bf16``.
        cpu: train on the CPU even when an accelerator is present.
        torch_compile: compile the model with ``torch.compile`` (accelerate's dynamo plugin, inductor backend).
        ema_halflife_kimg, ema_rampup_ratio: EDM's EMA (:class:`~diffusers_stf.training.ema.HalfLifeEMA`), the
            default rule.
        use_ema, ema_inv_gamma, ema_power, ema_max_decay: diffusers' warm-up EMA
            (:class:`~diffusers_stf.training.ema.WarmupEMA`) instead.
        ema_stds: σ_rel of EDM2's power-function EMAs tracked beside that EMA, each in (0, 1/√12) (EDM2: 0.05, 0.10);
            empty: none (:mod:`~diffusers_stf.training.power_ema`).
        ema_snapshot_steps, ema_snapshot_kimg: their snapshots every N steps, or every N thousand images (0: at the
            last step only).
        checkpointing_steps: a resumable checkpoint every N steps (0: never).
        checkpointing_minutes: also a checkpoint at the first logging step after this many minutes without one (0:
            never); only the newest such checkpoint is kept, and it does not count against ``checkpoints_total_limit``.
        checkpoints_total_limit: keep at most this many checkpoints (0 or None: all).
        resume_from_checkpoint: ``latest`` or a checkpoint folder.
        allow_changed_settings: resume even when settings that change the maths differ from the checkpoint's (the
            differences are printed and the new values applied); the model architecture must still match.
        logging_steps, logging_dir, report_to, sigma_buckets: the metrics files and tracker (``logging_dir``: a
            subfolder of ``output_dir``, or a folder outside it where the run writes into its own subfolder).
        validation_steps, num_validation_images, num_inference_steps, validation_seed: the sample grids.
        save_images_epochs: a sample grid every N epochs instead of every ``validation_steps``.
        save_model_epochs: save the pipeline folder every N epochs too (diffusers' option).
        no_progress_bar: no tqdm bar.
        dataloader_num_workers: threads reading the next batches' rows ahead from a memory-mapped Arrow set; no
            effect on a set held in memory.
        enable_xformers_memory_efficient_attention: xformers attention in the model.
        push_to_hub, hub_model_id, hub_token, hub_private_repo: upload of the final folder.
        notes: lines the run prints at its start (e.g. defaults that differ from diffusers').
        evaluation: the metrics during training (``--eval_*``, :mod:`~diffusers_stf.training.in_training_eval`);
            not part of the resume fingerprint.
    """

    output_dir: str = "outputs/train"
    overwrite_output_dir: bool = False
    train_batch_size: int = 64
    max_train_steps: Optional[int] = None
    num_epochs: Optional[int] = None
    default_num_epochs: int = 100
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: Optional[int] = None
    lr_rampup_kimg: float = 6.4
    lr_ref_steps: float = 70000.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    cpu: bool = False
    torch_compile: bool = False
    ema_halflife_kimg: float = 500.0
    ema_rampup_ratio: float = 0.05
    use_ema: bool = False
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999
    ema_stds: Tuple[float, ...] = ()
    ema_snapshot_steps: int = 0
    ema_snapshot_kimg: float = 0.0
    checkpointing_steps: int = 500
    checkpointing_minutes: float = 0.0
    checkpoints_total_limit: Optional[int] = 2
    resume_from_checkpoint: Optional[str] = None
    allow_changed_settings: bool = False
    logging_steps: int = 50
    logging_dir: str = "logs"
    report_to: str = "auto"
    sigma_buckets: Tuple[float, ...] = (0.02, 0.1, 0.5, 2.0, 10.0)
    validation_steps: int = 500
    save_images_epochs: Optional[int] = None
    save_model_epochs: Optional[int] = None
    num_validation_images: int = 100
    num_inference_steps: Optional[int] = 18
    validation_seed: int = 0
    no_progress_bar: bool = False
    dataloader_num_workers: int = 0
    enable_xformers_memory_efficient_attention: bool = False
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None
    hub_token: Optional[str] = field(default=None, repr=False)
    hub_private_repo: bool = False
    notes: Tuple[str, ...] = ()
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self):
        for name in ("train_batch_size", "gradient_accumulation_steps", "num_epochs", "default_num_epochs",
                     "max_train_steps", "logging_steps", "num_validation_images", "num_inference_steps"):
            check_count(name, getattr(self, name))
        for name in ("checkpointing_steps", "validation_steps", "lr_warmup_steps", "checkpoints_total_limit",
                     "dataloader_num_workers"):
            check_count(name, getattr(self, name), minimum=0)
        check_finite("learning_rate", self.learning_rate, 0.0, False, MAX_LEARNING_RATE)
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"--seed must be in [0, {MAX_SEED}], got {self.seed}")
        check_finite("checkpointing_minutes", self.checkpointing_minutes, 0.0)
        check_finite("lr_rampup_kimg", self.lr_rampup_kimg, 0.0)
        check_finite("lr_ref_steps", self.lr_ref_steps, 0.0)
        check_finite("adam_beta1", self.adam_beta1, 0.0, True, 1.0, False)
        check_finite("adam_beta2", self.adam_beta2, 0.0, True, 1.0, False)
        check_finite("adam_weight_decay", self.adam_weight_decay, 0.0)
        check_finite("adam_epsilon", self.adam_epsilon, 0.0, False)
        check_finite("max_grad_norm", self.max_grad_norm, 0.0)
        check_finite("ema_halflife_kimg", self.ema_halflife_kimg, 0.0)
        check_finite("ema_rampup_ratio", self.ema_rampup_ratio, 0.0)
        check_finite("ema_inv_gamma", self.ema_inv_gamma, 0.0, False)
        check_finite("ema_power", self.ema_power, 0.0, False)
        check_finite("ema_max_decay", self.ema_max_decay, 0.0, True, 1.0, False)
        check_count("save_images_epochs", self.save_images_epochs)
        self.check_power_ema()
        check_count("save_model_epochs", self.save_model_epochs)
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"--lr_scheduler must be one of {LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.report_to not in TRACKERS:
            raise ValueError(f"--report_to must be one of {TRACKERS}, got {self.report_to!r}")
        buckets: Sequence[float] = self.sigma_buckets
        if list(buckets) != sorted(buckets) or any(not (math.isfinite(b) and b > 0) for b in buckets):
            raise ValueError(f"--sigma_buckets must be increasing positive numbers, got {buckets}")
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise ValueError("--overwrite_output_dir starts a new run and --resume_from_checkpoint continues one; "
                             "give one of them")

    def check_power_ema(self):
        """``--ema_stds`` in (0, 1/√12), distinct, and snapshot intervals only with them (one of the two)."""
        from ..phema import MAX_STD

        stds = tuple(self.ema_stds)
        if any(not (isinstance(s, (int, float)) and 0 < s < MAX_STD) for s in stds):
            raise ValueError(f"--ema_stds must lie in (0, 1/sqrt(12) = {MAX_STD:.4f}) (EDM2's valid range, rounded "
                             f"to (0, 0.289): the power-function profile needs an exponent > 0), got "
                             f"{','.join(f'{s:g}' for s in stds)}")
        if len({f"{s:.3f}" for s in stds}) != len(stds):
            raise ValueError(f"--ema_stds must differ in their first three decimals (the snapshot file names), got "
                             f"{','.join(f'{s:g}' for s in stds)}")
        check_count("ema_snapshot_steps", self.ema_snapshot_steps, minimum=0)
        check_finite("ema_snapshot_kimg", self.ema_snapshot_kimg, 0.0)
        if (self.ema_snapshot_steps or self.ema_snapshot_kimg) and not stds:
            raise ValueError("--ema_snapshot_steps/--ema_snapshot_kimg write the snapshots of --ema_stds: give "
                             "--ema_stds too (e.g. 0.05,0.10)")
        if self.ema_snapshot_steps and self.ema_snapshot_kimg:
            raise ValueError("give either --ema_snapshot_steps or --ema_snapshot_kimg, not both")

    def length_note(self) -> Optional[str]:
        """A sentence saying which option decided the run's length when both ``max_train_steps`` and
        ``num_epochs`` were given; None otherwise."""
        if self.max_train_steps is not None and self.num_epochs is not None:
            return (f"Both --max_train_steps {self.max_train_steps} and --num_epochs {self.num_epochs} were given: "
                    f"--max_train_steps wins.")
        return None
