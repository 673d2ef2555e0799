#!/usr/bin/env python
"""EDM's networks as diffusers models: parameter counts and forward speed.

1. **Parameter counts** of the papers' configurations (EDM Appendix F.2, ``train.py --arch``): DDPM++ and NCSN++ at
   CIFAR-10 size (32x32x3, ``model_channels=128``, ``channel_mult=(2, 2, 2)``, 4 blocks, attention at 16 px,
   ``augment_dim=9``) and ADM at ImageNet-64 (``model_channels=192``, ``channel_mult=(1, 2, 3, 4)``, 1000 classes).
   Check: DDPM++ (unconditional CIFAR-10) has 55.73 M parameters, as in the EDM paper.
2. **Forward speed** (images/s, eval mode, no grad) of SongUNet (DDPM++) side by side with a diffusers
   ``UNet2DModel`` of DDPM++ size (256 channels at 32/16/8 px, 4 blocks, attention at 16 px; the UNet2DModel of
   ``bench_trainer.py``), the two interleaved over several rounds so that other jobs slow them alike; the ratio of the
   medians is printed. DhariwalUNet (ADM-64) is timed alone.
3. **Converted network against the same architecture built directly** (target: time ratio <= 1.05, i.e. the
   conversion adds nothing to the hot path). By default a stand-in NVlabs snapshot of DDPM++ at CIFAR-10 size (the
   published ``edm-cifar10-32x32-uncond-vp.pkl``'s structure, random weights; tests/nvlabs_standin.py) is written and
   converted with ``load_nvlabs_edm``; ``--converted DIR`` takes a folder written by ``save_pretrained`` of a
   SongUNet/DhariwalUNet instead. The converted network and a SongUNet built from its config holding the same weights
   are timed alternately, in CPU time of one thread on the CPU (robust on a shared machine), and the ratio of the
   medians is printed.

    python benchmarks/bench_edm_networks.py                       # CPU, batch 4 (DDPM++) and 1 (ADM), ~5 min on 2 cores
    python benchmarks/bench_edm_networks.py --sections 3          # the conversion check alone, ~1 min
    python benchmarks/bench_edm_networks.py --device cuda --batch 64 --adm_batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the stand-in snapshot writer

from diffusers import UNet2DModel  # noqa: E402

from diffusers_stf.models.dhariwal_unet import DhariwalUNet  # noqa: E402
from diffusers_stf.models.song_unet import SongUNet  # noqa: E402

CIFAR = dict(sample_size=32, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
             dropout=0.13, augment_dim=9)
DDPMPP = dict(CIFAR, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
              decoder_type="standard", resample_filter=(1, 1))
NCSNPP = dict(CIFAR, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
              decoder_type="standard", resample_filter=(1, 3, 3, 1))
ADM64 = dict(sample_size=64, model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8),
             dropout=0.10, num_class_embeds=1000)
EDM_DDPMPP_PARAMS = 55.73e6  # EDM paper, DDPM++ on CIFAR-10


def placed(model, device, dtype):
    """``model`` on ``device`` in ``dtype`` (a dtype cast only when needed: diffusers warns on any ``to(dtype)``)."""
    model = model.to(device)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def diffusers_unet_ddpmpp_size() -> UNet2DModel:
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(256, 256, 256),
                       layers_per_block=4, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=64,
                       dropout=0.13)


def forward_fn(model, batch, device):
    """A no-grad forward at c_noise ~ ln(σ)/4 for σ ~ EDM's training distribution (labels drawn when needed)."""
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=device)
    t = torch.randn(batch, device=device) * 0.3 - 0.3
    kwargs = {}
    if cfg.get("num_class_embeds"):
        kwargs["class_labels"] = torch.randint(0, cfg.num_class_embeds, (batch,), device=device)

    @torch.no_grad()
    def run():
        model(x, t, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def time_side_by_side(runs: dict, rounds: int, batch: int, clock=time.perf_counter) -> dict:
    """Images/s of each forward: one warm-up call each, then ``rounds`` rounds of one call per model, interleaved
    (the order reversed every other round)."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for k in range(rounds):
        for name, run in (list(runs.items()) if k % 2 == 0 else list(runs.items())[::-1]):
            start = clock()
            run()
            times[name].append(clock() - start)
    return {name: batch / statistics.median(ts) for name, ts in times.items()}


def standin_ddpmpp_converted(root: str) -> torch.nn.Module:
    """The network of a stand-in NVlabs EDM snapshot of DDPM++ at CIFAR-10 size (VPPrecond around SongUNet, random
    weights), as ``load_nvlabs_edm`` returns it."""
    import nvlabs_standin as standin

    from diffusers_stf.conversion import load_nvlabs_edm

    net = SongUNet(**DDPMPP)
    recorded = {k: list(v) if isinstance(v, tuple) else v for k, v in DDPMPP.items() if k != "sample_size"}
    recorded.update(img_resolution=32, in_channels=3, out_channels=3, label_dim=0)
    ema = standin.preconditioning("VPPrecond", standin.persistent_tree(net, "SongUNet", recorded), 32, 3,
                                  model_type="SongUNet")
    path = os.path.join(root, "edm-cifar10-32x32-uncond-vp-standin.pkl")
    standin.write(path, standin.edm_snapshot(ema))
    return load_nvlabs_edm(path).unet


def load_converted_folder(folder: str) -> torch.nn.Module:
    with open(os.path.join(folder, "config.json")) as f:
        cls = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}[json.load(f)["_class_name"]]
    return cls.from_pretrained(folder)


def converted_vs_built(converted, device, dtype, batch: int, rounds: int) -> dict:
    """Section 3: the converted network against the same class built from its config, with the same weights."""
    cls = type(converted)
    converted = placed(converted, device, dtype)
    built = cls.from_config(converted.config)
    built.load_state_dict(converted.state_dict())
    built = placed(built, device, dtype)
    cpu = device.type == "cpu"
    threads = torch.get_num_threads()
    if cpu:
        torch.set_num_threads(1)
    try:
        speed = time_side_by_side({"converted": forward_fn(converted, batch, device),
                                   "built": forward_fn(built, batch, device)}, rounds, batch,
                                  clock=time.thread_time if cpu else time.perf_counter)
    finally:
        torch.set_num_threads(threads)
    ratio = speed["built"] / speed["converted"]  # time of the converted network / time of the built one
    print(f"3. Converted {cls.__name__} ({n_params(converted) / 1e6:.2f} M params, batch {batch}, "
          f"{'CPU time of one thread' if cpu else 'wall time'}, {rounds} interleaved rounds): converted "
          f"{speed['converted']:.3f} img/s, built directly {speed['built']:.3f} img/s; time ratio converted / built "
          f"{ratio:.3f} (target <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'})")
    return dict(params=n_params(converted), batch=batch, time_ratio=ratio, target_met=ratio <= 1.05, **speed)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4, help="batch of the 32x32 networks")
    parser.add_argument("--adm_batch", type=int, default=1, help="batch of ADM-64 (0: skip its timing)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--converted", default=None,
                        help="a save_pretrained folder of a SongUNet/DhariwalUNet (default: convert a stand-in "
                             "DDPM++ CIFAR-10 snapshot)")
    parser.add_argument("--sections", default="1,2,3", help="which sections to run, e.g. 3")
    parser.add_argument("--converted_rounds", type=int, default=9, help="interleaved rounds of section 3")
    parser.add_argument("--converted_batch", type=int, default=0, help="batch of section 3 (0: --batch)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch_threads": torch.get_num_threads(), "dtype": args.dtype}

    sections = {int(s) for s in args.sections.split(",")}
    if 1 in sections:
        parameter_counts(results)
    if 2 in sections:
        forward_speed(args, device, dtype, results)
    if 3 in sections:
        with tempfile.TemporaryDirectory() as root:
            converted = load_converted_folder(args.converted) if args.converted else standin_ddpmpp_converted(root)
        batch = args.converted_batch or (args.batch if converted.config.sample_size <= 32 else max(1, args.adm_batch))
        results["converted"] = converted_vs_built(converted, device, dtype, batch, args.converted_rounds)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def parameter_counts(results: dict):
    print("1. Parameter counts")
    counts = {
        "DDPM++ CIFAR-10 uncond": n_params(SongUNet(**DDPMPP)),
        "DDPM++ CIFAR-10 cond": n_params(SongUNet(**DDPMPP, num_class_embeds=10)),
        "NCSN++ CIFAR-10 uncond": n_params(SongUNet(**NCSNPP)),
        "NCSN++ CIFAR-10 cond": n_params(SongUNet(**NCSNPP, num_class_embeds=10)),
        "ADM ImageNet-64 cond": n_params(DhariwalUNet(**ADM64)),
    }
    for name, count in counts.items():
        print(f"   {name:24s} {count / 1e6:8.2f} M  ({count:,})")
    ok = round(counts["DDPM++ CIFAR-10 uncond"] / 1e4) == round(EDM_DDPMPP_PARAMS / 1e4)
    print(f"   DDPM++ uncond = EDM's {EDM_DDPMPP_PARAMS / 1e6:.2f} M: {'yes' if ok else 'NO'}")
    results["params"] = counts
    results["ddpmpp_params_match_edm"] = ok


def forward_speed(args, device, dtype, results: dict):
    print(f"2. Forward speed ({results['device']}, {args.dtype}, {results['torch_threads']} threads)")
    song = placed(SongUNet(**DDPMPP), device, dtype)
    unet = placed(diffusers_unet_ddpmpp_size(), device, dtype)
    speed = time_side_by_side({"SongUNet DDPM++": forward_fn(song, args.batch, device),
                               "UNet2DModel (DDPM++ size)": forward_fn(unet, args.batch, device)},
                              args.rounds, args.batch)
    for name, rate in speed.items():
        print(f"   {name:26s} batch {args.batch:3d}: {rate:9.2f} img/s")
    ratio = speed["SongUNet DDPM++"] / speed["UNet2DModel (DDPM++ size)"]
    print(f"   ratio SongUNet / UNet2DModel img/s: {ratio:.2f} (UNet2DModel has {n_params(unet) / 1e6:.2f} M params)")
    results["img_per_s"] = speed
    results["songunet_over_unet2d"] = ratio
    del song, unet
    if args.adm_batch:
        adm = placed(DhariwalUNet(**ADM64), device, dtype)
        rate = time_side_by_side({"adm": forward_fn(adm, args.adm_batch, device)}, max(2, args.rounds // 2),
                                 args.adm_batch)["adm"]
        print(f"   {'DhariwalUNet ADM-64':26s} batch {args.adm_batch:3d}: {rate:9.2f} img/s")
        results["img_per_s"]["DhariwalUNet ADM-64"] = rate
        del adm


if __name__ == "__main__":
    main()
