"""Network preconditioning of Karras et al. 2022 ("EDM"), Table 1.

A raw network ``F`` (a diffusers ``UNet2DModel``) becomes a denoiser

    D(x; σ) = c_skip(σ) · x + c_out(σ) · F(c_in(σ) · x, c_noise(σ))                (EDM eq. 7)

This module is the one place these formulas live: the training losses (through :class:`Denoiser`) and the
samplers (``EDMHeunScheduler``, ``EDMStochasticScheduler``) both call it. Score networks are preconditionings too
(the block at the end: :class:`NCSNPreconditioning`, :class:`ScoreSDEPreconditioning`, score = (D − x)/σ²), so the
score-based samplers and the denoising score matching loss call nothing else.

Parametrisations (EDM Table 1, σ = noise std of x = y + σ·n):

============  =================  ====================  ==================  =====================================
name          c_skip             c_out                 c_in                c_noise
============  =================  ====================  ==================  =====================================
``edm``       σd²/(σ²+σd²)       σ·σd/√(σ²+σd²)        1/√(σ²+σd²)         ln(σ)/4
``vp``        1                  −σ                    1/√(σ²+1)           (M−1)·t(σ), t the inverse VP schedule
``ve``        1                  σ                     1                   ln(σ/2)
``iddpm``     1                  −σ                    1/√(σ²+1)           index of the nearest u_j (cosine)
``ddpm``      1                  −σ                    1/√(σ²+1)           index t of the nearest √((1−ᾱ_t)/ᾱ_t)
============  =================  ====================  ==================  =====================================

``ddpm`` is the discrete-time form of ``vp`` for a diffusers DDPM checkpoint: a ``UNet2DModel`` trained on timesteps
0..T−1 with ``x_t = √ᾱ_t·y + √(1−ᾱ_t)·ε``.  Since ``x_t = x/√(σ²+1)`` with ``x = y + σ·ε`` and
``σ_t = √((1−ᾱ_t)/ᾱ_t)``, the same network samples with the EDM schedulers.

The rows above are for ε-prediction. ``vp``, ``iddpm`` and ``ddpm`` networks see x_t = x/√(σ²+1) and may predict any
of diffusers' DDPM ``prediction_type``s (:class:`VPFormPreconditioning` derives the scalings):

================  =================  ====================
prediction_type   c_skip             c_out
================  =================  ====================
``epsilon``       1                  −σ
``sample``        0                  1
``v_prediction``  1/(σ²+1)           −σ/√(σ²+1)
================  =================  ====================

``edm`` takes ``epsilon`` (its F) or ``v_prediction`` (c_out negated), as diffusers' ``EDMEulerScheduler``; ``ve`` takes
``epsilon``.
"""

from __future__ import annotations

import abc
import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .noise_schedules import alphas_cumprod_from_betas, betas_for_schedule  # noqa: F401  (β/ᾱ live there)

TensorOrFloat = Union[torch.Tensor, float]

PRECONDITIONINGS = ("edm", "vp", "ve", "iddpm", "ddpm")
EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")
VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' DDPMScheduler names


def check_prediction_type(prediction_type: str, allowed, preconditioning: str) -> str:
    """``prediction_type``, or a ValueError naming the types the ``preconditioning`` supports."""
    if prediction_type not in allowed:
        raise ValueError(
            f"prediction_type must be one of {tuple(allowed)} for the {preconditioning!r} preconditioning, "
            f"got {prediction_type!r}"
        )
    return prediction_type


def _as_tensor(sigma: TensorOrFloat) -> torch.Tensor:
    if torch.is_tensor(sigma):
        return sigma if sigma.is_floating_point() else sigma.double()
    return torch.tensor(float(sigma), dtype=torch.float64)


class Preconditioning(abc.ABC):
    """Base class: the four scalings of EDM eq. 7 and the σ range the network supports."""

    name: str = ""
    sigma_min: float = 0.0
    sigma_max: float = math.inf

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)

    @abc.abstractmethod
    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        ...

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (sigma**2 + 1).sqrt()

    @abc.abstractmethod
    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        ...

    def round_sigma(self, sigma: TensorOrFloat) -> torch.Tensor:
        """Snap σ to a value the network was trained on (the identity for continuous-time networks)."""
        return _as_tensor(sigma)

    def scalings(self, sigma: TensorOrFloat):
        """(c_skip, c_out, c_in, c_noise) at ``sigma``."""
        sigma = _as_tensor(sigma)
        return self.c_skip(sigma), self.c_out(sigma), self.c_in(sigma), self.c_noise(sigma)

    def denoise(self, sample: torch.Tensor, network_output: torch.Tensor, sigma: TensorOrFloat) -> torch.Tensor:
        """D(x; σ) = c_skip·x + c_out·F (EDM eq. 7), computed in the dtype of ``sample``.

        A network with 2C output channels (iDDPM's learned variance) contributes its first C channels.
        """
        channels = sample.shape[1]
        if network_output.shape[1] == 2 * channels:
            network_output = network_output[:, :channels]
        if network_output.shape != sample.shape:
            raise ValueError(
                f"model_output has shape {tuple(network_output.shape)} but sample has shape {tuple(sample.shape)}; "
                "they must match (or the model output may have twice the channels, for a learned variance)"
            )
        if not torch.is_tensor(sigma) or (sigma.ndim == 0 and sigma.device.type == "cpu"):
            # one level known on the host: python-float scalings, so the device never waits for a copy
            sigma = _as_tensor(sigma).double()
            return float(self.c_skip(sigma)) * sample + float(self.c_out(sigma)) * network_output.to(sample.dtype)
        sigma = _as_tensor(sigma).to(device=sample.device, dtype=sample.dtype)
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1))) if sigma.ndim else sigma
        return self.c_skip(sigma) * sample + self.c_out(sigma) * network_output.to(sample.dtype)


class EDMPreconditioning(Preconditioning):
    """EDM's own preconditioning (Table 1, "Ours"), σ_data the data standard deviation."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5, prediction_type: str = "epsilon"):
        if not 0 < sigma_data < math.inf:
            raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data}")
        check_prediction_type(prediction_type, EDM_PREDICTION_TYPES, "edm")
        self.sigma_data = float(sigma_data)
        # diffusers' EDMEulerScheduler calls EDM's F-parametrisation "epsilon"; "v_prediction" flips c_out's sign.
        self.sign = 1.0 if prediction_type == "epsilon" else -1.0

    def c_skip(self, sigma):
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma):
        return self.sign * sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma):
        return 1 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma):
        return sigma.log() / 4


class VPFormPreconditioning(Preconditioning):
    """A network that sees the variance-preserving input x_t = c_in·x = x/√(σ²+1) (``vp``, ``iddpm``, ``ddpm``) and
    predicts one of diffusers' DDPM targets.

    With x = y + σ·n, x_t = α·y + s·n where α = 1/√(σ²+1) = √ᾱ and s = σ/√(σ²+1) = √(1−ᾱ). Then, as D = c_skip·x + c_out·F:

    * ``epsilon``, F ≈ n: y = x − σ·n, so c_skip = 1, c_out = −σ (EDM Table 1, VP);
    * ``sample``, F ≈ y: c_skip = 0, c_out = 1;
    * ``v_prediction``, F ≈ v = α·n − s·y (Salimans & Ho 2022, §4): α·x_t − s·v = (α² + s²)·y = y and α·x_t = x/(σ²+1),
      so c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1).

    Args:
        prediction_type: ``epsilon``, ``v_prediction`` or ``sample``.
    """

    def __init__(self, prediction_type: str = "epsilon"):
        self.prediction_type = check_prediction_type(prediction_type, VP_PREDICTION_TYPES, self.name)

    def c_skip(self, sigma):
        if self.prediction_type == "epsilon":
            return torch.ones_like(sigma)
        if self.prediction_type == "sample":
            return torch.zeros_like(sigma)
        return 1 / (sigma**2 + 1)

    def c_out(self, sigma):
        if self.prediction_type == "epsilon":
            return -sigma
        if self.prediction_type == "sample":
            return torch.ones_like(sigma)
        return -sigma / (sigma**2 + 1).sqrt()


class VPPreconditioning(VPFormPreconditioning):
    """Variance preserving (Song et al. 2021), EDM Table 1 "VP": σ(t) = √(exp(½β_d t² + β_min t) − 1)."""

    name = "vp"

    def __init__(
        self,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,
        epsilon_t: float = 1e-5,
        prediction_type: str = "epsilon",
    ):
        super().__init__(prediction_type)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, dtype=torch.float64)))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, dtype=torch.float64)))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) of the VP SDE (EDM Table 1)."""
        return (torch.exp(0.5 * self.beta_d * t**2 + self.beta_min * t) - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(σ), the inverse of :meth:`sigma`."""
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def c_noise(self, sigma):
        return (self.M - 1) * self.sigma_inv(sigma)


class VEPreconditioning(Preconditioning):
    """Variance exploding (Song et al. 2021), EDM Table 1 "VE"."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def c_out(self, sigma):
        return sigma

    def c_in(self, sigma):
        return torch.ones_like(sigma)

    def c_noise(self, sigma):
        return (0.5 * sigma).log()


class DiscreteTimePreconditioning(VPFormPreconditioning):
    """A network trained on a table of discrete noise levels σ_0 < … < σ_{T−1}: c_noise is the index t of the
    nearest level, and σ is snapped to that level before use (EDM's ``round_sigma``)."""

    name = "discrete"

    def __init__(self, sigmas: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__(prediction_type)
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        if sigmas.ndim != 1 or len(sigmas) < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("the discrete noise table must be a strictly increasing 1-D tensor of length >= 2")
        self.table = sigmas
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])
        self._tables = {sigmas.device: sigmas}

    def table_on(self, device: Union[str, torch.device]) -> torch.Tensor:
        """The table on ``device``, copied there once: a copy on every call would make the device wait each step."""
        device = torch.device(device)
        if device not in self._tables:
            self._tables[device] = self.table.to(device)
        return self._tables[device]

    def index(self, sigma: torch.Tensor) -> torch.Tensor:
        table = self.table_on(sigma.device)
        return (sigma.double().reshape(-1, 1) - table.reshape(1, -1)).abs().argmin(dim=1).reshape(sigma.shape)

    def round_sigma(self, sigma):
        sigma = _as_tensor(sigma)
        return self.table_on(sigma.device)[self.index(sigma)].to(sigma.dtype)

    def sigma_at_index(self, timesteps: torch.Tensor) -> torch.Tensor:
        """σ_t of integer training timesteps t ∈ {0, …, T−1}; anything else (a −1 would wrap around to σ_{T−1}) is
        refused. The check reads ``timesteps``, so keep it out of a loop that must not wait for the device."""
        t = torch.as_tensor(timesteps)
        integral = t.dtype != torch.bool and (not t.is_floating_point() or bool((t == t.round()).all()))
        if not integral or not bool(((t >= 0) & (t < len(self.table))).all()):
            raise ValueError(f"timesteps must be integers in [0, {len(self.table) - 1}], got {t.tolist()}")
        return self.table_on(t.device)[t.long()]

    def c_noise(self, sigma):
        return self.index(sigma).to(torch.float32 if sigma.dtype != torch.float64 else sigma.dtype)


class DDPMPreconditioning(DiscreteTimePreconditioning):
    """A diffusers DDPM checkpoint: σ_t = √((1−ᾱ_t)/ᾱ_t) for 0-based t, c_noise = t."""

    name = "ddpm"

    def __init__(self, betas: torch.Tensor, prediction_type: str = "epsilon"):
        alphas_cumprod = alphas_cumprod_from_betas(betas)
        self.alphas_cumprod = alphas_cumprod
        super().__init__(((1 - alphas_cumprod) / alphas_cumprod).sqrt(), prediction_type)


class IDDPMPreconditioning(DiscreteTimePreconditioning):
    """Improved DDPM (Nichol & Dhariwal 2021), EDM Table 1 "iDDPM": the table u_j of EDM eq. 99 with C1, C2."""

    name = "iddpm"

    def __init__(self, M: int = 1000, C1: float = 0.001, C2: float = 0.008, prediction_type: str = "epsilon"):
        def alpha_bar(j):
            return math.sin(0.5 * math.pi * j / M / (C2 + 1)) ** 2

        u = [0.0] * (M + 1)
        for j in range(M, 0, -1):  # u_{j-1} = sqrt((u_j² + 1) / max(ᾱ(j−1)/ᾱ(j), C1) − 1)
            u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C1) - 1)
        # u_0 > u_1 > … > u_{M−1}; EDM feeds the network M−1−j, i.e. the index in increasing-σ order.
        super().__init__(torch.tensor(u[:M][::-1], dtype=torch.float64), prediction_type)


def make_preconditioning(
    name: str,
    sigma_data: float = 0.5,
    prediction_type: str = "epsilon",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
    beta_schedule: str = "linear",
    trained_betas: Optional[Sequence[float]] = None,
    timestep_type: str = "sigma",
    sigmas: Optional[Sequence[float]] = None,
    sigma_min: float = 0.01,
    sigma_max: float = 50.0,
    beta_min: float = 0.1,
    beta_max: float = 20.0,
) -> Preconditioning:
    """Build a preconditioning by name from scheduler-style config values.

    Args:
        name: one of ``edm``, ``vp``, ``ve``, ``iddpm``, ``ddpm`` (EDM Table 1), or a score network: ``ncsn``,
            ``score_sde_ve``, ``score_sde_vp``.
        sigma_data: σ_data of ``edm``.
        prediction_type: what the network predicts: ``epsilon`` (EDM's F) or ``v_prediction`` (c_out negated) for
            ``edm``; ``epsilon``, ``v_prediction`` or ``sample`` for ``vp``, ``iddpm`` and ``ddpm``
            (:class:`VPFormPreconditioning`); ``epsilon`` for ``ve``. Other values raise a ValueError.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the DDPM β schedule. ``ddpm`` uses it
            directly; ``vp`` takes its continuous limit β_min = T·β_start, β_d = T·(β_end − β_start)
            (19.9 and 0.1 for diffusers' defaults, as in EDM); ``iddpm`` uses M = num_train_timesteps.
        timestep_type, sigmas: a score network's timestep and, for ``ncsn``, its decreasing training levels
            (:class:`NCSNPreconditioning`, :class:`ScoreSDEPreconditioning`).
        sigma_min, sigma_max, beta_min, beta_max: the VE and VP SDEs of ``score_sde_ve`` and ``score_sde_vp``
            (``num_train_timesteps`` is the N of their ``discrete`` timestep).
    """
    if name == "edm":
        return EDMPreconditioning(sigma_data=sigma_data, prediction_type=prediction_type)
    if name == "vp":
        T = num_train_timesteps
        return VPPreconditioning(
            beta_d=T * (beta_end - beta_start), beta_min=T * beta_start, M=T, prediction_type=prediction_type
        )
    if name == "ve":
        check_prediction_type(prediction_type, ("epsilon",), "ve")
        return VEPreconditioning()
    if name == "iddpm":
        return IDDPMPreconditioning(M=num_train_timesteps, prediction_type=prediction_type)
    if name == "ddpm":
        return DDPMPreconditioning(
            betas_for_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas),
            prediction_type=prediction_type,
        )
    if name == "ncsn":
        return NCSNPreconditioning(prediction_type=prediction_type, timestep_type=timestep_type, sigmas=sigmas)
    if name in ("score_sde_ve", "score_sde_vp"):
        return ScoreSDEPreconditioning(
            sde_type=name[-2:], prediction_type=prediction_type, timestep_type=timestep_type, sigma_min=sigma_min,
            sigma_max=sigma_max, beta_min=beta_min, beta_max=beta_max, num_train_timesteps=num_train_timesteps,
        )
    raise ValueError(f"preconditioning must be one of {PRECONDITIONINGS + SCORE_PRECONDITIONINGS}, got {name!r}")


class Denoiser(nn.Module):
    """D(x; σ): a raw network (a diffusers ``UNet2DModel``) wrapped in a :class:`Preconditioning` (EDM eq. 7).

    The network sees ``c_in·x`` in its own dtype and ``c_noise`` as a float tensor of shape [B] (a python float
    would be cast to int inside ``UNet2DModel``); the skip connection is computed in the dtype of ``x``
    (float64 in the samplers, as in EDM).

    Args:
        model: the raw network, called as ``model(x, timesteps, class_labels=...)`` returning ``.sample`` or a tensor.
        preconditioning: a :class:`Preconditioning`.
    """

    def __init__(self, model: nn.Module, preconditioning: Preconditioning):
        super().__init__()
        self.model = model
        self.preconditioning = preconditioning

    def forward(self, x: torch.Tensor, sigma: TensorOrFloat, class_labels: Optional[torch.Tensor] = None):
        sigma = _as_tensor(sigma).to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])
        c_in = self.preconditioning.c_in(sigma).reshape(-1, *([1] * (x.ndim - 1)))
        model_dtype = next(self.model.parameters()).dtype
        c_noise = self.preconditioning.c_noise(sigma).to(torch.float32)
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        out = self.model((c_in * x).to(model_dtype), c_noise, **kwargs)
        out = out.sample if hasattr(out, "sample") else out
        return self.preconditioning.denoise(x, out, sigma)


# ----------------------------------------------------------------------------------------------------------------------
# Score networks: NCSN (Song & Ermon 2019, 2020) and the score SDEs (Song et al. 2021) as preconditionings.
#
# A score network's output F becomes a denoiser through Tweedie's formula, E[y | x] = x + σ²·∇ log p_σ(x) for
# x = y + σ·n, so D = c_skip·x + c_out·F with c_skip = 1 and the score is s = (D − x)/σ². The samplers
# (AnnealedLangevinScheduler, PredictorCorrectorScheduler) and the denoising score matching loss go through these
# classes only, like the EDM samplers and losses go through the ones above.

SCORE_PREDICTION_TYPES = ("score", "scaled_score", "epsilon")
NCSN_TIMESTEP_TYPES = ("index", "log_sigma", "sigma", "none")
SCORE_SDE_TIMESTEP_TYPES = ("sigma", "log_sigma", "t", "discrete", "none")
SCORE_PRECONDITIONINGS = ("ncsn", "score_sde_ve", "score_sde_vp")


def _check_choice(name: str, value, allowed: Sequence[str]):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


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
        _check_choice("prediction_type", prediction_type, SCORE_PREDICTION_TYPES)
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
            m = float(self.mean_coefficient(_as_tensor(sigma_value)))
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
        _check_choice("timestep_type", timestep_type, NCSN_TIMESTEP_TYPES)
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
        return self.levels.round_sigma(sigma) if self.timestep_type == "index" else _as_tensor(sigma)

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
        _check_choice("sde_type", sde_type, ("ve", "vp"))
        _check_choice("timestep_type", timestep_type, SCORE_SDE_TIMESTEP_TYPES)
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
        t = _as_tensor(t).double()
        if self.sde_type == "ve":
            return self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        return self.vp.sigma(t)

    def time(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(σ), the inverse of :meth:`sigma`."""
        if self.sde_type == "ve":
            return (sigma / self.sigma_min).log() / math.log(self.sigma_max / self.sigma_min)
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
