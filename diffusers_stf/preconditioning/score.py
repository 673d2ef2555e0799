"""Score networks as preconditionings: NCSN (Song & Ermon 2019, 2020) and the score SDEs (Song et al. 2021).

A score network's output F becomes a denoiser through Tweedie's formula, E[y | x] = x + σ²·∇ log p_σ(x) for
x = y + σ·n, so D = c_skip·x + c_out·F with c_skip = 1 and the score is s = (D − x)/σ². The samplers
(AnnealedLangevinScheduler, PredictorCorrectorScheduler) and the denoising score matching loss go through these
classes only, like the EDM samplers and losses go through :mod:`~diffusers_stf.preconditioning.edm_table`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..noise_schedules import ve_sigma, ve_time
from .base import Preconditioning, TensorOrFloat, as_sigma, check_choice
from .edm_table import DiscreteTimePreconditioning, VPPreconditioning

SCORE_PREDICTION_TYPES = ("score", "scaled_score", "epsilon")
NCSN_TIMESTEP_TYPES = ("index", "log_sigma", "sigma", "none")
SCORE_SDE_TIMESTEP_TYPES = ("sigma", "log_sigma", "t", "discrete", "none")
SCORE_PRECONDITIONINGS = ("ncsn", "score_sde_ve", "score_sde_vp")


class ScorePreconditioning(Preconditioning):
    """A network whose output F is a score, scaled by what ``prediction_type`` says.

    The network sees the state x_t = m(σ)·x of its SDE, x = y + σ·n (m = 1 for VE/NCSN, m = 1/√(1+σ²) for VP), so
    c_in = m. Its output is, with std = m·σ the standard deviation of the noise in x_t and s_t = ∇ log p(x_t):

    ================  ========================  ====================
    prediction_type   F                         c_out (c_skip = 1)
    ================  ========================  ====================
    ``score``         s_t                       σ²·m
    ``scaled_score``  std·s_t (NCSNv2, EDM VE)  σ
    ``epsilon``       −std·s_t (DDPM's ε)       −σ
    ================  ========================  ====================

    Args:
        prediction_type: ``score``, ``scaled_score`` or ``epsilon``.
    """

    def __init__(self, prediction_type: str = "score"):
        check_choice("prediction_type", prediction_type, SCORE_PREDICTION_TYPES)
        self.prediction_type = prediction_type

    def mean_coefficient(self, sigma: torch.Tensor) -> torch.Tensor:
        """m(σ) of the state x_t = m·(y + σ·n) the network and the sampler work on (1: variance exploding)."""
        return torch.ones_like(sigma)

    def c_in(self, sigma):
        return self.mean_coefficient(sigma)

    def c_out(self, sigma):
        if self.prediction_type == "score":
            return sigma**2 * self.mean_coefficient(sigma)
        return sigma if self.prediction_type == "scaled_score" else -sigma

    def score(self, sample: torch.Tensor, network_output: torch.Tensor, sigma: TensorOrFloat) -> torch.Tensor:
        """∇ log p(x_t) at the state ``sample`` = x_t, by Tweedie: m·D = x_t + std²·∇ log p(x_t), std = m·σ.

        With m = 1 this is score = (D − x)/σ². A python float or CPU scalar σ stays on the host (no device copy).
        """
        if not torch.is_tensor(sigma) or (sigma.ndim == 0 and sigma.device.type == "cpu"):
            sigma_value = float(sigma)
            m = float(self.mean_coefficient(as_sigma(sigma_value)))
            denoised = self.denoise(sample / m, network_output, sigma_value)
            return (m * denoised - sample) / (m * sigma_value) ** 2
        sigma = sigma.to(device=sample.device, dtype=sample.dtype)
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1))) if sigma.ndim else sigma
        m = self.mean_coefficient(sigma)
        denoised = self.denoise(sample / m, network_output, sigma)
        return (m * denoised - sample) / (m * sigma) ** 2


class NCSNPreconditioning(ScorePreconditioning):
    """A noise-conditional score network s_θ(x, σ) (NCSN, Song & Ermon 2019; NCSNv2, 2020) on x = y + σ·n.

    ``timestep_type`` says what the network receives as its ``timestep`` (c_noise):

    * ``index``: the NCSN label of the level, 0 for the largest σ_1 … L−1 for σ_L (int64). Off the table, σ goes to
      its nearest level by :meth:`DiscreteTimePreconditioning.index`, i.e. by distance in σ, the rule of EDM's
      ``round_sigma`` (the official code that snaps arbitrary σ to a trained table); it is the one nearest-level rule
      in the package. NCSN's and NCSNv2's own samplers only evaluate the network at its training levels, where every
      rule gives the same label; score_sde's rounding of (1 − t)(N − 1) for a discrete VE network is nearest in log σ
      and differs only between levels (docs/differences.md).
    * ``log_sigma``: ln σ.  ``sigma``: σ (NCSN++ with Fourier features).
    * ``none``: 0 at every σ, an unconditional network (NCSNv2 Technique 3 with ``prediction_type="scaled_score"``:
      s_θ(x, σ) = F(x)/σ).

    Args:
        prediction_type: ``score``, ``scaled_score`` or ``epsilon`` (see :class:`ScorePreconditioning`).
        timestep_type: ``index``, ``log_sigma``, ``sigma`` or ``none``.
        sigmas: the strictly decreasing training levels σ_1 > … > σ_L (needed for ``index``; sets the σ range).
    """

    name = "ncsn"

    def __init__(
        self,
        prediction_type: str = "scaled_score",
        timestep_type: str = "log_sigma",
        sigmas: Optional[Sequence[float]] = None,
    ):
        super().__init__(prediction_type)
        check_choice("timestep_type", timestep_type, NCSN_TIMESTEP_TYPES)
        self.timestep_type = timestep_type
        self.levels = None
        if sigmas is not None:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
            if len(sigmas) == 1:
                self.sigma_min = self.sigma_max = float(sigmas[0])
            else:
                self.levels = DiscreteTimePreconditioning(sigmas.flip(0))  # increasing, as it expects
                self.sigma_min, self.sigma_max = self.levels.sigma_min, self.levels.sigma_max
            self.sigmas = sigmas
        if timestep_type == "index" and self.levels is None:
            raise ValueError("timestep_type='index' needs the table of at least 2 noise levels (sigmas)")

    def label(self, sigma: torch.Tensor) -> torch.Tensor:
        """The NCSN label (0 = σ_1) of the level nearest to σ."""
        return len(self.sigmas) - 1 - self.levels.index(sigma)

    def round_sigma(self, sigma):
        return self.levels.round_sigma(sigma) if self.timestep_type == "index" else as_sigma(sigma)

    def c_noise(self, sigma):
        if self.timestep_type == "index":
            return self.label(sigma)
        if self.timestep_type == "none":
            return torch.zeros_like(sigma)
        return sigma.log() if self.timestep_type == "log_sigma" else sigma

    def sigma_of_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """σ of a network ``timestep``, the inverse of :meth:`c_noise` (float64)."""
        timestep = torch.as_tensor(timestep)
        if self.timestep_type == "none":
            raise ValueError("timestep_type='none' carries no noise level; σ cannot be recovered from a timestep")
        if self.timestep_type == "index":
            return self.sigmas.to(timestep.device)[timestep.long()]
        return timestep.double().exp() if self.timestep_type == "log_sigma" else timestep.double()


class ScoreSDEPreconditioning(ScorePreconditioning):
    """A score network of the VE or VP SDE (Song et al. 2021), evaluated at the SDE's time t with noise level σ(t).

    * VE: x_t = y + σ(t)·n, σ(t) = σ_min·(σ_max/σ_min)^t; m = 1.
    * VP: x_t = √ᾱ(t)·y + √(1 − ᾱ(t))·n, ᾱ(t) = exp(−½t²(β_max − β_min) − t·β_min); in the variables of this module
      σ(t) = √((1 − ᾱ)/ᾱ) (EDM Table 1, ``vp``) and m = √ᾱ = 1/√(1 + σ²).

    ``timestep_type`` says what the network receives: ``sigma`` = the noise std of x_t, m·σ (VE σ, as NCSN++ and
    diffusers' ``ScoreSdeVePipeline``; VP √(1 − ᾱ)), ``log_sigma`` its log, ``t`` the SDE time, ``discrete`` =
    t·(N − 1) with N = ``num_train_timesteps`` (score_sde's DDPM-trained VP models, EDM's ``vp`` c_noise) or ``none``.

    Args:
        sde_type: ``ve`` or ``vp``.
        prediction_type: ``score``, ``scaled_score`` or ``epsilon`` (see :class:`ScorePreconditioning`).
        timestep_type: ``sigma``, ``log_sigma``, ``t``, ``discrete`` or ``none``.
        sigma_min, sigma_max: the VE SDE's range.
        beta_min, beta_max: the VP SDE's β(t) range (0.1 and 20: DDPM's linear β for 1000 steps).
        num_train_timesteps: N of ``discrete``.
    """

    def __init__(
        self,
        sde_type: str = "ve",
        prediction_type: str = "score",
        timestep_type: str = "sigma",
        sigma_min: float = 0.01,
        sigma_max: float = 50.0,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        num_train_timesteps: int = 1000,
    ):
        super().__init__(prediction_type)
        check_choice("sde_type", sde_type, ("ve", "vp"))
        check_choice("timestep_type", timestep_type, SCORE_SDE_TIMESTEP_TYPES)
        self.sde_type, self.timestep_type = sde_type, timestep_type
        self.name = f"score_sde_{sde_type}"
        self.num_train_timesteps = int(num_train_timesteps)
        if sde_type == "ve":
            if not sigma_max > sigma_min > 0:
                raise ValueError(f"need sigma_max > sigma_min > 0, got sigma_min={sigma_min}, sigma_max={sigma_max}")
            self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        else:
            if not beta_max >= beta_min > 0:
                raise ValueError(f"need beta_max >= beta_min > 0, got beta_min={beta_min}, beta_max={beta_max}")
            self.vp = VPPreconditioning(beta_d=beta_max - beta_min, beta_min=beta_min, M=self.num_train_timesteps)
            self.sigma_min, self.sigma_max = self.vp.sigma_min, self.vp.sigma_max

    def sigma(self, t: TensorOrFloat) -> torch.Tensor:
        """σ(t) of the SDE at time t ∈ [0, 1] (float64)."""
        t = as_sigma(t).double()
        if self.sde_type == "ve":
            return ve_sigma(t, self.sigma_min, self.sigma_max)
        return self.vp.sigma(t)

    def time(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(σ), the inverse of :meth:`sigma`."""
        if self.sde_type == "ve":
            return ve_time(sigma, self.sigma_min, self.sigma_max)
        return self.vp.sigma_inv(sigma)

    def mean_coefficient(self, sigma):
        return torch.ones_like(sigma) if self.sde_type == "ve" else 1 / (1 + sigma**2).sqrt()

    def c_noise(self, sigma):
        if self.timestep_type == "sigma":
            return sigma * self.mean_coefficient(sigma)
        if self.timestep_type == "log_sigma":
            return (sigma * self.mean_coefficient(sigma)).log()
        if self.timestep_type == "t":
            return self.time(sigma)
        if self.timestep_type == "discrete":
            return self.time(sigma) * (self.num_train_timesteps - 1)
        return torch.zeros_like(sigma)

    def sigma_of_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """σ of a network ``timestep``, the inverse of :meth:`c_noise` (float64)."""
        timestep = torch.as_tensor(timestep).double()
        if self.timestep_type == "none":
            raise ValueError("timestep_type='none' carries no noise level; σ cannot be recovered from a timestep")
        if self.timestep_type == "t":
            return self.sigma(timestep)
        if self.timestep_type == "discrete":
            return self.sigma(timestep / (self.num_train_timesteps - 1))
        std = timestep.exp() if self.timestep_type == "log_sigma" else timestep
        return std if self.sde_type == "ve" else std / (1 - std**2).sqrt()
