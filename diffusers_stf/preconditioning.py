"""Network preconditioning of Karras et al. 2022 ("EDM"), Table 1.

A raw network ``F`` (a diffusers ``UNet2DModel``) becomes a denoiser

    D(x; σ) = c_skip(σ) · x + c_out(σ) · F(c_in(σ) · x, c_noise(σ))                (EDM eq. 7)

This module is the one place these formulas live: the training losses (through :class:`Denoiser`) and the
samplers (``EDMHeunScheduler``, ``EDMStochasticScheduler``) both call it.

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

``ddpm`` is the discrete-time form of ``vp`` for a diffusers DDPM checkpoint: an epsilon-prediction ``UNet2DModel``
trained on timesteps 0..T−1 with ``x_t = √ᾱ_t·y + √(1−ᾱ_t)·ε``.  Since ``x_t = x/√(σ²+1)`` with ``x = y + σ·ε``
and ``σ_t = √((1−ᾱ_t)/ᾱ_t)``, the same network samples with the EDM schedulers.
"""

from __future__ import annotations

import abc
import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

TensorOrFloat = Union[torch.Tensor, float]

PRECONDITIONINGS = ("edm", "vp", "ve", "iddpm", "ddpm")


def _as_tensor(sigma: TensorOrFloat) -> torch.Tensor:
    if torch.is_tensor(sigma):
        return sigma if sigma.is_floating_point() else sigma.double()
    return torch.tensor(float(sigma), dtype=torch.float64)


def betas_for_schedule(
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
    beta_schedule: str = "linear",
    trained_betas: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """DDPM β schedules as diffusers' ``DDPMScheduler`` builds them (float64).

    Args:
        num_train_timesteps: T, the number of discrete training steps.
        beta_start, beta_end: first and last β of the ``linear`` and ``scaled_linear`` schedules.
        beta_schedule: ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2`` (Nichol & Dhariwal's cosine, β ≤ 0.999).
        trained_betas: explicit βs; overrides the schedule.
    """
    if trained_betas is not None:
        return torch.as_tensor(trained_betas, dtype=torch.float64)
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        T = num_train_timesteps
        return torch.tensor(
            [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=torch.float64
        )
    raise ValueError(
        f"beta_schedule must be one of 'linear', 'scaled_linear', 'squaredcos_cap_v2', got {beta_schedule!r}"
    )


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
        sigma = _as_tensor(sigma).to(device=sample.device, dtype=sample.dtype)
        sigma = sigma.reshape(-1, *([1] * (sample.ndim - 1))) if sigma.ndim else sigma
        return self.c_skip(sigma) * sample + self.c_out(sigma) * network_output.to(sample.dtype)


class EDMPreconditioning(Preconditioning):
    """EDM's own preconditioning (Table 1, "Ours"), σ_data the data standard deviation."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5, prediction_type: str = "epsilon"):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
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


class VPPreconditioning(Preconditioning):
    """Variance preserving (Song et al. 2021), EDM Table 1 "VP": σ(t) = √(exp(½β_d t² + β_min t) − 1)."""

    name = "vp"

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5):
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, dtype=torch.float64)))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, dtype=torch.float64)))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ(t) of the VP SDE (EDM Table 1)."""
        return (torch.exp(0.5 * self.beta_d * t**2 + self.beta_min * t) - 1).sqrt()

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(σ), the inverse of :meth:`sigma`."""
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def c_out(self, sigma):
        return -sigma

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


class DiscreteTimePreconditioning(Preconditioning):
    """A network trained on a table of discrete noise levels σ_0 < … < σ_{T−1}: c_noise is the index t of the
    nearest level, and σ is snapped to that level before use (EDM's ``round_sigma``)."""

    name = "discrete"

    def __init__(self, sigmas: torch.Tensor):
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        if sigmas.ndim != 1 or len(sigmas) < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("the discrete noise table must be a strictly increasing 1-D tensor of length >= 2")
        self.table = sigmas
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])

    def index(self, sigma: torch.Tensor) -> torch.Tensor:
        table = self.table.to(sigma.device)
        return (sigma.double().reshape(-1, 1) - table.reshape(1, -1)).abs().argmin(dim=1).reshape(sigma.shape)

    def round_sigma(self, sigma):
        sigma = _as_tensor(sigma)
        return self.table.to(sigma.device)[self.index(sigma)].to(sigma.dtype)

    def c_out(self, sigma):
        return -sigma

    def c_noise(self, sigma):
        return self.index(sigma).to(torch.float32 if sigma.dtype != torch.float64 else sigma.dtype)


class DDPMPreconditioning(DiscreteTimePreconditioning):
    """A diffusers DDPM checkpoint: σ_t = √((1−ᾱ_t)/ᾱ_t) for 0-based t, c_noise = t."""

    name = "ddpm"

    def __init__(self, betas: torch.Tensor):
        alphas_cumprod = torch.cumprod(1 - torch.as_tensor(betas, dtype=torch.float64), dim=0)
        self.alphas_cumprod = alphas_cumprod
        super().__init__(((1 - alphas_cumprod) / alphas_cumprod).sqrt())


class IDDPMPreconditioning(DiscreteTimePreconditioning):
    """Improved DDPM (Nichol & Dhariwal 2021), EDM Table 1 "iDDPM": the table u_j of EDM eq. 99 with C1, C2."""

    name = "iddpm"

    def __init__(self, M: int = 1000, C1: float = 0.001, C2: float = 0.008):
        def alpha_bar(j):
            return math.sin(0.5 * math.pi * j / M / (C2 + 1)) ** 2

        u = [0.0] * (M + 1)
        for j in range(M, 0, -1):  # u_{j-1} = sqrt((u_j² + 1) / max(ᾱ(j−1)/ᾱ(j), C1) − 1)
            u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar(j - 1) / alpha_bar(j), C1) - 1)
        # u_0 > u_1 > … > u_{M−1}; EDM feeds the network M−1−j, i.e. the index in increasing-σ order.
        super().__init__(torch.tensor(u[:M][::-1], dtype=torch.float64))


def make_preconditioning(
    name: str,
    sigma_data: float = 0.5,
    prediction_type: str = "epsilon",
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 2e-2,
    beta_schedule: str = "linear",
    trained_betas: Optional[Sequence[float]] = None,
) -> Preconditioning:
    """Build a preconditioning by name from scheduler-style config values.

    Args:
        name: one of ``edm``, ``vp``, ``ve``, ``iddpm``, ``ddpm``.
        sigma_data: σ_data of ``edm``.
        prediction_type: ``epsilon`` (EDM's F) or ``v_prediction`` (c_out negated), for ``edm``.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the DDPM β schedule. ``ddpm`` uses it
            directly; ``vp`` takes its continuous limit β_min = T·β_start, β_d = T·(β_end − β_start)
            (19.9 and 0.1 for diffusers' defaults, as in EDM); ``iddpm`` uses M = num_train_timesteps.
    """
    if name == "edm":
        return EDMPreconditioning(sigma_data=sigma_data, prediction_type=prediction_type)
    if name == "vp":
        T = num_train_timesteps
        return VPPreconditioning(beta_d=T * (beta_end - beta_start), beta_min=T * beta_start, M=T)
    if name == "ve":
        return VEPreconditioning()
    if name == "iddpm":
        return IDDPMPreconditioning(M=num_train_timesteps)
    if name == "ddpm":
        return DDPMPreconditioning(
            betas_for_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        )
    raise ValueError(f"preconditioning must be one of {PRECONDITIONINGS}, got {name!r}")


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
