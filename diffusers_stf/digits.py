"""The embedded 8×8 digits of scikit-learn (1797 images, 10 classes): the dataset that needs no network, read by
training (the default training set) and by evaluation (the reference sets ``digits:train`` and ``digits:heldout``).

A fixed stratified split holds out 1000 images (seed 0), so a model trained on ``train`` is evaluated on images it
never saw.
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

DIGITS_NAME = "sklearn-digits-8x8"
DIGITS_HELDOUT_SIZE = 1000  # stratified split of the 1797 digits: 797 train / 1000 held out (seed 0)


def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 17 grey levels 0..16 → uint8 0..255, so they survive a PNG round trip.
    images = np.round(digits.images / 16.0 * 255.0).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def digits_split_indices() -> Dict[str, np.ndarray]:
    """Indices of the fixed stratified split of sklearn's digits: ``train`` (797) and ``heldout`` (1000)."""
    from sklearn.model_selection import train_test_split

    _, labels = _digits_arrays()
    idx = np.arange(len(labels))
    train, heldout = train_test_split(idx, test_size=DIGITS_HELDOUT_SIZE, random_state=0, stratify=labels)
    return {"train": np.sort(train), "heldout": np.sort(heldout), "all": idx}


def load_digits_dataset(split: str = "all"):
    """scikit-learn's 1797 8×8 digits as a ``datasets.Dataset`` with ``image`` (PIL, mode L) and ``label`` columns.

    Args:
        split: ``all`` (1797), ``train`` (797) or ``heldout`` (1000), the split used by the evaluation.
    """
    import datasets
    from PIL import Image

    splits = digits_split_indices()
    if split not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")
    images, labels = _digits_arrays()
    idx = splits[split]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(images[i], mode="L") for i in idx], "label": [int(labels[i]) for i in idx]},
        features=features,
    )


def digits_tensor(split: str = "all") -> Tuple[torch.Tensor, torch.Tensor]:
    """The digits as a float32 tensor (N, 1, 8, 8) in [−1, 1] and their labels (N,)."""
    images, labels = _digits_arrays()
    idx = digits_split_indices()[split] if split != "all" else np.arange(len(labels))
    x = torch.from_numpy(images[idx]).float().div(127.5).sub(1).unsqueeze(1)
    return x, torch.from_numpy(labels[idx])
