"""The training set of a :class:`~diffusers_stf.training.data.config.DataConfig`: a Hub dataset or an image folder
read through ``datasets`` (as diffusers' ``train_unconditional.py`` reads them), or the embedded digits; decoded into
memory, or into a memory-mapped Arrow file when it is larger than ``MAX_IN_MEMORY_BYTES``."""

from __future__ import annotations

import logging
import os
from typing import Optional

from ...digits import DIGITS_NAME, digits_tensor, load_digits_dataset
from . import decode
from .arrow import decoded_bytes_estimate, prepare_arrow_images
from .config import DataConfig
from .decode import _open_image, decode_images
from .fingerprint import folder_fingerprint
from .images import ImageData
from .labels import DEFAULT_LABEL_COLUMN, read_labels

logger = logging.getLogger(__name__)

DIGITS_CLASSES = [str(i) for i in range(10)]


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


def load_training_images(config: DataConfig, seed: int = 0, accelerator=None) -> ImageData:
    """The training set described by ``config``: a Hub dataset, an image folder or, with neither, the embedded 8×8
    digits. Unreadable or empty folders, unreadable images and mixed sizes without ``resolution`` raise a
    ``ValueError``; ``seed`` fixes the load-time crops of images with other aspect ratios."""
    import contextlib

    import datasets

    if config.dataset_name is None and config.train_data_dir is None and config.resolution in (None, 8) \
            and config.channels in (None, 1):
        # The embedded digits at their native 8x8: skip the PNG round trip of the datasets.Dataset.
        if config.label_column not in (None, DEFAULT_LABEL_COLUMN):
            raise ValueError(f"--label_column {config.label_column!r} is not a column of the embedded digits (columns: "
                             f"['image', {DEFAULT_LABEL_COLUMN!r}])")
        images, labels = digits_tensor(config.digits_split)
        if config.max_train_samples:
            images, labels = images[:config.max_train_samples], labels[:config.max_train_samples]
        return ImageData.from_tensor(images, labels, resolution=8, random_flip=config.random_flip, name=DIGITS_NAME,
                                     source=f"{DIGITS_NAME}:{config.digits_split}", class_names=DIGITS_CLASSES)
    context = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    content = None
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
            local = config.train_data_dir or config.dataset_name
            if os.path.isdir(local):  # a folder of files: they are fingerprinted; a Hub dataset is not
                content = folder_fingerprint(local, config.dataset_fingerprint)
    if config.max_train_samples:
        ds = ds.select(range(min(config.max_train_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError("the dataset contains no images")
    column = config.image_column or image_column(ds)
    if column not in ds.column_names:
        raise ValueError(f"--image_column {column!r} is not a column of the dataset (columns: {ds.column_names})")
    labels, class_names = read_labels(ds, config.label_column)
    estimate = decoded_bytes_estimate(ds, column, config.resolution, config.channels, config.preserve_input_precision)
    if estimate > decode.MAX_IN_MEMORY_BYTES:
        cache_root = os.path.join(config.cache_dir or datasets.config.HF_DATASETS_CACHE, "diffusers_stf_pixels")
        with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
            images = prepare_arrow_images(ds, column, cache_root, config.resolution, config.channels,
                                          config.center_crop, seed, config.preserve_input_precision)
        (accelerator.print if accelerator is not None else logger.warning)(
            f"{len(ds)} images need about {estimate / 1e9:.1f} GB decoded, over the in-memory cap of "
            f"{decode.MAX_IN_MEMORY_BYTES / 1e9:.1f} GB: serving them from the memory-mapped file "
            f"{images.cache_files()[0]}")
        return ImageData(images, labels, config.resolution, config.center_crop, config.random_flip, name=name,
                         source=source, class_names=class_names, content=content)
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    raw = ds[column] if len(ds) <= 100_000 else (ex[column] for ex in ds)
    pil_images = (_open_image(item, i) for i, item in enumerate(raw))
    images = decode_images(pil_images, config.resolution, config.channels, config.center_crop, seed,
                             config.preserve_input_precision)
    return ImageData(images, labels, config.resolution, config.center_crop, config.random_flip, name=name,
                     source=source, class_names=class_names, content=content)
