"""The discriminator of Discriminator Guidance as published (Kim et al., ICML 2023; alsdudrla10/DG): a frozen ADM
classifier (:class:`~diffusers_stf.models.adm_encoder.EncoderUNetModel`) as feature extractor and a small
``EncoderUNetModel`` head on its 512×8×8 feature map, in the package's convention ``log_ratio(x, σ)``.

DG trains it under the VP SDE of Song et al. (β₀ = 0.1, β₁ = 20) and guides EDM's sampler by translating EDM's σ into
VP coordinates (DG ``classifier_lib.vpsde``):

    τ(σ) = (−β₀ + √(β₀² + 2(β₁ − β₀)·ln(1 + σ²))) / (β₁ − β₀)           (σ² = exp(½(β₁ − β₀)τ² + β₀τ) − 1, inverted)
    √ᾱ(τ) = exp(−¼(β₁ − β₀)τ² − ½β₀τ)                                    (the VP mean scale, = 1/√(1 + σ²))

Both networks see the VP input √ᾱ(τ)·x and the time τ (each multiplies it by 999 inside, ``time_scale``); the output
d = sigmoid(logit) is clipped to [1e-5, 1 − 1e-5] and the log-ratio is log(d/(1 − d)) (DG ``get_log_ratio``), i.e.
the logit clamped to ±ln(1e5 − 1). The translation happens inside :meth:`DGDiscriminator.log_ratio` with autograd, so
∇ₓ already carries the factor √ᾱ(τ) that DG's ``get_grad_log_ratio`` multiplies in by hand.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .adm_encoder import EncoderUNetModel
from .discriminator import LOG_RATIO_CLIP, DiscriminatorOutput
from .noise_conditional_encoder import _sigma_per_sample, check_sample_shape

DG_BETA_0, DG_BETA_1 = 0.1, 20.0  # DG classifier_lib.vpsde
DG_TIME_SCALE = 999.0  # DG's EncoderUNetModel multiplies the VP time by 999
# guided-diffusion's create_classifier: channel multipliers per image size
ADM_CHANNEL_MULT = {8: (1,), 16: (1, 2), 32: (1, 2, 4), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4),
                    256: (1, 1, 2, 2, 4, 4), 512: (0.5, 1, 1, 2, 2, 4, 4)}


def dg_classifier_config(img_resolution: int = 32) -> dict:
    """DG ``load_classifier``: the ADM classifier at ``img_resolution`` (width 128, depth 4 at 32 and 64 px, else 2;
    attention at 32, 16 and 8 px; scale-shift norm; residual downsampling; attention pooling; 1000 outputs)."""
    if img_resolution not in ADM_CHANNEL_MULT:
        raise ValueError(f"img_resolution must be one of {sorted(ADM_CHANNEL_MULT)}, got {img_resolution!r}")
    return dict(sample_size=img_resolution, in_channels=3, model_channels=128, out_channels=1000,
                num_res_blocks=4 if img_resolution in (32, 64) else 2, attention_resolutions=[32, 16, 8],
                channel_mult=list(ADM_CHANNEL_MULT[img_resolution]), num_head_channels=64,
                use_scale_shift_norm=True, time_scale=DG_TIME_SCALE)


def dg_head_config(feature_channels: int = 512, feature_size: int = 8, num_class_embeds: Optional[int] = None) -> dict:
    """DG ``load_discriminator``: an ``EncoderUNetModel`` of image size 8 on 512 channels, width 128, depth 2, one
    output; class-conditional heads embed 1000 classes (guided-diffusion's ``NUM_CLASSES``)."""
    return dict(sample_size=feature_size, in_channels=feature_channels, model_channels=128, out_channels=1,
                num_res_blocks=2, attention_resolutions=[32, 16, 8], channel_mult=[1], num_head_channels=64,
                use_scale_shift_norm=True, num_class_embeds=num_class_embeds, time_scale=DG_TIME_SCALE)


def vp_time(sigma: torch.Tensor, beta_0: float = DG_BETA_0, beta_1: float = DG_BETA_1) -> torch.Tensor:
    """τ(σ) of DG's ``vpsde.compute_tau`` (module docstring)."""
    beta_d = beta_1 - beta_0
    return (-beta_0 + torch.sqrt(beta_0**2 + 2.0 * beta_d * torch.log1p(sigma**2))) / beta_d


def vp_mean(tau: torch.Tensor, beta_0: float = DG_BETA_0, beta_1: float = DG_BETA_1) -> torch.Tensor:
    """√ᾱ(τ) of DG's ``vpsde.marginal_prob`` (module docstring)."""
    return torch.exp(-0.25 * tau**2 * (beta_1 - beta_0) - 0.5 * tau * beta_0)


class DGDiscriminator(ModelMixin, ConfigMixin):
    """DG's discriminator d(x, σ): the frozen ADM classifier's features and a trained head, taking EDM-scale x and σ.

    It is the ``discriminator`` component of :class:`~diffusers_stf.DiscriminatorGuidedPipeline` (``log_ratio``,
    ``sample_size``, ``in_channels``, ``num_class_embeds``). Build it from DG's files with
    :func:`~diffusers_stf.conversion.load_dg_discriminator`.

    Args:
        sample_size: side of the images it judges (DG CIFAR-10: 32).
        in_channels: their channels (3).
        num_class_embeds: classes of a class-conditional head (DG: 1000 rows, read with CIFAR-10's 10); None for an
            unconditional one.
        classifier_config: the feature extractor's :class:`EncoderUNetModel` config (default: DG's, at ``sample_size``).
        head_config: the head's config (default: DG's, on the extractor's feature map).
        beta_0, beta_1: DG's VP SDE, for τ(σ) and √ᾱ(τ).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 3,
        num_class_embeds: Optional[int] = None,
        classifier_config: Optional[dict] = None,
        head_config: Optional[dict] = None,
        beta_0: float = DG_BETA_0,
        beta_1: float = DG_BETA_1,
    ):
        super().__init__()
        classifier_config = dict(classifier_config or dg_classifier_config(sample_size))
        if (classifier_config["sample_size"], classifier_config["in_channels"]) != (sample_size, in_channels):
            raise ValueError(f"classifier_config judges {classifier_config['in_channels']}-channel "
                             f"{classifier_config['sample_size']}px images, not {in_channels}-channel {sample_size}px")
        self.classifier = EncoderUNetModel(**classifier_config)
        self.classifier.requires_grad_(False).eval()
        features = (self.classifier.feature_channels, self.classifier.feature_size)
        head_config = dict(head_config or dg_head_config(*features, num_class_embeds=num_class_embeds))
        if (head_config["in_channels"], head_config["sample_size"]) != features:
            raise ValueError(f"the head takes {head_config['in_channels']}x{head_config['sample_size']}x"
                             f"{head_config['sample_size']} features but the classifier gives "
                             f"{features[0]}x{features[1]}x{features[1]}")
        if head_config.get("num_class_embeds") != num_class_embeds or head_config["out_channels"] != 1:
            raise ValueError("head_config must have out_channels=1 and the discriminator's num_class_embeds")
        self.head = EncoderUNetModel(**head_config)

    def train(self, mode: bool = True) -> "DGDiscriminator":
        """Train mode for the head only: the frozen classifier stays in eval mode."""
        super().train(mode)
        self.classifier.eval()
        return self

    def vp_inputs(self, sample: torch.Tensor, sigma) -> Tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ(τ)·x in the model's dtype, τ) for EDM-scale x and σ (module docstring)."""
        sigma = _sigma_per_sample(sigma, sample.shape[0], sample.device)
        tau = vp_time(sigma, self.config.beta_0, self.config.beta_1)
        mean = vp_mean(tau, self.config.beta_0, self.config.beta_1).reshape(-1, 1, 1, 1)
        compute = torch.float64 if self.dtype == torch.float64 else torch.float32
        return (mean.to(sample.dtype) * sample).to(self.dtype), tau.to(compute)

    def forward(self, sample: torch.Tensor, sigma: Union[torch.Tensor, float], class_labels=None,
                return_dict: bool = True):
        """The logit log(d/(1 − d)) of EDM-scale ``sample`` at noise level ``sigma`` (a scalar or one per sample);
        ``class_labels`` (indices or one-hot rows) for a class-conditional head."""
        check_sample_shape(sample, self.config.in_channels, self.config.sample_size)
        x, tau = self.vp_inputs(sample, sigma)
        features = self.classifier.features(x, tau)
        logits = self.head(features, tau, class_labels).logits.reshape(-1)
        return DiscriminatorOutput(logits=logits) if return_dict else (logits,)

    def log_ratio(self, sample: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log(d/(1 − d)) with d clipped to [1e-5, 1 − 1e-5] (DG ``get_log_ratio``): the logit clamped to
        ±ln(1e5 − 1), with zero gradient where clamped."""
        return self(sample, sigma, class_labels).logits.clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP)
