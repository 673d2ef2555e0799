"""Sampling for evaluation: load a saved pipeline, swap its scheduler, draw images with one seed per image.

One ``torch.Generator`` per image (seeded with that image's seed) makes image *i* the same whatever the batch size,
so an interrupted run resumes exactly and sample sets of different sizes share their first images.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence

import torch

SCHEDULER_ALIASES = {
    "heun": "EDMHeunScheduler",  # EDM Algorithm 1
    "stochastic": "EDMStochasticScheduler",  # EDM Algorithm 2 (churn)
    "euler": "EDMEulerScheduler",  # diffusers' first-order EDM sampler
}


def _find_class(name: str):
    import diffusers

    import diffusers_stf

    cls = getattr(diffusers_stf, name, None) or getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{name!r} is neither a diffusers_stf nor a diffusers class")
    return cls


def load_pipeline(folder: str, device: Optional[str] = None):
    """The pipeline saved in ``folder``, of the class named by its ``model_index.json`` (``_class_name``), looked up
    in ``diffusers_stf`` first (EDMPipeline, DiscriminatorGuidedPipeline, ...) and then in ``diffusers``."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{folder!r} is not a saved pipeline folder (no model_index.json)")
    with open(index) as f:
        class_name = json.load(f).get("_class_name")
    pipe = _find_class(class_name).from_pretrained(folder)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def make_scheduler(base_scheduler, name: str, **overrides):
    """A scheduler of class ``name`` (``heun``, ``stochastic``, ``euler`` or any diffusers_stf/diffusers scheduler
    class name) built with ``from_config`` from ``base_scheduler``'s config, so σ range, σ_data and the
    preconditioning carry over; ``overrides`` (e.g. ``s_churn=40``) replace config entries. Overrides the target
    class does not know are an error rather than silently ignored."""
    cls = _find_class(SCHEDULER_ALIASES.get(name, name))
    preconditioning = base_scheduler.config.get("preconditioning", "edm")
    if cls.__name__ == "EDMEulerScheduler" and preconditioning != "edm":
        raise ValueError(f"EDMEulerScheduler only implements the 'edm' preconditioning, the model uses {preconditioning!r}")
    scheduler = cls.from_config(base_scheduler.config, **overrides)
    unknown = [k for k in overrides if k not in scheduler.config]
    if unknown:
        raise ValueError(f"{cls.__name__} has no option(s) {unknown}; e.g. churn needs the 'stochastic' scheduler")
    return scheduler


@contextlib.contextmanager
def count_calls(module: torch.nn.Module) -> Iterator[List[int]]:
    """Count forward calls of ``module`` (the number of function evaluations of a sampler) inside the block."""
    counter = [0]
    handle = module.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    try:
        yield counter
    finally:
        handle.remove()


def generate_batch(pipe, seeds: Sequence[int], num_inference_steps: int, **pipeline_kwargs) -> torch.Tensor:
    """Images (N, C, H, W) in [−1, 1], image *i* drawn with ``torch.Generator().manual_seed(seeds[i])``.

    Args:
        pipe: a pipeline whose ``__call__`` takes ``batch_size``, ``num_inference_steps``, ``generator`` (a list,
            one per image) and ``output_type="np"`` (images in [0, 1], NHWC), as diffusers' unconditional pipelines do.
        seeds: one seed per image.
        num_inference_steps: sampler steps.
        pipeline_kwargs: passed on (e.g. guidance options of a guided pipeline).
    """
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(
        batch_size=len(seeds),
        num_inference_steps=num_inference_steps,
        generator=generators,
        output_type="np",
        **pipeline_kwargs,
    )
    images = out.images if hasattr(out, "images") else out[0]
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim == 3:
        images = images[..., None]
    return images.permute(0, 3, 1, 2) * 2 - 1


def generate_images(
    pipe,
    num_images: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = True,
    **pipeline_kwargs,
) -> Dict[str, object]:
    """``num_images`` images with seeds ``seed, seed+1, ...``, in batches; returns ``images`` ([−1, 1], N C H W),
    ``nfe`` (model evaluations per image, counted on ``pipe.unet``; None without one) and ``seconds``.

    Args:
        pipe: see :func:`generate_batch`.
        num_images: how many images.
        num_inference_steps: sampler steps.
        seed: seed of the first image.
        batch_size: images per pipeline call.
        progress: show a progress bar over batches.
        pipeline_kwargs: passed to the pipeline.
    """
    import time

    from tqdm.auto import tqdm

    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {num_images} and {batch_size}")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    seeds = list(range(seed, seed + num_images))
    batches, calls, start = [], 0, time.perf_counter()
    network = getattr(pipe, "unet", None)
    with count_calls(network) if network is not None else contextlib.nullcontext([None]) as counter:
        for i in tqdm(range(0, num_images, batch_size), desc="sampling", disable=not progress, leave=False):
            batches.append(generate_batch(pipe, seeds[i : i + batch_size], num_inference_steps, **pipeline_kwargs))
            calls += 1
        nfe = None if counter[0] is None else counter[0] / calls
    return {"images": torch.cat(batches), "nfe": nfe, "seconds": time.perf_counter() - start}
