"""The training set held as stored pixels (uint8 or uint16 (N, C, H, W), in memory or memory-mapped) and served as
float tensors in [−1, 1], shape (C, H, W), with crops and flips drawn from the caller's generator."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from .labels import num_classes


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
        class_names: the names of the K classes the labels index (see :mod:`.labels`); None: K is the largest
            label + 1.
        content: a fingerprint of the source's files (see
            :func:`~diffusers_stf.training.data.fingerprint.folder_fingerprint`), part of a run's fingerprint; None
            when there are no local files to fingerprint.
    """

    def __init__(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None, resolution: Optional[int] = None,
                 center_crop: bool = False, random_flip: bool = False, name: str = "images",
                 source: Optional[str] = None, class_names: Optional[Sequence[str]] = None,
                 content: Optional[str] = None):
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
        self.class_names = list(class_names) if class_names is not None else None
        self.content = content

    @classmethod
    def from_tensor(cls, images: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs) -> "ImageData":
        """From float images in [−1, 1] (N, C, H, W), quantised to uint8."""
        quantised = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return cls(quantised, labels, **kwargs)

    def subset(self, indices: torch.Tensor) -> "ImageData":
        """The images ``indices`` (with their labels) as a new :class:`ImageData` with the same settings."""
        labels = self.labels[indices] if self.labels is not None else None
        return ImageData(self.images[indices], labels, self.resolution, self.center_crop, self.random_flip, self.name,
                         self.source, self.class_names, self.content)

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
    def num_classes(self) -> Optional[int]:
        """K, the number of classes the labels index (None without labels)."""
        return num_classes(self.labels, self.class_names)

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
