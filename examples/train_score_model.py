#!/usr/bin/env python
"""Train a noise-conditional score network (NCSN/NCSNv2) with denoising score matching, then sample it with annealed
Langevin dynamics (ALS), consistent annealed sampling (CAS), a VE predictor–corrector sampler (PC) and the
probability-flow ODE, and write a comparison grid.

    accelerate launch examples/train_score_model.py                 # embedded 8x8 digits, ~2-3 min on 2 CPU cores
    accelerate launch examples/train_score_model.py --ncsnv2_conditioning --steps_per_level 3
    accelerate launch examples/train_score_model.py --max_train_steps 4000 --validation_steps 1000 --num_threads 2

The noise levels follow NCSNv2 (Song & Ermon 2020): σ_1 = the largest distance between two training images
(Technique 1), a geometric schedule down to σ_L = ``--sigma_min`` whose ratio γ solves Technique 2 for the data
dimension D, and Technique 4's Langevin step size ε for T = ``--steps_per_level`` steps per level. The network is a
``UNet2DModel`` (or another ``--architecture``: EDM's SongUNet, DhariwalUNet, EDM2's network) that receives log σ as
its timestep and outputs σ·s_θ(x, σ) (``prediction_type="scaled_score"``;
``--ncsnv2_conditioning`` makes it unconditional, NCSNv2's Technique 3), trained with NCSN's denoising score
matching loss (λ(σ) = σ², log σ uniform on [log σ_L, log σ_1]). The four samplers get the same number of network
evaluations.

Writes to --output_dir: checkpoints, logs/metrics.{jsonl,csv}, ``samples.png`` (the comparison grid of the EMA
weights; ``samples/step_N.png`` with ``--validation_steps``), and an ``EDMPipeline`` folder (``unet/`` safetensors,
``scheduler/`` = ALS) with the configs of the four samplers in ``scheduler_{als,cas,pc,ode}/`` and a model card.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

from diffusers_stf import AnnealedLangevinScheduler, EDMPipeline, PredictorCorrectorScheduler
from diffusers_stf.digits import DIGITS_NAME
from diffusers_stf.losses.score_matching import DenoisingScoreMatchingLoss
from diffusers_stf.noise_schedules import max_pairwise_distance, ncsnv2_sigmas, ncsnv2_step_size
from diffusers_stf.preconditioning import Denoiser
from diffusers_stf.training import ModelCardInfo, Trainer, add_training_args, image_grid
from diffusers_stf.training import load_training_images, make_accelerator, parse_training_args
from diffusers_stf.training.network import make_network, network_class, network_summary
from diffusers_stf.training import training_parser
from diffusers_stf.training.in_training_eval import EvaluationSampler
from diffusers_stf.training.validation import check_sampling_steps

logger = logging.getLogger("train_score_model")

SAMPLERS = ("als", "cas", "pc", "ode")
SAMPLER_TITLES = {"als": "ALS (NCSN)", "cas": "CAS", "pc": "PC (reverse diffusion + Langevin)",
                  "ode": "probability-flow ODE"}

DESCRIPTION = (
    "A noise-conditional score network s_θ(x, σ) ≈ ∇ log p_σ(x) (a network of class `{network}`{conditioning}) "
    "trained with NCSN's denoising score matching loss (Song & Ermon, NeurIPS 2019, [arXiv:1907.05600]"
    "(https://arxiv.org/abs/1907.05600)), λ(σ) = σ², log σ uniform on [log {sigma_min:g}, log {sigma_max:.3g}]. "
    "The noise levels follow NCSNv2 (Song & Ermon, NeurIPS 2020, "
    "[arXiv:2006.09011](https://arxiv.org/abs/2006.09011)): "
    "σ_1 = {sigma_max:.3g}{sigma_1_source}; L = {L} geometric levels down to σ_L = {sigma_min:g}, ratio "
    "γ = {gamma:.4f}{levels_source}; and Langevin step size "
    "ε = {eps:.3g} for T = {T} steps per level (Technique 4). It samples with annealed Langevin dynamics (ALS, "
    "NCSN Algorithm 1), consistent annealed sampling (CAS, Jolicoeur-Martineau et al., ICLR 2021), and the VE SDE's "
    "predictor–corrector sampler and probability-flow ODE (Song et al., ICLR 2021)."
)
CONDITIONING = {
    False: " that receives log σ as its timestep and outputs σ·s_θ(x, σ)",
    True: " without noise conditioning: s_θ(x, σ) = F(x)/σ, NCSNv2's Technique 3",
}
USAGE = """import torch
from {network_module} import {network}
from diffusers_stf import AnnealedLangevinScheduler, EDMPipeline, PredictorCorrectorScheduler

# annealed Langevin dynamics (NCSN Algorithm 1): {L} noise levels, {T} Langevin steps each
pipeline = EDMPipeline.from_pretrained("{{repo}}")
generator = torch.Generator().manual_seed(0)
images = pipeline(batch_size=16, num_inference_steps={L}, generator=generator).images

# the other samplers of the grid, each with about {nfe} network evaluations
pipeline.scheduler = AnnealedLangevinScheduler.from_pretrained("{{repo}}", subfolder="scheduler_cas")
images = pipeline(batch_size=16, num_inference_steps={L}, generator=generator).images
pipeline.scheduler = PredictorCorrectorScheduler.from_pretrained("{{repo}}", subfolder="scheduler_pc")
images = pipeline(batch_size=16, num_inference_steps={pc_steps}, generator=generator).images
pipeline.scheduler = PredictorCorrectorScheduler.from_pretrained("{{repo}}", subfolder="scheduler_ode")
images = pipeline(batch_size=16, num_inference_steps={ode_steps}, generator=generator).images

# the same annealed Langevin sampler as a plain diffusers loop
unet = {network}.from_pretrained("{{repo}}", subfolder="unet")
scheduler = AnnealedLangevinScheduler.from_pretrained("{{repo}}", subfolder="scheduler_als")
scheduler.set_timesteps({L})
x = torch.randn(16, {channels}, {size}, {size}, generator=generator) * scheduler.init_noise_sigma
with torch.no_grad():
    for t in scheduler.timesteps:  # L·T Langevin steps, then Tweedie's denoising step
        score_output = unet(scheduler.scale_model_input(x, t), t.float().expand(len(x))).sample
        x = scheduler.step(score_output, t, x, generator=generator).prev_sample
images = (x / 2 + 0.5).clamp(0, 1)"""
LOADING_NOTE = (
    "The folder is an `EDMPipeline`, whose loop is the standard diffusers one, with the EMA UNet and the ALS "
    "scheduler; `scheduler_als/`, `scheduler_cas/`, `scheduler_pc/` and `scheduler_ode/` hold the four samplers of "
    "the grid. For ALS and CAS `num_inference_steps` is the number of noise levels L (T Langevin steps each), for "
    "PC and the ODE the number of SDE/ODE steps."
)


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser(__doc__)
    g = parser.add_argument_group("noise levels and network (NCSNv2 techniques)")
    g.add_argument("--sigma_min", type=float, default=0.01, help="σ_L, the smallest noise level")
    g.add_argument("--sigma_max", type=float, default=None,
                   help="σ_1; default: Technique 1, the largest distance between two training images")
    g.add_argument("--technique2_C", type=float, default=0.5,
                   help="C of Technique 2, the overlap between neighbouring noise levels (NCSNv2: 0.5)")
    g.add_argument("--ncsnv2_conditioning", action="store_true",
                   help="Technique 3: an unconditional network, s_θ(x, σ) = F(x)/σ")
    g = parser.add_argument_group("samplers of the comparison grid")
    g.add_argument("--steps_per_level", type=int, default=5,
                   help="T, Langevin steps per noise level of ALS (NCSNv2: 5); ε follows from Technique 4")
    g.add_argument("--pc_snr", type=float, default=0.16, help="r, the PC corrector's signal-to-noise ratio (VE: 0.16)")
    g.add_argument("--num_threads", type=int, default=1,
                   help="torch CPU threads; 1 is fastest on a busy 2-core machine, 0 keeps torch's default")
    add_training_args(parser, default_num_epochs=36)
    parser.set_defaults(output_dir=os.path.join("outputs", "train_score_model"), checkpointing_steps=500,
                        validation_steps=0, logging_steps=50, num_inference_steps=None)
    for action in parser._actions:  # the shared help text describes EDM's steps
        if action.dest == "num_inference_steps":
            action.help = ("noise levels L of the ALS/CAS samplers (default: Technique 2's L); PC gets L·T/2 steps "
                           "(a corrector and a predictor evaluation each) and the ODE L·T, the same budget")
    return parser


def check_args(args):
    if not args.sigma_min > 0:
        raise ValueError(f"--sigma_min must be > 0, got {args.sigma_min}")
    if args.sigma_max is not None and not args.sigma_max > args.sigma_min:
        raise ValueError(f"--sigma_max must be > --sigma_min ({args.sigma_min}), got {args.sigma_max}")
    if args.steps_per_level < 1:
        raise ValueError(f"--steps_per_level must be >= 1, got {args.steps_per_level}")
    if not args.pc_snr > 0:
        raise ValueError(f"--pc_snr must be > 0, got {args.pc_snr}")
    if args.num_threads < 0:
        raise ValueError(f"--num_threads must be >= 0, got {args.num_threads}")
    if args.num_inference_steps is not None and args.num_inference_steps < 2:
        raise ValueError(f"--num_inference_steps (noise levels) must be >= 2, got {args.num_inference_steps}")
    return args


def noise_levels(args, data):
    """σ_1 (Technique 1: the largest distance between two training images, unless ``--sigma_max``) and the number of
    sampling levels L (Technique 2's geometric schedule down to ``--sigma_min``, unless ``--num_inference_steps``)."""
    dim = data.channels * data.resolution**2
    sigma_max = args.sigma_max or max_pairwise_distance(data.batch(torch.arange(len(data)))["images"])
    num_levels = args.num_inference_steps or len(ncsnv2_sigmas(sigma_max, args.sigma_min, dim, args.technique2_C))
    return sigma_max, num_levels


def make_samplers(args, sigma_max: float, num_levels: int) -> dict:
    """The four schedulers of the comparison, with the same number of network evaluations: ALS and CAS on
    ``num_levels`` geometric levels with Technique 4's ε for that schedule's ratio γ, PC with half as many steps as
    ALS has Langevin steps (each is a corrector plus a predictor evaluation), and the ODE with as many."""
    T = args.steps_per_level
    gamma = (sigma_max / args.sigma_min) ** (1 / (num_levels - 1))
    conventions = dict(prediction_type="scaled_score",
                       timestep_type="none" if args.ncsnv2_conditioning else "log_sigma")
    annealed = dict(sigma_max=sigma_max, sigma_min=args.sigma_min, num_train_timesteps=num_levels, steps_per_level=T,
                    step_size=ncsnv2_step_size(gamma, T, args.sigma_min), denoise_final=True, **conventions)
    sde = dict(sde_type="ve", sigma_max=sigma_max, sigma_min=args.sigma_min, snr=args.pc_snr, **conventions)
    nfe = num_levels * T
    return {  # name: (scheduler, num_inference_steps)
        "als": (AnnealedLangevinScheduler(sampler="als", **annealed), num_levels),
        "cas": (AnnealedLangevinScheduler(sampler="cas", **annealed), num_levels),
        "pc": (PredictorCorrectorScheduler(correct_steps=1, **sde), max(nfe // 2, 1)),
        "ode": (PredictorCorrectorScheduler(correct_steps=0, probability_flow=True, **sde), nfe),
    }


def save_comparison(panels, title: str, path: str) -> str:
    """One column per (title, images in [−1, 1], caption) panel, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.9))
    for ax, (name, images, caption) in zip(axes, panels):
        ax.imshow(image_grid((images + 1) / 2, min_cell=1), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(caption, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def digits_summary(data):
    """``summary(images)``: the shipped digits classifier's mean confidence and class entropy (at most ln 10 = 2.30)
    of images in [−1, 1]; an empty string for other datasets."""
    if data.name != DIGITS_NAME:
        return lambda images: ""
    from diffusers_stf.evaluation import class_statistics, load_feature_extractor

    classifier = load_feature_extractor("digits")

    def summary(images):
        stats = class_statistics(classifier(images.clamp(-1, 1).float().cpu())[1])
        return f"confidence {stats['confidence']:.2f}, class entropy {stats['class_entropy']:.2f}"

    return summary


def model_card(args, data, sigma_max: float, samplers: dict, architecture: str = "unet2d") -> ModelCardInfo:
    """The card: the method and the NCSNv2 numbers; ``validation_fn`` adds each sampler's result to ``facts``."""
    als = samplers["als"][0].config
    levels, T = als.num_train_timesteps, als.steps_per_level
    gamma = (sigma_max / args.sigma_min) ** (1 / (levels - 1))
    return ModelCardInfo(
        title=f"Noise-conditional score model (NCSNv2) on {data.name}",
        description=DESCRIPTION.format(network=network_class(architecture).__name__,
                                       conditioning=CONDITIONING[args.ncsnv2_conditioning], sigma_min=args.sigma_min,
                                       sigma_max=sigma_max, L=levels, gamma=gamma, eps=als.step_size, T=T,
                                       sigma_1_source=", the largest distance between two training images "
                                       "(Technique 1)" if args.sigma_max is None else "",
                                       levels_source=" from Technique 2" if args.num_inference_steps is None else ""),
        tags=["score-based", "ncsn", "ncsnv2", "annealed-langevin", "score-sde"],
        usage=USAGE.format(network=network_class(architecture).__name__,
                           network_module="diffusers" if architecture == "unet2d" else "diffusers_stf.models",
                           L=levels, T=T, nfe=levels * T, pc_steps=samplers["pc"][1], ode_steps=samplers["ode"][1],
                           channels=data.channels, size=data.resolution),
        loading_note=LOADING_NOTE,
        sample_kwargs={"num_inference_steps": levels},
        facts={f"σ_1 ({'Technique 1' if args.sigma_max is None else '--sigma_max'})": round(sigma_max, 4),
               f"L, γ ({'Technique 2' if args.num_inference_steps is None else '--num_inference_steps'})":
                   f"{levels}, {gamma:.4f}",
               f"ε for T = {T} (Technique 4)": f"{als.step_size:.4g}",
               "grid_caption": "Left to right: training images, then the EMA weights sampled with ALS, CAS, PC and "
                               "the probability-flow ODE from the same seed, with the same number of network "
                               "evaluations."},
        extra={"script": "examples/train_score_model.py"},
    )


def main(argv=None):
    args, config = parse_training_args(build_parser(), argv)
    check_args(args)
    training = config.training
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    accelerator = make_accelerator(training)
    data = load_training_images(config.data, training.seed, accelerator)
    unet = make_network(config.network, config.unet, data.resolution, data.channels)
    sigma_max, num_levels = noise_levels(args, data)
    samplers = make_samplers(args, sigma_max, num_levels)
    for scheduler, steps in samplers.values():  # the comparison grid's samplers take their steps, before training
        check_sampling_steps(scheduler, steps)
    card = model_card(args, data, sigma_max, samplers, config.network.architecture)
    accelerator.print(
        f"{len(data)} training images {data.channels}x{data.resolution}x{data.resolution} ({data.name}); "
        f"{network_summary(unet, config.network)}\nNCSNv2: "
        + ", ".join(f"{k} = {v}" for k, v in card.facts.items() if k != "grid_caption"))

    dsm = DenoisingScoreMatchingLoss(sigma_min=args.sigma_min, sigma_max=sigma_max, sigma_sampling="log_uniform")

    preconditioning = samplers["als"][0].preconditioning  # the samplers' parametrisation, trained as it is sampled

    def loss_fn(model, batch, generator):
        return dsm(Denoiser(model, preconditioning), batch["images"], generator=generator)

    summary = digits_summary(data)
    n = training.num_validation_images
    real = data.batch(torch.randperm(len(data), generator=torch.Generator().manual_seed(training.validation_seed))[:n])
    real = real["images"]

    def validation_fn(ema_model, step, path):
        """The comparison grid: training images, then the EMA weights sampled with each sampler from one seed."""
        panels = [("training data", real, summary(real))]
        for name, (scheduler, steps) in samplers.items():
            pipeline = EDMPipeline(unet=ema_model, scheduler=scheduler).to(accelerator.device)
            pipeline.set_progress_bar_config(disable=True)
            generator = torch.Generator(device=accelerator.device).manual_seed(training.validation_seed)
            start = time.time()
            images = pipeline(batch_size=n, num_inference_steps=steps, generator=generator, output_type="pt").images
            seconds, nfe = time.time() - start, len(scheduler.timesteps)
            images = images.cpu() * 2 - 1
            caption = summary(images)
            card.facts[SAMPLER_TITLES[name]] = f"{nfe} NFE, {seconds:.1f} s" + (f", {caption}" if caption else "")
            accelerator.print(f"step {step}: {SAMPLER_TITLES[name]:34s} {card.facts[SAMPLER_TITLES[name]]}")
            panels.append((f"{SAMPLER_TITLES[name]}\n{nfe} NFE, {seconds:.1f} s", images, caption))
        title = (f"Noise-conditional score model on {data.name}, EMA weights at step {step}: "
                 f"σ from {sigma_max:.3g} to {args.sigma_min:g}, T = {args.steps_per_level}")
        return save_comparison(panels, title, path)

    def make_pipeline(model):
        return EDMPipeline(unet=model, scheduler=samplers["als"][0])

    if accelerator.is_main_process:  # now, so that the final folder and its Hub upload hold them
        for name, (scheduler, _) in samplers.items():
            scheduler.save_config(os.path.join(training.output_dir, f"scheduler_{name}"))
    fingerprint = {"loss": "denoising_score_matching", "sigma_sampling": "log_uniform", "sigma_min": args.sigma_min,
                   "sigma_max": sigma_max, "ncsnv2_conditioning": args.ncsnv2_conditioning,
                   **config.network.fingerprint()}
    trainer = Trainer(training, unet, loss_fn, data, accelerator=accelerator, make_pipeline=make_pipeline,
                      model_card=card, fingerprint=fingerprint, validation_fn=validation_fn,
                      evaluation_sampler=EvaluationSampler(make_pipeline, samplers["als"][1]))  # the saved sampler
    result = trainer.train()
    accelerator.print(f"Sampler configs:       {os.path.abspath(result.output_dir)}/scheduler_{{{','.join(SAMPLERS)}}}/")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
