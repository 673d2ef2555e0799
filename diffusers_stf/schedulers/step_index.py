"""diffusers' begin-index / step-index bookkeeping, shared by the package's schedulers."""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from .input_checks import check_float_tensor


class StepIndexMixin:
    """Which entry of ``timesteps`` the next ``step`` call handles.

    As in diffusers, the index starts at ``begin_index`` when a pipeline set one (img2img), else at the entry of the
    first ``timestep`` passed to ``scale_model_input``/``step``. A timestep that occurs several times resolves to an
    entry that starts a sampler step (:meth:`_is_step_start`), so a loop over ``timesteps[k:]`` from a step boundary
    ``k`` runs exactly as the same loop after ``set_begin_index(k)``.
    """

    _step_index: Optional[int] = None
    _begin_index: Optional[int] = None

    @property
    def step_index(self) -> Optional[int]:
        """The entry of ``timesteps`` the next ``step`` call handles (None before the first call)."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """The first entry of ``timesteps`` to run, when a pipeline set it."""
        return self._begin_index

    @property
    def _next_index(self) -> int:
        """The entry the next ``step`` handles, before the first call too (``begin_index``, else 0)."""
        return self._step_index if self._step_index is not None else (self._begin_index or 0)

    def _is_step_start(self, index: int) -> bool:
        """Whether entry ``index`` of ``timesteps`` starts a sampler step (every entry, unless a subclass says)."""
        return True

    def set_begin_index(self, begin_index: int = 0):
        """Start sampling at entry ``begin_index`` of ``timesteps`` (img2img); it must start a sampler step.

        Args:
            begin_index: the index of the first entry of ``timesteps`` the loop will run.
        """
        if isinstance(begin_index, bool) or not isinstance(begin_index, numbers.Integral):
            raise ValueError(f"begin_index must be an integer, got {begin_index!r}")
        begin_index = int(begin_index)
        if not 0 <= begin_index < len(self.timesteps) or not self._is_step_start(begin_index):
            raise ValueError(
                f"begin_index must index an entry of timesteps (length {len(self.timesteps)}) that starts a sampler "
                f"step, got {begin_index}"
            )
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps: Optional[torch.Tensor] = None) -> int:
        """The first index of ``timestep`` in ``schedule_timesteps`` (default ``self.timesteps``) that starts a step.

        Args:
            timestep: one entry of the schedule (a python number or a 0-d tensor).
            schedule_timesteps: the schedule to search.
        """
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        timestep = torch.as_tensor(timestep, dtype=schedule_timesteps.dtype, device=schedule_timesteps.device)
        for index in (schedule_timesteps == timestep).nonzero().flatten().tolist():
            if self._is_step_start(index):
                return index
        raise ValueError(f"timestep {timestep.tolist()} does not start a step of scheduler.timesteps")

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    def _entry_for_step(self, timestep, sample: torch.Tensor) -> int:
        """The entry of ``timesteps`` this ``step`` call handles, after the checks every ``step`` makes: the schedule
        is set, ``sample`` is a floating-point tensor and the schedule is not exhausted."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        check_float_tensor("sample", sample)
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.timesteps):
            raise ValueError("step was called more often than there are timesteps; call set_timesteps again")
        return self._step_index

    def _reset_step_index(self):
        self._step_index = None
        self._begin_index = None
