"""Classifier guidance, Discriminator Guidance and both (DG eq. 6) on the embedded 8x8 digits, at the same NFE.

The paper's claim to check (Kim et al. 2023, §3.5 and Figure 10): classifier guidance raises precision and lowers
recall; adding Discriminator Guidance restores recall.

Models, trained here with the package's scripts (or reused from ``--work_dir`` on reruns):

* the score model: ``--pipeline``, the first EDM digits pipeline under ``outputs/``, or ``examples/train_stf.py --loss edm``;
* the discriminator: ``examples/train_discriminator.py`` on that score model's unguided samples;
* the classifier: ``examples/train_classifier.py`` on the labelled digits, saved with the score model and the
  discriminator as one ``DiscriminatorGuidedPipeline`` folder.

Rows, all with 18 EDM Heun steps (35 NFE) and the same seeds; image i is asked for class i mod 10:
unguided, CG (w_CG), DG (w1), CG + DG. The judge is the shipped digits classifier (it never guides): accuracy of the
requested label, and Fréchet distance, precision and recall of its features against the digits' train split.
Each metric is the mean ± sd over ``--seeds`` (3 sampling seed sets by default).

    python benchmarks/bench_classifier_guidance.py                      # full budgets
    python benchmarks/bench_classifier_guidance.py --score_steps 300 --disc_steps 200 --clf_steps 300 --num_images 300

Writes ``benchmarks/results/classifier_guidance.json`` and ``benchmarks/results/classifier_guidance.png`` (one panel
per row, image row r asked for class r).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_guidance import add_model_args, find_score_pipeline, train_discriminator, train_with_example  # noqa: E402

from diffusers_stf import DiscriminatorGuidedPipeline  # noqa: E402
from diffusers_stf.evaluation import (  # noqa: E402
    compute_features,
    evaluate_images,
    generate_batch,
    load_feature_extractor,
    save_image_grid,
)

NUM_CLASSES = 10
METRICS = (("accuracy", "requested-label accuracy ↑", 3), ("fd", "FD vs train ↓", 2),
           ("precision", "precision ↑", 3), ("recall", "recall ↑", 3))


def train_classifier(args, dg_folder: str) -> str:
    return train_with_example(
        args, "train_classifier", "classifier", "classifier", dg_folder, args.clf_steps, ("--overwrite_output_dir",)
    )


def requested_labels(seeds) -> torch.Tensor:
    return torch.tensor([s % NUM_CLASSES for s in seeds])


@torch.no_grad()
def sample(pipe, num_images: int, seed: int, steps: int, batch_size: int, **kwargs) -> torch.Tensor:
    """Images in [−1, 1]; image i drawn from seed ``seed + i`` and asked for class (seed + i) mod 10."""
    seeds = list(range(seed, seed + num_images))
    batches = [generate_batch(pipe, seeds[i:i + batch_size], steps, class_labels=requested_labels(seeds[i:i + batch_size]),
                              **kwargs) for i in range(0, num_images, batch_size)]
    return torch.cat(batches)


def evaluate(images: torch.Tensor, labels: torch.Tensor, extractor) -> dict:
    _, logits = compute_features(extractor, images, 250)
    logits = torch.as_tensor(logits)
    result = evaluate_images(images, extractor, references=("digits:train",))
    return {"accuracy": float((logits.argmax(1) == labels).double().mean()), "fd": result["fd"]["digits:train"],
            "precision": result["precision"]["digits:train"], "recall": result["recall"]["digits:train"]}


def summarize(runs, configs):
    rows = []
    for name in configs:
        group = [r for r in runs if r["config"] == name]
        row = {"config": name}
        for key, _, digits in METRICS:
            values = [r[key] for r in group]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            row[key] = {"mean": statistics.mean(values), "sd": sd, "text": f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"}
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_model_args(parser, "bench_classifier_guidance")
    parser.add_argument("--clf_steps", type=int, default=2000)
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--steps", type=int, default=18, help="EDM Heun steps of every row (NFE = 2·steps − 1)")
    parser.add_argument("--w_cg", type=float, default=1.0, help="classifier guidance scale")
    parser.add_argument("--w_dg", type=float, default=2.0, help="Discriminator Guidance weight w1 (DG: 2)")
    parser.add_argument("--seeds", type=str, default="0,1000,2000", help="first seeds of the sample sets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results_dir", type=str, default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()

    score = find_score_pipeline(args)
    dg_folder = train_discriminator(args, score)
    folder = train_classifier(args, dg_folder)
    pipe = DiscriminatorGuidedPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.discriminator is not None and pipe.classifier is not None
    extractor = load_feature_extractor("digits")

    configs = {
        "unguided": dict(dg_weight_1st_order=0.0),
        f"CG w_CG={args.w_cg:g}": dict(dg_weight_1st_order=0.0, classifier_guidance_scale=args.w_cg),
        f"DG w1={args.w_dg:g}": dict(dg_weight_1st_order=args.w_dg),
        "CG + DG": dict(dg_weight_1st_order=args.w_dg, classifier_guidance_scale=args.w_cg),
    }
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs = []
    for seed in seeds:
        labels = requested_labels(range(seed, seed + args.num_images))
        for name, kwargs in configs.items():
            images = sample(pipe, args.num_images, seed, args.steps, args.batch_size, **kwargs)
            row = {"config": name, "seed": seed, **evaluate(images, labels, extractor)}
            runs.append(row)
            print(f"seed {seed:>5} | {name:<14} | " + " | ".join(f"{k} {row[k]:.3f}" for k, _, _ in METRICS), flush=True)

    rows = summarize(runs, configs)
    header = "| sampler (NFE %d) | %s |" % (2 * args.steps - 1, " | ".join(title for _, title, _ in METRICS))
    lines = [header, "|---" * (len(METRICS) + 1) + "|"]
    lines += [f"| {r['config']} | " + " | ".join(r[k]["text"] for k, _, _ in METRICS) + " |" for r in rows]
    table = "\n".join(lines)
    print(f"\n{args.num_images} images per row and seed set, mean ± sd over seed sets {seeds}; judge: the shipped digits "
          f"classifier\n{table}")

    os.makedirs(args.results_dir, exist_ok=True)
    panels = [sample(pipe, 100, 0, args.steps, 100, **kwargs) for kwargs in configs.values()]
    # image i is asked for class i mod 10: reorder so that grid row r holds class r
    order = torch.arange(100).reshape(10, 10).T.reshape(-1)
    grid = torch.cat([p[order] for p in panels], dim=0)
    png = save_image_grid(grid, os.path.join(args.results_dir, "classifier_guidance.png"), nrow=10, value_range=(-1, 1))
    results = {"score_model": score, "discriminator": dg_folder, "pipeline": folder, "args": vars(args),
               "configs": {k: v for k, v in configs.items()}, "runs": runs, "summary": rows, "table": table,
               "grid": png, "grid_layout": f"panels top to bottom: {', '.join(configs)}; row r asked for class r",
               "seconds": round(time.time() - start, 1)}
    path = os.path.join(args.results_dir, "classifier_guidance.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"\nresults: {path}\ngrid: {png}")
    return results


if __name__ == "__main__":
    main()
