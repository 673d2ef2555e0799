"""Score generated images against reference images: Fréchet distance, improved precision/recall (k = 3) and, for a
classifier, its mean confidence and the entropy of the predicted classes. Writes the numbers to a JSON file.

    # the embedded digits, with the shipped classifier (offline, the package's default metric):
    python examples/evaluate.py outputs/samples/heun18
    # the standard FID, with pytorch-fid's Inception weights on disk, against a folder of real images:
    python examples/evaluate.py samples.npz --feature_extractor inception \\
        --weights pt_inception-2015-12-05-6726825d.pth --reference data/cifar10-train
    # FD_DINOv2 with a local DINOv2 checkpoint (saved with save_pretrained):
    python examples/evaluate.py samples/ --feature_extractor transformers --weights models/dinov2-base --reference real/

The statistics of each reference set are computed once per feature extractor and cached as an .npz
(``--cache_dir``, default ``~/.cache/diffusers_stf/reference_stats``). FD depends on the number of images: compare
numbers only at equal ``--num_images`` (the docs' calibration table uses 1000).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional

from diffusers_stf.evaluation import evaluate_images, load_feature_extractor, load_images


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", help="a folder of images or an .npz (e.g. written by examples/generate.py)")
    parser.add_argument(
        "--reference",
        action="append",
        default=None,
        help="digits:train | digits:heldout | digits:all | a folder | an .npz; repeat for several "
        "(default: digits:train and digits:heldout)",
    )
    parser.add_argument("--feature_extractor", choices=("digits", "inception", "transformers"), default="digits")
    parser.add_argument("--weights", default=None, help="inception: the weight file; transformers: the model folder")
    parser.add_argument("--num_images", type=int, default=None, help="use the first N samples (default: all)")
    parser.add_argument("--k", type=int, default=3, help="neighbourhood size of precision/recall")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--cache_dir", default=None, help="where reference statistics are cached")
    parser.add_argument("--no_cache", action="store_true", help="recompute the reference statistics")
    parser.add_argument("--output_json", default=None, help="default: <samples>/metrics.json or <samples>.metrics.json")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    return parser.parse_args(argv)


def format_report(result: Dict[str, object]) -> str:
    lines = [f"{result['num_images']} images, features: {result['feature_extractor']}"]
    for reference, fd in result["fd"].items():
        lines.append(
            f"  vs {reference} ({result['num_reference_images'][reference]} images): FD {fd:.3f}  "
            f"precision {result['precision'][reference]:.3f}  recall {result['recall'][reference]:.3f}"
        )
    if "confidence" in result:
        lines.append(
            f"  classifier: mean confidence {result['confidence']:.3f}, class entropy {result['class_entropy']:.3f} "
            f"nats (max {result['max_class_entropy']:.3f})"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    import torch

    args = parse_args(argv)
    references = args.reference or ["digits:train", "digits:heldout"]
    extractor = load_feature_extractor(args.feature_extractor, args.weights)
    extractor.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images = load_images(args.samples, num_images=args.num_images)
    result = evaluate_images(
        images,
        extractor,
        references=references,
        k=args.k,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
        use_cache=not args.no_cache,
    )
    result["samples"] = os.path.abspath(args.samples)
    print(format_report(result))
    output = args.output_json or (
        os.path.join(args.samples, "metrics.json") if os.path.isdir(args.samples) else os.path.splitext(args.samples)[0] + ".metrics.json"
    )
    with open(output, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
