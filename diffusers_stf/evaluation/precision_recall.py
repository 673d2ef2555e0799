"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models", Section 2).

Each feature set Φ approximates its manifold by the union of balls around its points, the radius of a point being the
distance to its k-th nearest neighbour in Φ (eq. 2):

    f(φ, Φ) = 1  if ‖φ − φ'‖₂ ≤ ‖φ' − NN_k(φ')‖₂ for at least one φ' ∈ Φ, else 0

    precision = mean_{φ_g ∈ Φ_g} f(φ_g, Φ_r)        (eq. 3: generated samples that fall on the real manifold)
    recall    = mean_{φ_r ∈ Φ_r} f(φ_r, Φ_g)        (eq. 4: real samples that fall on the generated manifold)

The paper uses k = 3.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

_ROWS_PER_CHUNK = 1024  # distance matrices are built in row blocks to bound memory (50k × 50k would be 10 GB)


def _as_features(features, name: str, device=None) -> torch.Tensor:
    """float64 tensor on ``device`` (default: where ``features`` is; numpy arrays: the CPU)."""
    if torch.is_tensor(features):
        tensor = features.detach().to(device=device, dtype=torch.float64)
    else:
        tensor = torch.from_numpy(np.asarray(features, dtype=np.float64)).to(device)
    if tensor.ndim != 2 or tensor.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array (num_samples, feature_dim), got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def knn_radii(features, k: int = 3) -> np.ndarray:
    """‖φ − NN_k(φ)‖₂ for every φ in the set: the distance to its k-th nearest neighbour, itself excluded (eq. 2)."""
    features = _as_features(features, "features")
    if not 1 <= k < len(features):
        raise ValueError(f"k must be in [1, {len(features) - 1}] for a set of {len(features)} samples, got {k}")
    radii = []
    for start in range(0, len(features), _ROWS_PER_CHUNK):
        distances = torch.cdist(features[start : start + _ROWS_PER_CHUNK], features)
        # the k+1 smallest distances include the point itself (distance 0)
        radii.append(distances.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii).cpu().numpy()


def manifold_membership(manifold_features, radii, query_features) -> np.ndarray:
    """f(φ, Φ) of eq. 2 for each query φ: does it lie in at least one ball B(φ', r(φ')) of the manifold Φ?"""
    manifold = _as_features(manifold_features, "manifold_features")
    query = _as_features(query_features, "query_features", manifold.device)
    if manifold.shape[1] != query.shape[1]:
        raise ValueError(f"feature dimensions differ: {manifold.shape[1]} (manifold) vs {query.shape[1]} (query)")
    radii = torch.as_tensor(np.asarray(radii, dtype=np.float64), device=manifold.device)
    inside = []
    for start in range(0, len(query), _ROWS_PER_CHUNK):
        distances = torch.cdist(query[start : start + _ROWS_PER_CHUNK], manifold)
        inside.append((distances <= radii[None, :]).any(dim=1))
    return torch.cat(inside).cpu().numpy()


def precision_recall(real_features, generated_features, k: int = 3) -> Dict[str, float]:
    """Improved precision (eq. 3) and recall (eq. 4) of generated features against real ones.

    Args:
        real_features: (n_r, d) features of the reference images.
        generated_features: (n_g, d) features of the generated images.
        k: the neighbour that sets each ball's radius (the paper: 3).

    Tensors are used on their device (the generated features' device when they are a tensor), in float64.
    """
    device = generated_features.device if torch.is_tensor(generated_features) else None
    generated = _as_features(generated_features, "generated_features", device)
    real = _as_features(real_features, "real_features", generated.device)
    if real.shape[1] != generated.shape[1]:
        raise ValueError(f"feature dimensions differ: {real.shape[1]} (real) vs {generated.shape[1]} (generated)")
    precision = manifold_membership(real, knn_radii(real, k), generated).mean()
    recall = manifold_membership(generated, knn_radii(generated, k), real).mean()
    return {"precision": float(precision), "recall": float(recall)}
