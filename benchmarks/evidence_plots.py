"""Plots of the evidence benchmark (``bench_evidence.py``): one per comparison, DG's investigation, and FD against
σ_rel of the post-hoc EMAs."""

from __future__ import annotations

import os
import statistics
from typing import Dict, Optional

from evidence_stats import summarize




def plot_comparison(comparison: Dict[str, object], path: str, floor: Optional[float] = None) -> str:
    """Each training seed's FD for both arms (points, joined per seed), the arm means (bars); for SA every DDIM step
    count in its own panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(comparison["name"], comparison["baseline"], comparison["method"])]
    if "by_steps" in comparison:
        panels = [(f"DDIM {n} steps", v["baseline"], v["method"]) for n, v in comparison["by_steps"].items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 0.6, 3.6), squeeze=False)
    labels = [comparison.get("baseline_label", "baseline"), comparison.get("method_label", "method")]
    for ax, (title, base, meth) in zip(axes[0], panels):
        for i, values in enumerate((base, meth)):
            ax.bar(i, statistics.fmean(values), color=("#9ecae1", "#fdae6b")[i], width=0.6, zorder=1)
        for seed, b, m in zip(comparison["seeds"], base, meth):
            ax.plot([0, 1], [b, m], color="grey", linewidth=0.8, zorder=2)
            ax.scatter([0, 1], [b, m], color="black", s=14, zorder=3)
            ax.annotate(f"seed {seed}", (1.05, m), fontsize=7, va="center")
        if floor is not None:
            ax.axhline(floor, color="green", linestyle="--", linewidth=1, label=f"real held-out digits ({floor:.2f})")
        s = summarize(base, meth)
        p = "–" if s["p_value"] is None else f"{s['p_value']:.2g}"
        ax.set_title(f"{title}\nratio {s['ratio']:.2f}, Welch p {p}", fontsize=9)
        ax.set_xticks([0, 1], labels, fontsize=8)
        ax.set_xlim(-0.6, 1.7)
        ax.set_ylabel("FD vs train (digits CNN) ↓")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(comparison["setup"], fontsize=8)
    if floor is not None:
        handles, names = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, names, fontsize=7, loc="lower center", frameon=False)
    fig.tight_layout(rect=(0, 0.05 if floor is not None else 0, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path + ".partial.png", dpi=110)
    os.replace(path + ".partial.png", path)
    plt.close(fig)
    return path


def plot_investigation(investigation: Dict[str, object], path: str) -> str:
    """Left: the best DG gain against the unguided FD (the model–data gap). Right: held-out discriminator accuracy
    per σ for every study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    gap = investigation["gap_sweep"]
    left.plot([g["unguided_fd"] for g in gap], [g["best_gain"] for g in gap], marker="o")
    for g in gap:
        left.annotate(f"{g['score_steps']} steps", (g["unguided_fd"], g["best_gain"]), fontsize=7)
    left.axhline(0, color="grey", linewidth=0.8)
    left.set_xscale("log")
    left.set_xlabel("unguided FD vs train (the model–data gap)")
    left.set_ylabel("FD gain of the best w₁ (unguided − guided)")
    seen = set()
    for study in gap + investigation["variants"]:
        acc = study["heldout_accuracy_by_sigma"]
        if acc and (study["variant"], study["score_model"]) not in seen:
            seen.add((study["variant"], study["score_model"]))
            sigmas = sorted(acc, key=float)
            label = f"{study['variant']} on {study['score_model']}"
            right.plot([float(s) for s in sigmas], [acc[s] for s in sigmas], marker=".", label=label)
    right.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    right.set_xscale("log")
    right.set_xlabel("σ")
    right.set_ylabel("held-out discriminator accuracy")
    right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path + ".partial.png", dpi=110)
    os.replace(path + ".partial.png", path)
    plt.close(fig)
    return path


def plot_posthoc_curves(comparison: Dict[str, object], path: str) -> str:
    """FD against the post-hoc σ_rel for every training seed (the selection seed dashed), each seed's own half-life
    EMA as a dotted line of its colour, and the chosen σ_rel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    selection = str(comparison["selection"]["seed"])
    for i, (seed, curve) in enumerate(sorted(comparison["fd_by_std"].items())):
        color = f"C{i}"
        stds = sorted(curve, key=float)
        label = f"seed {seed}" + (" (selection)" if seed == selection else "")
        ax.plot([float(s) for s in stds], [curve[s] for s in stds], marker="o", color=color, label=label,
                linestyle="--" if seed == selection else "-")
        own = comparison["training_ema_fd"].get(seed)
        if own is not None:
            ax.axhline(own, color=color, linestyle=":", linewidth=1)
    ax.axvline(comparison["selection"]["options"]["std"], color="grey", linewidth=0.8)
    ax.set_xlabel("σ_rel of the post-hoc EMA (dotted: the run's half-life EMA)")
    ax.set_ylabel("FD vs train (digits CNN) ↓")
    ax.set_title(comparison["setup"][:90] + ("…" if len(comparison["setup"]) > 90 else ""), fontsize=7)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path + ".partial.png", dpi=110)
    os.replace(path + ".partial.png", path)
    plt.close(fig)
    return path
