"""Reference statistics in the papers' file format: an ``.npz`` with ``mu`` (d,) and ``sigma`` (d, d), what NVlabs'
EDM ``fid.py ref`` and pytorch-fid's ``--save-stats`` write and read.

Files written here may hold three more arrays, which those tools ignore: ``feature_network`` (the name and weight
fingerprint of the extractor, e.g. ``inception-fid-6726825d…``), ``num_images`` and ``features`` (float32, the
reference features, which KID and precision/recall need; 50 000 × 2048 Inception features are 400 MB). NVlabs'
published files hold only ``mu`` and ``sigma``: with them FD works and KID and precision/recall are not available.
Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from typing import Dict, Optional, Tuple

import numpy as np

STATS_KEYS = ("mu", "sigma")
_warned = set()


def is_reference_stats_file(path: str) -> bool:
    """Whether ``path`` is an ``.npz`` holding a ``mu`` or ``sigma`` array (rather than images)."""
    if not (os.path.isfile(path) and path.lower().endswith(".npz")):
        return False
    try:
        with np.load(path, allow_pickle=False) as archive:
            return any(key in archive.files for key in STATS_KEYS)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False  # not a readable .npz: the image loader reports it


def read_reference_stats(path: str) -> Dict[str, object]:
    """Everything in a reference-statistics file: ``mu``, ``sigma`` (float64) and, when recorded, ``features``
    (float64 array), ``feature_network`` (str) and ``num_images`` (int)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"reference statistics file {path!r} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path!r} as an .npz of reference statistics ({err})") from err
    with archive:
        missing = [key for key in STATS_KEYS if key not in archive.files]
        if missing:
            raise ValueError(
                f"{path!r} has no {' and no '.join(repr(k) for k in missing)} array (it holds {sorted(archive.files)}); "
                "reference statistics are an .npz with 'mu' (d,) and 'sigma' (d, d), as NVlabs' fid.py ref and "
                "pytorch-fid write them"
            )
        stats: Dict[str, object] = {"mu": archive["mu"].astype(np.float64), "sigma": archive["sigma"].astype(np.float64)}
        if "features" in archive.files:
            stats["features"] = archive["features"].astype(np.float64)
        if "feature_network" in archive.files:
            stats["feature_network"] = str(archive["feature_network"])
        if "num_images" in archive.files:
            stats["num_images"] = int(archive["num_images"])
    mu, sigma = stats["mu"], stats["sigma"]
    d = mu.shape[0] if mu.ndim == 1 else None
    if d is None or sigma.shape != (d, d):
        raise ValueError(f"{path!r}: mu must have shape (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    if "features" in stats and (stats["features"].ndim != 2 or stats["features"].shape[1] != d):
        raise ValueError(f"{path!r}: features have shape {stats['features'].shape}, expected (n, {d})")
    return stats


def load_reference_stats(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of an ``.npz`` in NVlabs' ``fid.py ref`` / pytorch-fid format, as float64 arrays."""
    stats = read_reference_stats(path)
    return stats["mu"], stats["sigma"]


def save_reference_stats(
    path: str,
    mu,
    sigma,
    feature_network: Optional[str] = None,
    num_images: Optional[int] = None,
    features=None,
) -> str:
    """Write ``mu`` and ``sigma`` (float64) to ``path`` in NVlabs' ``fid.py ref`` / pytorch-fid format, with the
    optional ``feature_network`` name, ``num_images`` and ``features`` (stored as float32) beside them. The file is
    written under a temporary name and renamed, so a killed run never leaves a truncated one."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    d = mu.shape[0] if mu.ndim == 1 else None
    if d is None or sigma.shape != (d, d):
        raise ValueError(f"mu must have shape (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    if not path.endswith(".npz"):
        raise ValueError(f"path must end with .npz, got {path!r}")
    arrays: Dict[str, np.ndarray] = {"mu": mu, "sigma": sigma}
    if feature_network is not None:
        arrays["feature_network"] = np.asarray(str(feature_network))
    if num_images is not None:
        arrays["num_images"] = np.asarray(int(num_images), dtype=np.int64)
    if features is not None:
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != d:
            raise ValueError(f"features must have shape (n, {d}), got {features.shape}")
        arrays["features"] = features.astype(np.float32)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check_reference_stats(stats: Dict[str, object], extractor, source: str) -> None:
    """Raise a ValueError when the statistics' dimension is not ``extractor.feature_dim``; warn once per (file,
    network) which feature network the file records, and whether it is the one in use."""
    d = stats["mu"].shape[0]
    if extractor.feature_dim and d != extractor.feature_dim:
        raise ValueError(
            f"reference statistics {source!r} have dimension {d}, but the feature network in use ({extractor.name}) "
            f"gives {extractor.feature_dim}-d features; compute the statistics with the same network"
        )
    recorded = stats.get("feature_network")
    if recorded is None or (source, recorded, extractor.name) in _warned:
        return
    _warned.add((source, recorded, extractor.name))
    if recorded == extractor.name:
        warnings.warn(f"reference statistics {source!r} come from feature network {recorded!r}, the one in use")
    else:
        warnings.warn(
            f"reference statistics {source!r} come from feature network {recorded!r}, NOT the one in use "
            f"({extractor.name!r}): the distances compare features of two different networks"
        )
