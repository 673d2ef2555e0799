"""Sample grids of the validation steps, drawn with the package's one grid helper
(:func:`diffusers_stf.evaluation.images.image_grid`, on ``diffusers.utils.make_image_grid``), captioned by
:func:`~diffusers_stf.training.plots.save_captioned_grid`. A class-conditional pipeline's grid shows the classes in
rows: row r asks for class r (mod K); and the check, before training, that the validation sampler takes the
run's settings."""

from __future__ import annotations

import copy
import math
from typing import Optional

import numpy as np
import torch

from ..evaluation.images import image_grid, save_image_grid
from ..evaluation.sampling import pipeline_num_classes
from .plots import save_captioned_grid

__all__ = ["check_sampling_steps", "grid_class_labels", "image_grid", "pipeline_num_classes", "sample_grid",
           "save_image_grid"]


def grid_class_labels(num_images: int, num_classes: int) -> torch.Tensor:
    """The class of each cell of a grid of ``num_images`` laid out ⌈√N⌉ per row (``image_grid``'s default): row r
    asks for class r mod K."""
    per_row = max(1, math.ceil(math.sqrt(num_images)))
    return (torch.arange(num_images) // per_row) % num_classes


def check_sampling_steps(scheduler, num_inference_steps: int, flag: str = "--num_inference_steps") -> None:
    """Set a copy of ``scheduler`` to ``num_inference_steps`` as a validation grid will, so that a setting the sampler
    refuses (e.g. more DDIM steps than training timesteps) stops the run before training, naming ``flag``."""
    try:
        copy.deepcopy(scheduler).set_timesteps(num_inference_steps)
    except (ValueError, TypeError, RuntimeError, IndexError) as err:
        raise ValueError(f"{flag} {num_inference_steps}: the validation sampler {type(scheduler).__name__} refuses "
                         f"it ({err})") from err


@torch.no_grad()
def sample_grid(pipeline, path: str, num_images: int = 100, num_inference_steps: int = 18, seed: int = 0,
                caption: Optional[str] = None, **pipeline_kwargs) -> str:
    """Sample ``num_images`` with ``pipeline`` (a seeded generator, ``output_type="np"``, which our pipelines and
    diffusers' ``DDPMPipeline``/``DDIMPipeline`` all return as NHWC in [0, 1]) and save the grid (cells of at least
    64 pixels), with ``caption`` above it when given. A class-conditional pipeline gets
    :func:`grid_class_labels` (row r: class r mod K). ``pipeline_kwargs`` go to the pipeline call (e.g. ``eta``)."""
    pipeline.set_progress_bar_config(disable=True)
    num_classes = pipeline_num_classes(pipeline)
    if num_classes is not None:
        pipeline_kwargs = {"class_labels": grid_class_labels(num_images, num_classes), **pipeline_kwargs}
        rows = math.ceil(num_images / max(1, math.ceil(math.sqrt(num_images))))
        rows_text = "row r: class r" if rows <= num_classes else f"row r: class r mod {num_classes}"
        caption = f"{caption} · {rows_text}" if caption else None
    generator = torch.Generator(device=pipeline.device).manual_seed(seed)
    images = pipeline(batch_size=num_images, num_inference_steps=num_inference_steps, generator=generator,
                      output_type="np", **pipeline_kwargs).images
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if images.ndim == 3:  # (N, H, W)
        images = images[..., None]
    return save_captioned_grid(images.permute(0, 3, 1, 2), path, caption, min_cell=64)
