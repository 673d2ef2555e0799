"""diffusers-stf: Stable Target Field, sequence-aware and discriminator-guided training, and EDM sampling for diffusers.

The base classes are re-exported because a folder written by release 0.1.0 names our components as
``["diffusers_stf", "<Class>"]`` and diffusers looks up ``ModelMixin``/``SchedulerMixin`` on that module to load them.
"""

from diffusers import ConfigMixin, DiffusionPipeline, ModelMixin, SchedulerMixin  # noqa: F401  (see docstring)

from . import noise_schedules
from .augment import AugmentPipe
from .evaluation.estimation_gap import EstimationGapOutput, estimation_gap, plot_estimation_gaps
from .losses import (
    DDPMEpsilonLoss,
    DDPMStableTargetFieldLoss,
    DenoisingScoreMatchingLoss,
    EDMLoss,
    SequenceAwareLoss,
    SequenceAwareLossOutput,
    StableTargetFieldLoss,
    VELoss,
    VPLoss,
    make_denoising_loss,
    sequence_aware_weights,
    stable_target_epsilon,
    stable_target_field,
)
from .models import AugmentConditionedUNet2DModel, DhariwalUNet, Discriminator, NoiseConditionalClassifier, SongUNet
from .pipelines import DiscriminatorGuidedPipeline, EDMPipeline
from .preconditioning import (
    DDPMPreconditioning,
    Denoiser,
    EDMPreconditioning,
    IDDPMPreconditioning,
    NCSNPreconditioning,
    Preconditioning,
    ScorePreconditioning,
    ScoreSDEPreconditioning,
    VEPreconditioning,
    VPPreconditioning,
    make_preconditioning,
    preconditioning_for,
)
from .guidance import ClassifierGuidance, DiscriminatorGuidance, GuidanceTerm
from .schedulers import (
    AnnealedLangevinScheduler,
    AnnealedLangevinSchedulerOutput,
    EDMHeunScheduler,
    EDMSchedulerOutput,
    EDMStochasticScheduler,
    PredictorCorrectorScheduler,
    PredictorCorrectorSchedulerOutput,
)

__version__ = "0.3.0"
