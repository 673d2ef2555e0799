"""The Fréchet distance between Gaussian fits of two feature sets (Heusel et al. 2017, "FID", eq. 6).

    d²((μ₁, Σ₁), (μ₂, Σ₂)) = ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})

With Inception-v3 pool3 features this is FID; with DINOv2 features it is FD_DINOv2 (Stein et al. 2023); with the
shipped digits classifier it is the package's offline metric. The distance only depends on the statistics, so the
reference set's (μ, Σ) can be cached.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy import linalg


def _check_features(features, name: str) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (num_samples, feature_dim), got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return features


def feature_statistics(features, name: str = "features") -> Tuple[np.ndarray, np.ndarray]:
    """Mean μ and unbiased covariance Σ (divisor n − 1) of ``features`` (n, d), in float64.

    Σ of n samples has rank at most n − 1, so with n ≤ d it is singular and the Fréchet distance is not a
    distance between two fitted Gaussians any more: that is an error, not a warning.

    Args:
        features: array of shape (num_samples, feature_dim).
        name: how the error messages call the array.
    """
    features = _check_features(features, name)
    n, d = features.shape
    if n <= d:
        raise ValueError(
            f"{name} has {n} samples of dimension {d}: the covariance of n samples has rank <= n - 1, so it is "
            f"singular for n <= d. The Fréchet distance needs at least {d + 1} samples (d + 1; a stable estimate "
            f"needs several times more), or a feature extractor with fewer than {n} dimensions"
        )
    mu = features.mean(axis=0)
    sigma = np.cov(features, rowvar=False)
    return mu, np.atleast_2d(sigma)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ₁ Σ₂)^{1/2}) for symmetric positive semi-definite Σ₁, Σ₂.

    Σ₁Σ₂ is similar to the PSD matrix Σ₁^{1/2} Σ₂ Σ₁^{1/2}, so the trace of its square root is the sum of the square
    roots of that matrix's eigenvalues. Working with symmetric matrices (``eigh``) avoids the complex round-off of
    ``sqrtm`` of a non-symmetric product and handles singular covariances (e.g. dead ReLU features) exactly.
    """
    w1, v1 = linalg.eigh(sigma1)
    sqrt1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    middle = sqrt1 @ sigma2 @ sqrt1
    eig = linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """d² = ‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2 tr((Σ₁Σ₂)^{1/2}) (FID, Heusel et al. 2017 eq. 6).

    Args:
        mu1, sigma1: mean (d,) and covariance (d, d) of the first set.
        mu2, sigma2: mean and covariance of the second set.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"the statistics must have matching shapes (d,) and (d, d); got mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
            f"mu2 {mu2.shape}, sigma2 {sigma2.shape} (were the two sets embedded with different feature extractors?)"
        )
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(max(distance, 0.0))  # round-off can make the distance of identical statistics −1e−13


def frechet_distance_from_features(features1, features2) -> float:
    """The Fréchet distance between the Gaussian fits of two feature sets (n₁, d) and (n₂, d)."""
    mu1, sigma1 = feature_statistics(features1, "features1")
    mu2, sigma2 = feature_statistics(features2, "features2")
    return frechet_distance(mu1, sigma1, mu2, sigma2)
