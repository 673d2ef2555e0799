"""Score a set of images against reference sets: Fréchet distance, KID, improved precision/recall, class statistics.

Reference features (and their μ, Σ) are cached in one ``.npz`` per (feature extractor, reference set), so each
evaluation embeds only the generated images. A reference may also be a statistics file in NVlabs' / pytorch-fid's
format (:mod:`.reference_stats`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from .classification import class_statistics
from .feature_extractors import FeatureExtractor, load_feature_extractor
from .frechet import feature_statistics, frechet_distance
from .images import NPZ_KEYS, list_image_files, load_images, match_channels
from .kid import kid_summary
from .precision_recall import precision_recall
from .reference_stats import check_reference_stats, is_reference_stats_file, read_reference_stats

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

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
    if os.path.isfile(reference) and reference.lower().endswith(".npz"):
        try:
            with np.load(reference, allow_pickle=False) as archive:
                files = archive.files
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            files = None  # unreadable: load_images names the file and the error
        if files is not None and not any(key in files for key in NPZ_KEYS):
            raise ValueError(
                f"the .npz reference {reference!r} holds {sorted(files)}: a reference .npz must hold statistics "
                f"('mu' and 'sigma', NVlabs' fid.py ref / pytorch-fid format) or images ({', '.join(NPZ_KEYS)})"
            )
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
    """Features, logits, μ and Σ of a reference set, read from / written to ``<cache_dir>/<extractor>--<set>.npz``;
    or ``mu``, ``sigma`` (and ``features`` when recorded) of a reference-statistics ``.npz``
    (:func:`~.reference_stats.save_reference_stats`), checked against the extractor's feature dimension.

    Args:
        extractor: the feature extractor (its ``name`` keys the cache).
        reference: see :func:`reference_images`, or a reference-statistics ``.npz``.
        cache_dir: where the statistics live; default :func:`default_cache_dir`.
        batch_size: images per forward pass.
        use_cache: read and write the cache.
    """
    if is_reference_stats_file(reference):
        stats = read_reference_stats(reference)
        check_reference_stats(stats, extractor, reference)
        return stats
    path = os.path.join(cache_dir or default_cache_dir(), f"{extractor.name}--{reference_key(reference)}.npz")
    if use_cache and os.path.isfile(path):
        with np.load(path, allow_pickle=False) as cached:
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


def fd_undefined_reason(num_images: int, feature_dim: int) -> Optional[str]:
    """Why the Fréchet distance of ``num_images`` features of dimension ``feature_dim`` is undefined, or None."""
    if num_images > feature_dim:
        return None
    return (
        f"FD is undefined for {num_images} images of {feature_dim}-d features: the covariance of n samples has rank "
        f"<= n - 1, so the FD needs at least {feature_dim + 1} samples (d + 1; a stable estimate needs several times "
        "more). KID is unbiased at any n: use it for small sample counts"
    )


def score_features(
    features,
    references: Mapping[str, Mapping[str, object]],
    mu: Optional[np.ndarray] = None,
    sigma: Optional[np.ndarray] = None,
    k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_seed: int = 0,
) -> Dict[str, object]:
    """FD, KID and precision/recall of generated ``features`` (n, d) against each reference's statistics.

    Args:
        features: the generated features (numpy array or tensor; a tensor keeps its device for KID and
            precision/recall).
        references: name → :func:`reference_statistics`' dict (``mu``, ``sigma``, optionally ``features``).
        mu, sigma: the generated features' statistics (default: computed from ``features``); the FD is None, with
            the reason in ``fd_undefined``, when n <= d.
        k: neighbourhood size of precision/recall.
        kid_subsets, kid_subset_size, kid_seed: see :func:`~.kid.kernel_inception_distance`.

    Returns:
        per-reference dicts ``fd``, ``kid``, ``kid_std`` (over the subsets), ``kid_se`` (standard error),
        ``precision``, ``recall``, ``num_reference_images``; a value is None when it cannot be computed (FD for
        n <= d, with the reason in ``fd_undefined``; KID and precision/recall against statistics stored without features,
        with the reason in ``notes``).
    """
    n, d = features.shape
    reason = fd_undefined_reason(n, d)
    if reason is None and mu is None:
        mu, sigma = feature_statistics(np.asarray(features.cpu() if hasattr(features, "cpu") else features),
                                       "the features of the evaluated images")  # fmt: skip
    result: Dict[str, object] = {key: {} for key in ("fd", "kid", "kid_std", "kid_se", "precision", "recall",
                                                     "num_reference_images")}  # fmt: skip
    result["notes"] = []
    if reason is not None:
        result["fd_undefined"] = reason
        warnings.warn(reason)
    for name, ref in references.items():
        result["fd"][name] = None if reason else frechet_distance(mu, sigma, ref["mu"], ref["sigma"])
        ref_features = ref.get("features")
        count = len(ref_features) if ref_features is not None else ref.get("num_images")
        result["num_reference_images"][name] = None if count is None else int(count)
        if ref_features is None:
            for key in ("kid", "kid_std", "kid_se", "precision", "recall"):
                result[key][name] = None
            result["notes"].append(f"{name}: the reference statistics hold no features (only mu and sigma), so KID "
                                   "and precision/recall are not available against it")  # fmt: skip
            continue
        kid = kid_summary(features, ref_features, kid_subsets, kid_subset_size, kid_seed)
        for key in ("kid", "kid_std", "kid_se"):
            result[key][name] = kid[key]
        pr = precision_recall(ref_features, features, k=k)
        result["precision"][name], result["recall"][name] = pr["precision"], pr["recall"]
    return result


def evaluate_images(
    images: torch.Tensor,
    extractor: Optional[FeatureExtractor] = None,
    references: Sequence[str] = ("digits:train",),
    k: int = 3,
    cache_dir: Optional[str] = None,
    batch_size: int = 250,
    use_cache: bool = True,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_seed: int = 0,
) -> Dict[str, object]:
    """Fréchet distance, KID, precision and recall of ``images`` against each reference set, and class statistics.

    Args:
        images: [−1, 1] float images (N, C, H, W); grey images are repeated to RGB for RGB extractors.
        extractor: default: the shipped digits classifier.
        references: reference sets (see :func:`reference_statistics`).
        k: neighbourhood size of precision/recall.
        cache_dir, use_cache: the reference-statistics cache.
        batch_size: images per forward pass.
        kid_subsets, kid_subset_size, kid_seed: see :func:`~.kid.kernel_inception_distance`.

    Returns:
        ``{"num_images", "feature_extractor"}`` and :func:`score_features`' per-reference dicts (``fd``, ``kid``,
        ``kid_std``, ``kid_se``, ``precision``, ``recall``, ``num_reference_images``), plus ``confidence``,
        ``class_entropy`` and ``class_histogram`` when the extractor classifies. With N <= d the FD is None and
        ``fd_undefined`` says why (KID is still computed).
    """
    extractor = extractor if extractor is not None else load_feature_extractor("digits")
    stats = {ref: reference_statistics(extractor, ref, cache_dir, batch_size, use_cache) for ref in references}
    features, logits = compute_features(extractor, images, batch_size)
    result: Dict[str, object] = {"num_images": len(features), "feature_extractor": extractor.name}
    result.update(score_features(features, stats, k=k, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                                 kid_seed=kid_seed))  # fmt: skip
    if logits is not None:
        result.update(class_statistics(logits))
    return result
