"""Predictor–corrector samplers for the VE and VP SDEs, and their probability-flow ODE (Song et al. 2021, "Score-based
generative modeling through stochastic differential equations", Algorithms 2–5 and Appendix D) as a diffusers
scheduler."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..losses.score_matching import PREDICTION_TYPES, score_from_model_output, tweedie_denoise
from ..noise_schedules import linear_alpha_bar, ve_sigma, vp_beta

SDE_TYPES = ("ve", "vp")
PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")
PC_TIMESTEP_TYPES = ("sigma", "log_sigma", "t", "discrete", "none")


@dataclass
class PredictorCorrectorSchedulerOutput(BaseOutput):
    """Output of :meth:`PredictorCorrectorScheduler.step`.

    Args:
        prev_sample: the state after this corrector or predictor step (its noise-free mean after the last step when
            ``denoise_final``).
        prev_sample_mean: the same step without its noise term (``ScoreSdeVeScheduler``'s ``prev_sample_mean``).
        pred_original_sample: Tweedie's estimate of the clean sample, (x + σ²·s_θ)/√ᾱ at the current time.
    """

    prev_sample: torch.Tensor
    prev_sample_mean: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class PredictorCorrectorScheduler(SchedulerMixin, ConfigMixin):
    """PC sampling (Song et al. 2021, Algorithms 2–5) of the VE or VP SDE with a score network s_θ(x, t).

    SDEs, t ∈ [ε, 1] from t = 1 down to ε = ``sampling_eps``, then one last step to t = 0:

    * VE: x_t = x_0 + σ(t)·z, σ(t) = σ_min(σ_max/σ_min)^t; dx = √(dσ²/dt) dw. x(1) ~ N(0, σ_max²I).
    * VP: x_t = √ᾱ(t)·x_0 + √(1 − ᾱ(t))·z, ᾱ(t) = exp(−½t²(β_max − β_min) − tβ_min); dx = −½β(t)x dt + √β(t) dw.
      x(1) ~ N(0, I).

    Each sampling step i (t_i → t_{i+1}) runs ``correct_steps`` Langevin corrector steps at t_i, then one predictor
    step, each with its own network evaluation; ``timesteps`` has one entry per evaluation, so the standard diffusers
    loop runs it. With G_i² = σ_i² − σ_{i+1}² (VE) or β_i = 1 − ᾱ_i/ᾱ_{i+1} (VP) and s = s_θ(x, t_i):

    * predictor ``reverse_diffusion`` (eq. 47 / Algorithms 2–3): VE x ← x + G_i²·s + G_i·z;
      VP x ← (2 − √(1 − β_i))·x + β_i·s + √β_i·z. The last VE step goes to σ = 0, so its mean is Tweedie's estimate,
      as in ``ScoreSdeVeScheduler``.
    * predictor ``euler_maruyama``: x ← x − [f(x, t) − g(t)²·s]·Δt + g(t)√Δt·z, Δt = t_i − t_{i+1}
      (VE: f = 0, g² = 2σ(t)²·log(σ_max/σ_min); VP: f = −½β(t)x, g² = β(t)).
    * predictor ``none``: correctors only.
    * ``probability_flow=True``: the predictors integrate the probability-flow ODE dx = [f − ½g²·s] dt instead
      (g²·s halved, no noise); with ``correct_steps=0`` sampling is deterministic.
    * corrector (Langevin, Algorithms 4–5): z ~ N(0, I), ε = 2α_i·(r·‖z‖/‖s‖)² (norms averaged over the batch),
      x ← x + ε·s + √(2ε)·z, with r = ``snr`` and α_i = 1 (VE) or 1 − β_i (VP).

    With ``sde_type="ve"``, ``predictor="reverse_diffusion"`` and ``prediction_type="score"`` the updates are those of
    diffusers' ``ScoreSdeVeScheduler`` (``step_correct`` / ``step_pred``; same config keys and defaults, same noise
    draws from the ``generator``); the one difference is that both the network and the update use σ(t_i), where
    ``ScoreSdeVeScheduler`` updates with a geometric grid that omits ``sampling_eps`` (a relative difference below
    ``sampling_eps·log(σ_max/σ_min)``).

    Model input and timesteps: the network receives x unscaled (``scale_model_input`` is the identity) and, as
    ``timestep``, the entry of ``timesteps`` (float32): by ``timestep_type``, ``sigma`` = the marginal noise std σ(t)
    (VE σ; VP √(1 − ᾱ); ``ScoreSdeVePipeline`` feeds σ to NCSN++), ``log_sigma``, ``t``, ``discrete`` =
    t·(num_train_timesteps − 1) (Song et al.'s DDPM-trained VP models) or ``none`` (zeros). ``prediction_type``
    turns the output into the score with that std: ``score``, ``scaled_score`` (s = F/σ) or ``epsilon`` (s = −F/σ,
    a DDPM ε-network). Entries repeat, so ``step`` must be called once per entry, in order.

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
        denoise_final: the last step returns its noise-free mean (Song et al.'s ``denoise``).
        prediction_type: ``score``, ``scaled_score`` or ``epsilon``.
        timestep_type: ``sigma``, ``log_sigma``, ``t``, ``discrete`` or ``none``.
    """

    order = 1
    _compatibles = ["ScoreSdeVeScheduler"]

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
    ):
        for name, value, allowed in (
            ("sde_type", sde_type, SDE_TYPES),
            ("predictor", predictor, PREDICTORS),
            ("prediction_type", prediction_type, PREDICTION_TYPES),
            ("timestep_type", timestep_type, PC_TIMESTEP_TYPES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not (sigma_max > sigma_min > 0):
            raise ValueError(f"need sigma_max > sigma_min > 0, got sigma_max={sigma_max}, sigma_min={sigma_min}")
        if not (beta_max >= beta_min > 0):
            raise ValueError(f"need beta_max >= beta_min > 0, got beta_min={beta_min}, beta_max={beta_max}")
        if not 0 < sampling_eps < 1:
            raise ValueError(f"sampling_eps must be in (0, 1), got {sampling_eps}")
        if int(correct_steps) != correct_steps or correct_steps < 0:
            raise ValueError(f"correct_steps must be an integer >= 0, got {correct_steps}")
        if correct_steps > 0 and not snr > 0:
            raise ValueError(f"snr must be > 0, got {snr}")
        if predictor == "none" and correct_steps == 0:
            raise ValueError("predictor='none' needs correct_steps >= 1")
        if int(num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        self.init_noise_sigma = float(sigma_max) if sde_type == "ve" else 1.0
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._step_index = None
        self._begin_index = None

    # ----------------------------------------------------------------------------------------------------------
    # the SDE

    def marginal(self, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ(t), σ(t)) of x_t = √ᾱ(t)·x_0 + σ(t)·z (√ᾱ = 1 for VE)."""
        c = self.config
        t = torch.as_tensor(t, dtype=torch.float64)
        if c.sde_type == "ve":
            return torch.ones_like(t), ve_sigma(t, c.sigma_min, c.sigma_max)
        ab = linear_alpha_bar(t, c.beta_min, c.beta_max)
        return ab.sqrt(), (1 - ab).sqrt()

    def _timestep(self, t: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        kind = self.config.timestep_type
        value = {
            "sigma": std,
            "log_sigma": std.log(),
            "t": t,
            "discrete": t * (self.config.num_train_timesteps - 1),
            "none": torch.zeros_like(t),
        }[kind]
        return value.float()

    def set_timesteps(
        self,
        num_inference_steps: int,
        device: Union[str, torch.device, None] = None,
        sampling_eps: Optional[float] = None,
    ):
        """t_i = linspace(1, ε, N) and one timestep per network evaluation (M correctors then the predictor).

        Args:
            num_inference_steps: N, the number of sampling steps.
            device: where ``timesteps`` live (``sigmas`` and ``times`` stay on the CPU).
            sampling_eps: overrides the config's ε.
        """
        if num_inference_steps is None or int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps}")
        eps = self.config.sampling_eps if sampling_eps is None else sampling_eps
        if not 0 < eps < 1:
            raise ValueError(f"sampling_eps must be in (0, 1), got {eps}")
        n = int(num_inference_steps)
        t = torch.linspace(1, eps, n, dtype=torch.float64)
        self.times = torch.cat([t, t.new_zeros(1)])  # the last step goes to t = 0: σ = 0 (VE), ᾱ = 1 (VP)
        mean_coeff, std = self.marginal(self.times)
        mean_coeff[-1], std[-1] = 1.0, 0.0
        self.sigmas, self.alphas_cumprod = std, mean_coeff**2
        self.num_inference_steps = n
        M = int(self.config.correct_steps)
        self._entries = []  # (sampling step i, is it a corrector step)
        for i in range(n):
            self._entries += [(i, True)] * M
            if self.config.predictor != "none":
                self._entries.append((i, False))
        steps = torch.tensor([e[0] for e in self._entries])
        self.timesteps = self._timestep(self.times[steps], self.sigmas[steps]).to(device)
        self._step_index = None
        self._begin_index = None

    # ----------------------------------------------------------------------------------------------------------
    # diffusers' step-index bookkeeping

    @property
    def step_index(self) -> Optional[int]:
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start at entry ``begin_index`` of ``timesteps``."""
        if self.timesteps is None or not 0 <= begin_index < len(self.timesteps):
            raise ValueError(f"begin_index must be in [0, len(timesteps)), got {begin_index}; call set_timesteps first")
        self._begin_index = begin_index

    def __len__(self):
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The identity: score networks receive x_t unscaled."""
        return sample

    # ----------------------------------------------------------------------------------------------------------
    # the sampler

    def _beta(self, i: int) -> float:
        """β_i = 1 − ᾱ_i/ᾱ_{i+1} of the VP step t_i → t_{i+1}."""
        return 1.0 - float(self.alphas_cumprod[i] / self.alphas_cumprod[i + 1])

    def _corrector(self, x, score, i, z):
        """Langevin corrector (Algorithms 4–5)."""
        alpha = 1.0 if self.config.sde_type == "ve" else 1.0 - self._beta(i)
        grad_norm = score.flatten(1).norm(dim=1).mean()
        noise_norm = z.flatten(1).norm(dim=1).mean()
        eps = 2 * alpha * (self.config.snr * noise_norm / grad_norm) ** 2
        mean = x + eps * score
        return mean, mean + (2 * eps).sqrt() * z

    def _predictor(self, x, score, i, z):
        """Reverse-diffusion or Euler–Maruyama step t_i → t_{i+1} of the reverse SDE or the probability-flow ODE."""
        c = self.config
        half = 0.5 if c.probability_flow else 1.0
        if c.predictor == "reverse_diffusion":
            if c.sde_type == "ve":
                g2 = float(self.sigmas[i] ** 2 - self.sigmas[i + 1] ** 2)
                mean = x + half * g2 * score
            else:
                g2 = self._beta(i)
                mean = (2 - math.sqrt(1 - g2)) * x + half * g2 * score
        else:  # euler_maruyama
            t, dt = float(self.times[i]), float(self.times[i] - self.times[i + 1])
            if c.sde_type == "ve":
                g2 = 2 * float(self.sigmas[i]) ** 2 * math.log(c.sigma_max / c.sigma_min) * dt
                mean = x + half * g2 * score
            else:
                g2 = float(vp_beta(t, c.beta_min, c.beta_max)) * dt
                mean = x + 0.5 * g2 * x + half * g2 * score
        if c.probability_flow:
            return mean, mean
        return mean, mean + math.sqrt(g2) * z

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[PredictorCorrectorSchedulerOutput, Tuple]:
        """One corrector or predictor step, as the entry of ``timesteps`` says.

        Args:
            model_output: the network output at (``sample``, ``timestep``), turned into s_θ by ``prediction_type``.
            timestep: the current entry of ``timesteps`` (not looked up: entries repeat).
            sample: the current state x_t.
            generator: random generator for z.
            return_dict: return a :class:`PredictorCorrectorSchedulerOutput` rather than a tuple.
        """
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = self._begin_index or 0
        k = self._step_index
        if k >= len(self._entries):
            raise ValueError("step was called more often than there are timesteps; call set_timesteps again")
        i, is_corrector = self._entries[k]
        c = self.config
        x = sample.to(torch.float64)
        std = float(self.sigmas[i])
        score = score_from_model_output(model_output.to(torch.float64), std, c.prediction_type)
        denoised = tweedie_denoise(x, score, std, float(self.alphas_cumprod[i]) ** 0.5)
        needs_noise = is_corrector or not c.probability_flow
        z = None
        if needs_noise:
            z = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32).double()
        mean, prev = (self._corrector if is_corrector else self._predictor)(x, score, i, z)
        if k == len(self._entries) - 1 and c.denoise_final:
            prev = mean
        if torch.isnan(prev).any():
            raise ValueError(f"the sampler produced NaN at step {i} (t={float(self.times[i]):.4g})")
        self._step_index += 1
        prev, mean, denoised = prev.to(sample.dtype), mean.to(sample.dtype), denoised.to(sample.dtype)
        if not return_dict:
            return (prev, mean, denoised)
        return PredictorCorrectorSchedulerOutput(prev_sample=prev, prev_sample_mean=mean, pred_original_sample=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ(t)·x_0 + σ(t)·z for timesteps of type ``timestep_type`` (not ``none``)."""
        c = self.config
        ts = torch.as_tensor(timesteps).reshape(-1).double().cpu()
        if c.timestep_type == "none":
            raise ValueError("timestep_type='none' carries no time; add_noise cannot recover the noise level")
        if c.timestep_type in ("t", "discrete"):
            mean_coeff, std = self.marginal(ts if c.timestep_type == "t" else ts / (c.num_train_timesteps - 1))
        else:
            std = ts if c.timestep_type == "sigma" else ts.exp()
            mean_coeff = torch.ones_like(std) if c.sde_type == "ve" else (1 - std**2).clamp(min=0).sqrt()
        shape = (-1, *([1] * (original_samples.ndim - 1)))
        mean_coeff = mean_coeff.to(original_samples.device, original_samples.dtype).reshape(shape)
        std = std.to(original_samples.device, original_samples.dtype).reshape(shape)
        return mean_coeff * original_samples + std * noise
