"""Image sets for evaluation: folders of image files, ``.npz`` archives, the embedded digits; uint8 ↔ [−1, 1].

Generated images are compared as 8-bit images, the way they are saved: ``to_uint8`` quantises [−1, 1] floats with
round((x + 1)·127.5), EDM's convention (plain truncation would bias every pixel by half a level).
"""

from __future__ import annotations

import math
import os
import zipfile
from typing import List, Optional, Tuple

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
            try:
                with Image.open(file) as image:
                    grey = image.mode in ("L", "I;16", "I", "1", "LA")
                    arrays.append(np.asarray(image.convert("L" if grey else "RGB")))
            except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for truncated or foreign files
                raise ValueError(f"cannot read the image file {file!r} ({type(err).__name__}: {err})") from err
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"the images in {path!r} differ in size or channels: {sorted(shapes)}")
        array = _array_to_nhwc(np.stack(arrays), path)
    elif os.path.isfile(path) and path.endswith(".npz"):
        try:
            with np.load(path) as archive:
                key = next((k for k in NPZ_KEYS if k in archive.files), None)
                if key is None:
                    raise ValueError(f"{path!r} has none of the arrays {NPZ_KEYS}; it has {archive.files}")
                array = _array_to_nhwc(archive[key], path)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
            if isinstance(err, ValueError) and repr(path) in str(err):
                raise
            raise ValueError(f"cannot read the archive {path!r} ({type(err).__name__}: {err})") from err
        if len(array) == 0:
            raise ValueError(f"{path!r} holds no images")
        array = array[:num_images] if num_images else array
    else:
        raise ValueError(f"path must be a folder of images or an .npz file, got {path!r}")
    if num_images and len(array) < num_images:
        raise ValueError(f"asked for {num_images} images but {path!r} holds only {len(array)}")
    return from_uint8(array)


def image_grid(
    images: torch.Tensor,
    nrow: Optional[int] = None,
    padding: int = 1,
    min_cell: int = 32,
    value_range: Tuple[float, float] = (0.0, 1.0),
    scale: Optional[int] = None,
):
    """A PIL mosaic of ``images`` (N, C, H, W), C = 1 or 3, laid out by ``diffusers.utils.make_image_grid``.

    This is the package's one grid helper: training's validation grids and the benchmarks' sample grids both use it.

    Args:
        images: the images; values in ``value_range``.
        nrow: images per row (default ⌈√N⌉); the last row is filled with grey cells.
        padding: grey pixels between cells and around the grid.
        min_cell: each image is upscaled (nearest) by the smallest integer factor that makes it ≥ ``min_cell`` pixels.
        value_range: (low, high) of the pixel values: (0, 1) for pipeline outputs, (−1, 1) for the package's
            model-space images. Values far outside it are an error, since they mean the wrong range was given.
        scale: an explicit integer upscaling factor instead of ``min_cell``.

    Returns:
        a ``PIL.Image`` of mode ``L`` (grey images) or ``RGB``.
    """
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageOps

    images = torch.as_tensor(images).detach().float().cpu()
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"images must have shape (N >= 1, 1 or 3, H, W), got {tuple(images.shape)}")
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    margin = 0.25 * (high - low)
    if float(images.min()) < low - margin or float(images.max()) > high + margin:
        raise ValueError(
            f"images lie in [{float(images.min()):.3g}, {float(images.max()):.3g}], outside value_range={value_range}; "
            "pass value_range=(-1, 1) for images in [-1, 1]"
        )
    if padding < 0 or (scale is not None and scale < 1):
        raise ValueError(f"padding must be >= 0 and scale >= 1, got padding={padding}, scale={scale}")
    array = ((images - low) / (high - low)).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n, h, w, c = array.shape
    scale = scale or max(1, math.ceil(min_cell / min(h, w)))
    mode = "L" if c == 1 else "RGB"
    grey = (128,) * (1 if c == 1 else 3)
    cells = [
        ImageOps.expand(
            Image.fromarray(a[..., 0] if c == 1 else a, mode).resize((w * scale, h * scale), Image.NEAREST),
            border=(0, 0, padding, padding),
            fill=grey[0] if c == 1 else grey,
        )
        for a in array
    ]
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    cells += [Image.new(mode, cells[0].size, grey[0] if c == 1 else grey)] * (rows * nrow - n)
    grid = make_image_grid(cells, rows=rows, cols=nrow).convert(mode)
    return ImageOps.expand(grid, border=(padding, padding, 0, 0), fill=grey[0] if c == 1 else grey)


def save_png(image, path: str) -> str:
    """Save a PIL image as a PNG under a temporary name, then rename it to ``path`` (a killed write leaves no
    truncated file behind); returns ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.partial")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_image_grid(
    images: torch.Tensor,
    path: str,
    nrow: Optional[int] = None,
    padding: int = 1,
    min_cell: int = 32,
    value_range: Tuple[float, float] = (0.0, 1.0),
    scale: Optional[int] = None,
) -> str:
    """Save :func:`image_grid` of ``images`` as a PNG (:func:`save_png`); returns ``path``. The arguments are those
    of :func:`image_grid`."""
    grid = image_grid(images, nrow=nrow, padding=padding, min_cell=min_cell, value_range=value_range, scale=scale)
    return save_png(grid, path)


def save_side_by_side(left: torch.Tensor, right: torch.Tensor, path: str, nrow: Optional[int] = None,
                      gap: int = 8) -> str:
    """Two :func:`image_grid` s of images in [0, 1] next to each other (e.g. unguided | guided from the same
    latents), ``gap`` white pixels apart, saved as one PNG; returns ``path``."""
    from PIL import Image

    left, right = image_grid(left, nrow=nrow), image_grid(right, nrow=nrow)
    canvas = Image.new(left.mode, (left.width + right.width + gap, max(left.height, right.height)), 255)
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + gap, 0))
    return save_png(canvas, path)
