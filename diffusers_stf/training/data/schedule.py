"""Which images and which random streams each step uses: seeds that are pure functions of integer keys, and a batch
order that is a pure function of (seed, step), so a run resumed at step s sees exactly the batches and draws of an
uninterrupted run, with no sampler state to save."""

from __future__ import annotations

import numpy as np
import torch


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the integer ``keys`` (e.g. seed, step, process index).

    Per-step generators seeded this way make a resumed run draw exactly the noise of an uninterrupted one.
    """
    high, low = (int(v) for v in np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32))
    return ((high << 32) | low) & ((1 << 63) - 1)


class BatchSchedule:
    """Which images each process uses at each micro-step: epochs are permutations seeded by (seed, epoch); a global
    batch of ``batch_size · num_processes`` images is split into contiguous per-process shards; the last incomplete
    global batch of an epoch is dropped.

    Args:
        num_items: dataset size.
        batch_size: images per process per micro-step.
        seed: the training seed.
        num_processes, process_index: the data-parallel layout.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, num_processes: int = 1, process_index: int = 0):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.global_batch = batch_size * num_processes
        if self.global_batch > num_items:
            raise ValueError(
                f"the global batch (train_batch_size {batch_size} x {num_processes} processes = {self.global_batch}) "
                f"exceeds the dataset size {num_items}"
            )
        self.batches_per_epoch = num_items // self.global_batch
        self._cache = (None, None)

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cache[0] != epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, epoch, 0x5EED))
            self._cache = (epoch, torch.randperm(self.num_items, generator=g))
        return self._cache[1]

    def indices(self, micro_step: int) -> torch.Tensor:
        """This process's image indices at (0-based) ``micro_step``."""
        epoch, position = divmod(int(micro_step), self.batches_per_epoch)
        start = position * self.global_batch + self.process_index * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size]

    def epoch(self, micro_step: int) -> int:
        return int(micro_step) // self.batches_per_epoch
