"""Helpers for the README's results: evaluate a saved pipeline over samplers × step counts, tabulate, plot.

Nothing here trains. A comparison script trains (or loads) its models, then calls::

    from results_tools import SamplerSpec, evaluate_pipeline, markdown_table, plot_metric_vs_nfe, real_data_rows

    rows = evaluate_pipeline("outputs/edm-digits", [
        SamplerSpec("Heun", "heun", steps=[3, 5, 9, 18]),
        SamplerSpec("DDIM", None, steps=[10, 20, 50, 100]),          # keep the folder's own scheduler
        SamplerSpec("DG w=2", None, steps=[18], pipeline_kwargs={"dg_weight_1st_order": 2.0}),
    ], num_images=1000)
    plot_metric_vs_nfe(rows, "benchmarks/results/x.png", floor=real_data_rows()[0])
    print(markdown_table(rows))

Every point uses the same seeds (``seed`` … ``seed + num_images − 1``, one generator per image) and the same number
of images, since the Fréchet distance is biased upward at small n.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers_stf.evaluation import (  # noqa: E402
    evaluate_images,
    generate_images,
    load_feature_extractor,
    load_pipeline,
    make_scheduler,
    pipeline_with_scheduler,
    reference_images,
)

DEFAULT_REFERENCES = ("digits:train", "digits:heldout")

# (row key, column header, format) of the default tables
DEFAULT_COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    ("label", "sampler", "{}"),
    ("steps", "steps", "{}"),
    ("nfe", "NFE", "{:.0f}"),
    ("fd_train", "FD vs train ↓", "{:.2f}"),
    ("fd_heldout", "FD vs held-out ↓", "{:.2f}"),
    ("precision_train", "precision ↑", "{:.3f}"),
    ("recall_train", "recall ↑", "{:.3f}"),
    ("confidence", "conf ↑", "{:.3f}"),
    ("class_entropy", "H (max 2.303)", "{:.3f}"),
    ("seconds", "sampling s", "{:.1f}"),
)


@dataclass
class SamplerSpec:
    """One line of a comparison: a scheduler (None: the pipeline's own), its config overrides, the step counts to
    sweep and extra pipeline call options (e.g. guidance weights)."""

    label: str
    scheduler: Optional[str]
    steps: Sequence[int]
    overrides: Dict[str, object] = field(default_factory=dict)
    pipeline_kwargs: Dict[str, object] = field(default_factory=dict)


def _short(reference: str) -> str:
    return reference.split(":", 1)[1] if reference.startswith("digits:") else os.path.basename(reference.rstrip("/"))


def flatten_metrics(result: Dict[str, object]) -> Dict[str, object]:
    """``evaluate_images``' nested result → flat ``fd_<ref>``, ``precision_<ref>``, ``recall_<ref>`` (+ class stats)."""
    row: Dict[str, object] = {"num_images": result["num_images"]}
    for metric in ("fd", "precision", "recall"):
        for reference, value in result[metric].items():
            row[f"{metric}_{_short(reference)}"] = value
    for key in ("confidence", "class_entropy"):
        if key in result:
            row[key] = result[key]
    return row


def evaluate_pipeline(
    pipeline,
    specs: Sequence[SamplerSpec],
    num_images: int = 1000,
    seed: int = 0,
    batch_size: int = 250,
    references: Sequence[str] = DEFAULT_REFERENCES,
    extractor=None,
    cache_dir: Optional[str] = None,
) -> List[Dict[str, object]]:
    """Sample and score ``pipeline`` (a pipeline or a saved folder) for every spec and step count.

    Returns one row per (spec, steps): ``label``, ``scheduler``, ``steps``, ``nfe`` (UNet calls per image, counted),
    ``seconds`` (sampling wall time) and the flattened metrics.
    """
    from tqdm.auto import tqdm

    pipe = load_pipeline(pipeline) if isinstance(pipeline, str) else pipeline
    base_scheduler = pipe.scheduler
    extractor = extractor if extractor is not None else load_feature_extractor("digits")
    jobs = [(spec, steps) for spec in specs for steps in spec.steps]
    rows = []
    for spec, steps in tqdm(jobs, desc="sampler sweep"):
        # a pipeline whose loop drives the chosen scheduler correctly (DDPMPipeline never calls scale_model_input)
        spec_pipe = pipe if spec.scheduler is None else pipeline_with_scheduler(
            pipe, make_scheduler(base_scheduler, spec.scheduler, **spec.overrides)
        )
        out = generate_images(spec_pipe, num_images, steps, seed=seed, batch_size=batch_size, progress=False,
                              **spec.pipeline_kwargs)
        result = evaluate_images(out["images"], extractor, references=references, cache_dir=cache_dir)
        row = {"label": spec.label, "scheduler": type(spec_pipe.scheduler).__name__, "steps": steps, "nfe": out["nfe"],
               "seconds": out["seconds"], "seed": seed, **flatten_metrics(result)}  # fmt: skip
        rows.append(row)
        tqdm.write(", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return rows


def real_data_rows(
    references: Sequence[str] = DEFAULT_REFERENCES, extractor=None, cache_dir: Optional[str] = None
) -> List[Dict[str, object]]:
    """The real-data floor: the held-out digits scored like a sample set (FD vs train ≈ the best reachable)."""
    extractor = extractor if extractor is not None else load_feature_extractor("digits")
    result = evaluate_images(reference_images("digits:heldout"), extractor, references=references, cache_dir=cache_dir)
    return [{"label": "real held-out digits", "steps": "–", "nfe": 0.0, "seconds": 0.0, **flatten_metrics(result)}]


def markdown_table(rows: Sequence[Dict[str, object]], columns: Sequence[Tuple[str, str, str]] = DEFAULT_COLUMNS) -> str:
    """A markdown table of ``rows``; columns missing from every row are dropped, a missing cell is blank."""
    columns = [c for c in columns if any(c[0] in row for row in rows)]
    lines = ["| " + " | ".join(c[1] for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key, "")
            try:
                cells.append(fmt.format(value) if value != "" else "")
            except (ValueError, TypeError):
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metric_vs_nfe(
    rows: Sequence[Dict[str, object]],
    path: str,
    metrics: Sequence[Tuple[str, str]] = (("fd_train", "FD vs train (digits CNN features) ↓"), ("recall_train", "recall ↑")),
    floor: Optional[Dict[str, object]] = None,
    title: Optional[str] = None,
    log_y: Sequence[str] = ("fd_train", "fd_heldout"),
) -> None:
    """One panel per metric, metric vs NFE (log scale), one line per ``label``; ``floor`` (a row of real data) is
    drawn as a dashed line."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(row["label"] for row in rows))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 4), squeeze=False)
    for ax, (key, name) in zip(axes[0], metrics):
        for label in labels:
            points = sorted((row["nfe"], row[key]) for row in rows if row["label"] == label and key in row)
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        if floor is not None and key in floor:
            ax.axhline(floor[key], color="grey", linestyle="--", label=floor.get("label", "real data"))
        ax.set_xscale("log")
        nfes = sorted({row["nfe"] for row in rows})
        ax.set_xticks(nfes, [f"{n:g}" for n in nfes], fontsize=8)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if key in log_y:
            ax.set_yscale("log")
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.set_ylabel(name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_sample_grid(pipe, path: str, num_inference_steps: int = 18, num_images: int = 100, seed: int = 0) -> None:
    """A 10-column PNG grid of ``num_images`` samples."""
    from diffusers_stf.evaluation import save_image_grid

    images = generate_images(pipe, num_images, num_inference_steps, seed=seed, progress=False)["images"]
    save_image_grid(images, path, nrow=10, scale=4, value_range=(-1, 1))

