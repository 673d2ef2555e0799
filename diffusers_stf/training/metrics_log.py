"""Training metrics: the loss overall and per noise-level bucket, written to plain JSONL and CSV files always, and to
a tracker (tensorboard) when one is configured.

Sums are accumulated on the device between writes, so a training step never waits for the host; the only
device-to-host copy is the one per written row.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Union

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
    """Accumulates losses (and other scalars) between writes, per σ bucket where given, and reduces them over
    processes.

    Args:
        accelerator: the run's ``Accelerator`` (its tracker, if any, also gets the rows); None for a single process.
        log_dir: folder of ``metrics.jsonl`` and ``metrics.csv`` (written by the main process).
        sigma_buckets: bucket edges.
    """

    def __init__(self, accelerator, log_dir: str, sigma_buckets: Sequence[float] = (0.02, 0.1, 0.5, 2.0, 10.0)):
        self.accelerator, self.log_dir = accelerator, log_dir
        self.edge_values = list(sigma_buckets)
        self.names = bucket_names(sigma_buckets)
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")
        self.csv_path = os.path.join(log_dir, "metrics.csv")
        self._csv_columns: Optional[List[str]] = None
        self._edges: Optional[torch.Tensor] = None
        self.reset()

    def reset(self):
        # name -> (2, m) tensor: sums in row 0, counts in row 1 (m = 1, or one column per σ bucket)
        self._totals: Dict[str, torch.Tensor] = {}

    def _add(self, name: str, sums: torch.Tensor, counts: torch.Tensor):
        pair = torch.stack([sums.double().reshape(-1), counts.double().reshape(-1)])
        self._totals[name] = self._totals[name] + pair if name in self._totals else pair

    def accumulate(self, loss: torch.Tensor, per_sample: Optional[torch.Tensor] = None,
                   sigma: Optional[torch.Tensor] = None, logs: Optional[Dict[str, Union[float, torch.Tensor]]] = None,
                   per_sample_logs: Optional[Dict[str, torch.Tensor]] = None):
        """Add one micro-batch: its scalar ``loss``; optionally per-sample losses and their σ (averaged per bucket),
        more per-sample values averaged per bucket in the same way (``per_sample_logs``), and scalars (``logs``,
        averaged over micro-batches)."""
        loss = loss.detach()
        one = torch.ones((), dtype=torch.float64, device=loss.device)
        self._add("loss", loss, one)
        if per_sample is not None and sigma is not None:
            sigma = sigma.detach().reshape(-1).double()
            if self._edges is None or self._edges.device != sigma.device:  # copied to the device once, not per step
                self._edges = torch.tensor(self.edge_values, dtype=torch.float64, device=sigma.device)
            edges = self._edges
            bucket = torch.bucketize(sigma, edges, right=True)
            k = len(self.names)
            # index_add_, not bincount: bincount on a GPU reads the largest index back to the host
            counts = torch.zeros(k, dtype=torch.float64, device=sigma.device).index_add_(0, bucket,
                                                                                          torch.ones_like(sigma))
            for name, values in {"loss": per_sample, **(per_sample_logs or {})}.items():
                values = values.detach().reshape(-1).double().to(sigma.device)
                sums = torch.zeros(k, dtype=torch.float64, device=sigma.device).index_add_(0, bucket, values)
                self._add(f"{name}_sigma", sums, counts)
        for name, value in (logs or {}).items():
            value = torch.as_tensor(value, device=loss.device).detach()
            self._add(name, value, torch.ones_like(value, dtype=torch.float64))

    def write(self, step: int, **fields) -> Dict[str, float]:
        """Reduce over processes, write a row (main process) and reset. Returns the row."""
        names = sorted(self._totals)
        row = {"step": int(step), **fields}
        if names:
            device = self._totals[names[0]].device
            flat = torch.cat([self._totals[n].to(device).reshape(-1) for n in names])
            if self.accelerator is not None and self.accelerator.num_processes > 1:
                flat = self.accelerator.reduce(flat.to(self.accelerator.device), reduction="sum")
            flat = flat.cpu()
            offset = 0
            for name in names:
                m = self._totals[name].shape[1]
                sums, counts = flat[offset:offset + m], flat[offset + m:offset + 2 * m]
                offset += 2 * m
                means = [float(s / c) if c > 0 else math.nan for s, c in zip(sums, counts)]
                if name.endswith("_sigma"):
                    for bucket, mean in zip(self.names, means):
                        row[f"{name}_{bucket}"] = mean
                else:
                    row[name] = means[0]
        self.reset()
        if self.accelerator is None or self.accelerator.is_main_process:
            self._write_files(row)
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"},
                                 step=int(step))
        return row

    def truncate(self, step: int):
        """Drop the rows after ``step`` from both files, and from the scripts' other ``*.jsonl`` logs in the same
        folder (e.g. ``validation.jsonl``), on the main process: a resumed run continues the logs of the checkpoint it
        resumed, without the rows of the lost steps."""
        if self.accelerator is not None and not self.accelerator.is_main_process:
            return
        logs = [os.path.join(self.log_dir, f) for f in os.listdir(self.log_dir) if f.endswith(".jsonl")] \
            if os.path.isdir(self.log_dir) else []
        for path in logs:
            with open(path) as f:
                lines = [line for line in f if line.strip()]
            kept = [line for line in lines if _row_step(line) is not None and _row_step(line) <= step]
            if len(kept) != len(lines):
                _atomic_write(path, "".join(kept))
        if os.path.isfile(self.csv_path):
            with open(self.csv_path, newline="") as f:
                rows = list(csv.reader(f))
            if rows:
                header = rows[0]
                body = [r for r in rows[1:] if len(r) == len(header) and _csv_step(r) is not None
                        and _csv_step(r) <= step]
                with open(self.csv_path + ".tmp", "w", newline="") as f:
                    csv.writer(f).writerows([header, *body])
                os.replace(self.csv_path + ".tmp", self.csv_path)

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


def _row_step(line: str) -> Optional[int]:
    """The step of a JSON-lines row; None for a line cut short by a crash."""
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, TypeError, AttributeError):
        return None


def _csv_step(row: List[str]) -> Optional[int]:
    try:
        return int(float(row[0]))
    except (ValueError, IndexError):
        return None


def _atomic_write(path: str, text: str):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def read_metrics(log_dir: str) -> List[Dict]:
    """The rows of ``metrics.jsonl`` in ``log_dir``."""
    path = os.path.join(log_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
