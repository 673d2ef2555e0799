"""EDM's non-leaky augmentation (Karras et al. 2022, Appendix F.2; NVlabs/edm ``training/augment.py``, which builds on
ADA, Karras et al. 2020).

Augmentations are applied to the training images, each with probability ``multiplier · p``, and their parameters
are given to the network as "augmentation labels". Samples are generated with zero labels, which the network has
learnt to mean "not augmented", so the augmentations do not leak into the samples.

The pipeline, in EDM's order (each stage only when its multiplier is > 0, which also decides the label layout):

1. pixel blitting, exact: x-flip, y-flip, integer rotation by k·90°, integer translation with reflection at the
   border (the edge pixel is not repeated);
2. one geometric warp composed of isotropic scaling, fractional rotation, anisotropic scaling and fractional
   translation, as an inverse matrix G⁻¹ (output → input pixel coordinates, about the image centre). It is applied
   as EDM does: reflect padding, 2× upsampling with the sym6 wavelet low-pass filter, bilinear sampling, 2×
   downsampling with the same filter, crop;
3. colour: brightness, contrast, luma flip, hue rotation, saturation, as one 4×4 matrix (RGB or greyscale).

Labels (EDM's CIFAR-10 setting, 9 entries): ``[xflip, yflip, scale w, cos θ − 1, sin θ, w_a cos r, w_a sin r,
t_x, t_y]``; ``rotate_int`` adds two bits and ``translate_int`` two entries after the flips, the colour stages
append theirs at the end. An image whose labels are all zero is returned exactly unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

AUGMENT_DIM = 9  # the label dimension of EDM's CIFAR-10 setting (AugmentPipe's defaults)

# The sym6 (Daubechies symlet, 6 vanishing moments) low-pass filter, published constants as EDM and ADA list them
# (PyWavelets' sym6 filter bank); orthonormal: Σh = √2, Σ h[n]·h[n + 2k] = δ_k.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
FILTER_PAD = len(SYM6) // 4  # extra border (in original pixels) the filter needs on each side


# ----------------------------------------------------------------------------------------------------------------------
# Matrices of homogeneous 2-D / 3-D coordinates, batched over the leading dimension


def _matrix(rows: List[List], like: torch.Tensor) -> torch.Tensor:
    """Stack entries (tensors of shape (N,) or numbers) into (N, len(rows), len(rows[0]))."""
    entries = [v if torch.is_tensor(v) else torch.full_like(like, float(v)) for row in rows for v in row]
    return torch.stack(entries, dim=-1).reshape(*like.shape, len(rows), len(rows[0]))


def translate2d(tx, ty, like):
    return _matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], like)


def scale2d(sx, sy, like):
    return _matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], like)


def rotate2d(theta, like):
    """Rotation by θ in image coordinates (x right, y down)."""
    c, s = torch.cos(theta), torch.sin(theta)
    return _matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], like)


def translate3d(tx, ty, tz, like):
    return _matrix([[1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1]], like)


def scale3d(sx, sy, sz, like):
    return _matrix([[sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1]], like)


def rotate3d(axis: Tuple[float, float, float], theta: torch.Tensor, like):
    """Rotation by θ about the unit ``axis`` (Rodrigues' formula), homogeneous 4×4."""
    vx, vy, vz = axis
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    return _matrix([[vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
                    [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
                    [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
                    [0, 0, 0, 1]], like)


# ----------------------------------------------------------------------------------------------------------------------
# Resampling


def reflect_index(i: torch.Tensor, size: int) -> torch.Tensor:
    """Index into ``size`` pixels mirrored at the borders without repeating the edge pixel (…, 2, 1, 0, 1, 2, …)."""
    if size == 1:
        return torch.zeros_like(i)
    period = 2 * size - 2
    return (size - 1) - ((size - 1) - i.remainder(period)).abs()


def _filter(images: torch.Tensor, taps: torch.Tensor, dim: int, stride: int, padding: int) -> torch.Tensor:
    """Correlate every channel with ``taps`` along ``dim`` (-1: width, -2: height)."""
    n, c, h, w = images.shape
    kernel = taps.to(images.dtype).reshape(1, 1, 1, -1) if dim == -1 else taps.to(images.dtype).reshape(1, 1, -1, 1)
    pad = (0, padding) if dim == -1 else (padding, 0)
    st = (1, stride) if dim == -1 else (stride, 1)
    out = F.conv2d(images.reshape(n * c, 1, h, w), kernel, stride=st, padding=pad)
    return out.reshape(n, c, *out.shape[-2:])


def _upsample2x(images: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """2× upsampling: zeros between the samples, then convolution with the filter (width, then height)."""
    for dim in (-1, -2):
        shape = list(images.shape)
        shape[dim] = 2 * shape[dim] - 1
        spread = images.new_zeros(shape)
        if dim == -1:
            spread[..., ::2] = images
        else:
            spread[..., ::2, :] = images
        images = _filter(spread, taps.flip(0), dim, 1, (len(taps) + 1) // 2)
    return images


def _downsample2x(images: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """2× downsampling: correlation with the filter at stride 2, then the filter's border is cropped."""
    p = FILTER_PAD
    images = _filter(images, taps, -1, 2, (len(taps) - 1) // 2)[..., p:-p]
    return _filter(images, taps, -2, 2, (len(taps) - 1) // 2)[..., p:-p, :]


def warp(images: torch.Tensor, G_inv: torch.Tensor) -> torch.Tensor:
    """Resample ``images`` (N, C, H, W) at G⁻¹·p for every output pixel p (pixel units about the image centre), as
    EDM's AugmentPipe: reflect padding, sym6 2× upsampling, bilinear sampling, sym6 2× downsampling, crop.

    The padding margin is EDM's largest, W − 1 and H − 1 on every side, so that no batch-dependent margin is needed.
    """
    n, c, h, w = images.shape
    taps = torch.tensor(SYM6, dtype=torch.float64, device=images.device)
    padded = F.pad(images, [w - 1, w - 1, h - 1, h - 1], mode="reflect")
    up = _upsample2x(padded, taps)
    like = G_inv.new_ones(n)
    # to the upsampled grid: pixel units ×2, and the upsampled grid starts half a pixel before the original one
    G = scale2d(2, 2, like) @ G_inv @ scale2d(0.5, 0.5, like)
    G = translate2d(-0.5, -0.5, like) @ G @ translate2d(0.5, 0.5, like)
    out_h, out_w = (h + 2 * FILTER_PAD) * 2, (w + 2 * FILTER_PAD) * 2
    # normalised coordinates of affine_grid (align_corners=False): ±1 at the outer pixel edges
    G = scale2d(2 / up.shape[-1], 2 / up.shape[-2], like) @ G @ scale2d(out_w / 2, out_h / 2, like)
    grid = F.affine_grid(G[:, :2, :].to(images.dtype), [n, c, out_h, out_w], align_corners=False)
    sampled = F.grid_sample(up, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return _downsample2x(sampled, taps)


# ----------------------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class AugmentParameters:
    """The random parameters of one batch (N images); a field is None when its stage is disabled.

    Args:
        xflip, yflip: (N,) 0/1.
        rotate_int: (N,) k ∈ {0, 1, 2, 3}, rotation by k·90°.
        translate_int: (2, N) integer shifts (t_x, t_y) in pixels.
        scale: (N,) w, scale 2^(w·scale_std).
        rotate_frac: (N,) angle θ in radians.
        aniso: (N,) w, scales 2^(±w·aniso_std) along a frame rotated by ``aniso_angle``.
        aniso_angle: (N,) r in radians.
        translate_frac: (2, N) w, translation (w_x·W, w_y·H)·translate_frac_std in pixels.
        brightness, contrast, saturation: (N,) standard-normal w of each colour stage.
        lumaflip: (N,) 0/1.
        hue: (N,) angle in radians.
    """

    xflip: Optional[torch.Tensor] = None
    yflip: Optional[torch.Tensor] = None
    rotate_int: Optional[torch.Tensor] = None
    translate_int: Optional[torch.Tensor] = None
    scale: Optional[torch.Tensor] = None
    rotate_frac: Optional[torch.Tensor] = None
    aniso: Optional[torch.Tensor] = None
    aniso_angle: Optional[torch.Tensor] = None
    translate_frac: Optional[torch.Tensor] = None
    brightness: Optional[torch.Tensor] = None
    contrast: Optional[torch.Tensor] = None
    lumaflip: Optional[torch.Tensor] = None
    hue: Optional[torch.Tensor] = None
    saturation: Optional[torch.Tensor] = None


class AugmentPipe:
    """EDM's augmentation pipeline with conditioning labels (the options and names of NVlabs/edm's AugmentPipe).

    Each stage fires with probability ``min(multiplier · p, 1)``; a multiplier of 0 disables the stage and removes
    its labels. The defaults are EDM's CIFAR-10 setting (``train.py --augment=0.12``): ``p = 0.12``, ``xflip = 1e8``
    (x-flips always eligible, so half the images are mirrored), ``yflip = scale = rotate_frac = aniso =
    translate_frac = 1``, everything else off; 9 labels.

    Args:
        p: overall augmentation probability.
        xflip, yflip, rotate_int, translate_int: multipliers of the exact pixel blits.
        translate_int_max: range of the integer translation, as a fraction of the image size.
        scale, rotate_frac, aniso, translate_frac: multipliers of the geometric warp's parts.
        scale_std: std of log2 of the isotropic scale.
        rotate_frac_max: range of the fractional rotation (1 = the full circle).
        aniso_std: std of log2 of the anisotropic scale.
        aniso_rotate_prob: probability that the anisotropic scaling is along a rotated frame (not scaled by ``p``).
        translate_frac_std: std of the fractional translation, as a fraction of the image size.
        brightness, contrast, lumaflip, hue, saturation: multipliers of the colour stages.
        brightness_std, contrast_std, hue_max, saturation_std: their ranges (contrast and saturation in log2).
    """

    def __init__(self, p: float = 0.12, xflip: float = 1e8, yflip: float = 1.0, rotate_int: float = 0.0,
                 translate_int: float = 0.0, translate_int_max: float = 0.125, scale: float = 1.0,
                 rotate_frac: float = 1.0, aniso: float = 1.0, translate_frac: float = 1.0, scale_std: float = 0.2,
                 rotate_frac_max: float = 1.0, aniso_std: float = 0.2, aniso_rotate_prob: float = 0.5,
                 translate_frac_std: float = 0.125, brightness: float = 0.0, contrast: float = 0.0,
                 lumaflip: float = 0.0, hue: float = 0.0, saturation: float = 0.0, brightness_std: float = 0.2,
                 contrast_std: float = 0.5, hue_max: float = 1.0, saturation_std: float = 1.0):
        values = {name: value for name, value in locals().items() if name != "self"}
        for name, value in values.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if p > 1:
            raise ValueError(f"augmentation probability p must be in [0, 1], got {p}")
        if aniso_rotate_prob > 1:
            raise ValueError(f"aniso_rotate_prob must be in [0, 1], got {aniso_rotate_prob}")
        for name, value in values.items():
            setattr(self, name, float(value))

    @property
    def label_dim(self) -> int:
        """The number of labels: one per enabled stage, two for rotate_int, translate_int, rotate_frac, aniso,
        translate_frac and hue."""
        widths = dict(xflip=1, yflip=1, rotate_int=2, translate_int=2, scale=1, rotate_frac=2, aniso=2,
                      translate_frac=2, brightness=1, contrast=1, lumaflip=1, hue=2, saturation=1)
        return sum(width for name, width in widths.items() if getattr(self, name) > 0)

    def sample_parameters(self, batch_size: int, generator: Optional[torch.Generator] = None,
                          device=None) -> AugmentParameters:
        """Draw the parameters of ``batch_size`` images, in EDM's order; zero where a stage does not fire."""
        n = batch_size
        on = generator.device if generator is not None else torch.device(device if device is not None else "cpu")

        def rand(*shape):
            return torch.rand(shape, generator=generator, device=on).to(device)

        def randn(*shape):
            return torch.randn(shape, generator=generator, device=on).to(device)

        def randint(high, *shape):
            return torch.randint(high, shape, generator=generator, device=on).to(device)

        def gate(multiplier, value, *shape):
            fires = rand(*shape) < multiplier * self.p
            return torch.where(fires, value, torch.zeros_like(value))

        out = AugmentParameters()
        if self.xflip > 0:
            out.xflip = gate(self.xflip, randint(2, n), n)
        if self.yflip > 0:
            out.yflip = gate(self.yflip, randint(2, n), n)
        if self.rotate_int > 0:
            out.rotate_int = gate(self.rotate_int, randint(4, n), n)
        if self.translate_int > 0:
            w = gate(self.translate_int, rand(2, n) * 2 - 1, 1, n)
            out.translate_int = w  # scaled to whole pixels in apply(), which knows the image size
        if self.scale > 0:
            out.scale = gate(self.scale, randn(n), n)
        if self.rotate_frac > 0:
            out.rotate_frac = gate(self.rotate_frac, (rand(n) * 2 - 1) * (math.pi * self.rotate_frac_max), n)
        if self.aniso > 0:
            w, r = randn(n), (rand(n) * 2 - 1) * math.pi
            out.aniso = gate(self.aniso, w, n)
            out.aniso_angle = torch.where(rand(n) < self.aniso_rotate_prob, r, torch.zeros_like(r))
        if self.translate_frac > 0:
            out.translate_frac = gate(self.translate_frac, randn(2, n), 1, n)
        if self.brightness > 0:
            out.brightness = gate(self.brightness, randn(n), n)
        if self.contrast > 0:
            out.contrast = gate(self.contrast, randn(n), n)
        if self.lumaflip > 0:
            out.lumaflip = gate(self.lumaflip, randint(2, n), n)
        if self.hue > 0:
            out.hue = gate(self.hue, (rand(n) * 2 - 1) * (math.pi * self.hue_max), n)
        if self.saturation > 0:
            out.saturation = gate(self.saturation, randn(n), n)
        return out

    def integer_shifts(self, params: AugmentParameters, height: int, width: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(t_x, t_y) in whole pixels of ``translate_int``: round(w·size·translate_int_max)."""
        w = params.translate_int
        return (w[0] * (width * self.translate_int_max)).round().long(), \
            (w[1] * (height * self.translate_int_max)).round().long()

    def apply(self, images: torch.Tensor, params: AugmentParameters) -> Tuple[torch.Tensor, torch.Tensor]:
        """Augment ``images`` (N, C, H, W) with given parameters; returns the images and their labels
        (N, :attr:`label_dim`)."""
        _check_batch(images)
        n, c, h, w = images.shape
        device = images.device
        labels: List[torch.Tensor] = []

        def per_image(mask):
            return mask.reshape(n, 1, 1, 1)

        # 1. Pixel blitting.
        if params.xflip is not None:
            images = torch.where(per_image(params.xflip == 1), images.flip(-1), images)
            labels.append(params.xflip)
        if params.yflip is not None:
            images = torch.where(per_image(params.yflip == 1), images.flip(-2), images)
            labels.append(params.yflip)
        if params.rotate_int is not None:
            k = params.rotate_int
            images = torch.where(per_image((k == 1) | (k == 2)), images.flip(-1), images)
            images = torch.where(per_image((k == 2) | (k == 3)), images.flip(-2), images)
            if h == w:
                images = torch.where(per_image((k == 1) | (k == 3)), images.transpose(-2, -1), images)
            elif bool(((k == 1) | (k == 3)).any()):
                raise ValueError(f"rotate_int needs square images for 90° rotations, got {h}x{w}")
            labels += [(k == 1) | (k == 2), (k == 2) | (k == 3)]
        if params.translate_int is not None:
            tx, ty = self.integer_shifts(params, h, w)
            rows = reflect_index(torch.arange(h, device=device)[None, :] + ty[:, None], h)  # (N, H)
            cols = reflect_index(torch.arange(w, device=device)[None, :] - tx[:, None], w)  # (N, W)
            images = images.gather(2, rows[:, None, :, None].expand(n, c, h, w))
            images = images.gather(3, cols[:, None, None, :].expand(n, c, h, w))
            labels += [tx.to(images.dtype) / (w * self.translate_int_max), ty.to(images.dtype) / (h * self.translate_int_max)]

        # 2. One geometric warp, G⁻¹ maps output to input pixel coordinates.
        like = torch.ones(n, dtype=torch.float64, device=device)
        G_inv = torch.eye(3, dtype=torch.float64, device=device).expand(n, 3, 3)
        first = len(labels)
        if params.scale is not None:
            s = torch.exp2(params.scale.double() * self.scale_std)
            G_inv = G_inv @ scale2d(1 / s, 1 / s, like)
            labels.append(params.scale)
        if params.rotate_frac is not None:
            theta = params.rotate_frac.double()
            G_inv = G_inv @ rotate2d(theta, like)
            labels += [params.rotate_frac.cos() - 1, params.rotate_frac.sin()]
        if params.aniso is not None:
            s, r = torch.exp2(params.aniso.double() * self.aniso_std), params.aniso_angle.double()
            G_inv = G_inv @ rotate2d(-r, like) @ scale2d(1 / s, s, like) @ rotate2d(r, like)
            labels += [params.aniso * params.aniso_angle.cos(), params.aniso * params.aniso_angle.sin()]
        if params.translate_frac is not None:
            t = params.translate_frac.double()
            G_inv = G_inv @ translate2d(-t[0] * (w * self.translate_frac_std), -t[1] * (h * self.translate_frac_std),
                                        like)
            labels += [params.translate_frac[0], params.translate_frac[1]]
        if len(labels) > first:
            moved = torch.stack([v.float() for v in labels[first:]], 1).ne(0).any(1)
            images = torch.where(per_image(moved), warp(images, G_inv), images)

        # 3. Colour, one 4×4 matrix acting on (r, g, b, 1).
        first = len(labels)
        luma = torch.tensor([1, 1, 1, 0], dtype=torch.float64, device=device) / math.sqrt(3)
        M = torch.eye(4, dtype=torch.float64, device=device).expand(n, 4, 4)
        if params.brightness is not None:
            b = params.brightness.double() * self.brightness_std
            M = translate3d(b, b, b, like) @ M
            labels.append(params.brightness)
        if params.contrast is not None:
            s = torch.exp2(params.contrast.double() * self.contrast_std)
            M = scale3d(s, s, s, like) @ M
            labels.append(params.contrast)
        if params.lumaflip is not None:
            M = (torch.eye(4, dtype=torch.float64, device=device)
                 - 2 * torch.outer(luma, luma) * params.lumaflip.double().reshape(n, 1, 1)) @ M
            labels.append(params.lumaflip)
        if params.hue is not None:
            M = rotate3d((1 / math.sqrt(3),) * 3, params.hue.double(), like) @ M
            labels += [params.hue.cos() - 1, params.hue.sin()]
        if params.saturation is not None:
            s = torch.exp2(params.saturation.double() * self.saturation_std).reshape(n, 1, 1)
            aa = torch.outer(luma, luma)
            M = (aa + (torch.eye(4, dtype=torch.float64, device=device) - aa) * s) @ M
            labels.append(params.saturation)
        if len(labels) > first:
            changed = torch.stack([v.float() for v in labels[first:]], 1).ne(0).any(1)
            images = torch.where(per_image(changed), _color(images, M), images)

        if not labels:
            return images, images.new_zeros(n, 0)
        return images, torch.stack([v.to(images.dtype).reshape(n) for v in labels], dim=1)

    def __call__(self, images: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Augment ``images`` (N, C, H, W) with freshly drawn parameters; returns the images and their labels."""
        _check_batch(images)
        return self.apply(images, self.sample_parameters(images.shape[0], generator, images.device))


def _check_batch(images) -> None:
    """A ValueError naming ``images`` unless it is a batch (N, C, H, W): a single (C, H, W) image would be unpacked
    as a batch of C images."""
    if not torch.is_tensor(images) or images.ndim != 4:
        got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a batch (N, C, H, W), got shape {got}; a single (C, H, W) image is the "
                         "batch images[None]")


def _color(images: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Apply the homogeneous colour matrices M (N, 4, 4): RGB images by M[:3, :3]·rgb + M[:3, 3]; greyscale images by
    the mean of the RGB rows (EDM's rule for one channel)."""
    n, c, h, w = images.shape
    flat = images.reshape(n, c, h * w)
    M = M.to(images.dtype)
    if c == 3:
        out = M[:, :3, :3] @ flat + M[:, :3, 3:]
    elif c == 1:
        rows = M[:, :3, :].mean(dim=1, keepdim=True)
        out = flat * rows[:, :, :3].sum(dim=2, keepdim=True) + rows[:, :, 3:]
    else:
        raise ValueError(f"colour augmentation needs RGB (3 channels) or greyscale (1 channel) images, got {c}")
    return out.reshape(n, c, h, w)
