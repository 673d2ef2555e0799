"""Decoding image files into the stored pixels: channels, resizing, crops of other aspect ratios, 16-bit images.

``MAX_IN_MEMORY_BYTES`` is the cap on a decoded set held in memory; a larger set is served from a memory-mapped Arrow
file (:mod:`~diffusers_stf.training.data.arrow`).

Files that PIL's plain ``convert("L" / "RGB")`` (what diffusers' ``train_unconditional.py`` does) would misread are
read by :func:`eight_bit`, and a :class:`DecodeReport` says once per set how many there were and what was done:
16-bit images are scaled to 8 bits (``convert`` would clip them, turning most pixels white), palette images with an
all-grey palette are greyscale, transparent pixels keep their stored colour, and only the first frame of an animated
file is read. Float images (PIL mode ``F``, e.g. float TIFFs) have no full-scale value and are refused.
"""

from __future__ import annotations

import collections
import io
import logging
import random
from typing import Iterable, Optional, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

MAX_IN_MEMORY_BYTES = 8 * 1024**3
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # integer images held as 16-bit values
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def _open_image(item, index: int):
    from PIL import Image

    path = None
    try:
        if isinstance(item, dict):
            path = item.get("path")
            data = item.get("bytes")
            image = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
            if path and not getattr(image, "filename", None):
                image.filename = path  # for the messages
        else:  # already a PIL image
            image = item
        image.load()
        return image
    except Exception as err:  # PIL raises several types for unreadable files
        where = f" ({path})" if path else ""
        raise ValueError(f"cannot read image {index}{where}: {err}") from err


def describe(image, index: int) -> str:
    """``image <index> (<file>)`` for the messages."""
    name = getattr(image, "filename", None)
    return f"image {index} ({name})" if name else f"image {index}"


def grey_palette(image) -> bool:
    """Whether every colour of a palette image's palette is a grey (R = G = B)."""
    palette = image.getpalette()
    if not palette:
        return False
    rgb = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    return bool((rgb[:, 0] == rgb[:, 1]).all() and (rgb[:, 1] == rgb[:, 2]).all())


def image_channels(image) -> int:
    """1 for a greyscale image (a palette image whose palette is all grey included), 3 otherwise."""
    if image.mode in ("P", "PA"):
        return 1 if grey_palette(image) else 3
    return 1 if image.mode in GREY_MODES else 3


class DecodeReport:
    """Counts of the images :func:`eight_bit` read in a way worth saying; :meth:`warn` says it once per kind."""

    MESSAGES = {
        "sixteen_bit": "{have} 16 bits per channel (PIL modes {modes}): reduced to 8 bits as round(v / 257), the "
                       "same fraction of full scale; pass --preserve_input_precision to keep the 16 bits",
        "palette": "{are} palette images (GIF, palette PNG): their colours were looked up in the palette; {grey} with "
                   "an all-grey palette were read as greyscale",
        "transparent": "{have} transparent pixels ({fully} of them fully transparent): the alpha channel was dropped, "
                       "so those pixels keep the colour stored under them (PIL's convert, as diffusers' "
                       "train_unconditional.py); composite the images onto a background first to choose it",
        "alpha": "{have} an alpha channel: it is dropped, so transparent pixels keep the colour stored under them "
                 "(PIL's convert, as diffusers' train_unconditional.py); composite the images onto a background first "
                 "to choose it",
        "frames": "{have} several frames (animated GIF, multi-page TIFF): only the first frame of each was used",
    }

    def __init__(self):
        self.counts = collections.Counter()
        self.modes = set()

    def add(self, kind: str, mode: Optional[str] = None):
        self.counts[kind] += 1
        if mode is not None:
            self.modes.add(mode)

    def lines(self):
        """One sentence per kind of image met, with its count."""
        out = []
        for kind, template in self.MESSAGES.items():
            n = self.counts[kind]
            if n:
                subject = f"{n} image{'' if n == 1 else 's'}"
                out.append(template.format(have=f"{subject} {'has' if n == 1 else 'have'}",
                                           are=f"{subject} {'is' if n == 1 else 'are'}",
                                           modes=", ".join(sorted(self.modes)), grey=self.counts["palette_grey"],
                                           fully=self.counts["fully_transparent"]))
        return out

    def warn(self):
        for line in self.lines():
            logger.warning(line)


def eight_bit(image, index: int, channels: int, report: Optional[DecodeReport] = None):
    """``image`` as an 8-bit PIL image with ``channels`` (1: ``L``, 3: ``RGB``), counting in ``report`` what a plain
    ``convert`` would misread.

    16-bit integer images (PIL modes ``I;16*``, and ``I`` with values in [0, 65535]) become round(v / 257), the same
    fraction of full scale; palette images are looked up in their palette; an alpha channel is dropped; an animated
    file gives its first frame. Float images (mode ``F``) and integer images outside [0, 65535] are refused.
    """
    from PIL import Image

    report = report if report is not None else DecodeReport()
    if getattr(image, "n_frames", 1) > 1:
        report.add("frames")
    mode = image.mode
    if mode == "F":
        raise ValueError(f"{describe(image, index)} has mode F (32-bit float), which has no full-scale value to map "
                         "to [-1, 1]; convert it to 8- or 16-bit integer images")
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{describe(image, index)} has mode {mode} with values in [{values.min()}, "
                             f"{values.max()}], outside the 16-bit range [0, 65535]")
        report.add("sixteen_bit", mode)
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8))  # round(v / 257), mode L
    elif mode in ("P", "PA"):
        grey = grey_palette(image)
        report.add("palette")
        if grey:
            report.add("palette_grey")
        transparent = mode == "PA" or "transparency" in image.info
        image = image.convert(("LA" if transparent else "L") if grey else ("RGBA" if transparent else "RGB"))
    if image.mode in ALPHA_MODES:
        alpha = np.asarray(image.getchannel("A"))
        if alpha.size and alpha.min() < 255:
            report.add("transparent")
            if alpha.max() == 0:
                report.add("fully_transparent")
    return image.convert("L" if channels == 1 else "RGB")


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

    Without it, every image goes through :func:`eight_bit` (16-bit images scaled to 8 bits, palettes looked up, grey
    palettes read as greyscale, alpha dropped, first frames), and one warning per kind of such image gives the count.
    """
    from PIL import Image

    arrays, rng, report = [], random.Random(seed), DecodeReport()
    first_size, first_kind, mixed_at = None, None, None
    target = channels
    for i, image in enumerate(pil_images):
        sixteen_bit = preserve_input_precision and image.mode in HIGH_BIT_MODES
        kind = image_channels(image)
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
            image = eight_bit(image, i, target, report)
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
    report.warn()
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
