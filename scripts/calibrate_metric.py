"""What the digits metric's numbers mean: score image sets of known quality with the shipped classifier.

Every set has 1000 images (unless its row says otherwise) and is quantised to 8 bits like saved samples. FD,
precision and recall are measured against the 797 training digits (the reference a model trained on them is
scored against); FD against the 1000 held-out digits is shown as well.

    python scripts/calibrate_metric.py                                   # print the table
    python scripts/calibrate_metric.py --update_docs docs/evaluation.md  # rewrite its calibration section
"""

from __future__ import annotations

import argparse
import re
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from scipy import ndimage

from diffusers_stf.digits import digits_tensor
from diffusers_stf.evaluation import evaluate_images, load_feature_extractor, quantize

MARK_BEGIN, MARK_END = "<!-- calibration table: begin -->", "<!-- calibration table: end -->"
N = 1000


def blur(images: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Gaussian blur with the background (−1) outside the image."""
    array = images.numpy()
    out = np.stack([ndimage.gaussian_filter(a, sigma=(0, sigma_px, sigma_px), mode="constant", cval=-1.0) for a in array])
    return torch.from_numpy(out)


def calibration_sets(seed: int = 0) -> List[Tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    train, _ = digits_tensor("train")
    held, held_labels = digits_tensor("heldout")

    def noisy(x, s):
        return (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1)

    low = held[held_labels < 5]
    flat = train.flatten(1).double()
    mean, cov = flat.mean(0), torch.cov(flat.T)
    gaussian = torch.distributions.MultivariateNormal(mean, cov + 1e-6 * torch.eye(64))
    torch.manual_seed(seed)
    sets: List[Tuple[str, Callable[[], torch.Tensor]]] = [
        ("real held-out digits (the floor)", lambda: held),
        ("real held-out, first 256 only (n = 256)", lambda: held[:256]),
        ("1000 copies of training images (a memoriser)", lambda: train[torch.randint(len(train), (N,), generator=g)]),
        ("held-out + Gaussian noise σ = 0.1", lambda: noisy(held, 0.1)),
        ("held-out + noise σ = 0.3", lambda: noisy(held, 0.3)),
        ("held-out + noise σ = 0.6", lambda: noisy(held, 0.6)),
        ("held-out blurred, σ = 0.5 px", lambda: blur(held, 0.5)),
        ("held-out blurred, σ = 1 px", lambda: blur(held, 1.0)),
        ("held-out digits 0–4 only (half the classes dropped)", lambda: low),
        ("pixel Gaussian, full covariance fit to train", lambda: gaussian.sample((N,)).float().reshape(N, 1, 8, 8).clamp(-1, 1)),
        (
            "pixel Gaussian, independent pixels",
            lambda: (mean + flat.std(0) * torch.randn(N, 64, generator=g, dtype=torch.float64)).float().reshape(N, 1, 8, 8).clamp(-1, 1),
        ),
        ("uniform noise in [−1, 1]", lambda: torch.rand(N, 1, 8, 8, generator=g) * 2 - 1),
    ]
    return [(name, quantize(make())) for name, make in sets]


def calibration_table(cache_dir=None) -> Tuple[str, List[Dict[str, object]], List[Tuple[str, torch.Tensor]]]:
    extractor = load_feature_extractor("digits")
    rows = []
    sets = calibration_sets()
    for name, images in sets:
        r = evaluate_images(images, extractor, references=("digits:train", "digits:heldout"), cache_dir=cache_dir)
        rows.append({"set": name, "n": len(images), **{
            "fd_train": r["fd"]["digits:train"], "fd_heldout": r["fd"]["digits:heldout"],
            "precision": r["precision"]["digits:train"], "recall": r["recall"]["digits:train"],
            "confidence": r["confidence"], "class_entropy": r["class_entropy"]}})  # fmt: skip
    lines = [
        "| image set | n | FD vs train | FD vs held-out | precision | recall | conf | H |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['set']} | {row['n']} | {row['fd_train']:.2f} | {row['fd_heldout']:.2f} | {row['precision']:.3f} "
            f"| {row['recall']:.3f} | {row['confidence']:.3f} | {row['class_entropy']:.3f} |"
        )
    return "\n".join(lines), rows, sets


def save_figure(sets, rows, path: str, per_row: int = 12) -> None:
    """One row of example images per calibration set, labelled with its FD vs train."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sets), 1, figsize=(9, 0.75 * len(sets)))
    for ax, (name, images), row in zip(axes, sets, rows):
        strip = torch.cat([torch.nn.functional.pad(im, (1, 1, 1, 1), value=1.0) for im in images[:per_row]], dim=2)
        ax.imshow(strip[0].numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"FD {row['fd_train']:.1f}", rotation=0, ha="right", va="center", fontsize=8)
        ax.set_title(name, fontsize=8, loc="left", pad=2)
    fig.tight_layout(h_pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update_docs", default=None, help="a markdown file whose calibration section is rewritten")
    parser.add_argument("--figure", default=None, help="save a PNG with 10 images of every set, one row per set")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table, rows, sets = calibration_table()
    print(table)
    if args.figure:
        save_figure(sets, rows, args.figure)
        print(f"wrote {args.figure}")
    if args.update_docs:
        with open(args.update_docs) as f:
            text = f.read()
        pattern = re.compile(re.escape(MARK_BEGIN) + ".*?" + re.escape(MARK_END), re.S)
        if not pattern.search(text):
            raise ValueError(f"{args.update_docs} has no '{MARK_BEGIN}' ... '{MARK_END}' section")
        text = pattern.sub(lambda _: f"{MARK_BEGIN}\n{table}\n{MARK_END}", text)
        with open(args.update_docs, "w") as f:
            f.write(text)
        print(f"updated {args.update_docs}")


if __name__ == "__main__":
    main()
