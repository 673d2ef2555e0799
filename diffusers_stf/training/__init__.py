"""Training plumbing shared by the scripts in ``examples/``: typed configuration filled from the command line,
Accelerator set-up, EDM's half-life EMA, resumable checkpoints in a one-run output folder, metrics files, sample grids,
model cards, Hub upload, and :class:`Trainer`, the loop that runs a script's loss function. See
``examples/train_stf.py`` for a script built on it and ``docs/training.md`` for the options.
"""

from ..losses import LossOutput
from .data import BatchSchedule, DataConfig, ImageData, derived_seed, load_training_images, read_labels, require_labels
from .accelerator import check_world_size, make_accelerator, step_generator, to_device, tracker_name
from .args import (
    ScriptConfig,
    add_checkpoint_args,
    add_data_args,
    add_ema_args,
    add_encoder_args,
    add_hub_args,
    add_logging_args,
    add_optimization_args,
    add_training_args,
    add_unet_args,
    encoder_config,
    float_list,
    int_list,
    parse_training_args,
    training_parser,
)
from .checkpoints import (
    checkpoint_problem,
    list_checkpoints,
    load_checkpoint,
    model_fingerprint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import EncoderConfig, TrainingConfig, UNetConfig, check_finite, from_namespace
from .class_conditioning import ClassConditioning, add_class_conditioning_args, class_conditioning, drop_labels
from .ema import HalfLifeEMA, MovingAverage, WarmupEMA, ema_beta, halflife_ema_std, rampup_ratio_for_std, warmup_ema_beta
from ..hub.push import push_folder_to_hub
from .in_training_eval import EvaluationConfig, EvaluationSampler, InTrainingEvaluation, add_evaluation_args
from .metrics_log import MetricsLogger, bucket_names, read_metrics
from .model_card import ModelCardInfo, write_model_card
from .score_model import load_score_pipeline
from .run_result import TrainingResult, print_summary
from .trainer import NonFiniteLossError, Trainer
from .unet import make_unet, unet_config
from .validation import grid_class_labels, image_grid, sample_grid, save_image_grid
