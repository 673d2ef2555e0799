"""What a finished run reports: :class:`TrainingResult` (where the run put things), the end-of-run summary, and the
result's entry in the run's finished record (:mod:`~diffusers_stf.training.finished_run`), paths relative to the
output folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional


@dataclass
class TrainingResult:
    """Where a finished run put things."""

    output_dir: str
    step: int
    nimg: int
    wall_time: float
    samples_path: Optional[str] = None
    model_card_path: Optional[str] = None
    metrics_path: Optional[str] = None
    pushed_to: Optional[str] = None
    saved_class: Optional[str] = None
    ema: bool = True  # whether the saved weights are a moving average of the trained ones
    eval_seconds: float = 0.0  # time of the metrics during training, not counted in wall_time


def record_of_result(result: TrainingResult) -> Dict:
    """The finished record's fields of ``result`` (paths relative to its output folder)."""
    relative = lambda path: os.path.relpath(path, result.output_dir) if path else None  # noqa: E731
    return {"step": result.step, "nimg": result.nimg, "wall_time": round(result.wall_time, 3),
            "samples_path": relative(result.samples_path), "model_card_path": relative(result.model_card_path),
            "metrics_path": relative(result.metrics_path), "saved_class": result.saved_class, "ema": result.ema,
            "eval_seconds": round(result.eval_seconds, 3)}


def result_of_record(output_dir: str, record: Dict) -> TrainingResult:
    """The :class:`TrainingResult` of the finished record of the run in ``output_dir``."""
    absolute = lambda path: os.path.join(output_dir, path) if path else None  # noqa: E731
    return TrainingResult(output_dir, record["step"], record.get("nimg", 0), record.get("wall_time", 0.0),
                          samples_path=absolute(record.get("samples_path")),
                          model_card_path=absolute(record.get("model_card_path")),
                          metrics_path=absolute(record.get("metrics_path")),
                          saved_class=record.get("saved_class"), ema=record.get("ema", True),
                          eval_seconds=record.get("eval_seconds", 0.0))


def print_summary(result: TrainingResult):
    """The end-of-run summary: steps, images, time, and where everything went."""
    lines = [f"\nTrained {result.step} steps ({result.nimg} images) in {result.wall_time / 60:.1f} min."]
    if result.eval_seconds:
        took = f"{result.eval_seconds:.1f} s" if result.eval_seconds < 60 else f"{result.eval_seconds / 60:.1f} min"
        lines[0] += f" Metrics during training: {took} more (not counted above)."
    if result.samples_path:
        label = "Samples (EMA weights):" if result.ema else "Samples:"
        lines.append(f"{label:<23}{os.path.abspath(result.samples_path)}")
    if result.model_card_path:
        lines.append(f"Model card:            {os.path.abspath(result.model_card_path)}")
    lines.append(f"Saved folder:          {os.path.abspath(result.output_dir)}  ({result.saved_class}.from_pretrained)")
    if result.metrics_path:
        lines.append(f"Metrics:               {os.path.abspath(result.metrics_path)}")
    if result.pushed_to:
        lines.append(f"Hub repo:              https://huggingface.co/{result.pushed_to}  (uploaded last)")
    print("\n".join(lines))
