"""Stable Target Field (Xu, Tong & Jaakkola, ICLR 2023): denoising targets averaged over a reference batch.

For a perturbed sample x̃_i = y_i + σ_i·n_i and a reference set {r_1 … r_R} that contains y_i, the stable target is
the posterior mean of the clean image under the empirical mixture of the references:

    w_ij = softmax_j( −‖x̃_i − r_j‖² / (2σ_i²) ),        T_i = Σ_j w_ij · r_j

(equivalently the weighted conditional score Σ_j w_ij (r_j − x̃_i)/σ_i²). The denoiser regresses T_i instead of
y_i. With R = 1 (the sample itself) T_i = y_i, denoising score matching; as σ → 0, T_i → y_i; as σ → ∞, T_i tends
to the mean of the references; as R grows T_i tends to the true posterior mean E[y | x̃_i], with a target covariance
about 1/(R − 1) of the DSM target's (the paper's variance-reduction result).

A class-conditional denoiser D(x̃; σ, c) regresses E[y | x̃_i, c]: under the empirical mixture that is the same
average over the references of class c only (w_ij = 0 where r_j's class is not c_i), and over all references for a
row whose label was dropped to the null label (classifier-free guidance's unconditional rows).

T is a target function handed to a loss of :mod:`~diffusers_stf.losses.edm` (:class:`StableTargetFieldLoss`), so
STF works over every perturbation written as x̃ = y + σ·n: EDM (the paper), VP and VE, and the DDPM ε form, whose
x_t = x̃/√(1 + σ_t²) has the same posterior weights (:func:`stable_target_epsilon`). The official code implements
STF for EDM only.

Numerics: logits in float64 from ‖r_j‖² − 2⟨x̃_i, r_j⟩ (the ‖x̃_i‖² term is the same for every j and cancels in the
softmax); float64 makes the expansion exact enough at σ = 0.002, where float32 would lose the logits. The
references are processed in chunks, so the extra memory is O(B·R + B·D + chunk·D), never B×R×D.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .base import LossOutput, check_images, check_on_host, per_sample
from .edm import DDPMEpsilonLoss, DenoisingLoss, EDMLoss

CHUNK_BYTES = 8 * 1024**2  # float64 reference chunk


def _chunk_size(dim: int, chunk_size: Optional[int]) -> int:
    return int(chunk_size) if chunk_size else max(1, CHUNK_BYTES // (8 * dim))


@torch.no_grad()
def stable_target_field(noisy_images: torch.Tensor, sigmas, reference_images: torch.Tensor,
                        chunk_size: Optional[int] = None, labels: Optional[torch.Tensor] = None,
                        reference_labels: Optional[torch.Tensor] = None,
                        null_label: Optional[int] = None) -> torch.Tensor:
    """STF targets T_i = Σ_j softmax_j(−‖x̃_i − r_j‖²/(2σ_i²))·r_j for the EDM/VE perturbation x̃ = y + σ·n.

    Args:
        noisy_images: x̃, shape (B, ...).
        sigmas: σ per sample (B,) or a scalar, > 0.
        reference_images: the reference set (R, ...) with the same trailing shape; it should contain each clean
            image y_i (for the σ → 0 limit T_i = y_i).
        chunk_size: references per float64 chunk (default: 8 MB worth).
        labels: the class c_i of each row (B,), for a class-conditional denoiser: its target averages only the
            references of class c_i (``reference_labels``), except for rows labelled ``null_label``, which average
            all. Each labelled row's own clean image must be among the references with its class.
        reference_labels: the class of each reference (R,); required with ``labels``.
        null_label: the label of the rows whose class was dropped (None: every row is class-conditional).

    Returns:
        T, shape and dtype of ``noisy_images``.
    """
    b, r = noisy_images.shape[0], reference_images.shape[0]
    if r == 0:
        raise ValueError("reference_images must hold at least one image")
    if tuple(reference_images.shape[1:]) != tuple(noisy_images.shape[1:]):
        raise ValueError(f"reference_images have shape {tuple(reference_images.shape[1:])} per image but noisy_images "
                         f"have {tuple(noisy_images.shape[1:])}")
    sigmas = torch.as_tensor(sigmas, device=noisy_images.device, dtype=torch.float64).reshape(-1)
    sigmas = sigmas.expand(b) if sigmas.numel() == 1 else sigmas
    if sigmas.numel() != b:
        raise ValueError(f"sigmas must have one entry per image ({b}), got {sigmas.numel()}")
    check_on_host(sigmas > 0, "sigmas must be > 0")
    x = noisy_images.reshape(b, -1).to(torch.float64)
    refs = reference_images.reshape(r, -1)
    step = _chunk_size(x.shape[1], chunk_size)
    inv_two_var = (0.5 / sigmas**2).unsqueeze(1)
    logits = torch.empty(b, r, dtype=torch.float64, device=x.device)
    for start in range(0, r, step):
        chunk = refs[start:start + step].to(device=x.device, dtype=torch.float64)
        block = logits[:, start:start + step]
        torch.mm(x, chunk.T, out=block)
        block.mul_(2).sub_(torch.linalg.vector_norm(chunk, dim=1).square_()).mul_(inv_two_var)
        del chunk, block
    if labels is not None:
        if reference_labels is None or reference_labels.shape != (r,) or labels.shape != (b,):
            raise ValueError(f"labels need one class per row ({b}) and reference_labels one per reference ({r})")
        labels, reference_labels = labels.to(x.device), reference_labels.to(x.device)
        other_class = reference_labels[None, :] != labels[:, None]
        if null_label is not None:
            other_class &= (labels != null_label)[:, None]
        logits.masked_fill_(other_class, -math.inf)
    weights = torch.softmax(logits, dim=1)
    del logits
    target = torch.zeros_like(x)
    for start in range(0, r, step):
        chunk = refs[start:start + step].to(device=x.device, dtype=torch.float64)
        target.addmm_(weights[:, start:start + step], chunk)
        del chunk
    return target.reshape(noisy_images.shape).to(noisy_images.dtype)


@torch.no_grad()
def stable_target_epsilon(noisy_images: torch.Tensor, alphas_cumprod, reference_images: torch.Tensor,
                          chunk_size: Optional[int] = None) -> torch.Tensor:
    """The STF target for an ε-prediction (VP/DDPM) model, x_t = √ᾱ·y + √(1 − ᾱ)·ε.

    The VP kernel N(x_t; √ᾱ·r_j, (1 − ᾱ)·I) gives the same weights as the VE kernel at x̃ = x_t/√ᾱ,
    σ² = (1 − ᾱ)/ᾱ; with T = Σ_j w_j r_j, the implied noise is ε̂ = (x_t − √ᾱ·T)/√(1 − ᾱ).

    Args:
        noisy_images: x_t, shape (B, ...).
        alphas_cumprod: ᾱ_t per sample (B,) or a scalar, in (0, 1).
        reference_images: the reference set (R, ...).
    """
    b = noisy_images.shape[0]
    abar = torch.as_tensor(alphas_cumprod, device=noisy_images.device, dtype=torch.float64).reshape(-1)
    abar = abar.expand(b) if abar.numel() == 1 else abar
    check_on_host((abar > 0) & (abar < 1), "alphas_cumprod must lie in (0, 1)")
    x_t = noisy_images.to(torch.float64)
    scale = per_sample(abar.sqrt(), x_t.ndim)
    target = stable_target_field(x_t / scale, ((1 - abar) / abar).sqrt(), reference_images, chunk_size)
    eps = (x_t - scale * target) / per_sample((1 - abar).sqrt(), x_t.ndim)
    return eps.to(noisy_images.dtype)


def gather_references(references: torch.Tensor, accelerator=None) -> torch.Tensor:
    """All processes' reference sets, concatenated (process 0 first); the input itself on one process.

    The targets do not depend on the reference order, so every process computing its own samples' targets against
    the gathered set gives exactly the single-process result on the concatenated data.
    """
    if accelerator is None or accelerator.num_processes == 1:
        return references
    return accelerator.gather(references.detach().contiguous())


def check_reference_batch_size(reference_batch_size: int, batch_size: int) -> int:
    """The number of extra references R − B; a ValueError when R < B (the minibatch belongs to the reference set)."""
    if reference_batch_size < batch_size:
        raise ValueError(
            f"the STF reference batch size R={reference_batch_size} must be >= the per-process batch size "
            f"B={batch_size}: the reference set holds the minibatch itself plus R - B extra dataset images")
    return reference_batch_size - batch_size


class StableTargetFieldLoss:
    """A denoising loss with the stable target in place of the clean image (Xu et al. 2023).

    STF is a target function handed to the base loss: per step the reference set is the minibatch ``images`` plus
    ``extra_references`` (gathered over processes when ``gather``), and the base loss regresses onto
    T(x̃, σ) = :func:`stable_target_field` of its own perturbation x̃ = y + σ·n. Over :class:`EDMLoss` (the paper's
    setting), ``VPLoss`` or ``VELoss`` the loss is λ(σ)·(D(x̃; σ) − T)²; over :class:`DDPMEpsilonLoss` it is
    (ε_θ(x_t, t) − ε̂)² with ε̂ = (x̃ − T)/σ_t the noise T implies (:func:`stable_target_epsilon`).

    Args:
        base_loss: the loss whose σ law, weight and preconditioning are used (default :class:`EDMLoss`).
        reference_batch_size: R per process, minibatch included (the official code's ``--rbatch``; paper: 1024).
        accelerator: with ``gather=True``, the references of all processes are used (R grows with the world size).
        gather: gather references across processes.
        chunk_size: references per float64 chunk of the target computation (default: 8 MB worth).
    """

    def __init__(self, base_loss: Union[DenoisingLoss, DDPMEpsilonLoss, None] = None,
                 reference_batch_size: int = 1024, accelerator=None, gather: bool = False,
                 chunk_size: Optional[int] = None):
        if int(reference_batch_size) < 1:
            raise ValueError(f"reference_batch_size must be >= 1, got {reference_batch_size}")
        self.base_loss = base_loss if base_loss is not None else EDMLoss()
        self.preconditioning = self.base_loss.preconditioning
        self.reference_batch_size, self.accelerator, self.gather = int(reference_batch_size), accelerator, gather
        self.chunk_size = chunk_size

    def num_extra_references(self, batch_size: int) -> int:
        """R − B, the dataset images to draw per step besides the minibatch."""
        return check_reference_batch_size(self.reference_batch_size, batch_size)

    def reference_set(self, images: torch.Tensor, extra_references: Optional[torch.Tensor]) -> torch.Tensor:
        """The minibatch followed by the extra references (all processes' when ``gather``)."""
        refs = images.detach() if extra_references is None or len(extra_references) == 0 else \
            torch.cat([images.detach(), extra_references.to(images.device, images.dtype)])
        return gather_references(refs, self.accelerator) if self.gather else refs

    def reference_labels(self, labels: torch.Tensor, extra_labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The classes of :meth:`reference_set`, in its order."""
        out = labels if extra_labels is None or len(extra_labels) == 0 else \
            torch.cat([labels, extra_labels.to(labels.device)])
        return gather_references(out, self.accelerator) if self.gather else out

    def __call__(self, net, images: torch.Tensor, extra_references: Optional[torch.Tensor],
                 class_labels: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 labels: Optional[torch.Tensor] = None, extra_reference_labels: Optional[torch.Tensor] = None,
                 null_label: Optional[int] = None, **draws) -> LossOutput:
        """The base loss's output (per-sample loss, reduced as the base loss reduces it, and σ) with the stable
        target.

        Args:
            net: what the base loss takes (a denoiser D(x, σ), or the raw ε-network for :class:`DDPMEpsilonLoss`).
            images: the clean (possibly augmented) minibatch (B, C, H, W).
            extra_references: R − B more (independently augmented) dataset images, or None when R = B.
            class_labels, generator: as in the base loss.
            labels: the minibatch's classes, for a class-conditional ``net``: with them (and
                ``extra_reference_labels``, the extras' classes) the target of a row whose ``class_labels`` entry is
                not ``null_label`` averages only the references of its class (:func:`stable_target_field`).
            extra_reference_labels, null_label: see ``labels``.
            draws: explicit ``sigma=`` (EDM/VP/VE) or ``timesteps=`` (DDPM), and ``noise=``, passed to the base
                loss.
        """
        check_images(images)
        if extra_references is not None and len(extra_references):
            check_images(extra_references, "extra_references")
            if extra_references.shape[1:] != images.shape[1:]:
                raise ValueError(f"extra_references must be images of the shape of images {tuple(images.shape[1:])}, "
                                 f"got {tuple(extra_references.shape[1:])}")
        self.num_extra_references(images.shape[0])
        references = self.reference_set(images, extra_references)
        conditional = {}
        if labels is not None:
            if class_labels is None:
                raise ValueError("labels (the classes of the references) need class_labels (the network's labels)")
            conditional = dict(labels=class_labels, reference_labels=self.reference_labels(labels, extra_reference_labels),
                               null_label=null_label)

        def target(noisy, sigma, clean):
            return stable_target_field(noisy, sigma, references, self.chunk_size, **conditional)

        return self.base_loss(net, images, class_labels=class_labels, generator=generator, target=target, **draws)


class DDPMStableTargetFieldLoss(StableTargetFieldLoss):
    """:class:`StableTargetFieldLoss` over :class:`DDPMEpsilonLoss`: Ho et al.'s ε-prediction loss on the discrete
    DDPM schedule with the STF noise target (the R = 1 case is the plain ε loss).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the β schedule, as in diffusers'
            ``DDPMScheduler``.
        reference_batch_size, accelerator, gather: as in :class:`StableTargetFieldLoss`.
        reduction: as in :class:`DDPMEpsilonLoss` (``mean`` over C·H·W, or ``sum``).
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2,
                 beta_schedule: str = "linear", trained_betas=None, reference_batch_size: int = 1024,
                 accelerator=None, gather: bool = False, reduction: str = "mean"):
        super().__init__(DDPMEpsilonLoss(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
                                         reduction), reference_batch_size, accelerator, gather)
