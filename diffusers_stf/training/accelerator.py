"""Accelerator set-up, with the guard against silently duplicated training runs, and the launcher a worker watches."""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from .data import derived_seed
from .run_folder import open_run_folder
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
    ``report_to``, ``output_dir``, ``logging_dir``, ``torch_compile``), after opening the output folder (see
    :func:`~diffusers_stf.training.run_folder.open_run_folder`: writable, not in use by another training, not holding
    another run) so that a refused run stops before any work; ``accelerator.logging_dir`` is the run's own logging
    folder.

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
    accelerator.project_configuration.logging_dir = logging_dir = open_run_folder(accelerator, config).log_dir
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


LAUNCHER_MODULES = ("accelerate.commands.launch", "torch.distributed.run", "torch.distributed.launch")


def launcher_pid(environ=None) -> Optional[int]:
    """The PID of the launcher that started this process, or None when it was not started by one.

    A launcher is the parent of a worker started by torch's elastic agent (``torchrun``, ``accelerate launch
    --multi_gpu``: ``TORCHELASTIC_RUN_ID`` is set) or a parent whose command line is ``accelerate launch``,
    ``torchrun`` or ``python -m`` one of :data:`LAUNCHER_MODULES`. A process started from a shell has no launcher:
    it may outlive its shell (``nohup``)."""
    environ = os.environ if environ is None else environ
    parent = os.getppid()
    if environ.get("TORCHELASTIC_RUN_ID"):
        return parent
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    names = [os.path.basename(a) for a in argv]
    if any(a in LAUNCHER_MODULES for a in argv) or "torchrun" in names[:2] or \
            ("accelerate" in names[:2] and "launch" in argv[:3]):
        return parent
    return None


class LauncherExited(RuntimeError):
    """The launcher of this worker process has exited (killed), so the worker stops."""


def check_launcher(launcher: Optional[int], step: int):
    """Raise :class:`LauncherExited` when this process was started by the launcher ``launcher`` (see
    :func:`launcher_pid`) and its parent has changed since: the launcher has died, and an orphaned worker would train
    and write on alone. One system call; the training loop calls it at every step."""
    if launcher is not None and os.getppid() != launcher:
        message = (f"the launcher of this training process (PID {launcher}) has exited, so this worker (PID "
                   f"{os.getpid()}) stops after step {step} instead of training on alone. Checkpoints written so far "
                   "are intact: continue with --resume_from_checkpoint latest. To stop a run, see docs/training.md, "
                   "'Stopping a run'.")
        print(message, flush=True)  # on stdout too: a launcher that relayed stderr took that pipe with it
        raise LauncherExited(message)
