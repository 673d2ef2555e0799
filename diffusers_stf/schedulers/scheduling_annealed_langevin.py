"""Annealed Langevin dynamics (Song & Ermon 2019, "NCSN", Algorithm 1) and consistent annealed sampling
(Jolicoeur-Martineau et al. 2021, Algorithm 2) as a diffusers scheduler."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..noise_schedules import geometric_sigmas
from ..preconditioning import NCSN_TIMESTEP_TYPES, SCORE_PREDICTION_TYPES, make_preconditioning
from .input_checks import check_choices, check_sigma_range, check_step_count
from .scheduling_base import PreconditionedScheduler

SAMPLERS = ("als", "cas")


@dataclass
class AnnealedLangevinSchedulerOutput(BaseOutput):
    """Output of :meth:`AnnealedLangevinScheduler.step`.

    Args:
        prev_sample: the state after this Langevin step (the Tweedie estimate after the final denoising step).
        pred_original_sample: Tweedie's estimate x + σ²·s_θ(x, σ) of the clean sample at the current level.
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class AnnealedLangevinScheduler(PreconditionedScheduler):
    """Annealed Langevin sampling of a noise-conditional score network s_θ(x, σ).

    ``sampler="als"`` (NCSN Algorithm 1, with the update of NCSNv2 Algorithm 1 and the official code):

        for i = 1..L:  α_i = ε·σ_i²/σ_L²;  repeat T times:  x ← x + α_i·s_θ(x, σ_i) + √(2α_i)·z

    (NCSN's paper writes x + (α/2)s + √α z, i.e. its ε is twice this one; its code uses this form.)

    ``sampler="cas"`` (consistent annealed sampling): one step per level of the geometric schedule refined to
    (L − 1)·T + 1 levels between σ_1 and σ_L (the same number of network evaluations as ALS), keeping the noise
    variance on the schedule (CAS Proposition 2):

        α_i = η·σ_i²/σ_L²,  x ← x + α_i·s_θ(x, σ_i) + β_i·σ_{i+1}·z,  β_i = √(1 − (1 − η/σ_L²)²/γ_i²),
        γ_i = σ_{i+1}/σ_i,  σ_{n+1} = 0 (no noise, and no draw, on the last step, as the official code).

    η is ``step_size`` (ε above) and must satisfy σ_L²(1 − γ_i) ≤ η ≤ σ_L²(1 + γ_i) for every step.
    With ``denoise_final=True`` one more network evaluation at σ_L returns Tweedie's x + σ_L²·s_θ(x, σ_L)
    (NCSNv2's final denoising, for CAS too).

    Model input and timesteps: the network receives the sample unscaled (``scale_model_input`` is the identity) and,
    as ``timestep``, the value in ``timesteps``: one entry per network evaluation, L·T for ALS, (L − 1)·T + 1 for
    CAS, plus one for the final denoising. What the timestep means and how the output becomes the score is the
    network's :class:`~diffusers_stf.preconditioning.NCSNPreconditioning` (``self.preconditioning``), built from
    ``prediction_type`` and ``timestep_type`` (``index``: the NCSN label of the level, 0 = σ_1, int64;
    ``log_sigma``; ``sigma``; ``none``: zeros, for an unconditional NCSNv2 network) and the training levels. Entries
    repeat within a level; a loop over ``timesteps[k:]`` from the first entry k of a level starts there, as after
    ``set_begin_index(k)``. The final denoising entry repeats σ_L's timestep, and with ``timestep_type="none"`` every
    entry is 0: there only ``set_begin_index`` can say where a partial loop starts. The initial sample is
    x ~ N(0, σ_1²I) (``init_noise_sigma``; NCSN drew it from U[0, 1], which matters little when σ_1 covers the data,
    NCSNv2 Technique 1).

    Args:
        sigma_max: σ_1, the largest noise level (NCSN: 1; NCSNv2: Technique 1).
        sigma_min: σ_L, the smallest noise level.
        num_train_timesteps: L of the training table σ_1 > … > σ_L (geometric): the levels an ``index`` network knows,
            and the default number of sampling levels.
        steps_per_level: T, the Langevin steps per level (NCSN: 100; NCSNv2: 5).
        step_size: ε (η for CAS) > 0 (NCSN: 2e-5; NCSNv2 Technique 4, ``noise_schedules.ncsnv2_step_size``).
        sampler: ``als`` or ``cas``.
        denoise_final: finish with Tweedie's denoising step at σ_L.
        prediction_type: what the network outputs: ``score``, ``scaled_score`` (σ·s, NCSNv2) or ``epsilon`` (−σ·s).
        timestep_type: what the network receives: ``index``, ``log_sigma``, ``sigma`` or ``none``.
    """

    _compatibles = []
    output_class = AnnealedLangevinSchedulerOutput

    @register_to_config
    def __init__(
        self,
        sigma_max: float = 1.0,
        sigma_min: float = 0.01,
        num_train_timesteps: int = 10,
        steps_per_level: int = 100,
        step_size: float = 2e-5,
        sampler: str = "als",
        denoise_final: bool = False,
        prediction_type: str = "score",
        timestep_type: str = "index",
    ):
        check_sigma_range(sigma_min, sigma_max)
        check_step_count("num_train_timesteps", num_train_timesteps)
        check_step_count("steps_per_level (T)", steps_per_level)
        if not (math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"step_size must be a finite number > 0, got {step_size}")
        check_choices(
            ("sampler", sampler, SAMPLERS),
            ("prediction_type", prediction_type, SCORE_PREDICTION_TYPES),
            ("timestep_type", timestep_type, NCSN_TIMESTEP_TYPES),
        )
        if timestep_type == "index" and num_train_timesteps < 2:
            raise ValueError("timestep_type='index' needs num_train_timesteps >= 2 levels (one level: use 'none')")
        self.train_sigmas = self._geometric(sigma_max, sigma_min, int(num_train_timesteps))
        self.preconditioning = make_preconditioning(
            "ncsn", prediction_type=prediction_type, timestep_type=timestep_type, sigmas=self.train_sigmas
        )
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._reset_step_index()

    @staticmethod
    def _geometric(sigma_max: float, sigma_min: float, n: int) -> torch.Tensor:
        return geometric_sigmas(sigma_max, sigma_min, n) if n > 1 else torch.tensor([sigma_max], dtype=torch.float64)

    # ----------------------------------------------------------------------------------------------------------
    # schedule

    @property
    def default_num_inference_steps(self) -> int:
        """L defaults to the training table's ``num_train_timesteps`` levels."""
        return self.config.num_train_timesteps

    def _sigma_schedule(self, n: int) -> torch.Tensor:
        """L levels, geometric from ``sigma_max`` to ``sigma_min``."""
        return self._geometric(self.config.sigma_max, self.config.sigma_min, n)

    def _set_schedule(self, levels: torch.Tensor, device) -> None:
        """The levels σ_1 > … > σ_L, refined for CAS, and one timestep per network evaluation: T per level."""
        c = self.config
        if c.timestep_type == "index":  # an index network knows only its training levels
            levels = self.preconditioning.round_sigma(levels)
            if len(levels) > 1 and not bool((levels[1:] < levels[:-1]).all()):
                raise ValueError("with timestep_type='index' the levels must be distinct training levels")
        self.levels = levels
        T = int(c.steps_per_level)

        if c.sampler == "als":
            sigmas = levels.repeat_interleave(T)
            starts = [k % T == 0 for k in range(len(sigmas))]
        else:
            if c.timestep_type == "index" and T > 1 and len(levels) > 1:
                raise ValueError(
                    "sampler='cas' refines the schedule to (L-1)*T+1 levels, which an index network was not trained "
                    "on: use steps_per_level=1 or a continuous timestep_type"
                )
            log_levels = levels.log()
            if len(levels) > 1 and T > 1:  # geometric refinement between consecutive levels
                frac = torch.arange(T, dtype=torch.float64) / T
                inner = log_levels[:-1, None] + frac[None, :] * (log_levels[1:] - log_levels[:-1])[:, None]
                log_levels = torch.cat([inner.flatten(), log_levels[-1:]])
            sigmas = log_levels.exp()
            self._check_cas_step_size(sigmas)
            starts = [True] * len(sigmas)
        self._is_denoise = [False] * len(sigmas)
        if c.denoise_final:
            sigmas = torch.cat([sigmas, levels[-1:]])
            self._is_denoise.append(True)
            starts.append(True)
        self._starts = starts
        self.sigmas = sigmas
        alpha = c.step_size * sigmas**2 / float(levels[-1]) ** 2
        self._step_sizes = torch.where(torch.tensor(self._is_denoise), torch.zeros_like(alpha), alpha)
        self.num_inference_steps = len(levels)
        timesteps = self.preconditioning.c_noise(sigmas)
        self.timesteps = timesteps.to(device=device, dtype=torch.int64 if c.timestep_type == "index" else torch.float32)

    def _check_cas_step_size(self, sigmas: torch.Tensor):
        if len(sigmas) < 2:
            return
        eta = self.config.step_size / float(sigmas[-1]) ** 2
        gamma = sigmas[1:] / sigmas[:-1]
        lo, hi = float((1 - gamma).max()), float((1 + gamma).min())
        if not lo <= eta <= hi:
            s2 = float(sigmas[-1]) ** 2
            raise ValueError(
                f"step_size={self.config.step_size} is outside the range where CAS can keep the noise on the schedule, "
                f"[{lo * s2:.4g}, {hi * s2:.4g}] = sigma_L^2 * [1 - gamma, 1 + gamma]"
            )

    @property
    def init_noise_sigma(self) -> float:
        """σ_1: the initial sample is N(0, σ_1²I)."""
        return float(self.config.sigma_max if self.sigmas is None else self.sigmas[0])

    def step_sizes(self) -> torch.Tensor:
        """α for each entry of ``timesteps``: ε·σ²/σ_L² (0 for the final denoising step)."""
        return self._step_sizes

    def _is_step_start(self, index: int) -> bool:
        return self._starts[index]

    @property
    def current_sigma(self) -> float:
        """σ at which the network is evaluated for the next ``step``."""
        return float(self.sigmas[self._next_index])

    # ----------------------------------------------------------------------------------------------------------
    # the sampler

    def _step(self, i: int, x: torch.Tensor, output: torch.Tensor, generator) -> Dict[str, torch.Tensor]:
        """One Langevin step (ALS), one CAS step, or the final Tweedie denoising step; the network input is x itself
        (c_in = 1)."""
        c = self.config
        sigma = float(self.sigmas[i])
        denoised = self.preconditioning.denoise(x, output, sigma)
        if self._is_denoise[i]:
            prev = denoised
        else:
            score = self.preconditioning.score(x, output, sigma)
            alpha = float(self._step_sizes[i])
            prev = x + alpha * score
            last = i + 1 >= len(self.sigmas) or self._is_denoise[i + 1]
            if c.sampler == "als" or not last:
                z = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32).double()
                if c.sampler == "als":
                    prev = prev + math.sqrt(2 * alpha) * z
                else:
                    sigma_next = float(self.sigmas[i + 1])
                    eta = c.step_size / float(self.levels[-1]) ** 2
                    beta = math.sqrt(max(1 - (1 - eta) ** 2 * (sigma / sigma_next) ** 2, 0.0))
                    prev = prev + beta * sigma_next * z
        return {"prev_sample": prev, "pred_original_sample": denoised}

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x̃ = x + σ·z with σ the noise level of each timestep (of type ``timestep_type``; not ``none``)."""
        sigma = self.preconditioning.sigma_of_timestep(torch.as_tensor(timesteps).reshape(-1).cpu())
        sigma = sigma.to(device=original_samples.device, dtype=original_samples.dtype)
        return original_samples + noise * sigma.reshape(-1, *([1] * (original_samples.ndim - 1)))
