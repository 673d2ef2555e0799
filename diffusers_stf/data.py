"""Image datasets: the embedded 8×8 digits (no network needed), Hub datasets and image folders through ``datasets``.

Everything downstream sees images as float tensors in [−1, 1], shape (C, H, W).
"""

from __future__ import annotations

import os
import random
from typing import Callable, Dict, Optional, Tuple

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


def load_image_dataset(
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    split: str = "train",
):
    """The training images as a ``datasets.Dataset``, as diffusers' ``train_unconditional.py`` loads them.

    Args:
        dataset_name: a Hub dataset id (or a local dataset script/folder) for ``datasets.load_dataset``.
        train_data_dir: a folder of images, loaded with the ``imagefolder`` builder.
        dataset_config_name: the dataset's configuration name.
        cache_dir: the ``datasets`` cache folder.
        split: the split to load. With neither name nor folder, the embedded digits (``all``, ``train`` or ``heldout``).
    """
    import datasets

    if dataset_name is not None and train_data_dir is not None:
        raise ValueError("give either dataset_name or train_data_dir, not both")
    if dataset_name is None and train_data_dir is None:
        return load_digits_dataset("all" if split == "train" else split)
    if dataset_name is not None:
        return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    if not os.path.isdir(train_data_dir):
        raise ValueError(f"train_data_dir {train_data_dir!r} is not a folder")
    has_files = any(files for _, _, files in os.walk(train_data_dir))
    if not has_files:
        raise ValueError(f"train_data_dir {train_data_dir!r} contains no files")
    try:
        ds = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split=split)
    except Exception as err:  # datasets raises several types for folders without readable images
        raise ValueError(f"could not read images from train_data_dir {train_data_dir!r}: {err}") from err
    if len(ds) == 0:
        raise ValueError(f"train_data_dir {train_data_dir!r} contains no images")
    return ds


def image_column(dataset) -> str:
    """The name of the image column: ``image`` or ``img``, or the first ``datasets.Image`` feature."""
    import datasets

    for name in ("image", "img"):
        if name in dataset.column_names:
            return name
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    raise ValueError(f"the dataset has no image column (columns: {dataset.column_names})")


def make_image_transform(
    resolution: int, channels: int = 1, center_crop: bool = False, random_flip: bool = False, seed: Optional[int] = None
) -> Callable:
    """PIL image → float tensor (channels, resolution, resolution) in [−1, 1].

    The shorter side is resized to ``resolution`` (bilinear; skipped when it already matches), then the image is
    center- or randomly cropped, and optionally flipped left–right with probability ½.

    Args:
        resolution: output side length.
        channels: 1 (grey) or 3 (RGB).
        center_crop: center crop instead of a random crop.
        random_flip: random horizontal flips.
        seed: seed of the crop/flip randomness.
    """
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    rng = random.Random(seed)

    def transform(image: "Image.Image") -> torch.Tensor:
        image = image.convert("L" if channels == 1 else "RGB")
        w, h = image.size
        if min(w, h) != resolution:
            scale = resolution / min(w, h)
            image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
            w, h = image.size
        if center_crop:
            left, top = (w - resolution) // 2, (h - resolution) // 2
        else:
            left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
        image = image.crop((left, top, left + resolution, top + resolution))
        if random_flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32)
        array = array[None] if channels == 1 else array.transpose(2, 0, 1)
        return torch.from_numpy(array / 127.5 - 1.0)

    return transform
