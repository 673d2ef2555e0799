"""Training objectives: one module per paper, each loss a small callable, each target a pure tensor function.

One contract (:mod:`.base`): every loss returns a :class:`LossOutput` (or a subclass with its own fields) whose
``loss`` is the per-sample loss (B,) after the loss's reduction, with ``sigma`` (B,) for the logs; the training
objective is ``out.loss.mean()``. Every loss noises its images with :func:`add_noise`, x̃ = y + σ·n, and draws on the
generator's device (:mod:`.draws`).
"""

from .base import LossOutput, add_noise, reduce_per_sample

# EDM (and its VP/VE/DDPM siblings) + Stable Target Field
from .edm import (
    DDPMEpsilonLoss,
    DDPMLossOutput,
    DenoisingLoss,
    EDMLoss,
    VELoss,
    VPLoss,
    make_denoising_loss,
)
from .stable_target_field import (
    DDPMStableTargetFieldLoss,
    StableTargetFieldLoss,
    check_reference_batch_size,
    gather_references,
    stable_target_epsilon,
    stable_target_field,
)

# Sequence-aware (SA-DPM)
from .sequence_aware import SequenceAwareLoss, SequenceAwareLossOutput, sequence_aware_weights

# Discriminator Guidance's discriminator, and the classifier of classifier guidance
from .discriminator import (
    DiscriminatorBCELoss,
    DiscriminatorLoss,
    DiscriminatorLossOutput,
    DiscriminatorLSIFLoss,
    DiscriminatorUKLLoss,
    make_discriminator_loss,
    sample_sigma_log_uniform,
)
from .classifier import NoisyCrossEntropyLoss

# Denoising score matching (NCSN)
from .score_matching import DenoisingScoreMatchingLoss
