"""Denoising losses of Karras et al. 2022 ("EDM"), Table 1 "Training" rows and NVlabs/edm ``training/loss.py``,
and the DDPM ε-prediction loss of Ho et al. 2020 (eq. 14) in the same shape.

Each loss draws σ, perturbs the images once, x̃ = y + σ·n (:func:`~diffusers_stf.losses.base.add_noise`, the one
perturbation of every loss), and regresses the denoiser D(x̃; σ) of :class:`~diffusers_stf.preconditioning.Denoiser`
onto a target T:

    loss = λ(σ) · (D(x̃; σ) − T)²        (EDM eq. 2 with the weight λ(σ) of Table 1; per element)

T is the clean image y (denoising score matching) unless the caller passes a *target function*
``target(noisy, sigma, images) -> T``; :mod:`~diffusers_stf.losses.stable_target_field` passes the stable target.
Each loss reduces the per-element loss over C·H·W (``reduction``: EDM's ``sum``, or ``mean``) and returns the
per-sample loss (B,) in a :class:`~diffusers_stf.losses.base.LossOutput`; the training objective is its mean over the
batch (EDM: ``loss.sum() / batch_size``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..preconditioning import (
    DDPMPreconditioning,
    Denoiser,
    EDMPreconditioning,
    Preconditioning,
    VEPreconditioning,
    VPPreconditioning,
)
from ..noise_schedules import betas_for_schedule
from .base import (
    LossOutput, add_noise, check_finite, check_images, check_on_host, check_reduction, check_sigma_shape, per_sample,
    reduce_per_sample,
)
from .draws import rand, randint, randn

Target = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DENOISING_LOSSES = ("edm", "vp", "ve")


# ----------------------------------------------------------------------------------------------------------------------
# EDM Table 1: one loss per row


class DenoisingLoss(abc.ABC):
    """λ(σ)·(D(y + σ·n; σ) − T)² per element, reduced over C·H·W, with σ from :meth:`sample_sigma` and λ from
    :meth:`weight` (EDM eq. 2; a subclass is one row of EDM Table 1).

    Args:
        preconditioning: the :class:`~diffusers_stf.preconditioning.Preconditioning` that turns the raw network into
            D (:meth:`denoiser`); the samplers use the same object to load the trained network.
        reduction: ``sum`` over C·H·W (EDM's training loop) or ``mean`` (``F.mse_loss``, 1/(C·H·W) of it).
    """

    def __init__(self, preconditioning: Preconditioning, reduction: str = "sum"):
        self.preconditioning = preconditioning
        self.reduction = check_reduction(reduction)

    @abc.abstractmethod
    def sample_sigma(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        ...

    def denoiser(self, model: torch.nn.Module) -> Denoiser:
        """D(x; σ) of a raw network under this loss's preconditioning."""
        return Denoiser(model, self.preconditioning)

    def __call__(self, denoiser, images: torch.Tensor, sigma: Optional[torch.Tensor] = None,
                 class_labels: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 target: Optional[Target] = None, noise: Optional[torch.Tensor] = None) -> LossOutput:
        """The per-sample loss λ(σ)·(D(x̃; σ) − T)² of ``images`` (B, C, H, W), reduced over C·H·W, and its σ.

        Args:
            denoiser: D(x, σ, class_labels=None), e.g. ``loss.denoiser(unet)``.
            images: the clean (possibly augmented) images y.
            sigma: noise levels (B,), > 0; drawn with :meth:`sample_sigma` when None.
            class_labels: passed to the denoiser (class labels, or EDM's augmentation labels).
            generator: source of σ and of the noise.
            target: ``target(noisy, sigma, images) -> T``; default T = ``images`` (denoising score matching).
            noise: n ~ N(0, I) shaped like ``images``; drawn with ``generator`` when None (e.g. given as rows of a
                draw for the global batch of several processes).
        """
        check_images(images)
        if sigma is None:
            sigma = self.sample_sigma(images.shape[0], generator, images.device)
        else:
            sigma = torch.as_tensor(sigma, dtype=torch.float32).to(images.device)
            check_sigma_shape(sigma, images.shape[0])
            sigma = sigma.reshape(-1).expand(images.shape[0])
            check_on_host(sigma > 0, "sigma must be > 0 (and not NaN) for every sample")
        noisy = add_noise(images, sigma, generator, noise)
        goal = images if target is None else target(noisy, sigma, images)
        denoised = denoiser(noisy, sigma, class_labels=class_labels)
        per_element = self.per_element(denoised, goal, sigma)
        return LossOutput(loss=reduce_per_sample(per_element, self.reduction), sigma=sigma)

    def per_element(self, denoised: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ)·(D − T)², per element (EDM eq. 2)."""
        return per_sample(self.weight(sigma), denoised.ndim).to(denoised.dtype) * (denoised - target) ** 2


class EDMLoss(DenoisingLoss):
    """EDM's loss (Table 1 "Ours"): ln σ ~ N(P_mean, P_std²), λ(σ) = (σ² + σ_data²)/(σ·σ_data)², EDM
    preconditioning (so λ(σ) = 1/c_out(σ)² and the network's effective target has unit variance).

    Args:
        P_mean, P_std: mean and std of ln σ (EDM: −1.2, 1.2).
        sigma_data: σ_data of the data and of the preconditioning (EDM: 0.5).
        reduction: ``sum`` (EDM) or ``mean`` over C·H·W.
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5, reduction: str = "sum"):
        check_finite(P_mean=P_mean, P_std=P_std, sigma_data=sigma_data)
        if not P_std > 0:
            raise ValueError(f"P_std must be > 0, got {P_std}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        super().__init__(EDMPreconditioning(sigma_data), reduction)
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)

    def sample_sigma(self, batch_size, generator=None, device=None):
        """σ = exp(P_mean + P_std·z), z ~ N(0, 1), shape (batch_size,), float32."""
        return (randn(batch_size, generator, device) * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        """λ(σ) = (σ² + σ_data²)/(σ·σ_data)²."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


class VPLoss(DenoisingLoss):
    """The variance-preserving loss of Song et al. 2021 in EDM's form (Table 1 "VP"): t ~ U(ε_t, 1),
    σ = σ(t) = √(exp(½β_d t² + β_min t) − 1), λ(σ) = 1/σ², VP preconditioning.

    σ(t) is evaluated in float64 (then cast to float32): at t = ε_t, exp(·) − 1 ≈ 1e-6, which float32 would round
    to within 10 %.

    Args:
        beta_d, beta_min: the VP schedule (EDM: 19.9, 0.1).
        epsilon_t: the smallest t (EDM: 1e-5).
        M: the VP preconditioning's c_noise scale, c_noise = (M − 1)·t(σ) (EDM: 1000).
        reduction: ``sum`` (EDM) or ``mean`` over C·H·W.
    """

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5, M: int = 1000,
                 reduction: str = "sum"):
        check_finite(beta_d=beta_d, beta_min=beta_min, epsilon_t=epsilon_t)
        if not (beta_d > 0 and beta_min >= 0):
            raise ValueError(f"need beta_d > 0 and beta_min >= 0, got beta_d={beta_d}, beta_min={beta_min}")
        if not 0 < epsilon_t < 1:
            raise ValueError(f"epsilon_t must be in (0, 1), got {epsilon_t}")
        super().__init__(VPPreconditioning(beta_d, beta_min, M, epsilon_t), reduction)
        self.beta_d, self.beta_min, self.epsilon_t = float(beta_d), float(beta_min), float(epsilon_t)

    def sample_sigma(self, batch_size, generator=None, device=None):
        """σ(t) with t = 1 + u·(ε_t − 1), u ~ U(0, 1), i.e. t ~ U(ε_t, 1)."""
        t = 1 + rand(batch_size, generator, device).double() * (self.epsilon_t - 1)
        return self.preconditioning.sigma(t).float()

    def weight(self, sigma):
        """λ(σ) = 1/σ²."""
        return 1 / sigma**2


class VELoss(DenoisingLoss):
    """The variance-exploding loss of Song et al. 2021 in EDM's form (Table 1 "VE"): ln σ ~ U(ln σ_min, ln σ_max),
    λ(σ) = 1/σ², VE preconditioning (c_skip = 1, c_out = σ).

    Args:
        sigma_min, sigma_max: range of σ (EDM: 0.02, 100).
        reduction: ``sum`` (EDM) or ``mean`` over C·H·W.
    """

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0, reduction: str = "sum"):
        check_finite(sigma_min=sigma_min, sigma_max=sigma_max)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        super().__init__(VEPreconditioning(sigma_min, sigma_max), reduction)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def sample_sigma(self, batch_size, generator=None, device=None):
        """σ = σ_min·(σ_max/σ_min)^u, u ~ U(0, 1)."""
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** rand(batch_size, generator, device)

    def weight(self, sigma):
        """λ(σ) = 1/σ²."""
        return 1 / sigma**2


def make_denoising_loss(precond: str = "edm", P_mean: float = -1.2, P_std: float = 1.2,
                        sigma_data: float = 0.5, reduction: str = "sum") -> DenoisingLoss:
    """The loss of one EDM preconditioning, as EDM's ``train.py --precond`` picks them: ``edm`` → :class:`EDMLoss`,
    ``vp`` → :class:`VPLoss`, ``ve`` → :class:`VELoss` (each with EDM's defaults; P_mean, P_std and sigma_data
    apply to ``edm``; ``reduction`` to each)."""
    if precond == "edm":
        return EDMLoss(P_mean, P_std, sigma_data, reduction)
    if precond == "vp":
        return VPLoss(reduction=reduction)
    if precond == "ve":
        return VELoss(reduction=reduction)
    raise ValueError(f"precond must be one of {DENOISING_LOSSES}, got {precond!r}")


# ----------------------------------------------------------------------------------------------------------------------
# DDPM (Ho et al. 2020) in the same shape


@dataclass(kw_only=True)
class DDPMLossOutput(LossOutput):
    """:class:`~diffusers_stf.losses.base.LossOutput` of :class:`DDPMEpsilonLoss`, with each sample's 0-based
    ``timesteps`` t (B,) beside its σ_t."""

    timesteps: torch.Tensor


class DDPMEpsilonLoss:
    """Ho et al. 2020 eq. 14: (ε_θ(x_t, t) − ε)² per element, reduced over C·H·W, t ~ U{0, …, T − 1} (diffusers'
    0-based index), x_t = √ᾱ_t·y + √(1 − ᾱ_t)·ε, for a raw ε-prediction network ``model(x_t, t)``.

    x_t is built from the same perturbation as the EDM losses: x_t = c_in(σ_t)·x̃ with x̃ = y + σ_t·ε and
    σ_t = √((1 − ᾱ_t)/ᾱ_t). A target function T replaces ε by the noise it implies, (x̃ − T(x̃, σ_t, y))/σ_t
    (with T = y this is ε).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the β schedule, as in diffusers'
            ``DDPMScheduler`` (ᾱ_t from :class:`~diffusers_stf.preconditioning.DDPMPreconditioning`).
        reduction: ``mean`` over C·H·W (``F.mse_loss``, as diffusers' ``train_unconditional.py``) or ``sum``.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2,
                 beta_schedule: str = "linear", trained_betas: Optional[Sequence[float]] = None,
                 reduction: str = "mean"):
        betas = betas_for_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)  # checked there
        self.preconditioning = DDPMPreconditioning(betas)
        self.num_train_timesteps = len(betas)
        self.reduction = check_reduction(reduction)

    def sample_timesteps(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None):
        """t ~ U{0, …, T − 1}."""
        return randint(self.num_train_timesteps, (batch_size,), generator, device)

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t), float64: the VE noise level equivalent to timestep t."""
        return self.preconditioning.table_on(timesteps.device)[timesteps]

    def __call__(self, model, images: torch.Tensor, timesteps: Optional[torch.Tensor] = None,
                 class_labels: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 target: Optional[Target] = None, noise: Optional[torch.Tensor] = None) -> DDPMLossOutput:
        """The per-sample loss (ε_θ(x_t, t) − ε)², reduced over C·H·W, with σ_t and t.

        Args:
            model: ε-prediction network ``model(x_t, t, class_labels=...)`` (``.sample`` or a tensor).
            images: clean images y (B, C, H, W).
            timesteps: 0-based t (B,); drawn with :meth:`sample_timesteps` when None.
            class_labels: passed to the model.
            generator: source of t and of the noise.
            target: ``target(noisy, sigma, images) -> T`` in the x̃ = y + σ·n coordinates (default: ε itself).
            noise: ε ~ N(0, I) shaped like ``images``; drawn with ``generator`` when None.
        """
        check_images(images)
        if timesteps is None:
            timesteps = self.sample_timesteps(images.shape[0], generator, images.device)
        else:
            timesteps = torch.as_tensor(timesteps).to(images.device).long()
            if timesteps.numel() not in (1, images.shape[0]):
                raise ValueError(f"timesteps must hold one value or one per image ({images.shape[0]}), got shape "
                                 f"{tuple(timesteps.shape)}")
            timesteps = timesteps.reshape(-1).expand(images.shape[0])
            check_on_host((timesteps >= 0) & (timesteps < self.num_train_timesteps),
                          f"timesteps must lie in 0..{self.num_train_timesteps - 1}")
        sigma64 = self.sigma(timesteps)
        noisy = add_noise(images, sigma64, generator, noise)
        sigma = per_sample(sigma64, images.ndim)
        clean = images if target is None else target(noisy, sigma64, images)
        goal = ((noisy.double() - clean.double()) / sigma).to(images.dtype)
        x_t = (noisy.double() * self.preconditioning.c_in(sigma)).to(images.dtype)
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        out = model(x_t, timesteps, **kwargs)
        out = out.sample if hasattr(out, "sample") else out
        return DDPMLossOutput(loss=reduce_per_sample((out - goal) ** 2, self.reduction), sigma=sigma64.float(),
                              timesteps=timesteps)
