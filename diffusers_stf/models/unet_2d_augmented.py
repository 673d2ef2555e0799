"""A diffusers ``UNet2DModel`` with EDM's augmentation conditioning (Karras et al. 2022, Appendix F.2), kept apart
from class conditioning as in NVlabs' networks (``label_dim`` and ``augment_dim``, two mappings):

    emb = time_embedding(t) + class_embedding(y) + map_augment(a),

where ``map_augment`` is a bias-free linear map of the augmentation labels a (zero labels: no augmentation, the
setting for sampling) and the class embedding is diffusers' own (``num_class_embeds`` classes, or none).
"""

from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
from diffusers import ModelMixin, UNet2DModel  # noqa: F401  (ModelMixin by name: diffusers resolves saved classes)
from torch import nn


class AugmentLabelMap(nn.Embedding):
    """A bias-free linear map of augmentation labels (B, augment_dim) into the time embedding (EDM's ``map_augment``).
    It subclasses ``nn.Embedding`` to keep a weight of shape (augment_dim, embedding_dim); zero labels give zero."""

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.to(self.weight.dtype) @ self.weight


class ClassAndAugmentEmbedding(nn.Module):
    """The class embedding (or none) plus the augmentation map, in the slot of ``UNet2DModel.class_embedding``; it
    takes the pair (class labels, augmentation labels)."""

    def __init__(self, labels: Optional[nn.Embedding], augment: AugmentLabelMap):
        super().__init__()
        self.labels = labels
        self.augment = augment

    def forward(self, conditioning: Tuple[Optional[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        class_labels, augment_labels = conditioning
        embedding = self.augment(augment_labels)
        return embedding if self.labels is None else embedding + self.labels(class_labels)


class AugmentConditionedUNet2DModel(UNet2DModel):
    """``UNet2DModel`` conditioned on EDM's augmentation labels (module docstring).

    Args:
        augment_dim: the width of the augmentation labels (9 for EDM's CIFAR-10 setting, ``AugmentPipe.label_dim``).
        **unet_kwargs: ``UNet2DModel``'s arguments; ``num_class_embeds`` is the number of classes (None:
            unconditional) and ``class_embed_type`` must be None.

    A config without ``augment_dim`` is the layout in which ``num_class_embeds`` held the augmentation width and
    ``class_embedding.weight`` was the augmentation map: :meth:`from_config` and loading read it as such.
    """

    def __init__(self, *args, augment_dim: int = 9, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(augment_dim, bool) or not isinstance(augment_dim, int) or augment_dim < 1:
            raise ValueError(f"augment_dim must be an integer >= 1, got {augment_dim!r}")
        if self.config.class_embed_type is not None:
            raise ValueError("AugmentConditionedUNet2DModel takes class labels through num_class_embeds only; "
                             f"class_embed_type must be None, got {self.config.class_embed_type!r}")
        self.register_to_config(augment_dim=augment_dim)
        dim = self.time_embedding.linear_2.out_features
        augment = AugmentLabelMap(augment_dim, dim)
        nn.init.normal_(augment.weight, std=augment_dim**-0.5)
        self.class_embedding = ClassAndAugmentEmbedding(self.class_embedding, augment)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        config = dict(config or {}, **kwargs)
        if "augment_dim" not in config and config.get("num_class_embeds"):
            config["augment_dim"], config["num_class_embeds"] = config["num_class_embeds"], None
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs)

    def _fix_state_dict_keys_on_load(self, state_dict) -> None:
        super()._fix_state_dict_keys_on_load(state_dict)
        if "class_embedding.weight" in state_dict and "class_embedding.augment.weight" not in state_dict:
            state_dict["class_embedding.augment.weight"] = state_dict.pop("class_embedding.weight")

    def forward(self, sample: torch.Tensor, timestep, class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None, return_dict: bool = True):
        """``UNet2DModel.forward`` with the class labels of a class-conditional model and augmentation labels
        (B, augment_dim); None means zero labels, i.e. no augmentation."""
        if self.class_embedding.labels is None and class_labels is not None:
            raise ValueError("class_labels were given but the unet is not class-conditional (num_class_embeds is None)")
        if self.class_embedding.labels is not None and class_labels is None:
            raise ValueError("class_labels are needed: the unet is class-conditional")
        dim = self.config.augment_dim
        if augment_labels is None:
            augment_labels = sample.new_zeros(sample.shape[0], dim)
        elif augment_labels.shape != (sample.shape[0], dim):
            raise ValueError(f"augment_labels must have shape ({sample.shape[0]}, {dim}), got {tuple(augment_labels.shape)}")
        return super().forward(sample, timestep, class_labels=(class_labels, augment_labels), return_dict=return_dict)


# diffusers reads the config keys from the __init__ signature: UNet2DModel's, plus augment_dim.
_unet_signature = inspect.signature(UNet2DModel.__init__)
AugmentConditionedUNet2DModel.__init__.__signature__ = _unet_signature.replace(parameters=[
    *_unet_signature.parameters.values(),
    inspect.Parameter("augment_dim", inspect.Parameter.KEYWORD_ONLY, default=9, annotation=int),
])
