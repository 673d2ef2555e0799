"""EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) as a diffusers scheduler."""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Union

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from .edm_sampling import churn, churn_gamma
from .input_checks import check_nonnegative_finite
from .scheduling_edm_heun import EDMHeunScheduler


class EDMStochasticScheduler(EDMHeunScheduler):
    """EDM Algorithm 2: before each step, "churn" x_i to a higher noise level σ̂_i = σ_i·(1 + γ_i) with
    γ_i = min(S_churn/N, √2 − 1) for σ_i ∈ [S_tmin, S_tmax] (else 0), x̂_i = x_i + √(σ̂_i² − σ_i²)·S_noise·z,
    then take the Heun step of Algorithm 1 *from (x̂_i, σ̂_i)*: the model is evaluated at the noised-up state.

    Because γ_i depends only on the schedule, σ̂_i is known when ``set_timesteps`` runs, so ``timesteps`` already
    carry c_noise(σ̂_i) and the standard diffusers loop evaluates the model at σ̂_i. The churn of step i+1 is applied
    at the end of step i (``prev_sample`` is x̂_{i+1}), using the ``generator`` passed to ``step``. The churn of
    step 0 is folded into the initial noise: x_0 + √(σ̂_0² − σ_0²)·S_noise·z with x_0 ~ N(0, σ_0²) is exactly
    N(0, σ_0² + S_noise²(σ̂_0² − σ_0²)), whose standard deviation is ``init_noise_sigma``.

    With ``s_churn=0`` it is exactly Algorithm 1.

    Args:
        s_churn: S_churn, the total amount of churn (EDM ImageNet-64: 40).
        s_tmin, s_tmax: the σ window in which churn is applied.
        s_noise: S_noise, the noise inflation (EDM ImageNet-64: 1.003).
        **(all of EDMHeunScheduler's arguments)**
    """

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 7.0,
        sigma_schedule: str = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: str = "epsilon",
        final_sigmas_type: str = "zero",
        preconditioning: str = "edm",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, List[float]]] = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
    ):
        for name, value in (("s_churn", s_churn), ("s_noise", s_noise), ("s_tmin", s_tmin)):
            check_nonnegative_finite(name, value)  # a NaN would silently switch churn off
        if isinstance(s_tmax, bool) or not isinstance(s_tmax, numbers.Real) or not s_tmin <= s_tmax:
            raise ValueError(f"s_tmax must be a number >= s_tmin (inf allowed), got s_tmin={s_tmin!r}, s_tmax={s_tmax!r}")
        super().__init__(
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            sigma_data=sigma_data,
            rho=rho,
            sigma_schedule=sigma_schedule,
            num_train_timesteps=num_train_timesteps,
            prediction_type=prediction_type,
            final_sigmas_type=final_sigmas_type,
            preconditioning=preconditioning,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
        )

    def _churn_gammas(self, sigmas: torch.Tensor) -> torch.Tensor:
        """γ_i = min(S_churn/N, √2 − 1) if S_tmin ≤ σ_i ≤ S_tmax else 0 (Algorithm 2 line 4)."""
        c = self.config
        return churn_gamma(sigmas, len(sigmas), c.s_churn, c.s_tmin, c.s_tmax)

    @property
    def init_noise_sigma(self) -> float:
        """√(σ_0² + S_noise²·(σ̂_0² − σ_0²)): the initial noise with step 0's churn folded in."""
        if self.num_inference_steps is None:
            return float(self.config.sigma_max)
        s0, s0_hat = self._sigma_values[0], self._sigma_hat_values[0]
        return math.sqrt(s0**2 + self.config.s_noise**2 * max(s0_hat**2 - s0**2, 0.0))

    def _churn(self, sample: torch.Tensor, i: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        """x̂_i = x_i + √(σ̂_i² − σ_i²)·S_noise·z, z ~ N(0, I) (Algorithm 2 lines 5–6)."""
        sigma, sigma_hat = self._sigma_values[i], self._sigma_hat_values[i]
        if sigma_hat <= sigma:
            return sample
        z = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        return churn(sample, sigma, sigma_hat, self.config.s_noise, z)
