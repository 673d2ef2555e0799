"""Where the training images come from and how they are served: the ``data`` options of the training scripts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .fingerprint import DATASET_FINGERPRINTS


@dataclass
class DataConfig:
    """Where the training images come from and how they are served (the ``data`` options of the training scripts).

    Args:
        dataset_name: a Hub dataset id (or local dataset folder) for ``datasets.load_dataset``.
        dataset_config_name: its configuration.
        dataset_split: the split to read.
        train_data_dir: a folder of images (``imagefolder`` builder). With neither source, the embedded digits.
        digits_split: ``train``, the 797 digits evaluation scores against (its other 1000 digits are held out), or
            ``all`` 1797 digits.
        image_column: the image column (default: ``image``, ``img`` or the first ``Image`` feature).
        label_column: the column of class labels (default: ``label`` when the set has one; an image folder's class
            subfolders fill it); see :mod:`.labels`.
        cache_dir: the ``datasets`` cache folder.
        resolution: side length of the served images (the shorter side is resized to it); None: the images' own size.
        channels: 1 (grey) or 3 (RGB); None: the images' own, RGB when a folder mixes grey and colour images.
        center_crop: centred instead of random crops.
        random_flip: random left–right flips.
        max_train_samples: use only the first N images.
        preserve_input_precision: keep images of more than 8 bits per channel (16-bit PNG/TIFF, PIL modes ``I;16*``
            and ``I``) at 16 bits instead of reducing them to 8 (stored as uint16, served as x / 65535 · 2 − 1).
        dataset_fingerprint: what a resume compares of a local image folder (see
            :func:`~diffusers_stf.training.data.fingerprint.folder_fingerprint`): ``stat`` (names, sizes, modification
            times) or ``bytes`` (names and contents).
    """

    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    dataset_split: str = "train"
    train_data_dir: Optional[str] = None
    digits_split: str = "train"
    image_column: Optional[str] = None
    label_column: Optional[str] = None
    cache_dir: Optional[str] = None
    resolution: Optional[int] = None
    channels: Optional[int] = None
    center_crop: bool = False
    random_flip: bool = False
    max_train_samples: Optional[int] = None
    preserve_input_precision: bool = False
    dataset_fingerprint: str = "stat"

    def __post_init__(self):
        if self.dataset_name and self.train_data_dir:
            raise ValueError("give either --dataset_name or --train_data_dir, not both")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"--channels must be 1 or 3, got {self.channels}")
        if self.dataset_fingerprint not in DATASET_FINGERPRINTS:
            raise ValueError(f"--dataset_fingerprint must be one of {DATASET_FINGERPRINTS}, "
                             f"got {self.dataset_fingerprint!r}")
        if self.digits_split not in ("all", "train"):
            raise ValueError(f"--digits_split must be 'all' or 'train', got {self.digits_split!r}")
        for name in ("resolution", "max_train_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
