#!/usr/bin/env python
"""Train a DDPM UNet2DModel with the sequence-aware loss (SA-DPM, Nguyen et al., AAAI 2024).

    accelerate launch examples/train_sequence_aware.py                         # SA-2 (λ=1) on the embedded 8x8 digits
    accelerate launch examples/train_sequence_aware.py --sa_lambda 0           # the DDPM baseline (L_simple only)
    accelerate launch examples/train_sequence_aware.py --sa_k 3 --sa_lambda 0.3 --beta_schedule cosine
    accelerate launch examples/train_sequence_aware.py --stf --stf_reference_batch_size 512   # + Stable Target Field
    accelerate launch examples/train_sequence_aware.py --class_conditional --label_dropout 0.1   # for CFG
    accelerate launch examples/train_sequence_aware.py --architecture ddpmpp    # EDM's DDPM++ network (SongUNet)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train_sequence_aware.py --cpu
    accelerate launch examples/train_sequence_aware.py --dataset_name cifar10 --resolution 32 --random_flip \\
        --block_out_channels 128,256,256,256 --layers_per_block 2 --attention_levels 1 --dropout 0.1 \\
        --learning_rate 2e-4 --train_batch_size 128

L = L_simple + λ·L_sa, L_sa = E‖(1/K) Σ_{s=t}^{t+K−1} τ_s (ε_θ(x_s, s) − ε_s)‖² (K consecutive steps, one batched UNet
call). ``--prediction_type sample|v_prediction`` (diffusers' flag) trains an x₀- or v-predictor instead: L_simple is
the MSE to that target (SNR-weighted for x₀, as diffusers' train_unconditional.py) and L_sa stays on the equivalent
ε-residuals; the saved DDPMScheduler carries the prediction_type. Writes to --output_dir: checkpoints,
logs/metrics.{jsonl,csv} (L, L_simple, L_sa, loss per noise level),
DDIM sample grids, and at the end a diffusers ``DDPMPipeline`` folder (unet + DDPMScheduler, safetensors) with a model
card. ``DDPMPipeline``/``DDIMPipeline`` load it directly; ``diffusers_stf.EDMPipeline`` samples it with
``EDMHeunScheduler.from_config(config, preconditioning="ddpm")``. With ``--class_conditional`` the UNet takes the
images' classes (``num_class_embeds`` = K + 1, labels dropped to the null label K with probability
``--label_dropout``) and the folder is an ``EDMPipeline`` with the ``DDPMScheduler`` and ``null_class_label`` = K
(diffusers' ``DDPMPipeline`` passes no class labels), sampled with ``class_labels`` and ``guidance_scale``.
``--architecture ddpmpp|adm`` trains EDM's DDPM++ or ADM network instead of the UNet2DModel (their positional noise
embeddings take the step index, as in their papers); the folder is then an ``EDMPipeline`` with the
``DDPMScheduler``, which plain diffusers loads with ``trust_remote_code=True``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from diffusers_stf import DiscriminatorGuidedPipeline, EDMPipeline
from diffusers_stf.losses import SequenceAwareLoss, check_reference_batch_size
from diffusers_stf.losses.sequence_aware import NOISE_COUPLINGS, REDUCTIONS, TIMESTEP_SAMPLINGS, WEIGHTINGS, WINDOWS
from diffusers_stf.noise_schedules import betas_for_schedule
from diffusers_stf.training import ModelCardInfo, Trainer, add_class_conditioning_args, add_training_args
from diffusers_stf.training import class_conditioning, load_training_images
from diffusers_stf.training import make_accelerator, parse_training_args, sample_grid, save_image_grid
from diffusers_stf.training import training_parser
from diffusers_stf.training.model_card import DEFAULT_TEMPLATE
from diffusers_stf.training.network import make_network, network_summary
from diffusers_stf.training.in_training_eval import EvaluationSampler
from diffusers_stf.training.plots import sampler_caption
from diffusers_stf.training.validation import check_sampling_steps

logger = logging.getLogger("train_sequence_aware")

PARAMETRISATIONS = {"epsilon": "ε", "sample": "x₀", "v_prediction": "v"}
BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear"}

DESCRIPTION = (
    "An unconditional {parametrisation}-prediction {network} trained the DDPM way (Ho et al., 2020; {T} steps, {schedule} β "
    "schedule){sa}{stf}. It is a plain diffusers `DDPMPipeline`."
)
SA_TEXT = (
    " with the **sequence-aware loss** of Nguyen et al. (AAAI 2024, "
    "[arXiv:2312.12431](https://arxiv.org/abs/2312.12431)), L = L_simple + λ·L_sa with K = {k} consecutive steps, "
    "λ = {lam} and {weighting} weights: the residuals of K neighbouring steps are penalised together, which reduces "
    "the estimation gap that accumulates along the sampling chain"
)
STF_TEXT = (
    ", with the **Stable Target Field** (Xu, Tong & Jaakkola, ICLR 2023) noise targets over a reference batch of "
    "{r} images"
)
USAGE = """import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

pipeline = DDPMPipeline.from_pretrained("{repo}")
images = pipeline(batch_size=16, num_inference_steps=1000, generator=torch.Generator().manual_seed(0)).images

# 50 deterministic DDIM steps
ddim = DDIMPipeline(unet=pipeline.unet, scheduler=DDIMScheduler.from_config(pipeline.scheduler.config))
images = ddim(batch_size=16, num_inference_steps=50, eta=0.0, generator=torch.Generator().manual_seed(0)).images

# EDM's Heun sampler (35 network evaluations) through diffusers_stf
from diffusers_stf import EDMHeunScheduler, EDMPipeline

edm = EDMPipeline(unet=pipeline.unet,
                  scheduler=EDMHeunScheduler.from_config(pipeline.scheduler.config, preconditioning="ddpm"))
images = edm(batch_size=16, num_inference_steps=18, generator=torch.Generator().manual_seed(0)).images"""
NETWORK_TEXT = {"unet2d": "`UNet2DModel`",
                "ddpmpp": "DDPM++ network (`SongUNet`: Song et al., ICLR 2021, as re-implemented in EDM)",
                "adm": "ADM network (`DhariwalUNet`: Dhariwal & Nichol, NeurIPS 2021, as re-implemented in EDM)"}
EDM_FOLDER_TEXT = ("It is saved as a `diffusers_stf.EDMPipeline` with the `DDPMScheduler` ({why}); any diffusers "
                   "scheduler samples it (DDIM below).")
EDM_USAGE = """import torch
from diffusers import DDIMScheduler
from diffusers_stf import EDMPipeline

pipeline = EDMPipeline.from_pretrained("{repo}")  # with the DDPMScheduler it was trained for
pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)  # 50 deterministic DDIM steps
images = pipeline(batch_size=16, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images"""


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser(__doc__)
    g = parser.add_argument_group("DDPM schedule")
    g.add_argument("--num_train_timesteps", type=int, default=1000, help="T")
    g.add_argument("--beta_schedule", type=str, default="linear", choices=tuple(BETA_SCHEDULES),
                   help="linear (Ho et al.), cosine (Nichol & Dhariwal, diffusers' squaredcos_cap_v2) or scaled_linear")
    g.add_argument("--beta_start", type=float, default=1e-4, help="first β (linear, scaled_linear)")
    g.add_argument("--beta_end", type=float, default=2e-2, help="last β (linear, scaled_linear)")
    g.add_argument("--clip_sample", action="store_true",
                   help="save the DDPMScheduler with clip_sample=True (diffusers' default; SA-DPM samples without)")
    g = parser.add_argument_group("loss (sequence-aware, Nguyen et al. 2024)")
    g.add_argument("--sa_k", type=int, default=2, help="K, consecutive steps per window (paper: 2, 3, 4)")
    g.add_argument("--sa_lambda", type=float, default=1.0,
                   help="λ of L_simple + λ·L_sa (paper: SA-2 1, SA-3 0.3, SA-4 0.2); 0 = the DDPM baseline")
    g.add_argument("--sa_weighting", type=str, default="uniform", choices=WEIGHTINGS,
                   help="uniform: τ=1 (what the official code trains with); paper: Theorem 1's τ_t (≤ 1e-2, raise λ)")
    g.add_argument("--sa_window", type=str, default="official", choices=WINDOWS,
                   help="paper: window start t ~ U{1-K..T}; official: the L_simple step ends the window")
    g.add_argument("--sa_timesteps", type=str, default="antithetic", choices=TIMESTEP_SAMPLINGS,
                   help="antithetic: t and T-1-t in each batch (the official train_ddp.py); uniform: independent")
    g.add_argument("--sa_noise", type=str, default="independent", choices=NOISE_COUPLINGS,
                   help="independent: a fresh ε per step of the window (paper, official code); shared: one ε")
    g.add_argument("--loss_reduction", type=str, default="sum", choices=REDUCTIONS,
                   help="mean over pixels (diffusers) or sum over pixels (the official code); both terms alike")
    g.add_argument("--stf", action="store_true", help="Stable Target Field targets (VP form) in place of ε")
    g.add_argument("--stf_reference_batch_size", type=int, default=1024,
                   help="R: STF references per process, the minibatch included")
    g = parser.add_argument_group("validation sampler")
    g.add_argument("--validation_eta", type=float, default=0.0,
                   help="η of the DDIM validation grids (0: DDIM, 1: DDPM)")
    add_class_conditioning_args(parser)
    add_training_args(parser, default_num_epochs=107, ddpm=True)
    parser.set_defaults(output_dir=os.path.join("outputs", "train_sequence_aware"), checkpointing_steps=500,
                        validation_steps=500, logging_steps=50, num_inference_steps=50)
    return parser


# The networks whose noise embedding takes DDPM's step index t = 0 … T − 1: UNet2DModel, DDPM++ and ADM use
# sinusoidal (positional) embeddings made for it. NCSN++'s and EDM2's random Fourier features are made for
# c_noise = ln(σ)/4 (about −2 … 1.5); at integer steps up to 999 their frequencies alias.
DDPM_ARCHITECTURES = ("unet2d", "ddpmpp", "adm")


def check_args(args, config):
    if config.network.architecture not in DDPM_ARCHITECTURES:
        raise ValueError(f"--architecture {config.network.architecture}: a DDPM network takes the step index "
                         f"t = 0 … T-1 as its noise input, and the Fourier noise features of ncsnpp and edm2 are made "
                         f"for EDM's c_noise = ln(sigma)/4 (they alias at integer steps); choose one of "
                         f"{DDPM_ARCHITECTURES}, or train ncsnpp/edm2 with train_stf.py")
    if args.sa_k < 1:
        raise ValueError(f"--sa_k must be >= 1, got {args.sa_k}")
    if args.sa_lambda < 0:
        raise ValueError(f"--sa_lambda must be >= 0, got {args.sa_lambda}")
    if args.num_train_timesteps < 1:
        raise ValueError(f"--num_train_timesteps must be >= 1, got {args.num_train_timesteps}")
    if args.sa_k > args.num_train_timesteps:
        raise ValueError(f"--sa_k must be <= --num_train_timesteps ({args.num_train_timesteps}), got {args.sa_k}")
    if not 0 <= args.validation_eta <= 1:
        raise ValueError(f"--validation_eta must be in [0, 1], got {args.validation_eta}")
    if args.beta_schedule == "cosine":
        given = [f"--{name}" for name in ("beta_start", "beta_end") if name in config.explicit]
        if given:
            raise ValueError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} not used by --beta_schedule "
                             "cosine (its βs follow from ᾱ(t)); drop them, or choose linear or scaled_linear")
    elif not args.beta_start <= args.beta_end:
        raise ValueError(f"--beta_start {args.beta_start} must be <= --beta_end {args.beta_end}: the forward process "
                         "adds more noise at each step")
    steps = config.training.num_inference_steps
    if steps is not None and steps > args.num_train_timesteps:
        raise ValueError(f"--num_inference_steps {steps} (the steps of the DDIM validation grids) must be <= "
                         f"--num_train_timesteps {args.num_train_timesteps}")
    if args.stf:
        check_reference_batch_size(args.stf_reference_batch_size, config.training.train_batch_size)
    return args


def scheduler_config(args) -> dict:
    return dict(num_train_timesteps=args.num_train_timesteps, beta_start=args.beta_start, beta_end=args.beta_end,
                beta_schedule=BETA_SCHEDULES[args.beta_schedule], clip_sample=args.clip_sample,
                prediction_type=args.prediction_type or "epsilon")


def checked_betas(args, config: dict):
    """β_1..β_T of the schedule, refused unless 0 < β_t < 1 for every t and ᾱ_T = Π(1 − β_t) > 0 (in float32, as the
    samplers compute it), naming the flags."""
    flags = "--beta_start/--beta_end" if args.beta_schedule != "cosine" else "--beta_schedule"
    try:
        betas = betas_for_schedule(config["num_train_timesteps"], config["beta_start"], config["beta_end"],
                                   config["beta_schedule"])
    except ValueError as err:
        raise ValueError(f"{flags} ({args.beta_start}, {args.beta_end}, {args.beta_schedule}): {err}") from err
    if not bool(((betas > 0) & (betas < 1)).all()):
        bad = int((~((betas > 0) & (betas < 1))).nonzero()[0])
        raise ValueError(f"{flags} give β_{bad + 1} = {float(betas[bad]):g}; every β of the schedule must lie in (0, 1) "
                         f"(--beta_start {args.beta_start}, --beta_end {args.beta_end}, --beta_schedule "
                         f"{args.beta_schedule})")
    alpha_bar_T = float(torch.cumprod(1 - betas.float(), 0)[-1])
    if not alpha_bar_T > 0:
        raise ValueError(f"{flags} give ᾱ_T = Π(1 − β_t) = 0 in float32 over T = {args.num_train_timesteps} steps: "
                         "the last steps carry no signal; lower --beta_end or --num_train_timesteps")
    return betas


def main(argv=None):
    args, config = parse_training_args(build_parser(), argv)
    check_args(args, config)
    schedule = scheduler_config(args)
    betas = checked_betas(args, schedule)
    check_sampling_steps(DDIMScheduler(**schedule), config.training.num_inference_steps)
    training = config.training
    accelerator = make_accelerator(training)
    data = load_training_images(config.data, training.seed, accelerator)
    conditioning = class_conditioning(args, data, config.explicit)  # None: unconditional
    unet = make_network(config.network, config.unet, data.resolution, data.channels,
                        **(conditioning.unet_kwargs() if conditioning is not None else {}))
    # diffusers' DDPMPipeline passes no class labels, and plain diffusers loads other networks through our code
    edm_folder = conditioning is not None or config.network.architecture != "unet2d"
    loss = SequenceAwareLoss(betas, num_steps=args.sa_k, sa_lambda=args.sa_lambda, weighting=args.sa_weighting,
                             window=args.sa_window, noise=args.sa_noise, reduction=args.loss_reduction,
                             timesteps=args.sa_timesteps, prediction_type=schedule["prediction_type"])
    name = f"SA-{args.sa_k} (λ={args.sa_lambda:g}, {args.sa_weighting})" if args.sa_lambda > 0 else "DDPM L_simple"
    accelerator.print(f"{len(data)} training images {data.channels}x{data.resolution}x{data.resolution} ({data.name}); "
                      f"{network_summary(unet, config.network)} ({schedule['prediction_type']}); "
                      f"loss {name}"
                      + (f" + STF (R={args.stf_reference_batch_size})" if args.stf else "")
                      + (f"; class-conditional on {conditioning.num_classes} classes, label dropout "
                         f"{conditioning.label_dropout:g}" if conditioning else ""))

    def loss_fn(model, batch, generator):
        images = batch["images"]
        labels = conditioning.labels(batch, generator) if conditioning is not None else None
        refs, conditional_refs = None, {}
        if args.stf:
            extra = data.random_batch(args.stf_reference_batch_size - images.shape[0], batch["data_generator"],
                                      exclude=batch["index"].cpu())
            refs = torch.cat([images, extra["images"].to(images.device)])
            if conditioning is not None:  # the targets average the references of each row's class
                conditional_refs = dict(reference_labels=torch.cat([batch["labels"], extra["labels"].to(images.device)]),
                                        null_label=conditioning.null_label)
        return loss(model, images, class_labels=labels, generator=generator, reference_images=refs, **conditional_refs)

    def make_pipeline(model):
        if edm_folder:
            return EDMPipeline(unet=model, scheduler=DDPMScheduler(**schedule),
                               **(conditioning.pipeline_kwargs() if conditioning is not None else {}))
        return DDPMPipeline(unet=model, scheduler=DDPMScheduler(**schedule))

    def grid_pipeline(model):
        """The validation grids' sampler (DDIM; its η is a call argument), which --eval_every_steps measures."""
        if conditioning is not None:  # the guided pipeline's loop takes class labels and DDIM's η
            return DiscriminatorGuidedPipeline(model, DDIMScheduler(**schedule), **conditioning.pipeline_kwargs())
        return DDIMPipeline(unet=model, scheduler=DDIMScheduler(**schedule))

    def validation_fn(model, step, path):
        if conditioning is not None:
            pipeline = grid_pipeline(model).to(accelerator.device)
            return sample_grid(pipeline, path, training.num_validation_images, training.num_inference_steps,
                               training.validation_seed, sampler_caption(step, pipeline, training.num_inference_steps),
                               eta=args.validation_eta)
        pipeline = grid_pipeline(model).to(accelerator.device)
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(training.validation_seed)
        images = pipeline(batch_size=training.num_validation_images, generator=generator, eta=args.validation_eta,
                          num_inference_steps=training.num_inference_steps, output_type="np").images
        return save_image_grid(torch.from_numpy(images).permute(0, 3, 1, 2), path)

    sa_text = SA_TEXT.format(k=args.sa_k, lam=f"{args.sa_lambda:g}", weighting=args.sa_weighting) \
        if args.sa_lambda > 0 else ""
    architecture = config.network.architecture
    card = ModelCardInfo(
        title=f"{name.split(' (')[0]} DDPM {NETWORK_TEXT[architecture].split('`')[1]} on {data.name}",
        description=DESCRIPTION.format(parametrisation=PARAMETRISATIONS[schedule["prediction_type"]],
                                       network=NETWORK_TEXT[architecture],
                                       T=args.num_train_timesteps, schedule=args.beta_schedule, sa=sa_text,
                                       stf=STF_TEXT.format(r=args.stf_reference_batch_size) if args.stf else ""),
        tags=["ddpm"] + (["sequence-aware", "sa-dpm"] if args.sa_lambda > 0 else [])
        + (["stable-target-field"] if args.stf else []) + ([architecture] if architecture != "unet2d" else []),
        template="sequence_aware_ddpm.md",
        usage=USAGE,
        extra={"script": "examples/train_sequence_aware.py",
               "grid_caption": f"EMA weights, DDIM with {training.num_inference_steps} steps, "
                               f"η={args.validation_eta:g}."},
    )
    if edm_folder:
        why = "diffusers' `DDPMPipeline` passes no class labels" if conditioning is not None else \
            "plain diffusers loads it with `trust_remote_code=True`"
        card = dataclasses.replace(card, template=DEFAULT_TEMPLATE, usage=EDM_USAGE, description=card.description.replace(
            "It is a plain diffusers `DDPMPipeline`.", EDM_FOLDER_TEXT.format(why=why)))
    if conditioning is not None:
        card = conditioning.card(card, conditioning.usage(num_inference_steps=50, scheduler="DDIMScheduler"),
                                 card.extra["grid_caption"].rstrip("."))
    fingerprint = {"loss": "sequence_aware", **schedule, "sa_k": args.sa_k, "sa_lambda": args.sa_lambda,
                   "sa_weighting": args.sa_weighting, "sa_window": args.sa_window, "sa_noise": args.sa_noise,
                   "sa_timesteps": args.sa_timesteps, "loss_reduction": args.loss_reduction,
                   "stf_reference_batch_size": args.stf_reference_batch_size if args.stf else None,
                   **(conditioning.fingerprint() if conditioning else {}), **config.network.fingerprint()}
    fingerprint.pop("clip_sample")  # a sampling setting: changing it on resume is fine
    if fingerprint["prediction_type"] == "epsilon":
        fingerprint.pop("prediction_type")  # runs from before the flag existed still resume
    trainer = Trainer(training, unet, loss_fn, data, accelerator=accelerator, make_pipeline=make_pipeline,
                      model_card=card, fingerprint=fingerprint, validation_fn=validation_fn,
                      evaluation_sampler=EvaluationSampler(grid_pipeline, training.num_inference_steps,
                                                           {"eta": args.validation_eta}))
    return trainer.train()


if __name__ == "__main__":
    main(sys.argv[1:])
