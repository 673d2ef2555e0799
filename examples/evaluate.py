"""Score generated images against reference images: Fréchet distance, KID (with its standard error over the subsets),
improved precision/recall (k = 3) and, for a classifier, its mean confidence and the entropy of the predicted
classes. Writes the numbers to a JSON file.

    # the embedded digits, with the shipped classifier (offline, the package's default metric):
    python examples/evaluate.py outputs/samples/heun18
    # the standard FID, with pytorch-fid's Inception weights on disk, against a folder of real images:
    python examples/evaluate.py samples.npz --feature_extractor inception \\
        --weights pt_inception-2015-12-05-6726825d.pth --reference data/cifar10-train
    # FD_DINOv2 with a local DINOv2 checkpoint (saved with save_pretrained):
    python examples/evaluate.py samples/ --feature_extractor transformers --weights models/dinov2-base --reference real/

    # reference statistics in NVlabs' fid.py / pytorch-fid format (mu, sigma; plus the features, for KID):
    python examples/evaluate.py --feature_extractor inception --weights pt_inception-2015-12-05-6726825d.pth \\
        --reference data/cifar10-train --save_reference cifar10-train.npz
    # ... and used (an NVlabs file with only mu/sigma gives FD; KID and precision/recall need the features):
    python examples/evaluate.py samples/ --feature_extractor inception --weights ... --reference cifar10-train.npz

    # streaming: generate and score 50k images without writing them; a killed run resumes where it stopped
    python examples/evaluate.py --pipeline outputs/edm-cifar10 --num_images 50000 --num_inference_steps 18 \\
        --feature_extractor inception --weights pt_inception-2015-12-05-6726825d.pth --reference cifar10-train.npz

Streaming (``--pipeline``) draws image i with seed ``--seed + i``, quantises it to 8 bits as a saved file would be,
and embeds each batch at once; the features stay on the device. Every ``--checkpoint_every`` batches the features and
the float64 sums go to ``--state_dir`` (default ``<pipeline>/eval_state/<hash of the settings>``); a rerun with the
same settings resumes there, and a larger ``--num_images`` adds only the missing images.

The statistics of each reference set are computed once per feature extractor and cached as an .npz
(``--cache_dir``, default ``~/.cache/diffusers_stf/reference_stats``). FD depends on the number of images: compare
numbers only at equal ``--num_images`` (the docs' calibration table uses 1000); KID does not, and is the metric to
read at small n. With ``--num_images`` <= the feature dimension the FD is undefined: it is reported as null with the
reason, and KID is still computed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from typing import Dict, List, Optional

from diffusers_stf.evaluation import (
    compute_features,
    fd_undefined_reason,
    load_feature_extractor,
    load_images,
    reference_statistics,
    save_reference_stats,
    score_features,
)
from diffusers_stf.evaluation.classification import class_statistics
from diffusers_stf.evaluation.sampler_options import add_sampler_args, parse_json_options

DEFAULT_REFERENCES = ["digits:train", "digits:heldout"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("samples", nargs="?", default=None,
                        help="a folder of images or an .npz (e.g. written by examples/generate.py)")  # fmt: skip
    parser.add_argument(
        "--reference",
        action="append",
        default=None,
        help="digits:train | digits:heldout | digits:all | a folder | an .npz of images | an .npz of statistics "
        "(mu, sigma); repeat for several (default: digits:train and digits:heldout)",
    )
    parser.add_argument("--save_reference", default=None,
                        help="write the statistics (mu, sigma, features) of the one --reference to this .npz")  # fmt: skip
    parser.add_argument("--feature_extractor", choices=("digits", "inception", "transformers"), default="digits")
    parser.add_argument("--weights", default=None, help="inception: the weight file; transformers: the model folder")
    parser.add_argument("--num_images", type=int, default=None,
                        help="samples: use the first N (default: all); --pipeline: generate N (default 1000)")  # fmt: skip
    parser.add_argument("--k", type=int, default=3, help="neighbourhood size of precision/recall")
    parser.add_argument("--kid_subsets", type=int, default=100, help="KID: number of random subsets")
    parser.add_argument("--kid_subset_size", type=int, default=1000, help="KID: largest subset size")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--cache_dir", default=None, help="where reference statistics are cached")
    parser.add_argument("--no_cache", action="store_true", help="recompute the reference statistics")
    parser.add_argument("--output_json", default=None,
                        help="default: <samples>/metrics.json, <samples>.metrics.json or <state_dir>/metrics.json")  # fmt: skip
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    stream = parser.add_argument_group("streaming evaluation of a pipeline (instead of samples)")
    stream.add_argument("--pipeline", default=None, help="folder saved with pipeline.save_pretrained")
    stream.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    add_sampler_args(stream)
    stream.add_argument("--state_dir", default=None, help="checkpoints of the run (default <pipeline>/eval_state/...)")
    stream.add_argument("--checkpoint_every", type=int, default=10, help="batches between checkpoints")
    args = parser.parse_args(argv)
    if args.samples is not None and args.pipeline is not None:
        parser.error("give either samples or --pipeline, not both")
    if args.samples is None and args.pipeline is None and args.save_reference is None:
        parser.error("give samples (a folder or an .npz), --pipeline FOLDER, or --save_reference PATH")
    if args.save_reference is not None and (not args.reference or len(args.reference) != 1):
        parser.error("--save_reference writes the statistics of exactly one --reference; name it")
    for name, minimum in (("num_images", 1), ("batch_size", 1), ("num_inference_steps", 1), ("checkpoint_every", 1),
                          ("seed", 0), ("k", 1), ("kid_subsets", 1), ("kid_subset_size", 2)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"--{name} must be >= {minimum}, got {value}")
    parse_json_options(parser, args)
    return args


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_report(result: Dict[str, object]) -> str:
    lines = [f"{result['num_images']} images, features: {result['feature_extractor']}"]
    for reference, fd in result["fd"].items():
        count = result["num_reference_images"][reference]
        line = (
            f"  vs {reference} ({'statistics' if count is None else f'{count} images'}): "
            f"FD {'undefined' if fd is None else f'{fd:.3f}'}  precision {_fmt(result['precision'][reference], '.3f')}  "
            f"recall {_fmt(result['recall'][reference], '.3f')}  KID {_fmt(result['kid'][reference], '.4g')}"
        )
        if result["kid"][reference] is not None:
            line += f" ± {result['kid_se'][reference]:.2g} (standard error over {result['kid_subsets']} subsets)"
        lines.append(line)
    if "confidence" in result:
        lines.append(
            f"  classifier: mean confidence {result['confidence']:.3f}, class entropy {result['class_entropy']:.3f} "
            f"nats (max {result['max_class_entropy']:.3f})"
        )
    lines += [f"  note: {note}" for note in result.get("notes", [])]
    return "\n".join(lines)


def _streaming_pipeline(args):
    """The pipeline of ``--pipeline`` with the scheduler options applied, and the settings that determine its images."""
    from diffusers_stf.evaluation.sampler_options import SamplerOptions
    from diffusers_stf.evaluation.sampling import load_pipeline
    from diffusers_stf.evaluation.streaming import pipeline_folder_fingerprint

    pipe = load_pipeline(args.pipeline, device=args.device)
    pipe = SamplerOptions.from_args(args).apply(pipe)
    settings = {
        "pipeline_files": pipeline_folder_fingerprint(args.pipeline),
        "pipeline_class": type(pipe).__name__,
        "scheduler_class": type(pipe.scheduler).__name__,
        "scheduler_config": json.loads(json.dumps(dict(pipe.scheduler.config), default=str)),
        "num_inference_steps": args.num_inference_steps,
        "pipeline_kwargs": args.pipeline_kwargs,
        "images": "8-bit (round((x + 1) * 127.5))",
    }
    return pipe, settings


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    import torch

    args = parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    references = args.reference or DEFAULT_REFERENCES
    extractor = load_feature_extractor(args.feature_extractor, args.weights)
    extractor.to(args.device)
    # every reference is loaded (and checked against the extractor) before any image is generated or embedded
    stats = {ref: reference_statistics(extractor, ref, args.cache_dir, args.batch_size, not args.no_cache)
             for ref in references}  # fmt: skip
    if args.save_reference is not None:
        ref = stats[references[0]]
        count = len(ref["features"]) if ref.get("features") is not None else ref.get("num_images")
        save_reference_stats(args.save_reference, ref["mu"], ref["sigma"], feature_network=extractor.name,
                             num_images=count, features=ref.get("features"))  # fmt: skip
        print(f"wrote the statistics of {references[0]} ({count} images, {extractor.name}) to {args.save_reference}")
        if args.samples is None and args.pipeline is None:
            return {"saved_reference": os.path.abspath(args.save_reference)}

    result: Dict[str, object] = {"feature_extractor": extractor.name}
    scoring = dict(k=args.k, kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size)
    if args.pipeline is None:
        images = load_images(args.samples, num_images=args.num_images)
        features, logits = compute_features(extractor, images, args.batch_size)
        result["num_images"] = len(features)
        with warnings.catch_warnings():  # an undefined FD is reported below, as an error
            warnings.filterwarnings("ignore", message="FD is undefined")
            result.update(score_features(features, stats, **scoring))
        if logits is not None:
            result.update(class_statistics(logits))
        result["samples"] = os.path.abspath(args.samples)
        output = args.output_json or (
            os.path.join(args.samples, "metrics.json") if os.path.isdir(args.samples)
            else os.path.splitext(args.samples)[0] + ".metrics.json"
        )  # fmt: skip
    else:
        from diffusers_stf.evaluation.streaming import stream_features

        num_images = args.num_images or 1000
        reason = fd_undefined_reason(num_images, extractor.feature_dim)
        if reason is not None:
            print(f"error: {reason}", file=sys.stderr)
        pipe, settings = _streaming_pipeline(args)
        key = {**settings, "feature_network": extractor.name, "seed": args.seed}
        state_dir = args.state_dir or os.path.join(
            args.pipeline, "eval_state", hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        )
        accumulator = stream_features(pipe, extractor, num_images, args.num_inference_steps, args.seed,
                                      args.batch_size, args.pipeline_kwargs, state_dir, args.checkpoint_every,
                                      settings)  # fmt: skip
        mu, sigma = accumulator.statistics() if reason is None else (None, None)
        result["num_images"] = accumulator.num_images
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="FD is undefined")
            result.update(score_features(accumulator.features(), stats, mu, sigma, **scoring))
        result.update(accumulator.class_statistics() or {})
        result.update({"pipeline": os.path.abspath(args.pipeline), "seed": args.seed, "state_dir": state_dir,
                       "settings": settings})  # fmt: skip
        output = args.output_json or os.path.join(state_dir, "metrics.json")
    result["kid_subsets"] = args.kid_subsets
    print(format_report(result))
    if result.get("fd_undefined"):
        print(f"error: {result['fd_undefined']}", file=sys.stderr)
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
