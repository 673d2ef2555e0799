"""The sampler options of the command lines that draw images from a saved pipeline (``examples/generate.py``,
``examples/evaluate.py``): the scheduler swap, EDM's churn settings and JSON overrides, parsed and applied alike."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Mapping, Optional

from .sampling import make_scheduler, pipeline_with_scheduler

CHURN_OPTIONS = ("s_churn", "s_tmin", "s_tmax", "s_noise")


def add_sampler_args(group) -> None:
    """``--num_inference_steps``, ``--scheduler``, EDM's ``--s_churn/--s_tmin/--s_tmax/--s_noise``, and the JSON
    objects ``--scheduler_kwargs`` and ``--pipeline_kwargs``, on a parser or an argument group."""
    group.add_argument("--num_inference_steps", type=int, default=18, help="sampler steps (Heun: 2N-1 NFE)")
    group.add_argument("--scheduler", default=None, help="heun | stochastic | euler | a scheduler class name")
    group.add_argument("--s_churn", type=float, default=None, help="EDM S_churn (stochastic scheduler)")
    group.add_argument("--s_tmin", type=float, default=None)
    group.add_argument("--s_tmax", type=float, default=None)
    group.add_argument("--s_noise", type=float, default=None)
    group.add_argument("--scheduler_kwargs", default="{}", help="JSON of other scheduler config overrides")
    group.add_argument("--pipeline_kwargs", default="{}", help="JSON of extra pipeline call options (guidance)")


def parse_json_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Replaces ``--scheduler_kwargs`` and ``--pipeline_kwargs`` by the dicts they hold; a parser error otherwise."""
    for name in ("scheduler_kwargs", "pipeline_kwargs"):
        try:
            value = json.loads(getattr(args, name))
        except json.JSONDecodeError as err:
            parser.error(f"--{name} must be a JSON object: {err}")
        if not isinstance(value, dict):
            parser.error(f"--{name} must be a JSON object, got {getattr(args, name)!r}")
        setattr(args, name, value)


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """The scheduler a pipeline samples with: ``scheduler`` (None: the pipeline's own class), EDM's churn settings and
    other config overrides (None: the saved value)."""

    scheduler: Optional[str] = None
    s_churn: Optional[float] = None
    s_tmin: Optional[float] = None
    s_tmax: Optional[float] = None
    s_noise: Optional[float] = None
    scheduler_kwargs: Mapping = dataclasses.field(default_factory=dict)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SamplerOptions":
        """The options of a command line built with :func:`add_sampler_args` (after :func:`parse_json_options`)."""
        return cls(**{f.name: vars(args)[f.name] for f in dataclasses.fields(cls)})

    def apply(self, pipe):
        """``pipe`` with the chosen scheduler configured by the overrides; ``pipe`` itself when none is given."""
        overrides = {k: getattr(self, k) for k in CHURN_OPTIONS if getattr(self, k) is not None}
        overrides.update(self.scheduler_kwargs)
        if self.scheduler is None and not overrides:
            return pipe
        name = self.scheduler or type(pipe.scheduler).__name__
        return pipeline_with_scheduler(pipe, make_scheduler(pipe.scheduler, name, **overrides))
