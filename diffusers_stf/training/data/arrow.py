"""Training data memory-mapped from an Arrow file.

A set too large for ``MAX_IN_MEMORY_BYTES`` is decoded, converted and resized once into a uint8 ``pixels`` column of
fixed shape (C, H, W), written to an Arrow file by ``datasets.Dataset.map``. The file is memory-mapped, so a set far
larger than the memory (ImageNet-64: 1.28 M images, 15.7 GB) trains with only the pages of the current batches
resident; batches and STF's references are random-access reads (Arrow ``take``). :class:`ArrowImages` looks like the
uint8 tensor :class:`~diffusers_stf.training.data.images.ImageData` holds in memory, so the batches, crops, flips and
references are the same numbers either way.
"""

from __future__ import annotations

import collections
import io
import logging
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import decode
from .decode import HIGH_BIT_MODES, DecodeReport, describe, eight_bit, image_channels
from .schedule import derived_seed

logger = logging.getLogger(__name__)

PIXELS = "pixels"


class ArrowImages:
    """A uint8 image array (N, C, H, W) read from the ``pixels`` column of a memory-mapped ``datasets.Dataset``.

    Supports what :class:`~diffusers_stf.training.data.images.ImageData` uses: ``shape``, ``ndim``, ``dtype``,
    ``len`` and indexing with an integer tensor (a random-access batch read, returned as a CPU tensor).

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


def survey_report(image, report: DecodeReport):
    """What :func:`~diffusers_stf.training.data.decode.eight_bit` will do to ``image``, from its header: 16 bits,
    a palette, several frames, an alpha channel (whether it is transparent needs the pixels, read later)."""
    from .decode import ALPHA_MODES, SIXTEEN_BIT_MODES, grey_palette

    if getattr(image, "n_frames", 1) > 1:
        report.add("frames")
    if image.mode in SIXTEEN_BIT_MODES:
        report.add("sixteen_bit", image.mode)
    elif image.mode in ("P", "PA"):
        report.add("palette")
        if grey_palette(image):
            report.add("palette_grey")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        report.add("alpha")


def _resized_size(size: Tuple[int, int], resolution: Optional[int]) -> Tuple[int, int]:
    w, h = size
    if resolution is None or min(w, h) == resolution:
        return w, h
    scale = resolution / min(w, h)
    return max(resolution, round(w * scale)), max(resolution, round(h * scale))


def survey_images(dataset, column: str, resolution: Optional[int], channels: Optional[int],
           preserve_input_precision: bool = False) -> Dict:
    """Read every image's header (mode and size, no pixels) and decide the stored layout as
    :func:`~diffusers_stf.training.data.decode.decode_images` does: the channels (RGB when grey and colour images mix
    and ``channels`` is None), and either the common resized (W, H) or, when the resized sizes differ, square
    ``resolution`` crops. Returns ``{"channels", "size", "square_crops", "num_images"}``."""
    import datasets

    raw = dataset
    if isinstance(dataset.features[column], datasets.Image):
        raw = dataset.cast_column(column, datasets.Image(decode=False))
    kinds, sizes = set(), set()
    first_kind = None
    report = DecodeReport()
    for i, item in enumerate(raw[column] if len(raw) <= 100_000 else (ex[column] for ex in raw)):
        try:
            image = _open_lazily(item)
        except Exception as err:  # PIL raises several types for unreadable files
            raise ValueError(f"cannot read image {i}: {err}") from err
        if image.mode == "F":
            raise ValueError(f"{describe(image, i)} has mode F (32-bit float), which has no full-scale value to map "
                             "to [-1, 1]; convert it to 8- or 16-bit integer images")
        survey_report(image, report)
        if preserve_input_precision and image.mode in HIGH_BIT_MODES:
            raise ValueError(f"--preserve_input_precision: image {i} has mode {image.mode} (more than 8 bits per "
                             "channel), but the memory-mapped Arrow file used for sets over the in-memory cap "
                             f"MAX_IN_MEMORY_BYTES ({decode.MAX_IN_MEMORY_BYTES / 1e9:.1f} GB) stores 8 bits; lower "
                             "--resolution or --max_train_samples to fit the cap, or drop --preserve_input_precision")
        kind = image_channels(image)
        first_kind = first_kind or kind
        kinds.add(kind)
        if resolution is None and sizes and image.size not in sizes:
            first = next(iter(sizes))
            raise ValueError(f"images have mixed sizes ({first[0]}x{first[1]} and {image.size[0]}x{image.size[1]} at "
                             f"image {i}); pass --resolution to resize them to a common size")
        sizes.add(_resized_size(image.size, resolution))
    if not sizes:
        raise ValueError("the dataset contains no images")
    report.warn()
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
    out = []
    for index, item in zip(indices, batch[column]):
        image = eight_bit(_open_lazily(item), index, layout["channels"])
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
    c = channels or image_channels(image)
    bytes_per_value = 2 if preserve_input_precision and image.mode in HIGH_BIT_MODES else 1
    return len(dataset) * c * h * w * bytes_per_value
