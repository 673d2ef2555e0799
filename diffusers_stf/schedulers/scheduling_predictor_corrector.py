"""Predictor–corrector samplers for the VE and VP SDEs, and their probability-flow ODE (Song et al. 2021, "Score-based
generative modeling through stochastic differential equations", Algorithms 2–5 and Appendix D) as a diffusers
scheduler."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..preconditioning import SCORE_PREDICTION_TYPES, SCORE_SDE_TIMESTEP_TYPES, make_preconditioning
from .input_checks import check_choices, check_sigma_range, check_step_count
from .scheduling_base import PreconditionedScheduler

SDE_TYPES = ("ve", "vp")
PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")
DISCRETIZATIONS = ("score_sde", "marginal")


@dataclass
class PredictorCorrectorSchedulerOutput(BaseOutput):
    """Output of :meth:`PredictorCorrectorScheduler.step`.

    Args:
        prev_sample: the state after this corrector or predictor step (after the last step, what the sampler returns:
            the noise-free mean when ``denoise_final``).
        prev_sample_mean: the same step without its noise term (``ScoreSdeVeScheduler``'s ``prev_sample_mean``).
        pred_original_sample: Tweedie's estimate of the clean sample, (x_t + std²·s_θ)/√ᾱ at the current time.
    """

    prev_sample: torch.Tensor
    prev_sample_mean: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class PredictorCorrectorScheduler(PreconditionedScheduler):
    """PC sampling (Song et al. 2021, Algorithms 2–5) of the VE or VP SDE with a score network s_θ(x, t).

    SDEs, t from 1 down to ε = ``sampling_eps``:

    * VE: x_t = x_0 + σ(t)·z, σ(t) = σ_min(σ_max/σ_min)^t; dx = √(dσ²/dt) dw. x(1) ~ N(0, σ_max²I).
    * VP: x_t = √ᾱ(t)·x_0 + √(1 − ᾱ(t))·z, ᾱ(t) = exp(−½t²(β_max − β_min) − tβ_min); dx = −½β(t)x dt + √β(t) dw.
      x(1) ~ N(0, I).

    ``discretization="score_sde"`` (default) is score_sde's ``get_pc_sampler`` step for step (same noise, same
    samples): N = ``num_inference_steps`` steps on t_i = linspace(1, ε, N); step i runs ``correct_steps`` Langevin
    corrector steps at t_i, then one predictor step at t_i, each with its own network evaluation. With
    j = ⌊t_i·(N − 1)⌋ and score_sde's tables for an SDE of N steps (``sde_lib.VESDE``/``VPSDE.discretize``):
    σ_j = exp(linspace(ln σ_min, ln σ_max, N))_j with σ_{−1} = 0, and β_j = linspace(β_min/N, β_max/N, N)_j:

    * predictor ``reverse_diffusion`` (eq. 47, Algorithms 2–3), with h = σ_j² − σ_{j−1}² (VE) or h = β_j (VP):
      VE x ← x + h·s + √h·z; VP x ← (2 − √(1 − h))·x + h·s + √h·z.
    * predictor ``euler_maruyama``: x ← x − [f(x, t_i) − g(t_i)²·s]·Δt + g(t_i)√Δt·z with Δt = 1/N at every step
      (VE: f = 0, g² = 2σ(t)²·ln(σ_max/σ_min); VP: f = −½β(t)x, g² = β(t)).
    * predictor ``none``: correctors only; the sampler returns the last corrector's x (score_sde's ``NonePredictor``).
    * ``probability_flow=True``: the predictors follow the probability-flow ODE (g²·s and h·s halved, noise times 0;
      z is still drawn, as in score_sde). With ``correct_steps=0`` sampling is deterministic.
    * corrector (Langevin, Algorithms 4–5): z ~ N(0, I), ε = 2α·(r·‖z‖/‖s‖)² (norms averaged over the batch),
      x ← x + ε·s + √(2ε)·z, with r = ``snr`` and α = 1 (VE) or 1 − β_j (VP).

    VP's table has β_j ≥ 1 when N ≤ β_max (score_sde then returns NaN); ``set_timesteps`` refuses such an N.

    ``discretization="marginal"`` keeps the steps on the continuous marginals instead: the grid gets a last step to
    t = 0, reverse diffusion uses h = σ(t_i)² − σ(t_{i+1})² (VE) or h = 1 − ᾱ(t_i)/ᾱ(t_{i+1}) (VP), Euler–Maruyama
    Δt = t_i − t_{i+1}, the corrector α = 1 − h (VP), the probability-flow predictor draws no noise, and predictor
    ``none`` returns the last corrector's mean.

    The VE ``score_sde`` sampler with ``prediction_type="score"`` is diffusers' ``ScoreSdeVeScheduler``
    (``step_correct``/``step_pred``; same config keys and defaults, same noise draws from the ``generator``).

    Model input and timesteps: the network receives the state x_t unscaled (``scale_model_input`` is the identity)
    and, as ``timestep``, the entry of ``timesteps``. Both the timestep and how the output becomes the score are the
    network's :class:`~diffusers_stf.preconditioning.ScoreSDEPreconditioning` (``self.preconditioning``), built from
    ``prediction_type`` (``score``, ``scaled_score`` = std·s, ``epsilon`` = −std·s) and ``timestep_type`` (``sigma``
    = the noise std of x_t, ``log_sigma``, ``t``, ``discrete`` = t·(num_train_timesteps − 1), ``none``). Entries
    repeat within a sampling step; a loop over ``timesteps[k:]`` from the first entry k of a step starts there, as
    after ``set_begin_index(k)``. With ``timestep_type="none"`` every entry is 0 and only ``set_begin_index`` can
    say where a partial loop starts.

    Args:
        num_train_timesteps: N of the ``discrete`` timestep convention (2000, as ``ScoreSdeVeScheduler``).
        snr: r, the corrector's signal-to-noise ratio (Song et al.: 0.16 for VE, 0.01–0.27 for VP).
        sigma_min, sigma_max: the VE SDE's σ range.
        sampling_eps: ε, the last time of the grid t_i = linspace(1, ε, N).
        correct_steps: M ≥ 0, corrector steps per sampling step.
        sde_type: ``ve`` or ``vp``.
        beta_min, beta_max: the VP SDE's β(t) range (0.1 and 20 = DDPM's linear β for 1000 steps).
        predictor: ``reverse_diffusion``, ``euler_maruyama`` or ``none``.
        probability_flow: predictors follow the probability-flow ODE.
        denoise_final: the sampler returns the last step's noise-free mean (score_sde's ``denoise``).
        prediction_type: ``score``, ``scaled_score`` or ``epsilon``.
        timestep_type: ``sigma``, ``log_sigma``, ``t``, ``discrete`` or ``none``.
        discretization: ``score_sde`` (score_sde's tables and Δt = 1/N) or ``marginal`` (the continuous marginals).
    """

    _compatibles = ["ScoreSdeVeScheduler"]
    output_class = PredictorCorrectorSchedulerOutput

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 2000,
        snr: float = 0.15,
        sigma_min: float = 0.01,
        sigma_max: float = 1348.0,
        sampling_eps: float = 1e-5,
        correct_steps: int = 1,
        sde_type: str = "ve",
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        predictor: str = "reverse_diffusion",
        probability_flow: bool = False,
        denoise_final: bool = True,
        prediction_type: str = "score",
        timestep_type: str = "sigma",
        discretization: str = "score_sde",
    ):
        check_choices(
            ("sde_type", sde_type, SDE_TYPES),
            ("predictor", predictor, PREDICTORS),
            ("prediction_type", prediction_type, SCORE_PREDICTION_TYPES),
            ("timestep_type", timestep_type, SCORE_SDE_TIMESTEP_TYPES),
            ("discretization", discretization, DISCRETIZATIONS),
        )
        check_sigma_range(sigma_min, sigma_max)
        if not (math.isfinite(beta_max) and beta_max >= beta_min > 0):
            raise ValueError(f"need beta_max >= beta_min > 0, got beta_min={beta_min}, beta_max={beta_max}")
        if not 0 < sampling_eps < 1:
            raise ValueError(f"sampling_eps must be in (0, 1), got {sampling_eps}")
        if isinstance(correct_steps, bool) or int(correct_steps) != correct_steps or correct_steps < 0:
            raise ValueError(f"correct_steps must be an integer >= 0, got {correct_steps}")
        if correct_steps > 0 and not (math.isfinite(snr) and snr > 0):
            raise ValueError(f"snr must be a finite number > 0, got {snr}")
        if predictor == "none" and correct_steps == 0:
            raise ValueError("predictor='none' needs correct_steps >= 1")
        if int(num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        self.preconditioning = make_preconditioning(
            f"score_sde_{sde_type}",
            prediction_type=prediction_type,
            timestep_type=timestep_type,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            beta_min=beta_min,
            beta_max=beta_max,
            num_train_timesteps=num_train_timesteps,
        )
        self.init_noise_sigma = float(sigma_max) if sde_type == "ve" else 1.0
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._reset_step_index()

    # ----------------------------------------------------------------------------------------------------------
    # the discretisation

    def _score_sde_tables(self, t: torch.Tensor, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(h_i, α_i): the reverse-diffusion variance and the corrector's α at t_i from score_sde's tables of an SDE
        with N = n steps, read at j = ⌊t_i·(N − 1)⌋ (``VESDE``/``VPSDE.discretize``, ``LangevinCorrector``)."""
        c = self.config
        j = (t * (n - 1)).long()
        if c.sde_type == "ve":
            table = torch.exp(torch.linspace(math.log(c.sigma_min), math.log(c.sigma_max), n, dtype=torch.float64))
            below = torch.where(j > 0, table[(j - 1).clamp(min=0)], torch.zeros_like(t))
            return table[j] ** 2 - below**2, torch.ones_like(t)
        betas = torch.linspace(c.beta_min / n, c.beta_max / n, n, dtype=torch.float64)
        uses_table = c.predictor == "reverse_diffusion" or c.correct_steps > 0
        if uses_table and c.beta_max / n >= 1:
            raise ValueError(
                f"num_inference_steps={n} makes score_sde's VP table beta_j = linspace(beta_min/N, beta_max/N, N) "
                f"reach beta_max/N = {c.beta_max / n:.4g} >= 1, where the reverse-diffusion predictor and the "
                f"corrector break down (score_sde returns NaN); use num_inference_steps > {c.beta_max:g}"
            )
        return betas[j], 1 - betas[j]

    def _marginal_tables(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(h_i, α_i) on the continuous marginals between t_i and t_{i+1} (t_N = 0)."""
        mean_coeff, std = self._marginal(torch.cat([t, t.new_zeros(1)]))
        mean_coeff[-1], std[-1] = 1.0, 0.0
        if self.config.sde_type == "ve":
            return std[:-1] ** 2 - std[1:] ** 2, torch.ones_like(t)
        beta = 1 - mean_coeff[:-1] ** 2 / mean_coeff[1:] ** 2
        return beta, 1 - beta

    def _marginal(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(m(t), std(t)) of x_t = m·x_0 + std·z."""
        sigma = self.preconditioning.sigma(t)
        m = self.preconditioning.mean_coefficient(sigma)
        return m, m * sigma

    def _diffusion_squared(self, t: torch.Tensor) -> torch.Tensor:
        """g(t)² of the forward SDE: VE 2σ(t)²·ln(σ_max/σ_min), VP β(t)."""
        c = self.config
        if c.sde_type == "ve":
            return 2 * self.preconditioning.sigma(t) ** 2 * math.log(c.sigma_max / c.sigma_min)
        return c.beta_min + t * (c.beta_max - c.beta_min)

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: Union[str, torch.device, None] = None,
        sampling_eps: Optional[float] = None,
    ):
        """t_i = linspace(1, ε, N) and one timestep per network evaluation (M correctors then the predictor).

        Args:
            num_inference_steps: N, the number of sampling steps (an int; numpy and 0-d torch integers too).
            device: where ``timesteps`` live (``sigmas`` and ``times`` stay on the CPU).
            sampling_eps: overrides the config's ε.
        """
        n = check_step_count("num_inference_steps", num_inference_steps)
        c = self.config
        eps = c.sampling_eps if sampling_eps is None else sampling_eps
        if not 0 < eps < 1:
            raise ValueError(f"sampling_eps must be in (0, 1), got {eps}")
        t = torch.linspace(1, eps, n, dtype=torch.float64)
        if c.discretization == "score_sde":
            h, alpha = self._score_sde_tables(t, n)
            dt = torch.full_like(t, 1.0 / n)
        else:
            h, alpha = self._marginal_tables(t)
            dt = t - torch.cat([t[1:], t.new_zeros(1)])
        if c.predictor == "euler_maruyama":
            h = self._diffusion_squared(t) * dt
        self.times = t
        self._noise_levels = self.preconditioning.sigma(t)  # σ(t_i) of x = x_t/m, what the preconditioning takes
        self._mean_coeff, self.sigmas = self._marginal(t)  # m(t_i) and the noise std of x_t
        self._h, self._alpha = h, alpha
        self.num_inference_steps = n

        M = int(c.correct_steps)
        self._entry_step: List[int] = []
        self._entry_is_corrector: List[bool] = []
        for i in range(n):
            kinds = [True] * M + ([False] if c.predictor != "none" else [])
            self._entry_step += [i] * len(kinds)
            self._entry_is_corrector += kinds
        steps = torch.tensor(self._entry_step)
        self.timesteps = self.preconditioning.c_noise(self._noise_levels[steps]).to(device=device, dtype=torch.float32)
        self._reset_step_index()

    def _is_step_start(self, index: int) -> bool:
        return index == 0 or self._entry_step[index] != self._entry_step[index - 1]

    @property
    def current_sigma(self) -> float:
        """σ(t_i) of the coming network evaluation, in the coordinates x = x_t/m of the preconditioning."""
        return float(self._noise_levels[self._entry_step[self._next_index]])

    @property
    def current_state_scale(self) -> float:
        """m(t_i): the state is x_t = m·x (1 for VE, √ᾱ(t_i) for VP)."""
        return float(self._mean_coeff[self._entry_step[self._next_index]])

    # ----------------------------------------------------------------------------------------------------------
    # the sampler

    def _corrector(self, x, score, i, z):
        """Langevin corrector (Algorithms 4–5; score_sde's ``LangevinCorrector``)."""
        grad_norm = score.flatten(1).norm(dim=1).mean()
        noise_norm = z.flatten(1).norm(dim=1).mean()
        eps = 2 * float(self._alpha[i]) * (self.config.snr * noise_norm / grad_norm) ** 2
        mean = x + eps * score
        return mean, mean + (2 * eps).sqrt() * z

    def _predictor(self, x, score, i, z):
        """Reverse-diffusion or Euler–Maruyama step of the reverse SDE or the probability-flow ODE."""
        c = self.config
        h = float(self._h[i])
        half = 0.5 if c.probability_flow else 1.0
        if c.sde_type == "ve":
            mean = x + half * h * score
        elif c.predictor == "reverse_diffusion":
            mean = (2 - math.sqrt(1 - h)) * x + half * h * score
        else:
            mean = x + 0.5 * h * x + half * h * score
        if c.probability_flow:
            return mean, mean
        return mean, mean + math.sqrt(h) * z

    def _step(self, k: int, x: torch.Tensor, output: torch.Tensor, generator) -> Dict[str, torch.Tensor]:
        """One corrector or predictor step, as entry ``k`` of ``timesteps`` says; the network input is the SDE's
        state x_t itself (c_in·x = m·x = x_t)."""
        i, is_corrector = self._entry_step[k], self._entry_is_corrector[k]
        c = self.config
        sigma, m = float(self._noise_levels[i]), float(self._mean_coeff[i])  # host numbers: no device copy
        denoised = self.preconditioning.denoise(x / m, output, sigma)
        score = self.preconditioning.score(x, output, sigma)
        z = None
        if is_corrector or not c.probability_flow or c.discretization == "score_sde":
            z = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32).double()
        mean, prev = (self._corrector if is_corrector else self._predictor)(x, score, i, z)
        corrector_only = c.predictor == "none" and c.discretization == "score_sde"
        if k == len(self._entry_step) - 1 and c.denoise_final and not corrector_only:
            prev = mean
        return {"prev_sample": prev, "prev_sample_mean": mean, "pred_original_sample": denoised}

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ(t)·x_0 + std(t)·z for timesteps of type ``timestep_type`` (not ``none``)."""
        sigma = self.preconditioning.sigma_of_timestep(torch.as_tensor(timesteps).reshape(-1).double().cpu())
        m = self.preconditioning.mean_coefficient(sigma)
        shape = (-1, *([1] * (original_samples.ndim - 1)))
        m, std = (v.to(original_samples.device, original_samples.dtype).reshape(shape) for v in (m, m * sigma))
        return m * original_samples + std * noise
