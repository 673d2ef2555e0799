#!/usr/bin/env python
"""Train a UNet2DModel with EDM's recipe and the Stable Target Field loss (Xu, Tong & Jaakkola, ICLR 2023).

    accelerate launch examples/train_stf.py                      # embedded 8x8 digits, ~5-10 min on 2 CPU cores
    accelerate launch examples/train_stf.py --loss edm           # the plain EDM loss (denoising score matching)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train_stf.py --cpu
    accelerate launch examples/train_stf.py --dataset_name cifar10 --resolution 32 --block_out_channels 128,256,256 \\
        --attention_levels 1 --stf_reference_batch_size 1024 --augment_p 0.12 --dropout 0.13

Writes to --output_dir: checkpoints, logs/metrics.{jsonl,csv} (loss per noise level), sample grids, and at the end
an ``EDMPipeline`` folder (unet + scheduler, safetensors) with a model card README.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from diffusers_stf import AugmentConditionedUNet2DModel, AugmentPipe, EDMHeunScheduler, EDMPipeline
from diffusers_stf.augment import AUGMENT_DIM
from diffusers_stf.losses import EDMLoss, StableTargetFieldLoss
from diffusers_stf.training import (
    LossOutput,
    ModelCardInfo,
    Trainer,
    add_training_args,
    count_parameters,
    load_training_images,
    make_accelerator,
    make_unet,
    parse_training_args,
)

logger = logging.getLogger("train_stf")

DESCRIPTION = (
    "An unconditional `UNet2DModel` trained with EDM's preconditioning, noise distribution and loss weighting "
    "(Karras et al., NeurIPS 2022){stf}. Samples come from EDM's deterministic Heun sampler through "
    "`diffusers_stf.EDMPipeline`."
)
STF_TEXT = (
    ", with the **Stable Target Field** objective (Xu, Tong & Jaakkola, ICLR 2023, "
    "[arXiv:2302.00670](https://arxiv.org/abs/2302.00670)): the regression target of each noisy image is the "
    "importance-weighted average of a reference batch of {r} images, which lowers the variance of the training "
    "targets at intermediate noise levels"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = parser.add_argument_group("loss (EDM / Stable Target Field)")
    g.add_argument("--loss", type=str, default="stf", choices=("stf", "edm"),
                   help="stf: stable targets over a reference batch; edm: EDM's denoising loss")
    g.add_argument("--stf_reference_batch_size", type=int, default=1024,
                   help="R: references per process, the minibatch included (the paper's CIFAR-10 setting: 1024)")
    g.add_argument("--stf_gather_references", action="store_true",
                   help="use the references of all processes (R grows with the number of processes)")
    g.add_argument("--P_mean", type=float, default=-1.2, help="mean of ln(sigma) (EDM)")
    g.add_argument("--P_std", type=float, default=1.2, help="std of ln(sigma) (EDM)")
    g.add_argument("--sigma_data", type=float, default=0.5, help="sigma_data of the preconditioning (EDM)")
    g.add_argument("--augment_p", type=float, default=0.0,
                   help="EDM's non-leaky augmentation probability (CIFAR-10: 0.12); 0 disables it")
    g.add_argument("--augment_xflip", type=float, default=1e8,
                   help="x-flip multiplier of --augment_p (EDM: 1e8, i.e. half the images are mirrored)")
    add_training_args(parser)
    parser.set_defaults(output_dir=os.path.join("outputs", "train_stf"), max_train_steps=3500,
                        checkpointing_steps=500, validation_steps=500, logging_steps=50)
    return parser


def main(argv=None):
    args = parse_training_args(build_parser(), argv)
    if not 0 <= args.augment_p <= 1:
        raise ValueError(f"--augment_p must be in [0, 1], got {args.augment_p}")
    accelerator = make_accelerator(args)
    data = load_training_images(args, accelerator)

    edm_loss = EDMLoss(args.P_mean, args.P_std, args.sigma_data)
    stf = args.loss == "stf"
    loss = StableTargetFieldLoss(edm_loss, args.stf_reference_batch_size, accelerator, args.stf_gather_references) \
        if stf else edm_loss
    if stf:
        extra = loss.num_extra_references(args.train_batch_size)  # ValueError when R < B
        if extra > len(data) - args.train_batch_size:
            logger.warning("--stf_reference_batch_size %d exceeds the dataset (%d images): references repeat",
                           args.stf_reference_batch_size, len(data))
    augment = AugmentPipe(args.augment_p, xflip=args.augment_xflip) if args.augment_p > 0 else None
    unet = make_unet(args, data.resolution, data.channels,
                     **({"cls": AugmentConditionedUNet2DModel, "num_class_embeds": AUGMENT_DIM} if augment else {}))
    accelerator.print(f"{len(data)} training images {data.channels}x{data.resolution}x{data.resolution} ({data.name}); "
                      f"UNet2DModel with {count_parameters(unet) / 1e6:.2f}M parameters; loss {args.loss}"
                      + (f" with R={args.stf_reference_batch_size}" if stf else ""))

    def loss_fn(model, batch, generator):
        images, labels = batch["images"], None
        if augment is not None:
            images, labels = augment(images, generator)
        sigma = edm_loss.sample_sigma(images.shape[0], generator, images.device)
        denoiser = edm_loss.denoiser(model)
        if stf:
            refs = data.random_batch(loss.num_extra_references(images.shape[0]), generator,
                                     exclude=batch["index"].cpu())["images"].to(images.device)
            if augment is not None:  # independently augmented; their labels are not used (as in the paper's code)
                refs, _ = augment(refs, generator)
            per_element = loss(denoiser, images, refs, sigma=sigma, class_labels=labels, generator=generator)
        else:
            per_element = loss(denoiser, images, sigma=sigma, class_labels=labels, generator=generator)
        per_sample = per_element.mean(dim=tuple(range(1, per_element.ndim)))
        return LossOutput(loss=per_sample.mean(), per_sample=per_sample.detach(), sigma=sigma)

    def make_pipeline(model):
        return EDMPipeline(unet=model, scheduler=EDMHeunScheduler(sigma_data=args.sigma_data))

    card = ModelCardInfo(
        title=f"{'STF' if stf else 'EDM'} UNet2DModel on {data.name}",
        description=DESCRIPTION.format(stf=STF_TEXT.format(r=args.stf_reference_batch_size) if stf else ""),
        tags=["edm", "stable-target-field"] if stf else ["edm"],
        extra={"script": "examples/train_stf.py"},
    )
    fingerprint = {"loss": args.loss, "stf_reference_batch_size": args.stf_reference_batch_size if stf else None,
                   "stf_gather_references": bool(stf and args.stf_gather_references), "P_mean": args.P_mean,
                   "P_std": args.P_std, "sigma_data": args.sigma_data, "augment_p": args.augment_p,
                   "dataset": data.name, "num_images": len(data)}
    trainer = Trainer(args, unet, loss_fn, data, accelerator=accelerator, make_pipeline=make_pipeline,
                      model_card=card, fingerprint=fingerprint)
    result = trainer.train()
    if accelerator.is_main_process:
        print(f"\nTrained {result.step} steps ({result.nimg} images) in {result.wall_time / 60:.1f} min.")
        print(f"Samples (EMA weights): {os.path.abspath(result.samples_path)}" if result.samples_path else "")
        print(f"Model card:            {os.path.abspath(result.model_card_path)}" if result.model_card_path else "")
        print(f"Pipeline folder:       {os.path.abspath(result.output_dir)}  (EDMPipeline.from_pretrained)")
        print(f"Metrics:               {os.path.abspath(result.metrics_path)}")
        if result.pushed_to:
            print(f"Pushed to:             https://huggingface.co/{result.pushed_to}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
