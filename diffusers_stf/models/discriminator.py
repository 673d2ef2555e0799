"""The noise-conditional discriminator of Discriminator Guidance (Kim et al., ICML 2023, "Refining Generative Process
with Discriminator Guidance in Score-based Diffusion Models").

d_φ(x, σ) ∈ (0, 1) tells a real image diffused to noise level σ from a generated one diffused the same way. At the
optimum d*/(1 − d*) = p_data,σ / p_model,σ (DG eq. 6), so ∇_x log(d/(1 − d)) is the correction that turns the model
score into the data score (DG Theorem 1). The network returns the *logit* log(d/(1 − d)).

Inputs are in the EDM/VE convention of this package: ``sample`` is x = y + σ·n and ``sigma`` is σ. A
:class:`~diffusers_stf.preconditioning.Preconditioning` translates them into the network's own coordinates, exactly as
for the score network (EDM eq. 7): the network sees c_in(σ)·x and the noise label c_noise(σ). The default ``vp``
preconditioning is the paper's: DG trains its discriminator under the linear VP SDE (β_min = 0.1, β_d = 19.9) and
guides an EDM sampler, feeding it x_vp = x/√(1 + σ²) (the VP mean scale) at VP time τ(σ) = t(σ) of EDM Table 1, as
999·τ (guided_diffusion's ``EncoderUNetModel`` multiplies the continuous time by 999). Because the translation is done
inside the module with autograd, ∇_x of the logit already carries the chain-rule factor 1/√(1 + σ²) that DG's
``get_grad_log_ratio`` multiplies in by hand.

Architecture: a small noise-conditional U-Net encoder (diffusers down blocks + time embedding, GroupNorm–SiLU–mean pool
–linear head), optionally on top of a frozen feature extractor, as DG trains only a shallow head on a frozen pretrained
classifier's encoder:

* ``unet_encoder``: the down and mid blocks of a pretrained score ``UNet2DModel`` (in the score model's own
  preconditioning), see :meth:`Discriminator.from_unet_encoder`;
* ``transformers``: a ``transformers`` vision model rebuilt from its config, see
  :meth:`Discriminator.from_transformers_backbone`;
* ``custom``: any module, called as ``module(c_in·x, c_noise)``; it is not saved with the discriminator and is
  attached with :meth:`Discriminator.attach_feature_extractor` (or :meth:`Discriminator.from_feature_extractor`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel  # noqa: F401  (ModelMixin by name: see diffusers_stf/__init__)
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from ..preconditioning import make_preconditioning
from .noise_conditional_encoder import (
    _PRECONDITIONING_KEYS,
    FEATURE_EXTRACTORS,
    NoiseConditionalEncoder,
    TransformersFeatures,
    UNetEncoderFeatures,
    _CustomFeatures,
    _network_inputs,
    _sigma_per_sample,
    check_encoder_config,
    check_sample_shape,
)

# DG clips d to [1e-5, 1 − 1e-5] (classifier_lib.get_log_ratio), i.e. the logit to ±ln((1 − 1e-5)/1e-5).
DISCRIMINATOR_PROB_CLIP = 1e-5
LOG_RATIO_CLIP = math.log((1 - DISCRIMINATOR_PROB_CLIP) / DISCRIMINATOR_PROB_CLIP)


@dataclass
class DiscriminatorOutput(BaseOutput):
    """Output of :class:`Discriminator`.

    Args:
        logits: log(d/(1 − d)) per sample, shape (batch,).
    """

    logits: torch.Tensor


class Discriminator(ModelMixin, ConfigMixin):
    """Noise-conditional discriminator d_φ(x, σ) of Discriminator Guidance, returning the logit log(d/(1 − d)).

    Args:
        sample_size: side of the images it judges (must match the score UNet's ``sample_size``).
        in_channels: channels of those images (must match the UNet's ``in_channels``).
        block_out_channels: widths of the head's down blocks.
        down_block_types: diffusers down block names (``DownBlock2D``, ``AttnDownBlock2D``, …), one per width.
        layers_per_block: ResNet layers per down block.
        norm_num_groups: GroupNorm groups (must divide every width).
        attention_head_dim: head size of attention blocks, if any.
        mid_block_type: ``UNetMidBlock2D`` (with attention), ``UNetMidBlock2DNoAttention`` or None.
        num_class_embeds: number of classes of a class-conditional discriminator (None: unconditional).
        preconditioning: how (x, σ) enter the network: ``vp`` (DG: x/√(1+σ²) at 999·τ(σ)), ``edm``
            (x/√(σ²+σ_data²) at ln(σ)/4), or any other name of :func:`make_preconditioning`.
        sigma_data: σ_data of the ``edm`` preconditioning.
        feature_extractor: None, ``unet_encoder``, ``transformers`` or ``custom`` (see the module docstring).
        feature_extractor_config: what rebuilds the extractor (set by the ``from_*`` constructors).
        feature_channels: channels of the extractor's feature map (the head's input channels).
    """

    _supports_gradient_checkpointing = False

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
        num_class_embeds: Optional[int] = None,
        preconditioning: str = "vp",
        sigma_data: float = 0.5,
        feature_extractor: Optional[str] = None,
        feature_extractor_config: Optional[dict] = None,
        feature_channels: Optional[int] = None,
    ):
        super().__init__()
        check_encoder_config(block_out_channels, down_block_types, norm_num_groups, mid_block_type, preconditioning)
        if feature_extractor is not None and feature_extractor not in FEATURE_EXTRACTORS:
            raise ValueError(f"feature_extractor must be None or one of {FEATURE_EXTRACTORS}, got {feature_extractor!r}")
        if feature_extractor is not None and not feature_channels:
            raise ValueError("feature_channels is required with a feature_extractor")
        self.preconditioning = make_preconditioning(preconditioning, sigma_data=sigma_data)
        extractor_config = dict(feature_extractor_config or {})
        self.extractor = None
        self._custom_extractor = []  # a plain list: a custom extractor is not a registered (saved) submodule
        if feature_extractor == "unet_encoder":
            self.extractor = UNetEncoderFeatures(extractor_config["unet"], extractor_config["preconditioning"])
        elif feature_extractor == "transformers":
            self.extractor = TransformersFeatures(
                extractor_config["model"], self.preconditioning, extractor_config.get("input_resolution")
            )
        if self.extractor is not None:
            self.extractor.requires_grad_(False).eval()
        self.head = NoiseConditionalEncoder.from_model_config(
            self.config, feature_channels if feature_extractor else in_channels, num_class_embeds=num_class_embeds
        )

    # ------------------------------------------------------------------------------------------------------------
    # Construction on top of a frozen feature extractor

    @classmethod
    def from_unet_encoder(cls, unet: UNet2DModel, scheduler, **head_kwargs) -> "Discriminator":
        """A head on the frozen encoder (down + mid blocks) of a pretrained score ``UNet2DModel``.

        Args:
            unet: the score network; its encoder weights are copied (and saved with the discriminator).
            scheduler: its EDM scheduler, whose preconditioning tells how the encoder expects (x, σ).
            **head_kwargs: :class:`Discriminator` arguments for the head (``block_out_channels``, ``preconditioning``, …).
        """
        config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        precond = {"name": scheduler.config.preconditioning}
        precond.update({k: scheduler.config[k] for k in _PRECONDITIONING_KEYS})
        disc = cls(
            sample_size=_side(unet.config.sample_size),
            in_channels=unet.config.in_channels,
            feature_extractor="unet_encoder",
            feature_extractor_config={"unet": _json_ready(config), "preconditioning": precond},
            feature_channels=unet.config.block_out_channels[-1],
            **head_kwargs,
        )
        missing, unexpected = disc.extractor.unet.load_state_dict(unet.state_dict(), strict=False)
        if missing:
            raise ValueError(f"could not copy the UNet encoder weights, missing: {missing[:5]}")
        return disc.to(device=unet.device)

    @classmethod
    def from_transformers_backbone(
        cls,
        model_or_path,
        sample_size: int,
        in_channels: int,
        input_resolution: Optional[int] = None,
        **head_kwargs,
    ) -> "Discriminator":
        """A head on a frozen ``transformers`` vision model, e.g. ``ResNetModel``, ``ConvNextModel``, ``ViTModel``.

        Args:
            model_or_path: a loaded ``PreTrainedModel`` or a local folder for ``AutoModel.from_pretrained``.
            sample_size, in_channels: the images the discriminator judges.
            input_resolution: resize the images to this side before the backbone (None: keep).
            **head_kwargs: :class:`Discriminator` arguments for the head.
        """
        from transformers import AutoModel, PreTrainedModel

        model = model_or_path if isinstance(model_or_path, PreTrainedModel) else AutoModel.from_pretrained(model_or_path)
        model_config = _json_ready(model.config.to_dict())
        extractor_config = {"model": model_config, "input_resolution": input_resolution}
        precond = make_preconditioning(head_kwargs.get("preconditioning", "vp"), sigma_data=head_kwargs.get("sigma_data", 0.5))
        probe = TransformersFeatures(model_config, precond, input_resolution)
        probe.model.load_state_dict(model.state_dict())
        with torch.no_grad():
            channels = probe(torch.zeros(1, in_channels, sample_size, sample_size), torch.ones(1, dtype=torch.float64)).shape[1]
        disc = cls(
            sample_size=sample_size,
            in_channels=in_channels,
            feature_extractor="transformers",
            feature_extractor_config=extractor_config,
            feature_channels=channels,
            **head_kwargs,
        )
        disc.extractor.model.load_state_dict(model.state_dict())
        return disc

    @classmethod
    def from_feature_extractor(cls, module: nn.Module, sample_size: int, in_channels: int, **head_kwargs) -> "Discriminator":
        """A head on any frozen module called as ``module(c_in·x, c_noise) -> (batch, C, h, w)`` (for the default
        ``vp`` preconditioning: the VP-scaled image and 999·τ, the inputs of DG's ADM classifier).

        The module is not saved with the discriminator: after ``from_pretrained``, attach it again with
        :meth:`attach_feature_extractor`.
        """
        precond = make_preconditioning(head_kwargs.get("preconditioning", "vp"), sigma_data=head_kwargs.get("sigma_data", 0.5))
        with torch.no_grad():
            probe = _CustomFeatures(module, precond)
            param = next(module.parameters(), None)
            device = param.device if param is not None else "cpu"
            channels = probe(torch.zeros(1, in_channels, sample_size, sample_size, device=device), torch.ones(1, dtype=torch.float64, device=device)).shape[1]
        disc = cls(sample_size=sample_size, in_channels=in_channels, feature_extractor="custom", feature_channels=channels, **head_kwargs)
        return disc.attach_feature_extractor(module)

    def attach_feature_extractor(self, module: nn.Module) -> "Discriminator":
        """Attach the (frozen) user module of a ``custom`` discriminator; it is not part of the saved weights."""
        if self.config.feature_extractor != "custom":
            raise ValueError("attach_feature_extractor is only for discriminators built with feature_extractor='custom'")
        module.requires_grad_(False).eval()
        self._custom_extractor[:] = [_CustomFeatures(module, self.preconditioning)]
        return self

    def train(self, mode: bool = True) -> "Discriminator":
        """Train mode for the head only: a frozen extractor stays in eval mode (batch-norm statistics and dropout of a
        pretrained backbone must not change while the head trains)."""
        super().train(mode)
        if self.extractor is not None:
            self.extractor.eval()
        return self

    # ------------------------------------------------------------------------------------------------------------

    def features(self, sample: torch.Tensor, sigma: torch.Tensor, class_labels=None) -> torch.Tensor:
        """What the head sees: the extractor's feature map, or c_in(σ)·x without an extractor."""
        if self.config.feature_extractor == "custom":
            if not self._custom_extractor:
                raise ValueError("this discriminator needs its custom feature extractor: call attach_feature_extractor(module)")
            return self._custom_extractor[0](sample, sigma, class_labels).to(self.dtype)
        if self.extractor is not None:
            return self.extractor(sample, sigma, class_labels).to(self.dtype)
        return _network_inputs(self.preconditioning, sample, sigma, self.dtype)[0]

    def forward(
        self,
        sample: torch.Tensor,
        sigma: Union[torch.Tensor, float],
        class_labels: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[DiscriminatorOutput, Tuple]:
        """The logit log(d/(1 − d)) of noisy images.

        Args:
            sample: x = y + σ·n, shape (batch, in_channels, sample_size, sample_size), any float dtype.
            sigma: σ, a scalar or one value per sample.
            class_labels: class indices (batch,) or one-hot rows (batch, K), for a class-conditional discriminator.
            return_dict: return a :class:`DiscriminatorOutput` rather than a tuple.
        """
        check_sample_shape(sample, self.config.in_channels, self.config.sample_size)
        sigma = _sigma_per_sample(sigma, sample.shape[0], sample.device)
        h = self.features(sample, sigma, class_labels)
        noise_label = self.preconditioning.c_noise(sigma).to(torch.float32)
        logits = self.head(h, noise_label, class_labels)
        if not return_dict:
            return (logits,)
        return DiscriminatorOutput(logits=logits)

    def log_ratio(self, sample: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log(d/(1 − d)) ≈ log(p_data,σ/p_model,σ)(x) with d clipped to [1e-5, 1 − 1e-5] as DG does: the logit
        clamped to ±ln(1e5 − 1) ≈ ±11.513, with zero gradient where it is clamped."""
        return self(sample, sigma, class_labels).logits.clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP)


def _side(sample_size) -> int:
    if isinstance(sample_size, int):
        return sample_size
    h, w = sample_size
    if h != w:
        raise ValueError(f"only square images are supported, got sample_size {tuple(sample_size)}")
    return int(h)


def _json_ready(value):
    """Tuples to lists and non-JSON leaves dropped, so the nested config survives ``config.json``."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items() if _is_jsonable(v)}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return copy.deepcopy(value)


def _is_jsonable(value) -> bool:
    if isinstance(value, (dict, list, tuple)):
        return True
    return value is None or isinstance(value, (bool, int, float, str))
