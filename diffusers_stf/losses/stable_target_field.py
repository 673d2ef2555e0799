"""Stable Target Field (Xu, Tong & Jaakkola, ICLR 2023): denoising targets averaged over a reference batch.

For a perturbed sample x̃_i = y_i + σ_i·n_i and a reference set {r_1 … r_R} that contains y_i, the stable target is
the posterior mean of the clean image under the empirical mixture of the references:

    w_ij = softmax_j( −‖x̃_i − r_j‖² / (2σ_i²) ),        T_i = Σ_j w_ij · r_j

(equivalently the weighted conditional score Σ_j w_ij (r_j − x̃_i)/σ_i²). The denoiser regresses T_i instead of
y_i. With R = 1 (the sample itself) T_i = y_i, denoising score matching; as σ → 0, T_i → y_i; as σ → ∞, T_i tends
to the mean of the references; as R grows T_i tends to the true posterior mean E[y | x̃_i], with a target covariance
about 1/(R − 1) of the DSM target's (the paper's variance-reduction result).

Numerics: logits in float64 from ‖r_j‖² − 2⟨x̃_i, r_j⟩ (the ‖x̃_i‖² term is the same for every j and cancels in the
softmax); float64 makes the expansion exact enough at σ = 0.002, where float32 would lose the logits. The
references are processed in chunks, so the extra memory is O(B·R + B·D + chunk·D), never B×R×D.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..preconditioning import DDPMPreconditioning, betas_for_schedule
from .edm import EDMLoss, _per_sample

CHUNK_BYTES = 8 * 1024**2  # float64 reference chunk


def _chunk_size(dim: int, chunk_size: Optional[int]) -> int:
    return int(chunk_size) if chunk_size else max(1, CHUNK_BYTES // (8 * dim))


@torch.no_grad()
def stable_target_field(noisy_images: torch.Tensor, sigmas, reference_images: torch.Tensor,
                        chunk_size: Optional[int] = None) -> torch.Tensor:
    """STF targets T_i = Σ_j softmax_j(−‖x̃_i − r_j‖²/(2σ_i²))·r_j for the EDM/VE perturbation x̃ = y + σ·n.

    Args:
        noisy_images: x̃, shape (B, ...).
        sigmas: σ per sample (B,) or a scalar, > 0.
        reference_images: the reference set (R, ...) with the same trailing shape; it should contain each clean
            image y_i (for the σ → 0 limit T_i = y_i).
        chunk_size: references per float64 chunk (default: 8 MB worth).

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
    if not bool((sigmas > 0).all()):
        raise ValueError("sigmas must be > 0")
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
    if not bool(((abar > 0) & (abar < 1)).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1)")
    x_t = noisy_images.to(torch.float64)
    scale = _per_sample(abar.sqrt(), x_t.ndim)
    target = stable_target_field(x_t / scale, ((1 - abar) / abar).sqrt(), reference_images, chunk_size)
    eps = (x_t - scale * target) / _per_sample((1 - abar).sqrt(), x_t.ndim)
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
    """EDM's (or VE's) loss with the stable target in place of the clean image (Xu et al. 2023).

    Per step: σ and the noise as in the base loss, the reference set = the minibatch ``images`` + ``extra_references``
    (gathered over processes when ``gather``), T = :func:`stable_target_field`, loss = λ(σ)·(D(x̃; σ) − T)².

    Args:
        base_loss: an :class:`~diffusers_stf.losses.edm.EDMLoss` (default) or ``VELoss``: σ sampling, weight,
            preconditioning.
        reference_batch_size: R per process, minibatch included (the official code's ``--rbatch``; paper: 1024).
        accelerator: with ``gather=True``, the references of all processes are used (R grows with the world size).
        gather: gather references across processes.
    """

    def __init__(self, base_loss: Optional[EDMLoss] = None, reference_batch_size: int = 1024, accelerator=None,
                 gather: bool = False):
        if reference_batch_size < 1:
            raise ValueError(f"reference_batch_size must be >= 1, got {reference_batch_size}")
        self.base_loss = base_loss if base_loss is not None else EDMLoss()
        self.reference_batch_size, self.accelerator, self.gather = int(reference_batch_size), accelerator, gather
        self.preconditioning = self.base_loss.preconditioning

    def denoiser(self, model):
        return self.base_loss.denoiser(model)

    def sample_sigma(self, batch_size, generator=None, device=None):
        return self.base_loss.sample_sigma(batch_size, generator, device)

    def num_extra_references(self, batch_size: int) -> int:
        """R − B, the dataset images to draw per step besides the minibatch."""
        return check_reference_batch_size(self.reference_batch_size, batch_size)

    def reference_set(self, images: torch.Tensor, extra_references: Optional[torch.Tensor]) -> torch.Tensor:
        refs = images.detach() if extra_references is None or len(extra_references) == 0 else \
            torch.cat([images.detach(), extra_references.to(images.device, images.dtype)])
        return gather_references(refs, self.accelerator) if self.gather else refs

    def __call__(self, denoiser, images: torch.Tensor, extra_references: Optional[torch.Tensor],
                 sigma: Optional[torch.Tensor] = None, class_labels: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-element loss; arguments as :meth:`EDMLoss.__call__`, plus the extra (augmented) references."""
        self.num_extra_references(images.shape[0])
        if sigma is None:
            sigma = self.sample_sigma(images.shape[0], generator, images.device)
        sigma = sigma.to(device=images.device, dtype=torch.float32)
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        noisy = images + _per_sample(sigma, images.ndim).to(images.dtype) * noise
        target = stable_target_field(noisy, sigma, self.reference_set(images, extra_references))
        return self.base_loss.regression_loss(denoiser, noisy, sigma, target, class_labels)


class DDPMStableTargetFieldLoss:
    """Ho et al. 2020's ε-prediction loss ‖ε_θ(x_t, t) − target‖² on the discrete DDPM schedule, with the STF
    target ε̂ of :func:`stable_target_epsilon` in place of the drawn noise (which is the R = 1 case).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the β schedule, as in diffusers'
            ``DDPMScheduler`` (ᾱ_t from :class:`~diffusers_stf.preconditioning.DDPMPreconditioning`).
        reference_batch_size, accelerator, gather: as in :class:`StableTargetFieldLoss`.
    """

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2,
                 beta_schedule: str = "linear", trained_betas=None, reference_batch_size: int = 1024,
                 accelerator=None, gather: bool = False):
        betas = betas_for_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.preconditioning = DDPMPreconditioning(betas)
        self.alphas_cumprod = self.preconditioning.alphas_cumprod
        self.num_train_timesteps = len(betas)
        if reference_batch_size < 1:
            raise ValueError(f"reference_batch_size must be >= 1, got {reference_batch_size}")
        self.reference_batch_size, self.accelerator, self.gather = int(reference_batch_size), accelerator, gather

    def sample_timesteps(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None):
        """t ~ U{0, …, T − 1}."""
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        return torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=device)

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t), the equivalent VE noise level (for logging by noise level)."""
        return self.preconditioning.table.to(timesteps.device)[timesteps]

    num_extra_references = StableTargetFieldLoss.num_extra_references
    reference_set = StableTargetFieldLoss.reference_set

    def __call__(self, model, images: torch.Tensor, extra_references: Optional[torch.Tensor],
                 timesteps: Optional[torch.Tensor] = None, class_labels: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Per-element loss (ε_θ(x_t, t) − ε̂)² of a raw ε-prediction ``model(x_t, t)``."""
        self.num_extra_references(images.shape[0])
        if timesteps is None:
            timesteps = self.sample_timesteps(images.shape[0], generator, images.device)
        abar = self.alphas_cumprod.to(images.device)[timesteps]
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        x_t = (_per_sample(abar.sqrt(), images.ndim) * images + _per_sample((1 - abar).sqrt(), images.ndim) * noise)
        x_t = x_t.to(images.dtype)
        target = stable_target_epsilon(x_t, abar, self.reference_set(images, extra_references))
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        out = model(x_t, timesteps, **kwargs)
        out = out.sample if hasattr(out, "sample") else out
        return (out - target) ** 2
