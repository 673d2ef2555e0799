#!/usr/bin/env python
"""Cost and effect of the Stable Target Field loss, measured side by side in one run.

1. **Step time**: a full training step (reference draw + target + forward/backward/AdamW) of examples/train_stf.py's
   default model on the 8x8 digits, STF with R = 256, 1024, 4096 over the plain EDM loss (target: <= 1.10 at R=1024).
   The configurations are interleaved round-robin and timed in thread CPU time with one thread, so that other jobs on
   the machine slow them alike.
2. **Memory**: peak extra memory of ``stable_target_field`` at B=64, D=3072 (CIFAR size), R = 1024 and 4096, in a fresh
   process (peak RSS reset through /proc/self/clear_refs), next to the B x R x D float32 tensor a broadcast
   implementation allocates (target: well under 100 MB at R=4096).
3. **Quality** (``--quality_steps N``, off with 0): train EDM and STF for the same number of steps with the script's
   defaults on the 797-image digits train split, sample 1000 images with the EMA weights (Heun, 35 NFE) and score them
   with the digits metric of diffusers_stf.evaluation (Fréchet distance of classifier features to the train and
   held-out splits; lower is better, real held-out images score about 2).

    python benchmarks/bench_stf.py                       # all three parts (quality: 1400 steps per run)
    python benchmarks/bench_stf.py --quality_steps 0     # cost only, about a minute
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_train_stf():
    spec = importlib.util.spec_from_file_location("train_stf", os.path.join(ROOT, "examples", "train_stf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- 1. step time ----------------------------------------------------------------------------------------------------

def step_times(references=(256, 1024, 4096), rounds=30, warmup=3, batch_size=64):
    import torch

    from diffusers_stf.losses import EDMLoss, StableTargetFieldLoss
    from diffusers_stf.training import (
        BatchSchedule, load_training_images, make_unet, parse_training_args, step_generator,
    )

    torch.set_num_threads(1)
    train_stf = load_train_stf()
    _, config = parse_training_args(train_stf.build_parser(), ["--output_dir", tempfile.mkdtemp()])
    data = load_training_images(config.data, config.training.seed)
    schedule = BatchSchedule(len(data), batch_size, seed=0)
    edm = EDMLoss()
    configs = {"edm": None, **{f"stf R={r}": StableTargetFieldLoss(edm, r) for r in references}}
    models = {}
    for name in configs:
        torch.manual_seed(0)
        unet = make_unet(config.unet, data.resolution, data.channels)
        models[name] = (unet, torch.optim.AdamW(unet.parameters(), lr=1e-4))

    def step(name, i):
        unet, opt = models[name]
        loss = configs[name]
        g = step_generator(0, i, 0)
        batch = data.batch(schedule.indices(i), g)
        images = batch["images"]
        sigma = edm.sample_sigma(len(images), g)
        if loss is None:
            value = edm(edm.denoiser(unet), images, sigma=sigma, generator=g).loss.mean()
        else:
            refs = data.random_batch(loss.num_extra_references(len(images)), g, exclude=batch["index"])["images"]
            value = loss(edm.denoiser(unet), images, refs, sigma=sigma, generator=g).loss.mean()
        value.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    cpu = {name: [] for name in configs}
    wall = {name: [] for name in configs}
    for r in range(warmup + rounds):
        for name in configs:
            c0, w0 = time.thread_time(), time.perf_counter()
            step(name, r)
            if r >= warmup:
                cpu[name].append(time.thread_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    # The target computation alone, at the same sizes.
    from diffusers_stf.losses import stable_target_field

    g = step_generator(1, 0, 0)
    images = data.batch(schedule.indices(0), g)["images"]
    target_ms = {}
    for r in references:
        refs = torch.cat([images, data.random_batch(r - batch_size, g)["images"]])
        sigma = edm.sample_sigma(batch_size, g)
        noisy = images + sigma[:, None, None, None] * torch.randn(images.shape, generator=g)
        times = []
        for _ in range(10):
            c0 = time.thread_time()
            stable_target_field(noisy, sigma, refs)
            times.append(time.thread_time() - c0)
        target_ms[r] = 1000 * statistics.median(times)
    return cpu, wall, target_ms, sum(p.numel() for p in models["edm"][0].parameters())


# --- 2. memory -------------------------------------------------------------------------------------------------------

MEMORY_CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from diffusers_stf.losses import stable_target_field

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

B, R, D, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(0)
refs = torch.rand(R, D, generator=g) * 2 - 1
x = refs[:B] + 0.5 * torch.randn(B, D, generator=g)
sigma = torch.full((B,), 0.5)
if mode == "broadcast":  # the B x R x D difference tensor of a direct implementation (what STF's code allocates)
    def run():
        diff = x[:, None, :] - refs[None]
        w = torch.softmax(-(diff ** 2).sum(-1) / (2 * sigma[:, None] ** 2), 1)
        return w @ refs
else:
    def run():
        return stable_target_field(x, sigma, refs)
run()  # warm up allocator paths
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = rss("VmRSS:")
out = run()
peak = rss("VmHWM:")
print(json.dumps({"extra_bytes": peak - before}))
"""


def peak_extra_memory(b, r, d, mode):
    # A fixed mmap threshold makes glibc return every large block on free, so RSS follows the live tensors.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(b), str(r), str(d), mode], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"]


# --- 3. quality ------------------------------------------------------------------------------------------------------

def quality(steps, seeds, num_images=1000, reference_batch_size=1024):
    import torch

    from diffusers_stf import EDMPipeline
    from diffusers_stf.evaluation import evaluate_images

    train_stf = load_train_stf()
    results = {}
    for loss in ("edm", "stf"):
        for seed in seeds:
            out = tempfile.mkdtemp(prefix=f"bench_stf_{loss}_")
            start = time.time()
            train_stf.main(["--output_dir", out, "--loss", loss, "--seed", str(seed), "--digits_split", "train",
                            "--max_train_steps", str(steps), "--checkpointing_steps", "0", "--validation_steps", "0",
                            "--num_validation_images", "100", "--stf_reference_batch_size", str(reference_batch_size),
                            "--logging_steps", "100", "--no_progress_bar"])
            train_seconds = time.time() - start
            pipe = EDMPipeline.from_pretrained(out)
            pipe.set_progress_bar_config(disable=True)
            images = []
            for b in range(0, num_images, 250):
                g = torch.Generator().manual_seed(10_000 + b)
                images.append(pipe(batch_size=min(250, num_images - b), num_inference_steps=18, generator=g,
                                   output_type="pt").images * 2 - 1)
            scores = evaluate_images(torch.cat(images), references=("digits:train", "digits:heldout"))
            results.setdefault(loss, []).append({
                "seed": seed, "train_seconds": train_seconds, "fd_train": scores["fd"]["digits:train"],
                "fd_heldout": scores["fd"]["digits:heldout"], "confidence": scores.get("confidence"),
                "class_entropy": scores.get("class_entropy"), "samples": os.path.join(out, "samples.png")})
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=30, help="timed steps per configuration")
    parser.add_argument("--quality_steps", type=int, default=1400, help="training steps per quality run; 0 skips it")
    parser.add_argument("--quality_seeds", type=str, default="0", help="comma-separated training seeds")
    parser.add_argument("--skip_memory", action="store_true")
    args = parser.parse_args(argv)

    print("== 1. training-step time, default model, B=64 on the 8x8 digits (thread CPU time, 1 thread) ==")
    cpu, wall, target_ms, params = step_times(rounds=args.rounds)
    base = statistics.median(cpu["edm"])
    print(f"model parameters: {params}")
    print(f"{'loss':<14}{'median ms':>10}{'ratio':>8}{'wall median ms':>16}")
    for name in cpu:
        med = statistics.median(cpu[name])
        print(f"{name:<14}{1000 * med:>10.1f}{med / base:>8.3f}{1000 * statistics.median(wall[name]):>16.1f}")
    print("target computation alone (ms): " + ", ".join(f"R={r}: {t:.2f}" for r, t in target_ms.items()))

    if not args.skip_memory:
        print("\n== 2. peak extra memory of the target computation, B=64, D=3072 (fresh process) ==")
        for r in (1024, 4096):
            ours = peak_extra_memory(64, r, 3072, "chunked")
            naive_bytes = 64 * r * 3072 * 4
            print(f"R={r}: stable_target_field {ours / 2**20:.1f} MiB; one B x R x D float32 tensor "
                  f"{naive_bytes / 2**20:.0f} MiB (ratio {naive_bytes / max(ours, 1):.0f}x)")
        measured = peak_extra_memory(64, 256, 3072, "broadcast")
        print(f"R=256 measured broadcast implementation: {measured / 2**20:.1f} MiB vs "
              f"stable_target_field {peak_extra_memory(64, 256, 3072, 'chunked') / 2**20:.1f} MiB")

    if args.quality_steps:
        seeds = [int(s) for s in args.quality_seeds.split(",")]
        print(f"\n== 3. quality at equal steps ({args.quality_steps} steps, digits train split, 1000 EMA samples, "
              f"35 NFE; Fréchet distance of digits-classifier features, lower is better) ==")
        results = quality(args.quality_steps, seeds)
        for loss, runs in results.items():
            for run in runs:
                print(f"{loss:<4} seed {run['seed']}: FD train {run['fd_train']:.2f}  FD held-out "
                      f"{run['fd_heldout']:.2f}  conf {run['confidence']:.3f}  entropy {run['class_entropy']:.3f}  "
                      f"train {run['train_seconds'] / 60:.1f} min  grid {run['samples']}")
        for key in ("fd_train", "fd_heldout"):
            e = statistics.mean(r[key] for r in results["edm"])
            s = statistics.mean(r[key] for r in results["stf"])
            print(f"mean {key}: edm {e:.2f}, stf {s:.2f}, stf/edm {s / e:.3f}")


if __name__ == "__main__":
    main()
