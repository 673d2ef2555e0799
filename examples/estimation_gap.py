"""Accumulated estimation gap of DDPM models along a sampling chain (Nguyen et al. 2024, Figure 4).

For a batch of real images x_0, every model runs the same DDPM (η = 1) or DDIM (η = 0) chain from the same
x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, next to the ground-truth chain that uses the true noise of x_0; the gap is
‖x̂_s − x_s‖ at every state. A model trained with the sequence-aware loss should keep it lower.

    python examples/estimation_gap.py --model baseline=outputs/ddpm-digits --model sa2=outputs/sa2-digits \\
        --start_timestep 299 --output outputs/estimation_gap.png
    python examples/estimation_gap.py --model sa2=outputs/sa2-digits --num_inference_steps 50 --eta 0

``--model NAME=FOLDER`` takes a folder holding a diffusers DDPMPipeline/DDIMPipeline (unet + scheduler). The images
come from ``--images`` (``digits:heldout``, ``digits:train``, ``digits:all``, a folder of images or an ``.npz``).
``--start_timestep`` is diffusers' 0-based index (paper time t = index + 1). From x_T (the default) the final gap is
dominated by how little x_T says about x_0 (any model's sample differs from that x_0 by about the data's spread), so
an intermediate start such as 299 is more telling. Writes the PNG plot and, next to it, a JSON file with the gap per
state.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from diffusers import DiffusionPipeline

from diffusers_stf.evaluation.estimation_gap import estimation_gap, plot_estimation_gaps


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER",
                        help="a saved DDPM pipeline folder; repeat to compare models")
    parser.add_argument("--images", default="digits:heldout", help="x_0: digits:heldout|train|all, a folder or an .npz")
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--start_timestep", type=int, default=None,
                        help="0-based index of the starting x_t (default: the top of the grid)")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="grid size (default: all T steps)")
    parser.add_argument("--eta", type=float, default=1.0, help="1: DDPM ancestral steps; 0: deterministic DDIM")
    parser.add_argument("--no_clip_sample", action="store_true", help="disable the scheduler's x_0 clipping")
    parser.add_argument("--seed", type=int, default=0, help="seed of x_t's noise and the sampling noise (shared)")
    parser.add_argument("--output", default="estimation_gap.png")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    models = {}
    for spec in args.model:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            parser.error(f"--model must look like NAME=FOLDER, got {spec!r}")
        models[name] = folder
    args.models = models
    if args.num_images < 1:
        parser.error("--num_images must be >= 1")
    if not 0 <= args.eta <= 1:
        parser.error("--eta must lie in [0, 1]")
    return args


def load_images(spec: str, num_images: int) -> torch.Tensor:
    from diffusers_stf.evaluation import reference_images

    images = reference_images(spec)
    if len(images) < num_images:
        raise ValueError(f"--images {spec!r} holds {len(images)} images, fewer than --num_images {num_images}")
    return images[:num_images]


def main(argv=None):
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    x0 = load_images(args.images, args.num_images).to(device)
    results, table = {}, {}
    for name, folder in args.models.items():
        pipe = DiffusionPipeline.from_pretrained(folder).to(device)
        generator = torch.Generator().manual_seed(args.seed)  # the same x_t and z for every model
        out = estimation_gap(pipe.unet, pipe.scheduler, x0, start_timestep=args.start_timestep,
                             num_inference_steps=args.num_inference_steps, eta=args.eta, generator=generator,
                             clip_sample=False if args.no_clip_sample else None)
        results[name] = out
        table[name] = {"timesteps": out.timesteps.tolist(), "gap_norm": out.gap_norm.tolist(),
                       "gap_rms": out.gap_rms.tolist()}
        print(f"{name}: final gap ‖x̂_0 − x_0‖ = {float(out.gap_norm[-1]):.4f} (mean over {len(x0)} images), "
              f"max along the chain {float(out.gap_norm.max()):.4f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    plot_estimation_gaps(results, args.output, title=f"Estimation gap, η={args.eta:g}, {len(x0)} images")
    with open(os.path.splitext(args.output)[0] + ".json", "w") as f:
        json.dump({"settings": {k: v for k, v in vars(args).items() if k != "model"}, "gaps": table}, f, indent=1)
    print(f"plot: {args.output}")
    return results


if __name__ == "__main__":
    main()
