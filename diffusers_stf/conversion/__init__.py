"""Published checkpoints as this package's pipelines, read safely: NVlabs EDM and EDM2 pickles
(:func:`load_nvlabs_edm`, through a restricted unpickler that executes nothing) and Discriminator Guidance's
discriminator (:func:`load_dg_discriminator`, from ``weights_only`` state dicts). The command line: ``python -m
diffusers_stf.convert``."""

from .dg import load_dg_discriminator
from .nvlabs_edm import (
    NETWORK_CONVERTERS,
    PRECONDITIONING_CONVERTERS,
    SNAPSHOT_READERS,
    load_nvlabs_edm,
    load_weights,
    pipeline_from_snapshot,
    register_network_converter,
    register_preconditioning_converter,
    with_guide,
)
from .nvlabs_edm2 import pipeline_from_edm2_snapshot
from .unpickler import ModuleRecord, NVlabsPickleError, read_nvlabs_pickle

__all__ = [
    "NETWORK_CONVERTERS",
    "PRECONDITIONING_CONVERTERS",
    "SNAPSHOT_READERS",
    "ModuleRecord",
    "NVlabsPickleError",
    "load_dg_discriminator",
    "load_nvlabs_edm",
    "load_weights",
    "pipeline_from_edm2_snapshot",
    "pipeline_from_snapshot",
    "read_nvlabs_pickle",
    "register_network_converter",
    "register_preconditioning_converter",
    "with_guide",
]
