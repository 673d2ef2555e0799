"""Sample grids of the validation steps, drawn with the package's one grid helper
(:func:`diffusers_stf.evaluation.images.image_grid`, on ``diffusers.utils.make_image_grid``), captioned by
:func:`~diffusers_stf.training.plots.save_captioned_grid`; and the check, before training, that the validation
sampler takes the run's settings."""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch

from ..evaluation.images import image_grid, save_image_grid
from .plots import save_captioned_grid

__all__ = ["check_sampling_steps", "image_grid", "sample_grid", "save_image_grid"]


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
                caption: Optional[str] = None) -> str:
    """Sample ``num_images`` with ``pipeline`` (a seeded generator, ``output_type="np"``, which our pipelines and
    diffusers' ``DDPMPipeline``/``DDIMPipeline`` all return as NHWC in [0, 1]) and save the grid (cells of at least
    64 pixels), with ``caption`` above it when given."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=pipeline.device).manual_seed(seed)
    images = pipeline(batch_size=num_images, num_inference_steps=num_inference_steps, generator=generator,
                      output_type="np").images
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if images.ndim == 3:  # (N, H, W)
        images = images[..., None]
    return save_captioned_grid(images.permute(0, 3, 1, 2), path, caption, min_cell=64)
