#!/usr/bin/env python
"""Train the noise-conditional classifier of classifier guidance (Dhariwal & Nichol, NeurIPS 2021), to guide a score
model alone or together with Discriminator Guidance (Kim et al., ICML 2023, eq. 6).

    accelerate launch examples/train_classifier.py                                   # the embedded 8x8 digits
    accelerate launch examples/train_classifier.py --pretrained_model_name_or_path outputs/train_stf
    accelerate launch examples/train_classifier.py --train_data_dir my_images/ --resolution 32   # one subfolder per class

The labels are the digits' classes, or the class subfolders of an ``--train_data_dir`` image folder (or the label
column of a ``--dataset_name``, ``--label_column``). Each training image is diffused to a noise level σ drawn log-uniformly, the same law
as the discriminator's (DG's importance-sampled VP time), and the classifier learns its class by cross-entropy on the
EDM-scale sample x = y + σ·n at σ. The network is the discriminator's noise-conditional encoder with one output per
class (:class:`~diffusers_stf.NoiseConditionalClassifier`).

Writes to --output_dir: checkpoints, logs/metrics.{jsonl,csv} (loss and accuracy per σ bucket),
logs/validation.jsonl (held-out accuracy per σ), and at the end either a ``DiscriminatorGuidedPipeline`` folder (the
score model of ``--pretrained_model_name_or_path``, its discriminator if it has one, and the classifier), with grids
of unguided vs. classifier-guided samples, or, without a score model, the classifier alone; with a model card.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

from diffusers_stf import DiscriminatorGuidedPipeline, NoiseConditionalClassifier
from diffusers_stf.losses import NoisyCrossEntropyLoss
from diffusers_stf.losses.discriminator import DG_TRAIN_SIGMA_MAX, DG_TRAIN_SIGMA_MIN
from diffusers_stf.evaluation import save_side_by_side
from diffusers_stf.training import EncoderConfig, ImageData, ModelCardInfo, Trainer, add_encoder_args
from diffusers_stf.training import add_training_args, encoder_config, float_list, load_score_pipeline
from diffusers_stf.training import load_training_images, make_accelerator, parse_training_args, require_labels
from diffusers_stf.training import training_parser
from diffusers_stf.training.in_training_eval import EvaluationSampler
from diffusers_stf.training.validation import check_sampling_steps

DESCRIPTION = (
    "A noise-conditional classifier p(y | x, σ) for **classifier guidance** (Dhariwal & Nichol, NeurIPS 2021, "
    "[arXiv:2105.05233](https://arxiv.org/abs/2105.05233)), trained on {data} ({num_classes} classes) diffused to "
    "noise level σ. Its gradient σ²·∇ log p(y | x, σ) corrects the denoiser towards class y, alone or combined with "
    "Discriminator Guidance (Kim et al., ICML 2023, eq. 6), under this package's EDM schedulers and diffusers' DDPM, "
    "DDIM, Euler and EDM-Euler schedulers."
)
USAGE = """import torch
from diffusers_stf import DiscriminatorGuidedPipeline

pipeline = DiscriminatorGuidedPipeline.from_pretrained("{repo}")
labels = torch.arange(16) % pipeline.classifier.config.num_classes
images = pipeline(batch_size=16, generator=torch.Generator().manual_seed(0), class_labels=labels,
                  classifier_guidance_scale=1.0).images
images[0].save("sample.png")"""
USAGE_CLASSIFIER_ONLY = """import torch
from diffusers_stf import DiscriminatorGuidedPipeline, NoiseConditionalClassifier

classifier = NoiseConditionalClassifier.from_pretrained("{repo}")
pipeline = DiscriminatorGuidedPipeline.from_pretrained("<your score pipeline>", classifier=classifier)
images = pipeline(batch_size=16, class_labels=torch.arange(16) % classifier.config.num_classes,
                  classifier_guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images"""


def build_parser() -> argparse.ArgumentParser:
    parser = training_parser(__doc__)
    g = parser.add_argument_group("classifier")
    g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                   help="score pipeline folder or Hub id to save the classifier with (optional)")
    g.add_argument("--sigma_min", type=float, default=DG_TRAIN_SIGMA_MIN,
                   help="log-uniform sigma range, the discriminator's (DG: VP time 1e-5..1)")
    g.add_argument("--sigma_max", type=float, default=DG_TRAIN_SIGMA_MAX)
    add_encoder_args(g, "clf", "vp: x/sqrt(1+sigma^2) at 999*tau (guided_diffusion's classifier); edm: "
                               "x/sqrt(sigma^2+sigma_data^2) at ln(sigma)/4")
    g.add_argument("--num_heldout_images", type=int, default=128,
                   help="images kept out of training for the per-sigma validation accuracy")
    g.add_argument("--validation_sigmas", type=float_list, default=(0.05, 0.2, 0.5, 1.0, 2.0, 5.0),
                   help="noise levels of the held-out accuracy")
    g.add_argument("--classifier_guidance_scale", type=float, default=1.0, help="w_CG of the validation grids")
    add_training_args(parser, unet=False, default_num_epochs=100)
    parser.set_defaults(output_dir=os.path.join("outputs", "train_classifier"), learning_rate=3e-4,
                        adam_weight_decay=0.0, lr_rampup_kimg=0.0, ema_halflife_kimg=0.0, max_grad_norm=0.0,
                        checkpointing_steps=500, validation_steps=500, num_validation_images=64, logging_steps=50,
                        sigma_buckets=(0.05, 0.2, 1.0, 5.0))
    return parser


def check_args(args):
    if not 0 < args.sigma_min < args.sigma_max:
        raise ValueError(f"need 0 < --sigma_min < --sigma_max, got {args.sigma_min}, {args.sigma_max}")
    if args.num_heldout_images < 0:
        raise ValueError(f"--num_heldout_images must be >= 0, got {args.num_heldout_images}")
    if args.classifier_guidance_scale < 0:
        raise ValueError(f"--classifier_guidance_scale must be >= 0, got {args.classifier_guidance_scale}")
    if not args.validation_sigmas or not all(sigma > 0 for sigma in args.validation_sigmas):
        raise ValueError(f"--validation_sigmas must all be > 0, got {args.validation_sigmas}")
    if args.eval_every_steps and args.pretrained_model_name_or_path is None:
        raise ValueError("--eval_every_steps measures the guidance metric, FD/KID of the score model guided by the "
                         "classifier: it needs --pretrained_model_name_or_path")
    return encoder_config(args, "clf")


def build_classifier(encoder: EncoderConfig, data: ImageData, num_classes: int,
                     sigma_data: float) -> NoiseConditionalClassifier:
    return NoiseConditionalClassifier(sample_size=data.resolution, in_channels=data.channels, num_classes=num_classes,
                                      sigma_data=sigma_data, **encoder.model_kwargs())


@torch.no_grad()
def heldout_accuracy(classifier, data: ImageData, sigmas, device, seed: int = 0) -> dict:
    """Accuracy and mean cross-entropy of held-out images at fixed noise levels and noise."""
    g = torch.Generator().manual_seed(seed)
    batch = data.batch(torch.arange(len(data)))
    images, labels = batch["images"], batch["labels"].to(device)
    row = {}
    for sigma in sigmas:
        x = (images + sigma * torch.randn(images.shape, generator=g)).to(device)
        logits = classifier(x, sigma).logits.float()
        row[f"accuracy_sigma_{sigma:g}"] = float((logits.argmax(1) == labels).double().mean())
        row[f"cross_entropy_sigma_{sigma:g}"] = float(F.cross_entropy(logits, labels))
    return row


def guided_pipeline(score, classifier) -> DiscriminatorGuidedPipeline:
    """The score model guided by ``classifier``: the grids' sampler, which ``--eval_every_steps`` measures."""
    return DiscriminatorGuidedPipeline(score.unet, score.scheduler, classifier=classifier)


def guided_grid(score, classifier, args, training, num_classes: int, path: str, device) -> str:
    """Unguided (left) and classifier-guided (right) samples from the same latents; row r is guided to class r mod K."""
    pipe = guided_pipeline(score, classifier).to(device)
    pipe.set_progress_bar_config(disable=True)
    n = training.num_validation_images
    nrow = max(1, math.ceil(math.sqrt(n)))
    labels = (torch.arange(n) // nrow) % num_classes
    kwargs = dict(batch_size=n, num_inference_steps=training.num_inference_steps, output_type="pt", class_labels=labels)
    seed = training.validation_seed
    plain = pipe(generator=torch.Generator(device=device).manual_seed(seed), **kwargs).images
    guided = pipe(generator=torch.Generator(device=device).manual_seed(seed),
                  classifier_guidance_scale=args.classifier_guidance_scale, **kwargs).images
    return save_side_by_side(plain, guided, path, nrow=nrow)


def main(argv=None):
    args, config = parse_training_args(build_parser(), argv)
    encoder = check_args(args)
    training = config.training
    accelerator = make_accelerator(training)
    data = load_training_images(config.data, training.seed, accelerator)
    num_classes = require_labels(data, "train_classifier.py")
    if num_classes < 2:
        raise ValueError(f"the classifier needs at least 2 classes, the data have {num_classes}")

    score = None
    if args.pretrained_model_name_or_path:
        score = load_score_pipeline(args.pretrained_model_name_or_path, data, accelerator.device)
        check_sampling_steps(score.scheduler, training.num_inference_steps)  # of the guided grids
    train, heldout = data.split_heldout(min(args.num_heldout_images, len(data) // 2), training.seed)
    sigma_data = float(score.scheduler.config.get("sigma_data", 0.5)) if score is not None else 0.5
    classifier = build_classifier(encoder, data, num_classes, sigma_data)
    accelerator.print(f"{len(train)} training images ({data.channels}x{data.resolution}x{data.resolution}, {data.name}, "
                      f"{num_classes} classes); held out {len(heldout) if heldout else 0}; classifier with "
                      f"{classifier.num_parameters() / 1e6:.3f}M parameters")

    loss = NoisyCrossEntropyLoss(args.sigma_min, args.sigma_max)

    def loss_fn(model, batch, generator):
        return loss(model, batch["images"], batch["labels"], generator)

    validation_log = os.path.join(accelerator.logging_dir, "validation.jsonl")  # the run's own logging folder

    def validation_fn(ema_classifier, step, path):
        device = accelerator.device
        if heldout is not None:
            row = {"step": step, **heldout_accuracy(ema_classifier, heldout, args.validation_sigmas, device)}
            os.makedirs(os.path.dirname(validation_log), exist_ok=True)
            with open(validation_log, "a") as f:
                f.write(json.dumps(row) + "\n")
            accs = ", ".join(f"σ={s:g}: {row[f'accuracy_sigma_{s:g}']:.3f}" for s in args.validation_sigmas)
            accelerator.print(f"step {step}: held-out accuracy {accs}")
        if score is None:
            return None
        return guided_grid(score, ema_classifier, args, training, num_classes, path, device)

    def make_pipeline(ema_classifier):
        return DiscriminatorGuidedPipeline(score.unet, score.scheduler, score.discriminator, ema_classifier)

    def heldout_metrics(ema_classifier):  # beside the guided FD/KID of each evaluation
        if heldout is None:
            return {}
        accuracy = heldout_accuracy(ema_classifier, heldout, args.validation_sigmas, accelerator.device)
        return {f"heldout_{k}": v for k, v in accuracy.items()}

    # image i is guided to class (seed of image i) mod K, with the grids' weight
    evaluation_sampler = None if score is None else EvaluationSampler(
        lambda ema_classifier: guided_pipeline(score, ema_classifier), training.num_inference_steps,
        {"classifier_guidance_scale": args.classifier_guidance_scale}, extra_metrics=heldout_metrics,
        class_cycle=num_classes)

    card = ModelCardInfo(
        title=f"Noise-conditional classifier for guidance on {data.name}",
        description=DESCRIPTION.format(data=data.name, num_classes=num_classes),
        tags=["classifier-guidance", "discriminator-guidance"], template="classifier.md",
        usage=USAGE if score is not None else USAGE_CLASSIFIER_ONLY,
        sample_kwargs={"class_labels": [i % num_classes for i in range(16)], "classifier_guidance_scale": 1.0},
        facts={"score model": args.pretrained_model_name_or_path, "classes": num_classes,
               "sigma range (log-uniform)": f"{args.sigma_min:.4g} .. {args.sigma_max:.4g}",
               "guidance weight of the grid (w_CG)": args.classifier_guidance_scale},
        extra={"script": "examples/train_classifier.py"},
    )
    fingerprint = {"sigma_min": args.sigma_min, "sigma_max": args.sigma_max, "num_classes": num_classes,
                   "num_heldout_images": args.num_heldout_images, "clf_preconditioning": args.clf_preconditioning}
    trainer = Trainer(training, classifier, loss_fn, train, accelerator=accelerator,
                      make_pipeline=make_pipeline if score is not None else None, validation_fn=validation_fn,
                      model_card=card, fingerprint=fingerprint, evaluation_sampler=evaluation_sampler)
    return trainer.train()


if __name__ == "__main__":
    main(sys.argv[1:])
