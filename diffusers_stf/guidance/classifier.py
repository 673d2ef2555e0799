"""Classifier guidance (Dhariwal & Nichol, NeurIPS 2021, Algorithms 1–2): the score gains s·∇_x log p_φ(y | x, σ), i.e.

    ΔD(x; σ) = s·σ²·∇_x log p_φ(y | x, σ).

For ε-prediction this is their ε̂ = ε − √(1 − ᾱ_t)·s·∇_{x_t} log p_φ(y | x_t) (ΔF = ΔD/c_out with c_out = −σ).
"""

from __future__ import annotations

import torch

from .base import GuidanceTerm, GuidedEvaluation, Sigma, check_weight, sigma_squared_gradient


def classifier_correction(classifier, sample: torch.Tensor, sigma: Sigma, class_labels: torch.Tensor) -> torch.Tensor:
    """σ²·∇_x log p(y | x, σ) in float64, with the shape of ``sample``.

    Args:
        classifier: anything with ``log_prob(x, σ, y)`` and a ``dtype`` (:class:`~diffusers_stf.NoiseConditionalClassifier`).
        sample: x, the EDM/VE-scale sample, shape (batch, C, H, W).
        sigma: σ, a scalar or one per sample.
        class_labels: y, one class index per sample.
    """
    log_prob = lambda x, s: classifier.log_prob(x, s, class_labels)  # noqa: E731
    return sigma_squared_gradient(log_prob, classifier.dtype, sample, sigma)[0]


class ClassifierGuidance(GuidanceTerm):
    """Classifier guidance on every evaluation (module docstring).

    Args:
        classifier: a noise-conditional classifier (``log_prob(x, σ, y)`` on EDM-scale x and σ).
        class_labels: y, the class of each sample.
        guidance_scale: s (``classifier_guidance_scale`` of the pipelines).
        sigma_interval: where it acts (default: everywhere).
    """

    def __init__(self, classifier, class_labels: torch.Tensor, guidance_scale: float = 1.0,
                 sigma_interval=(0.0, float("inf"))):
        super().__init__(sigma_interval)
        self.classifier = classifier
        self.class_labels = class_labels
        self.guidance_scale = check_weight("classifier_guidance_scale", guidance_scale)

    def weight(self, first_order: bool) -> float:
        return self.guidance_scale

    def correction(self, evaluation: GuidedEvaluation) -> torch.Tensor:
        return self.guidance_scale * classifier_correction(self.classifier, evaluation.x, evaluation.sigma,
                                                           self.class_labels)
