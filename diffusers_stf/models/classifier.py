"""The noise-conditional classifier of classifier guidance (Dhariwal & Nichol, NeurIPS 2021, "Diffusion Models Beat
GANs on Image Synthesis", §4), as Discriminator Guidance combines it with the discriminator (Kim et al., ICML 2023,
§3.5, eq. 6): s_guided = s_θ + w_CG·∇_x log p(y | x, σ) + w_DG·∇_x log(d/(1 − d)).

p_φ(y | x, σ) classifies an image diffused to noise level σ. It is the discriminator's network
(:class:`~diffusers_stf.models.discriminator.NoiseConditionalEncoder`: diffusers down blocks conditioned on the noise
label, GroupNorm–SiLU–mean pool–linear) with one output per class instead of one logit, and it sees its inputs in
the same convention: ``sample`` is the EDM/VE-scale x = y + σ·n and ``sigma`` is σ, translated into the network's
coordinates by a :class:`~diffusers_stf.preconditioning.Preconditioning` (default ``vp``: x/√(1 + σ²) at 999·τ(σ),
the inputs of guided_diffusion's noise-conditional classifier). For a diffusers DDPM/DDIM sample x_t at ᾱ_t this is
x = x_t/√ᾱ_t and σ = √((1 − ᾱ_t)/ᾱ_t); the guided pipeline does that translation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from ..preconditioning import make_preconditioning
from .noise_conditional_encoder import (
    NoiseConditionalEncoder,
    _labels_as_indices,
    _network_inputs,
    _sigma_per_sample,
    check_encoder_config,
    check_sample_shape,
)


@dataclass
class NoiseConditionalClassifierOutput(BaseOutput):
    """Output of :class:`NoiseConditionalClassifier`.

    Args:
        logits: unnormalised log p(y | x, σ), shape (batch, num_classes).
    """

    logits: torch.Tensor


class NoiseConditionalClassifier(ModelMixin, ConfigMixin):
    """Noise-conditional classifier p_φ(y | x, σ) for classifier guidance (Dhariwal & Nichol 2021, Algorithm 1).

    The arguments are the :class:`~diffusers_stf.models.Discriminator`'s, in its order, with the number of classes
    where the discriminator has its class embedding.

    Args:
        sample_size: side of the images it classifies (must match the score UNet's ``sample_size``).
        in_channels: their channels (must match the UNet's ``in_channels``).
        block_out_channels: widths of the down blocks.
        down_block_types: diffusers down block names (``DownBlock2D``, ``AttnDownBlock2D``, …), one per width.
        layers_per_block: ResNet layers per down block.
        norm_num_groups: GroupNorm groups (must divide every width).
        attention_head_dim: head size of attention blocks, if any.
        mid_block_type: ``UNetMidBlock2D`` (with attention), ``UNetMidBlock2DNoAttention`` or None.
        num_classes: K, the number of classes.
        preconditioning: how (x, σ) enter the network (``vp``: x/√(1+σ²) at 999·τ(σ); ``edm``:
            x/√(σ²+σ_data²) at ln(σ)/4; or any other name of :func:`make_preconditioning`).
        sigma_data: σ_data of the ``edm`` preconditioning.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        block_out_channels: Tuple[int, ...] = (32, 64),
        down_block_types: Tuple[str, ...] = ("DownBlock2D", "DownBlock2D"),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        attention_head_dim: int = 8,
        mid_block_type: Optional[str] = None,
        num_classes: int = 10,
        preconditioning: str = "vp",
        sigma_data: float = 0.5,
    ):
        super().__init__()
        if not (isinstance(num_classes, int) and num_classes >= 2):
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        check_encoder_config(block_out_channels, down_block_types, norm_num_groups, mid_block_type, preconditioning)
        self.preconditioning = make_preconditioning(preconditioning, sigma_data=sigma_data)
        self.encoder = NoiseConditionalEncoder.from_model_config(self.config, in_channels, num_outputs=num_classes)

    def forward(
        self, sample: torch.Tensor, sigma: Union[torch.Tensor, float], return_dict: bool = True
    ) -> Union[NoiseConditionalClassifierOutput, Tuple]:
        """Class logits of noisy images.

        Args:
            sample: x = y + σ·n, shape (batch, in_channels, sample_size, sample_size), any float dtype.
            sigma: σ, a scalar or one value per sample.
            return_dict: return a :class:`NoiseConditionalClassifierOutput` rather than a tuple.
        """
        check_sample_shape(sample, self.config.in_channels, self.config.sample_size)
        sigma = _sigma_per_sample(sigma, sample.shape[0], sample.device)
        h, noise_label = _network_inputs(self.preconditioning, sample, sigma, self.dtype)
        logits = self.encoder(h, noise_label)
        if not return_dict:
            return (logits,)
        return NoiseConditionalClassifierOutput(logits=logits)

    def log_prob(self, sample: torch.Tensor, sigma, class_labels: torch.Tensor) -> torch.Tensor:
        """log p(y | x, σ) per sample, shape (batch,): the log-softmax of the logits at ``class_labels``.

        Args:
            sample: x, as in :meth:`forward`.
            sigma: σ, a scalar or one value per sample.
            class_labels: y, class indices (batch,) in [0, num_classes) or one-hot rows (batch, num_classes).
        """
        logits = self(sample, sigma).logits
        labels = _labels_as_indices(torch.as_tensor(class_labels)).to(logits.device).reshape(-1, 1)
        return torch.log_softmax(logits, dim=1).gather(1, labels).squeeze(1)


def check_class_labels(class_labels, num_classes: int, batch_size: int, name: str = "class_labels") -> torch.Tensor:
    """``class_labels`` (an int, a sequence or a tensor of indices, or one-hot rows) as an int64 tensor (batch,);
    ValueError when a label is outside [0, num_classes) or the count differs from the batch."""
    labels = torch.as_tensor(class_labels)
    if labels.is_floating_point() and labels.ndim == 2:
        labels = labels.argmax(dim=1)
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name} must be integer class indices (or one-hot rows), got dtype {labels.dtype}")
    labels = labels.long().reshape(-1)
    if labels.numel() == 1 and batch_size > 1:
        labels = labels.expand(batch_size)
    if labels.numel() != batch_size:
        raise ValueError(f"{name} must have one label per image ({batch_size}), got {labels.numel()}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} must be in [0, {num_classes - 1}], got labels from {low} to {high}")
    return labels

