"""Pipelines."""

from .pipeline_edm import EDMPipeline
