"""Models of guidance: the Discriminator Guidance discriminator and the noise-conditional classifier of classifier
guidance, both on one noise-conditional encoder (the score networks are diffusers' ``UNet2DModel``)."""

from .classifier import NoiseConditionalClassifier, NoiseConditionalClassifierOutput
from .discriminator import (
    LOG_RATIO_CLIP,
    Discriminator,
    DiscriminatorOutput,
    NoiseConditionalEncoder,
    TransformersFeatures,
    UNetEncoderFeatures,
)
