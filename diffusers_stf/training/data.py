"""Training images in memory, and a batch order that is a pure function of (seed, step).

The images are decoded once (through ``datasets``: a Hub dataset, an image folder, or the embedded digits of
:mod:`diffusers_stf.data`) into a uint8 tensor. Batches are drawn from a per-epoch permutation seeded by
(seed, epoch), and random crops/flips use the caller's generator, so a run resumed at step s sees exactly the batches
an uninterrupted run sees, with no sampler state to save.
"""

from __future__ import annotations

import io
import logging
import random
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch

from ..data import DIGITS_NAME, digits_tensor, image_column, load_digits_dataset, load_image_dataset
from .accelerator import derived_seed

logger = logging.getLogger(__name__)

MAX_IN_MEMORY_BYTES = 8 * 1024**3


def _draw(generator: Optional[torch.Generator], fn, *args, **kwargs) -> torch.Tensor:
    """Draw on the generator's device and return the result on the CPU, where the images live."""
    device = generator.device if generator is not None else "cpu"
    return fn(*args, generator=generator, device=device, **kwargs).cpu()


class ImageData(torch.utils.data.Dataset):
    """Training images held in memory as uint8 (N, C, H, W), served as float tensors in [−1, 1].

    Stored images may be larger than ``resolution`` along one side (non-square images); they are cropped per batch,
    at random or centred.

    Args:
        images: uint8 tensor (N, C, H, W) with H, W >= ``resolution``.
        labels: optional int64 tensor (N,), e.g. the digit classes.
        resolution: side length of the served images.
        center_crop: centred instead of random crops.
        random_flip: random left–right flips (only when a generator is given).
        name: the dataset's name (model card), e.g. a Hub id.
    """

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, resolution: Optional[int] = None,
                 center_crop: bool = False, random_flip: bool = False, name: str = "images"):
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) == 0:
            raise ValueError("the dataset contains no images")
        self.images = images
        self.labels = labels
        self.resolution = int(resolution or min(images.shape[-2:]))
        if min(images.shape[-2:]) < self.resolution:
            raise ValueError(f"images of size {tuple(images.shape[-2:])} are smaller than resolution {self.resolution}")
        self.center_crop, self.random_flip, self.name = center_crop, random_flip, name

    @classmethod
    def from_tensor(cls, images: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs) -> "ImageData":
        """From float images in [−1, 1] (N, C, H, W), quantised to uint8."""
        quantised = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return cls(quantised, labels, **kwargs)

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
        x = x.float().div_(127.5).sub_(1.0)
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


class EpochBatchSampler(torch.utils.data.Sampler):
    """A ``DataLoader`` batch sampler over one epoch of a :class:`BatchSchedule` (this process's shard)."""

    def __init__(self, schedule: BatchSchedule, epoch: int = 0, start_batch: int = 0):
        self.schedule, self.epoch, self.start_batch = schedule, epoch, start_batch

    def __len__(self) -> int:
        return self.schedule.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[List[int]]:
        first = self.epoch * self.schedule.batches_per_epoch
        for b in range(self.start_batch, self.schedule.batches_per_epoch):
            yield self.schedule.indices(first + b).tolist()


def make_dataloader(data: ImageData, batch_size: int, seed: int = 0, epoch: int = 0, num_processes: int = 1,
                    process_index: int = 0, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over one epoch of ``data`` in the order of :class:`BatchSchedule` (centred crops, no flips)."""
    schedule = BatchSchedule(len(data), batch_size, seed, num_processes, process_index)
    return torch.utils.data.DataLoader(data, batch_sampler=EpochBatchSampler(schedule, epoch), num_workers=num_workers)


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


def _mode_for(image, channels: Optional[int]) -> str:
    if channels is None:
        channels = 1 if image.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    return "L" if channels == 1 else "RGB"


def images_to_uint8(pil_images, resolution: Optional[int] = None, channels: Optional[int] = None,
                    center_crop: bool = False, seed: int = 0) -> torch.Tensor:
    """Decode PIL images into a uint8 tensor (N, C, H, W).

    With ``resolution``, the shorter side is resized to it (bilinear). Images keep their aspect ratio when they all
    end up with the same shape (cropped per batch later); otherwise each is cropped to a square here (centred, or at
    a seeded random position). Without ``resolution`` all images must have the same size.
    """
    from PIL import Image

    arrays, mode, rng = [], None, random.Random(seed)
    first_size = None
    for i, image in enumerate(pil_images):
        mode = mode or _mode_for(image, channels)
        image = image.convert(mode)
        w, h = image.size
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
            image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    if not arrays:
        raise ValueError("the dataset contains no images")
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
    stacked = np.stack(arrays)
    if stacked.nbytes > MAX_IN_MEMORY_BYTES:
        raise ValueError(f"the decoded images need {stacked.nbytes / 1e9:.1f} GB; lower --resolution or --max_train_samples")
    return torch.from_numpy(stacked)


def load_training_images(args, accelerator=None) -> ImageData:
    """The training set of the shared data options (see :func:`~diffusers_stf.training.args.add_data_args`).

    A Hub dataset (``--dataset_name``), an image folder (``--train_data_dir``) or, with neither, the embedded
    8×8 digits. Unreadable or empty folders, unreadable images and mixed sizes without ``--resolution`` raise a
    ``ValueError``.
    """
    import contextlib

    import datasets

    dataset_name = getattr(args, "dataset_name", None)
    train_data_dir = getattr(args, "train_data_dir", None)
    resolution, channels = getattr(args, "resolution", None), getattr(args, "channels", None)
    if dataset_name is None and train_data_dir is None and resolution in (None, 8) and channels in (None, 1):
        # The embedded digits at their native 8x8: skip the PNG round trip of the datasets.Dataset.
        images, labels = digits_tensor(getattr(args, "digits_split", "all"))
        if getattr(args, "max_train_samples", None):
            images, labels = images[:args.max_train_samples], labels[:args.max_train_samples]
        return ImageData.from_tensor(images, labels, resolution=8, random_flip=getattr(args, "random_flip", False),
                                     name=DIGITS_NAME)
    context = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with context:
        if dataset_name is None and train_data_dir is None:
            ds = load_digits_dataset(getattr(args, "digits_split", "all"))
            name = DIGITS_NAME
        else:
            ds = load_image_dataset(dataset_name, train_data_dir, getattr(args, "dataset_config_name", None),
                                    getattr(args, "cache_dir", None), split=getattr(args, "dataset_split", "train"))
            name = dataset_name or "imagefolder"
    if getattr(args, "max_train_samples", None):
        ds = ds.select(range(min(args.max_train_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError("the dataset contains no images")
    column = getattr(args, "image_column", None) or image_column(ds)
    if column not in ds.column_names:
        raise ValueError(f"--image_column {column!r} is not a column of the dataset (columns: {ds.column_names})")
    labels = None
    if "label" in ds.column_names and isinstance(ds.features.get("label"), (datasets.ClassLabel, datasets.Value)):
        try:
            labels = torch.tensor(ds["label"], dtype=torch.long)
        except (TypeError, ValueError):
            labels = None
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    raw = ds[column] if len(ds) <= 100_000 else (ex[column] for ex in ds)
    pil_images = (_open_image(item, i) for i, item in enumerate(raw))
    images = images_to_uint8(pil_images, getattr(args, "resolution", None), getattr(args, "channels", None),
                             getattr(args, "center_crop", False), getattr(args, "seed", 0) or 0)
    return ImageData(images, labels, getattr(args, "resolution", None), getattr(args, "center_crop", False),
                     getattr(args, "random_flip", False), name=name)
