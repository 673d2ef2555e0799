"""Training objectives of the Discriminator Guidance discriminator (Kim et al., ICML 2023).

Real images (label 1) and generated ones (label 0) are both diffused by the forward process, x = y + σ·n, at
independently sampled noise levels, and the discriminator d_φ(x, σ) (returning the logit ℓ = log(d/(1 − d))) is
trained to tell them apart (DG eq. 7, Algorithm 1). At the optimum the density ratio r = e^ℓ = d/(1 − d) is
p_data,σ/p_model,σ, whichever strictly proper objective is used; DG Appendix B compares three Bregman divergences
between r and the true ratio:

* :class:`DiscriminatorBCELoss`: the binary cross-entropy of DG's main text, −E_real[log d] − E_fake[log(1 − d)];
* :class:`DiscriminatorLSIFLoss`: least-squares importance fitting, E_fake[r²/2] − E_real[r];
* :class:`DiscriminatorUKLLoss`: unnormalised KL, E_fake[r] − E_real[log r].

Reduction (``reduction``): DG's ``train.py`` takes the mean of the per-image terms over its mixed batch of real and
fake images (``"mean"``, the default). With equally many real and fake images, as the training script draws them,
this is half of ``"balanced"``, mean_real + mean_fake, which keeps the density ratio as the minimiser whatever the
proportion of real and fake images in a batch. Either way the loss returns each image's share of the objective, so
that, as for every loss of the package, the objective is the mean of the per-sample loss: the term itself
(``mean``), or the term times N/N_real or N/N_fake (``balanced``, N images in all).

σ is sampled log-uniformly (:func:`sample_sigma_log_uniform`). DG samples the VP time τ by importance sampling with
density ∝ β(τ)/(1 − e^{−∫β}) on [1e-5, 1]; since σ(τ)² = e^{∫β} − 1, that density makes ln σ² uniform, i.e. σ
log-uniform on [σ_VP(1e-5), σ_VP(1)] ≈ [0.0010, 152.2] (the default range).
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..preconditioning import VPPreconditioning
from .base import LossOutput, add_noise, check_images
from .draws import rand

_VP = VPPreconditioning()
DG_TRAIN_TIME_MIN = 1e-5  # DG train.py: t_min of the importance-sampled VP time
DG_TRAIN_SIGMA_MIN = float(_VP.sigma(torch.tensor(DG_TRAIN_TIME_MIN, dtype=torch.float64)))  # ≈ 0.0010
DG_TRAIN_SIGMA_MAX = float(_VP.sigma(torch.tensor(1.0, dtype=torch.float64)))  # ≈ 152.2


def sample_sigma_log_uniform(
    batch_size: int,
    sigma_min: float = DG_TRAIN_SIGMA_MIN,
    sigma_max: float = DG_TRAIN_SIGMA_MAX,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> torch.Tensor:
    """σ with ln σ ~ U[ln σ_min, ln σ_max] (float64, shape (batch_size,)): DG's importance-sampled VP time,
    written in σ (module docstring)."""
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    u = rand(batch_size, generator, device, dtype=torch.float64)
    return torch.exp(math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min)))


@dataclass(kw_only=True)
class DiscriminatorLossOutput(LossOutput):
    """:class:`~diffusers_stf.losses.base.LossOutput` of a discriminator loss, real images first.

    Args:
        loss: each image's share of the objective (N,), whose mean is the objective: the mean of all terms
            (``reduction="mean"``) or mean(real terms) + mean(fake terms) (``"balanced"``).
        sigma: the images' noise levels (float64).
        logits: ℓ of the real then the fake images (detached).
        is_real: 1 for real, 0 for fake.
        logs: the batch's ``accuracy``, ``accuracy_real`` and ``accuracy_fake``; ``per_sample_logs``: ``accuracy``,
            whether each image is classified correctly.
    """

    logits: torch.Tensor
    is_real: torch.Tensor

    @property
    def correct(self) -> torch.Tensor:
        """Whether each image is classified correctly (d > ½ for real, d < ½ for fake)."""
        return (self.logits > 0) == self.is_real.bool()


REDUCTIONS = ("mean", "balanced")


class DiscriminatorLoss(abc.ABC):
    """real_term(ℓ) on real and fake_term(ℓ) on generated images diffused at log-uniform σ, reduced over the batch.

    Args:
        sigma_min, sigma_max: the range of the log-uniform σ (default: DG's).
        reduction: ``mean`` (DG: the mean over the mixed batch of real and fake images) or ``balanced``
            (mean over the real images + mean over the fake ones).
    """

    name = ""

    def __init__(self, sigma_min: float = DG_TRAIN_SIGMA_MIN, sigma_max: float = DG_TRAIN_SIGMA_MAX,
                 reduction: str = "mean"):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.sigma_min, self.sigma_max, self.reduction = float(sigma_min), float(sigma_max), reduction

    @abc.abstractmethod
    def real_term(self, logits: torch.Tensor) -> torch.Tensor:
        ...

    @abc.abstractmethod
    def fake_term(self, logits: torch.Tensor) -> torch.Tensor:
        ...

    def logits(self, discriminator, images, class_labels=None, generator=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """ℓ(y + σ·n, σ) with σ log-uniform and n ~ N(0, I) (the forward process of DG Algorithm 1)."""
        sigma = sample_sigma_log_uniform(len(images), self.sigma_min, self.sigma_max, generator, device=images.device)
        return discriminator(add_noise(images, sigma, generator), sigma, class_labels).logits, sigma

    def __call__(
        self,
        discriminator,
        real: torch.Tensor,
        fake: torch.Tensor,
        real_labels: Optional[torch.Tensor] = None,
        fake_labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> DiscriminatorLossOutput:
        """The objective on a batch of real and a batch of generated images (both in [−1, 1]).

        Args:
            discriminator: a :class:`~diffusers_stf.Discriminator` (or any module ``(x, σ, labels) -> .logits``).
            real, fake: the two batches; their sizes may differ.
            real_labels, fake_labels: class labels, for a class-conditional discriminator.
            generator: randomness of σ and of the noise.
        """
        check_images(real, "real")
        check_images(fake, "fake")
        logits_real, sigma_real = self.logits(discriminator, real, real_labels, generator)
        logits_fake, sigma_fake = self.logits(discriminator, fake, fake_labels, generator)
        real_terms, fake_terms = self.real_term(logits_real.float()), self.fake_term(logits_fake.float())
        if self.reduction == "balanced":  # mean_real + mean_fake = mean over all of N/N_real·real, N/N_fake·fake
            total = len(real) + len(fake)
            real_terms, fake_terms = real_terms * (total / len(real)), fake_terms * (total / len(fake))
        logits = torch.cat([logits_real, logits_fake]).detach()
        out = DiscriminatorLossOutput(
            loss=torch.cat([real_terms, fake_terms]), sigma=torch.cat([sigma_real, sigma_fake]), logits=logits,
            is_real=torch.cat([torch.ones_like(logits_real), torch.zeros_like(logits_fake)]).detach())
        correct, real_part = out.correct.double(), out.is_real.double()
        out.logs = {"accuracy": correct.mean(), "accuracy_real": (correct * real_part).sum() / real_part.sum(),
                    "accuracy_fake": (correct * (1 - real_part)).sum() / (1 - real_part).sum()}
        out.per_sample_logs = {"accuracy": correct}
        return out


class DiscriminatorBCELoss(DiscriminatorLoss):
    """DG eq. 7: −E_real[log d] − E_fake[log(1 − d)], on logits (log d = −softplus(−ℓ), log(1 − d) = −softplus(ℓ)),
    which is the numerically stable form of DG's ``BCELoss`` on sigmoid outputs."""

    name = "bce"

    def real_term(self, logits):
        return F.softplus(-logits)

    def fake_term(self, logits):
        return F.softplus(logits)


class DiscriminatorLSIFLoss(DiscriminatorLoss):
    """DG Appendix B, least-squares importance fitting: E_fake[r²/2] − E_real[r] with r = e^ℓ (the Bregman
    divergence of f(r) = (r − 1)²/2 up to a constant); minimised by r = p_data/p_model."""

    name = "lsif"

    def real_term(self, logits):
        return -torch.exp(logits)

    def fake_term(self, logits):
        return 0.5 * torch.exp(2 * logits)


class DiscriminatorUKLLoss(DiscriminatorLoss):
    """DG Appendix B, unnormalised Kullback–Leibler: E_fake[r] − E_real[log r] with r = e^ℓ (the Bregman divergence of
    f(r) = r·log r − r up to a constant); minimised by r = p_data/p_model."""

    name = "ukl"

    def real_term(self, logits):
        return -logits

    def fake_term(self, logits):
        return torch.exp(logits)


DISCRIMINATOR_LOSSES = {cls.name: cls for cls in (DiscriminatorBCELoss, DiscriminatorLSIFLoss, DiscriminatorUKLLoss)}


def make_discriminator_loss(name: str, **kwargs) -> DiscriminatorLoss:
    """``bce`` (DG's default), ``lsif`` or ``ukl``."""
    if name not in DISCRIMINATOR_LOSSES:
        raise ValueError(f"loss must be one of {sorted(DISCRIMINATOR_LOSSES)}, got {name!r}")
    return DISCRIMINATOR_LOSSES[name](**kwargs)
