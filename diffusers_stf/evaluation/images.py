"""Image sets for evaluation: folders of image files, ``.npz`` archives, the embedded digits; uint8 ↔ [−1, 1].

Generated images are compared as 8-bit images, the way they are saved: ``to_uint8`` quantises [−1, 1] floats with
round((x + 1)·127.5), EDM's convention (plain truncation would bias every pixel by half a level).
"""

from __future__ import annotations

import os
from typing import List, Optional

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
NPZ_KEYS = ("samples", "images", "arr_0")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[−1, 1] float images (N, C, H, W) → uint8 (N, H, W, C)."""
    array = ((images.detach().double().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return array.permute(0, 2, 3, 1).numpy()


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) → float32 (N, C, H, W) in [−1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round [−1, 1] images to the 256 levels they would have as 8-bit files."""
    return from_uint8(to_uint8(images))


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Repeat grey images to ``channels`` = 3 (what FID tools do when they open grey files as RGB); any other
    mismatch is left for the feature extractor to reject."""
    if images.ndim == 4 and images.shape[1] == 1 and channels == 3:
        return images.repeat(1, 3, 1, 1)
    return images


def list_image_files(folder: str) -> List[str]:
    """Image files under ``folder`` (recursively), sorted by path."""
    files = []
    for root, _, names in os.walk(folder):
        files += [os.path.join(root, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(files)


def _array_to_nhwc(array: np.ndarray, source: str) -> np.ndarray:
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(f"{source}: images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {array.shape}")
    if array.shape[-1] not in (1, 3) and array.shape[1] in (1, 3):
        array = array.transpose(0, 2, 3, 1)
    if array.dtype != np.uint8:
        raise ValueError(f"{source}: images must be uint8 (0..255), got dtype {array.dtype}")
    return array


def load_images(path: str, num_images: Optional[int] = None) -> torch.Tensor:
    """A folder of image files or an ``.npz`` of uint8 images as a float tensor (N, C, H, W) in [−1, 1].

    Grey files load with 1 channel, colour files with 3. An ``.npz`` holds its images under ``samples`` (what
    ``examples/generate.py`` writes), ``images`` or ``arr_0`` (EDM's and DG's sample archives), NHWC or NCHW.

    Args:
        path: the folder or ``.npz`` file.
        num_images: keep only the first ``num_images`` (sorted by file name); an error if there are fewer.
    """
    if num_images is not None and num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if os.path.isdir(path):
        files = list_image_files(path)
        if not files:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in folder {path!r}")
        files = files[:num_images] if num_images else files
        from PIL import Image

        arrays = []
        for file in files:
            with Image.open(file) as image:
                grey = image.mode in ("L", "I;16", "I", "1", "LA")
                arrays.append(np.asarray(image.convert("L" if grey else "RGB")))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"the images in {path!r} differ in size or channels: {sorted(shapes)}")
        array = _array_to_nhwc(np.stack(arrays), path)
    elif os.path.isfile(path) and path.endswith(".npz"):
        with np.load(path) as archive:
            key = next((k for k in NPZ_KEYS if k in archive.files), None)
            if key is None:
                raise ValueError(f"{path!r} has none of the arrays {NPZ_KEYS}; it has {archive.files}")
            array = _array_to_nhwc(archive[key], path)
        if len(array) == 0:
            raise ValueError(f"{path!r} holds no images")
        array = array[:num_images] if num_images else array
    else:
        raise ValueError(f"path must be a folder of images or an .npz file, got {path!r}")
    if num_images and len(array) < num_images:
        raise ValueError(f"asked for {num_images} images but {path!r} holds only {len(array)}")
    return from_uint8(array)


def save_image_grid(images: torch.Tensor, path: str, nrow: int = 10, scale: int = 4, padding: int = 1) -> None:
    """Save [−1, 1] images (N, C, H, W) as one PNG grid, each image upscaled ``scale``× (nearest)."""
    from PIL import Image

    array = to_uint8(images)
    n, h, w, c = array.shape
    rows = (n + nrow - 1) // nrow
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), 255, np.uint8)
    for i, image in enumerate(array):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
