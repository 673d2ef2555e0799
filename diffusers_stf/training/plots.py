"""Pictures of a training run: the loss curves (``logs/loss.png``), captioned sample grids, and the grid sent to the
run's tracker (tensorboard or wandb, through accelerate).

Everything here runs on the main process at validation time, outside the training step.
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..evaluation.images import image_grid, save_png

SIGMA_LOSS_PREFIX = "loss_sigma_"


def save_figure(fig, path: str) -> str:
    """Save a matplotlib figure as a PNG under a temporary name, then rename it to ``path`` (a killed write leaves no
    truncated plot behind), and close it; returns ``path``."""
    import matplotlib.pyplot as plt

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def sampler_caption(step: int, pipeline=None, num_inference_steps: Optional[int] = None) -> str:
    """``"step 500 · EDMHeunScheduler, 18 steps"``: what a validation grid shows."""
    parts = [f"step {int(step)}"]
    sampler = type(pipeline.scheduler).__name__ if pipeline is not None and hasattr(pipeline, "scheduler") else None
    if sampler:
        parts.append(sampler + (f", {num_inference_steps} steps" if num_inference_steps else ""))
    return " · ".join(parts)


def captioned(image, caption: str, margin: int = 4):
    """``image`` (a PIL image of mode ``L`` or ``RGB``) with a white band above it holding ``caption`` in black.

    An image narrower than the caption is centred on a white canvas as wide as the caption."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), caption, font=font)
    band = (bottom - top) + 2 * margin
    width = max(image.width, right + 2 * margin)
    white = 255 if image.mode == "L" else (255, 255, 255)
    black = 0 if image.mode == "L" else (0, 0, 0)
    out = Image.new(image.mode, (width, image.height + band), white)
    out.paste(image, ((width - image.width) // 2, band))
    ImageDraw.Draw(out).text((margin, margin - top), caption, fill=black, font=font)
    return out


def save_captioned_grid(images, path: str, caption: Optional[str] = None, min_cell: int = 64,
                        value_range=(0.0, 1.0)) -> str:
    """The package's grid (:func:`~diffusers_stf.evaluation.images.image_grid`, each image upscaled to at least
    ``min_cell`` pixels) of ``images`` (N, C, H, W), with ``caption`` above it, saved as a PNG at ``path``."""
    grid = image_grid(images, min_cell=min_cell, value_range=value_range)
    return save_png(captioned(grid, caption) if caption else grid, path)


def log_image(accelerator, tag: str, image, step: int, caption: Optional[str] = None):
    """Send the PIL ``image`` to every tracker of ``accelerator`` that takes images (accelerate's ``log_images``):
    tensorboard gets it as an HWC uint8 array, wandb as a ``wandb.Image`` with ``caption``, any other tracker as a
    list holding one HWC uint8 array."""
    if accelerator is None or not accelerator.is_main_process:
        return
    array = np.asarray(image.convert("RGB"))
    for tracker in accelerator.trackers:
        if not hasattr(tracker, "log_images"):
            continue
        if tracker.name == "tensorboard":
            tracker.log_images({tag: array[None]}, step=int(step), dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=caption)]}, step=int(step))
        else:
            tracker.log_images({tag: [array]}, step=int(step))


def sigma_columns(rows: Sequence[Dict]) -> List[str]:
    """The per-σ-band loss columns of the metrics rows, in the order they were logged."""
    columns: List[str] = []
    for row in rows:
        columns += [k for k in row if k.startswith(SIGMA_LOSS_PREFIX) and k not in columns]
    return columns


def plot_loss_curves(rows: Sequence[Dict], path: str, title: Optional[str] = None) -> Optional[str]:
    """Write ``path`` (PNG): the training loss against the optimizer step, and the loss of each σ band against the
    step (log scale where every value is positive). Rows are those of ``logs/metrics.jsonl`` (``step``, ``loss``,
    ``loss_sigma_<band>``); NaN/None (a band without samples) leaves a gap. Returns ``path``, or None without rows.
    """
    rows = [r for r in rows if "step" in r and "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def values(name):
        out = []
        for r in rows:
            v = r.get(name)
            out.append(math.nan if v is None or v == "" else float(v))
        return np.asarray(out, dtype=np.float64)

    steps = np.asarray([int(r["step"]) for r in rows])
    bands = sigma_columns(rows)
    fig, axes = plt.subplots(1, 2 if bands else 1, figsize=(11 if bands else 6, 4), squeeze=False)
    ax = axes[0, 0]
    loss = values("loss")
    ax.plot(steps, loss, marker="." if len(steps) < 30 else None, color="black")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("loss")
    if np.all(loss[np.isfinite(loss)] > 0) and np.isfinite(loss).any():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if bands:
        ax = axes[0, 1]
        positive = True
        for name in bands:
            v = values(name)
            positive &= bool(np.all(v[np.isfinite(v)] > 0))
            ax.plot(steps, v, marker="." if len(steps) < 30 else None, label="σ " + name[len(SIGMA_LOSS_PREFIX):])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title("loss per σ band")
        if positive:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def record_validation(accelerator, grid_path: Optional[str], step: int, log_dir: str,
                      caption: Optional[str] = None) -> Optional[str]:
    """What each validation leaves besides its grid, on the main process: the grid (a PNG at ``grid_path``, if any)
    sent to the run's trackers as ``samples``, and ``log_dir/loss.png`` redrawn from ``log_dir/metrics.jsonl``.
    Returns the path of ``loss.png`` (None before the first metrics row)."""
    if accelerator is not None and not accelerator.is_main_process:
        return None
    if grid_path and grid_path.lower().endswith(".png") and os.path.isfile(grid_path) and accelerator is not None \
            and accelerator.trackers:
        from PIL import Image

        with Image.open(grid_path) as grid:
            log_image(accelerator, "samples", grid.copy(), step, caption)
    from .metrics_log import read_metrics

    return plot_loss_curves(read_metrics(log_dir), os.path.join(log_dir, "loss.png"))
