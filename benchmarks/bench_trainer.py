#!/usr/bin/env python
"""What the training plumbing costs: :class:`diffusers_stf.training.Trainer`'s step time over a bare training loop.

1. **Overhead (CPU, always)**: the same UNet2DModel, EDM loss, AdamW and EMA, stepped by a bare loop of EDM's shape
   (draw a batch, loss, backward, gradient NaN repair, optimizer step, EMA update) and by the Trainer (which also
   schedules the learning rate, accumulates the per-σ metrics on the device and keeps the NaN check; no clipping, as
   examples/train_stf.py and EDM). Step time = thread CPU time between two consecutive loss calls, one torch thread,
   the two loops interleaved over several rounds so that other jobs on the machine slow them alike; the median step of
   each is compared. Target: ``ratio <= 1.05``.
2. **Throughput (GPU only)**: images/s of the Trainer on a CIFAR-10-size configuration (32x32x3, a UNet2DModel of
   DDPM++ size: 256 channels at 32/16/8 px, 4 blocks per level, attention at 16 px; 59 M parameters, EDM's is 56 M)
   in fp32 and bf16 (``--mixed_precision``).
3. **No host–device sync (GPU only)**: ``torch.cuda.set_sync_debug_mode`` switched on for the steady training steps
   (between two logging steps) and for a sampler loop (EDMHeunScheduler, model + ``step``): first in ``"warn"`` mode,
   printing the source line of every operation that waited for the device, then in ``"error"`` mode, where any such
   operation raises; ``sync-free training step: yes/no`` and ``sync-free sampler step: yes/no`` sum it up.

    python benchmarks/bench_trainer.py                 # CPU overhead only when no GPU is present (~1-2 min)
    python benchmarks/bench_trainer.py --gpu_steps 50  # on a GPU machine: all three parts
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffusers_stf.digits import digits_tensor  # noqa: E402
from diffusers_stf.losses import EDMLoss  # noqa: E402
from diffusers_stf.training import (  # noqa: E402
    HalfLifeEMA, ImageData, Trainer, TrainingConfig, UNetConfig, make_unet, step_generator,
)


def edm_loss_fn(loss, timestamps, clock, on_step=None):
    """The Trainer's loss function (EDM loss, per-sample sums as examples/train_stf.py), stamping each call."""

    def loss_fn(model, batch, generator):
        timestamps.append(clock())
        if on_step is not None:
            on_step(len(timestamps))
        images = batch["images"]
        return loss(loss.denoiser(model), images, generator=generator)  # EDM: per-sample sums over C·H·W

    return loss_fn


def bare_loop(model, data, loss, steps, batch_size, lr, clock, device="cpu", seed=0):
    """EDM's training loop (NVlabs/edm training_loop.py) reduced to its maths: batch, loss, backward, gradient
    NaN/inf repair, AdamW, EMA. Returns the call timestamps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    ema = HalfLifeEMA(model)
    images_all = data.images
    order = torch.randperm(len(images_all), generator=torch.Generator().manual_seed(seed))
    stamps, nimg = [], 0
    for step in range(steps):
        stamps.append(clock())
        generator = step_generator(seed, step, 0, device)
        start = (step * batch_size) % (len(order) - batch_size + 1)
        images = data.batch(order[start:start + batch_size], generator)["images"].to(device)
        loss(loss.denoiser(model), images, generator=generator).loss.mean().backward()
        for p in model.parameters():  # EDM's training loop: NaN → 0, ±inf → ±1e5
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model, nimg, batch_size)
        nimg += batch_size
    stamps.append(clock())
    return stamps


def trainer_run(model, data, loss, steps, batch_size, lr, output_dir, clock, mixed_precision="no", cpu=True,
                on_step=None, logging_steps=None):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # accelerate keeps one state per process; each run sets its own precision
    stamps = []
    config = TrainingConfig(output_dir=output_dir, overwrite_output_dir=True, train_batch_size=batch_size,
                            max_train_steps=steps, learning_rate=lr, lr_warmup_steps=0, checkpointing_steps=0,
                            validation_steps=0, logging_steps=logging_steps or steps, report_to="none",
                            max_grad_norm=0.0,
                            no_progress_bar=True, cpu=cpu, mixed_precision=mixed_precision)
    trainer = Trainer(config, model, edm_loss_fn(loss, stamps, clock, on_step), data)
    trainer.finish = lambda wall_time, metrics: None  # the end of the run (grid, folder, card) is not a step
    trainer.train()
    return stamps


def step_times(stamps, skip=2):
    return [b - a for a, b in zip(stamps[skip:], stamps[skip + 1:])]


def cpu_overhead(args):
    torch.set_num_threads(1)
    clock = time.thread_time
    images, _ = digits_tensor("all")
    data = ImageData.from_tensor(images, resolution=8)
    loss = EDMLoss()
    unet_config = UNetConfig(block_out_channels=tuple(args.block_out_channels))
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            torch.manual_seed(r)
            bare += step_times(bare_loop(make_unet(unet_config, 8, 1), data, loss, args.steps, args.batch_size,
                                         1e-3, clock))
            torch.manual_seed(r)
            ours += step_times(trainer_run(make_unet(unet_config, 8, 1), data, loss, args.steps, args.batch_size,
                                           1e-3, os.path.join(tmp, f"run{r}"), clock))
            print(f"round {r + 1}/{args.rounds}: bare {statistics.median(bare) * 1e3:.1f} ms/step, "
                  f"trainer {statistics.median(ours) * 1e3:.1f} ms/step", flush=True)
    ratio = statistics.median(ours) / statistics.median(bare)
    print(f"CPU, 8x8 digits, UNet {tuple(args.block_out_channels)}, batch {args.batch_size}, one thread: "
          f"bare loop {statistics.median(bare) * 1e3:.2f} ms/step, Trainer {statistics.median(ours) * 1e3:.2f} ms/step "
          f"({len(bare)} and {len(ours)} steps)")
    print(f"trainer/bare step-time ratio = {ratio:.3f}  (target <= 1.05)")
    return ratio


def ddpmpp_cifar_unet():
    """A UNet2DModel of the size of EDM's DDPM++ CIFAR-10 network (model_channels 128, channel_mult 2,2,2,
    4 blocks per level, attention at 16x16)."""
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(256, 256, 256),
                       layers_per_block=4, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=64,
                       dropout=0.13)


def sync_places(run):
    """Run ``run(mode_setter)`` with ``set_sync_debug_mode("warn")`` recorded: the distinct source lines (outside
    torch) of the operations that waited for the device."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            run("warn")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    places = []
    for w in caught:
        if "synchroniz" in str(w.message):
            place = f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}"
            if place not in places:
                places.append(place)
    return places


def error_mode_passes(run) -> bool:
    """``run("error")``: True when no operation raised for waiting on the device."""
    try:
        run("error")
        return True
    except RuntimeError as err:
        if "synchroniz" not in str(err):
            raise
        return False
    finally:
        torch.cuda.set_sync_debug_mode(0)


def gpu_part(args):
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    data = ImageData.from_tensor(torch.rand(4096, 3, 32, 32) * 2 - 1, resolution=32)
    loss = EDMLoss()
    print(f"GPU: {torch.cuda.get_device_name()}; DDPM++-size UNet2DModel with "
          f"{ddpmpp_cifar_unet().num_parameters() / 1e6:.1f}M parameters, batch {args.gpu_batch_size}")

    def clock():
        torch.cuda.synchronize()
        return time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("no", "bf16"):
            stamps = trainer_run(ddpmpp_cifar_unet(), data, loss, args.gpu_steps, args.gpu_batch_size, 2e-4,
                                 os.path.join(tmp, precision), clock, mixed_precision=precision, cpu=False)
            seconds = statistics.median(step_times(stamps, skip=5))
            name = "fp32" if precision == "no" else "bf16"
            print(f"CIFAR-10 size, {name}: {args.gpu_batch_size / seconds:.0f} images/s "
                  f"({seconds * 1e3:.1f} ms/step)", flush=True)

        # the steady steps under sync debug: switched on at the 3rd loss call, off at the last one (before the
        # logging step that copies the metrics to the host)
        steps = 8

        def train(mode):
            def on_step(n):
                torch.cuda.set_sync_debug_mode(mode if 3 <= n < steps else 0)

            trainer_run(ddpmpp_cifar_unet(), data, loss, steps, 16, 2e-4, os.path.join(tmp, f"sync-{mode}"),
                        lambda: 0.0, cpu=False, on_step=on_step, logging_steps=steps)

        places = sync_places(train)
        for place in places:
            print(f"  training step syncs at {place}")
        print(f"sync-free training step: {'yes' if not places and error_mode_passes(train) else 'no'}")

    from diffusers_stf import EDMHeunScheduler

    unet = ddpmpp_cifar_unet().to(device).eval()

    def sample(mode):
        scheduler = EDMHeunScheduler()
        scheduler.set_timesteps(18, device=device)
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(16, 3, 32, 32, generator=generator, device=device) * scheduler.init_noise_sigma
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(mode)
        with torch.no_grad():
            for t in scheduler.timesteps:
                output = unet(scheduler.scale_model_input(x, t), t).sample
                x = scheduler.step(output, t, x, generator=generator).prev_sample
        torch.cuda.set_sync_debug_mode(0)
        return x

    places = sync_places(sample)
    for place in places:
        print(f"  sampler step syncs at {place}")
    print(f"sync-free sampler step: {'yes' if not places and error_mode_passes(sample) else 'no'}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=20, help="CPU steps per loop per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--gpu_steps", type=int, default=30)
    parser.add_argument("--gpu_batch_size", type=int, default=256)
    parser.add_argument("--skip_cpu", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_cpu:
        cpu_overhead(args)
    if torch.cuda.is_available():
        gpu_part(args)
    else:
        print("No GPU: the CIFAR-10-size images/s and the sync-debug checks were not run "
              "(run this script on a GPU machine).")


if __name__ == "__main__":
    main()
