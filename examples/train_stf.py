#!/usr/bin/env python
"""Train a score network with EDM's recipe and the Stable Target Field loss (Xu, Tong & Jaakkola, ICLR 2023).

    accelerate launch examples/train_stf.py                      # embedded 8x8 digits, ~5-10 min on 2 CPU cores
    accelerate launch examples/train_stf.py --loss edm           # the plain EDM loss (denoising score matching)
    accelerate launch examples/train_stf.py --precond vp         # EDM's VP row of Table 1 (loss + preconditioning)
    accelerate launch examples/train_stf.py --architecture edm2 --loss edm2 --lr_scheduler inverse_sqrt \
        --ema_stds 0.05,0.10 --ema_snapshot_steps 100           # EDM2's network, loss, schedule and post-hoc EMA
    accelerate launch examples/train_stf.py --loss stf --stf_base_loss edm2   # STF's target in EDM2's loss
    accelerate launch examples/train_stf.py --class_conditional --label_dropout 0.1   # for classifier-free guidance
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train_stf.py --cpu
    accelerate launch examples/train_stf.py --dataset_name cifar10 --resolution 32 --block_out_channels 128,256,256 \\
        --attention_levels 1 --stf_reference_batch_size 1024 --augment_p 0.12 --dropout 0.13

The network is ``--architecture unet2d`` (diffusers' UNet2DModel, the default), ``ddpmpp``/``ncsnpp`` (EDM's
SongUNet), ``adm`` (EDM's DhariwalUNet) or ``edm2`` (EDM2's magnitude-preserving U-Net); docs/training.md has the
papers' presets. ``--loss edm2`` is EDM2's uncertainty-weighted loss, whose learned log-variance head u(σ) is trained
with the network and kept in the checkpoints. Writes to --output_dir (one run per folder; see docs/training.md):
checkpoints, logs/metrics.{jsonl,csv} (loss per noise level), sample grids, with ``--ema_stds`` the power-function EMA
snapshots (phema_snapshots/), and at the end an ``EDMPipeline`` folder (unet + scheduler, safetensors) with a model card
README.md. With ``--class_conditional`` the network takes the images' classes (``num_class_embeds`` = K + 1, labels
dropped to the null label K with probability ``--label_dropout``), and the pipeline records ``null_class_label`` = K
for ``guidance_scale``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

import torch

from diffusers_stf import AugmentPipe, EDMHeunScheduler, EDMPipeline
from diffusers_stf.losses import StableTargetFieldLoss, make_denoising_loss
from diffusers_stf.losses.draws import randn
from diffusers_stf.losses.edm2 import EDM2_SIGMA_PRESETS, EDM2Loss
from diffusers_stf.training import ModelCardInfo, Trainer, add_class_conditioning_args, add_training_args
from diffusers_stf.training import class_conditioning, load_training_images
from diffusers_stf.training import make_accelerator, parse_training_args, to_device, training_parser
from diffusers_stf.training.network import make_network, network_summary

logger = logging.getLogger("train_stf")


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser(__doc__)
    g = parser.add_argument_group("loss (EDM / Stable Target Field)")
    g.add_argument("--loss", type=str, default="stf", choices=("stf", "edm", "edm2"),
                   help="stf: stable targets over a reference batch; edm: EDM's denoising loss; edm2: EDM2's "
                        "uncertainty-weighted loss (a learned log-variance u(σ) per noise level)")
    g.add_argument("--stf_base_loss", type=str, default="edm", choices=("edm", "edm2"),
                   help="--loss stf: the loss whose target STF replaces, EDM's (with --precond) or EDM2's")
    g.add_argument("--precond", type=str, default="edm", choices=("edm", "vp", "ve"),
                   help="loss and preconditioning of one row of EDM Table 1 (EDM train.py --precond)")
    g.add_argument("--loss_reduction", type=str, default="sum", choices=("sum", "mean"),
                   help="per image: sum over C·H·W (EDM) or mean; the batch is averaged")
    g.add_argument("--stf_reference_batch_size", type=int, default=1024,
                   help="R: references, the minibatch included (the paper's CIFAR-10 setting: 1024); with several "
                        "processes and no --augment_p, one set of R for the global batch, shared by all processes "
                        "(R >= the global batch); with --augment_p, R per process")
    g.add_argument("--stf_gather_references", action="store_true",
                   help="use the references of all processes (R grows with the number of processes); without "
                        "--augment_p: one shared set of R x processes")
    g.add_argument("--P_mean", type=float, default=-1.2, help="mean of ln(sigma) (EDM; --precond edm)")
    g.add_argument("--P_std", type=float, default=1.2, help="std of ln(sigma) (EDM; --precond edm)")
    g.add_argument("--P_preset", type=str, default=None, choices=("edm", *(f"edm2_{k}" for k in EDM2_SIGMA_PRESETS)),
                   help="(P_mean, P_std) of EDM (-1.2, 1.2) or of EDM2: ImageNet-64 pixels edm2_img64 (-0.8, 1.6), "
                        "ImageNet-512 latents edm2_img512 (-0.4, 1.0)")
    g.add_argument("--sigma_data", type=float, default=0.5, help="sigma_data of the preconditioning (EDM)")
    g.add_argument("--augment_p", type=float, default=0.0,
                   help="EDM's non-leaky augmentation probability (CIFAR-10: 0.12); 0 disables it")
    g.add_argument("--augment_xflip", type=float, default=1e8,
                   help="x-flip multiplier of --augment_p (EDM: 1e8, i.e. half the images are mirrored)")
    add_class_conditioning_args(parser)
    add_training_args(parser, default_num_epochs=125)
    # --checkpointing_minutes 5: a killed demo loses at most five minutes, not the steps up to checkpoint-500
    parser.set_defaults(output_dir=os.path.join("outputs", "train_stf"), checkpointing_steps=500,
                        checkpointing_minutes=5.0, validation_steps=500, logging_steps=50, max_grad_norm=0.0)
    return parser


NETWORK_TEXT = {
    "unet2d": "`UNet2DModel`",
    "ddpmpp": "DDPM++ network (`SongUNet`: Song et al., ICLR 2021, as re-implemented in EDM)",
    "ncsnpp": "NCSN++ network (`SongUNet`: Song et al., ICLR 2021, as re-implemented in EDM)",
    "adm": "ADM network (`DhariwalUNet`: Dhariwal & Nichol, NeurIPS 2021, as re-implemented in EDM)",
    "edm2": "EDM2 magnitude-preserving network (`EDM2UNet`: Karras et al., CVPR 2024)",
}
EDM2_LOSS_TEXT = (
    ", with **EDM2's uncertainty-weighted loss** (Karras et al., CVPR 2024, Eq. 21): each noise level's loss is "
    "divided by e^u(σ) and u(σ) added, with u(σ) a small learned head trained with the network, so every noise level "
    "contributes about equally"
)


def model_card(precond: str, reference_batch_size, data_name: str, class_conditional: bool = False,
               architecture: str = "unet2d", edm2_loss: bool = False) -> ModelCardInfo:
    """What the model card says: the network, EDM's recipe (EDM2's loss with ``edm2_loss``), and STF with R references
    when ``reference_batch_size`` is given."""
    of_class = " (for a class-conditional target, the references of its class)" if class_conditional else ""
    stf_text = (
        ", with the **Stable Target Field** objective (Xu, Tong & Jaakkola, ICLR 2023, "
        "[arXiv:2302.00670](https://arxiv.org/abs/2302.00670)): the regression target of each noisy image is the "
        f"importance-weighted average of a reference batch of {reference_batch_size} images{of_class}, which lowers "
        "the variance of the training targets at intermediate noise levels"
    ) if reference_batch_size else ""
    recipe = {"edm": "EDM's preconditioning, noise distribution and loss weighting",
              "vp": "the VP row of EDM's Table 1 (its preconditioning, noise distribution and loss weighting)",
              "ve": "the VE row of EDM's Table 1 (its preconditioning, noise distribution and loss weighting)"}[precond]
    description = (
        f"An unconditional {NETWORK_TEXT[architecture]} trained with {recipe} (Karras et al., NeurIPS 2022)"
        f"{EDM2_LOSS_TEXT if edm2_loss else ''}{stf_text}. Samples come from EDM's deterministic Heun sampler through "
        "`diffusers_stf.EDMPipeline`."
    )
    stf = reference_batch_size is not None
    network = NETWORK_TEXT[architecture].split("`")[1]
    method = ("STF (EDM2 loss)" if stf else "EDM2") if edm2_loss else ("STF" if stf else "EDM")
    tags = ["edm"] + (["edm2"] if edm2_loss or architecture == "edm2" else []) + (["stable-target-field"] if stf else [])
    return ModelCardInfo(title=f"{method} {network} on {data_name}", description=description,
                         tags=tags + ([architecture] if architecture != "unet2d" else []),
                         extra={"script": "examples/train_stf.py"})


def denoising_loss(args, explicit):
    """The loss of EDM's recipe that the run trains with (STF's base loss with ``--loss stf``): ``make_denoising_loss``
    of ``--precond``, or EDM2's loss (EDM's preconditioning, which is EDM2's) with ``--loss edm2``/``--stf_base_loss
    edm2``; ``--P_preset`` sets (P_mean, P_std)."""
    if "stf_base_loss" in explicit and args.loss != "stf":
        raise ValueError(f"--stf_base_loss chooses the loss under STF's target: it needs --loss stf (got --loss "
                         f"{args.loss}; --loss edm2 alone is EDM2's loss without STF)")
    if args.P_preset is not None:
        given = [f"--{name}" for name in ("P_mean", "P_std") if name in explicit]
        if given:
            raise ValueError(f"--P_preset {args.P_preset} sets P_mean and P_std: drop {' and '.join(given)}")
        args.P_mean, args.P_std = (-1.2, 1.2) if args.P_preset == "edm" else EDM2_SIGMA_PRESETS[args.P_preset[5:]]
    name = args.stf_base_loss if args.loss == "stf" else args.loss
    if name == "edm2":
        if args.precond != "edm":
            flag = "--stf_base_loss edm2" if args.loss == "stf" else "--loss edm2"
            raise ValueError(f"{flag} is EDM2's loss, with EDM's preconditioning (EDM2's Precond): --precond must be "
                             f"edm, got {args.precond}")
        return EDM2Loss(args.P_mean, args.P_std, args.sigma_data, reduction=args.loss_reduction)
    return make_denoising_loss(args.precond, P_mean=args.P_mean, P_std=args.P_std, sigma_data=args.sigma_data,
                               reduction=args.loss_reduction)  # EDM: sum over C·H·W


def main(argv=None):
    args, config = parse_training_args(build_parser(), argv)
    if not 0 <= args.augment_p <= 1:
        raise ValueError(f"--augment_p must be in [0, 1], got {args.augment_p}")
    accelerator = make_accelerator(config.training)
    data = load_training_images(config.data, config.training.seed, accelerator)
    conditioning = class_conditioning(args, data, config.explicit)  # None: unconditional

    base_loss = denoising_loss(args, config.explicit)
    edm2 = isinstance(base_loss, EDM2Loss)
    stf = args.loss == "stf"
    batch_size = config.training.train_batch_size
    global_draws = not args.augment_p > 0
    reference_size, gather = args.stf_reference_batch_size, args.stf_gather_references
    if stf and global_draws and accelerator.num_processes > 1:  # one shared reference set for the global batch
        global_batch = batch_size * accelerator.num_processes
        if gather:  # the union of N sets of R: one shared set of N·R
            reference_size, gather = reference_size * accelerator.num_processes, False
        if reference_size < global_batch:
            raise ValueError(f"--stf_reference_batch_size {args.stf_reference_batch_size}: the shared reference set "
                             f"holds the global batch ({batch_size} x {accelerator.num_processes} processes = "
                             f"{global_batch}), so R must be >= {global_batch}")
        batch_size = global_batch
    loss = StableTargetFieldLoss(base_loss, reference_size, accelerator, gather) if stf else base_loss
    if stf:
        extra = loss.num_extra_references(batch_size)  # ValueError when R < B
        if extra > len(data) - batch_size:
            logger.warning("--stf_reference_batch_size %d exceeds the dataset (%d images): references repeat",
                           args.stf_reference_batch_size, len(data))
    augment = AugmentPipe(args.augment_p, xflip=args.augment_xflip) if args.augment_p > 0 else None
    unet = make_network(config.network, config.unet, data.resolution, data.channels,
                        augment_dim=augment.label_dim if augment else 0,
                        **(conditioning.unet_kwargs() if conditioning is not None else {}))
    accelerator.print(f"{len(data)} training images {data.channels}x{data.resolution}x{data.resolution} ({data.name}); "
                      f"{network_summary(unet, config.network)}; loss {args.loss} "
                      f"({'EDM2' if edm2 else args.precond})" + (f" with R={args.stf_reference_batch_size}" if stf else "")
                      + (f"; class-conditional on {conditioning.num_classes} classes, label dropout "
                         f"{conditioning.label_dropout:g}" if conditioning else ""))

    def loss_fn(model, batch, generator):
        images = batch["images"]
        share = batch["share"]  # σ and n for the whole global batch, this process's rows (one process: all of them)
        denoiser = base_loss.denoiser(model)
        if augment is not None:  # the network sees the augmentation labels through its own input, not as classes
            images, augment_labels = augment(images, generator)
            denoiser = functools.partial(denoiser, augment_labels=augment_labels)
        sigma = share.take(base_loss.sample_sigma(share.total, generator, images.device))
        if stf:
            # R − B extras for the global batch from the shared data generator, so that every process sees the same
            # reference set: the global batch (gathered) and the same extras
            extras = data.random_batch(loss.num_extra_references(share.total), batch["data_generator"],
                                       exclude=batch["global_index"].cpu())
            refs = to_device(extras["images"], images.device)
            ref_labels = extras.get("labels")
            if share.total > share.size:
                others = accelerator.gather(images.detach().contiguous())
                refs = torch.cat([others[:share.start], others[share.start + share.size:], refs])
                if conditioning is not None:  # the other processes' rows of the global batch, whose indices we hold
                    global_labels = data.labels[batch["global_index"].cpu()]
                    ref_labels = torch.cat([global_labels[:share.start], global_labels[share.start + share.size:],
                                            ref_labels])
            if augment is not None:  # independently augmented; their labels are not used (as in the paper's code)
                refs, _ = augment(refs, generator)
        noise = share.draw(randn, images.shape, generator, images.device, images.dtype)
        # the dropout is drawn last, so a class-conditional run sees the σ and noise of an unconditional one
        labels = conditioning.labels(batch, generator) if conditioning is not None else None
        if stf and conditioning is not None:  # the targets average the references of each row's class
            return loss(denoiser, images, refs, class_labels=labels, labels=batch["labels"],
                        extra_reference_labels=to_device(ref_labels, images.device),
                        null_label=conditioning.null_label, sigma=sigma, noise=noise, generator=generator)
        if stf:
            return loss(denoiser, images, refs, sigma=sigma, noise=noise, generator=generator)
        return loss(denoiser, images, class_labels=labels, sigma=sigma, noise=noise, generator=generator)

    null_label = conditioning.pipeline_kwargs() if conditioning is not None else {}

    def make_pipeline(model):
        return EDMPipeline(unet=model, scheduler=EDMHeunScheduler(sigma_data=args.sigma_data,
                                                                  preconditioning=args.precond), **null_label)

    card = model_card(args.precond, args.stf_reference_batch_size if stf else None, data.name, conditioning is not None,
                      config.network.architecture, edm2)
    if conditioning is not None:
        card = conditioning.card(card, conditioning.usage(),
                                 f"EMA weights, EDM Heun with {config.training.num_inference_steps} steps")
    fingerprint = {"loss": args.loss, "precond": args.precond, "loss_reduction": args.loss_reduction,
                   "stf_reference_batch_size": args.stf_reference_batch_size if stf else None,
                   "stf_gather_references": bool(stf and args.stf_gather_references), "P_mean": args.P_mean,
                   "P_std": args.P_std, "sigma_data": args.sigma_data, "augment_p": args.augment_p,
                   "augment_xflip": args.augment_xflip, **(conditioning.fingerprint() if conditioning else {}),
                   **({"stf_base_loss": "edm2"} if stf and edm2 else {}), **config.network.fingerprint()}
    # the augmentation draws per process, so only without it do N processes take the steps of one
    # EDM2's log-variance head u(σ) belongs to the loss: trained with the network, saved in the checkpoints
    trained = {"edm2_logvar": base_loss.logvar_head} if edm2 else None
    trainer = Trainer(config.training, unet, loss_fn, data, accelerator=accelerator, make_pipeline=make_pipeline,
                      model_card=card, fingerprint=fingerprint, global_draws=global_draws, trained_modules=trained)
    return trainer.train()


if __name__ == "__main__":
    main(sys.argv[1:])
