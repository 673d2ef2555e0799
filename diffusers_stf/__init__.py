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
from .augment import AugmentConditionedUNet2DModel, AugmentPipe
from .losses import (
    DDPMStableTargetFieldLoss,
    EDMLoss,
    StableTargetFieldLoss,
    VELoss,
    stable_target_epsilon,
    stable_target_field,
)

# --- Sequence-aware loss (issue 6) ---
from .estimation_gap import EstimationGapOutput, estimation_gap, plot_estimation_gaps
from .losses.sequence_aware import SequenceAwareLoss, SequenceAwareLossOutput, sequence_aware_weights

# --- Discriminator guidance (issue 4) ---
from .models import Discriminator, NoiseConditionalClassifier
from .pipelines.pipeline_discriminator_guided import DiscriminatorGuidedPipeline

# --- Evaluation (issue 5) ---

# --- Score-based foundations (issue 7) ---
from . import noise_schedules
from .losses.score_matching import DenoisingScoreMatchingLoss
from .preconditioning import NCSNPreconditioning, ScorePreconditioning, ScoreSDEPreconditioning
from .schedulers import (
    AnnealedLangevinScheduler,
    AnnealedLangevinSchedulerOutput,
    PredictorCorrectorScheduler,
    PredictorCorrectorSchedulerOutput,
)
