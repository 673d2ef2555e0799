"""Pipelines."""

from .pipeline_edm import EDMPipeline
from .pipeline_discriminator_guided import DiscriminatorGuidedPipeline
