"""Benchmark of the EDM schedulers, measured side by side in one run.

1. Overhead: 18-step Heun sampling (35 NFE) of a small UNet2DModel through ``EDMHeunScheduler`` in the standard
   diffusers loop, divided by the same sampler written as a bare loop (target <= 1.05).
2. Accuracy: the error against the exact probability-flow ODE solution for Gaussian data, Euler vs Heun, at
   9/17/35/79 NFE.

    python benchmarks/bench_samplers.py [--repeats 7] [--batch_size 64]
"""

import argparse
import math
import statistics
import time

import torch
from diffusers import UNet2DModel

from diffusers_stf import EDMHeunScheduler, EDMPreconditioning


def scheduler_loop(unet, latents, steps):
    s = EDMHeunScheduler()
    s.set_timesteps(steps)
    x = latents * s.init_noise_sigma
    for t in s.timesteps:
        F = unet(s.scale_model_input(x, t).float(), t.expand(x.shape[0])).sample
        x = s.step(F, t, x).prev_sample
    return x


def bare_loop(unet, latents, steps, p=EDMPreconditioning()):
    """EDM Algorithm 1 written directly over the network, float64 state, no scheduler."""
    i = torch.arange(steps, dtype=torch.float64)
    r = 1 / 7
    t = torch.cat([(80**r + i / (steps - 1) * (0.002**r - 80**r)) ** 7, torch.zeros(1, dtype=torch.float64)])

    def D(x, sigma):
        c_skip, c_out, c_in, c_noise = p.scalings(sigma)
        F = unet((c_in * x).float(), c_noise.float().expand(x.shape[0])).sample
        return c_skip * x + c_out * F.double()

    x = latents * t[0]
    for k in range(steps):
        d = (x - D(x, t[k])) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if t[k + 1] > 0:
            x_next = x + (t[k + 1] - t[k]) * (d + (x_next - D(x_next, t[k + 1])) / t[k + 1]) / 2
        x = x_next
    return x


def overhead(batch_size, repeats):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False, norm_num_groups=16,
    ).eval()
    latents = torch.randn(batch_size, 1, 8, 8, dtype=torch.float64)
    times = {"scheduler": [], "bare": []}
    with torch.no_grad():
        a, b = scheduler_loop(unet, latents, 18), bare_loop(unet, latents, 18)
        print(f"max |scheduler - bare| = {float((a - b).abs().max()):.2e}")
        for _ in range(repeats):  # interleaved so that machine noise hits both alike
            for name, fn in (("scheduler", scheduler_loop), ("bare", bare_loop)):
                t0 = time.perf_counter()
                fn(unet, latents, 18)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(f"18 steps (35 NFE), batch {batch_size}, {repeats} interleaved repeats")
    print(f"  scheduler loop: median {med['scheduler']*1e3:.1f} ms, best {best['scheduler']*1e3:.1f} ms")
    print(f"  bare loop:      median {med['bare']*1e3:.1f} ms, best {best['bare']*1e3:.1f} ms")
    print(f"  ratio scheduler/bare: median {med['scheduler']/med['bare']:.3f}, best {best['scheduler']/best['bare']:.3f}"
          "   (target <= 1.05)")


def accuracy():
    mu, s = 0.3, 0.5
    x0 = torch.linspace(-3, 3, 64, dtype=torch.float64).reshape(4, 1, 4, 4) * 80.0
    exact = mu + (x0 - mu) * s / math.sqrt(s**2 + 80.0**2)
    p = EDMPreconditioning()

    def network(x_in, t):
        sigma = torch.exp(4 * t.double())
        x = x_in / p.c_in(sigma)
        return ((s**2 * x + sigma**2 * mu) / (s**2 + sigma**2) - p.c_skip(sigma) * x) / p.c_out(sigma)

    def heun(nfe):
        sched = EDMHeunScheduler()
        sched.set_timesteps((nfe + 1) // 2)
        x = x0.clone()
        for t in sched.timesteps:
            x = sched.step(network(sched.scale_model_input(x, t), t), t, x).prev_sample
        return float((x - exact).abs().max())

    def euler(nfe):
        sched = EDMHeunScheduler()
        sched.set_timesteps(nfe)
        sig, x = sched.sigmas, x0.clone()
        for k in range(nfe):
            D = (s**2 * x + sig[k] ** 2 * mu) / (s**2 + sig[k] ** 2)
            x = x + (sig[k + 1] - sig[k]) * (x - D) / sig[k]
        return float((x - exact).abs().max())

    print("\nmax |x - exact ODE solution| for Gaussian data N(0.3, 0.5²), x_0 in ±3·80, ρ = 7 grid")
    print(f"  {'NFE':>4} {'Euler':>10} {'Heun':>10} {'Euler/Heun':>11} {'Heun order':>11}")
    prev = None
    for nfe in (9, 17, 35, 79):
        e, h = euler(nfe), heun(nfe)
        order = "" if prev is None else f"{math.log(prev[1] / h) / math.log(((nfe + 1) // 2) / ((prev[0] + 1) // 2)):.2f}"
        print(f"  {nfe:>4} {e:>10.4g} {h:>10.4g} {e / h:>11.2f} {order:>11}")
        prev = (nfe, h)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch_size", type=int, default=64)
    args = ap.parse_args()
    overhead(args.batch_size, args.repeats)
    accuracy()
