"""Models: the Discriminator Guidance discriminator (the score networks are diffusers' ``UNet2DModel``)."""

from .discriminator import (
    LOG_RATIO_CLIP,
    Discriminator,
    DiscriminatorOutput,
    NoiseConditionalEncoder,
    TransformersFeatures,
    UNetEncoderFeatures,
)
