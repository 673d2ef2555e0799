"""What the digits metric's numbers mean: score image sets of known quality with the shipped classifier.

Every set has 1000 images (unless its row says otherwise) and is quantised to 8 bits like saved samples. FD, KID,
precision and recall are measured against the 797 training digits (the reference a model trained on them is
scored against); FD against the 1000 held-out digits is shown as well.

The second table shows how FD and KID depend on the number of samples n: random subsets of n real held-out digits
(and of the same digits with noise σ = 0.3), drawn 20 times per n, scored against the training digits.

    python scripts/calibrate_metric.py                                   # print the tables
    python scripts/calibrate_metric.py --update_docs docs/evaluation.md  # rewrite its calibration sections
"""

from __future__ import annotations

import argparse
import re
from typing import Callable, Dict, List, Tuple

import numpy as np
import torch
from scipy import ndimage

from diffusers_stf.digits import digits_tensor
from diffusers_stf.evaluation import (
    compute_features,
    evaluate_images,
    feature_statistics,
    frechet_distance,
    kid_summary,
    load_feature_extractor,
    quantize,
)

MARK_BEGIN, MARK_END = "<!-- calibration table: begin -->", "<!-- calibration table: end -->"
SMALL_N_BEGIN, SMALL_N_END = "<!-- sample-size table: begin -->", "<!-- sample-size table: end -->"
N = 1000
SAMPLE_SIZES = (100, 250, 500, 1000)


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
            "fd_train": r["fd"]["digits:train"], "fd_heldout": r["fd"]["digits:heldout"], "kid_train": r["kid"]["digits:train"],
            "precision": r["precision"]["digits:train"], "recall": r["recall"]["digits:train"],
            "confidence": r["confidence"], "class_entropy": r["class_entropy"]}})  # fmt: skip
    lines = [
        "| image set | n | FD vs train | FD vs held-out | KID vs train | precision | recall | conf | H |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['set']} | {row['n']} | {row['fd_train']:.2f} | {row['fd_heldout']:.2f} | {row['kid_train']:.0f} "
            f"| {row['precision']:.3f} "
            f"| {row['recall']:.3f} | {row['confidence']:.3f} | {row['class_entropy']:.3f} |"
        )
    return "\n".join(lines), rows, sets


def sample_size_table(repeats: int = 20, seed: int = 0) -> Tuple[str, List[Dict[str, object]]]:
    """FD and KID vs the training digits of random n-subsets of the held-out digits (clean, and with noise σ = 0.3),
    ``repeats`` draws per n: mean ± sd over the draws, and the mean of KID's reported standard error."""
    extractor = load_feature_extractor("digits")
    g = torch.Generator().manual_seed(seed)
    train, _ = digits_tensor("train")
    held, _ = digits_tensor("heldout")
    noisy = (held + 0.3 * torch.randn(held.shape, generator=g)).clamp(-1, 1)
    reference = compute_features(extractor, quantize(train))[0]
    mu_ref, sigma_ref = feature_statistics(reference)
    rng = np.random.default_rng(seed)
    rows = []
    for name, images in (("real held-out digits", held), ("held-out + noise σ = 0.3", noisy)):
        features = compute_features(extractor, quantize(images))[0]
        for n in SAMPLE_SIZES:
            draws = 1 if n == len(features) else repeats
            fd, kid, kid_se = [], [], []
            for r in range(draws):
                subset = features[rng.permutation(len(features))[:n]]
                fd.append(frechet_distance(*feature_statistics(subset), mu_ref, sigma_ref))
                summary = kid_summary(subset, reference, seed=r)
                kid.append(summary["kid"])
                kid_se.append(summary["kid_se"])
            rows.append({"set": name, "n": n, "draws": draws, "fd_mean": np.mean(fd), "fd_sd": np.std(fd, ddof=1) if draws > 1 else None,
                         "kid_mean": np.mean(kid), "kid_sd": np.std(kid, ddof=1) if draws > 1 else None,
                         "kid_se": np.mean(kid_se)})  # fmt: skip
    lines = [
        "| image set | n | draws | FD vs train (mean ± sd) | KID vs train (mean ± sd) | KID's reported s.e. |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        fd = f"{row['fd_mean']:.2f}" + ("" if row["fd_sd"] is None else f" ± {row['fd_sd']:.2f}")
        kid = f"{row['kid_mean']:.0f}" + ("" if row["kid_sd"] is None else f" ± {row['kid_sd']:.0f}")
        lines.append(f"| {row['set']} | {row['n']} | {row['draws']} | {fd} | {kid} | {row['kid_se']:.0f} |")
    return "\n".join(lines), rows


def split_check(repeats: int = 20) -> str:
    """MMD²_u of the full train/held-out feature sets over ``repeats`` stratified and random 797/1000 splits of all
    1797 digits: why real held-out digits score a negative KID against the (stratified) training split."""
    from sklearn.model_selection import train_test_split

    from diffusers_stf.evaluation import unbiased_mmd2

    images, labels = digits_tensor("all")
    features = torch.from_numpy(compute_features(load_feature_extractor("digits"), quantize(images))[0])
    lines = []
    for name, stratify in (("stratified", labels.numpy()), ("random", None)):
        values = []
        for seed in range(repeats):
            a, b = train_test_split(np.arange(len(labels)), test_size=1000, random_state=seed, stratify=stratify)
            values.append(float(unbiased_mmd2(features[a], features[b])))
        lines.append(f"MMD²_u of {repeats} {name} 797/1000 splits: {np.mean(values):.0f} ± {np.std(values, ddof=1):.0f}")
    return "\n".join(lines)


def _replace_section(text: str, begin: str, end: str, body: str, path: str) -> str:
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no '{begin}' ... '{end}' section")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text)


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--update_docs", default=None, help="a markdown file whose calibration section is rewritten")
    parser.add_argument("--figure", default=None, help="save a PNG with 10 images of every set, one row per set")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table, rows, sets = calibration_table()
    print(table)
    small_n, _ = sample_size_table()
    print(small_n)
    print(split_check())
    if args.figure:
        save_figure(sets, rows, args.figure)
        print(f"wrote {args.figure}")
    if args.update_docs:
        with open(args.update_docs) as f:
            text = f.read()
        text = _replace_section(text, MARK_BEGIN, MARK_END, table, args.update_docs)
        text = _replace_section(text, SMALL_N_BEGIN, SMALL_N_END, small_n, args.update_docs)
        with open(args.update_docs, "w") as f:
            f.write(text)
        print(f"updated {args.update_docs}")


if __name__ == "__main__":
    main()
