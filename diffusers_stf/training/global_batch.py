"""Random draws for the global batch, so that the number of processes does not change the maths.

With N processes of B images each, one optimizer step of a one-process run at batch N·B draws σ and the noise for
N·B images from one generator. To repeat that step exactly, every process gets the same step generator, draws for the
whole global batch and keeps its own rows, process p the rows [p·B, (p+1)·B) — the rows of the global batch it holds
(see :class:`~diffusers_stf.training.data.BatchSchedule`). The gradients DDP averages are then those of the
one-process step up to the order of the float reductions.

Drawing N·B values where B are used costs little next to the network: a draw of σ is N·B numbers, a draw of the noise
N·B·C·H·W, against a forward and backward pass of the UNet on B images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


@dataclass(frozen=True)
class BatchShare:
    """This process's rows ``[start, start + size)`` of a global batch of ``total`` images.

    Args:
        start: the first row of this process.
        size: rows of this process (its ``train_batch_size``).
        total: rows of the global batch (``train_batch_size`` × processes).
    """

    start: int
    size: int
    total: int

    @classmethod
    def of_process(cls, batch_size: int, num_processes: int = 1, process_index: int = 0) -> "BatchShare":
        """Process ``process_index``'s share when each of ``num_processes`` processes holds ``batch_size`` rows."""
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
        return cls(process_index * batch_size, batch_size, batch_size * num_processes)

    def __post_init__(self):
        if self.size < 1 or self.start < 0 or self.start + self.size > self.total:
            raise ValueError(f"rows [{self.start}, {self.start + self.size}) do not fit a global batch of {self.total}")

    @property
    def rows(self) -> slice:
        return slice(self.start, self.start + self.size)

    def take(self, values: torch.Tensor) -> torch.Tensor:
        """This process's rows of ``values`` (a tensor of the global batch, rows first)."""
        if values.shape[0] != self.total:
            raise ValueError(f"expected {self.total} rows (the global batch), got {values.shape[0]}")
        return values[self.rows]

    def global_shape(self, local_shape: Sequence[int]) -> tuple:
        """``local_shape`` with its first entry (this process's rows) replaced by the global batch size."""
        return (self.total, *tuple(local_shape)[1:])

    def draw(self, sample: Callable[..., torch.Tensor], local_shape: Sequence[int], *args, **kwargs) -> torch.Tensor:
        """``sample(global_shape, *args, **kwargs)`` and this process's rows of it, e.g.
        ``share.draw(randn, images.shape, generator, images.device)``."""
        return self.take(sample(self.global_shape(local_shape), *args, **kwargs))


def global_indices(schedule, micro_step: int) -> torch.Tensor:
    """The image indices of the whole global batch at ``micro_step`` of a
    :class:`~diffusers_stf.training.data.BatchSchedule` (every process's shard, in process order)."""
    epoch, position = divmod(int(micro_step), schedule.batches_per_epoch)
    start = position * schedule.global_batch
    return schedule.permutation(epoch)[start:start + schedule.global_batch]


def share_of(schedule) -> BatchShare:
    """The :class:`BatchShare` of the process a :class:`~diffusers_stf.training.data.BatchSchedule` was made
    for."""
    return BatchShare.of_process(schedule.batch_size, schedule.num_processes, schedule.process_index)


def take_rows(batch: dict, share: BatchShare, keys: Optional[Sequence[str]] = None) -> dict:
    """This process's rows of every tensor of a global ``batch`` dict (or only of ``keys``)."""
    return {k: share.take(v) if torch.is_tensor(v) and (keys is None or k in keys) else v for k, v in batch.items()}
