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
``autoguidance_vs_     unguided         autoguidance            the EDM arm's score models, each guided by a guide
unguided``                                                      of the same seed (docs/guidance.md's recipe); w
                                                                chosen on a separate training seed; also with the
                                                                guidance interval (σ ∈ [0.05, 5])
``cfg_vs_conditional``  conditional     classifier-free         ``train_stf.py --class_conditional --label_dropout
                        (w = 1)         guidance                0.1``; w chosen on a separate seed; FD and the
                                                                shipped classifier's accuracy of the requested
                                                                label; the baseline also at the same number of
                                                                network evaluations (twice the steps)
``posthoc_ema``        the run's EDM    EDM2's post-hoc EMA,    ``train_stf.py --loss edm --ema_stds 0.05,0.10``
                       half-life EMA    σ_rel chosen on a       with snapshots, then ``python -m
                                        separate seed           diffusers_stf.phema`` for a sweep of σ_rel; both
                                                                arms from the same runs; FD against σ_rel of
                                                                every seed in ``evidence_posthoc_ema_curves.png``
``edm2_vs_unet2d``     UNet2DModel      EDM2's MP U-Net         ``--architecture edm2`` against the EDM arm of
                       (the EDM arm)    (``EDM2UNet``)          ``stf_vs_edm``: EDM loss, equal steps, parameter
                                                                counts within 1 % (both in the setup)
=====================  ===============  ======================  ==============================================

Guidance weights and the post-hoc σ_rel are chosen on training seed ``Protocol.selection_seed`` (3), whose models are
never reported, so the reported seeds do not select their own setting.

Discriminator guidance is also investigated on the seed-0 score model (``dg_investigation`` in the json):
the discriminator's held-out accuracy at each validation σ; whether the gain grows with the model–data gap (score
models trained for several budgets); and whether the feature extractor (``none``: a small noise-conditional encoder,
``unet_encoder``: DG's recipe, a head on the frozen score UNet's encoder) and the σ window (DG's VP window, σ up to
152, against one restricted to the σ where 8x8 digits still differ) suit 8x8 images.

Writes ``benchmarks/results/evidence.json`` (the commit, the wall time and whether anything came from the cache; per
comparison: ``baseline`` and ``method`` with one FD per training
seed, ``seeds``, ``setup``, and a ``summary`` with mean ± sd, the ratio method/baseline and the Welch p-value) and
``benchmarks/results/evidence_<name>.png``. Every unit of work (a trained model, an evaluated sample set) is cached
under ``--work_dir``, so an interrupted run resumes and skips what finished; ``render_table`` turns the json into the
README's table (``--table`` prints it).

    python benchmarks/bench_evidence.py                      # the full protocol (about an hour on 2 idle cores;
                                                             # posthoc_ema and edm2_vs_unet2d: about 20 min more)
    python benchmarks/bench_evidence.py --quick              # smoke test: one seed, a few steps, tiny models
    python benchmarks/bench_evidence.py --only stf_vs_edm    # one comparison
    python benchmarks/bench_evidence.py --table              # print the markdown table of the existing json
    python benchmarks/bench_evidence.py --combine A B        # one json from parallel --only parts (--results_dir A, B)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from evidence_plots import plot_comparison, plot_investigation, plot_posthoc_curves  # noqa: E402
from evidence_runner import METRIC, REFERENCE, Protocol, Runner  # noqa: E402, F401
from evidence_stats import render_table, summarize, verdict  # noqa: E402, F401

COMPARISONS = ("stf_vs_edm", "sa2_vs_ddpm_ddim10", "dg_vs_unguided", "autoguidance_vs_unguided", "cfg_vs_conditional",
               "posthoc_ema", "edm2_vs_unet2d")
MIN_DG_GAP_FD = 10.0  # below this the score model is near the floor and guidance has nothing to correct


class EvidenceRunner(Runner):
    """The comparisons, on the runner's cached training and evaluation."""

    results_dir = os.path.join(ROOT, "benchmarks", "results")  # where plots of more than one comparison go

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

    def choose(self, candidates: Dict[str, Dict[str, object]], evaluate) -> Dict[str, object]:
        """The candidate of least FD on the selection seed: ``evaluate(options) -> FD row``; the rows of every
        candidate are kept."""
        rows = {name: evaluate(options)[METRIC] for name, options in candidates.items()}
        best = min(rows, key=rows.get)
        return {"seed": self.p.selection_seed, "fd_by_candidate": rows, "chosen": best,
                "options": candidates[best]}

    def autoguidance_vs_unguided(self) -> Dict[str, object]:
        p, key = self.p, f"heun{self.p.heun_steps}"
        interval = list(p.guidance_interval)

        def evaluate(seed, options):
            main, guide = self.score_model("edm", p.stf_steps, seed), self.guide_model(seed)
            tag = f"{key}_autog{options['autoguidance_scale']:g}" + ("_interval" if "guidance_interval" in options else "")
            return self.fd(main, tag, guide=guide, **options)

        sweep = {f"w={w:g}": {"autoguidance_scale": w} for w in p.autoguidance_weights}
        chosen = self.choose(sweep, lambda options: evaluate(p.selection_seed, options))
        chosen_interval = self.choose({f"w={w:g}, σ ∈ {tuple(interval)}": {"autoguidance_scale": w,
                                                                          "guidance_interval": interval}
                                       for w in p.autoguidance_weights},
                                      lambda options: evaluate(p.selection_seed, options))
        baseline, method, with_interval = [], [], []
        for seed in p.seeds:
            baseline.append(self.fd(self.score_model("edm", p.stf_steps, seed), key)[METRIC])
            method.append(evaluate(seed, chosen["options"])[METRIC])
            with_interval.append(evaluate(seed, chosen_interval["options"])[METRIC])
        w = chosen["options"]["autoguidance_scale"]
        return {"name": "autoguidance_vs_unguided", "metric": METRIC, "baseline": baseline, "method": method,
                "seeds": p.seeds, "baseline_label": "unguided", "method_label": f"autoguidance, w = {w:g}",
                "setup": f"score models: the EDM arm of stf_vs_edm ({p.stf_steps} steps); guides: "
                         f"{max(p.stf_steps // p.guide_fraction, 1)} steps, {' '.join(p.guide_args)}; Heun "
                         f"{2 * p.heun_steps - 1} NFE of the main model (and as many of the guide), {p.num_images} "
                         "samples; w chosen on the selection seed",
                "selection": chosen, "selection_interval": chosen_interval,
                "with_interval": {"method": with_interval, "label": chosen_interval["chosen"],
                                  "summary": summarize(baseline, with_interval)},
                "see_also": "dg_vs_unguided guides the same score models with a discriminator"}

    def cfg_vs_conditional(self) -> Dict[str, object]:
        p, key = self.p, f"heun{self.p.heun_steps}"
        sweep = {f"w={w:g}": {"guidance_scale": w} for w in p.cfg_weights}
        chosen = self.choose(sweep, lambda options: self.fd(self.conditional_model(p.selection_seed),
                                                            f"{key}_cfg{options['guidance_scale']:g}", **options))
        w = chosen["options"]["guidance_scale"]
        baseline, method, equal_evaluations, accuracy = [], [], [], {"baseline": [], "method": [], "equal_nfe": []}
        double = 2 * p.heun_steps  # 2·(2N) − 1 evaluations: one more than CFG's 2·(2N − 1), the closest Heun count
        for seed in p.seeds:
            folder = self.conditional_model(seed)
            rows = {"baseline": self.fd(folder, key), "method": self.fd(folder, f"{key}_cfg{w:g}", guidance_scale=w),
                    "equal_nfe": self.fd(folder, f"heun{double}", steps=double)}
            for arm, values in (("baseline", baseline), ("method", method), ("equal_nfe", equal_evaluations)):
                values.append(rows[arm][METRIC])
                accuracy[arm].append(rows[arm].get("label_accuracy"))
        return {"name": "cfg_vs_conditional", "metric": METRIC, "baseline": baseline, "method": method,
                "seeds": p.seeds, "baseline_label": "conditional, w = 1", "method_label": f"CFG, w = {w:g}",
                "setup": f"class-conditional EDM models, {p.stf_steps} steps, label dropout {p.label_dropout}; Heun "
                         f"{2 * p.heun_steps - 1} evaluations per image (CFG: of 2 rows each), image s asks for class "
                         f"s mod 10; {p.num_images} samples; w chosen on the selection seed",
                "selection": chosen, "label_accuracy": accuracy,
                "equal_evaluations": {"baseline": equal_evaluations, "label": f"conditional, Heun "
                                      f"{2 * double - 1} evaluations (≈ CFG's {2 * (2 * p.heun_steps - 1)})",
                                      "summary": summarize(equal_evaluations, method)}}

    def posthoc_ema(self) -> Dict[str, object]:
        p, key = self.p, f"heun{self.p.heun_steps}"

        def curve(seed):
            folder = self.phema_model(seed)
            return {f"{s:g}": self.fd(self.posthoc(folder, s), key)[METRIC] for s in p.posthoc_stds}

        chosen = self.choose({f"σ_rel={s:g}": {"std": s} for s in p.posthoc_stds},
                             lambda options: {METRIC: curve(p.selection_seed)[f"{options['std']:g}"]})
        std = chosen["options"]["std"]
        baseline, method, curves = [], [], {str(p.selection_seed): curve(p.selection_seed)}
        for seed in p.seeds:
            folder = self.phema_model(seed)
            baseline.append(self.fd(folder, key)[METRIC])
            curves[str(seed)] = curve(seed)
            method.append(curves[str(seed)][f"{std:g}"])
        training_ema = {str(seed): value for seed, value in zip(p.seeds, baseline)}
        training_ema[str(p.selection_seed)] = self.fd(self.phema_model(p.selection_seed), key)[METRIC]
        comparison = {
            "name": "posthoc_ema", "metric": METRIC, "baseline": baseline, "method": method, "seeds": p.seeds,
            "baseline_label": "the run's EDM EMA", "method_label": f"post-hoc EMA, σ_rel = {std:g}",
            "setup": f"train_stf.py --loss edm, {p.stf_steps} steps, --ema_stds "
                     f"{','.join(f'{s:g}' for s in p.ema_stds)}, a snapshot every {p.ema_snapshot_steps} steps; "
                     f"Heun {2 * p.heun_steps - 1} NFE, {p.num_images} samples; σ_rel chosen on the selection seed "
                     f"among {', '.join(f'{s:g}' for s in p.posthoc_stds)}; baseline: the same runs' half-life EMA "
                     "(--ema_halflife_kimg 500, --ema_rampup_ratio 0.05)",
            "selection": chosen, "fd_by_std": curves, "training_ema_fd": training_ema}
        comparison["curves_plot"] = os.path.relpath(plot_posthoc_curves(comparison, os.path.join(
            self.results_dir, "evidence_posthoc_ema_curves.png")), ROOT)
        return comparison

    def edm2_vs_unet2d(self) -> Dict[str, object]:
        p, key = self.p, f"heun{self.p.heun_steps}"
        baseline, method = [], []
        for seed in p.seeds:
            baseline.append(self.fd(self.score_model("edm", p.stf_steps, seed), key)[METRIC])
            method.append(self.fd(self.edm2_model(seed), key)[METRIC])
        counts = {name: parameter_count(folder) for name, folder in
                  (("unet2d", self.score_model("edm", p.stf_steps, p.seeds[0])), ("edm2", self.edm2_model(p.seeds[0])))}
        return {"name": "edm2_vs_unet2d", "metric": METRIC, "baseline": baseline, "method": method, "seeds": p.seeds,
                "baseline_label": f"UNet2DModel ({counts['unet2d'] / 1e6:.3f}M)",
                "method_label": f"EDM2UNet ({counts['edm2'] / 1e6:.3f}M)",
                "setup": f"EDM loss, {p.stf_steps} steps, batch 64; UNet2DModel {counts['unet2d']:,} parameters "
                         f"{' '.join(p.model_args) or '(the default 32,64)'} at lr 1e-3 (the EDM arm of stf_vs_edm); "
                         f"EDM2UNet {counts['edm2']:,} parameters {' '.join(p.edm2_args)}; Heun "
                         f"{2 * p.heun_steps - 1} NFE, EMA, {p.num_images} samples",
                "parameters": counts}


def parameter_count(folder: str) -> int:
    """Parameters of the network of the pipeline in ``folder``."""
    from diffusers_stf.evaluation import load_pipeline

    return sum(p.numel() for p in load_pipeline(folder).unet.parameters())


def write_json(path: str, data: Dict[str, object]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".partial", path)


def git_commit() -> Optional[str]:
    """The checkout's commit, with ``-dirty`` when files differ from it (None outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty else "")


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
    runner = EvidenceRunner(args.work_dir, protocol, quiet=args.quiet)
    results_dir = runner.results_dir = args.results_dir
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
             "dg_vs_unguided": runner.dg_vs_unguided, "autoguidance_vs_unguided": runner.autoguidance_vs_unguided,
             "cfg_vs_conditional": runner.cfg_vs_conditional, "posthoc_ema": runner.posthoc_ema,
             "edm2_vs_unet2d": runner.edm2_vs_unet2d}
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
    evidence["commit"] = git_commit()
    evidence["cached"] = runner.cache_hits > 0  # true when any model or evaluation came from an earlier run
    write_json(path, evidence)
    print("\n" + render_table(evidence))
    print(f"\nwrote {path} ({evidence['seconds'] / 60:.1f} min)")
    return evidence


def combine(part_dirs, results_dir: str) -> Dict[str, object]:
    """One ``evidence.json`` from the parts of one protocol run as parallel ``--only`` processes (one per core) of the
    same commit, each with its own ``--results_dir``: the comparisons in the table's order, the plots copied beside
    it; the wall time is the longest part's, and ``cached`` is true when any part took anything from a cache."""
    import shutil

    parts = []
    for folder in part_dirs:
        with open(os.path.join(folder, "evidence.json")) as f:
            parts.append(json.load(f))
    for key in ("protocol", "commit", "quick"):
        if len({json.dumps(part.get(key), sort_keys=True) for part in parts}) != 1:
            raise ValueError(f"--combine: the parts differ in {key}; combine only parts of one protocol and commit")
    by_name = {c["name"]: c for part in parts for c in part["comparisons"]}
    evidence = {**parts[0], "comparisons": [by_name[name] for name in COMPARISONS if name in by_name],
                "seconds": max(part["seconds"] for part in parts), "cached": any(part["cached"] for part in parts),
                "parallel_parts": len(parts)}
    evidence.pop("dg_investigation", None)
    for part in parts:
        if "dg_investigation" in part:
            evidence["dg_investigation"] = part["dg_investigation"]
    os.makedirs(results_dir, exist_ok=True)
    for record in [*evidence["comparisons"], evidence.get("dg_investigation", {})]:
        for key in ("plot", "curves_plot"):
            if key in record:
                target = os.path.join(results_dir, os.path.basename(record[key]))
                shutil.copyfile(os.path.join(ROOT, record[key]), target)
                record[key] = os.path.relpath(target, ROOT)
    write_json(os.path.join(results_dir, "evidence.json"), evidence)
    print(render_table(evidence))
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
    parser.add_argument("--combine", nargs="+", default=None, metavar="PART_RESULTS_DIR",
                        help="write --results_dir's evidence.json from parallel --only parts (their --results_dir)")
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.results_dir)
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
