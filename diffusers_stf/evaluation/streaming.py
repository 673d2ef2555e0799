"""Streaming evaluation of a pipeline: generate in batches, embed each batch at once, keep only what the metrics need.

:class:`FeatureAccumulator` holds, on the feature network's device,

* Σf and Σffᵀ in float64, from which μ = Σf / n and Σ = (Σffᵀ − n μμᵀ) / (n − 1) (NVlabs' ``fid.py``);
* **all** features (float32), which KID and precision/recall need: 50 000 × 2048 Inception features take 400 MB of
  device memory (64-d digits features: 13 MB);
* the predicted-class histogram and the sum of max-softmax confidences when the network classifies.

Nothing is copied to the host per batch except the images themselves (diffusers pipelines return them as a host
array): features and sums reach the host only at checkpoints. :func:`stream_features` checkpoints the accumulator
every few batches into a state folder: the new features as one safetensors part per checkpoint, then the sums and
the count in ``accumulator.safetensors``, each written under a temporary name and renamed. A killed run resumes from
the last checkpoint; image i is drawn with seed ``seed + i`` (:func:`~.sampling.generate_batch`), so the resumed
run gives what an uninterrupted one gives, whatever the batch sizes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch

from .images import match_channels, quantize
from .sampling import generate_batch

ACCUMULATOR_FILE = "accumulator.safetensors"
SETTINGS_FILE = "settings.json"
PART_PREFIX = "features-"


class FeatureAccumulator:
    """Running Σf, Σffᵀ (float64), the features (float32) and class counts of a stream of feature batches.

    Args:
        feature_dim: d.
        num_classes: C when the network gives logits, else None.
        device: where the sums and features live (the feature network's device).
    """

    def __init__(self, feature_dim: int, num_classes: Optional[int] = None, device="cpu"):
        self.feature_dim, self.num_classes, self.device = int(feature_dim), num_classes, torch.device(device)
        self.num_images = 0
        self.sum_f = torch.zeros(self.feature_dim, dtype=torch.float64, device=self.device)
        self.sum_ff = torch.zeros(self.feature_dim, self.feature_dim, dtype=torch.float64, device=self.device)
        self.class_counts = None if num_classes is None else torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        self.confidence_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._batches: List[torch.Tensor] = []

    def update(self, features: torch.Tensor, logits: Optional[torch.Tensor] = None) -> None:
        """Add a batch of features (B, d) (and logits (B, C)); no host–device synchronisation."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must have shape (B, {self.feature_dim}), got {tuple(features.shape)}")
        f = features.detach().to(self.device)
        f64 = f.double()
        self.sum_f += f64.sum(dim=0)
        self.sum_ff += f64.T @ f64
        self._batches.append(f.float())
        self.num_images += f.shape[0]
        if self.class_counts is not None:
            if logits is None:
                raise ValueError("this accumulator counts classes: pass the logits with every batch")
            probs = logits.detach().to(self.device).double().softmax(dim=1)
            predicted = probs.argmax(dim=1)  # index_add_, not bincount: bincount reads the max back to size its output
            self.class_counts.index_add_(0, predicted, torch.ones_like(predicted))
            self.confidence_sum += probs.max(dim=1).values.sum()

    def features(self, start: int = 0) -> torch.Tensor:
        """The features of images ``start`` … n − 1, (n − start, d) float32 on the accumulator's device."""
        all_features = torch.cat(self._batches) if self._batches else torch.zeros(0, self.feature_dim, device=self.device)
        self._batches = [all_features]
        return all_features[start:]

    def statistics(self):
        """μ (d,) and Σ (d, d) as float64 numpy arrays: μ = Σf / n, Σ = (Σffᵀ − n μμᵀ) / (n − 1)."""
        if self.num_images < 2:
            raise ValueError(f"the statistics need at least 2 images, the accumulator holds {self.num_images}")
        n = self.num_images
        sum_f, sum_ff = self.sum_f.cpu().numpy(), self.sum_ff.cpu().numpy()
        mu = sum_f / n
        sigma = (sum_ff - n * np.outer(mu, mu)) / (n - 1)
        return mu, (sigma + sigma.T) / 2

    def class_statistics(self) -> Optional[Dict[str, object]]:
        """``confidence`` (mean max-softmax), ``class_entropy`` (nats) and ``class_histogram``, or None."""
        if self.class_counts is None or self.num_images == 0:
            return None
        counts = self.class_counts.cpu().double()
        freq = counts / counts.sum()
        entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum()
        return {
            "confidence": float(self.confidence_sum.cpu()) / self.num_images,
            "class_entropy": float(entropy),
            "max_class_entropy": float(np.log(self.num_classes)),
            "class_histogram": [int(c) for c in counts],
        }

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """The sums and counts (not the features) as host tensors, for a checkpoint."""
        state = {"num_images": torch.tensor(self.num_images, dtype=torch.int64), "sum_f": self.sum_f.cpu(),
                 "sum_ff": self.sum_ff.cpu(), "confidence_sum": self.confidence_sum.cpu()}  # fmt: skip
        if self.class_counts is not None:
            state["class_counts"] = self.class_counts.cpu()
        return state

    def load_state_tensors(self, state: Mapping[str, torch.Tensor], features: torch.Tensor) -> None:
        """Restore from :meth:`state_tensors` and the features of the images it counts."""
        if tuple(state["sum_ff"].shape) != (self.feature_dim, self.feature_dim):
            raise ValueError(f"the checkpoint holds {state['sum_ff'].shape[0]}-d sums, the accumulator is {self.feature_dim}-d")
        self.num_images = int(state["num_images"])
        if len(features) != self.num_images:
            raise ValueError(f"the checkpoint counts {self.num_images} images but holds {len(features)} features")
        self.sum_f = state["sum_f"].to(self.device, torch.float64)
        self.sum_ff = state["sum_ff"].to(self.device, torch.float64)
        self.confidence_sum = state["confidence_sum"].to(self.device, torch.float64)
        if self.class_counts is not None:
            self.class_counts = state["class_counts"].to(self.device, torch.int64)
        self._batches = [features.to(self.device, torch.float32)]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: features-<start>-<end>.safetensors parts, then accumulator.safetensors (sums, count, settings)


def _atomic_save(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _part_name(start: int, end: int) -> str:
    return f"{PART_PREFIX}{start:09d}-{end:09d}.safetensors"


def _parts(state_dir: str) -> List[tuple]:
    """(start, end, file name) of the feature parts in ``state_dir``, sorted."""
    parts = []
    for name in os.listdir(state_dir):
        if name.startswith(PART_PREFIX) and name.endswith(".safetensors"):
            start, end = name[len(PART_PREFIX) : -len(".safetensors")].split("-")
            parts.append((int(start), int(end), name))
    return sorted(parts)


def pipeline_folder_fingerprint(folder: str) -> str:
    """A short hash of a saved pipeline: ``model_index.json`` and the files of the components it lists (names,
    sizes, first and last MiB of each); other files in the folder (logs, evaluation states) do not count."""
    import hashlib

    from .feature_extractors import file_fingerprint

    index = os.path.join(folder, "model_index.json")
    with open(index) as f:
        components = sorted(k for k in json.load(f) if not k.startswith("_"))
    digest = hashlib.sha256(file_fingerprint(index).encode())
    for component in components:
        for root, dirs, files in os.walk(os.path.join(folder, component)):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                digest.update(f"{os.path.relpath(path, folder)}:{file_fingerprint(path)}".encode())
    return digest.hexdigest()[:12]


def _changed_settings(previous: Mapping, current: Mapping) -> List[str]:
    return sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))


def save_checkpoint(accumulator: FeatureAccumulator, state_dir: str, saved_images: int, settings: Mapping) -> int:
    """Write the features of images ``saved_images`` … n − 1 as a part, then the sums; returns n."""
    n = accumulator.num_images
    if n > saved_images:
        part = accumulator.features(saved_images).cpu()
        _atomic_save({"features": part}, os.path.join(state_dir, _part_name(saved_images, n)))
    _atomic_save(accumulator.state_tensors(), os.path.join(state_dir, ACCUMULATOR_FILE),
                 {"settings": json.dumps(settings, sort_keys=True)})  # fmt: skip
    return n


def load_checkpoint(accumulator: FeatureAccumulator, state_dir: str, settings: Mapping) -> int:
    """Restore ``accumulator`` from ``state_dir`` (if it holds a checkpoint) and return the number of images in it.

    A checkpoint made with other settings is refused, naming them. Temporaries and parts past the checkpoint's
    count (a run killed between writing a part and the sums) are this module's own files and are deleted."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    for name in os.listdir(state_dir):
        if name.startswith(".") and name.endswith(".partial"):
            os.remove(os.path.join(state_dir, name))
    path = os.path.join(state_dir, ACCUMULATOR_FILE)
    if not os.path.isfile(path):
        for _, _, name in _parts(state_dir):
            os.remove(os.path.join(state_dir, name))
        return 0
    with safe_open(path, framework="pt") as f:
        previous = json.loads((f.metadata() or {}).get("settings", "{}"))
    changed = _changed_settings(previous, settings)
    if changed:
        details = "; ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ValueError(f"the evaluation state in {state_dir!r} was made with other settings ({details}); use "
                         "another --state_dir or the same settings")  # fmt: skip
    state = load_file(path)
    n = int(state["num_images"])
    pieces, covered = [], 0
    for start, end, name in _parts(state_dir):
        if start >= n:
            os.remove(os.path.join(state_dir, name))
            continue
        if start != covered or end > n:
            raise ValueError(f"the feature parts in {state_dir!r} do not tile images 0..{n - 1} ({name}); delete "
                             "the folder to start again")  # fmt: skip
        pieces.append(load_file(os.path.join(state_dir, name))["features"])
        covered = end
    if covered != n:
        raise ValueError(f"{state_dir!r} counts {n} images but its feature parts cover {covered}; delete the folder "
                         "to start again")  # fmt: skip
    features = torch.cat(pieces) if pieces else torch.zeros(0, accumulator.feature_dim)
    accumulator.load_state_tensors(state, features)
    return n


# ---------------------------------------------------------------------------------------------------------------
# The loop


def stream_features(
    pipe,
    extractor,
    num_images: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 250,
    pipeline_kwargs: Optional[Mapping] = None,
    state_dir: Optional[str] = None,
    checkpoint_every: int = 10,
    settings: Optional[Mapping] = None,
    progress: bool = True,
) -> FeatureAccumulator:
    """Generate ``num_images`` images (seeds ``seed`` … ``seed + num_images − 1``) and accumulate their features.

    Each batch is quantised to 8 bits, as saved samples are (so the numbers equal those of ``generate.py``'s files
    scored by ``evaluate.py``), moved to the extractor's device and embedded at once.

    Args:
        pipe: see :func:`~.sampling.generate_batch`.
        extractor: a :class:`~.feature_extractors.FeatureExtractor`; its device holds the accumulator.
        num_images, num_inference_steps, seed, batch_size, pipeline_kwargs: what to generate.
        state_dir: where to checkpoint and resume (None: no checkpoints).
        checkpoint_every: batches between checkpoints (and one at the end).
        settings: a JSON-able record of everything that determines the images and features; a checkpoint with
            other settings is refused. The extractor's name is added to it.
        progress: show a tqdm bar with images/s and the time left.
    """
    from tqdm.auto import tqdm

    if num_images < 1 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError(f"num_images, batch_size and checkpoint_every must be >= 1, got {num_images}, {batch_size}, "
                         f"{checkpoint_every}")  # fmt: skip
    device = next(extractor.parameters()).device
    accumulator = FeatureAccumulator(extractor.feature_dim, extractor.num_classes, device)
    settings = {**(settings or {}), "feature_network": extractor.name, "seed": seed}
    done = 0
    if state_dir is not None:
        os.makedirs(state_dir, exist_ok=True)
        done = load_checkpoint(accumulator, state_dir, settings)
        if done > num_images:
            raise ValueError(f"{state_dir!r} already holds {done} images, more than num_images = {num_images}; ask "
                             f"for at least {done} or use another state folder")  # fmt: skip
        if done == 0:  # a readable copy of what the checkpoints record
            tmp = os.path.join(state_dir, f".{SETTINGS_FILE}.{os.getpid()}.partial")
            with open(tmp, "w") as f:
                json.dump(settings, f, indent=2, sort_keys=True)
            os.replace(tmp, os.path.join(state_dir, SETTINGS_FILE))
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    saved, batches_since_save = done, 0
    with tqdm(total=num_images, initial=done, unit="img", desc="evaluate", disable=not progress, smoothing=0.1) as bar:
        for start in range(seed + done, seed + num_images, batch_size):
            seeds = list(range(start, min(start + batch_size, seed + num_images)))
            images = generate_batch(pipe, seeds, num_inference_steps, **(pipeline_kwargs or {}))
            # the extractor checks the images on the host and moves them to its device
            accumulator.update(*extractor(match_channels(quantize(images), extractor.channels)))
            bar.update(len(seeds))
            batches_since_save += 1
            if state_dir is not None and batches_since_save == checkpoint_every:
                saved, batches_since_save = save_checkpoint(accumulator, state_dir, saved, settings), 0
    if state_dir is not None and accumulator.num_images > saved:
        save_checkpoint(accumulator, state_dir, saved, settings)
    return accumulator


def evaluate_pipeline(
    pipeline,
    num_images: int,
    reference="digits:train",
    feature_extractor=None,
    num_inference_steps: int = 18,
    seed: int = 0,
    batch_size: int = 250,
    pipeline_kwargs: Optional[Mapping] = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    cache_dir: Optional[str] = None,
    progress: bool = False,
) -> Dict[str, object]:
    """FD and KID of ``num_images`` images of ``pipeline`` against one reference, streamed (no image is kept).

    What a training loop calls every N steps with its EMA pipeline: nothing is written (no checkpoints), and the
    reference can be loaded once beforehand with :func:`~.evaluator.reference_statistics` and passed as a dict.

    Args:
        pipeline: a pipeline as :func:`~.sampling.generate_batch` takes it (e.g. ``EDMPipeline``).
        num_images: how many images; with ``num_images <= d`` the FD is None (see ``fd_undefined``), KID still runs.
        reference: a reference name (``digits:train``, a folder, an images ``.npz``, a statistics ``.npz``) or a
            dict with ``mu``, ``sigma`` and ``features`` (KID needs the features).
        feature_extractor: default: the shipped digits classifier (on the pipeline's device when it has one).
        num_inference_steps, seed, batch_size, pipeline_kwargs: what to generate (image i uses seed ``seed + i``).
        kid_subsets, kid_subset_size: see :func:`~.kid.kernel_inception_distance` (seed 0).
        cache_dir: the reference-statistics cache.
        progress: show a progress bar.

    Returns:
        ``fd``, ``kid``, ``kid_std`` (over the subsets), ``kid_se`` (standard error), ``num_images``, ``seconds`` (wall
        time, generation included) and, when the FD is undefined, ``fd_undefined``; plus the class statistics when the
        extractor classifies.
    """
    from .evaluator import reference_statistics, score_features
    from .feature_extractors import load_feature_extractor

    start = time.perf_counter()
    if feature_extractor is None:
        feature_extractor = load_feature_extractor("digits").to(getattr(pipeline, "device", "cpu"))
    if isinstance(reference, Mapping):
        stats, name = reference, "reference"
    else:
        stats, name = reference_statistics(feature_extractor, reference, cache_dir), str(reference)
    accumulator = stream_features(pipeline, feature_extractor, num_images, num_inference_steps, seed, batch_size,
                                  pipeline_kwargs, progress=progress)  # fmt: skip
    features = accumulator.features()
    mu = sigma = None
    if accumulator.num_images > accumulator.feature_dim:
        mu, sigma = accumulator.statistics()
    scores = score_features(features, {name: stats}, mu, sigma, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    result: Dict[str, object] = {key: scores[key][name] for key in ("fd", "kid", "kid_std", "kid_se", "precision", "recall")}
    if "fd_undefined" in scores:
        result["fd_undefined"] = scores["fd_undefined"]
    result.update(accumulator.class_statistics() or {})
    result["num_images"] = accumulator.num_images
    result["seconds"] = time.perf_counter() - start
    return result
