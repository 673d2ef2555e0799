"""Benchmark of Discriminator Guidance (Kim et al., ICML 2023) on the embedded 8x8 digits, measured side by side.

1. Cost: 18-step Heun sampling (35 NFE) with guidance on the Euler evaluations only (w1 = 2, DG's default) and on both
   evaluations (w1 = 2, w2 = 1), divided by unguided sampling at the same NFE, with the trained (default-architecture)
   discriminator. Interleaved repeats, one thread; CPU time of the sampling thread and wall time (target <= 1.5).
2. Quality: Fréchet distance (digits-classifier features), precision/recall, confidence and class entropy of 1000
   samples, unguided vs. guided, same seeds for every row (diffusers_stf.evaluation).

The score model: ``--pipeline`` or the first EDM pipeline folder found under ``outputs/`` (e.g. the one
``examples/train_stf.py`` writes); if there is none, one is trained here with ``examples/train_stf.py --loss edm``.
The discriminator is trained here with ``examples/train_discriminator.py`` (reused on reruns).

3. Classifier-free guidance and autoguidance cost (``--part cfg_autoguidance``, :mod:`bench_cfg_autoguidance`): one
   batched CFG step against a conditional step (target <= 2.1), and an autoguided step against the main and the
   guide network's forwards (target <= 1.1), on digits-size networks that need no training.

    python benchmarks/bench_guidance.py [--pipeline outputs/train_stf] [--disc_steps 2000]
                                        [--part all|timing|quality|cfg_autoguidance]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diffusers_stf import DiscriminatorGuidedPipeline  # noqa: E402


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_score_pipeline(args) -> str:
    if args.pipeline:
        return args.pipeline
    outputs = os.path.join(ROOT, "outputs")
    for name in sorted(os.listdir(outputs)) if os.path.isdir(outputs) else []:
        folder = os.path.join(outputs, name)
        index = os.path.join(folder, "model_index.json")
        class_name = json.load(open(index)).get("_class_name") if os.path.isfile(index) else None
        if (class_name[-1] if isinstance(class_name, list) else class_name) == "EDMPipeline":
            unet = json.load(open(os.path.join(folder, "unet", "config.json")))
            if unet.get("sample_size") == 8 and unet.get("in_channels") == 1:
                print(f"score model: {folder}")
                return folder
    folder = os.path.join(args.work_dir, "edm")
    if args.retrain or not os.path.isfile(os.path.join(folder, "model_index.json")):
        print(f"training an EDM digits pipeline ({args.score_steps} steps) in {folder}")
        load_example("train_stf").main(["--loss", "edm", "--max_train_steps", str(args.score_steps), "--output_dir", folder,
                                        "--validation_steps", "0", "--checkpointing_steps", "0", "--report_to", "none",
                                        "--overwrite_output_dir"])
    return folder


def train_with_example(args, example: str, what: str, subfolder: str, base_folder: str, steps: int, extra=()) -> str:
    """The pipeline folder ``work_dir/subfolder``: trained by ``examples/<example>.py`` on top of ``base_folder`` for
    ``steps`` steps, or reused when it exists and ``--retrain`` is not given."""
    folder = os.path.join(args.work_dir, subfolder)
    if os.path.isfile(os.path.join(folder, "model_index.json")) and not args.retrain:
        print(f"{what}: reusing {folder} (--retrain to train it again)")
        return folder
    load_example(example).main([
        "--pretrained_model_name_or_path", base_folder, "--output_dir", folder, "--max_train_steps", str(steps),
        "--validation_steps", str(max(steps // 4, 1)), "--checkpointing_steps", "0", "--report_to", "none",
        "--overwrite_output_dir", *extra,
    ])
    return folder


def train_discriminator(args, score_folder: str) -> str:
    return train_with_example(
        args, "train_discriminator", "discriminator", "dg", score_folder, args.disc_steps, ("--loss", args.loss)
    )


def add_model_args(parser: argparse.ArgumentParser, work_dir_name: str):
    """The options that say where the score model and the discriminator come from (trained here, or reused)."""
    parser.add_argument("--pipeline", type=str, default=None, help="EDM pipeline folder of the score model")
    parser.add_argument("--work_dir", type=str, default=os.path.join(ROOT, "outputs", work_dir_name))
    parser.add_argument("--score_steps", type=int, default=3000, help="steps of the score model trained when none exists")
    parser.add_argument("--disc_steps", type=int, default=2000)
    parser.add_argument("--loss", type=str, default="bce", choices=("bce", "lsif", "ukl"), help="discriminator loss")
    parser.add_argument("--retrain", action="store_true", help="train the guidance models again")


def timing(pipe, args):
    """Interleaved repeats of the three configurations at equal NFE; per config the best and median times."""
    configs = {"unguided": dict(dg_weight_1st_order=0.0),
               "DG w1=2 (Euler evaluations)": dict(dg_weight_1st_order=2.0),
               "DG w1=2, w2=1 (both evaluations)": dict(dg_weight_1st_order=2.0, dg_weight_2nd_order=1.0)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of the sampling thread is then the whole cost
    cpu = {k: [] for k in configs}
    wall = {k: [] for k in configs}
    calls = {}
    latents = torch.randn(args.timing_batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(args.repeats):
        for name, kwargs in configs.items():
            counter = [0]
            handle = pipe.discriminator.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
            t_cpu, t_wall = time.thread_time(), time.perf_counter()
            pipe(batch_size=args.timing_batch, num_inference_steps=18, latents=latents, output_type="pt", **kwargs)
            cpu[name].append(time.thread_time() - t_cpu)
            wall[name].append(time.perf_counter() - t_wall)
            handle.remove()
            calls[name] = counter[0]
    torch.set_num_threads(threads)
    rows = []
    base = {"cpu": min(cpu["unguided"]), "wall": statistics.median(wall["unguided"])}
    for name in configs:
        rows.append({"config": name, "discriminator_calls": calls[name], "cpu_s_best": min(cpu[name]),
                     "wall_s_median": statistics.median(wall[name]), "ratio_cpu": min(cpu[name]) / base["cpu"],
                     "ratio_wall": statistics.median(wall[name]) / base["wall"]})
    return rows


QUALITY_COLUMNS = (("label", "sampler", "{}"), ("fd_train", "FD vs train ↓", "{}"), ("fd_heldout", "FD vs held-out ↓", "{}"),
                   ("precision_train", "precision ↑", "{}"), ("recall_train", "recall ↑", "{}"),
                   ("confidence", "conf ↑", "{}"), ("class_entropy", "H (max 2.303)", "{}"))


def summarize(runs):
    """One row per sampler label: 'mean ± sd' over the seed sets of every metric."""
    rows = []
    for label in dict.fromkeys(r["label"] for r in runs):
        group = [r for r in runs if r["label"] == label]
        row = {"label": label}
        for key, _, _ in QUALITY_COLUMNS[1:]:
            values = [r[key] for r in group if key in r]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                digits = 2 if key.startswith("fd") else 3
                row[key] = f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_model_args(parser, "bench_guidance")
    parser.add_argument("--part", type=str, default="all", choices=("all", "timing", "quality", "cfg_autoguidance"))
    parser.add_argument("--timing_batch", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--weights", type=str, default="1,2", help="w1 values of the quality sweep")
    parser.add_argument("--seeds", type=str, default="0,1000,2000",
                        help="first seeds of the sample sets (each row: mean ± sd over these sets)")
    parser.add_argument("--tag", type=str, default="", help="suffix of the result file names")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the models are tiny; 1 is fastest on a shared machine)")
    parser.add_argument("--results_dir", type=str, default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part in ("all", "cfg_autoguidance"):
        import bench_cfg_autoguidance

        results = os.path.join(args.results_dir, f"bench_cfg_autoguidance{args.tag}.json")
        bench_cfg_autoguidance.main(["--results", results])
        if args.part == "cfg_autoguidance":
            return

    score = find_score_pipeline(args)
    dg_folder = train_discriminator(args, score)
    pipe = DiscriminatorGuidedPipeline.from_pretrained(dg_folder)
    pipe.set_progress_bar_config(disable=True)
    disc_params = sum(p.numel() for p in pipe.discriminator.parameters())
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    print(f"score UNet {unet_params / 1e6:.3f}M parameters, discriminator {disc_params / 1e6:.3f}M parameters")
    results = {"score_model": score, "discriminator": dg_folder, "unet_parameters": unet_params,
               "discriminator_parameters": disc_params}
    os.makedirs(args.results_dir, exist_ok=True)

    if args.part in ("all", "timing"):
        rows = timing(pipe, args)
        results["timing"] = rows
        print(f"\nSampling cost, batch {args.timing_batch}, 18 Heun steps = 35 NFE, 1 thread, {args.repeats} interleaved repeats")
        print("| configuration | discriminator calls | CPU s (best) | ratio | wall s (median) | ratio |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['config']} | {r['discriminator_calls']} | {r['cpu_s_best']:.2f} | {r['ratio_cpu']:.2f} | "
                  f"{r['wall_s_median']:.2f} | {r['ratio_wall']:.2f} |")
        print("(target: ratio <= 1.5 for the default discriminator)")

    if args.part in ("all", "quality"):
        from results_tools import SamplerSpec, evaluate_pipeline, markdown_table, real_data_rows

        from diffusers_stf.evaluation import generate_images, save_image_grid

        weights = [float(w) for w in args.weights.split(",") if w]
        specs = [SamplerSpec("unguided", None, [18], pipeline_kwargs={"dg_weight_1st_order": 0.0})]
        specs += [SamplerSpec(f"DG w1={w:g}", None, [18], pipeline_kwargs={"dg_weight_1st_order": w}) for w in weights]
        specs += [SamplerSpec("DG w1=2, boosting", None, [18], pipeline_kwargs={"dg_weight_1st_order": 2.0, "boosting": True})]
        seeds = [int(s) for s in args.seeds.split(",") if s]
        runs = [row for seed in seeds for row in evaluate_pipeline(pipe, specs, num_images=args.num_images, seed=seed)]
        rows = summarize(real_data_rows()) + summarize(runs)
        results["quality_runs"], results["quality"] = runs, rows
        table = markdown_table(rows, QUALITY_COLUMNS)
        print(f"\nQuality, {args.num_images} samples per row, mean ± sd over sample seeds {seeds}\n{table}")
        grids = []
        for name, w in (("unguided", 0.0), ("guided", 2.0)):  # the same 100 seeds
            images = generate_images(pipe, 100, 18, seed=0, progress=False, dg_weight_1st_order=w)["images"]
            grids.append(os.path.join(args.results_dir, f"guidance_grid{args.tag}_{name}.png"))
            save_image_grid(images, grids[-1], nrow=10, scale=4)
        results["grids"] = grids
    path = os.path.join(args.results_dir, f"bench_guidance{args.tag}.json")
    if os.path.isfile(path):  # keep the other part of an earlier run
        with open(path) as f:
            results = {**json.load(f), **results}
    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"\nresults: {os.path.join(args.results_dir, f'bench_guidance{args.tag}.json')}")


if __name__ == "__main__":
    main()
