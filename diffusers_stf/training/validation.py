"""Sample grids: images in a PNG mosaic, upscaled (nearest) so that small images stay visible."""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch


def image_grid(images: torch.Tensor, nrow: Optional[int] = None, padding: int = 1, min_cell: int = 32):
    """A PIL mosaic of ``images`` (N, C, H, W) with values in [0, 1]; ``nrow`` images per row (default: √N),
    each cell upscaled by an integer factor to at least ``min_cell`` pixels, separated by ``padding`` grey pixels."""
    from PIL import Image

    images = torch.as_tensor(images).detach().float().cpu().clamp(0, 1)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    scale = max(1, math.ceil(min_cell / min(h, w)))
    images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    h, w = h * scale, w * scale
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), 0.5)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    array = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(array[..., 0] if c == 1 else array, mode="L" if c == 1 else "RGB")


def save_image_grid(images: torch.Tensor, path: str, nrow: Optional[int] = None) -> str:
    """Save :func:`image_grid` of ``images`` (values in [0, 1]) as a PNG; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image_grid(images, nrow=nrow).save(path)
    return path


@torch.no_grad()
def sample_grid(pipeline, path: str, num_images: int = 100, num_inference_steps: int = 18, seed: int = 0) -> str:
    """Sample ``num_images`` with ``pipeline`` (a seeded generator, ``output_type="np"``, which our pipelines and
    diffusers' ``DDPMPipeline``/``DDIMPipeline`` all return as NHWC in [0, 1]) and save the grid."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device=pipeline.device).manual_seed(seed)
    images = pipeline(batch_size=num_images, num_inference_steps=num_inference_steps, generator=generator,
                      output_type="np").images
    images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if images.ndim == 3:  # (N, H, W)
        images = images[..., None]
    return save_image_grid(images.permute(0, 3, 1, 2), path)
