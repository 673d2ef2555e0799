"""Statistics of the evidence benchmark (``bench_evidence.py``): Welch's t-test per comparison, the README's table and
a one-sentence verdict. No torch needed."""

from __future__ import annotations

import os
import statistics
from typing import Dict, Optional, Sequence




def summarize(baseline: Sequence[float], method: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean and sample sd (n − 1) of each arm, the ratio of the means method/baseline, and the two-sided p-value of
    Welch's t-test (unequal variances; None when an arm has fewer than 2 values or both have zero spread)."""
    from scipy import stats

    def sd(values):
        return statistics.stdev(values) if len(values) > 1 else None

    p_value = None
    if len(baseline) > 1 and len(method) > 1 and (sd(baseline) or sd(method)):
        p_value = float(stats.ttest_ind(method, baseline, equal_var=False).pvalue)
    base_mean, method_mean = statistics.fmean(baseline), statistics.fmean(method)
    return {
        "baseline_mean": base_mean,
        "baseline_sd": sd(baseline),
        "method_mean": method_mean,
        "method_sd": sd(method),
        "ratio": method_mean / base_mean if base_mean else None,
        "p_value": p_value,
        "n_baseline": len(baseline),
        "n_method": len(method),
    }


def _mean_sd(mean: float, sd: Optional[float]) -> str:
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


def render_table(evidence: Dict[str, object], results_link: str = "benchmarks/results") -> str:
    """The README's results table from ``evidence.json``: one row per comparison with mean ± sd of each arm (over
    training seeds), the ratio method/baseline (< 1: the method has the lower FD), Welch's p-value and the plot."""
    lines = [
        "| comparison | baseline | method | FD vs train, baseline | FD vs train, method | ratio | Welch p | seeds | plot |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in evidence["comparisons"]:
        s = c.get("summary") or summarize(c["baseline"], c["method"])
        p = "–" if s["p_value"] is None else (f"{s['p_value']:.2g}" if s["p_value"] >= 1e-3 else "< 0.001")
        ratio = "–" if s["ratio"] is None else f"{s['ratio']:.2f}"
        plot = f"[png]({results_link}/{os.path.basename(c['plot'])})" if c.get("plot") else ""
        lines.append(
            f"| `{c['name']}` | {c.get('baseline_label', 'baseline')} | {c.get('method_label', 'method')} | "
            f"{_mean_sd(s['baseline_mean'], s['baseline_sd'])} | {_mean_sd(s['method_mean'], s['method_sd'])} | "
            f"{ratio} | {p} | {len(c['seeds'])} | {plot} |"
        )
    return "\n".join(lines)


def verdict(comparison: Dict[str, object], alpha: float = 0.05) -> str:
    """One plain sentence: does the method help, by how much, and is it significant at ``alpha``?"""
    s = comparison.get("summary") or summarize(comparison["baseline"], comparison["method"])
    change = 100 * (1 - s["ratio"]) if s["ratio"] is not None else float("nan")
    where = f"FD {s['method_mean']:.2f} against {s['baseline_mean']:.2f}"
    if s["p_value"] is None:
        return f"{comparison['name']}: {where}; too few seeds for a test."
    if s["p_value"] < alpha and change > 0:
        return f"{comparison['name']}: the method helps: {where} ({change:.0f} % lower, Welch p = {s['p_value']:.2g})."
    if s["p_value"] < alpha:
        return f"{comparison['name']}: the method hurts: {where} ({-change:.0f} % higher, Welch p = {s['p_value']:.2g})."
    direction = f"{abs(change):.0f} % {'lower' if change >= 0 else 'higher'}"
    return f"{comparison['name']}: no significant difference: {where} ({direction}, Welch p = {s['p_value']:.2g})."
