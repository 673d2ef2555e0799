"""EDM's 2nd-order sampler (Karras et al. 2022, Algorithm 1, and its churned form, Algorithm 2) as a diffusers
scheduler."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from ..preconditioning import PRECONDITIONINGS, make_preconditioning
from .edm_sampling import churn, churn_gamma, churn_sigma, euler_update, heun_update, slope
from .input_checks import check_float_tensor, check_nonnegative_finite, check_positive_finite
from .scheduling_base import PreconditionedScheduler

logger = logging.get_logger(__name__)


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


class EDMHeunScheduler(PreconditionedScheduler):
    """EDM Algorithm 1: σ(t) = t, s(t) = 1, Heun's method on the probability-flow ODE dx/dσ = (x − D(x; σ))/σ,
    with the last step (to σ = 0) a plain Euler step. N steps take 2N − 1 model evaluations (18 steps = 35 NFE).

    With ``s_churn > 0`` it is Algorithm 2, as NVlabs' ``edm_sampler`` and k-diffusion's ``sample_heun`` take the
    same four arguments: before each step x_i is "churned" to a higher noise level σ̂_i = σ_i·(1 + γ_i) with
    γ_i = min(S_churn/N, √2 − 1) for σ_i ∈ [S_tmin, S_tmax] (else 0), x̂_i = x_i + √(σ̂_i² − σ_i²)·S_noise·z, and
    the Heun step starts *from (x̂_i, σ̂_i)*: the model is evaluated at the noised-up state. Because γ_i depends only
    on the schedule, σ̂_i is known when ``set_timesteps`` runs, so ``timesteps`` already carry c_noise(σ̂_i). The
    churn of step i+1 is applied at the end of step i (``prev_sample`` is x̂_{i+1}), with the ``generator`` passed to
    ``step``. The churn of step 0 is folded into the initial noise: x_0 + √(σ̂_0² − σ_0²)·S_noise·z with
    x_0 ~ N(0, σ_0²) is exactly N(0, σ_0² + S_noise²(σ̂_0² − σ_0²)), whose standard deviation is
    ``init_noise_sigma``.

    It runs in the standard diffusers loop: like ``HeunDiscreteScheduler``, ``timesteps`` lists one entry per model
    evaluation (the interior noise levels appear twice) and ``step`` is called once per entry. The timesteps are the
    network's ``c_noise(σ)``, so ``unet(scheduler.scale_model_input(x, t), t)`` is the preconditioned network input;
    a loop that skips ``scale_model_input`` (diffusers' ``DDPMPipeline``) gets a warning, as with diffusers'
    ``EDMEulerScheduler``. Each update is a function of :mod:`~diffusers_stf.schedulers.edm_sampling`, the one
    EDM sampler core. The state is kept in float64 internally, as in EDM.

    Args:
        sigma_min: smallest noise level of the schedule (EDM: 0.002).
        sigma_max: largest noise level (EDM: 80).
        sigma_data: σ_data of the ``edm`` preconditioning (EDM: 0.5).
        rho: ρ of the schedule σ_i = (σ_max^{1/ρ} + i/(N−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (EDM eq. 5; 7).
        sigma_schedule: ``karras`` (the ρ-schedule) or ``exponential`` (log-linear in σ).
        num_train_timesteps: T of the discrete β schedule (``vp``, ``ddpm``, ``iddpm`` preconditionings).
        prediction_type: what the network outputs (see :func:`~diffusers_stf.make_preconditioning`): for ``edm``,
            ``epsilon`` (EDM's F, as diffusers' ``EDMEulerScheduler`` names it) or ``v_prediction`` (c_out negated);
            for ``vp``, ``iddpm`` and ``ddpm``, diffusers' DDPM types ``epsilon``, ``v_prediction`` or ``sample``;
            for ``ve``, ``epsilon``. Any other value is refused here.
        final_sigmas_type: ``zero`` (EDM: the last step goes to σ = 0 with Euler) or ``sigma_min``.
        preconditioning: ``edm``, ``vp``, ``ve``, ``iddpm`` or ``ddpm`` (EDM Table 1); ``ddpm`` samples a diffusers
            DDPM ``UNet2DModel`` trained on discrete timesteps 0..T−1.
        beta_start, beta_end, beta_schedule, trained_betas: the DDPM β schedule, as in diffusers' ``DDPMScheduler``, for
            ``ddpm`` (and its continuous limit for ``vp``); ``trained_betas`` overrides the others.
        s_churn: S_churn, the total amount of churn (0: Algorithm 1; EDM ImageNet-64: 40).
        s_tmin, s_tmax: the σ window in which churn is applied. ``s_tmax=None`` (the default) means no upper bound,
            EDM's S_tmax = ∞; ``float("inf")`` is taken as None, so that ``scheduler_config.json`` stays strict JSON
            (``"s_tmax": null``; the ``Infinity`` of older files, which only Python's parser reads, still loads).
        s_noise: S_noise, the noise inflation (EDM ImageNet-64: 1.003).
        epsilon_t: ε_t of ``vp``: the network's smallest σ is σ(ε_t) (EDM Table 1: 1e-5).
        ve_sigma_min, ve_sigma_max: the σ range a ``ve`` network supports (EDM Table 1: 0.02, 100).
        iddpm_c1, iddpm_c2: C_1, C_2 of ``iddpm``'s levels (EDM eq. 99: 0.001, 0.008).
        iddpm_levels: the levels u_0 > … > u_{M−1} of an ``iddpm`` network as it was trained (e.g. the ``u`` buffer
            of NVlabs' iDDPMPrecond, computed in float32); default: EDM eq. 99 in float64.
    """

    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
    order = 2
    output_class = EDMSchedulerOutput

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
        s_tmax: Optional[float] = None,
        s_noise: float = 1.0,
        epsilon_t: float = 1e-5,
        ve_sigma_min: float = 0.02,
        ve_sigma_max: float = 100.0,
        iddpm_c1: float = 0.001,
        iddpm_c2: float = 0.008,
        iddpm_levels: Optional[List[float]] = None,
    ):
        check_positive_finite("sigma_min", sigma_min)
        check_positive_finite("sigma_max", sigma_max)
        if not sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        check_positive_finite("rho", rho)
        if sigma_schedule not in ("karras", "exponential"):
            raise ValueError(f"sigma_schedule must be 'karras' or 'exponential', got {sigma_schedule!r}")
        if final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
        if preconditioning not in PRECONDITIONINGS:
            raise ValueError(f"preconditioning must be one of {PRECONDITIONINGS}, got {preconditioning!r}")
        for name, value in (("s_churn", s_churn), ("s_noise", s_noise), ("s_tmin", s_tmin)):
            check_nonnegative_finite(name, value)  # a NaN would silently switch churn off
        if s_tmax is not None and (isinstance(s_tmax, bool) or not isinstance(s_tmax, numbers.Real)
                                   or not s_tmin <= s_tmax):
            raise ValueError(f"s_tmax must be None (no upper bound) or a number >= s_tmin, got s_tmin={s_tmin!r}, "
                             f"s_tmax={s_tmax!r}")
        if s_tmax == math.inf:  # stored as null: Infinity is not JSON
            self.register_to_config(s_tmax=None)
        self.preconditioning = make_preconditioning(
            preconditioning,
            sigma_data=sigma_data,
            prediction_type=prediction_type,
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            epsilon_t=epsilon_t,
            ve_sigma_min=ve_sigma_min,
            ve_sigma_max=ve_sigma_max,
            iddpm_c1=iddpm_c1,
            iddpm_c2=iddpm_c2,
            iddpm_levels=iddpm_levels,
        )
        self.num_inference_steps = None
        self.sigmas = torch.tensor([], dtype=torch.float64)
        self.sigmas_hat = torch.tensor([], dtype=torch.float64)
        self.timesteps = torch.tensor([], dtype=torch.float32)
        self.is_scale_input_called = False
        self._reset_step_index()

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

    def _set_schedule(self, sigmas: torch.Tensor, device) -> None:
        """σ_0 > … > σ_{N−1} (rounded to what the network supports) plus the final σ_N, σ̂_i, and one timestep
        c_noise per model evaluation."""
        p = self.preconditioning
        sigmas = p.round_sigma(sigmas)
        num_inference_steps = len(sigmas)
        final = 0.0 if self.config.final_sigmas_type == "zero" else self.sigma_range[0]
        self.sigmas = torch.cat([sigmas, torch.tensor([final], dtype=torch.float64)])
        c = self.config
        s_tmax = math.inf if c.s_tmax is None else c.s_tmax
        gammas = churn_gamma(sigmas, num_inference_steps, c.s_churn, c.s_tmin, s_tmax)  # Algorithm 2 line 4
        self.sigmas_hat = churn_sigma(sigmas, gammas, p.round_sigma)
        self.num_inference_steps = num_inference_steps
        # python floats: step() reads them without touching a device tensor
        self._sigma_values: List[float] = self.sigmas.tolist()
        self._sigma_hat_values: List[float] = self.sigmas_hat.tolist()

        # One entry per model evaluation: the sampler step i it belongs to and whether it is the Heun correction,
        # which runs at σ_{i+1}; the first-order evaluation runs at σ̂_i (EDM Algorithm 2, lines 7 and 10).
        self._eval_step: List[int] = []
        self._eval_is_correction: List[bool] = []
        eval_sigmas: List[float] = []
        for i in range(num_inference_steps):
            self._eval_step.append(i)
            self._eval_is_correction.append(False)
            eval_sigmas.append(self._sigma_hat_values[i])
            if self._sigma_values[i + 1] > 0:
                self._eval_step.append(i)
                self._eval_is_correction.append(True)
                eval_sigmas.append(self._sigma_values[i + 1])
        self._eval_sigmas = torch.tensor(eval_sigmas, dtype=torch.float64)
        self._eval_sigma_values: List[float] = self._eval_sigmas.tolist()
        self._eval_c_in: List[float] = p.c_in(self._eval_sigmas).tolist()
        self.timesteps = p.c_noise(self._eval_sigmas).to(device=device, dtype=torch.float32)
        self._heun_state = None
        self.is_scale_input_called = False
        self._warned_unscaled = False

    @property
    def init_noise_sigma(self) -> float:
        """√(σ_0² + S_noise²·(σ̂_0² − σ_0²)): σ_0 (Algorithm 1 line 2) with step 0's churn folded in."""
        if self.num_inference_steps is None:
            return float(self.config.sigma_max)
        s0, s0_hat = self._sigma_values[0], self._sigma_hat_values[0]
        return math.sqrt(s0**2 + self.config.s_noise**2 * max(s0_hat**2 - s0**2, 0.0))

    # ----------------------------------------------------------------------------------------------------------
    # Which evaluation comes next

    def _is_step_start(self, index: int) -> bool:
        """Entries that start a sampler step are the first-order evaluations, not the Heun corrections (diffusers'
        Heun convention, so that ``timesteps[k * order:]`` starts at step k)."""
        return not self._eval_is_correction[index]

    @property
    def state_in_first_order(self) -> bool:
        """True when the next model evaluation is the Euler (first-order) one of a step."""
        return self._heun_state is None

    @property
    def current_sigma(self) -> float:
        """σ at which the model is evaluated at the current step index (σ̂_i or σ_{i+1})."""
        return self._eval_sigma_values[self._next_index]

    def sigma_for_timestep(self, timestep) -> float:
        """σ of the model evaluation at ``timestep``, any entry of ``timesteps`` (σ is a function of c_noise)."""
        timestep = torch.as_tensor(timestep, dtype=self.timesteps.dtype, device=self.timesteps.device)
        matches = (self.timesteps == timestep).nonzero().flatten().tolist()
        if not matches:
            raise ValueError(f"timestep {timestep.tolist()} is not one of scheduler.timesteps")
        return self._eval_sigma_values[matches[0]]

    # ----------------------------------------------------------------------------------------------------------
    # The sampler

    def scale_model_input(self, sample: torch.Tensor, timestep: Union[float, torch.Tensor]) -> torch.Tensor:
        """c_in(σ)·x, the network input at the current evaluation (EDM eq. 7)."""
        check_float_tensor("sample", sample)
        if self._step_index is None:
            self._init_step_index(timestep)
        self.is_scale_input_called = True
        return sample * self._eval_c_in[self._step_index]

    def precondition_outputs(self, sample: torch.Tensor, model_output: torch.Tensor, sigma) -> torch.Tensor:
        """D(x; σ) = c_skip·x + c_out·F (EDM eq. 7), as ``EDMEulerScheduler.precondition_outputs``."""
        return self.preconditioning.denoise(sample, model_output, sigma)

    def _churn(self, sample: torch.Tensor, i: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        """x̂_i = x_i + √(σ̂_i² − σ_i²)·S_noise·z, z ~ N(0, I) (Algorithm 2 lines 5–6); x_i itself when γ_i = 0."""
        sigma, sigma_hat = self._sigma_values[i], self._sigma_hat_values[i]
        if sigma_hat <= sigma:
            return sample
        z = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
        return churn(sample, sigma, sigma_hat, self.config.s_noise, z)

    def _step(self, index: int, x: torch.Tensor, model_output: torch.Tensor, generator) -> Dict[str, torch.Tensor]:
        """One model evaluation's worth of EDM Algorithm 2 (lines 7–11; Algorithm 1 lines 4–8 without churn).

        First-order call (the model ran at (x̂_i, σ̂_i)): d_i = (x̂_i − D)/σ̂_i, x' = x̂_i + (σ_{i+1} − σ̂_i)·d_i.
        If σ_{i+1} > 0, ``prev_sample`` is the predictor x' and the next call applies the correction
        x_{i+1} = x̂_i + (σ_{i+1} − σ̂_i)·(½d_i + ½d'_i) with d'_i = (x' − D(x'; σ_{i+1}))/σ_{i+1}; then the churn of
        step i+1.
        """
        if not self.is_scale_input_called and not self._warned_unscaled:
            logger.warning(
                "The `scale_model_input` function should be called before `step` to ensure correct denoising: "
                f"{type(self).__name__} expects the network input c_in(sigma)*x and initial latents of std "
                f"init_noise_sigma={self.init_noise_sigma:.4g}. A loop that skips both (e.g. diffusers' DDPMPipeline) "
                "samples from the wrong noise level; use EDMPipeline."
            )
            self._warned_unscaled = True
        i = self._eval_step[index]
        denoised = self.preconditioning.denoise(x, model_output, self._eval_sigma_values[index])
        sigma_hat, sigma_next = self._sigma_hat_values[i], self._sigma_values[i + 1]
        if not self._eval_is_correction[index]:
            d = slope(x, denoised, sigma_hat)
            prev = euler_update(x, d, sigma_hat, sigma_next)
            if sigma_next > 0:  # keep what the Heun correction needs; the step to σ = 0 stays Euler
                self._heun_state = (x, d)
        else:
            x_hat, d = self._heun_state
            prev = heun_update(x_hat, d, slope(x, denoised, sigma_next), sigma_hat, sigma_next)
            self._heun_state = None
        if self._heun_state is None and i + 1 < self.num_inference_steps:
            prev = self._churn(prev, i + 1, generator)
        return {"prev_sample": prev, "pred_original_sample": denoised}

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """x = y + σ·n with σ the noise level of each entry of ``timesteps`` (VE form, as ``EDMEulerScheduler``); a
        timestep that is not in the schedule (e.g. a DDPM timestep of −1) is refused.

        Args:
            original_samples: clean samples y (floating point).
            noise: standard-normal noise n of the same shape.
            timesteps: one entry of ``timesteps`` per sample (or one for all).
        """
        check_float_tensor("original_samples", original_samples)
        check_float_tensor("noise", noise)
        timesteps = torch.as_tensor(timesteps, device=self.timesteps.device).reshape(-1)
        sigma = torch.tensor([self.sigma_for_timestep(t) for t in timesteps], dtype=torch.float64)
        sigma = sigma.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return original_samples + noise * sigma
