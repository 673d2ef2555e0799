"""Preconditionings by name, from the entries of a scheduler's (or model's) config."""

from __future__ import annotations

from typing import Any

from ..noise_schedules import betas_for_schedule
from .base import Preconditioning, check_choice
from .edm_table import (
    DDPMPreconditioning,
    EDMPreconditioning,
    IDDPMPreconditioning,
    VEPreconditioning,
    VPPreconditioning,
)
from .score import NCSNPreconditioning, ScoreSDEPreconditioning

PRECONDITIONINGS = ("edm", "vp", "ve", "iddpm", "ddpm")
SCORE_PRECONDITIONINGS = ("ncsn", "score_sde_ve", "score_sde_vp")


def make_preconditioning(name: str, **config: Any) -> Preconditioning:
    """The preconditioning ``name`` built from scheduler-style config entries; entries a family does not use are
    ignored, so a whole scheduler config may be passed.

    Args:
        name: ``edm``, ``vp``, ``ve``, ``iddpm``, ``ddpm`` (EDM Table 1), or a score network: ``ncsn``,
            ``score_sde_ve``, ``score_sde_vp``.
        config: what the family reads (defaults in brackets):

            * every family: ``prediction_type`` [``epsilon``; ``scaled_score`` for ``ncsn``, ``score`` for the score
              SDEs]: ``epsilon`` (EDM's F) or ``v_prediction`` for ``edm``; ``epsilon``, ``v_prediction`` or
              ``sample`` for ``vp``, ``iddpm`` and ``ddpm``; ``epsilon`` for ``ve``; ``score``, ``scaled_score`` or
              ``epsilon`` for score networks;
            * ``edm``: ``sigma_data`` [0.5];
            * ``ddpm``: the β schedule ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule``,
              ``trained_betas`` [diffusers' DDPMScheduler defaults]; ``vp`` takes its continuous limit
              β_min = T·β_start, β_d = T·(β_end − β_start) (0.1 and 19.9 for diffusers' defaults, as in EDM) and
              ``epsilon_t`` [1e-5]; ``iddpm`` uses M = ``num_train_timesteps``, ``iddpm_c1`` [0.001], ``iddpm_c2``
              [0.008] or the explicit ``iddpm_levels`` u_0 > … > u_{M−1};
            * ``ve``: the network's σ range ``ve_sigma_min`` [0.02], ``ve_sigma_max`` [100];
            * score networks: ``timestep_type``, ``sigmas`` (NCSN's decreasing training levels), ``sigma_min``,
              ``sigma_max``, ``beta_min``, ``beta_max``, ``num_train_timesteps`` (see :class:`NCSNPreconditioning`,
              :class:`ScoreSDEPreconditioning`).
    """
    check_choice("preconditioning", name, PRECONDITIONINGS + SCORE_PRECONDITIONINGS)
    get = config.get
    T = int(get("num_train_timesteps") or 1000)
    if name == "edm":
        return EDMPreconditioning(get("sigma_data", 0.5), get("prediction_type", "epsilon"))
    if name == "vp":
        beta_start, beta_end = get("beta_start", 1e-4), get("beta_end", 2e-2)
        return VPPreconditioning(beta_d=T * (beta_end - beta_start), beta_min=T * beta_start, M=T,
                                 epsilon_t=get("epsilon_t", 1e-5), prediction_type=get("prediction_type", "epsilon"))
    if name == "ve":
        check_choice("prediction_type", get("prediction_type", "epsilon"), ("epsilon",))
        return VEPreconditioning(get("ve_sigma_min", 0.02), get("ve_sigma_max", 100.0))
    if name == "iddpm":
        return IDDPMPreconditioning(M=T, C1=get("iddpm_c1", 0.001), C2=get("iddpm_c2", 0.008),
                                    levels=get("iddpm_levels"), prediction_type=get("prediction_type", "epsilon"))
    if name == "ddpm":
        betas = betas_for_schedule(T, get("beta_start", 1e-4), get("beta_end", 2e-2), get("beta_schedule", "linear"),
                                   get("trained_betas"))
        return DDPMPreconditioning(betas, prediction_type=get("prediction_type", "epsilon"))
    if name == "ncsn":
        return NCSNPreconditioning(get("prediction_type", "scaled_score"), get("timestep_type", "log_sigma"),
                                   get("sigmas"))
    return ScoreSDEPreconditioning(
        sde_type=name[-2:], prediction_type=get("prediction_type", "score"), timestep_type=get("timestep_type", "sigma"),
        sigma_min=get("sigma_min", 0.01), sigma_max=get("sigma_max", 50.0), beta_min=get("beta_min", 0.1),
        beta_max=get("beta_max", 20.0), num_train_timesteps=T,
    )
