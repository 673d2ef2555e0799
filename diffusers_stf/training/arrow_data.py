"""Training images served from a memory-mapped ``datasets`` (Arrow) file instead of RAM.

The images are decoded, converted and resized once into a uint8 ``pixels`` column of fixed shape (C, H, W), written
to an Arrow cache file by ``datasets.Dataset.map``; the file is memory-mapped, so a set far larger than the memory
(ImageNet-64: 1.28 M images, 15.7 GB) trains with the pages of the current batches resident only. Batches and STF's
references are random-access reads of that file (Arrow ``take``).

:class:`ArrowImages` looks like the uint8 tensor (N, C, H, W) that :class:`~diffusers_stf.data.ImageData` holds in
memory, so ``ImageData(ArrowImages(...))`` serves the same batches, crops, flips and references: the maths of a run
does not depend on where its images live.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..data import GREY_MODES, HIGH_BIT_MODES, DataConfig, ImageData

logger = logging.getLogger(__name__)

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

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices) -> torch.Tensor:
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.ndim == 0:
            return self[indices.reshape(1)][0]
        if len(indices) == 0:
            return torch.zeros((0, *self.shape[1:]), dtype=torch.uint8)
        rows = self.dataset[indices.tolist()][PIXELS]
        return torch.from_numpy(np.ascontiguousarray(np.asarray(rows, dtype=np.uint8)))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def cache_files(self):
        """The Arrow files the images are read from (empty when the dataset lives in memory)."""
        return [f["filename"] for f in self.dataset.cache_files]


def _open(item):
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


def survey(dataset, column: str, resolution: Optional[int], channels: Optional[int],
           preserve_input_precision: bool = False) -> Dict:
    """Read every image's header (mode and size, no pixels) and decide the stored layout as
    :func:`~diffusers_stf.data.images_to_uint8` does: the channels (RGB when grey and colour images mix and
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
            image = _open(item)
        except Exception as err:  # PIL raises several types for unreadable files
            raise ValueError(f"cannot read image {i}: {err}") from err
        if preserve_input_precision and image.mode in HIGH_BIT_MODES:
            raise ValueError(f"--preserve_input_precision: image {i} has mode {image.mode} (more than 8 bits per "
                             "channel), but the training images are stored with 8 bits")
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


def _decode_batch(batch, indices, column, layout, center_crop, seed):
    from PIL import Image

    from ..data import derived_seed

    w, h = layout["size"]
    mode = "L" if layout["channels"] == 1 else "RGB"
    out = []
    for index, item in zip(indices, batch[column]):
        image = _open(item).convert(mode)
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
        preserve_input_precision: refuse images of more than 8 bits per channel.
        num_proc: decoding processes (``datasets.Dataset.map``); None: one.
    """
    import datasets

    layout = survey(dataset, column, resolution, channels, preserve_input_precision)
    w, h = layout["size"]
    os.makedirs(cache_root, exist_ok=True)
    path = arrow_cache_path(cache_root, dataset, layout, center_crop, seed)
    source = dataset
    if isinstance(dataset.features[column], datasets.Image):
        source = dataset.cast_column(column, datasets.Image(decode=False))
    features = datasets.Features({PIXELS: datasets.Array3D(shape=(layout["channels"], h, w), dtype="uint8")})
    prepared = source.map(
        _decode_batch, batched=True, batch_size=256, with_indices=True, remove_columns=source.column_names,
        features=features, cache_file_name=path, load_from_cache_file=True, num_proc=num_proc,
        fn_kwargs={"column": column, "layout": layout, "center_crop": center_crop, "seed": seed},
        desc="decoding images into a memory-mapped Arrow file",
    )
    if not prepared.cache_files:  # map kept it in memory: read it back memory-mapped
        prepared = datasets.Dataset.from_file(path)
    return ArrowImages(prepared)


def load_memory_mapped_images(dataset, config: DataConfig, cache_root: str, seed: int = 0,
                              labels: Optional[torch.Tensor] = None, name: str = "images",
                              source: Optional[str] = None, num_proc: Optional[int] = None) -> ImageData:
    """:class:`~diffusers_stf.data.ImageData` over :func:`prepare_arrow_images` of ``dataset`` with the serving
    options of ``config`` (``resolution``, ``channels``, ``center_crop``, ``random_flip``, ``image_column``)."""
    from ..data import image_column

    column = config.image_column or image_column(dataset)
    images = prepare_arrow_images(dataset, column, cache_root, config.resolution, config.channels, config.center_crop,
                                  seed, config.preserve_input_precision, num_proc)
    return ImageData(images, labels, config.resolution, config.center_crop, config.random_flip, name=name,
                     source=source or name)
