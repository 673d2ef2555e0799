"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs", Section 4): the squared maximum mean
discrepancy between two feature sets with the cubic polynomial kernel

    k(x, y) = (xᵀy / d + 1)³                                  (d: the feature dimension)

estimated without bias (Gretton et al. 2012, "A Kernel Two-Sample Test", eq. 3) from X = {x_i}, i ≤ m, Y = {y_j}, j ≤ n:

    MMD²_u = 1/(m(m−1)) Σ_{i≠i'} k(x_i, x_i') + 1/(n(n−1)) Σ_{j≠j'} k(y_j, y_j') − 2/(mn) Σ_{i,j} k(x_i, y_j)

and averaged over random subsets of equal size m = min(|X|, |Y|, max_subset_size), drawn without replacement, as
clean-fid and StyleGAN3's metrics do (100 subsets of at most 1000). Unlike the Fréchet distance its expectation does
not depend on the number of samples, so it stays comparable at small n; being unbiased it can be slightly negative
when the two distributions are equal.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch


def _as_features(features, name: str) -> torch.Tensor:
    """A tensor (n, d) on the device it came on (numpy arrays: the CPU); subsets are cast to float64 when used."""
    tensor = features.detach() if torch.is_tensor(features) else torch.from_numpy(np.asarray(features))
    if tensor.ndim != 2 or tensor.shape[0] < 2 or tensor.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-D array (num_samples >= 2, feature_dim), got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float64)
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x_i, y_j) = (x_iᵀy_j / d + 1)³ for all pairs: (m, d) × (n, d) → (m, n)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def unbiased_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MMD²_u of the module docstring between the rows of ``x`` (m, d) and ``y`` (n, d), m, n ≥ 2 (a 0-d tensor)."""
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * polynomial_kernel(x, y).sum() / (m * n)


def kid_subsets(features_a, features_b, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0) -> np.ndarray:
    """MMD²_u of each of ``num_subsets`` random subset pairs (float64 array): subset s takes m rows of ``features_a``
    and then m rows of ``features_b``, without replacement, from ``numpy.random.default_rng(seed)``, so the values
    depend only on the seed, not on the device. Tensors stay on their device (a GPU computes the kernels)."""
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} (features_a) vs {b.shape[1]} (features_b)")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    if max_subset_size < 2:
        raise ValueError(f"max_subset_size must be >= 2 (the unbiased estimate needs two samples), got {max_subset_size}")
    b = b.to(a.device)
    m = min(a.shape[0], b.shape[0], max_subset_size)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        index_a = torch.from_numpy(rng.choice(a.shape[0], m, replace=False)).to(a.device)
        index_b = torch.from_numpy(rng.choice(b.shape[0], m, replace=False)).to(a.device)
        values.append(unbiased_mmd2(a[index_a].double(), b[index_b].double()))
    return torch.stack(values).cpu().numpy()


def kernel_inception_distance(
    features_a, features_b, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0
) -> Tuple[float, float]:
    """KID: the mean over ``num_subsets`` random subsets of the unbiased MMD² (cubic polynomial kernel), and the
    **standard deviation over the subsets** (``ddof=0``, as torch-fidelity's ``kernel_distance_std``).

    The standard error of the mean is in :func:`kid_summary`, which is what ``evaluate.py`` reports. Both measure
    the spread of the subset estimates; the subsets overlap (all of them hold every sample when both sets have at
    most ``max_subset_size`` samples, and then the std is 0), so neither is the sampling error of the feature sets
    themselves.

    Args:
        features_a, features_b: (n_a, d) and (n_b, d) features (numpy arrays or tensors; tensors keep their device).
        num_subsets: how many subset pairs to average.
        max_subset_size: the subset size is min(n_a, n_b, max_subset_size).
        seed: seed of the subset draws; the result is deterministic for a seed.
    """
    values = kid_subsets(features_a, features_b, num_subsets, max_subset_size, seed)
    return float(values.mean()), float(values.std())


def kid_summary(features_a, features_b, num_subsets: int = 100, max_subset_size: int = 1000,
                seed: int = 0) -> Dict[str, float]:  # fmt: skip
    """KID over the same subsets as :func:`kernel_inception_distance` with the same seed, as a dict: ``kid`` (the
    mean), ``kid_std`` (std over the subsets, ``ddof=0``), ``kid_se`` (standard error of the mean: the sample std,
    ``ddof=1``, over √num_subsets; nan for one subset) and ``kid_subset_size``."""
    a, b = _as_features(features_a, "features_a"), _as_features(features_b, "features_b")
    values = kid_subsets(a, b, num_subsets, max_subset_size, seed)
    error = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"kid": float(values.mean()), "kid_std": float(values.std()), "kid_se": error,
            "kid_subset_size": min(a.shape[0], b.shape[0], max_subset_size)}  # fmt: skip
