"""Guidance methods as terms: each returns ΔD(x, σ) at one network evaluation inside its σ interval
(:mod:`.base`); one file per method."""

from .base import GuidanceTerm, GuidedEvaluation, sigma_squared_gradient
from .classifier import ClassifierGuidance, classifier_correction
from .discriminator import (
    DG_GUIDANCE_SIGMA_MAX,
    DG_GUIDANCE_SIGMA_MIN,
    DiscriminatorGuidance,
    discriminator_correction,
)
