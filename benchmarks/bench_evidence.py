#!/usr/bin/env python
"""Evidence that each method helps: three training seeds per arm, Welch's t-test, one plot per comparison.

On the embedded 8x8 digits, each comparison trains both arms with the same training seeds (through the example
scripts' command lines), samples the same seeds (0 … n−1, one generator per image) and the same number of images in
both arms, and scores them with the Fréchet distance of the shipped digits classifier's features against the
797-image training split (``fd_train``; real held-out digits score about 2.6, the metric's floor).

=====================  ===============  ======================  ==============================================
name                   baseline         method                  setting
=====================  ===============  ======================  ==============================================
``stf_vs_edm``         EDM loss         STF, R = 1024           ``train_stf.py``, equal steps, EMA, Heun 35 NFE
``sa2_vs_ddpm_ddim10``  DDPM L_simple   SA-2 (K = 2, λ = 1)     ``train_sequence_aware.py``, DDIM 10 steps
                                                                (20/50/100 steps in the plot and the json)
``dg_vs_unguided``     unguided         discriminator-guided    the EDM arm's score models (FD ≥ 10: a real gap),
                                                                ``train_discriminator.py``, w₁ = 2, Heun 35 NFE
=====================  ===============  ======================  ==============================================

Discriminator guidance is also investigated on the seed-0 score model (``dg_investigation`` in the json):
the discriminator's held-out accuracy at each validation σ; whether the gain grows with the model–data gap (score
models trained for several budgets); and whether the feature extractor (``none``: a small noise-conditional encoder,
``unet_encoder``: DG's recipe, a head on the frozen score UNet's encoder) and the σ window (DG's VP window, σ up to
152, against one restricted to the σ where 8x8 digits still differ) suit 8x8 images.

Writes ``benchmarks/results/evidence.json`` (per comparison: ``baseline`` and ``method`` with one FD per training
seed, ``seeds``, ``setup``, and a ``summary`` with mean ± sd, the ratio method/baseline and the Welch p-value) and
``benchmarks/results/evidence_<name>.png``. Every unit of work (a trained model, an evaluated sample set) is cached
under ``--work_dir``, so an interrupted run resumes and skips what finished; ``render_table`` turns the json into the
README's table (``--table`` prints it).

    python benchmarks/bench_evidence.py                      # the full protocol (about an hour on 2 idle cores)
    python benchmarks/bench_evidence.py --quick              # smoke test: one seed, a few steps, tiny models
    python benchmarks/bench_evidence.py --only stf_vs_edm    # one comparison
    python benchmarks/bench_evidence.py --table              # print the markdown table of the existing json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COMPARISONS = ("stf_vs_edm", "sa2_vs_ddpm_ddim10", "dg_vs_unguided")
METRIC = "fd_train"
REFERENCE = "digits:train"
MIN_DG_GAP_FD = 10.0  # below this the score model is near the floor and guidance has nothing to correct


# ---------------------------------------------------------------------------------------------------------------
# Statistics and the README table (no torch needed)


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
    return (f"{comparison['name']}: no significant difference: {where} ({change:+.0f} %, Welch p = "
            f"{s['p_value']:.2g}).")


# ---------------------------------------------------------------------------------------------------------------
# The protocol


@dataclass
class Protocol:
    """Budgets of the comparisons. ``full()`` is the protocol whose numbers the README reports; ``quick()`` a smoke
    test of every code path with tiny models and a few steps."""

    seeds: List[int]
    num_images: int  # samples per arm and seed (FD is biased at small n: compare only at equal n)
    batch_size: int
    heun_steps: int  # EDM Heun steps (2N − 1 NFE)
    ddim_steps: List[int]  # the first is the comparison's headline
    stf_steps: int
    sa_steps: int
    disc_steps: int
    num_fake_images: Optional[int]  # discriminator training fakes (None: as many as real images)
    gap_budgets: List[int]  # score-model training steps of the gap sweep (the stf_steps model is reused)
    dg_weights: List[float]  # w₁ of the investigation; the comparison uses dg_weight
    dg_weight: float = 2.0
    model_args: List[str] = field(default_factory=list)  # UNet flags of every training script
    disc_model_args: List[str] = field(default_factory=list)
    validation_sigmas: str = "0.01,0.03,0.1,0.3,1,3,10"
    num_validation_images: int = 16  # the training scripts' own sample grids
    disc_validation_steps: int = 250  # held-out accuracy every N discriminator steps (0: at the end only)
    num_heldout_images: int = 128  # real and fake images each, kept out of the discriminator's training
    narrow_sigma_window: tuple = (0.01, 2.0)  # where 8x8 digits in [-1, 1] still differ visibly
    variants: List[str] = field(default_factory=lambda: ["default", "unet_encoder", "narrow_window"])

    @classmethod
    def full(cls) -> "Protocol":
        return cls(seeds=[0, 1, 2], num_images=1000, batch_size=250, heun_steps=18, ddim_steps=[10, 20, 50, 100],
                   stf_steps=700, sa_steps=1000, disc_steps=1000, num_fake_images=None, gap_budgets=[200, 2000],
                   dg_weights=[1.0, 2.0, 4.0])

    @classmethod
    def quick(cls) -> "Protocol":
        tiny = ["--block_out_channels", "8,16", "--norm_num_groups", "8"]
        return cls(seeds=[0], num_images=70, batch_size=70, heun_steps=3, ddim_steps=[10, 20], stf_steps=4,
                   sa_steps=4, disc_steps=4, num_fake_images=64, gap_budgets=[], dg_weights=[2.0], model_args=tiny,
                   disc_model_args=["--disc_block_out_channels", "8,16"], variants=["default", "narrow_window"],
                   num_validation_images=4, disc_validation_steps=0, num_heldout_images=32)


class Runner:
    """Trains through the example scripts' command lines and caches every result as a file under ``work_dir``."""

    def __init__(self, work_dir: str, protocol: Protocol, log: Callable[[str], None] = print, quiet: bool = False):
        self.work_dir, self.p, self.log, self.quiet = work_dir, protocol, log, quiet
        self._examples: Dict[str, object] = {}
        self._extractor = None
        os.makedirs(work_dir, exist_ok=True)

    # -- training -------------------------------------------------------------------------------------------

    def _example(self, name: str):
        if name not in self._examples:
            path = os.path.join(ROOT, "examples", f"{name}.py")
            spec = importlib.util.spec_from_file_location(f"bench_evidence_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self._examples[name] = module
        return self._examples[name]

    def train(self, script: str, name: str, argv: List[str]) -> str:
        """``examples/<script>.py --output_dir <work_dir>/models/<name> <argv>`` unless that folder already holds a
        pipeline finished with the same options; an unfinished folder (a killed run) or one trained with other
        options is trained again from scratch."""
        folder = os.path.join(self.work_dir, "models", name)
        argv = ["--output_dir", folder, "--checkpointing_steps", "0", "--report_to", "none", "--no_progress_bar", *argv]
        record = os.path.join(folder, "bench_train_args.json")
        if os.path.isfile(os.path.join(folder, "model_index.json")) and os.path.isfile(record):
            with open(record) as f:
                if json.load(f) == {"script": script, "argv": argv}:
                    return folder
            self.log(f"{folder} was trained with other options: training it again")
        shutil.rmtree(folder, ignore_errors=True)
        self.log(f"train {name}: python examples/{script}.py {' '.join(argv)}")
        start = time.perf_counter()
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink) if self.quiet else contextlib.nullcontext():
            self._example(script).main(argv)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise RuntimeError(f"examples/{script}.py finished without writing a pipeline to {folder}")
        with open(os.path.join(folder, "bench_train_seconds.json"), "w") as f:
            json.dump({"seconds": time.perf_counter() - start}, f)
        with open(record, "w") as f:  # last: its presence marks the folder as finished with these options
            json.dump({"script": script, "argv": argv}, f)
        return folder

    def score_model(self, loss: str, steps: int, seed: int) -> str:
        """EDM or STF (R = 1024) on the 797-image split with ``train_stf.py``'s defaults otherwise."""
        argv = ["--loss", loss, "--seed", str(seed), "--digits_split", "train", "--max_train_steps", str(steps),
                "--validation_steps", "0", "--num_validation_images", str(self.p.num_validation_images),
                "--logging_steps", str(max(steps // 10, 1)), *self.p.model_args]
        if loss == "stf":
            argv += ["--stf_reference_batch_size", "1024"]
        return self.train("train_stf", f"{loss}-{steps}-seed{seed}", argv)

    def ddpm_model(self, sa: bool, seed: int) -> str:
        """DDPM L_simple or SA-2 (K = 2, λ = 1, uniform τ as the official code) with ``train_sequence_aware.py``."""
        options = ["--sa_k", "2", "--sa_lambda", "1"] if sa else ["--sa_lambda", "0"]
        steps = self.p.sa_steps
        argv = ["--seed", str(seed), "--digits_split", "train", "--max_train_steps", str(steps), "--validation_steps",
                "0", "--num_validation_images", str(self.p.num_validation_images), "--num_inference_steps", "10",
                "--logging_steps", str(max(steps // 10, 1)), *options, *self.p.model_args]
        return self.train("train_sequence_aware", f"{'sa2' if sa else 'ddpm'}-{steps}-seed{seed}", argv)

    def discriminator(self, score_folder: str, seed: int, variant: str = "default") -> str:
        """``train_discriminator.py`` on ``score_folder``'s unguided Heun samples; ``variant``: ``default`` (a small
        noise-conditional encoder, DG's σ range), ``unet_encoder`` (DG's recipe: a head on the frozen score-UNet
        encoder) or ``narrow_window`` (σ only in ``Protocol.narrow_sigma_window``)."""
        argv = ["--pretrained_model_name_or_path", score_folder, "--seed", str(seed), "--digits_split", "train",
                "--max_train_steps", str(self.p.disc_steps), "--validation_steps", str(self.p.disc_validation_steps),
                "--num_validation_images", str(self.p.num_validation_images),
                "--generation_steps", str(self.p.heun_steps), "--num_inference_steps", str(self.p.heun_steps),
                "--validation_sigmas", self.p.validation_sigmas, "--num_heldout_images", str(self.p.num_heldout_images),
                "--logging_steps", str(max(self.p.disc_steps // 10, 1)),
                *self.p.disc_model_args]
        if self.p.num_fake_images:
            argv += ["--num_fake_images", str(self.p.num_fake_images)]
        if variant == "unet_encoder":
            argv += ["--feature_extractor", "unet_encoder"]
        elif variant == "narrow_window":
            argv += ["--sigma_min", str(self.p.narrow_sigma_window[0]), "--sigma_max", str(self.p.narrow_sigma_window[1])]
        elif variant != "default":
            raise ValueError(f"variant must be 'default', 'unet_encoder' or 'narrow_window', got {variant!r}")
        return self.train("train_discriminator", f"disc-{variant}-on-{os.path.basename(score_folder)}", argv)

    # -- evaluation -----------------------------------------------------------------------------------------

    def fd(self, folder: str, key: str, scheduler: Optional[str] = None, steps: Optional[int] = None,
           overrides: Optional[dict] = None, **pipeline_kwargs) -> Dict[str, float]:
        """FD vs the training digits of ``num_images`` samples (seeds 0 … n−1) of the pipeline in ``folder``,
        cached in ``<folder>/bench_eval_<key>.json``."""
        path = os.path.join(folder, f"bench_eval_{key}.json")
        if os.path.isfile(path):
            with open(path) as f:
                cached = json.load(f)
            if cached.get("num_images") == self.p.num_images:
                return cached
        from diffusers_stf.evaluation import (
            evaluate_images, generate_images, load_feature_extractor, load_pipeline, make_scheduler,
            pipeline_with_scheduler,
        )

        if self._extractor is None:
            self._extractor = load_feature_extractor("digits")
        import torch

        pipe = load_pipeline(folder, device="cuda" if torch.cuda.is_available() else "cpu")
        if scheduler is not None:
            pipe = pipeline_with_scheduler(pipe, make_scheduler(pipe.scheduler, scheduler, **(overrides or {})))
        out = generate_images(pipe, self.p.num_images, steps or self.p.heun_steps, seed=0,
                              batch_size=self.p.batch_size, progress=False, **pipeline_kwargs)
        result = evaluate_images(out["images"], self._extractor, references=(REFERENCE,))
        row = {"fd_train": float(result["fd"][REFERENCE]), "precision_train": float(result["precision"][REFERENCE]),
               "recall_train": float(result["recall"][REFERENCE]), "nfe": out["nfe"], "seconds": out["seconds"],
               "num_images": self.p.num_images}
        with open(path + ".partial", "w") as f:
            json.dump(row, f, indent=1)
        os.replace(path + ".partial", path)
        self.log(f"  {os.path.basename(folder)} [{key}]: FD vs train {row['fd_train']:.2f}")
        return row

    def real_floor(self) -> float:
        """FD of the real held-out digits against the training split, at the same n (the metric's floor)."""
        path = os.path.join(self.work_dir, f"floor_{self.p.num_images}.json")
        if not os.path.isfile(path):
            from diffusers_stf.evaluation import evaluate_images, load_feature_extractor, reference_images

            held = reference_images("digits:heldout")[: self.p.num_images]
            fd = evaluate_images(held, load_feature_extractor("digits"), references=(REFERENCE,))["fd"][REFERENCE]
            with open(path, "w") as f:
                json.dump({"fd_train": float(fd), "num_images": len(held)}, f)
        with open(path) as f:
            return json.load(f)["fd_train"]

    @staticmethod
    def _validation_rows(disc_folder: str) -> List[Dict[str, float]]:
        path = os.path.join(disc_folder, "logs", "validation.jsonl")
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    @classmethod
    def heldout_accuracy(cls, disc_folder: str) -> Dict[str, float]:
        """The last row of ``train_discriminator.py``'s held-out accuracy log: accuracy at each validation σ
        (balanced real/fake held-out sets, so 0.5 is chance)."""
        rows = cls._validation_rows(disc_folder)
        last = rows[-1] if rows else {}
        return {k[len("accuracy_sigma_"):]: v for k, v in last.items() if k.startswith("accuracy_sigma_")}

    @classmethod
    def accuracy_trajectory(cls, disc_folder: str) -> List[Dict[str, float]]:
        """Held-out accuracy averaged over the validation σ at each validation step: still rising at the end means
        the discriminator was stopped too early."""
        out = []
        for row in cls._validation_rows(disc_folder):
            values = [v for k, v in row.items() if k.startswith("accuracy_sigma_")]
            if values:
                out.append({"step": row.get("step"), "mean_accuracy": statistics.fmean(values)})
        return out

    # -- the comparisons ------------------------------------------------------------------------------------

    def stf_vs_edm(self) -> Dict[str, object]:
        p = self.p
        baseline, method = [], []
        for seed in p.seeds:
            baseline.append(self.fd(self.score_model("edm", p.stf_steps, seed), f"heun{p.heun_steps}")[METRIC])
            method.append(self.fd(self.score_model("stf", p.stf_steps, seed), f"heun{p.heun_steps}")[METRIC])
        return {"name": "stf_vs_edm", "metric": METRIC, "baseline": baseline, "method": method, "seeds": p.seeds,
                "baseline_label": "EDM", "method_label": "STF, R = 1024",
                "setup": f"{p.stf_steps} steps, 797-image split, Heun {2 * p.heun_steps - 1} NFE, EMA, "
                         f"{p.num_images} samples"}

    def sa2_vs_ddpm(self) -> Dict[str, object]:
        p = self.p
        by_steps = {str(n): {"baseline": [], "method": []} for n in p.ddim_steps}
        ddim = {"clip_sample": False}  # SA-DPM samples without clipping; the folders are saved without it too
        for seed in p.seeds:
            for arm, sa in (("baseline", False), ("method", True)):
                folder = self.ddpm_model(sa, seed)
                for n in p.ddim_steps:
                    by_steps[str(n)][arm].append(self.fd(folder, f"ddim{n}", "DDIMScheduler", n, ddim)[METRIC])
        head = str(p.ddim_steps[0])
        return {"name": "sa2_vs_ddpm_ddim10", "metric": METRIC, "baseline": by_steps[head]["baseline"],
                "method": by_steps[head]["method"], "seeds": p.seeds, "baseline_label": "DDPM",
                "method_label": "SA-2 (K = 2, λ = 1)",
                "setup": f"{p.sa_steps} steps, 797-image split, DDIM {head} steps (η = 0, no clipping), EMA, "
                         f"{p.num_images} samples",
                "by_steps": {n: {**v, "summary": summarize(v["baseline"], v["method"])} for n, v in by_steps.items()}}

    def dg_vs_unguided(self) -> Dict[str, object]:
        p = self.p
        baseline, method, accuracy = [], [], []
        key = f"heun{p.heun_steps}"
        for seed in p.seeds:
            score = self.score_model("edm", p.stf_steps, seed)
            dg = self.discriminator(score, seed)
            baseline.append(self.fd(score, key)[METRIC])  # = the guided pipeline at w = 0, the same seeds
            method.append(self.fd(dg, f"{key}_w{p.dg_weight:g}", dg_weight_1st_order=p.dg_weight)[METRIC])
            accuracy.append({"seed": seed, "heldout_accuracy_by_sigma": self.heldout_accuracy(dg),
                             "heldout_accuracy_trajectory": self.accuracy_trajectory(dg)})
        return {"name": "dg_vs_unguided", "metric": METRIC, "baseline": baseline, "method": method, "seeds": p.seeds,
                "baseline_label": "unguided", "method_label": f"DG, w₁ = {p.dg_weight:g}",
                "setup": f"score models: the EDM arm of stf_vs_edm ({p.stf_steps} steps); discriminator "
                         f"{p.disc_steps} steps on {p.num_fake_images or 797} unguided samples; Heun "
                         f"{2 * p.heun_steps - 1} NFE, {p.num_images} samples, the same score model in both arms",
                "discriminator": accuracy,
                "score_model_gap_ok": all(v >= MIN_DG_GAP_FD for v in baseline),
                "note": f"needs unguided FD >= {MIN_DG_GAP_FD:g} (a real model-data gap)"}

    def dg_investigation(self) -> Dict[str, object]:
        """On seed 0: the gain against the model–data gap (score-model budgets), and the discriminator's feature
        extractor and σ window; each with the held-out accuracy per σ and the FD at every w₁."""
        p, seed = self.p, self.p.seeds[0]
        key = f"heun{p.heun_steps}"

        def study(score: str, variant: str) -> Dict[str, object]:
            dg = self.discriminator(score, seed, variant)
            window = {} if variant != "narrow_window" else {"dg_sigma_max": p.narrow_sigma_window[1]}
            unguided = self.fd(score, key)[METRIC]
            guided = {f"{w:g}": self.fd(dg, f"{key}_w{w:g}" + ("_narrow" if window else ""), dg_weight_1st_order=w,
                                        **window)[METRIC] for w in p.dg_weights}
            best = min(guided.values())
            return {"variant": variant, "score_model": os.path.basename(score), "unguided_fd": unguided,
                    "guided_fd_by_weight": guided, "best_gain": unguided - best,
                    "heldout_accuracy_by_sigma": self.heldout_accuracy(dg),
                    "heldout_accuracy_trajectory": self.accuracy_trajectory(dg)}

        budgets = sorted(set(p.gap_budgets) | {p.stf_steps})
        gap = [study(self.score_model("edm", steps, seed), "default") | {"score_steps": steps} for steps in budgets]
        base = self.score_model("edm", p.stf_steps, seed)
        variants = [study(base, v) for v in p.variants]
        return {"seed": seed, "gap_sweep": gap, "variants": variants,
                "questions": {
                    "does the discriminator learn at this gap": "heldout_accuracy_by_sigma of variants[default] "
                                                                 "(0.5 = chance)",
                    "does the gain grow with the gap": "best_gain against unguided_fd over gap_sweep",
                    "do the feature extractor and the σ window suit 8x8": "variants: default vs unet_encoder vs "
                                                                          "narrow_window"}}


# ---------------------------------------------------------------------------------------------------------------
# Plots


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


# ---------------------------------------------------------------------------------------------------------------


def write_json(path: str, data: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".partial", path)


def run(args) -> Dict[str, object]:
    import torch

    protocol = Protocol.quick() if args.quick else Protocol.full()
    if args.seeds:
        protocol.seeds = [int(s) for s in args.seeds.split(",")]
    if args.num_images:
        protocol.num_images = args.num_images
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, protocol)
    finally:
        torch.set_num_threads(threads)


def _run(args, protocol: Protocol) -> Dict[str, object]:
    runner = Runner(args.work_dir, protocol, quiet=args.quiet)
    results_dir = args.results_dir
    path = os.path.join(results_dir, "evidence.json")
    protocol_record = json.loads(json.dumps(vars(protocol)))
    previous, previous_file = {}, {}
    if os.path.isfile(path):
        with open(path) as f:
            previous_file = json.load(f)
        if previous_file.get("protocol") == protocol_record:  # parts not rerun are kept only from the same protocol
            previous = {c["name"]: c for c in previous_file.get("comparisons", [])}
        elif args.only:
            runner.log(f"{path} was written with another protocol: the parts not in --only are dropped")
    floor = runner.real_floor()
    evidence = {"comparisons": [], "real_heldout_fd_train": floor, "quick": bool(args.quick),
                "protocol": protocol_record}
    steps = {"stf_vs_edm": runner.stf_vs_edm, "sa2_vs_ddpm_ddim10": runner.sa2_vs_ddpm,
             "dg_vs_unguided": runner.dg_vs_unguided}
    start = time.perf_counter()
    for name in COMPARISONS:
        if args.only and name not in args.only:
            if name in previous:  # keep what an earlier run measured
                evidence["comparisons"].append(previous[name])
            continue
        comparison = steps[name]()
        comparison["summary"] = summarize(comparison["baseline"], comparison["method"])
        comparison["plot"] = os.path.relpath(plot_comparison(comparison, os.path.join(results_dir, f"evidence_{name}.png"),
                                                             floor), ROOT)
        comparison["verdict"] = verdict(comparison)
        if comparison.get("score_model_gap_ok") is False:
            comparison["verdict"] += (f" Caution: an unguided FD is below {MIN_DG_GAP_FD:g}; the score model is near "
                                      "the floor, so this comparison cannot show a gain.")
        evidence["comparisons"].append(comparison)
        write_json(path, evidence)
        runner.log(comparison["verdict"])
    if not args.only or "dg_investigation" in args.only:
        investigation = runner.dg_investigation()
        investigation["plot"] = os.path.relpath(plot_investigation(investigation, os.path.join(
            results_dir, "evidence_dg_investigation.png")), ROOT)
        evidence["dg_investigation"] = investigation
    elif previous and "dg_investigation" in previous_file:
        evidence["dg_investigation"] = previous_file["dg_investigation"]
    evidence["seconds"] = time.perf_counter() - start
    write_json(path, evidence)
    print("\n" + render_table(evidence))
    print(f"\nwrote {path} ({evidence['seconds'] / 60:.1f} min)")
    return evidence


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="smoke test: one seed, a few steps, tiny models")
    parser.add_argument("--only", action="append", choices=(*COMPARISONS, "dg_investigation"),
                        help="run only this part (repeatable); the others keep their numbers from the existing json")
    parser.add_argument("--seeds", default=None, help="training seeds, e.g. 0,1,2 (default: 0,1,2; --quick: 0)")
    parser.add_argument("--num_images", type=int, default=None, help="samples per arm (default 1000; FD needs >= 65)")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "bench_evidence"),
                        help="trained models and cached evaluations (what a resumed run skips)")
    parser.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (the 8x8 models gain little from a second one, and on a shared machine "
                             "two contending OpenMP threads can be 20x slower than one)")
    parser.add_argument("--quiet", action="store_true", help="hide the training scripts' own output")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the existing json and exit")
    args = parser.parse_args(argv)
    if args.table:
        with open(os.path.join(args.results_dir, "evidence.json")) as f:
            evidence = json.load(f)
        print(render_table(evidence))
        for c in evidence["comparisons"]:
            print(f"- {c.get('verdict') or verdict(c)}")
        return evidence
    if args.quick and args.work_dir == parser.get_default("work_dir"):
        args.work_dir = os.path.join(ROOT, "outputs", "bench_evidence_quick")
    if args.quick and args.results_dir == parser.get_default("results_dir"):  # never overwrite the real evidence
        args.results_dir = os.path.join(args.work_dir, "results")
    return run(args)


if __name__ == "__main__":
    main()
