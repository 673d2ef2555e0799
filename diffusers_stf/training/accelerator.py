"""Accelerator set-up, with the guard against silently duplicated training runs."""

from __future__ import annotations

import importlib.util
import os

import torch

from .data import derived_seed
from .checkpoints import prepare_output_dir
from .config import TrainingConfig

_TRUE = ("1", "true", "yes", "on")
TORCH_COMPILE_BACKEND = "inductor"  # of --torch_compile


def tracker_name(report_to: str):
    """The accelerate tracker for ``--report_to`` (``auto``: tensorboard when installed, else none)."""
    if report_to == "none":
        return None
    if report_to == "auto":
        return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else None
    if importlib.util.find_spec(report_to) is None:
        raise ValueError(f"--report_to {report_to} needs the {report_to!r} package, which is not installed "
                         f"(diffusers' --logger {report_to} is the same option)")
    return report_to


def check_world_size(num_processes: int, world_size_env=None):
    """Refuse to run when the launcher started several processes but Accelerate sees only one.

    That happens with ``accelerate launch --multi_gpu`` or ``torchrun`` on a machine without GPUs: every process then
    trains its own full copy of the model on all the data and they overwrite each other's outputs.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") if world_size_env is None else world_size_env)
    if world_size > 1 and num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but Accelerate sees a single process, so each of the {world_size} processes would "
            "train its own duplicate copy. On a machine without GPUs launch with "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...` (or pass --cpu)."
        )


def make_accelerator(config: TrainingConfig):
    """An ``accelerate.Accelerator`` for ``config`` (``cpu``, ``mixed_precision``, ``gradient_accumulation_steps``,
    ``report_to``, ``output_dir``, ``logging_dir``, ``torch_compile``), after checking the output folder (see
    :func:`~diffusers_stf.training.checkpoints.prepare_output_dir`) so that a refused run stops before any work.

    Raises when WORLD_SIZE > 1 but Accelerate sees one process (see :func:`check_world_size`), and prints the process
    count: ``accelerate launch --cpu --num_processes 2`` starts a single process (accelerate's simple launcher), which
    cannot be told apart from a one-process launch. Seeds Python, NumPy and torch with ``seed``.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    cpu = config.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE
    if config.mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        raise ValueError("--mixed_precision fp16 needs a GPU; use bf16 or no on the CPU")
    logging_dir = os.path.join(config.output_dir, config.logging_dir)
    tracker = tracker_name(config.report_to)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=tracker,
        **({"dynamo_backend": TORCH_COMPILE_BACKEND} if config.torch_compile else {}),
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=logging_dir),
    )
    check_world_size(accelerator.num_processes)
    prepare_output_dir(accelerator, config)
    accelerator.print(f"{accelerator.num_processes} training process{'es' if accelerator.num_processes > 1 else ''} "
                      f"on {accelerator.device.type}")
    if tracker is None and config.report_to == "auto":
        accelerator.print(f"--report_to auto: tensorboard is not installed, so no tracker logs this run; the metrics "
                          f"go to {os.path.join(logging_dir, 'metrics.csv')} (and .jsonl) only")
    set_seed(config.seed)  # the same model initialisation on every process
    return accelerator


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` (on the CPU) copied to ``device`` without making the host wait: on a GPU through pinned memory with
    ``non_blocking=True`` (a plain copy from pageable memory synchronises)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def step_generator(seed: int, step: int, process_index: int = 0, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` for micro-step ``step`` of process ``process_index``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derived_seed(seed, step, process_index))
    return generator
