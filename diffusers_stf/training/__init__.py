"""Training plumbing shared by the scripts in ``examples/``: options, Accelerator set-up, in-memory image data,
EDM's EMA, resumable checkpoints, metrics files, sample grids, model cards, Hub upload, and :class:`Trainer`, the
loop that runs a script's loss function. See ``examples/train_stf.py`` for a script built on it.
"""

from .accelerator import check_world_size, derived_seed, make_accelerator, step_generator, tracker_name
from .args import (
    add_checkpoint_args,
    add_data_args,
    add_ema_args,
    add_hub_args,
    add_logging_args,
    add_optimization_args,
    add_training_args,
    add_unet_args,
    check_training_args,
    parse_training_args,
)
from .checkpoints import (
    check_fingerprint,
    list_checkpoints,
    load_checkpoint,
    model_fingerprint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from .data import BatchSchedule, EpochBatchSampler, ImageData, load_training_images, make_dataloader
from .ema import EMAModel, ema_beta
from .hub import push_folder_to_hub
from .metrics_log import MetricsLogger, bucket_names, read_metrics
from .model_card import ModelCardInfo, write_model_card
from .trainer import LossOutput, Trainer, TrainingResult, run_training
from .unet import count_parameters, make_unet, unet_config
from .validation import image_grid, sample_grid, save_image_grid
