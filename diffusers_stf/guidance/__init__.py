"""Guidance methods as terms: each returns ΔD(x, σ) at one network evaluation inside its σ interval
(:mod:`.base`); one file per method."""

from .autoguidance import Autoguidance
from .base import GuidanceTerm, GuidedEvaluation, check_interval, check_weight, sigma_squared_gradient
from .classifier import ClassifierGuidance, classifier_correction
from .classifier_free import ClassifierFreeGuidance
from .discriminator import (
    DG_GUIDANCE_SIGMA_MAX,
    DG_GUIDANCE_SIGMA_MIN,
    DiscriminatorGuidance,
    discriminator_correction,
)
