"""EDM's non-leaky augmentation (Karras et al. 2022, Appendix F.2; NVlabs/edm ``training/augment.py``).

Geometric augmentations are applied to the training images with probability ``p`` each, and their parameters are
given to the network as 9 "augmentation labels". Samples are generated with zero labels, which the network has
learnt to mean "not augmented", so the augmentations do not leak into the samples.

Label layout (zeros where a transform did not fire), as in EDM:
``[x-flip bit, y-flip bit, log2-scale / std, cos(rotation) − 1, sin(rotation), aniso·cos φ, aniso·sin φ,
t_x / std, t_y / std]``.

Geometry uses bilinear resampling with reflect padding (EDM additionally supersamples with a wavelet filter); flips
are exact.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import ModelMixin, UNet2DModel  # noqa: F401  (ModelMixin by name: see ecosystem notes §3.3)
from torch import nn

AUGMENT_DIM = 9


class AugmentPipe:
    """EDM's geometric augmentation pipeline with conditioning labels.

    Each transform fires with probability ``min(multiplier · p, 1)``. EDM's CIFAR-10 setting is ``p = 0.12`` with
    ``xflip = 1e8`` (so x-flips always fire: half the images are mirrored), and 1 for the others.

    Args:
        p: augmentation probability.
        xflip, yflip, scale, rotate_frac, aniso, translate_frac: per-transform multipliers of ``p`` (0 disables).
        scale_std: std of log2 of the isotropic scale (EDM: 0.2).
        aniso_std: std of log2 of the anisotropic scale (EDM: 0.2).
        translate_std: std of the translation as a fraction of the image size (EDM: 0.125).
    """

    label_dim = AUGMENT_DIM

    def __init__(self, p: float = 0.12, xflip: float = 1e8, yflip: float = 1.0, scale: float = 1.0,
                 rotate_frac: float = 1.0, aniso: float = 1.0, translate_frac: float = 1.0, scale_std: float = 0.2,
                 aniso_std: float = 0.2, translate_std: float = 0.125):
        if not 0 <= p <= 1:
            raise ValueError(f"augmentation probability p must be in [0, 1], got {p}")
        self.p = float(p)
        self.xflip, self.yflip, self.scale, self.rotate_frac = xflip, yflip, scale, rotate_frac
        self.aniso, self.translate_frac = aniso, translate_frac
        self.scale_std, self.aniso_std, self.translate_std = scale_std, aniso_std, translate_std

    def __call__(self, images: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Augment ``images`` (B, C, H, W); returns the augmented images and their labels (B, 9)."""
        n, device = images.shape[0], images.device
        source = generator.device if generator is not None else device
        zeros = torch.zeros(n, device=device)

        def rand(*shape):
            return torch.rand(*shape, generator=generator, device=source).to(device)

        def randn(*shape):
            return torch.randn(*shape, generator=generator, device=source).to(device)

        def fires(multiplier):
            return rand(n) < min(multiplier * self.p, 1.0)

        x_bit = torch.where(fires(self.xflip), (rand(n) < 0.5).float(), zeros)
        y_bit = torch.where(fires(self.yflip), (rand(n) < 0.5).float(), zeros)
        scale_w = torch.where(fires(self.scale), randn(n), zeros)
        angle = torch.where(fires(self.rotate_frac), (rand(n) * 2 - 1) * math.pi, zeros)
        aniso_w = torch.where(fires(self.aniso), randn(n), zeros)
        frame = torch.where(rand(n) < 0.5, (rand(n) * 2 - 1) * math.pi, zeros)
        shift = torch.where(fires(self.translate_frac)[:, None], randn(n, 2), zeros[:, None])
        labels = torch.stack([x_bit, y_bit, scale_w, angle.cos() - 1, angle.sin(), aniso_w * frame.cos(),
                              aniso_w * frame.sin(), shift[:, 0], shift[:, 1]], dim=1)

        out = torch.where(x_bit.bool()[:, None, None, None], images.flip(-1), images)
        out = torch.where(y_bit.bool()[:, None, None, None], out.flip(-2), out)
        # Forward content map (pixel units about the centre): translate · aniso · rotate · scale.
        s = 2 ** (scale_w * self.scale_std)
        a = 2 ** (aniso_w * self.aniso_std)
        matrix = _rotation(frame) @ _diag(a, 1 / a) @ _rotation(-frame) @ _rotation(angle) @ _diag(s, s)
        h, w = images.shape[-2:]
        offset = shift * self.translate_std * torch.tensor([w, h], device=device, dtype=shift.dtype)
        moved = (scale_w != 0) | (angle != 0) | (aniso_w != 0) | (offset != 0).any(1)
        if bool(moved.any()):
            idx = moved.nonzero().squeeze(1)
            inverse = torch.linalg.inv(matrix[idx])
            to_norm = torch.tensor([2 / w, 2 / h], device=device, dtype=inverse.dtype)
            theta = torch.empty(len(idx), 2, 3, device=device, dtype=inverse.dtype)
            # output pixel u ↦ input pixel A⁻¹(u − t); in normalised coordinates N·A⁻¹·N⁻¹ and −N·A⁻¹·t.
            theta[:, :, :2] = inverse * to_norm[None, :, None] / to_norm[None, None, :]
            theta[:, :, 2] = -(inverse @ offset[idx].unsqueeze(-1)).squeeze(-1) * to_norm
            grid = F.affine_grid(theta.to(images.dtype), list(out[idx].shape), align_corners=False)
            warped = F.grid_sample(out[idx], grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            out = out.index_copy(0, idx, warped)
        return out, labels.to(images.dtype)


def _diag(a: torch.Tensor, b) -> torch.Tensor:
    b = torch.as_tensor(b, device=a.device, dtype=a.dtype).expand_as(a)
    zero = torch.zeros_like(a)
    return torch.stack([torch.stack([a, zero], -1), torch.stack([zero, b], -1)], -2)


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    c, s = angle.cos(), angle.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


class AugmentLabelMap(nn.Embedding):
    """A bias-free linear map of augmentation labels (B, augment_dim) into the time embedding (EDM's
    ``map_augment``). It subclasses ``nn.Embedding`` only to keep the weight's name and shape, so the state dict
    is the one of a ``UNet2DModel`` with ``num_class_embeds = augment_dim``; zero labels give exactly zero."""

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.to(self.weight.dtype) @ self.weight


class AugmentConditionedUNet2DModel(UNet2DModel):
    """A ``UNet2DModel`` conditioned on EDM's augmentation labels through ``class_labels``.

    Build it with ``num_class_embeds=9`` (and no ``class_embed_type``): the class embedding becomes a bias-free linear
    map of the labels (:class:`AugmentLabelMap`) added to the time embedding. Without ``class_labels`` the labels
    are zero, i.e. no augmentation, so ``EDMPipeline`` samples un-augmented images with no change, and a saved
    folder loads with ``EDMPipeline.from_pretrained``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.class_embed_type is not None or not self.config.num_class_embeds:
            raise ValueError("AugmentConditionedUNet2DModel needs num_class_embeds=<label dim> and class_embed_type=None")
        dim = self.class_embedding.embedding_dim
        self.class_embedding = AugmentLabelMap(self.config.num_class_embeds, dim)
        nn.init.normal_(self.class_embedding.weight, std=self.config.num_class_embeds**-0.5)

    def forward(self, sample: torch.Tensor, timestep, class_labels: Optional[torch.Tensor] = None,
                return_dict: bool = True):
        """``UNet2DModel.forward`` with ``class_labels`` = augmentation labels (B, augment_dim), zeros when None."""
        if class_labels is None:
            class_labels = sample.new_zeros(sample.shape[0], self.config.num_class_embeds)
        return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)


# diffusers reads the config keys from the __init__ signature: expose UNet2DModel's.
AugmentConditionedUNet2DModel.__init__.__signature__ = inspect.signature(UNet2DModel.__init__)
