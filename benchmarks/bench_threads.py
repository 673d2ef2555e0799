#!/usr/bin/env python
"""How many CPU threads ``make demo`` should train with: it/s of the demo's training step with 1 and 2 torch threads
and OpenMP's two wait policies, on a quiet machine and next to a competing busy process, measured side by side.

The step is ``examples/train_stf.py``'s with its defaults on the embedded 8x8 digits: UNet2DModel (32, 64), a batch of
64, the Stable Target Field loss over R = 1024 references (EDM preconditioning, σ draws, sum over C·H·W), backward,
AdamW and the EMA update. Each configuration runs in its own process, because the OpenMP runtime reads
``OMP_NUM_THREADS`` and ``OMP_WAIT_POLICY`` once, when torch is imported: ``ACTIVE`` makes a waiting thread spin at
every parallel region's barrier, ``PASSIVE`` makes it sleep; unset is libgomp's default (spin for a while, then
sleep); ``GOMP_SPINCOUNT=N`` keeps the default policy but spins only N times before sleeping. "busy" starts one competing process that spins on one core for the duration (another job on the machine);
``--competitors 2`` occupies both cores of a 2-core machine. The configurations are interleaved over ``--rounds``
rounds so that a change in the machine's other load hits them alike; the median it/s of each is printed.

    python benchmarks/bench_threads.py                      # ~8 min on 2 cores (docs/results.md's table)
    python benchmarks/bench_threads.py --rounds 1 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from diffusers_stf.digits import digits_tensor
from diffusers_stf.losses import StableTargetFieldLoss, make_denoising_loss
from diffusers_stf.training import HalfLifeEMA, UNetConfig, make_unet

seconds, max_steps = float(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
images = digits_tensor("train")[0]
unet = make_unet(UNetConfig(), 8, 1)
base = make_denoising_loss("edm")
loss = StableTargetFieldLoss(base, 1024)
optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
ema = HalfLifeEMA(unet)
generator = torch.Generator().manual_seed(0)
stamps = []
for step in range(max_steps):
    order = torch.randperm(len(images), generator=generator)
    batch, refs = images[order[:64]], images[order[64:1024]]
    out = loss(base.denoiser(unet), batch, refs, generator=generator)
    out.loss.mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema.update(unet, step * 64, 64, step)
    stamps.append(time.perf_counter())
    if stamps[-1] - stamps[0] > seconds and len(stamps) >= 4:
        break
steps = len(stamps) - 2  # the first two steps warm up the allocator and the OpenMP pool
print(json.dumps({"its": steps / (stamps[-1] - stamps[1]), "steps": steps, "threads": torch.get_num_threads()}))
"""

SPIN = "while True:\n    pass\n"


def measure(threads: int, policy: str, seconds: float, max_steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["OMP_NUM_THREADS"] = str(threads)
    if policy.startswith("GOMP_SPINCOUNT="):
        env["GOMP_SPINCOUNT"] = policy.split("=", 1)[1]
    elif policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CHILD, ROOT, str(seconds), str(max_steps)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per configuration and round")
    parser.add_argument("--max_steps", type=int, default=60)
    parser.add_argument("--competitors", type=int, default=1, help="spinning processes of the busy case")
    parser.add_argument("--threads", type=str, default="1,2")
    parser.add_argument("--policies", type=str, default="default,PASSIVE,GOMP_SPINCOUNT=1000",
                        help="comma-separated: default, PASSIVE, ACTIVE, GOMP_SPINCOUNT=N")
    parser.add_argument("--output_json", type=str, default=None)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a kill still stops the competing processes (finally)
    threads = [int(t) for t in args.threads.split(",")]
    policies = args.policies.split(",")
    configs = [(load, t, p) for load in ("quiet", "busy") for t in threads for p in policies
               if not (t == 1 and p != "default")]  # one thread never waits at a barrier
    results = {c: [] for c in configs}
    for r in range(args.rounds):
        for load in ("quiet", "busy"):
            spinners = []
            if load == "busy":
                spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(args.competitors)]
                time.sleep(1.0)
            try:
                for config in [c for c in configs if c[0] == load]:
                    row = measure(config[1], config[2], args.seconds, args.max_steps)
                    row["loadavg"] = os.getloadavg()[0]
                    results[config].append(row)
                    print(f"round {r + 1}: {load:5s} threads {config[1]} {config[2]:22s} "
                          f"{row['its']:.2f} it/s ({row['steps']} steps, load {row['loadavg']:.1f})", flush=True)
            finally:
                for spinner in spinners:
                    spinner.kill()
                    spinner.wait()
    print(f"\nmedian it/s over {args.rounds} rounds (the demo's step: UNet (32, 64), batch 64, STF R = 1024), "
          f"busy = {args.competitors} competing spinning process(es), {os.cpu_count()} cores")
    print(f"{'threads':>7}  {'wait policy':22}  {'quiet':>7}  {'busy':>7}  busy/quiet")
    table = {}
    for t in threads:
        for p in policies:
            if t == 1 and p != "default":
                continue
            quiet = statistics.median(row["its"] for row in results[("quiet", t, p)])
            busy = statistics.median(row["its"] for row in results[("busy", t, p)])
            table[f"{t}/{p}"] = {"quiet": quiet, "busy": busy}
            print(f"{t:>7}  {p:22}  {quiet:7.2f}  {busy:7.2f}  {busy / quiet:.2f}")
    one = table["1/default"]
    for key, row in table.items():
        if key != "1/default":
            print(f"ratio {key} vs 1 thread: quiet {row['quiet'] / one['quiet']:.2f}x, busy {row['busy'] / one['busy']:.2f}x")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"table": table, "rounds": {" ".join(map(str, k)): v for k, v in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
