"""The objective of a noise-conditional classifier for classifier guidance (Dhariwal & Nichol, NeurIPS 2021).

Each image y of class c is diffused by the forward process, x = y + σ·n, at a noise level σ drawn log-uniformly (the
discriminator's law, :func:`~diffusers_stf.losses.discriminator.sample_sigma_log_uniform`), and the classifier
p(c | x, σ) is trained by cross-entropy, −log p(c | x, σ) per image. Its gradient ∇_x log p(c | x, σ) is the
correction classifier guidance adds to the score.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .base import LossOutput, add_noise, check_images
from .discriminator import DG_TRAIN_SIGMA_MAX, DG_TRAIN_SIGMA_MIN, sample_sigma_log_uniform


class NoisyCrossEntropyLoss:
    """−log p(c | y + σ·n, σ) per image, σ log-uniform on [σ_min, σ_max], n ~ N(0, I).

    Args:
        sigma_min, sigma_max: the range of the log-uniform σ (default: DG's, as the discriminator).
    """

    def __init__(self, sigma_min: float = DG_TRAIN_SIGMA_MIN, sigma_max: float = DG_TRAIN_SIGMA_MAX):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def __call__(self, classifier, images: torch.Tensor, labels: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> LossOutput:
        """The per-image cross-entropy and σ; ``logs`` and ``per_sample_logs`` hold the ``accuracy``.

        Args:
            classifier: a :class:`~diffusers_stf.NoiseConditionalClassifier` (or any module ``(x, σ) -> .logits``).
            images: clean images y in [−1, 1] (B, C, H, W).
            labels: their classes c (B,).
            generator: randomness of σ and of the noise.
        """
        check_images(images)
        sigma = sample_sigma_log_uniform(len(images), self.sigma_min, self.sigma_max, generator, device=images.device)
        logits = classifier(add_noise(images, sigma, generator), sigma).logits.float()
        correct = (logits.argmax(dim=1) == labels).double()
        return LossOutput(loss=F.cross_entropy(logits, labels, reduction="none"), sigma=sigma,
                          logs={"accuracy": correct.mean()}, per_sample_logs={"accuracy": correct})
