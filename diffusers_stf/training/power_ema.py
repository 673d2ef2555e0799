"""``--ema_stds``: EDM2's power-function EMAs of the weights (Karras et al. 2024, Eq. 3, Algorithm 2), tracked beside
the run's own EMA, and their snapshots for post-hoc reconstruction (``python -m diffusers_stf.phema OUTPUT_DIR``).

After every optimizer step each average takes θ̂ ← β θ̂ + (1 − β) θ, β = (1 − B/t)^(γ+1), with t the images seen
after the step and B the global batch (:class:`~diffusers_stf.phema.PowerFunctionEMA`). Every
``--ema_snapshot_steps`` steps (or ``--ema_snapshot_kimg`` thousand images) and at the last step, the averages are
written to ``output_dir/phema_snapshots/phema-<step>-<σ_rel>.safetensors`` (:func:`~diffusers_stf.phema.
save_snapshots`: float16, the training time in images and σ_rel in the metadata), before any checkpoint of that step.

Checkpoints hold the averages (``power_ema.safetensors``, float32, bit-exact). A resume from the checkpoint of step S
removes the run's snapshots of later steps (written by the segment that was killed; the resumed run writes them again,
identically), so the snapshot folder always holds the snapshots of one uninterrupted run.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional, Sequence

from torch import nn

from ..phema import SNAPSHOT_DIR, SNAPSHOT_RE, PowerFunctionEMA, save_snapshots

FILE = "power_ema.safetensors"
PARTIAL_RE = re.compile(r"^phema-\d+-\d+\.\d+\.safetensors\.tmp-\d+$")  # a snapshot write that was killed


def snapshot_interval(snapshot_steps: int, snapshot_kimg: float, global_batch: int) -> int:
    """Steps between snapshots: ``snapshot_steps``, else ``snapshot_kimg`` thousand images in whole steps (at least
    one); 0 when neither is given (a snapshot at the last step only)."""
    if snapshot_steps:
        return snapshot_steps
    if snapshot_kimg:
        return max(1, round(snapshot_kimg * 1000 / global_batch))
    return 0


def power_ema_tracking(config, model: nn.Module, global_batch: int, max_steps: int, run_folder,
                       accelerator) -> Optional["PowerEMATracking"]:
    """The run's :class:`PowerEMATracking` of ``config.ema_stds`` on the accelerator's device (said at the start),
    or None without ``--ema_stds``."""
    if not config.ema_stds:
        return None
    interval = snapshot_interval(config.ema_snapshot_steps, config.ema_snapshot_kimg, global_batch)
    tracking = PowerEMATracking(model, config.ema_stds, config.output_dir, interval, max_steps, run_folder,
                                accelerator.is_main_process).to(accelerator.device)
    accelerator.print(f"EMA: {tracking.rule}")
    return tracking


class PowerEMATracking:
    """The power-function EMAs of ``model`` with σ_rel ``stds`` and their snapshot files (see the module docstring).

    Args:
        model: the trained network (unwrapped); its parameters are averaged, its buffers copied into snapshots.
        stds: the tracked σ_rel.
        output_dir: the run's folder; snapshots go to ``output_dir/phema_snapshots``.
        interval: steps between snapshots (0: the last step only).
        max_steps: the run's length (the last snapshot).
        run_folder: the run's :class:`~diffusers_stf.training.run_folder.RunFolder`, which records the snapshot folder
            as the run's own.
        main: whether this process writes files.
    """

    def __init__(self, model: nn.Module, stds: Sequence[float], output_dir: str, interval: int, max_steps: int,
                 run_folder, main: bool = True):
        self.ema = PowerFunctionEMA(model, stds)
        self.folder = os.path.join(output_dir, SNAPSHOT_DIR)
        self.interval, self.max_steps, self.run_folder, self.main = interval, max_steps, run_folder, main
        if main:
            self.run_folder.claim(self.folder, "the snapshot folder of --ema_stds")

    @property
    def rule(self) -> str:
        stds = ", ".join(f"{s:g}" for s in self.ema.stds)
        every = f"every {self.interval} steps and " if self.interval else ""
        return f"power-function EMAs σ_rel = {stds} (--ema_stds), snapshots {every}at the last step in {self.folder}"

    def to(self, device) -> "PowerEMATracking":
        self.ema.to(device)
        return self

    def update(self, step: int, nimg: int, batch_images: int) -> List[str]:
        """Blend the weights in after optimizer step ``step`` (1-based), which brought the images seen to ``nimg``;
        write the snapshots when they are due. Returns the paths written."""
        self.ema.update(nimg, batch_images)
        due = step == self.max_steps or (self.interval and step % self.interval == 0)
        if not (due and self.main):
            return []
        return save_snapshots(self.folder, self.ema, step, nimg)

    def forget_after(self, step: int) -> List[str]:
        """Remove this run's snapshots of steps after ``step`` and interrupted snapshot writes (main process); returns
        the removed paths."""
        if not (self.main and os.path.isdir(self.folder) and self.run_folder.owns(self.folder)):
            return []
        removed = []
        for name in sorted(os.listdir(self.folder)):
            match = SNAPSHOT_RE.match(name)
            if (match and int(match.group(1)) > step) or PARTIAL_RE.match(name):
                path = os.path.join(self.folder, name)
                os.remove(path)
                removed.append(path)
        return removed

    # -- a checkpoint part (see checkpoints.save_checkpoint) ---------------------------------------------------------
    def save(self, folder: str):
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in self.ema.state_dict().items()},
                  os.path.join(folder, FILE))

    def load(self, folder: str):
        from safetensors.torch import load_file

        path = os.path.join(folder, FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: the checkpoint was written without --ema_stds, so the power-function "
                             "EMAs cannot continue from it (they average every step since the start)")
        try:
            self.ema.load_state_dict(load_file(path))
        except ValueError as err:
            raise ValueError(f"--ema_stds {','.join(f'{s:g}' for s in self.ema.stds)}: {err} (in {path}); resume "
                             "with the run's own --ema_stds") from err
