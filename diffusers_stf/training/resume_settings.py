"""What a checkpoint must match to be resumed: the run's fingerprint, the comparison that refuses a resume with other
settings (or warns, for what changes only the last bits), and the settings a resume with ``allow_changed_settings``
applies.

The fingerprint has four parts: ``model`` (class and config: never resumed across), ``settings`` (the trainer's
options that change the maths, the data with a fingerprint of its files), ``script`` (the script's loss settings),
and ``environment`` (the thread count: a resume at another count is not bit-identical, so it is said, not refused).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .checkpoints import fingerprint_differences, jsonable, model_fingerprint

LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup", "inverse_sqrt")  # the same whatever the run's length


def run_fingerprint(config, model, optimizer_settings: Dict, warmup: int, data, num_processes: int,
                    accumulation: int, global_batch: int, max_steps: int, global_draws: bool,
                    script: Optional[Dict] = None) -> Dict:
    """The fingerprint of a run of ``config`` training ``model`` on ``data`` (see the module docstring)."""
    settings = {
        "learning_rate": config.learning_rate, "lr_scheduler": config.lr_scheduler, "lr_warmup_steps": warmup,
        "optimizer": optimizer_settings, "max_grad_norm": config.max_grad_norm,
        **({"ema_rule": "diffusers warm-up", "ema_inv_gamma": config.ema_inv_gamma, "ema_power": config.ema_power,
            "ema_max_decay": config.ema_max_decay} if config.use_ema else
           {"ema_halflife_kimg": config.ema_halflife_kimg, "ema_rampup_ratio": config.ema_rampup_ratio}),
        "train_batch_size": config.train_batch_size, "gradient_accumulation_steps": accumulation,
        "num_processes": num_processes, "global_batch_size": global_batch, "seed": config.seed,
        "mixed_precision": config.mixed_precision, "data": data.source, "num_images": len(data),
        "resolution": data.resolution, "channels": data.channels, "center_crop": data.center_crop,
        "random_flip": data.random_flip,
    }
    if config.ema_stds:  # the power-function EMAs and where their snapshots fall
        settings.update(ema_stds=list(config.ema_stds), ema_snapshot_steps=config.ema_snapshot_steps,
                        ema_snapshot_kimg=config.ema_snapshot_kimg)
    if data.content:  # the files of a local folder: replaced images with the same count are another data set
        settings["data_files"] = data.content
    if global_draws and num_processes > 1:  # one process draws the same either way
        settings["global_draws"] = True
    if config.lr_scheduler not in LENGTH_FREE_SCHEDULES:  # the schedule's shape depends on the run's length
        settings["max_train_steps"] = max_steps
    if config.lr_scheduler == "inverse_sqrt":
        settings["lr_ref_steps"] = config.lr_ref_steps
    return jsonable({"model": model_fingerprint(model), "settings": settings, "script": dict(script or {}),
                     "environment": {"torch_threads": torch.get_num_threads()}})


def check_resume_settings(state: Dict, current: Dict, path: str, allow_changed: bool,
                          say: Callable[[str], None] = print) -> bool:
    """Compare the fingerprint of the checkpoint state ``state`` (of the checkpoint at ``path``) with ``current``.
    Another model is always refused; other settings only with ``allow_changed`` (then printed); another thread count
    is printed. Returns whether the resume is exact."""
    saved = state.get("fingerprint", {})
    if "settings" not in saved:  # a checkpoint of the flat fingerprint layout
        saved = {"model": {k: saved[k] for k in ("model_class", "model_config") if k in saved},
                 "settings": {}, "script": saved.get("script", {})}
    model_diffs = fingerprint_differences(saved.get("model", {}), current["model"], "model.")
    apart = ("model", "environment")
    other = fingerprint_differences({k: v for k, v in saved.items() if k not in apart},
                                    {k: v for k, v in current.items() if k not in apart})
    threads, now = saved.get("environment", {}).get("torch_threads"), current["environment"]["torch_threads"]
    if threads is not None and threads != now:
        say(f"WARNING: {path} was written with {threads} thread{'s' if threads > 1 else ''} (torch.get_num_threads()), "
            f"now {now}: a resume is bit-identical only at the same thread count, so from here on the float results "
            f"may differ in the last bits (OMP_NUM_THREADS={threads} gives the exact resume).")
    if model_diffs or (other and not allow_changed):
        hint = "" if model_diffs else (" Pass --allow_changed_settings to resume with the new values (a different "
                                       "run from here on).")
        raise ValueError(
            f"checkpoint {path!r} was written by a run with another configuration and cannot be resumed here:\n  "
            + "\n  ".join(model_diffs + other)
            + f"\nUse the options of that run, or a fresh --output_dir.{hint}"
        )
    if other:
        say("WARNING: resuming with changed settings (--allow_changed_settings); from step "
            f"{state.get('step')} on this run differs from the one that wrote {path}:\n  " + "\n  ".join(other))
    return not other


def apply_changed_settings(optimizer: torch.optim.Optimizer, lr_scheduler, optimizer_settings: Dict,
                           learning_rate: float):
    """After a resume with ``allow_changed_settings``: the optimizer and the lr schedule take this run's values
    (the checkpoint restored its own into them)."""
    settings = {k: v for k, v in optimizer_settings.items() if k != "class"}
    for group in optimizer.param_groups:
        group.update({k: v for k, v in settings.items() if k in group and k != "lr"})
        group["initial_lr"] = learning_rate
    lr_scheduler.base_lrs = [learning_rate for _ in optimizer.param_groups]  # diffusers' LambdaLRs: base_lr · λ(step)
    for group, base, lr_lambda in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
        group["lr"] = base * lr_lambda(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
