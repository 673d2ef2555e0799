"""Cost of classifier-free guidance and autoguidance, measured side by side (1 thread, CPU time of the sampling thread,
interleaved repeats, best of each).

* CFG: 18 Heun steps (35 NFE) of a class-conditional UNet (the digits demo's size) with ``guidance_scale=2`` against
  the same sampling at ``guidance_scale=1`` (plain conditional, one evaluation per step), same batch. The conditional
  and unconditional rows run as one batched forward, so the ratio should stay below 2.1.
* Autoguidance: ``autoguidance_scale=2`` with a half-width guide, against sampling the main network alone plus
  sampling the guide alone (the two networks' forward passes); target ratio <= 1.1.

Timing needs no trained weights: the networks are random.

    python benchmarks/bench_cfg_autoguidance.py [--batch 250] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from diffusers import UNet2DModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffusers_stf import EDMHeunScheduler, EDMPipeline  # noqa: E402


def digits_unet(channels, num_class_embeds=None, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=channels, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       add_attention=False, norm_num_groups=min(32, channels[0]), num_class_embeds=num_class_embeds)


def best_cpu_seconds(runs, repeats):
    """{name: best thread CPU time} over interleaved repeats of the callables in ``runs``."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.thread_time()
            run()
            times[name].append(time.thread_time() - start)
    return {name: min(values) for name, values in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "bench_cfg_autoguidance.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    latents = torch.randn(args.batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(args.batch) % 10

    conditional = EDMPipeline(digits_unet((32, 64), num_class_embeds=11), EDMHeunScheduler(), null_class_label=10)
    main_net, guide_net = digits_unet((32, 64), seed=1), digits_unet((16, 32), seed=2)
    autoguided = EDMPipeline(main_net, EDMHeunScheduler(), guide_unet=guide_net)
    guide_alone = EDMPipeline(guide_net, EDMHeunScheduler())
    for pipe in (conditional, autoguided, guide_alone):
        pipe.set_progress_bar_config(disable=True)
    common = dict(batch_size=args.batch, num_inference_steps=18, latents=latents, output_type="pt")
    with torch.no_grad():
        t = best_cpu_seconds({
            "conditional": lambda: conditional(class_labels=labels, **common),
            "cfg": lambda: conditional(class_labels=labels, guidance_scale=2.0, **common),
            "main": lambda: autoguided(**common),
            "guide": lambda: guide_alone(**common),
            "autoguidance": lambda: autoguided(autoguidance_scale=2.0, **common),
        }, args.repeats)
    ratios = {"cfg_over_conditional": t["cfg"] / t["conditional"],
              "autoguidance_over_main_plus_guide": t["autoguidance"] / (t["main"] + t["guide"])}
    print(f"batch {args.batch}, 18 Heun steps (35 NFE), 1 thread, best CPU s of {args.repeats} interleaved repeats")
    print("| run | CPU s |\n|---|---|")
    for name, seconds in t.items():
        print(f"| {name} | {seconds:.3f} |")
    print(f"\nCFG / conditional: {ratios['cfg_over_conditional']:.3f} (target <= 2.1)")
    print(f"autoguidance / (main + guide): {ratios['autoguidance_over_main_plus_guide']:.3f} (target <= 1.1)")
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump({"batch": args.batch, "repeats": args.repeats, "cpu_seconds": t, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
