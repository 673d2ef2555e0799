"""Training metrics: the loss overall and per noise-level bucket, written to plain JSONL and CSV files always, and to
a tracker (tensorboard) when one is configured."""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, List, Optional, Sequence

import torch


def bucket_names(edges: Sequence[float]) -> List[str]:
    """Names of the σ buckets cut at ``edges``: ``<e0``, ``e0-e1``, …, ``>=eK``."""
    edges = list(edges)
    if not edges:
        return ["all"]
    names = [f"<{edges[0]:g}"]
    names += [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])]
    names.append(f">={edges[-1]:g}")
    return names


class MetricsLogger:
    """Accumulates per-sample losses by σ bucket between writes and reduces them over processes.

    Args:
        accelerator: the run's ``Accelerator`` (its tracker, if any, also gets the rows).
        log_dir: folder of ``metrics.jsonl`` and ``metrics.csv`` (written by the main process).
        sigma_buckets: bucket edges.
    """

    def __init__(self, accelerator, log_dir: str, sigma_buckets: Sequence[float] = (0.02, 0.1, 0.5, 2.0, 10.0)):
        self.accelerator, self.log_dir = accelerator, log_dir
        self.edges = torch.tensor(list(sigma_buckets), dtype=torch.float64)
        self.names = bucket_names(sigma_buckets)
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")
        self.csv_path = os.path.join(log_dir, "metrics.csv")
        self._csv_columns: Optional[List[str]] = None
        self._extra: Dict[str, List[float]] = {}
        self.reset()

    def reset(self):
        k = len(self.names)
        # [loss sum, loss count, bucket sums..., bucket counts...]
        self._sums = torch.zeros(2 + 2 * k, dtype=torch.float64)
        self._extra = {}

    def accumulate(self, loss: torch.Tensor, per_sample: Optional[torch.Tensor] = None,
                   sigma: Optional[torch.Tensor] = None, logs: Optional[Dict[str, float]] = None):
        """Add one micro-batch: its scalar ``loss``, optionally per-sample losses and their σ, and extra scalars."""
        k = len(self.names)
        self._sums[0] += float(loss.detach())
        self._sums[1] += 1
        if per_sample is not None and sigma is not None:
            values = per_sample.detach().reshape(-1).double().cpu()
            bucket = torch.bucketize(sigma.detach().reshape(-1).double().cpu(), self.edges, right=True)
            self._sums[2:2 + k] += torch.zeros(k, dtype=torch.float64).index_add_(0, bucket, values)
            self._sums[2 + k:] += torch.bincount(bucket, minlength=k).double()
        for name, value in (logs or {}).items():
            self._extra.setdefault(name, []).append(float(value))

    def write(self, step: int, **fields) -> Dict[str, float]:
        """Reduce over processes, write a row (main process) and reset. Returns the row."""
        k = len(self.names)
        extra_names = sorted(self._extra)
        local = torch.cat([self._sums, torch.tensor([sum(self._extra[n]) / len(self._extra[n]) for n in extra_names],
                                                    dtype=torch.float64)])
        total = local
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(local.to(self.accelerator.device), reduction="sum").cpu()
        procs = self.accelerator.num_processes if self.accelerator is not None else 1
        row = {"step": int(step), **fields}
        row["loss"] = float(total[0] / total[1]) if total[1] > 0 else math.nan
        for i, name in enumerate(self.names):
            count = total[2 + k + i]
            row[f"loss_sigma_{name}"] = float(total[2 + i] / count) if count > 0 else math.nan
        for i, name in enumerate(extra_names):
            row[name] = float(total[2 + 2 * k + i]) / procs
        self.reset()
        if self.accelerator is None or self.accelerator.is_main_process:
            self._write_files(row)
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                                 step=int(step))
        return row

    def _write_files(self, row: Dict):
        os.makedirs(self.log_dir, exist_ok=True)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}) + "\n")
        new_file = not os.path.isfile(self.csv_path)
        if self._csv_columns is None:
            if new_file:
                self._csv_columns = list(row)
            else:
                with open(self.csv_path) as f:
                    self._csv_columns = next(csv.reader(f), list(row))
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._csv_columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def read_metrics(log_dir: str) -> List[Dict]:
    """The rows of ``metrics.jsonl`` in ``log_dir``."""
    path = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
