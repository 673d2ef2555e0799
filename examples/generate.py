"""Sample N images from a saved pipeline folder, for evaluation or inspection.

Image i is drawn with seed ``--seed + i`` (one generator per image, so the result does not depend on the batch size)
and written as ``<seed:06d>.png`` and/or into ``samples.npz`` (uint8, NHWC, arrays ``samples`` and ``seeds``).
A rerun with the same folder skips the images already written, so an interrupted run resumes and a larger
``--num_images`` only adds the missing ones. Every file is written under a temporary name that neither the resume nor
``evaluate.py`` reads (``.<name>.partial``) and then renamed, so a killed run never leaves a truncated image or
archive behind; an unreadable image found on resume (e.g. copied in truncated) is drawn again, with a warning.

    python examples/generate.py --pipeline outputs/edm-digits --output_dir outputs/samples/heun18 --num_images 1000
    python examples/generate.py --pipeline outputs/edm-digits --output_dir outputs/samples/churn40 \\
        --scheduler stochastic --s_churn 40 --s_tmin 0.05 --s_tmax 50 --s_noise 1.003 --format both
    # guided sampling, once the folder holds a DiscriminatorGuidedPipeline:
    python examples/generate.py --pipeline outputs/dg-digits --output_dir outputs/samples/dg \\
        --pipeline_kwargs '{"dg_weight_1st_order": 2.0}'
    # a class-conditional folder (train_stf.py --class_conditional): image i asks for class i mod K, CFG at w = 2
    python examples/generate.py --pipeline outputs/stf-digits-cond --output_dir outputs/samples/cfg2 --guidance_scale 2
    # autoguidance with a smaller, shorter-trained guide (docs/guidance.md), only for sigma in [0.05, 5]
    python examples/generate.py --pipeline outputs/stf-digits --output_dir outputs/samples/autog \\
        --guide_unet outputs/stf-digits-guide --autoguidance_scale 2 --guidance_interval 0.05,5

The pipeline class is the one named in the folder's ``model_index.json`` (looked up in ``diffusers_stf``, then
``diffusers``); ``--scheduler`` swaps its scheduler with ``from_config`` (``heun``, ``stochastic``, ``euler`` or a
scheduler class name), keeping the σ range, σ_data and the network's parametrisation: on a ``DDPMPipeline`` folder
(what ``train_sequence_aware.py`` writes) an EDM scheduler gets the ``ddpm`` preconditioning with the folder's β
schedule and prediction type, and the UNet is sampled by an ``EDMPipeline`` (``DDPMPipeline`` never scales the
model input). The scheduler config actually used is recorded in ``generate_config.json``, with a fingerprint of the
pipeline's files (names, sizes, first and last MiB of the weights): a folder holds the images of one model and one set
of settings, so a pipeline retrained in place, or other settings, are refused while the folder holds images (a folder
without images, e.g. after a first call that failed, takes the new settings).

A class-conditional pipeline (its UNet has ``num_class_embeds``) draws the image of seed s as class s mod K
(``--class_labels cycle``, the default; with ``--seed 0`` image i is class i mod K), or every image as one class
(``--class_labels 3``); ``--guidance_scale`` is classifier-free guidance. ``--guide_unet`` adds an autoguidance guide
(a training folder of a smaller or shorter-trained model of the same data), ``--autoguidance_scale`` its weight;
``--guidance_interval lo,hi`` limits both to σ in [lo, hi].
"""

from __future__ import annotations

import argparse
import json
import os
import zipfile
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusers_stf.evaluation.images import to_uint8
from diffusers_stf.evaluation.sampler_options import SamplerOptions, add_sampler_args, parse_json_options
from diffusers_stf.evaluation.sampling import (
    generate_batch, load_guide_unet, load_pipeline, pipeline_num_classes, pipeline_with_guide,
)
from diffusers_stf.evaluation.streaming import pipeline_folder_fingerprint

SETTINGS_FILE = "generate_config.json"
NPZ_FILE = "samples.npz"
NPZ_PARTS = "npz_parts"
PARTIAL_SUFFIX = ".partial"
LEGACY_PARTIAL_SUFFIX = ".tmp.npz"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--pipeline", required=True, help="folder saved with pipeline.save_pretrained")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    add_sampler_args(parser)
    parser.add_argument("--class_labels", default=None,
                        help="class-conditional pipelines: 'cycle' (default: the image of seed s is class s mod K) or "
                             "one class index for every image")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="classifier-free guidance weight w (1: plain conditional sampling)")
    parser.add_argument("--guide_unet", default=None,
                        help="autoguidance guide: a training folder (its unet/) or a saved UNet folder")
    parser.add_argument("--autoguidance_scale", type=float, default=None, help="autoguidance weight w (needs --guide_unet)")
    parser.add_argument("--guidance_interval", default=None,
                        help="lo,hi: classifier-free guidance and autoguidance only for sigma in [lo, hi]")
    parser.add_argument("--format", choices=("png", "npz", "both"), default="png")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    for name in ("num_images", "batch_size", "num_inference_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    parse_json_options(parser, args)
    if args.class_labels is not None and args.class_labels != "cycle":
        try:
            args.class_labels = int(args.class_labels)
        except ValueError:
            parser.error(f"--class_labels must be 'cycle' or a class index, got {args.class_labels!r}")
    if args.guidance_interval is not None:
        try:
            interval = [float(v) for v in args.guidance_interval.split(",")]
        except ValueError:
            interval = []
        if len(interval) != 2:
            parser.error(f"--guidance_interval must be two numbers lo,hi, got {args.guidance_interval!r}")
        args.guidance_interval = interval
    for name in ("guidance_scale", "autoguidance_scale", "guidance_interval"):
        if getattr(args, name) is not None:
            if name in args.pipeline_kwargs:
                parser.error(f"--{name} and --pipeline_kwargs both give {name}; give one of them")
            args.pipeline_kwargs[name] = getattr(args, name)
    if args.autoguidance_scale is not None and args.guide_unet is None:
        parser.error("--autoguidance_scale needs --guide_unet (the guide model's folder)")
    return args


def _png_path(output_dir: str, seed: int) -> str:
    return os.path.join(output_dir, f"{seed:06d}.png")


def _partial_path(path: str) -> str:
    """``dir/.name.partial``: hidden and without an image or archive extension, so nothing that lists finished
    outputs (this script's resume, ``evaluate.py``) ever reads a file still being written."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.{os.getpid()}{PARTIAL_SUFFIX}")


def _atomic_write(path: str, write) -> None:
    """``write(file)`` into a temporary file, then rename it to ``path`` (a kill leaves ``path`` absent or whole)."""
    tmp = _partial_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _remove_leftovers(folder: str) -> None:
    """Delete temporaries of killed runs (ours, and the ``*.tmp.npz`` of older versions of this script)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if (name.startswith(".") and name.endswith(PARTIAL_SUFFIX)) or name.endswith(LEGACY_PARTIAL_SUFFIX):
            os.remove(os.path.join(folder, name))


def _png_is_readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _read_npz_store(output_dir: str) -> Dict[int, np.ndarray]:
    """seed → image (H, W, C) from ``samples.npz`` and the per-batch parts of an unfinished run."""
    store = {}
    parts_dir = os.path.join(output_dir, NPZ_PARTS)
    paths = [os.path.join(output_dir, NPZ_FILE)]
    if os.path.isdir(parts_dir):
        paths += [os.path.join(parts_dir, f) for f in sorted(os.listdir(parts_dir)) if f.endswith(".npz")]
    for path in paths:
        if os.path.isfile(path):
            try:
                with np.load(path) as archive:
                    store.update(zip(archive["seeds"].tolist(), archive["samples"]))
            except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
                raise ValueError(f"cannot read the sample archive {path!r} ({type(err).__name__}: {err}); "
                                 "delete it and rerun to draw its images again") from err
    return store


def _write_npz(path: str, seeds: List[int], images: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.savez(f, samples=images, seeds=np.asarray(seeds, dtype=np.int64)))


def _write_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    _atomic_write(path, lambda f: picture.save(f, format="PNG"))


def _holds_images(output_dir: str) -> bool:
    """Whether the folder holds images this script wrote: ``<seed>.png`` files, ``samples.npz`` or batch parts."""
    parts = os.path.join(output_dir, NPZ_PARTS)
    return (any(name.endswith(".png") and name[:-4].isdigit() for name in os.listdir(output_dir))
            or os.path.isfile(os.path.join(output_dir, NPZ_FILE)) or (os.path.isdir(parts) and bool(os.listdir(parts))))


def _check_settings(output_dir: str, settings: dict) -> None:
    """Refuse to mix images made with other settings (or another model) into the folder; a folder without images
    takes the new settings."""
    path = os.path.join(output_dir, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        if previous == settings:
            return
        if _holds_images(output_dir):
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise ValueError(
                f"{output_dir!r} holds images generated with other settings (changed: {changed}); "
                "use a new --output_dir or empty this one"
            )
    _atomic_write(path, lambda f: f.write(json.dumps(settings, indent=2, sort_keys=True).encode()))


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.pipeline, device=device)
    pipe = SamplerOptions.from_args(args).apply(pipe)
    if args.guide_unet is not None:
        pipe = pipeline_with_guide(pipe, load_guide_unet(args.guide_unet).to(pipe.device))
    num_classes = pipeline_num_classes(pipe)
    if num_classes is None and args.class_labels is not None:
        raise ValueError(f"--class_labels {args.class_labels!r}: the pipeline's unet is not class-conditional")
    pipe.set_progress_bar_config(disable=True)

    os.makedirs(args.output_dir, exist_ok=True)
    parts_dir = os.path.join(args.output_dir, NPZ_PARTS)
    _remove_leftovers(args.output_dir)
    _remove_leftovers(parts_dir)
    settings = {
        "pipeline": os.path.abspath(args.pipeline),
        "pipeline_weights": pipeline_folder_fingerprint(args.pipeline),
        "pipeline_class": type(pipe).__name__,
        "scheduler_class": type(pipe.scheduler).__name__,
        "scheduler_config": json.loads(json.dumps(dict(pipe.scheduler.config), default=str)),
        "num_inference_steps": args.num_inference_steps,
        "pipeline_kwargs": args.pipeline_kwargs,
    }
    if num_classes is not None:  # the class of each image (an unconditional folder's settings stay as they were)
        settings.update(num_classes=num_classes, class_labels=args.class_labels or "cycle")
    if args.guide_unet is not None:
        settings["guide_unet"] = os.path.abspath(args.guide_unet)
    _check_settings(args.output_dir, settings)

    write_png, write_npz = args.format in ("png", "both"), args.format in ("npz", "both")
    seeds = range(args.seed, args.seed + args.num_images)
    in_npz = set(_read_npz_store(args.output_dir)) if write_npz else set()
    unreadable = [
        _png_path(args.output_dir, s) for s in seeds
        if write_png and os.path.isfile(_png_path(args.output_dir, s)) and not _png_is_readable(_png_path(args.output_dir, s))
    ]  # fmt: skip
    for path in unreadable:
        print(f"warning: {path} cannot be read as an image; drawing it again")
        os.remove(path)
    todo = [
        s for s in seeds
        if (write_png and not os.path.isfile(_png_path(args.output_dir, s))) or (write_npz and s not in in_npz)
    ]  # fmt: skip
    print(f"{args.num_images - len(todo)} of {args.num_images} images already in {args.output_dir}; generating {len(todo)}")

    for start in tqdm(range(0, len(todo), args.batch_size), desc="batches"):
        batch_seeds = todo[start : start + args.batch_size]
        images = to_uint8(generate_batch(pipe, batch_seeds, args.num_inference_steps, class_labels=args.class_labels,
                                         **args.pipeline_kwargs))
        if write_png:
            for seed, image in zip(batch_seeds, images):
                _write_png(_png_path(args.output_dir, seed), image)
        if write_npz:
            os.makedirs(parts_dir, exist_ok=True)
            _write_npz(os.path.join(parts_dir, f"{batch_seeds[0]:06d}.npz"), batch_seeds, images)

    if write_npz:
        store = _read_npz_store(args.output_dir)
        all_seeds = sorted(store)
        _write_npz(os.path.join(args.output_dir, NPZ_FILE), all_seeds, np.stack([store[s] for s in all_seeds]))
        if os.path.isdir(parts_dir):
            for f in os.listdir(parts_dir):
                os.remove(os.path.join(parts_dir, f))
            os.rmdir(parts_dir)
    print(f"done: {args.output_dir}")
    return {"generated": len(todo), "skipped": args.num_images - len(todo), "output_dir": args.output_dir}


if __name__ == "__main__":
    main()
