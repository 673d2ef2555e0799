"""Training objectives: one module per paper, each loss a small callable, each target a pure tensor function."""

# --- EDM + Stable Target Field (issue 3) ---
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

# --- Sequence-aware (issue 6) ---
from .sequence_aware import SequenceAwareLoss, SequenceAwareLossOutput, sequence_aware_weights

# --- Discriminator (issue 4) ---
from .discriminator import (
    DiscriminatorBCELoss,
    DiscriminatorLoss,
    DiscriminatorLossOutput,
    DiscriminatorLSIFLoss,
    DiscriminatorUKLLoss,
    make_discriminator_loss,
    sample_sigma_log_uniform,
)

# --- Score matching (issue 7) ---
from .score_matching import DenoisingScoreMatchingLoss
