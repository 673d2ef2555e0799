"""The sequence-aware loss of Nguyen et al. 2024, "On Inference Stability for Diffusion Models" (SA-DPM, AAAI 2024).

A DDPM ε-prediction network f_θ (a diffusers ``UNet2DModel``) is trained on K consecutive timesteps at once:

    L_sa = E_{t, x_0, ε} ‖ (1/K) Σ_{s=t}^{t+K−1} τ_s (f_θ(x_s, s) − ε_s) ‖²,   t ∈ {1−K, …, T},   (the SA loss)
    L    = L_simple + λ·L_sa                                                                 (the training objective)

with τ_s = 0 outside {2, …, T} for the Theorem 1 weights (outside {1, …, T} for uniform weights). Penalising the
squared *sum* of the K residuals (not the sum of squares) penalises residuals that add up along the sampling chain,
which is what accumulates into the estimation gap (see :mod:`diffusers_stf.evaluation.estimation_gap`).

Time indices. The paper counts t = 1..T with x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε and ᾱ_t = Π_{s≤t}(1 − β_s). diffusers
counts timesteps 0..T−1: the UNet sees, and ``DDPMScheduler.add_noise`` uses, the index t − 1. In this module
``timesteps``/``window_start``/``steps`` are **1-based (paper) unless the name says "index"**; tensors over time
(``sequence_aware_weights``, ``alphas_cumprod``) have length T and entry t − 1 belongs to paper time t.

Differences from the official code (VinAIResearch/SA-DPM ``sequence_aware_loss``), all selectable:

- weights: the official code trains with τ_s = 1 (``weighting="uniform"``, our default); ``weighting="paper"`` uses
  Theorem 1's τ_s, which are ≤ 1e-2 for the usual schedules and make L_sa tiny unless λ is raised accordingly;
- window: the official code puts the L_simple timestep at the *end* of the window and drops the windows that run past
  T (``window="official"``); ``window="paper"`` (default) samples the window start from the paper's range, see
  :meth:`SequenceAwareLoss.sample_windows`;
- both draw one independent noise ε_s per step of the window, each x_s built from the same x_0
  (``noise="independent"``); ``noise="shared"`` reuses one ε for all K steps, a different estimator;
- timesteps: the official ``train_ddp.py`` draws the L_simple steps antithetically, half of the batch uniform and
  the other half mirrored, t and T − 1 − t (``timesteps="antithetic"``); ``timesteps="uniform"`` draws each
  independently;
- reduction: the official code sums over C·H·W and averages over the batch (``reduction="sum"``); ``"mean"``
  averages over C·H·W as ``F.mse_loss`` does (λ means the same in both, since both terms are reduced alike);
- parametrisation: the official code trains ε-prediction only. ``prediction_type`` ``sample`` (x₀) and
  ``v_prediction`` (v = √ᾱ_s·ε − √(1−ᾱ_s)·x₀, diffusers' ``DDPMScheduler.get_velocity``) are ours: L_simple is the
  MSE to that target (SNR-weighted for ``sample``, ᾱ_s/(1−ᾱ_s)·‖x̂₀ − x₀‖², as diffusers' ``train_unconditional.py``),
  and L_sa keeps its meaning by being computed on the equivalent ε-residuals: the network output is turned into ε̂
  by :func:`epsilon_from_prediction` before the window sum.

Parametrisation. Every network output is read through the one parametrisation of the package: the
:class:`~diffusers_stf.preconditioning.DDPMPreconditioning` of the schedule (a ``VPFormPreconditioning`` of the
``prediction_type``) gives c_skip and c_out of D(x; σ) = c_skip·x + c_out·F in EDM coordinates, x = x_s·√(1 + σ_s²)
= x_0 + σ_s·ε with σ_s = √((1 − ᾱ_s)/ᾱ_s). Then ε̂ = (x − D)/σ_s, and the regression target of F is the output
whose D is x_0. x_s itself is built from the one perturbation of every loss,
:func:`~diffusers_stf.losses.base.add_noise`: x_s = c_in(σ_s)·x = √ᾱ_s·x_0 + √(1 − ᾱ_s)·ε.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..noise_schedules import betas_for_schedule
from ..preconditioning import DDPMPreconditioning, Preconditioning
from .base import REDUCTIONS, LossOutput, add_noise, check_images, check_on_host, per_sample, reduce_per_sample
from .draws import randint, randn
from .stable_target_field import stable_target_field

WEIGHTINGS = ("uniform", "paper")
WINDOWS = ("paper", "official")
NOISE_COUPLINGS = ("independent", "shared")
TIMESTEP_SAMPLINGS = ("uniform", "antithetic")


def _scalings(preconditioning: Preconditioning, sigma: torch.Tensor, like: torch.Tensor):
    """(1 − c_skip(σ), c_out(σ)) in float64, shaped to broadcast against ``like``."""
    sigma = per_sample(sigma.double(), like.ndim)
    return 1 - preconditioning.c_skip(sigma), preconditioning.c_out(sigma), sigma


def epsilon_from_prediction(output: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor,
                            preconditioning: Preconditioning) -> torch.Tensor:
    """ε̂ = (x − D)/σ implied by a network output F at x = x_0 + σ·ε (EDM coordinates; σ per sample), with
    D = c_skip·x + c_out·F of ``preconditioning``. Written as ((1 − c_skip)·x − c_out·F)/σ, so that for ε-prediction
    (c_skip = 1, c_out = −σ) ε̂ is F itself, bit for bit."""
    one_minus_skip, c_out, sigma = _scalings(preconditioning, sigma, output)
    dtype = output.dtype
    return (one_minus_skip / sigma).to(dtype) * noisy.to(dtype) - (c_out / sigma).to(dtype) * output


def prediction_target(epsilon: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor,
                      preconditioning: Preconditioning) -> torch.Tensor:
    """The network output F whose denoiser D = c_skip·x + c_out·F is x_0 = x − σ·ε, i.e.
    F = ((1 − c_skip)·x − σ·ε)/c_out: ε, x_0 or v = √ᾱ·ε − √(1−ᾱ)·x_0 (diffusers' ``get_velocity``) for the
    ``epsilon``, ``sample`` and ``v_prediction`` rows of ``VPFormPreconditioning``."""
    one_minus_skip, c_out, sigma = _scalings(preconditioning, sigma, epsilon)
    dtype = epsilon.dtype
    return (one_minus_skip / c_out).to(dtype) * noisy.to(dtype) - (sigma / c_out).to(dtype) * epsilon


def _check_betas(betas) -> torch.Tensor:
    betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
    if betas.ndim != 1 or len(betas) < 2:
        raise ValueError(f"betas must be a 1-D tensor of length T >= 2, got shape {tuple(betas.shape)}")
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("betas must lie in the open interval (0, 1)")
    return betas


def sequence_aware_weights(betas, weighting: str = "paper") -> torch.Tensor:
    """τ_t of Theorem 1: the coefficient with which the noise residual f_θ(x_t, t) − ε_t of step t enters the
    accumulated estimation gap at x_1 of a DDPM chain started at x_T,

        τ_i = √ᾱ_{i−1}(1−ᾱ_1) / (√α_1 (1−ᾱ_{i−1})) · γ_{1,i} · √(1−ᾱ_i)/√ᾱ_i,   γ_{1,i} = √ᾱ_{i−1} β_i/(1−ᾱ_i),

    for i = 2..T and τ_1 = 0 (the last DDPM step predicts x_0 directly, so nothing accumulates through it). The first
    factor is Π_{j=2}^{i−1} γ_{2,j}, the product of the posterior-mean coefficients of x_j; the last two are the
    coefficient β_i/(√α_i √(1−ᾱ_i)) of ε_θ in the DDPM mean μ_θ(x_i, i).

    Args:
        betas: the DDPM β_1..β_T (entry t − 1 is β_t), e.g. from ``betas_for_schedule``; each in (0, 1).
        weighting: ``paper`` (Theorem 1) or ``uniform`` (τ_t = 1 for t = 1..T, what the official code trains with).

    Returns:
        float64 tensor of length T; entry t − 1 is τ_t (1-based t), entry 0 is τ_1.
    """
    betas = _check_betas(betas)
    if weighting == "uniform":
        return torch.ones_like(betas)
    if weighting != "paper":
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # entry i−1 is ᾱ_i
    abar_i, abar_prev, beta_i = alphas_cumprod[1:], alphas_cumprod[:-1], betas[1:]  # i = 2..T
    alpha_1 = abar_1 = alphas_cumprod[0]
    gamma_1 = abar_prev.sqrt() * beta_i / (1 - abar_i)
    chain = abar_prev.sqrt() * (1 - abar_1) / (alpha_1.sqrt() * (1 - abar_prev))
    tau = chain * gamma_1 * (1 - abar_i).sqrt() / abar_i.sqrt()
    return torch.cat([torch.zeros(1, dtype=torch.float64), tau])


@dataclass(kw_only=True)
class SequenceAwareLossOutput(LossOutput):
    """:class:`~diffusers_stf.losses.base.LossOutput` of L = L_simple + λ·L_sa: ``loss`` (B,) and its two terms
    ``simple`` and ``sa`` (B,); ``loss.mean()`` is the training objective.

    ``timestep`` is the 1-based L_simple step s of each row and ``sigma`` its σ_s = √((1−ᾱ_s)/ᾱ_s) (for logging the
    loss per noise level). ``logs`` holds the batch means ``loss_simple`` and, when λ > 0, ``loss_sa``.
    """

    simple: torch.Tensor
    sa: torch.Tensor
    timestep: torch.Tensor


class SequenceAwareLoss:
    """L_simple + λ·L_sa for a ``UNet2DModel`` on a discrete DDPM schedule (Nguyen et al. 2024).

    Each batch row draws its L_simple timestep s ~ U{1..T} (so ``sa_lambda=0`` is exactly DDPM's L_simple) and a
    window of K consecutive steps containing s. The K·B noisy inputs x_{t+j} (in-range ones only) go through the UNet
    as **one** batched forward pass; the residual at s is shared by both terms, so a step costs K network evaluations
    per image (one when λ = 0).

    Args:
        betas: DDPM β_1..β_T (entry t − 1 is β_t).
        num_steps: K, the number of consecutive steps (paper: SA-2, SA-3, SA-4). K = 1 is a τ²-reweighted L_simple.
        sa_lambda: λ (paper: 1 for K=2, 0.3 for K=3, 0.2 for K=4). 0 gives the DDPM baseline with one evaluation.
        weighting: ``uniform`` (τ = 1, the official code) or ``paper`` (Theorem 1, :func:`sequence_aware_weights`).
        window: ``paper`` (window start t ~ U{1−K..T}, made exact by an importance weight) or ``official`` (s is the
            window's last step, windows past T never occur, no weight).
        noise: ``independent`` (a fresh ε_s for every step of the window, as the official code) or ``shared`` (one ε
            for the whole window).
        reduction: ``mean`` (mean over C·H·W, as ``F.mse_loss``) or ``sum`` (sum over C·H·W, as the official code);
            both terms are reduced the same way, so λ means the same in both.
        timesteps: how the L_simple steps s of a batch are drawn: ``uniform`` (independently, s ~ U{1..T}) or
            ``antithetic`` (as the official ``train_ddp.py``: ⌊B/2⌋ + 1 uniform draws s followed by their mirrors
            T + 1 − s, i.e. t and T − 1 − t in 0-based indices, truncated to B).
        prediction_type: what the network predicts, diffusers' names: ``epsilon`` (ε, the paper), ``sample`` (x₀;
            L_simple = ᾱ_s/(1−ᾱ_s)·‖x̂₀ − x₀‖² as diffusers' ``train_unconditional.py``) or ``v_prediction``
            (v = √ᾱ_s·ε − √(1−ᾱ_s)·x₀; L_simple = ‖v̂ − v‖²). L_sa is always on the ε-residuals ε̂_s − ε_s, with ε̂_s
            from :func:`epsilon_from_prediction`, so it penalises the same accumulated gap as the paper's. The
            parametrisation is :attr:`preconditioning`, ``DDPMPreconditioning(betas, prediction_type)``.

    With ``reference_images`` in the call, every ε_s (in both terms) is replaced by the Stable Target Field's implied
    noise (Xu et al. 2023) of x_s, (x − T)/σ_s with T = :func:`~diffusers_stf.losses.stable_target_field.
    stable_target_field` of x = x_0 + σ_s·ε_s.
    """

    def __init__(
        self,
        betas,
        num_steps: int = 2,
        sa_lambda: float = 1.0,
        weighting: str = "uniform",
        window: str = "paper",
        noise: str = "independent",
        reduction: str = "mean",
        timesteps: str = "uniform",
        prediction_type: str = "epsilon",
    ):
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps (K) must be an integer >= 1, got {num_steps!r}")
        if not sa_lambda >= 0:
            raise ValueError(f"sa_lambda must be >= 0, got {sa_lambda}")
        for name, value, allowed in (("window", window, WINDOWS), ("noise", noise, NOISE_COUPLINGS),
                                     ("reduction", reduction, REDUCTIONS), ("weighting", weighting, WEIGHTINGS),
                                     ("timesteps", timesteps, TIMESTEP_SAMPLINGS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        betas = _check_betas(betas)
        if num_steps > len(betas):
            raise ValueError(f"num_steps (K) must be <= T = {len(betas)}, got {num_steps}")
        self.num_train_timesteps = len(betas)
        self.preconditioning = DDPMPreconditioning(betas, prediction_type)
        self.alphas_cumprod = self.preconditioning.alphas_cumprod
        self.tau = sequence_aware_weights(betas, weighting)
        self.num_steps, self.sa_lambda = num_steps, float(sa_lambda)
        self.weighting, self.window, self.noise, self.reduction = weighting, window, noise, reduction
        self.timesteps = timesteps
        self.prediction_type = prediction_type

    @classmethod
    def from_scheduler_config(cls, config, **kwargs) -> "SequenceAwareLoss":
        """Build from a ``DDPMScheduler`` (or DDIM/EDM-``ddpm``) config: its T and β schedule, in float64."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        betas = betas_for_schedule(get("num_train_timesteps", 1000), get("beta_start", 1e-4), get("beta_end", 2e-2),
                                   get("beta_schedule", "linear"), get("trained_betas", None))
        return cls(betas, **kwargs)

    def sample_windows(self, batch_size: int, device=None, generator: Optional[torch.Generator] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw (window start t, position k of the L_simple step s = t + k), both 1-based/[B] long tensors.

        s ~ U{1..T} (each marginally; ``timesteps="antithetic"`` pairs s with T + 1 − s). ``window="paper"``:
        k ~ U{0..K−1}, so t = s − k has probability n(t)/(T·K) with n(t) the number of window steps inside {1..T};
        :meth:`window_weights` turns this into the paper's t ~ U{1−K..T} (the one window with n = 0 contributes
        nothing). ``window="official"``: k = K − 1.
        """
        T, K = self.num_train_timesteps, self.num_steps
        if self.timesteps == "antithetic":
            s = randint(T + 1, (batch_size // 2 + 1,), generator, device, low=1)
            s = torch.cat([s, T + 1 - s])[:batch_size]
        else:
            s = randint(T + 1, (batch_size,), generator, device, low=1)
        if self.window == "paper":
            k = randint(K, (batch_size,), generator, device)
        else:
            k = torch.full((batch_size,), K - 1, dtype=torch.long, device=device)
        return s - k, k

    def window_weights(self, window_start: torch.Tensor) -> torch.Tensor:
        """Importance weight T·K/((T+K)·n(t)) of a window drawn by :meth:`sample_windows` (``paper``), 1 otherwise."""
        if self.window == "official":
            return torch.ones(window_start.shape, dtype=torch.float32, device=window_start.device)
        T, K = self.num_train_timesteps, self.num_steps
        steps = window_start[None] + torch.arange(K, device=window_start.device)[:, None]
        n = ((steps >= 1) & (steps <= T)).sum(0).clamp(min=1)
        return (T * K / ((T + K) * n)).float()

    def draw_noise(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """ε_{t+j} for j = 0..K−1, shape [K, *images.shape]: independent draws, or one draw repeated (``shared``)."""
        draws = 1 if self.noise == "shared" else self.num_steps
        return randn((draws, *images.shape), generator, images.device).expand(self.num_steps, *images.shape)

    def __call__(
        self,
        unet,
        images: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        window_start: Optional[torch.Tensor] = None,
        position: Optional[torch.Tensor] = None,
        noise: Optional[torch.Tensor] = None,
        reference_images: Optional[torch.Tensor] = None,
        reference_labels: Optional[torch.Tensor] = None,
        null_label: Optional[int] = None,
    ) -> SequenceAwareLossOutput:
        """Per-sample L_simple + λ·L_sa for a batch of clean images x_0 in [-1, 1].

        Args:
            unet: network (predicting ``prediction_type``) called as ``unet(x, timestep_index)`` (``.sample`` or a tensor).
            images: x_0, shape [B, C, H, W].
            class_labels: optional [B] labels for a class-conditional UNet.
            generator: RNG for the windows and the noise.
            window_start, position: explicit 1-based window starts t and positions k (see :meth:`sample_windows`);
                the L_simple step is s = t + k, which must lie in 1..T.
            noise: explicit ε of shape [K, B, C, H, W]; entry j belongs to step t + j.
            reference_images: an STF reference set (R, C, H, W) holding the batch itself: the targets become the
                Stable Target Field's ε (VP form) instead of the drawn noise.
            reference_labels: the classes of ``reference_images``, for a class-conditional ``unet``: the STF target
                of a row averages only the references of its ``class_labels`` entry, except rows labelled
                ``null_label`` (dropped labels), which average all (see
                :func:`~diffusers_stf.losses.stable_target_field.stable_target_field`).
            null_label: see ``reference_labels``.
        """
        check_images(images)
        B, K, T = images.shape[0], self.num_steps, self.num_train_timesteps
        device = images.device
        if window_start is None:
            window_start, position = self.sample_windows(B, device, generator)
        else:
            window_start, position = window_start.to(device).long(), position.to(device).long()
            check_on_host((position >= 0) & (position < K), f"position must lie in 0..K-1 = 0..{K - 1}")
            check_on_host((window_start + position >= 1) & (window_start + position <= T),
                          f"window_start + position (the L_simple timestep) must lie in 1..T = 1..{T}")
        noise = self.draw_noise(images, generator) if noise is None else noise.to(device)
        if noise.shape != (K, *images.shape):
            raise ValueError(f"noise must have shape {(K, *images.shape)}, got {tuple(noise.shape)}")

        steps = window_start[None] + torch.arange(K, device=device)[:, None]  # s = t + j, [K, B]
        in_range = (steps >= 1) & (steps <= T)
        is_simple = torch.arange(K, device=device)[:, None] == position[None]
        evaluate = in_range if self.sa_lambda > 0 else is_simple
        rows = torch.arange(B, device=device).expand(K, B)[evaluate]
        index = steps[evaluate] - 1  # diffusers' 0-based timestep
        sigma = self.preconditioning.table_on(device)[index]  # σ_s, float64
        eps = noise[evaluate].float()
        noisy = add_noise(images[rows].float(), sigma, noise=eps)  # x = x_0 + σ_s·ε
        x_s = noisy.double() * self.preconditioning.c_in(per_sample(sigma, noisy.ndim))  # √ᾱ_s·x_0 + √(1−ᾱ_s)·ε
        kwargs = {} if class_labels is None else {"class_labels": class_labels.to(device)[rows]}
        out = unet(x_s.to(images.dtype), index, **kwargs)  # the K·B evaluations in one forward pass
        out = (out.sample if hasattr(out, "sample") else out).float()
        if reference_images is None:
            target = eps
        else:
            if reference_labels is not None and class_labels is None:
                raise ValueError("reference_labels (the classes of the references) need class_labels")
            conditional = {} if reference_labels is None else dict(
                labels=class_labels.to(device)[rows], reference_labels=reference_labels, null_label=null_label)
            clean = stable_target_field(noisy, sigma, reference_images, **conditional)
            target = ((noisy.double() - clean.double()) / per_sample(sigma, noisy.ndim)).float()

        native = out - prediction_target(target, noisy, sigma, self.preconditioning)
        if self.prediction_type == "sample":
            native = native / per_sample(sigma, native.ndim).float()  # the SNR weight ᾱ/(1−ᾱ) = 1/σ² of ‖x̂₀ − x₀‖²
        native = torch.zeros((K, *images.shape), dtype=out.dtype, device=device).index_put((evaluate,), native)
        simple = reduce_per_sample(native[position, torch.arange(B, device=device)] ** 2, self.reduction)
        logs = {"loss_simple": simple.detach().mean()}
        if self.sa_lambda == 0:
            sa = torch.zeros_like(simple)
        else:
            eps_hat = epsilon_from_prediction(out, noisy, sigma, self.preconditioning)
            residual = torch.zeros((K, *images.shape), dtype=out.dtype, device=device)
            residual = residual.index_put((evaluate,), eps_hat - target)
            tau = self.tau.to(device)[(steps - 1).clamp(0, T - 1)].float() * in_range
            window_mean = (tau.reshape(K, B, *([1] * (images.ndim - 1))) * residual).mean(0)  # (1/K) Σ_s τ_s r_s
            sa = self.window_weights(window_start) * reduce_per_sample(window_mean**2, self.reduction)
            logs["loss_sa"] = sa.detach().mean()
        s = window_start + position
        sigma_s = self.preconditioning.table_on(device)[s - 1].float()
        return SequenceAwareLossOutput(loss=simple + self.sa_lambda * sa, sigma=sigma_s, simple=simple, sa=sa,
                                       timestep=s, logs=logs)
