"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) as a diffusers scheduler."""

from __future__ import annotations

from .scheduling_edm_heun import EDMHeunScheduler


class EDMStochasticScheduler(EDMHeunScheduler):
    """EDM Algorithm 2 under its own name: :class:`EDMHeunScheduler` with its churn arguments (``s_churn``,
    ``s_tmin``, ``s_tmax``, ``s_noise``), the one implementation of both algorithms, as in NVlabs' ``edm_sampler``.
    A folder whose ``scheduler_config.json`` names this class says that it is meant to be sampled with churn; with
    ``s_churn=0`` it is Algorithm 1 exactly.
    """
