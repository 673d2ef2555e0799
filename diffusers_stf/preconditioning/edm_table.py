"""The rows of EDM Table 1 (Karras et al. 2022) and diffusers' DDPM networks as preconditionings.

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
0..T−1 with ``x_t = √ᾱ_t·y + √(1−ᾱ_t)·ε``. Since ``x_t = x/√(σ²+1)`` with ``x = y + σ·ε`` and
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

import math
from typing import Optional, Sequence, Union

import torch

from ..noise_schedules import alphas_cumprod_from_betas, cosine_alpha_bar, vp_sigma, vp_time
from .base import Preconditioning, as_sigma, check_choice

EDM_PREDICTION_TYPES = ("epsilon", "v_prediction")
VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' DDPMScheduler names


class EDMPreconditioning(Preconditioning):
    """EDM's own preconditioning (Table 1, "Ours"), σ_data the data standard deviation."""

    name = "edm"

    def __init__(self, sigma_data: float = 0.5, prediction_type: str = "epsilon"):
        if not 0 < sigma_data < math.inf:
            raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data}")
        self.prediction_type = check_choice("prediction_type", prediction_type, EDM_PREDICTION_TYPES)
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

    name = "vp_form"

    def __init__(self, prediction_type: str = "epsilon"):
        self.prediction_type = check_choice("prediction_type", prediction_type, VP_PREDICTION_TYPES)

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

    def c_noise(self, sigma):
        raise ValueError("VPFormPreconditioning only relates the output to D; its network's timestep is unknown")


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
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1.0))

    def sigma(self, t) -> torch.Tensor:
        """σ(t) of the VP SDE (EDM Table 1)."""
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(σ), the inverse of :meth:`sigma`."""
        return vp_time(sigma, self.beta_d, self.beta_min)

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
        sigma = as_sigma(sigma)
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
    """Improved DDPM (Nichol & Dhariwal 2021), EDM Table 1 "iDDPM": the table u_j of EDM eq. 99 with C1, C2 (or the
    ``levels`` a network was trained with, u_0 > … > u_{M−1}).

    u_M = 0 and u_{j−1} = √((u_j² + 1)/max(ᾱ(j−1)/ᾱ(j), C1) − 1), where ᾱ(j) = sin²(π/2·j/(M(C2 + 1))) is the cosine
    ᾱ at t = 1 − j/M with offset s = C2."""

    name = "iddpm"

    def __init__(self, M: int = 1000, C1: float = 0.001, C2: float = 0.008, prediction_type: str = "epsilon",
                 levels: Optional[Sequence[float]] = None):
        self.M, self.C1, self.C2 = int(M), float(C1), float(C2)
        if levels is None:
            alpha_bar = cosine_alpha_bar(1 - torch.arange(M + 1, dtype=torch.float64) / M, s=C2).tolist()
            u = [0.0] * (M + 1)
            for j in range(M, 0, -1):
                u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(alpha_bar[j - 1] / alpha_bar[j], C1) - 1)
            levels = u[:M]
        elif len(levels) != M:
            raise ValueError(f"iddpm_levels must hold M = {M} levels u_0 > … > u_(M-1), got {len(levels)}")
        # u_0 > u_1 > … > u_{M−1}; EDM feeds the network M−1−j, i.e. the index in increasing-σ order.
        super().__init__(torch.tensor(list(levels)[::-1], dtype=torch.float64), prediction_type)
