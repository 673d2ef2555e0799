"""Score a set of images against reference sets: Fréchet distance, improved precision/recall, class statistics.

Reference features (and their μ, Σ) are cached in one ``.npz`` per (feature extractor, reference set), so each
evaluation embeds only the generated images.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from .classification import class_statistics
from .feature_extractors import FeatureExtractor, load_feature_extractor
from .frechet import feature_statistics, frechet_distance
from .images import list_image_files, load_images, match_channels
from .precision_recall import precision_recall

DIGITS_REFERENCES = ("digits:train", "digits:heldout", "digits:all")


def default_cache_dir() -> str:
    """``$DIFFUSERS_STF_CACHE/reference_stats`` (default ``~/.cache/diffusers_stf/reference_stats``)."""
    root = os.environ.get("DIFFUSERS_STF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "diffusers_stf"))
    return os.path.join(root, "reference_stats")


@torch.no_grad()
def compute_features(
    extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 250, progress: bool = False
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Features (N, d) and logits (N, C) or None of [−1, 1] images (N, C, H, W), in float64 numpy arrays."""
    from tqdm.auto import tqdm

    images = match_channels(images, extractor.channels)
    extractor.check_images(images)  # the whole set, so a bad image fails before any work
    if len(images) == 0:
        raise ValueError("images is empty")
    features, logits = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress, leave=False):
        f, l = extractor(images[start : start + batch_size])
        features.append(f.double().cpu())
        logits.append(None if l is None else l.double().cpu())
    features = torch.cat(features).numpy()
    return features, (None if logits[0] is None else torch.cat(logits).numpy())


def reference_key(reference: str) -> str:
    """A file-name-safe key of a reference set: ``digits-train`` or ``<folder name>-<hash of its file list>``."""
    if reference in DIGITS_REFERENCES:
        return reference.replace(":", "-")
    digest = hashlib.sha256()
    if os.path.isdir(reference):
        for file in list_image_files(reference):
            digest.update(f"{os.path.relpath(file, reference)}:{os.path.getsize(file)}".encode())
    elif os.path.isfile(reference):
        digest.update(f"{os.path.getsize(reference)}:{os.path.getmtime(reference)}".encode())
    else:
        raise ValueError(
            f"reference must be one of {DIGITS_REFERENCES}, a folder of images or an .npz file, got {reference!r}"
        )
    name = os.path.basename(os.path.normpath(reference)).replace(".", "_")
    return f"{name}-{digest.hexdigest()[:12]}"


def reference_images(reference: str) -> torch.Tensor:
    """The images of a reference set: ``digits:train`` (797), ``digits:heldout`` (1000), ``digits:all`` (1797), or a
    folder / ``.npz`` of images."""
    if reference in DIGITS_REFERENCES:
        from ..digits import digits_tensor

        return digits_tensor(reference.split(":")[1])[0]
    if os.path.exists(reference):
        return load_images(reference)
    raise ValueError(f"reference must be one of {DIGITS_REFERENCES}, a folder of images or an .npz file, got {reference!r}")


def reference_statistics(
    extractor: FeatureExtractor,
    reference: str,
    cache_dir: Optional[str] = None,
    batch_size: int = 250,
    use_cache: bool = True,
) -> Dict[str, np.ndarray]:
    """Features, logits, μ and Σ of a reference set, read from / written to ``<cache_dir>/<extractor>--<set>.npz``.

    Args:
        extractor: the feature extractor (its ``name`` keys the cache).
        reference: see :func:`reference_images`.
        cache_dir: where the statistics live; default :func:`default_cache_dir`.
        batch_size: images per forward pass.
        use_cache: read and write the cache.
    """
    path = os.path.join(cache_dir or default_cache_dir(), f"{extractor.name}--{reference_key(reference)}.npz")
    if use_cache and os.path.isfile(path):
        with np.load(path) as cached:
            return {k: cached[k] for k in cached.files}
    features, logits = compute_features(extractor, reference_images(reference), batch_size)
    mu, sigma = feature_statistics(features, f"the features of reference {reference!r}")
    stats = {"features": features, "mu": mu, "sigma": sigma}
    if logits is not None:
        stats["logits"] = logits
    if use_cache:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **stats)
        os.replace(tmp, path)
    return stats


def evaluate_images(
    images: torch.Tensor,
    extractor: Optional[FeatureExtractor] = None,
    references: Sequence[str] = ("digits:train",),
    k: int = 3,
    cache_dir: Optional[str] = None,
    batch_size: int = 250,
    use_cache: bool = True,
) -> Dict[str, object]:
    """Fréchet distance, precision and recall of ``images`` against each reference set, and class statistics.

    Args:
        images: [−1, 1] float images (N, C, H, W); grey images are repeated to RGB for RGB extractors.
        extractor: default: the shipped digits classifier.
        references: reference sets (see :func:`reference_images`).
        k: neighbourhood size of precision/recall.
        cache_dir, use_cache: the reference-statistics cache.
        batch_size: images per forward pass.

    Returns:
        ``{"num_images", "feature_extractor", "fd": {ref: value}, "precision": {...}, "recall": {...}}`` plus
        ``confidence``, ``class_entropy`` and ``class_histogram`` when the extractor classifies.
    """
    extractor = extractor if extractor is not None else load_feature_extractor("digits")
    features, logits = compute_features(extractor, images, batch_size)
    mu, sigma = feature_statistics(features, "the features of the evaluated images")
    result: Dict[str, object] = {
        "num_images": len(features),
        "feature_extractor": extractor.name,
        "fd": {},
        "precision": {},
        "recall": {},
        "num_reference_images": {},
    }
    for reference in references:
        ref = reference_statistics(extractor, reference, cache_dir, batch_size, use_cache)
        result["fd"][reference] = frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
        pr = precision_recall(ref["features"], features, k=k)
        result["precision"][reference], result["recall"][reference] = pr["precision"], pr["recall"]
        result["num_reference_images"][reference] = len(ref["features"])
    if logits is not None:
        result.update(class_statistics(logits))
    return result
