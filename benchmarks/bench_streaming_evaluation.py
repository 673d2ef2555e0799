#!/usr/bin/env python
"""Is feature extraction the bottleneck of streaming evaluation? Measured side by side in one run.

1. **Throughput**: images/s of generation alone (``generate_batch``) and of streaming evaluation (generation, 8-bit
   quantisation, Inception-v3 features, float64 accumulation: ``stream_features``) with the same pipeline, seeds and
   batch size; the ratio is the share of time left to sampling (target on a GPU: >= 0.9 at 18 Heun steps). The
   Inception network has random weights (the timing does not depend on them) and the UNet is CIFAR-sized.
2. **Metrics at full size**: seconds of KID (100 subsets of 1000) and of precision/recall (k = 3) on ``--num_features``
   random 2048-d features on the same device.

    python benchmarks/bench_streaming_evaluation.py                            # CPU: small sizes
    python benchmarks/bench_streaming_evaluation.py --device cuda --num_images 2000 --batch_size 500 \\
        --num_features 50000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch


def cifar_sized_pipeline(device: str, resolution: int):
    from diffusers import UNet2DModel

    from diffusers_stf import EDMHeunScheduler, EDMPipeline

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                       layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))  # fmt: skip
    return EDMPipeline(unet, EDMHeunScheduler()).to(device)


def random_inception(device: str):
    from diffusers_stf.evaluation import FIDInceptionV3, InceptionFeatureExtractor

    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "pt_inception-random.pth")
    torch.manual_seed(0)
    state = {k: v for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return InceptionFeatureExtractor(path).to(device)


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_inference_steps", type=int, default=18)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--num_features", type=int, default=3000)
    args = parser.parse_args(argv)

    from diffusers_stf.evaluation import generate_batch, kernel_inception_distance, precision_recall, stream_features

    pipe = cifar_sized_pipeline(args.device, args.resolution)
    pipe.set_progress_bar_config(disable=True)
    extractor = random_inception(args.device)
    steps = args.num_inference_steps
    generate_batch(pipe, range(args.batch_size), 2)  # warm-up (cuDNN autotuning, allocations)
    stream_features(pipe, extractor, args.batch_size, 2, batch_size=args.batch_size, progress=False)

    def generation_only():
        for start in range(0, args.num_images, args.batch_size):
            generate_batch(pipe, range(start, min(start + args.batch_size, args.num_images)), steps)

    def streaming():
        stream_features(pipe, extractor, args.num_images, steps, batch_size=args.batch_size, progress=False)

    generate_s, stream_s = [], []
    for _ in range(2):  # interleaved, so that other load slows both alike
        generate_s.append(timed(generation_only, args.device))
        stream_s.append(timed(streaming, args.device))
    g, s = min(generate_s), min(stream_s)
    print(f"{args.num_images} images, {steps} Heun steps, batch {args.batch_size}, {args.device}:")
    print(f"  generation only   {args.num_images / g:8.1f} images/s")
    print(f"  streaming eval    {args.num_images / s:8.1f} images/s  (generation's share of the time: {g / s:.3f})")

    features_a = torch.rand(args.num_features, 2048, device=args.device)
    features_b = torch.rand(args.num_features, 2048, device=args.device)
    kid_s = timed(lambda: kernel_inception_distance(features_a, features_b), args.device)
    pr_s = timed(lambda: precision_recall(features_a, features_b), args.device)
    print(f"  {args.num_features} × 2048 features: KID {kid_s:.1f} s, precision/recall {pr_s:.1f} s")


if __name__ == "__main__":
    main()
