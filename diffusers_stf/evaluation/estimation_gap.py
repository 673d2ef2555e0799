"""The accumulated estimation gap of a DDPM/DDIM sampling chain (Nguyen et al. 2024, Theorem 1 and Figure 4).

Start from a ground-truth x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε and run two chains with the same sampler and the same
sampling noise z:

- the **model** chain x̂, whose steps use ε_θ(x̂_s, s);
- the **ground-truth** chain x, whose steps use the true noise (x_s − √ᾱ_s·x_0)/√(1−ᾱ_s) of x_0, i.e. the exact
  posterior q(x_{s'} | x_s, x_0) (η = 1, DDPM) or the exact DDIM trajectory (η = 0).

The accumulated gap is d̄_s = x̂_s − x_s. For DDPM it obeys d̄_{s−1} = γ_{2,s}·d̄_s − β_s/(√α_s √(1−ᾱ_s))·r̂_s with
r̂_s = ε_θ(x̂_s, s) − (x̂_s − √ᾱ_s·x_0)/√(1−ᾱ_s), so a chain from x_T ends at d̄_1 = −Σ_{s=2}^T τ_s r̂_s with the τ_s of
Theorem 1 (:func:`diffusers_stf.losses.sequence_aware.sequence_aware_weights`); the sequence-aware loss bounds it.

The chains are stepped with diffusers' ``DDIMScheduler`` built from the model's scheduler config (η = 1 on the full
grid is DDPM ancestral sampling with variance β̃), in float64. ``timesteps`` are diffusers' 0-based indices
(paper time t = index + 1); the final clean sample x_0 is labelled −1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from diffusers import DDIMScheduler
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm


@dataclass
class EstimationGapOutput(BaseOutput):
    """Accumulated estimation gap along one sampling chain.

    Args:
        timesteps: 0-based index of each state of the chain, from the start x_t down to −1 (the clean sample x_0).
        gap_norm: mean over the batch of ‖d̄_s‖₂ at each state (0 at the start), float64 [len(timesteps)].
        gap_rms: root mean square of d̄_s over batch and pixels at each state.
        final_gap: d̄ at the last state, per sample, shape of x_0.
        gaps: d̄ at every state, [len(timesteps), B, C, H, W] (float64).
    """

    timesteps: torch.Tensor
    gap_norm: torch.Tensor
    gap_rms: torch.Tensor
    final_gap: torch.Tensor
    gaps: torch.Tensor


def _model_eps(unet, x, t, class_labels):
    dtype = next(unet.parameters()).dtype
    index = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    kwargs = {} if class_labels is None else {"class_labels": class_labels}
    out = unet(x.to(dtype), index, **kwargs)
    return (out.sample if hasattr(out, "sample") else out).double()


@torch.no_grad()
def estimation_gap(
    unet,
    scheduler_config,
    images: torch.Tensor,
    start_timestep: Optional[int] = None,
    num_inference_steps: Optional[int] = None,
    eta: float = 1.0,
    generator: Optional[torch.Generator] = None,
    class_labels: Optional[torch.Tensor] = None,
    clip_sample: Optional[bool] = None,
    noise: Optional[torch.Tensor] = None,
    sampling_noise: Optional[torch.Tensor] = None,
    progress: bool = True,
) -> EstimationGapOutput:
    """Run the model chain and the ground-truth chain from x_t and return the accumulated gap d̄ per state.

    Args:
        unet: an ε-prediction ``UNet2DModel`` (e.g. ``DDPMPipeline.unet``).
        scheduler_config: the model's ``DDPMScheduler``/``DDIMScheduler`` config (or the scheduler itself).
        images: clean x_0 in [-1, 1], [B, C, H, W].
        start_timestep: 0-based index t − 1 of the starting x_t; the chain starts at the largest grid timestep
            ≤ it. Default: the top of the grid.
        num_inference_steps: grid size (the scheduler's ``timestep_spacing`` decides the grid). Default: T (every step).
        eta: 1 for DDPM-like ancestral steps, 0 for deterministic DDIM.
        generator: RNG for x_t's noise and the sampling noise z (shared by both chains).
        class_labels: labels for a class-conditional UNet.
        clip_sample: override the config's x_0 clipping (``None`` keeps it; ``False`` makes the gap exactly linear in
            the residuals as in Theorem 1).
        noise: explicit ε of the starting x_t (default: drawn from ``generator``).
        sampling_noise: explicit z of every step, [number of steps, B, C, H, W] (default: drawn from ``generator``).
        progress: show a tqdm bar.
    """
    config = getattr(scheduler_config, "config", scheduler_config)
    overrides = {} if clip_sample is None else {"clip_sample": clip_sample}
    scheduler = DDIMScheduler.from_config(config, **overrides)
    T = scheduler.config.num_train_timesteps
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if num_inference_steps is not None and not 1 <= num_inference_steps <= T:
        raise ValueError(f"num_inference_steps must lie in 1..{T}, got {num_inference_steps}")
    if start_timestep is not None and not 0 <= start_timestep < T:
        raise ValueError(f"start_timestep must be a 0-based index in 0..{T - 1}, got {start_timestep}")
    scheduler.set_timesteps(num_inference_steps or T)
    grid = [int(t) for t in scheduler.timesteps if start_timestep is None or int(t) <= start_timestep]
    if not grid:
        raise ValueError(f"no grid timestep is <= start_timestep={start_timestep}; lower num_inference_steps")

    device = images.device
    x0 = images.double()
    abar = scheduler.alphas_cumprod.double().to(device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(device)
    x = abar[grid[0]].sqrt() * x0 + (1 - abar[grid[0]]).sqrt() * noise.double()
    x_hat = x.clone()
    gaps = [torch.zeros_like(x)]
    if sampling_noise is not None and sampling_noise.shape != (len(grid), *x0.shape):
        raise ValueError(f"sampling_noise must have shape {(len(grid), *x0.shape)}, got {tuple(sampling_noise.shape)}")
    for i, t in enumerate(tqdm(grid, desc="estimation gap", disable=not progress)):
        if sampling_noise is None:
            z = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(device)
        else:
            z = sampling_noise[i].to(device=device, dtype=torch.float64)
        eps_true = (x - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
        eps_model = _model_eps(unet, x_hat, t, class_labels)
        x = scheduler.step(eps_true, t, x, eta=eta, variance_noise=z).prev_sample
        x_hat = scheduler.step(eps_model, t, x_hat, eta=eta, variance_noise=z).prev_sample
        gaps.append(x_hat - x)
    gaps = torch.stack(gaps)
    flat = gaps.flatten(2)
    return EstimationGapOutput(
        timesteps=torch.tensor(grid + [-1]),
        gap_norm=flat.norm(dim=2).mean(1),
        gap_rms=flat.pow(2).mean((1, 2)).sqrt(),
        final_gap=gaps[-1],
        gaps=gaps,
    )


def plot_estimation_gaps(results: Dict[str, EstimationGapOutput], path: str, title: Optional[str] = None) -> str:
    """Plot ‖d̄_t‖ against paper time t (index + 1) for several models, one line each (the paper's Figure 4).

    Args:
        results: model name -> :func:`estimation_gap` output.
        path: where to write the PNG.
        title: plot title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, out in results.items():
        marker = "." if len(out.timesteps) < 60 else None
        ax.plot((out.timesteps + 1).numpy(), out.gap_norm.cpu().numpy(), label=name, marker=marker)
    ax.invert_xaxis()  # sampling runs from large t to 0
    ax.set_xlabel("timestep t (paper, 1-based; 0 = x_0)")
    ax.set_ylabel("accumulated estimation gap  E‖x̂_t − x_t‖")
    ax.set_title(title or "Estimation gap along the sampling chain")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
