"""Training objectives: one module per paper, each loss a small callable, each target a pure tensor function."""

# EDM (and its VP/VE/DDPM siblings) + Stable Target Field
from .edm import (
    DDPMEpsilonLoss,
    DenoisingLoss,
    EDMLoss,
    VELoss,
    VPLoss,
    add_noise,
    make_denoising_loss,
    reduce_per_sample,
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

# Discriminator Guidance's discriminator
from .discriminator import (
    DiscriminatorBCELoss,
    DiscriminatorLoss,
    DiscriminatorLossOutput,
    DiscriminatorLSIFLoss,
    DiscriminatorUKLLoss,
    make_discriminator_loss,
    sample_sigma_log_uniform,
)

# Denoising score matching (NCSN)
from .score_matching import DenoisingScoreMatchingLoss
