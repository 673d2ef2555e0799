"""EDM's deterministic 2nd-order sampler (Karras et al. 2022, Algorithm 1) as a diffusers scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..preconditioning import PRECONDITIONINGS, make_preconditioning


@dataclass
class EDMSchedulerOutput(BaseOutput):
    """Output of the EDM schedulers' ``step``.

    Args:
        prev_sample: the state the model is evaluated at next (x_{i+1}, the Euler predictor x'_{i+1} between the two
            halves of a Heun step, or the churned x̂_{i+1} for the stochastic sampler); the final sample after the last step.
        pred_original_sample: the denoised estimate D(x; σ) of this model evaluation.
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class EDMHeunScheduler(SchedulerMixin, ConfigMixin):
    """EDM Algorithm 1: σ(t) = t, s(t) = 1, Heun's method on the probability-flow ODE dx/dσ = (x − D(x; σ))/σ,
    with the last step (to σ = 0) a plain Euler step. N steps take 2N − 1 model evaluations (18 steps = 35 NFE).

    It runs in the standard diffusers loop: like ``HeunDiscreteScheduler``, ``timesteps`` lists one entry per model
    evaluation (the interior noise levels appear twice) and ``step`` is called once per entry. The timesteps are the
    network's ``c_noise(σ)``, so ``unet(scheduler.scale_model_input(x, t), t)`` is the preconditioned network input.
    The state is kept in float64 internally, as in EDM.

    Args:
        sigma_min: smallest noise level of the schedule (EDM: 0.002).
        sigma_max: largest noise level (EDM: 80).
        sigma_data: σ_data of the ``edm`` preconditioning (EDM: 0.5).
        rho: ρ of the schedule σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (EDM eq. 5; 7).
        sigma_schedule: ``karras`` (the ρ-schedule) or ``exponential`` (log-linear in σ).
        num_train_timesteps: T of the discrete β schedule (``vp``, ``ddpm``, ``iddpm`` preconditionings).
        prediction_type: ``epsilon`` (the network is EDM's F, as diffusers' ``EDMEulerScheduler`` names it) or
            ``v_prediction`` (c_out negated).
        final_sigmas_type: ``zero`` (EDM: the last step goes to σ = 0 with Euler) or ``sigma_min``.
        preconditioning: ``edm``, ``vp``, ``ve``, ``iddpm`` or ``ddpm`` (EDM Table 1); ``ddpm`` samples an
            epsilon-prediction ``UNet2DModel`` trained on discrete timesteps 0..T−1.
        beta_start, beta_end, beta_schedule: the DDPM β schedule, for ``ddpm`` (and its continuous limit for ``vp``).
    """

    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
    order = 2

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
    ):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        if sigma_schedule not in ("karras", "exponential"):
            raise ValueError(f"sigma_schedule must be 'karras' or 'exponential', got {sigma_schedule!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        if preconditioning not in PRECONDITIONINGS:
            raise ValueError(f"preconditioning must be one of {PRECONDITIONINGS}, got {preconditioning!r}")
        self.preconditioning = make_preconditioning(
            preconditioning,
            sigma_data=sigma_data,
            prediction_type=prediction_type,
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
        )
        self.num_inference_steps = None
        self.sigmas = torch.tensor([], dtype=torch.float64)
        self.timesteps = torch.tensor([], dtype=torch.float32)
        self._step_index = None
        self._begin_index = None

    # ----------------------------------------------------------------------------------------------------------
    # The schedule

    @property
    def sigma_range(self) -> Tuple[float, float]:
        """The sampling range clamped to what the network supports (EDM's edm_sampler, step 1)."""
        p = self.preconditioning
        return max(self.config.sigma_min, p.sigma_min), min(self.config.sigma_max, p.sigma_max)

    def _sigma_schedule(self, n: int) -> torch.Tensor:
        """σ_0 > … > σ_{N−1}: EDM eq. 5 (``karras``) or log-linear (``exponential``), in float64."""
        smin, smax = self.sigma_range
        if n == 1:
            return torch.tensor([smax], dtype=torch.float64)
        ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
        if self.config.sigma_schedule == "karras":
            r = 1.0 / self.config.rho
            return (smax**r + ramp * (smin**r - smax**r)) ** self.config.rho
        return torch.exp(np.log(smax) + ramp * (np.log(smin) - np.log(smax)))

    def _churn_gammas(self, sigmas: torch.Tensor) -> torch.Tensor:
        """γ_i of EDM Algorithm 2 line 4; Algorithm 1 has none."""
        return torch.zeros_like(sigmas)

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        sigmas: Optional[Union[Sequence[float], torch.Tensor]] = None,
    ):
        """Build the noise levels σ_0 > … > σ_{N−1} (plus the final σ_N) and the model timesteps.

        Args:
            num_inference_steps: N, the number of sampler steps (NFE = 2N − 1 with ``final_sigmas_type="zero"``).
            device: where ``timesteps`` live (``sigmas`` stay on the CPU).
            sigmas: explicit, strictly decreasing, positive noise levels σ_0..σ_{N−1} (the final level is appended).
        """
        if sigmas is not None:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
            if len(sigmas) < 1 or not bool((sigmas > 0).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
                raise ValueError("sigmas must be a non-empty, strictly decreasing sequence of positive noise levels")
            num_inference_steps = len(sigmas)
        else:
            if num_inference_steps is None or int(num_inference_steps) < 1:
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps}")
            num_inference_steps = int(num_inference_steps)
            sigmas = self._sigma_schedule(num_inference_steps)
        p = self.preconditioning
        sigmas = p.round_sigma(sigmas)
        final = torch.zeros(1, dtype=torch.float64) if self.config.final_sigmas_type == "zero" else sigmas[-1:] * 0 + self.sigma_range[0]
        self.sigmas = torch.cat([sigmas, final])
        gammas = self._churn_gammas(sigmas)
        self.sigmas_hat = p.round_sigma(sigmas * (1 + gammas))
        self.num_inference_steps = num_inference_steps

        # One entry per model evaluation: (σ at which the model runs, sampler step i, is it the Heun correction).
        evals: List[Tuple[float, int, bool]] = []
        for i in range(num_inference_steps):
            evals.append((float(self.sigmas_hat[i]), i, False))
            if self.sigmas[i + 1] > 0:
                evals.append((float(self.sigmas[i + 1]), i, True))
        self._eval_sigmas = torch.tensor([e[0] for e in evals], dtype=torch.float64)
        self._eval_step = [e[1] for e in evals]
        self._eval_is_correction = [e[2] for e in evals]
        self.timesteps = p.c_noise(self._eval_sigmas).to(device=device, dtype=torch.float32)
        self._step_index = None
        self._begin_index = None
        self._heun_state = None

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial latents: σ_0 (EDM Algorithm 1 line 2)."""
        if self.num_inference_steps is None:
            return float(self.config.sigma_max)
        return float(self.sigmas[0])

    # ----------------------------------------------------------------------------------------------------------
    # diffusers' step-index bookkeeping

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start sampling at entry ``begin_index`` of ``timesteps`` (img2img); it must be a first-order evaluation."""
        if not 0 <= begin_index < len(self.timesteps) or self._eval_is_correction[begin_index]:
            raise ValueError(
                f"begin_index must index a first-order evaluation in [0, {len(self.timesteps)}), got {begin_index}"
            )
        self._begin_index = begin_index

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        schedule_timesteps = self.timesteps if schedule_timesteps is None else schedule_timesteps
        timestep = torch.as_tensor(timestep, dtype=schedule_timesteps.dtype, device=schedule_timesteps.device)
        candidates = (schedule_timesteps == timestep).nonzero()
        if len(candidates) == 0:
            raise ValueError(f"timestep {float(timestep)} is not one of scheduler.timesteps")
        return int(candidates[0])

    def _init_step_index(self, timestep):
        self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index

    @property
    def state_in_first_order(self) -> bool:
        """True when the next model evaluation is the Euler (first-order) one of a step."""
        return self._heun_state is None

    @property
    def current_sigma(self) -> float:
        """σ at which the model is evaluated at the current step index (σ̂_i or σ_{i+1})."""
        return float(self._eval_sigmas[self._step_index or 0])

    def sigma_for_timestep(self, timestep) -> torch.Tensor:
        return self._eval_sigmas[self.index_for_timestep(timestep)]

    def __len__(self):
        return self.config.num_train_timesteps

    # ----------------------------------------------------------------------------------------------------------
    # The sampler

    def scale_model_input(self, sample: torch.Tensor, timestep: Union[float, torch.Tensor]) -> torch.Tensor:
        """c_in(σ)·x, the network input at the current evaluation (EDM eq. 7)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self._eval_sigmas[self._step_index]
        return sample * self.preconditioning.c_in(sigma).to(sample.dtype)

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma) -> torch.Tensor:
        """D(x; σ) = c_skip·x + c_out·F (EDM eq. 7), as ``EDMEulerScheduler.precondition_outputs``."""
        return self.preconditioning.denoise(sample, model_output, sigma)

    def _churn(self, sample: torch.Tensor, i: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        """x̂_i from x_i (EDM Algorithm 2 lines 5–6); the identity for Algorithm 1."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[EDMSchedulerOutput, Tuple]:
        """One model evaluation's worth of EDM Algorithm 1 (lines 4–8), or Algorithm 2 (lines 7–11) for the
        stochastic subclass.

        First-order call (the model ran at (x̂_i, σ̂_i)): d_i = (x̂_i − D)/σ̂_i, x' = x̂_i + (σ_{i+1} − σ̂_i)·d_i.
        If σ_{i+1} > 0, ``prev_sample`` is the predictor x' and the next call applies the correction
        x_{i+1} = x̂_i + (σ_{i+1} − σ̂_i)·(d_i + d'_i)/2 with d'_i = (x' − D(x'; σ_{i+1}))/σ_{i+1}.

        Args:
            model_output: the raw network output F at ``scale_model_input(sample, timestep)`` and ``timestep``.
            timestep: the current entry of ``timesteps``.
            sample: the current state (what the previous ``step`` returned, or the initial latents).
            generator: random generator for the churn noise (stochastic sampler only).
            return_dict: return an :class:`EDMSchedulerOutput` rather than a tuple.
        """
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self._eval_sigmas):
            raise ValueError("step was called more often than there are timesteps; call set_timesteps again")
        i = self._eval_step[self._step_index]
        if torch.isnan(sample).any():
            raise ValueError(f"the sample contains NaN at sampler step {i} (sigma={self.current_sigma:.4g})")
        x = sample.to(torch.float64)
        sigma_eval = self._eval_sigmas[self._step_index]
        denoised = self.preconditioning.denoise(x, model_output.to(torch.float64), sigma_eval)
        sigma_next = self.sigmas[i + 1]
        if not self._eval_is_correction[self._step_index]:
            sigma_hat = self.sigmas_hat[i]
            d = (x - denoised) / sigma_hat
            prev = x + (sigma_next - sigma_hat) * d  # Euler step (Algorithm 1 line 5 / Algorithm 2 line 8)
            if sigma_next > 0:  # keep what the Heun correction needs; the step to σ = 0 stays Euler
                self._heun_state = (x, d, sigma_next - sigma_hat)
        else:
            x_hat, d, dt = self._heun_state
            d_prime = (x - denoised) / sigma_next
            prev = x_hat + dt * (d + d_prime) / 2
            self._heun_state = None
        if self._heun_state is None and i + 1 < self.num_inference_steps:
            prev = self._churn(prev, i + 1, generator)
        if torch.isnan(prev).any():
            raise ValueError(f"the sampler produced NaN at step {i} (sigma={float(sigma_eval):.4g})")
        self._step_index += 1
        prev, denoised = prev.to(sample.dtype), denoised.to(sample.dtype)
        if not return_dict:
            return (prev, denoised)
        return EDMSchedulerOutput(prev_sample=prev, pred_original_sample=denoised)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """x = y + σ·n with σ the noise level of each entry of ``timesteps`` (VE form, as EDMEulerScheduler)."""
        timesteps = torch.as_tensor(timesteps, device=self.timesteps.device).reshape(-1)
        sigma = torch.stack([self._eval_sigmas[self.index_for_timestep(t)] for t in timesteps])
        sigma = sigma.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + noise * sigma
