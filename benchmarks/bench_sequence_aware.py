"""Benchmark of the sequence-aware loss (SA-DPM), measured side by side in one run.

1. Step time (``--part timing``): one optimizer step (loss, backward, Adam) of SA-K for K = 2, 3, 4 divided by the
   DDPM simple loss at the same batch, on the 8x8 digits with the (32, 64) UNet. Target: ≤ K·1.05 (the K network
   evaluations go through one batched forward pass, so batching must not cost more than the extra evaluations).
   For reference the same loss with K separate UNet calls ("looped") is timed too. Variants are interleaved round by
   round so that load from other processes hits all of them alike.
2. Quality (``--part fd``): trains the DDPM baseline and SA-2 (λ = 1, uniform weights, as the official code) for the
   same number of steps with ``examples/train_sequence_aware.py``, samples 1000 images with DDIM at 10/20/50/100
   steps (leading spacing as the official code, no clipping) and reports the Fréchet distance of the shipped digits
   classifier's features, plus the estimation-gap plot of the two models (the paper's Figure 4).

    python benchmarks/bench_sequence_aware.py --part timing [--rounds 7 --steps 20]
    python benchmarks/bench_sequence_aware.py --part fd [--train_steps 2000] [--output_dir outputs/bench_sa]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from diffusers import UNet2DModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from diffusers_stf.digits import digits_tensor  # noqa: E402
from diffusers_stf.losses.sequence_aware import SequenceAwareLoss  # noqa: E402
from diffusers_stf.noise_schedules import betas_for_schedule  # noqa: E402

SA_LAMBDAS = {2: 1.0, 3: 0.3, 4: 0.2}  # the paper's SA-2, SA-3, SA-4


def small_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       add_attention=False, norm_num_groups=32)


class LoopedSequenceAwareLoss(SequenceAwareLoss):
    """The same loss with one UNet call per window step: the reference the batched forward pass must beat."""

    def __call__(self, unet, images, generator=None):
        B, K, T = images.shape[0], self.num_steps, self.num_train_timesteps
        start, position = self.sample_windows(B, images.device, generator)
        noise = self.draw_noise(images, generator)
        acc, simple = torch.zeros_like(images), None
        for j in range(K):
            s = (start + j).clamp(1, T)
            inside = ((start + j >= 1) & (start + j <= T)).float().reshape(-1, 1, 1, 1)
            abar = self.alphas_cumprod[s - 1].float().reshape(-1, 1, 1, 1)
            x = abar.sqrt() * images + (1 - abar).sqrt() * noise[j]
            r = (unet(x, s - 1).sample - noise[j]) * inside
            acc = acc + r
            simple = r.pow(2) if simple is None else torch.where((position == j).reshape(-1, 1, 1, 1), r.pow(2), simple)
        sa = self.window_weights(start).reshape(-1, 1, 1, 1) * (acc / K).pow(2)
        return (simple + self.sa_lambda * sa).mean()


def time_steps(unet, optimizer, loss_fn, data, steps, batch_size, generator):
    """Per-step wall time, and per-step CPU time of this thread (with 1 torch thread all the work runs here, so the
    CPU time does not change when other processes share the cores)."""
    wall, cpu = [], []
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=generator)
        t0, c0 = time.perf_counter(), time.thread_time()
        out = loss_fn(unet, data[idx], generator=generator)
        loss = out.loss.mean() if hasattr(out, "loss") else out
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    return wall, cpu


def part_timing(args):
    torch.set_num_threads(args.threads)
    data = digits_tensor("all")[0]
    betas = betas_for_schedule(1000)
    variants = {"simple (DDPM)": SequenceAwareLoss(betas, num_steps=1, sa_lambda=0.0)}
    for K in (2, 3, 4):
        variants[f"SA-{K}"] = SequenceAwareLoss(betas, num_steps=K, sa_lambda=SA_LAMBDAS[K])
        variants[f"SA-{K} looped"] = LoopedSequenceAwareLoss(betas, num_steps=K, sa_lambda=SA_LAMBDAS[K])
    models = {name: small_unet() for name in variants}
    optimizers = {name: torch.optim.Adam(models[name].parameters(), lr=1e-4) for name in variants}
    g = torch.Generator().manual_seed(0)
    for name in variants:  # warm-up
        time_steps(models[name], optimizers[name], variants[name], data, 3, args.batch_size, g)
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            w, c = time_steps(models[name], optimizers[name], variants[name], data, args.steps, args.batch_size, g)
            wall[name] += w
            cpu[name] += c
    ref = "simple (DDPM)"
    cpu_note = "CPU s of this thread (contention-free)" if args.threads == 1 else "CPU s (undercounts >1 thread)"
    print(f"\nOne optimizer step at batch {args.batch_size}, {args.threads} torch thread(s), "
          f"{args.rounds}x{args.steps} steps per variant, load average {os.getloadavg()[0]:.1f} "
          f"(wall times are noisy when other jobs run; ratios use the {cpu_note} median)\n")
    print("| loss | K | wall ms median | wall ms p10 | CPU ms median | ratio to simple | target |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for name in variants:
        K = variants[name].num_steps if variants[name].sa_lambda > 0 else 1
        med, cmed = statistics.median(wall[name]), statistics.median(cpu[name])
        p10 = sorted(wall[name])[len(wall[name]) // 10]
        ratio = cmed / statistics.median(cpu[ref]) if args.threads == 1 else med / statistics.median(wall[ref])
        target = f"≤ {1.05 * K:.2f}" if name.startswith("SA") and "looped" not in name else "–"
        ok = "" if target == "–" else (" ✓" if ratio <= 1.05 * K else " ✗")
        print(f"| {name} | {K} | {med * 1e3:.1f} | {p10 * 1e3:.1f} | {cmed * 1e3:.1f} | {ratio:.2f} | {target}{ok} |")
        results[name] = {"K": K, "wall_median_s": med, "wall_p10_s": p10, "cpu_median_s": cmed, "ratio": ratio}
    return results


def part_fd(args):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_sequence_aware
    from results_tools import SamplerSpec, evaluate_pipeline, markdown_table, plot_metric_vs_nfe, real_data_rows

    from diffusers import DiffusionPipeline

    from diffusers_stf.evaluation.estimation_gap import estimation_gap, plot_estimation_gaps

    torch.set_num_threads(args.threads)
    runs = {"DDPM baseline": ["--sa_lambda", "0"], "SA-2 (λ=1)": ["--sa_k", "2", "--sa_lambda", "1"]}
    rows, folders, seconds = [], {}, {}
    for label, options in runs.items():
        folder = os.path.join(args.output_dir, label.split()[0].lower().replace("-", ""))
        folders[label] = folder
        if not os.path.isfile(os.path.join(folder, "model_index.json")) or args.retrain:
            t0 = time.perf_counter()
            train_sequence_aware.main([
                "--output_dir", folder, "--max_train_steps", str(args.train_steps), "--digits_split", "train",
                "--block_out_channels", "32,64", "--layers_per_block", "1", "--train_batch_size", "64",
                "--learning_rate", "1e-3", "--checkpointing_steps", "0", "--validation_steps", "0",
                "--seed", str(args.seed), "--no_progress_bar", *options,
            ])
            seconds[label] = time.perf_counter() - t0
        spec = SamplerSpec(label, "DDIMScheduler", steps=args.ddim_steps, overrides={"clip_sample": False})
        rows += evaluate_pipeline(folder, [spec], num_images=args.num_images)
    floor = real_data_rows()[0]
    os.makedirs(args.output_dir, exist_ok=True)
    plot_metric_vs_nfe(rows, os.path.join(args.output_dir, "fd_vs_ddim_steps.png"), floor=floor,
                       title=f"DDIM on digits, {args.train_steps} training steps each")
    gaps = {}
    x0 = digits_tensor("heldout")[0][:args.gap_images]
    for label, folder in folders.items():
        pipe = DiffusionPipeline.from_pretrained(folder)
        gaps[label] = estimation_gap(pipe.unet, pipe.scheduler, x0, start_timestep=args.gap_start,
                                     generator=torch.Generator().manual_seed(0), clip_sample=False)
    plot_estimation_gaps(gaps, os.path.join(args.output_dir, "estimation_gap.png"),
                         title=f"Estimation gap from t={args.gap_start + 1}, DDPM (η=1), {len(x0)} held-out digits")
    print("\n" + markdown_table(rows + [floor]))
    for label in gaps:
        print(f"{label}: training {seconds.get(label, float('nan')):.0f} s, final estimation gap "
              f"‖x̂_0 − x_0‖ = {float(gaps[label].gap_norm[-1]):.3f}")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"rows": rows, "floor": floor, "train_seconds": seconds,
                   "gap_final": {k: float(v.gap_norm[-1]) for k, v in gaps.items()}}, f, indent=1, default=str)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--part", choices=("timing", "fd", "all"), default="timing")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; with 1 the ratios use per-thread CPU time, robust to other jobs")
    parser.add_argument("--train_steps", type=int, default=2000)
    parser.add_argument("--ddim_steps", type=lambda s: [int(v) for v in s.split(",")], default=[10, 20, 50, 100])
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--gap_images", type=int, default=64, help="held-out images of the estimation-gap plot")
    parser.add_argument("--gap_start", type=int, default=299,
                        help="0-based start index of the gap chains (from x_T the gap mostly measures how little x_T "
                             "says about x_0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--output_dir", default="outputs/bench_sequence_aware")
    args = parser.parse_args(argv)
    if args.part in ("timing", "all"):
        part_timing(args)
    if args.part in ("fd", "all"):
        part_fd(args)


if __name__ == "__main__":
    main()
