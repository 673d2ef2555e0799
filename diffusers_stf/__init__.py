"""diffusers-stf: Stable Target Field, sequence-aware and discriminator-guided training, and EDM sampling for diffusers.

The base classes are re-exported because a saved pipeline's ``model_index.json`` names our components as
``["diffusers_stf", "<Class>"]`` and diffusers looks up ``ModelMixin``/``SchedulerMixin`` on that module to load them.
"""

from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin, SchedulerMixin  # noqa: F401  (see docstring)

from .preconditioning import (
    DDPMPreconditioning,
    Denoiser,
    EDMPreconditioning,
    IDDPMPreconditioning,
    Preconditioning,
    VEPreconditioning,
    VPPreconditioning,
    make_preconditioning,
)
from .schedulers import EDMHeunScheduler, EDMSchedulerOutput, EDMStochasticScheduler
from .pipelines import EDMPipeline

__version__ = "0.1.0"

# --- Stable Target Field / EDM losses and training plumbing (issue 3) ---

# --- Sequence-aware loss (issue 6) ---

# --- Discriminator guidance (issue 4) ---

# --- Evaluation (issue 5) ---

# --- Score-based foundations (issue 7) ---
