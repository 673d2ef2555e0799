"""Accelerator set-up, with the guard against silently duplicated training runs."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

_TRUE = ("1", "true", "yes", "on")


def tracker_name(report_to: str):
    """The accelerate tracker for ``--report_to`` (``auto``: tensorboard when installed, else none)."""
    if report_to == "none":
        return None
    if report_to == "auto":
        return "tensorboard" if importlib.util.find_spec("tensorboard") is not None else None
    if importlib.util.find_spec(report_to) is None:
        raise ValueError(f"--report_to {report_to} needs the {report_to!r} package, which is not installed")
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


def make_accelerator(args):
    """An ``accelerate.Accelerator`` from the shared options.

    Uses ``--cpu``, ``--mixed_precision``, ``--gradient_accumulation_steps``, ``--report_to``, ``--output_dir`` and
    ``--logging_dir``; raises when WORLD_SIZE > 1 but Accelerate sees one process (see :func:`check_world_size`).
    Seeds Python, NumPy and torch with ``--seed``.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = bool(getattr(args, "cpu", False)) or os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE
    if args.mixed_precision == "fp16" and (cpu or not torch.cuda.is_available()):
        raise ValueError("--mixed_precision fp16 needs a GPU; use bf16 or no on the CPU")
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=tracker_name(getattr(args, "report_to", "none")),
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
    )
    check_world_size(accelerator.num_processes)
    from accelerate.utils import set_seed

    set_seed(args.seed)  # the same model initialisation on every process
    return accelerator


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the integer ``keys`` (e.g. seed, step, process index).

    Per-step generators seeded this way make a resumed run draw exactly the noise of an uninterrupted one.
    """
    high, low = (int(v) for v in np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32))
    return ((high << 32) | low) & ((1 << 63) - 1)


def step_generator(seed: int, step: int, process_index: int = 0, device="cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` for micro-step ``step`` of process ``process_index``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derived_seed(seed, step, process_index))
    return generator
