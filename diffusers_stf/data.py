"""Image data: the embedded 8×8 digits (no network needed), Hub datasets and image folders through ``datasets``,
and the training set in memory with a batch order that is a pure function of (seed, step).

Everything downstream sees images as float tensors in [−1, 1], shape (C, H, W).

Training images are decoded once into a uint8 tensor (uint16 for 16-bit images with ``preserve_input_precision``)
(:class:`ImageData`), or, for a set larger than
``MAX_IN_MEMORY_BYTES``, into a memory-mapped Arrow file that :class:`ArrowImages` reads like that tensor. Batches
come from a per-epoch permutation seeded by (seed, epoch) (:class:`BatchSchedule`), and random crops/flips use the
caller's generator, so a run resumed at step s sees exactly the batches an uninterrupted run sees, with no sampler state
to save.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import random
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------------------------------
# Training data in memory

MAX_IN_MEMORY_BYTES = 8 * 1024**3
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "F")


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the integer ``keys`` (e.g. seed, step, process index).

    Per-step generators seeded this way make a resumed run draw exactly the noise of an uninterrupted one.
    """
    high, low = (int(v) for v in np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32))
    return ((high << 32) | low) & ((1 << 63) - 1)


@dataclass
class DataConfig:
    """Where the training images come from and how they are served (the ``data`` options of the training scripts).

    Args:
        dataset_name: a Hub dataset id (or local dataset folder) for ``datasets.load_dataset``.
        dataset_config_name: its configuration.
        dataset_split: the split to read.
        train_data_dir: a folder of images (``imagefolder`` builder). With neither source, the embedded digits.
        digits_split: ``all`` (1797) or ``train`` (797) digits.
        image_column: the image column (default: ``image``, ``img`` or the first ``Image`` feature).
        cache_dir: the ``datasets`` cache folder.
        resolution: side length of the served images (the shorter side is resized to it); None: the images' own size.
        channels: 1 (grey) or 3 (RGB); None: the images' own, RGB when a folder mixes grey and colour images.
        center_crop: centred instead of random crops.
        random_flip: random left–right flips.
        max_train_samples: use only the first N images.
        preserve_input_precision: keep images of more than 8 bits per channel (16-bit PNG/TIFF, PIL modes ``I;16*``
            and ``I``) at 16 bits instead of reducing them to 8 (stored as uint16, served as x / 65535 · 2 − 1).
    """

    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    dataset_split: str = "train"
    train_data_dir: Optional[str] = None
    digits_split: str = "all"
    image_column: Optional[str] = None
    cache_dir: Optional[str] = None
    resolution: Optional[int] = None
    channels: Optional[int] = None
    center_crop: bool = False
    random_flip: bool = False
    max_train_samples: Optional[int] = None
    preserve_input_precision: bool = False

    def __post_init__(self):
        if self.dataset_name and self.train_data_dir:
            raise ValueError("give either --dataset_name or --train_data_dir, not both")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"--channels must be 1 or 3, got {self.channels}")
        if self.digits_split not in ("all", "train"):
            raise ValueError(f"--digits_split must be 'all' or 'train', got {self.digits_split!r}")
        for name in ("resolution", "max_train_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")


def _draw(generator: Optional[torch.Generator], fn, *args, **kwargs) -> torch.Tensor:
    """Draw on the generator's device and return the result on the CPU, where the images live."""
    device = generator.device if generator is not None else "cpu"
    return fn(*args, generator=generator, device=device, **kwargs).cpu()


# Full-scale value of each supported storage dtype: a stored value x is served as x / full_scale · 2 − 1.
FULL_SCALE = {torch.uint8: 255, torch.uint16: 65535}


class ImageData(torch.utils.data.Dataset):
    """Training images held in memory as uint8 (or, for 16-bit sources, uint16) (N, C, H, W), served as float tensors
    in [−1, 1].

    Stored images may be larger than ``resolution`` along one side (non-square images); they are cropped per batch,
    at random or centred.

    Args:
        images: uint8 or uint16 tensor (N, C, H, W) with H, W >= ``resolution``.
        labels: optional int64 tensor (N,), e.g. the digit classes.
        resolution: side length of the served images.
        center_crop: centred instead of random crops.
        random_flip: random left–right flips (only when a generator is given).
        name: the dataset's name (model card), e.g. a Hub id.
        source: where the images were read from (a folder's absolute path, a Hub id); part of a run's fingerprint.
    """

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, resolution: Optional[int] = None,
                 center_crop: bool = False, random_flip: bool = False, name: str = "images",
                 source: Optional[str] = None):
        if images.ndim != 4 or images.dtype not in FULL_SCALE:
            raise ValueError(f"images must be a uint8 or uint16 tensor (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if len(images) == 0:
            raise ValueError("the dataset contains no images")
        self.images = images
        self.labels = labels
        self.resolution = int(resolution or min(images.shape[-2:]))
        if min(images.shape[-2:]) < self.resolution:
            raise ValueError(f"images of size {tuple(images.shape[-2:])} are smaller than resolution {self.resolution}")
        self.center_crop, self.random_flip, self.name = center_crop, random_flip, name
        self.source = source or name

    @classmethod
    def from_tensor(cls, images: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs) -> "ImageData":
        """From float images in [−1, 1] (N, C, H, W), quantised to uint8."""
        quantised = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return cls(quantised, labels, **kwargs)

    def subset(self, indices: torch.Tensor) -> "ImageData":
        """The images ``indices`` (with their labels) as a new :class:`ImageData` with the same settings."""
        labels = self.labels[indices] if self.labels is not None else None
        return ImageData(self.images[indices], labels, self.resolution, self.center_crop, self.random_flip, self.name,
                         self.source)

    def split_heldout(self, k: int, seed: int):
        """(training part, held-out part) with ``k`` images held out at random, fixed by ``seed``; (self, None) for
        k = 0."""
        if k == 0:
            return self, None
        if k >= len(self):
            raise ValueError(f"holding out {k} images (--num_heldout_images) leaves no training images out of "
                             f"{len(self)}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(order[k:].sort().values), self.subset(order[:k].sort().values)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.batch(torch.tensor([int(index)])).items()}

    def batch(self, indices: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Images ``indices`` as ``{"images": float (B, C, R, R) in [−1, 1], "index": (B,), "labels": (B,)}``.

        With a ``generator``, crops are random (unless ``center_crop``) and images are flipped when ``random_flip``;
        without one, crops are centred and nothing is flipped.
        """
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        x = self.images[indices]
        r, (h, w) = self.resolution, x.shape[-2:]
        if (h, w) != (r, r):
            if self.center_crop or generator is None:
                top, left = (h - r) // 2, (w - r) // 2
                x = x[..., top:top + r, left:left + r]
            else:
                tops = _draw(generator, torch.randint, 0, h - r + 1, (len(x),)).tolist()
                lefts = _draw(generator, torch.randint, 0, w - r + 1, (len(x),)).tolist()
                x = torch.stack([im[:, t:t + r, s:s + r] for im, t, s in zip(x, tops, lefts)])
        x = x.float().div_(FULL_SCALE[self.images.dtype] / 2).sub_(1.0)
        if self.random_flip and generator is not None:
            flip = _draw(generator, torch.rand, len(x)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        out = {"images": x, "index": indices}
        if self.labels is not None:
            out["labels"] = self.labels[indices]
        return out

    def random_batch(self, k: int, generator: Optional[torch.Generator] = None,
                     exclude: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """``k`` random images, distinct from each other and from ``exclude`` while the dataset has enough of them
        (with replacement beyond that), transformed as in :meth:`batch`."""
        if k <= 0:
            return self.batch(torch.zeros(0, dtype=torch.long), generator)
        n = len(self)
        keep = torch.ones(n, dtype=torch.bool)
        if exclude is not None and len(exclude):
            keep[torch.as_tensor(exclude, dtype=torch.long).cpu()] = False
        pool = keep.nonzero().squeeze(1)
        if len(pool) == 0:
            pool = torch.arange(n)
        order = pool[_draw(generator, torch.randperm, len(pool))]
        if k > len(order):
            order = torch.cat([order, _draw(generator, torch.randint, 0, n, (k - len(order),))])
        return self.batch(order[:k], generator)


class BatchSchedule:
    """Which images each process uses at each micro-step: epochs are permutations seeded by (seed, epoch); a global
    batch of ``batch_size · num_processes`` images is split into contiguous per-process shards; the last incomplete
    global batch of an epoch is dropped.

    Args:
        num_items: dataset size.
        batch_size: images per process per micro-step.
        seed: the training seed.
        num_processes, process_index: the data-parallel layout.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int = 0, num_processes: int = 1, process_index: int = 0):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.global_batch = batch_size * num_processes
        if self.global_batch > num_items:
            raise ValueError(
                f"the global batch (train_batch_size {batch_size} x {num_processes} processes = {self.global_batch}) "
                f"exceeds the dataset size {num_items}"
            )
        self.batches_per_epoch = num_items // self.global_batch
        self._cache = (None, None)

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cache[0] != epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, epoch, 0x5EED))
            self._cache = (epoch, torch.randperm(self.num_items, generator=g))
        return self._cache[1]

    def indices(self, micro_step: int) -> torch.Tensor:
        """This process's image indices at (0-based) ``micro_step``."""
        epoch, position = divmod(int(micro_step), self.batches_per_epoch)
        start = position * self.global_batch + self.process_index * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size]

    def epoch(self, micro_step: int) -> int:
        return int(micro_step) // self.batches_per_epoch


def _open_image(item, index: int):
    from PIL import Image

    path = None
    try:
        if isinstance(item, dict):
            path = item.get("path")
            data = item.get("bytes")
            image = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
        else:  # already a PIL image
            image = item
        image.load()
        return image
    except Exception as err:  # PIL raises several types for unreadable files
        where = f" ({path})" if path else ""
        raise ValueError(f"cannot read image {index}{where}: {err}") from err


def _image_channels(image) -> int:
    return 1 if image.mode in GREY_MODES else 3


def _sixteen_bit_grey(image, index: int) -> np.ndarray:
    """The pixels of a greyscale image of more than 8 bits (PIL modes ``I;16*`` and ``I``) as uint16 (H, W)."""
    if image.mode == "F":
        raise ValueError(f"--preserve_input_precision: image {index} has mode F (32-bit float), which has no "
                         "full-scale value to map to [-1, 1]; allowed: 8-bit images and 16-bit integer images (modes I;16, I;16B, "
                         "I;16L, and I with values in [0, 65535])")
    values = np.asarray(image)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"--preserve_input_precision: image {index} has mode {image.mode} with values in "
                         f"[{values.min()}, {values.max()}], outside the 16-bit range [0, 65535] that is stored")
    return values.astype(np.uint16)


def _resize_sixteen_bit(grey: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint16 (H, W) array to ``size`` (W, H) in PIL's 32-bit float mode, which holds every
    16-bit value exactly (PIL's 8-bit modes would drop the low byte)."""
    from PIL import Image

    resized = np.asarray(Image.fromarray(grey.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    return np.clip(np.round(resized), 0, 65535).astype(np.uint16)


def decode_images(pil_images: Iterable, resolution: Optional[int] = None, channels: Optional[int] = None,
                  center_crop: bool = False, seed: int = 0, preserve_input_precision: bool = False) -> torch.Tensor:
    """Decode PIL images into a uint8 tensor (N, C, H, W), or uint16 when ``preserve_input_precision`` and any image
    has more than 8 bits per channel.

    Every image is converted to ``channels`` (1: PIL's ``L``, 3: ``RGB``). Without ``channels``, the images' own
    number; when they mix grey and colour images, a warning, and RGB (a grey image converted to RGB repeats its one
    channel three times, as PIL's ``convert("RGB")`` does).

    With ``resolution``, the shorter side is resized to it (bilinear). Images keep their aspect ratio when they all
    end up with the same shape (cropped per batch later); otherwise each is cropped to a square here (centred, or at
    a seeded random position). Without ``resolution`` all images must have the same size.

    With ``preserve_input_precision``, 16-bit greyscale images (PIL modes ``I;16*``, or ``I`` with values in
    [0, 65535]) keep their 16 bits: they are resized in PIL's float mode and made RGB by repeating the channel in
    numpy, never through PIL's 8-bit modes; if any image is 16-bit, the 8-bit ones are stored as x · 257, the same
    fraction x / 255 of full scale. PIL decodes 16-bit colour PNGs as 8-bit RGB, so their low bytes are not recoverable
    here. Mode ``F`` (float) images are refused.
    """
    from PIL import Image

    arrays, rng = [], random.Random(seed)
    first_size, first_kind, mixed_at = None, None, None
    target = channels
    for i, image in enumerate(pil_images):
        sixteen_bit = preserve_input_precision and image.mode in HIGH_BIT_MODES
        kind = _image_channels(image)
        if first_kind is None:
            first_kind = (kind, image.mode)
        elif kind != first_kind[0] and mixed_at is None:
            mixed_at = (i, image.mode)
            if channels is None and target == 1:  # the grey images read so far become RGB
                arrays = [np.repeat(a, 3, axis=0) for a in arrays]
        if target is None or (channels is None and mixed_at is not None):
            target = 3 if mixed_at is not None else kind
        if sixteen_bit:
            grey = _sixteen_bit_grey(image, i)
        else:
            image = image.convert("L" if target == 1 else "RGB")
        w, h = image.size
        size = (w, h)
        if resolution is None:
            if first_size is None:
                first_size = (w, h)
            elif (w, h) != first_size:
                raise ValueError(
                    f"images have mixed sizes ({first_size[0]}x{first_size[1]} and {w}x{h} at image {i}); "
                    "pass --resolution to resize them to a common size"
                )
        elif min(w, h) != resolution:
            scale = resolution / min(w, h)
            size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        if sixteen_bit:
            if size != (w, h):
                grey = _resize_sixteen_bit(grey, size)
            arrays.append(np.repeat(grey[None], target, axis=0))
            continue
        if size != (w, h):
            image = image.resize(size, Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    if not arrays:
        raise ValueError("the dataset contains no images")
    if any(a.dtype == np.uint16 for a in arrays):
        # x · 257 / 65535 = x / 255: an 8-bit image keeps its values in a 16-bit set
        arrays = [a if a.dtype == np.uint16 else a.astype(np.uint16) * np.uint16(257) for a in arrays]
    if mixed_at is not None:
        logger.warning(
            "the images mix greyscale and colour (image 0 is %s, image %d is %s); converting all of them to %s%s",
            first_kind[1], mixed_at[0], mixed_at[1], "greyscale (L)" if target == 1 else "RGB",
            " as --channels asks" if channels is not None else "; pass --channels 1 or 3 to choose",
        )
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        side = resolution
        logger.warning("images have different aspect ratios: cropping each to %dx%d once at load time", side, side)
        cropped = []
        for a in arrays:
            h, w = a.shape[-2:]
            top = (h - side) // 2 if center_crop else rng.randint(0, h - side)
            left = (w - side) // 2 if center_crop else rng.randint(0, w - side)
            cropped.append(a[:, top:top + side, left:left + side])
        arrays = cropped
    nbytes = sum(a.nbytes for a in arrays)
    if nbytes > MAX_IN_MEMORY_BYTES:
        raise ValueError(f"the decoded images need {nbytes / 1e9:.1f} GB; lower --resolution or --max_train_samples")
    return torch.from_numpy(np.stack(arrays))


# ---------------------------------------------------------------------------------------------------------------------
# Training data memory-mapped from an Arrow file
#
# A set too large for MAX_IN_MEMORY_BYTES is decoded, converted and resized once into a uint8 ``pixels`` column of
# fixed shape (C, H, W), written to an Arrow file by ``datasets.Dataset.map``. The file is memory-mapped, so a set far
# larger than the memory (ImageNet-64: 1.28 M images, 15.7 GB) trains with only the pages of the current batches
# resident; batches and STF's references are random-access reads (Arrow ``take``). ArrowImages looks like the uint8
# tensor ImageData holds in memory, so the batches, crops, flips and references are the same numbers either way.

PIXELS = "pixels"


class ArrowImages:
    """A uint8 image array (N, C, H, W) read from the ``pixels`` column of a memory-mapped ``datasets.Dataset``.

    Supports what :class:`~diffusers_stf.data.ImageData` uses: ``shape``, ``ndim``, ``dtype``, ``len`` and indexing
    with an integer tensor (a random-access batch read, returned as a CPU tensor).

    Args:
        dataset: a ``datasets.Dataset`` with a ``pixels`` column of feature ``Array3D(shape=(C, H, W), dtype="uint8")``.
    """

    dtype = torch.uint8
    ndim = 4

    def __init__(self, dataset):
        import datasets

        feature = dataset.features.get(PIXELS)
        if not isinstance(feature, datasets.Array3D) or feature.dtype != "uint8":
            raise ValueError(f"the dataset needs a {PIXELS!r} column of Array3D uint8 (C, H, W), got {feature}")
        self.dataset = dataset.with_format("numpy", columns=[PIXELS])
        self.shape = torch.Size((len(dataset), *feature.shape))
        self._pool = None
        self._pending: "collections.OrderedDict" = collections.OrderedDict()
        self.prefetched_reads = 0  # reads answered by a background read (for the run's reports and the tests)

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, indices: List[int]) -> torch.Tensor:
        rows = self.dataset[indices][PIXELS]
        return torch.from_numpy(np.ascontiguousarray(np.asarray(rows, dtype=np.uint8)))

    def __getitem__(self, indices) -> torch.Tensor:
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.ndim == 0:
            return self[indices.reshape(1)][0]
        if len(indices) == 0:
            return torch.zeros((0, *self.shape[1:]), dtype=torch.uint8)
        key = tuple(indices.tolist())
        pending = self._pending.pop(key, None)
        if pending is not None:
            self.prefetched_reads += 1
            return pending.result()
        return self._read(list(key))

    def start_prefetch(self, num_threads: int):
        """Read the rows named by :meth:`prefetch` in ``num_threads`` background threads (``--dataloader_num_workers``).

        The page faults of the next batches' reads then overlap the current step. A prefetched read is the same
        function of the same indices as a direct one, so the rows are identical."""
        from concurrent.futures import ThreadPoolExecutor

        if num_threads < 1:
            raise ValueError(f"--dataloader_num_workers must be >= 1 to prefetch, got {num_threads}")
        self.stop_prefetch()
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="arrow-prefetch")
        self._max_pending = 2 * num_threads

    def prefetch(self, indices: torch.Tensor):
        """Start reading rows ``indices`` in the background; the next read of exactly these indices returns them."""
        key = tuple(torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist())
        if self._pool is None or not key or key in self._pending:
            return
        self._pending[key] = self._pool.submit(self._read, list(key))
        while len(self._pending) > self._max_pending:  # reads nobody asked for (e.g. past the run's end) are dropped
            self._pending.popitem(last=False)

    def stop_prefetch(self):
        """Stop the background threads and drop reads not yet asked for."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._pending.clear()

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def cache_files(self):
        """The Arrow files the images are read from (empty when the dataset lives in memory)."""
        return [f["filename"] for f in self.dataset.cache_files]


def _open_lazily(item):
    """A PIL image of a ``datasets`` image cell (bytes or path, or already PIL); only its header is read."""
    from PIL import Image

    if isinstance(item, dict):
        data = item.get("bytes")
        return Image.open(io.BytesIO(data)) if data is not None else Image.open(item["path"])
    return item


def _resized_size(size: Tuple[int, int], resolution: Optional[int]) -> Tuple[int, int]:
    w, h = size
    if resolution is None or min(w, h) == resolution:
        return w, h
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def survey_images(dataset, column: str, resolution: Optional[int], channels: Optional[int],
           preserve_input_precision: bool = False) -> Dict:
    """Read every image's header (mode and size, no pixels) and decide the stored layout as
    :func:`~diffusers_stf.data.decode_images` does: the channels (RGB when grey and colour images mix and
    ``channels`` is None), and either the common resized (W, H) or, when the resized sizes differ, square
    ``resolution`` crops. Returns ``{"channels", "size", "square_crops", "num_images"}``."""
    import datasets

    raw = dataset
    if isinstance(dataset.features[column], datasets.Image):
        raw = dataset.cast_column(column, datasets.Image(decode=False))
    kinds, sizes = set(), set()
    first_kind = None
    for i, item in enumerate(raw[column] if len(raw) <= 100_000 else (ex[column] for ex in raw)):
        try:
            image = _open_lazily(item)
        except Exception as err:  # PIL raises several types for unreadable files
            raise ValueError(f"cannot read image {i}: {err}") from err
        if preserve_input_precision and image.mode in HIGH_BIT_MODES:
            raise ValueError(f"--preserve_input_precision: image {i} has mode {image.mode} (more than 8 bits per "
                             "channel), but the memory-mapped Arrow file used for sets over the in-memory cap "
                             f"MAX_IN_MEMORY_BYTES ({MAX_IN_MEMORY_BYTES / 1e9:.1f} GB) stores 8 bits; lower "
                             "--resolution or --max_train_samples to fit the cap, or drop --preserve_input_precision")
        kind = 1 if image.mode in GREY_MODES else 3
        first_kind = first_kind or kind
        kinds.add(kind)
        if resolution is None and sizes and image.size not in sizes:
            first = next(iter(sizes))
            raise ValueError(f"images have mixed sizes ({first[0]}x{first[1]} and {image.size[0]}x{image.size[1]} at "
                             f"image {i}); pass --resolution to resize them to a common size")
        sizes.add(_resized_size(image.size, resolution))
    if not sizes:
        raise ValueError("the dataset contains no images")
    target = channels or (3 if len(kinds) > 1 else first_kind)
    if channels is None and len(kinds) > 1:
        logger.warning("the images mix greyscale and colour; converting all of them to RGB; pass --channels 1 or 3 "
                       "to choose")
    square = len(sizes) > 1
    size = (resolution, resolution) if square else next(iter(sizes))
    return {"channels": target, "size": size, "square_crops": square, "num_images": len(raw)}


def _decode_to_pixels(batch, indices, column, layout, center_crop, seed):
    from PIL import Image

    w, h = layout["size"]
    mode = "L" if layout["channels"] == 1 else "RGB"
    out = []
    for index, item in zip(indices, batch[column]):
        image = _open_lazily(item).convert(mode)
        size = _resized_size(image.size, min(w, h))
        if image.size != size:
            image = image.resize(size, Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        if array.shape[-2:] != (h, w):  # another aspect ratio: a square crop, centred or at a seeded position
            rng = np.random.default_rng(derived_seed(seed, index, 0xC209))
            ih, iw = array.shape[-2:]
            top = (ih - h) // 2 if center_crop else int(rng.integers(0, ih - h + 1))
            left = (iw - w) // 2 if center_crop else int(rng.integers(0, iw - w + 1))
            array = array[:, top:top + h, left:left + w]
        out.append(array)
    return {PIXELS: out}


def arrow_cache_path(cache_root: str, dataset, layout: Dict, center_crop: bool, seed: int) -> str:
    """The Arrow file of a dataset's prepared pixels: a name that changes with the source and the layout."""
    import hashlib

    key = repr((getattr(dataset, "_fingerprint", None), len(dataset), layout, center_crop, seed))
    return os.path.join(cache_root, f"pixels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.arrow")


def prepare_arrow_images(dataset, column: str, cache_root: str, resolution: Optional[int] = None,
                         channels: Optional[int] = None, center_crop: bool = False, seed: int = 0,
                         preserve_input_precision: bool = False, num_proc: Optional[int] = None) -> ArrowImages:
    """Decode ``dataset[column]`` once into a memory-mapped uint8 Arrow file under ``cache_root`` (reused when it
    exists) and return it as :class:`ArrowImages`.

    Args:
        dataset: a ``datasets.Dataset`` with an image column.
        column: the image column.
        cache_root: folder of the Arrow file.
        resolution: the shorter side is resized to it; images whose resized shapes differ are cropped to squares here
            (centred with ``center_crop``, else at a position seeded by (``seed``, index)).
        channels: 1 or 3; None: the images' own (RGB when they mix).
        preserve_input_precision: refuse images of more than 8 bits per channel (the file stores 8 bits).
        num_proc: decoding processes (``datasets.Dataset.map``); None: one.
    """
    import datasets

    layout = survey_images(dataset, column, resolution, channels, preserve_input_precision)
    w, h = layout["size"]
    os.makedirs(cache_root, exist_ok=True)
    path = arrow_cache_path(cache_root, dataset, layout, center_crop, seed)
    source = dataset
    if isinstance(dataset.features[column], datasets.Image):
        source = dataset.cast_column(column, datasets.Image(decode=False))
    features = datasets.Features({PIXELS: datasets.Array3D(shape=(layout["channels"], h, w), dtype="uint8")})
    prepared = source.map(
        _decode_to_pixels, batched=True, batch_size=256, with_indices=True, remove_columns=source.column_names,
        features=features, cache_file_name=path, load_from_cache_file=True, num_proc=num_proc,
        fn_kwargs={"column": column, "layout": layout, "center_crop": center_crop, "seed": seed},
        desc="decoding images into a memory-mapped Arrow file",
    )
    if not prepared.cache_files:  # map kept it in memory: read it back memory-mapped
        prepared = datasets.Dataset.from_file(path)
    return ArrowImages(prepared)


def decoded_bytes_estimate(dataset, column: str, resolution: Optional[int], channels: Optional[int],
                           preserve_input_precision: bool = False) -> int:
    """The memory the decoded set would take, from the first image's header: N · C · H · W bytes after resizing
    (twice that when ``preserve_input_precision`` keeps the first image at 16 bits)."""
    import datasets

    raw = dataset
    if isinstance(dataset.features[column], datasets.Image):
        raw = dataset.cast_column(column, datasets.Image(decode=False))
    image = _open_lazily(raw[0][column])
    w, h = _resized_size(image.size, resolution)
    c = channels or (1 if image.mode in GREY_MODES else 3)
    bytes_per_value = 2 if preserve_input_precision and image.mode in HIGH_BIT_MODES else 1
    return len(dataset) * c * h * w * bytes_per_value


def load_training_images(config: DataConfig, seed: int = 0, accelerator=None) -> ImageData:
    """The training set described by ``config``: a Hub dataset, an image folder or, with neither, the embedded 8×8
    digits. Unreadable or empty folders, unreadable images and mixed sizes without ``resolution`` raise a
    ``ValueError``; ``seed`` fixes the load-time crops of images with other aspect ratios."""
    import contextlib

    import datasets

    if config.dataset_name is None and config.train_data_dir is None and config.resolution in (None, 8) \
            and config.channels in (None, 1):
        # The embedded digits at their native 8x8: skip the PNG round trip of the datasets.Dataset.
        images, labels = digits_tensor(config.digits_split)
        if config.max_train_samples:
            images, labels = images[:config.max_train_samples], labels[:config.max_train_samples]
        return ImageData.from_tensor(images, labels, resolution=8, random_flip=config.random_flip, name=DIGITS_NAME,
                                     source=f"{DIGITS_NAME}:{config.digits_split}")
    context = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with context:
        if config.dataset_name is None and config.train_data_dir is None:
            ds = load_digits_dataset(config.digits_split)
            name, source = DIGITS_NAME, f"{DIGITS_NAME}:{config.digits_split}"
        else:
            ds = load_image_dataset(config.dataset_name, config.train_data_dir, config.dataset_config_name,
                                    config.cache_dir, split=config.dataset_split)
            name = config.dataset_name or "imagefolder"
            source = config.dataset_name or os.path.abspath(config.train_data_dir)
            source = f"{source}:{config.dataset_config_name or ''}:{config.dataset_split}"
    if config.max_train_samples:
        ds = ds.select(range(min(config.max_train_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError("the dataset contains no images")
    column = config.image_column or image_column(ds)
    if column not in ds.column_names:
        raise ValueError(f"--image_column {column!r} is not a column of the dataset (columns: {ds.column_names})")
    labels = None
    if "label" in ds.column_names and isinstance(ds.features.get("label"), (datasets.ClassLabel, datasets.Value)):
        try:
            labels = torch.tensor(ds["label"], dtype=torch.long)
        except (TypeError, ValueError):
            labels = None
    estimate = decoded_bytes_estimate(ds, column, config.resolution, config.channels, config.preserve_input_precision)
    if estimate > MAX_IN_MEMORY_BYTES:
        cache_root = os.path.join(config.cache_dir or datasets.config.HF_DATASETS_CACHE, "diffusers_stf_pixels")
        with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
            images = prepare_arrow_images(ds, column, cache_root, config.resolution, config.channels,
                                          config.center_crop, seed, config.preserve_input_precision)
        (accelerator.print if accelerator is not None else logger.warning)(
            f"{len(ds)} images need about {estimate / 1e9:.1f} GB decoded, over the in-memory cap of "
            f"{MAX_IN_MEMORY_BYTES / 1e9:.1f} GB: serving them from the memory-mapped file {images.cache_files()[0]}")
        return ImageData(images, labels, config.resolution, config.center_crop, config.random_flip, name=name,
                         source=source)
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    raw = ds[column] if len(ds) <= 100_000 else (ex[column] for ex in ds)
    pil_images = (_open_image(item, i) for i, item in enumerate(raw))
    images = decode_images(pil_images, config.resolution, config.channels, config.center_crop, seed,
                             config.preserve_input_precision)
    return ImageData(images, labels, config.resolution, config.center_crop, config.random_flip, name=name,
                     source=source)
