"""The score model that a guidance component (a discriminator, a noise-conditional classifier) is trained for."""

from __future__ import annotations

from .data import ImageData
from ..pipelines import DiscriminatorGuidedPipeline


def load_score_pipeline(path: str, data: ImageData, device) -> DiscriminatorGuidedPipeline:
    """The pipeline of ``--pretrained_model_name_or_path`` (a folder or a Hub id) on ``device``, as a
    :class:`DiscriminatorGuidedPipeline`; a ValueError when its UNet generates images of another shape than ``data``."""
    score = DiscriminatorGuidedPipeline.from_pretrained(path).to(device)
    size = score.unet.config.sample_size
    size = size if isinstance(size, int) else tuple(size)[0]
    if (score.unet.config.in_channels, size) != (data.channels, data.resolution):
        raise ValueError(f"the score model generates {score.unet.config.in_channels}x{size}x{size} images but the "
                         f"data are {data.channels}x{data.resolution}x{data.resolution}; set --resolution/--channels")
    return score
