"""``logs/metrics.png``: the in-training evaluation's FD and KID against the optimizer step."""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import numpy as np


def plot_evaluation_curves(rows: Sequence[Dict], path: str, title: Optional[str] = None) -> Optional[str]:
    """Write ``path`` (PNG): FD (left) and KID with ± its standard error over the subsets (right) against the step,
    from the evaluation rows of ``logs/metrics.jsonl``; a null value (FD at n ≤ d, KID against statistics without
    features) leaves the panel empty with the reason. Returns ``path``, or None without rows."""
    rows = [r for r in rows if "step" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = np.asarray([int(r["step"]) for r in rows])

    def values(name):
        return np.asarray([np.nan if r.get(name) is None else float(r[name]) for r in rows], dtype=np.float64)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    marker = "o" if len(rows) < 30 else None
    for ax, name, label, empty in ((axes[0], "fd", "FD", "FD undefined: no more images than feature dimensions"),
                                   (axes[1], "kid", "KID", "KID n/a: the reference holds no features")):
        v = values(name)
        if np.isfinite(v).any():
            ax.plot(steps, v, marker=marker, color="black")
            finite = v[np.isfinite(v)]
            if name == "fd" and finite.min() > 0 and finite.max() > 10 * finite.min():
                ax.set_yscale("log")  # FD falls by orders of magnitude over a run
            if name == "kid":
                se = np.nan_to_num(values("kid_se"))
                ax.fill_between(steps, v - se, v + se, color="grey", alpha=0.3, label="± s.e. over the subsets")
                ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.set_title(f"{label} of the EMA model's samples")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
