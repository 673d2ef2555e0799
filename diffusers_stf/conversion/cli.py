"""``python -m diffusers_stf.convert``: published checkpoints → pipeline folders with model cards. Nothing is pushed.

    # an NVlabs EDM snapshot → an EDMPipeline folder
    python -m diffusers_stf.convert edm edm-cifar10-32x32-uncond-vp.pkl converted/edm-cifar10-uncond-vp
    # an NVlabs EDM2 snapshot (a latent one with its VAE, here with its autoguidance preset's guide)
    python -m diffusers_stf.convert edm2 edm2-img512-s-2147483-0.070.pkl converted/edm2-img512-s-autog-fid \\
        --vae sd-vae-ft-mse --guide edm2-img512-xs-0134217-0.125.pkl --guidance 2.1
    # DG's discriminator on that score model → a DiscriminatorGuidedPipeline folder
    python -m diffusers_stf.convert dg --classifier 32x32_classifier.pt --discriminator discriminator_60.pt \\
        --score_model converted/edm-cifar10-uncond-vp converted/dg-cifar10-uncond

Each folder loads with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` (plain diffusers) or the
package's pipeline class, and its README.md names the source files (with their SHA-256), their licence and the exact
command that wrote it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import List, Optional, Sequence

from ..files import file_sha256
from ..pipelines.pipeline_discriminator_guided import DiscriminatorGuidedPipeline
from ..pipelines.pipeline_edm import EDMPipeline
from .dg import load_dg_discriminator
from .nvlabs_edm import guide_from_snapshot, pipeline_from_snapshot, snapshot_kind, with_guide
from .unpickler import read_nvlabs_pickle

EDM_LICENSE = ("NVlabs' EDM checkpoints are published under the Creative Commons Attribution-NonCommercial-ShareAlike "
               "4.0 International licence (CC BY-NC-SA 4.0, https://creativecommons.org/licenses/by-nc-sa/4.0/). "
               "This folder holds the same weights in another layout, a derivative under the same licence: "
               "non-commercial use only, with attribution to NVIDIA (Karras et al. 2022), shared alike. A snapshot "
               "you trained yourself with NVlabs' code is yours; its code was CC BY-NC-SA 4.0.")
DG_LICENSE = ("The discriminator comes from Discriminator Guidance's published files (alsdudrla10/DG, Kim et al. "
              "2023). The DG repository states no licence (it has no LICENSE file and its README names none), so no "
              "licence to the discriminator weights is granted here: they remain their authors'; ask them before you "
              "redistribute this folder. DG's code builds on NVlabs' EDM (CC BY-NC-SA 4.0) and openai/"
              "guided-diffusion (MIT); the score network in this folder is NVlabs' EDM network, CC BY-NC-SA 4.0.")
EDM2_LICENSE = ("NVlabs' EDM2 checkpoints are published under the Creative Commons Attribution-NonCommercial-"
                "ShareAlike 4.0 International licence (CC BY-NC-SA 4.0, https://creativecommons.org/licenses/by-nc-sa/"
                "4.0/). This folder holds the same weights in another layout, a derivative under the same licence: "
                "non-commercial use only, with attribution to NVIDIA (Karras et al. 2024), shared alike. A snapshot "
                "you trained yourself with NVlabs' code is yours; its code was CC BY-NC-SA 4.0.")
EDM2_CITATION = ("Karras, Aittala, Lehtinen, Hellsten, Aila, Laine. Analyzing and Improving the Training Dynamics of "
                 "Diffusion Models. CVPR 2024. https://github.com/NVlabs/edm2")
AUTOGUIDANCE_CITATION = ("Karras, Aittala, Kynkäänniemi, Lehtinen, Aila, Laine. Guiding a Diffusion Model with a Bad "
                         "Version of Itself. NeurIPS 2024.")
EDM_CITATION = ("Karras, Aittala, Aila, Laine. Elucidating the Design Space of Diffusion-Based Generative Models. "
                "NeurIPS 2022. https://github.com/NVlabs/edm")
DG_CITATION = ("Kim, Kim, Kwon, Kang, Moon. Refining Generative Process with Discriminator Guidance in Score-based "
               "Diffusion Models. ICML 2023. https://github.com/alsdudrla10/DG")


def _check_output_dir(path: str):
    """Nothing is overwritten: the output folder must be new or empty."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise SystemExit(f"error: {path} exists and is not an empty folder; choose a new output folder")


def write_card(folder: str, title: str, yaml_lines: List[str], body: str):
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write("---\n" + "\n".join(yaml_lines) + "\n---\n\n# " + title + "\n\n" + body.strip() + "\n")


def _usage(call: str) -> str:
    return ("With diffusers alone (the folder carries the code of its classes, generated from diffusers_stf; "
            "`trust_remote_code=True` runs it):\n\n```python\nfrom diffusers import DiffusionPipeline\n\n"
            "pipeline = DiffusionPipeline.from_pretrained(\"path/to/this/folder\", trust_remote_code=True)\n"
            f"images = pipeline({call}).images\n```\n")


def read_snapshot(path: str, command: str):
    """The plain data of an NVlabs snapshot of the kind ``command`` converts (``edm``/``edm2``), and its name."""
    name = os.path.basename(path)
    data = read_nvlabs_pickle(path)
    kind = snapshot_kind(data, name)
    if kind != command:
        raise ValueError(f"{name} is an NVlabs {kind.upper()} snapshot: convert it with `convert {kind}`")
    return data, name


def convert_edm(args, command: str) -> EDMPipeline:
    data, name = read_snapshot(args.pickle, "edm")
    pipeline = pipeline_from_snapshot(data, name)
    pipeline.save_pretrained(args.output_dir)
    scheduler = pipeline.scheduler.config
    body = f"""
The network of NVlabs' EDM snapshot `{name}` ({EDM_CITATION}), converted to diffusers_stf's
`{type(pipeline.unet).__name__}` and `EDMHeunScheduler` (preconditioning `{scheduler.preconditioning}`, σ ∈
[{scheduler.sigma_min:.6g}, {scheduler.sigma_max:.6g}]). The default call (18 Heun steps, 35 network evaluations)
samples as NVlabs' `generate.py` (`edm_sampler`).

## Source

| file | SHA-256 |
|---|---|
| `{name}` | `{file_sha256(args.pickle)}` |

Converted with diffusers_stf's restricted unpickler, which executes nothing from the pickle:

```
{command}
```

## Licence

{EDM_LICENSE}

## Usage

{_usage("batch_size=16, num_inference_steps=18")}"""
    write_card(args.output_dir, f"EDM: {name}", ["license: cc-by-nc-sa-4.0", "library_name: diffusers",
                                                   "pipeline_tag: unconditional-image-generation",
                                                   "tags:", "- diffusers", "- diffusers_stf", "- edm"], body)
    return pipeline


def convert_edm2(args, command: str) -> EDMPipeline:
    if (args.guide is None) != (args.guidance is None):
        raise ValueError("--guide and --guidance go together: the guide network of a preset and its guidance weight")
    vae = None
    if args.vae is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae)
    data, name = read_snapshot(args.pickle, "edm2")
    pipeline = pipeline_from_snapshot(data, name, vae=vae)
    sources = [args.pickle]
    if args.guide is not None:
        guide_name = os.path.basename(args.guide)
        guide = guide_from_snapshot(read_snapshot(args.guide, "edm2")[0], guide_name, name, vae)
        pipeline = with_guide(pipeline, guide, name, guide_name)
        sources.append(args.guide)
    pipeline.save_pretrained(args.output_dir)
    config, unet = pipeline.scheduler.config, pipeline.unet.config
    encoder = data.get("encoder")
    vae_name = encoder.attributes.get("vae_name") if vae is not None else None
    rows = "\n".join(f"| `{os.path.basename(p)}` | `{file_sha256(p)}` |" for p in sources)
    call = "batch_size=16, num_inference_steps=32"
    if unet.num_class_embeds:
        call += ", class_labels=[0, 1, 2, 3] * 4"
    if args.guide is not None:
        call += f", autoguidance_scale={args.guidance:g}"
    latent = "" if vae is None else f"""
**Latent model.** The network samples latents of {unet.in_channels}×{unet.sample_size}×{unet.sample_size}. The `vae`
(loaded from `{args.vae}`; EDM2's encoder names `{vae_name}`, whose weights the snapshot does not hold) decodes them as
EDM2's `StabilityVAEEncoder` does: pixels = clamp(vae.decode((latents − latent_bias) / latent_scale), 0, 1), with
`latent_scale` and `latent_bias` from the snapshot (in `model_index.json`). `output_type="latent"` returns the
latents. The VAE keeps its own licence (see its model card).
"""
    guide = "" if args.guide is None else f"""
**Guidance.** The guide network `{os.path.basename(args.guide)}` ({"class-conditional" if
        pipeline.guide_unet.config.num_class_embeds else "unconditional"}) is the pipeline's `guide_unet`. The
preset's weight is `--guidance {args.guidance:g}`: pass `autoguidance_scale={args.guidance:g}`, which samples with
D = D_guide + w·(D − D_guide), EDM2's `gnet(x).lerp(net(x), w)` (autoguidance: {AUTOGUIDANCE_CITATION}).
"""
    body = f"""
The network of NVlabs' EDM2 snapshot `{name}`, converted to diffusers_stf's `EDM2UNet` and `EDMHeunScheduler`
(preconditioning `{config.preconditioning}`, σ_data = {config.sigma_data:g}, σ from {config.sigma_max:g} to
{config.sigma_min:g}, ρ = {config.rho:g}). EDM2: {EDM2_CITATION}

**Pass `num_inference_steps=32`**: then the pipeline samples as EDM2's `generate_images.py` (`edm_sampler`, 32 Heun
steps, 63 network evaluations); the pipeline's default, 18 steps, is EDM's. The snapshot stores the weights in float16;
they are held exactly in float32 here (EDM2 runs the network in float16 on CUDA: `pipeline.to("cuda",
torch.float16)`). The snapshot's log-variance head, used only by the training loss, is not converted.
{latent}{guide}
## Source

| file | SHA-256 |
|---|---|
{rows}

Converted with diffusers_stf's restricted unpickler, which executes nothing from the pickle:

```
{command}
```

## Licence

{EDM2_LICENSE}

## Usage

{_usage(call)}"""
    write_card(args.output_dir, f"EDM2: {name}", ["license: cc-by-nc-sa-4.0", "library_name: diffusers",
                                                    "pipeline_tag: unconditional-image-generation",
                                                    "tags:", "- diffusers", "- diffusers_stf", "- edm2"], body)
    return pipeline


def convert_dg(args, command: str) -> DiscriminatorGuidedPipeline:
    score = EDMPipeline.from_pretrained(args.score_model)
    discriminator = load_dg_discriminator(args.classifier, args.discriminator, img_resolution=args.img_resolution,
                                          conditional=args.conditional)
    pipeline = DiscriminatorGuidedPipeline(unet=score.unet, scheduler=score.scheduler, discriminator=discriminator)
    pipeline.save_pretrained(args.output_dir)
    rows = "\n".join(f"| `{os.path.basename(p)}` | `{file_sha256(p)}` |" for p in (args.classifier, args.discriminator))
    weight = 1.0 if args.conditional else 2.0
    body = f"""
Discriminator Guidance ({DG_CITATION}) with its published discriminator: the frozen ADM classifier `{os.path.basename(
        args.classifier)}` as feature extractor and the head `{os.path.basename(args.discriminator)}`
({"class-conditional" if args.conditional else "unconditional"}), converted to diffusers_stf's `DGDiscriminator`, on the
score model converted in `{args.score_model}` (see its model card for the EDM source and licence).

## Source

| file | SHA-256 |
|---|---|
{rows}

Converted from the state dicts (read with `torch.load(..., weights_only=True)`) with:

```
{command}
```

## Licence

{DG_LICENSE}

{EDM_LICENSE}

## Usage

DG's CIFAR-10 setting guides the first-order evaluation of each Heun step with weight {weight:g}
(`dg_weight_1st_order`){" and uses boosting (`boosting=True`)" if args.conditional else ""}.

{_usage(f"batch_size=16, num_inference_steps=18, dg_weight_1st_order={weight:g}"
        + (", boosting=True" if args.conditional else ""))}"""
    write_card(args.output_dir, f"Discriminator Guidance: {os.path.basename(args.discriminator)}",
               ["license: other", "license_name: cc-by-nc-sa-4.0-edm-and-unlicensed-dg",
                "license_link: https://github.com/alsdudrla10/DG", "library_name: diffusers",
                "pipeline_tag: unconditional-image-generation",
                "tags:", "- diffusers", "- diffusers_stf", "- edm", "- discriminator-guidance"], body)
    return pipeline


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m diffusers_stf.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    edm = commands.add_parser("edm", help="an NVlabs EDM snapshot (.pkl) → an EDMPipeline folder")
    edm.add_argument("pickle", help="edm-*.pkl or network-snapshot-*.pkl")
    edm.add_argument("output_dir", help="a new folder")
    edm2 = commands.add_parser("edm2", help="an NVlabs EDM2 snapshot (.pkl) → an EDMPipeline folder")
    edm2.add_argument("pickle", help="edm2-img64-*.pkl, edm2-img512-*.pkl or a network-snapshot-*.pkl of EDM2")
    edm2.add_argument("output_dir", help="a new folder")
    edm2.add_argument("--vae", default=None,
                      help="for a latent model (edm2-img512-*): a folder (or Hub id) of the AutoencoderKL its encoder "
                           "names, stabilityai/sd-vae-ft-mse")
    edm2.add_argument("--guide", default=None, help="the guide snapshot of a preset (generate_images.py's gnet)")
    edm2.add_argument("--guidance", type=float, default=None, help="the preset's guidance weight (with --guide)")
    dg = commands.add_parser("dg", help="DG's discriminator + a converted EDM folder → a DiscriminatorGuidedPipeline")
    dg.add_argument("--classifier", required=True, help="DG's 32x32_classifier.pt")
    dg.add_argument("--discriminator", required=True,
                    help="DG's discriminator_60.pt (or discriminator_250.pt, with --conditional)")
    dg.add_argument("--score_model", required=True, help="a folder written by `convert edm`")
    dg.add_argument("--conditional", action="store_true", help="the discriminator is class-conditional")
    dg.add_argument("--img_resolution", type=int, default=32)
    dg.add_argument("output_dir", help="a new folder")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None):
    """Run the command line (``argv`` without the program name); returns the converted pipeline."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    _check_output_dir(args.output_dir)
    command = "python -m diffusers_stf.convert " + shlex.join(argv)
    convert = {"edm": convert_edm, "edm2": convert_edm2, "dg": convert_dg}[args.command]
    try:
        pipeline = convert(args, command)
    except ValueError as err:  # a refused input: the message says why; no traceback
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {args.output_dir}")
    return pipeline
