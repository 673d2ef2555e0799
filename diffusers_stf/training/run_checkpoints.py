"""The trainer's checkpoint state: what a checkpoint holds besides accelerate's model, optimizer and RNG states (the
step, images seen, wall time, lr schedule, run id and fingerprint, the EMA), writing it, the decision to write one by
wall time, and resuming from one (see :mod:`~diffusers_stf.training.checkpoints` for the files and their checks).

:class:`RunCheckpoints` is a part of :class:`~diffusers_stf.training.Trainer`, which provides ``accelerator``,
``config``, ``output_dir``, ``run_folder``, ``fingerprint``, ``optimizer``, ``optimizer_settings``, ``lr_scheduler``,
``ema``, ``power_ema`` (None without ``--ema_stds``), ``trained_modules``, ``max_steps`` and the counters ``step``,
``nimg``, ``wall_offset``, ``run_id`` and ``last_checkpoint``.
"""

from __future__ import annotations

import time
from typing import Dict, List

import torch

from .checkpoints import load_checkpoint, read_state, resolve_checkpoint, save_checkpoint
from .metrics_log import MetricsLogger
from .resume_settings import apply_changed_settings, check_resume_settings


class RunCheckpoints:
    """Writing, timing and resuming the checkpoints of a :class:`~diffusers_stf.training.Trainer`."""

    def checkpoint_parts(self) -> List:
        """What a checkpoint holds besides accelerate's states and the EMA: the power-function EMAs and the modules
        trained with the network, when the run has them."""
        return [part for part in (self.power_ema, self.trained_modules) if part]

    def trainer_state(self, wall_time: float, reason: str = "steps") -> Dict:
        """The ``trainer_state.json`` of a checkpoint written now (``reason``: steps, time or final)."""
        return {"step": self.step, "reason": reason, "nimg": self.nimg, "epoch": self.step // self.steps_per_epoch,
                "wall_time": round(wall_time, 3), "lr_scheduler": self.lr_scheduler.state_dict(),
                "num_processes": self.accelerator.num_processes, "run_id": self.run_id,
                "fingerprint": self.fingerprint}

    def check_settings(self, path: str) -> bool:
        """Compare the checkpoint's fingerprint with this run's (see :func:`check_resume_settings`); returns whether
        the resume is exact."""
        return check_resume_settings(read_state(path), self.fingerprint, path, self.config.allow_changed_settings,
                                     self.accelerator.print)

    def resume(self, metrics: MetricsLogger):
        """Continue the run in ``output_dir`` (``resume_from_checkpoint``) or start a new one there."""
        config, acc, folder = self.config, self.accelerator, self.run_folder
        self.run_id = folder.run_id
        latest = config.resume_from_checkpoint == "latest"
        path = resolve_checkpoint(self.output_dir, config.resume_from_checkpoint,
                                  run_id=folder.run_id if folder.from_disk and latest else None, warn=acc.print)
        if path is not None and int(read_state(path).get("step", 0)) > self.max_steps:
            length = (f"--max_train_steps {config.max_train_steps}" if config.max_train_steps else
                      f"the run's length ({self.max_steps} steps from --num_epochs)")
            raise ValueError(f"{length} is smaller than step {read_state(path).get('step')} of checkpoint {path!r}: "
                             "that run already trained further. Give a length of at least that step to continue it, "
                             "or --overwrite_output_dir to start a new run.")
        if path is None:
            if latest:
                acc.print(f"No checkpoint in {self.output_dir}; starting a new run.")
            self.forget_snapshots_after(0)
            acc.wait_for_everyone()
            metrics.truncate(0)
            return
        exact = self.check_settings(path)
        state = load_checkpoint(acc, path, self.ema, exact=exact, parts=self.checkpoint_parts())
        self.step, self.nimg = int(state["step"]), int(state["nimg"])
        self.wall_offset = float(state.get("wall_time", 0.0))
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if not exact:
            apply_changed_settings(self.optimizer, self.lr_scheduler, self.optimizer_settings, config.learning_rate)
        metrics.truncate(self.step)
        self.forget_snapshots_after(self.step)
        acc.print(f"Resumed from {path} at step {self.step}.")

    def forget_snapshots_after(self, step: int):
        """Remove the power-function EMA snapshots a killed segment wrote after ``step`` (they are written again)."""
        if self.power_ema is not None:
            removed = self.power_ema.forget_after(step)
            if removed:
                self.accelerator.print(f"Removed {len(removed)} EMA snapshot file(s) of steps after {step}, written "
                                       "before the run stopped; they are written again as training reaches them.")

    def save_checkpoint(self, wall_time: float, reason: str) -> str:
        path = save_checkpoint(self.accelerator, self.output_dir, self.step, self.ema,
                               self.trainer_state(wall_time, reason), self.config.checkpoints_total_limit,
                               run_id=self.run_id, parts=self.checkpoint_parts())
        self.last_checkpoint = time.monotonic()
        return path

    def checkpoint_due_by_time(self) -> bool:
        """Whether ``checkpointing_minutes`` have passed since the last checkpoint (or the start of this segment), by
        the main process's clock, so that every process takes the same decision (called at logging steps, which
        wait for the device anyway)."""
        minutes, acc = self.config.checkpointing_minutes, self.accelerator
        if not minutes:
            return False
        due = time.monotonic() - self.last_checkpoint >= 60 * minutes
        if acc.num_processes > 1:
            from accelerate.utils import broadcast

            due = bool(broadcast(torch.tensor(due, device=acc.device), from_process=0))
        return due
