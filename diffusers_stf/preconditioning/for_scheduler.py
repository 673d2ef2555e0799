"""The one home of "a scheduler's model output ↔ D(x; σ)": any diffusers scheduler, or ours, in EDM coordinates.

Every scheduler evaluates its network at a state ``sample`` and a ``timestep`` and reads the output in some
parametrisation. In EDM coordinates (x = y + σ·n, D(x; σ) = c_skip·x + c_out·F) there are two kinds of state:

* **σ-form** (``init_noise_sigma`` > 1: Euler, Euler ancestral, Heun, KDPM2, LMS, EDM-Euler, EDM-DPMSolver, and the
  package's own schedulers): the state is x itself and σ is the scheduler's current ``sigmas`` entry (KDPM2's
  second-order evaluation: ``sigmas_interpol``; ours: ``current_sigma``, with ``current_state_scale`` m for a state
  x_t = m·x such as the VP SDE's);
* **VP-form** (``init_noise_sigma`` = 1 with an ``alphas_cumprod`` table: DDPM, DDIM, PNDM, DEIS, DPM-Solver
  (multistep and single-step, every ``algorithm_type``), UniPC): the state is x_t = √ᾱ_t·x with
  σ = √((1 − ᾱ_t)/ᾱ_t) of the network's own timestep t, so x = x_t/√ᾱ_t.

The output's parametrisation (:func:`preconditioning_for`) comes from the config: our ``preconditioning`` entry;
EDM's F (``sigma_data`` present: diffusers' EDM schedulers); or diffusers' DDPM types (``epsilon``, ``sample``,
``v_prediction``) of the β schedule's network. Everything is decided from the scheduler's state and config, never
from its class name, so subclasses and the classes re-executed from a remote-code folder work alike. A scheduler
whose output or noise level cannot be read this way is refused with a ValueError that names it and says why.
"""

from __future__ import annotations

import math
from typing import Mapping, Tuple

import torch

from .base import Preconditioning
from .edm_table import EDM_PREDICTION_TYPES, VP_PREDICTION_TYPES, DDPMPreconditioning, EDMPreconditioning
from .factory import make_preconditioning
from ..noise_schedules import betas_for_schedule

# diffusers' Euler samplers accept ``original_sample`` as another name of ``sample``
PREDICTION_TYPE_ALIASES = {"original_sample": "sample"}


def _config_of(scheduler_or_config) -> Tuple[Mapping, str]:
    if hasattr(scheduler_or_config, "config"):
        return scheduler_or_config.config, type(scheduler_or_config).__name__
    return scheduler_or_config, str(scheduler_or_config.get("_class_name", "the scheduler"))


def preconditioning_for(scheduler_or_config) -> Preconditioning:
    """The :class:`Preconditioning` that turns a scheduler's model output into D(x; σ) and back.

    Args:
        scheduler_or_config: a scheduler (ours or diffusers'), or its config mapping.

    Raises:
        ValueError: naming the scheduler and the reason, when its output cannot be written as c_skip·x + c_out·F
            (e.g. ``flow_prediction``, a β schedule rescaled to zero terminal SNR, or no parametrisation in the config).
    """
    own = getattr(scheduler_or_config, "preconditioning", None)
    if isinstance(own, Preconditioning):
        return own
    config, name = _config_of(scheduler_or_config)
    prediction_type = config.get("prediction_type", "epsilon")
    prediction_type = PREDICTION_TYPE_ALIASES.get(prediction_type, prediction_type)
    if "preconditioning" in config:
        return make_preconditioning(config["preconditioning"], **{**config, "prediction_type": prediction_type})
    if "sigma_data" in config:
        if prediction_type not in EDM_PREDICTION_TYPES:
            raise ValueError(f"{name}: prediction_type {prediction_type!r} of an EDM scheduler is not one of "
                             f"{EDM_PREDICTION_TYPES}, so its output cannot be related to D(x; sigma)")
        return EDMPreconditioning(config["sigma_data"], prediction_type)
    if "beta_schedule" in config or config.get("trained_betas") is not None:
        if prediction_type not in VP_PREDICTION_TYPES:
            raise ValueError(f"{name}: prediction_type {prediction_type!r} is not one of {VP_PREDICTION_TYPES}, so "
                             "its output cannot be related to D(x; sigma) of a DDPM network")
        if config.get("rescale_betas_zero_snr"):
            raise ValueError(f"{name}: rescale_betas_zero_snr makes sigma infinite at the last training timestep, "
                             "which has no EDM coordinates")
        if config.get("use_flow_sigmas"):
            raise ValueError(f"{name}: use_flow_sigmas is a flow-matching schedule, not a DDPM network's")
        betas = betas_for_schedule(config.get("num_train_timesteps", 1000), config.get("beta_start", 1e-4),
                                   config.get("beta_end", 0.02), config.get("beta_schedule", "linear"),
                                   config.get("trained_betas"))
        return DDPMPreconditioning(betas, prediction_type)
    raise ValueError(f"{name}: its config has no preconditioning, sigma_data or beta schedule, so what its network "
                     "predicts is unknown")


def _host_scalar(value) -> float:
    return float(value.detach().cpu()) if torch.is_tensor(value) else float(value)


class EvaluationFrame:
    """Where a scheduler evaluates its network, in EDM coordinates, for one sampling loop (module docstring).

    Built once per loop: host copies of the tables it reads are made here, so :meth:`point` never waits for a device.

    Args:
        scheduler: the scheduler, after ``set_timesteps``.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.preconditioning = preconditioning_for(scheduler)
        name = type(scheduler).__name__
        self.own = hasattr(scheduler, "current_sigma") and hasattr(scheduler, "preconditioning")
        alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
        init_noise_sigma = getattr(scheduler, "init_noise_sigma", None)
        self.vp_form = (not self.own and alphas_cumprod is not None and init_noise_sigma is not None
                        and _host_scalar(init_noise_sigma) == 1.0)
        if self.vp_form:
            self._alphas_cumprod = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        elif not self.own and getattr(scheduler, "sigmas", None) is None:
            raise ValueError(f"{name} keeps neither sigmas nor an alphas_cumprod table with init_noise_sigma = 1, so "
                             "the noise level of its network evaluations is unknown")

    def sigma_and_scale(self, timestep) -> Tuple[float, float]:
        """(σ, m) of the coming network evaluation, with the state x_t = m·x; ``timestep`` is the entry of
        ``timesteps`` passed to the network, on the host."""
        scheduler = self.scheduler
        if self.own:
            return float(scheduler.current_sigma), float(getattr(scheduler, "current_state_scale", 1.0))
        if self.vp_form:
            t = _host_scalar(timestep)
            if t != round(t) or not 0 <= t < len(self._alphas_cumprod):
                raise ValueError(f"{type(scheduler).__name__} evaluates its network at timestep {t}, which is not "
                                 f"an integer training timestep in [0, {len(self._alphas_cumprod) - 1}]")
            alpha_bar = float(self._alphas_cumprod[int(round(t))])
            return math.sqrt((1 - alpha_bar) / alpha_bar), math.sqrt(alpha_bar)
        if scheduler.step_index is None:
            scheduler._init_step_index(timestep)
        index = scheduler.step_index
        second_order = not getattr(scheduler, "state_in_first_order", True)
        table = scheduler.sigmas_interpol if second_order and hasattr(scheduler, "sigmas_interpol") else scheduler.sigmas
        return _host_scalar(table[index]), 1.0

    def point(self, sample: torch.Tensor, timestep) -> Tuple[torch.Tensor, float]:
        """(x, σ): the EDM-coordinate sample and noise level of the coming network evaluation at ``sample``."""
        sigma, scale = self.sigma_and_scale(timestep)
        return (sample if scale == 1.0 else sample / scale), sigma


def evaluation_point(scheduler, sample: torch.Tensor, timestep) -> Tuple[torch.Tensor, float]:
    """(x, σ) of ``scheduler``'s coming network evaluation at ``sample`` and ``timestep`` (see :class:`EvaluationFrame`)."""
    return EvaluationFrame(scheduler).point(sample, timestep)

