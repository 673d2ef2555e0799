#!/usr/bin/env python
"""Train the discriminator of Discriminator Guidance (Kim et al., ICML 2023) for a pretrained EDM score model.

    accelerate launch examples/train_discriminator.py --pretrained_model_name_or_path outputs/train_stf
    accelerate launch examples/train_discriminator.py --pretrained_model_name_or_path outputs/train_stf --loss ukl
    accelerate launch examples/train_discriminator.py --pretrained_model_name_or_path outputs/train_stf \\
        --feature_extractor unet_encoder            # DG's recipe: a shallow head on a frozen pretrained encoder
    accelerate launch examples/train_discriminator.py --fake_data_dir my_samples/ --dataset_name cifar10 --resolution 32

Fake images: generated once by the score pipeline's *unguided* sampler (``--generation_steps``, the sampler you will
guide), quantised to 8-bit PNGs in ``--fake_data_dir`` (default ``<output_dir>/fake_images``) and reused by reruns;
or read from a folder of images you made. Real images: the same data options as ``train_stf.py`` (the embedded 8x8
digits by default). Loss: DG's noise-embedded binary cross-entropy (``--loss bce``) or the LSIF / UKL Bregman
divergences of DG Appendix B, with σ log-uniform as DG's importance-sampled VP time.

Writes to --output_dir: checkpoints, logs/metrics.{jsonl,csv} (loss and accuracy per σ bucket),
logs/validation.jsonl (held-out accuracy per σ), grids of unguided vs. guided samples, and at the end a
``DiscriminatorGuidedPipeline`` folder (unet + scheduler + discriminator, safetensors) with a model card — or only the
discriminator when no score model was given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys

import numpy as np
import torch

from diffusers_stf import Discriminator, DiscriminatorGuidedPipeline
from diffusers_stf.losses import make_discriminator_loss
from diffusers_stf.losses.discriminator import DG_TRAIN_SIGMA_MAX, DG_TRAIN_SIGMA_MIN, DISCRIMINATOR_LOSSES
from diffusers_stf.losses.discriminator import REDUCTIONS as DISCRIMINATOR_REDUCTIONS
from diffusers_stf.evaluation import save_side_by_side
from diffusers_stf.training import DataConfig, EncoderConfig, ImageData, ModelCardInfo, Trainer
from diffusers_stf.training import add_encoder_args, add_training_args, encoder_config, float_list, load_score_pipeline
from diffusers_stf.training import load_training_images, make_accelerator, parse_training_args, training_parser
from diffusers_stf.training.in_training_eval import EvaluationSampler
from diffusers_stf.training.validation import check_sampling_steps

logger = logging.getLogger("train_discriminator")

GENERATION_FILE = "generation.json"


def fake_ignore_patterns(fake_dir: str, output_dir: str) -> tuple:
    """Hub-upload ignore patterns for the fake images when they lie inside ``output_dir``."""
    rel = os.path.relpath(os.path.abspath(fake_dir), os.path.abspath(output_dir))
    return () if rel.startswith("..") else (f"{rel}/**",)

DESCRIPTION = (
    "A noise-conditional discriminator d(x, σ) for **Discriminator Guidance** (Kim et al., ICML 2023, "
    "[arXiv:2211.17091](https://arxiv.org/abs/2211.17091)), trained to tell real {data} images from images generated "
    "by {score}, both diffused to the same noise level. Its log-ratio gradient ∇ log(d/(1 − d)) estimates "
    "∇ log(p_data/p_model) and corrects the score during sampling (DG eq. 9). Loss: {loss}. Discriminator: {arch}."
)
USAGE = """import torch
from diffusers_stf import DiscriminatorGuidedPipeline

pipeline = DiscriminatorGuidedPipeline.from_pretrained("{repo}")
generator = torch.Generator().manual_seed(0)
images = pipeline(batch_size=16, num_inference_steps=18, generator=generator, dg_weight_1st_order=2.0).images
images[0].save("sample.png")"""
USAGE_DISC_ONLY = """import torch
from diffusers_stf import Discriminator, DiscriminatorGuidedPipeline

discriminator = Discriminator.from_pretrained("{repo}")
pipeline = DiscriminatorGuidedPipeline.from_pretrained("<your EDM pipeline>", discriminator=discriminator)
images = pipeline(batch_size=16, num_inference_steps=18, generator=torch.Generator().manual_seed(0)).images"""


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser(__doc__)
    g = parser.add_argument_group("fake images")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="EDM pipeline folder or Hub id: generates the fake images and is the score model of the saved "
                        "DiscriminatorGuidedPipeline")
    g.add_argument("--fake_data_dir", type=str, default=None,
                   help="folder of fake images: read when it holds images, written by the generation otherwise "
                        "(default: <output_dir>/fake_images)")
    g.add_argument("--num_fake_images", type=int, default=None, help="images to generate (default: as many as real ones)")
    g.add_argument("--generation_batch_size", type=int, default=250)
    g.add_argument("--generation_steps", type=int, default=18,
                   help="EDM sampler steps of the fake images; use the sampler you will guide (DG: 18)")
    g.add_argument("--generation_seed", type=int, default=0)

    g = parser.add_argument_group("discriminator")
    g.add_argument("--loss", type=str, default="bce", choices=sorted(DISCRIMINATOR_LOSSES),
                   help="bce: DG's cross-entropy; lsif / ukl: the Bregman divergences of DG Appendix B")
    g.add_argument("--loss_reduction", type=str, default="mean", choices=DISCRIMINATOR_REDUCTIONS,
                   help="mean: over the mixed real+fake batch (DG); balanced: mean over real + mean over fake")
    g.add_argument("--sigma_min", type=float, default=DG_TRAIN_SIGMA_MIN, help="log-uniform sigma range (DG: VP time 1e-5..1)")
    g.add_argument("--sigma_max", type=float, default=DG_TRAIN_SIGMA_MAX)
    g.add_argument("--feature_extractor", type=str, default="none", choices=("none", "unet_encoder", "transformers"),
                   help="none: a small noise-conditional U-Net encoder; unet_encoder: a head on the frozen encoder of "
                        "the score UNet; transformers: a head on a frozen transformers vision model (--backbone)")
    g.add_argument("--backbone", type=str, default=None, help="local folder of a transformers vision model")
    g.add_argument("--backbone_resolution", type=int, default=None, help="resize images to this side for the backbone")
    add_encoder_args(g, "disc", "vp: DG's inputs (x/sqrt(1+sigma^2) at 999*tau); edm: x/sqrt(sigma^2+sigma_data^2) "
                                "at ln(sigma)/4")
    g.add_argument("--class_conditional", action="store_true", help="condition on the class labels (DG's conditional model)")
    g.add_argument("--num_heldout_images", type=int, default=128,
                   help="real and fake images kept out of training for the per-sigma validation accuracy")
    g.add_argument("--validation_sigmas", type=float_list, default=(0.05, 0.2, 0.5, 1.0, 2.0, 5.0),
                   help="noise levels of the held-out accuracy")
    g.add_argument("--dg_weight_1st_order", type=float, default=2.0, help="w1 of the validation grids (DG: 2)")
    g.add_argument("--dg_weight_2nd_order", type=float, default=0.0, help="w2 of the validation grids (DG: 0)")
    add_training_args(parser, unet=False, default_num_epochs=77)
    parser.set_defaults(output_dir=os.path.join("outputs", "train_discriminator"),
                        learning_rate=3e-4, adam_weight_decay=1e-7, lr_rampup_kimg=0.0, ema_halflife_kimg=0.0,
                        max_grad_norm=0.0, checkpointing_steps=500, validation_steps=500, num_validation_images=64,
                        logging_steps=50, sigma_buckets=(0.05, 0.2, 1.0, 5.0))
    return parser


def check_args(args):
    if args.pretrained_model_name_or_path is None and args.fake_data_dir is None:
        raise ValueError("give --pretrained_model_name_or_path (to generate fake images) or --fake_data_dir (to read them)")
    if not 0 < args.sigma_min < args.sigma_max:
        raise ValueError(f"need 0 < --sigma_min < --sigma_max, got {args.sigma_min}, {args.sigma_max}")
    values = vars(args)
    for name in ("num_fake_images", "generation_batch_size", "generation_steps"):
        if values[name] is not None and values[name] < 1:
            raise ValueError(f"--{name} must be >= 1, got {values[name]}")
    if args.num_heldout_images < 0:
        raise ValueError(f"--num_heldout_images must be >= 0, got {args.num_heldout_images}")
    if args.dg_weight_1st_order < 0 or args.dg_weight_2nd_order < 0:
        raise ValueError("--dg_weight_1st_order and --dg_weight_2nd_order must be >= 0")
    if not args.validation_sigmas or not all(sigma > 0 for sigma in args.validation_sigmas):
        raise ValueError(f"--validation_sigmas must all be > 0, got {args.validation_sigmas}")
    if args.eval_every_steps and args.pretrained_model_name_or_path is None:
        raise ValueError("--eval_every_steps measures the guidance metric, FD/KID of the score model guided by the "
                         "discriminator: it needs --pretrained_model_name_or_path")
    if args.feature_extractor == "unet_encoder" and args.pretrained_model_name_or_path is None:
        raise ValueError("--feature_extractor unet_encoder needs --pretrained_model_name_or_path (the score UNet)")
    if args.feature_extractor == "transformers" and not args.backbone:
        raise ValueError("--feature_extractor transformers needs --backbone (a local transformers model folder)")
    return encoder_config(args, "disc")


# ---------------------------------------------------------------------------------------------------------------
# Fake images: generated once by the unguided sampler, saved as PNGs, reused


def generation_record(args, num_images: int, class_conditional: bool) -> dict:
    return {"pretrained_model_name_or_path": args.pretrained_model_name_or_path, "num_images": num_images,
            "num_inference_steps": args.generation_steps, "seed": args.generation_seed,
            "class_conditional": class_conditional}


def has_images(folder: str) -> bool:
    return os.path.isdir(folder) and any(f.lower().endswith(".png") for _, _, files in os.walk(folder) for f in files)


@torch.no_grad()
def generate_fake_images(pipeline, folder: str, record: dict, batch_size: int, num_classes: int = 0):
    """Sample ``record["num_images"]`` images with the *unguided* sampler and save them as 8-bit PNGs (one
    ``<label>/`` subfolder per class when class-conditional, so the imagefolder loader reads the labels back).

    Written to ``<folder>.partial`` and renamed at the end, so an interrupted run is never mistaken for a finished one.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    partial = folder.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    pipeline.set_progress_bar_config(disable=True)
    n = record["num_images"]
    with tqdm(total=n, desc="generating fake images", unit="img") as progress:
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            generator = torch.Generator(device=pipeline.device).manual_seed(record["seed"] * 1_000_003 + start)
            labels = torch.randint(num_classes, (b,), generator=generator, device=pipeline.device) if num_classes else None
            images = pipeline(batch_size=b, num_inference_steps=record["num_inference_steps"], generator=generator,
                              class_labels=labels, dg_weight_1st_order=0.0, dg_weight_2nd_order=0.0,
                              output_type="np").images
            pixels = np.round(np.asarray(images) * 255).clip(0, 255).astype(np.uint8)
            for i, pixel in enumerate(pixels):
                sub = os.path.join(partial, str(int(labels[i]))) if labels is not None else partial
                os.makedirs(sub, exist_ok=True)
                Image.fromarray(pixel[..., 0] if pixel.shape[-1] == 1 else pixel).save(os.path.join(sub, f"{start + i:07d}.png"))
            progress.update(b)
    with open(os.path.join(partial, GENERATION_FILE), "w") as f:
        json.dump(record, f, indent=2)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)


def ensure_fake_images(args, pipeline, folder: str, record: dict, num_classes: int):
    """Reuse ``folder`` when it was generated with the same settings; generate it when it holds no images."""
    path = os.path.join(folder, GENERATION_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved == record:
            logger.info("reusing the %d fake images in %s", record["num_images"], folder)
            return
        raise ValueError(f"{folder} holds fake images generated with other settings ({saved}, now {record}); "
                         "delete it or choose another --fake_data_dir")
    if has_images(folder):
        raise ValueError(f"{folder} holds images that this script did not generate; pass it as --fake_data_dir "
                         "without --pretrained_model_name_or_path to train on them, or choose another folder")
    generate_fake_images(pipeline, folder, record, args.generation_batch_size, num_classes)


def load_fake_images(data_config: DataConfig, seed: int, folder: str, real: ImageData, accelerator) -> ImageData:
    """The fake images in ``folder``, read with the real data's options at the real data's size and channels."""
    fake_config = dataclasses.replace(data_config, dataset_name=None, dataset_config_name=None, train_data_dir=folder,
                                      max_train_samples=None, image_column=None, dataset_split="train",
                                      resolution=real.resolution, channels=real.channels)
    if not has_images(folder):
        raise ValueError(f"--fake_data_dir {folder!r} holds no PNG images")
    return load_training_images(fake_config, seed, accelerator)




# ---------------------------------------------------------------------------------------------------------------
# Model, validation


def build_discriminator(args, encoder: EncoderConfig, real: ImageData, score, num_classes: int) -> Discriminator:
    sigma_data = float(score.scheduler.config.get("sigma_data", 0.5)) if score is not None else 0.5
    head = dict(num_class_embeds=num_classes or None, sigma_data=sigma_data, **encoder.model_kwargs())
    if args.feature_extractor == "unet_encoder":
        return Discriminator.from_unet_encoder(score.unet, score.scheduler, **head)
    if args.feature_extractor == "transformers":
        return Discriminator.from_transformers_backbone(args.backbone, real.resolution, real.channels,
                                                        args.backbone_resolution, **head)
    return Discriminator(sample_size=real.resolution, in_channels=real.channels, **head)


@torch.no_grad()
def heldout_accuracy(disc, real: ImageData, fake: ImageData, sigmas, device, seed: int = 0) -> dict:
    """Accuracy (d > ½ on real, < ½ on fake) and mean BCE of held-out images at fixed noise levels and noise."""
    g = torch.Generator().manual_seed(seed)
    row = {}
    batches = {1: real.batch(torch.arange(len(real))), 0: fake.batch(torch.arange(len(fake)))}
    for sigma in sigmas:
        correct, bce, count = 0.0, 0.0, 0
        for target, batch in batches.items():
            y = batch["images"]
            x = (y + sigma * torch.randn(y.shape, generator=g)).to(device)
            labels = batch.get("labels")
            logits = disc(x, sigma, labels.to(device) if labels is not None and disc.config.num_class_embeds else None).logits.float().cpu()
            sign = 1.0 if target else -1.0
            correct += float(((sign * logits) > 0).sum())
            bce += float(torch.nn.functional.softplus(-sign * logits).sum())
            count += len(logits)
        row[f"accuracy_sigma_{sigma:g}"] = correct / count
        row[f"bce_sigma_{sigma:g}"] = bce / count
    return row


def guided_pipeline(score, disc) -> DiscriminatorGuidedPipeline:
    """The score model guided by ``disc``: the grids' sampler, which ``--eval_every_steps`` measures."""
    return DiscriminatorGuidedPipeline(score.unet, score.scheduler, disc)


def guided_grid(score, disc, args, training, path: str, device) -> str:
    """Unguided (left) and guided (right) samples from the same latents, as one PNG."""
    pipe = guided_pipeline(score, disc).to(device)
    pipe.set_progress_bar_config(disable=True)
    n = training.num_validation_images
    kwargs = dict(batch_size=n, num_inference_steps=training.num_inference_steps, output_type="pt")
    seed = training.validation_seed
    plain = pipe(generator=torch.Generator(device=device).manual_seed(seed), dg_weight_1st_order=0.0, **kwargs).images
    guided = pipe(generator=torch.Generator(device=device).manual_seed(seed),
                  dg_weight_1st_order=args.dg_weight_1st_order, dg_weight_2nd_order=args.dg_weight_2nd_order, **kwargs).images
    return save_side_by_side(plain, guided, path, nrow=max(1, math.ceil(math.sqrt(n))))


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args, config = parse_training_args(build_parser(), argv)
    encoder = check_args(args)
    training = config.training
    fake_dir = args.fake_data_dir or os.path.join(training.output_dir, "fake_images")
    accelerator = make_accelerator(training)
    real = load_training_images(config.data, training.seed, accelerator)

    score = None
    if args.pretrained_model_name_or_path:
        score = load_score_pipeline(args.pretrained_model_name_or_path, real, accelerator.device)
        check_sampling_steps(score.scheduler, args.generation_steps, "--generation_steps")  # of the fake images
        check_sampling_steps(score.scheduler, training.num_inference_steps)  # of the guided grids
    num_classes = 0
    if args.class_conditional:
        if real.labels is None:
            raise ValueError("--class_conditional needs a dataset with a label column")
        num_classes = int(real.labels.max()) + 1
    unet_classes = int(score.unet.config.num_class_embeds or 0) if score is not None else 0

    if score is not None:
        record = generation_record(args, args.num_fake_images or len(real), bool(num_classes and unet_classes))
        with accelerator.main_process_first():
            if accelerator.is_main_process:
                ensure_fake_images(args, score, fake_dir, record, unet_classes if num_classes else 0)
    fake = load_fake_images(config.data, training.seed, fake_dir, real, accelerator)
    if num_classes and fake.labels is None:
        raise ValueError("--class_conditional needs labelled fake images (one subfolder per class in --fake_data_dir)")
    real_train, real_heldout = real.split_heldout(min(args.num_heldout_images, len(real) // 2), training.seed)
    fake_train, fake_heldout = fake.split_heldout(min(args.num_heldout_images, len(fake) // 2), training.seed + 1)

    disc = build_discriminator(args, encoder, real, score, num_classes)
    trainable = [p for p in disc.parameters() if p.requires_grad]
    accelerator.print(f"{len(real_train)} real / {len(fake_train)} fake training images "
                      f"({real.channels}x{real.resolution}x{real.resolution}, {real.name}); held out "
                      f"{len(real_heldout) if real_heldout else 0} + {len(fake_heldout) if fake_heldout else 0}; "
                      f"discriminator with {disc.num_parameters() / 1e6:.3f}M parameters "
                      f"({disc.num_parameters(only_trainable=True) / 1e6:.3f}M trained); loss {args.loss}")
    loss = make_discriminator_loss(args.loss, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                                   reduction=args.loss_reduction)

    def loss_fn(model, batch, generator):
        real_images = batch["images"]
        fakes = fake_train.random_batch(len(real_images), batch["data_generator"])
        device = real_images.device
        real_labels = batch.get("labels") if num_classes else None
        fake_labels = fakes["labels"].to(device) if num_classes else None
        return loss(model, real_images, fakes["images"].to(device), real_labels, fake_labels, generator=generator)

    validation_log = os.path.join(accelerator.logging_dir, "validation.jsonl")  # the run's own logging folder

    def validation_fn(ema_disc, step, path):
        device = accelerator.device
        if real_heldout is not None and fake_heldout is not None:
            row = {"step": step, **heldout_accuracy(ema_disc, real_heldout, fake_heldout, args.validation_sigmas, device)}
            os.makedirs(os.path.dirname(validation_log), exist_ok=True)
            with open(validation_log, "a") as f:
                f.write(json.dumps(row) + "\n")
            accs = ", ".join(f"σ={s:g}: {row[f'accuracy_sigma_{s:g}']:.3f}" for s in args.validation_sigmas)
            accelerator.print(f"step {step}: held-out accuracy {accs}")
        return guided_grid(score, ema_disc, args, training, path, device) if score is not None else None

    def make_pipeline(ema_disc):
        return guided_pipeline(score, ema_disc)

    def heldout_metrics(ema_disc):  # beside the guided FD/KID of each evaluation
        if real_heldout is None or fake_heldout is None:
            return {}
        accuracy = heldout_accuracy(ema_disc, real_heldout, fake_heldout, args.validation_sigmas, accelerator.device)
        return {f"heldout_{k}": v for k, v in accuracy.items()}

    evaluation_sampler = None if score is None else EvaluationSampler(
        make_pipeline, training.num_inference_steps,
        {"dg_weight_1st_order": args.dg_weight_1st_order, "dg_weight_2nd_order": args.dg_weight_2nd_order},
        extra_metrics=heldout_metrics)

    arch = {"none": "a noise-conditional U-Net encoder", "unet_encoder": "a head on the frozen encoder of the score UNet",
            "transformers": f"a head on the frozen transformers model {args.backbone}"}[args.feature_extractor]
    card = ModelCardInfo(
        title=f"Discriminator Guidance for {args.pretrained_model_name_or_path or 'an EDM model'} on {real.name}",
        description=DESCRIPTION.format(data=real.name, score=f"`{args.pretrained_model_name_or_path}`" if score else "the score model",
                                       loss={"bce": "binary cross-entropy (DG eq. 7)", "lsif": "LSIF (DG Appendix B)",
                                             "ukl": "unnormalised KL (DG Appendix B)"}[args.loss], arch=arch),
        tags=["edm", "discriminator-guidance"], template="discriminator.md",
        usage=USAGE if score is not None else USAGE_DISC_ONLY,
        sample_kwargs={"num_inference_steps": 18, "dg_weight_1st_order": 2.0} if score is not None else None,
        facts={"score model": args.pretrained_model_name_or_path, "fake images": len(fake), "loss": args.loss,
               "guidance weights of the grid (w1, w2)": f"{args.dg_weight_1st_order}, {args.dg_weight_2nd_order}"},
        extra={"script": "examples/train_discriminator.py"},
    )
    fingerprint = {"loss": args.loss, "loss_reduction": args.loss_reduction, "sigma_min": args.sigma_min,
                   "sigma_max": args.sigma_max, "fake_data_dir": os.path.abspath(fake_dir), "num_fake_images": len(fake),
                   "num_heldout_images": args.num_heldout_images, "class_conditional": bool(num_classes),
                   "feature_extractor": args.feature_extractor, "disc_preconditioning": args.disc_preconditioning}
    optimizer = torch.optim.Adam(trainable, lr=training.learning_rate, betas=(training.adam_beta1, training.adam_beta2),
                                 eps=training.adam_epsilon, weight_decay=training.adam_weight_decay)  # DG: Adam, wd 1e-7
    trainer = Trainer(training, disc, loss_fn, real_train, accelerator=accelerator,
                      make_pipeline=make_pipeline if score is not None else None, optimizer=optimizer,
                      model_card=card, fingerprint=fingerprint, validation_fn=validation_fn,
                      hub_ignore_patterns=fake_ignore_patterns(fake_dir, training.output_dir),
                      evaluation_sampler=evaluation_sampler)
    return trainer.train()


if __name__ == "__main__":
    main(sys.argv[1:])
