"""Discriminator Guidance's published discriminator (Kim et al. 2023, alsdudrla10/DG) from its two ``torch.save``
state dicts, read with ``weights_only=True``: ``32x32_classifier.pt`` (the frozen ADM classifier) and
``discriminator_60.pt`` (unconditional CIFAR-10) or ``discriminator_250.pt`` (conditional)."""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from ..models.dg_discriminator import ADM_CHANNEL_MULT, DGDiscriminator, dg_classifier_config, dg_head_config
from .weights import load_exactly

DG_RESOLUTIONS = (32,)  # DG's CIFAR-10 setup; its 64 px classifier runs on cosine time, which is not implemented


def _read_state_dict(path: str, what: str) -> Dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (torch reports refusals and truncation with several types)
        raise ValueError(f"{what} {os.path.basename(path)} is not a torch state dict readable with weights_only=True "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{what} {os.path.basename(path)} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _classifier_resolution(state: Dict[str, torch.Tensor]) -> Optional[int]:
    """The image size whose ADM classifier architecture (guided-diffusion's ``create_classifier``) the state dict
    has, from its attention pooling's positional embedding and its number of input blocks; None if none fits."""
    embedding = state.get("out.2.positional_embedding")
    if embedding is None:
        return None
    side = round((embedding.shape[1] - 1) ** 0.5)
    blocks = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("input_blocks.")), default=0)
    for size, mult in ADM_CHANNEL_MULT.items():
        depth = 4 if size in (32, 64) else 2
        if size // 2 ** (len(mult) - 1) == side and blocks == 1 + len(mult) * depth + len(mult) - 1:
            return size
    return None


def load_dg_discriminator(
    classifier_path: str,
    discriminator_path: str,
    img_resolution: int = 32,
    conditional: bool = False,
) -> DGDiscriminator:
    """DG's discriminator as a :class:`~diffusers_stf.models.dg_discriminator.DGDiscriminator` (``log_ratio(x, σ)`` on
    EDM-scale x and σ; the component ``discriminator`` of :class:`~diffusers_stf.DiscriminatorGuidedPipeline`).

    Args:
        classifier_path: DG's ``32x32_classifier.pt`` (guided-diffusion's ADM classifier at ``img_resolution``).
        discriminator_path: DG's head, ``discriminator_60.pt`` (unconditional) or ``discriminator_250.pt``
            (conditional).
        img_resolution: the image size of the setup (DG's CIFAR-10: 32, the only one supported).
        conditional: whether the head is class-conditional (DG ``--cond=1``).

    Raises:
        ValueError: an unsupported ``img_resolution``, files that are not state dicts, a classifier of another image
            size, a head that does not fit the classifier's features or ``conditional``, or any key/shape mismatch.
    """
    if img_resolution not in DG_RESOLUTIONS:
        raise ValueError(f"img_resolution must be one of {DG_RESOLUTIONS} (DG's CIFAR-10 setup), "
                         f"got {img_resolution!r}")
    classifier_state = _read_state_dict(classifier_path, "classifier")
    head_state = _read_state_dict(discriminator_path, "discriminator")
    found = _classifier_resolution(classifier_state)
    if found != img_resolution:
        what = f"the {found} px ADM classifier" if found else "not an ADM classifier"
        raise ValueError(f"{os.path.basename(classifier_path)} is {what}, but img_resolution={img_resolution}")
    classifier_config = dg_classifier_config(img_resolution)
    mult = ADM_CHANNEL_MULT[img_resolution]
    feature_channels = int(classifier_config["model_channels"] * mult[-1])
    feature_size = img_resolution // 2 ** (len(mult) - 1)
    first, embedding = head_state.get("input_blocks.0.0.weight"), head_state.get("out.2.positional_embedding")
    if first is None or embedding is None:
        raise ValueError(f"{os.path.basename(discriminator_path)} is not DG's discriminator head (no "
                         "input_blocks.0.0.weight / out.2.positional_embedding)")
    head_features = (first.shape[1], round((embedding.shape[1] - 1) ** 0.5))
    if head_features != (feature_channels, feature_size):
        raise ValueError(
            f"{os.path.basename(discriminator_path)} judges {head_features[0]}x{head_features[1]}x{head_features[1]} "
            f"features, but the classifier at img_resolution={img_resolution} gives "
            f"{feature_channels}x{feature_size}x{feature_size}: the head belongs to another image size")
    labels = head_state.get("label_emb.weight")
    if (labels is not None) != conditional:
        kind = "class-conditional" if labels is not None else "unconditional"
        raise ValueError(f"{os.path.basename(discriminator_path)} is {kind}, but conditional={conditional}")
    num_class_embeds = int(labels.shape[0]) if labels is not None else None
    model = DGDiscriminator(
        sample_size=img_resolution, in_channels=3, num_class_embeds=num_class_embeds,
        classifier_config=classifier_config,
        head_config=dg_head_config(feature_channels, feature_size, num_class_embeds=num_class_embeds),
    )
    for part, state, path in ((model.classifier, classifier_state, classifier_path),
                              (model.head, head_state, discriminator_path)):
        load_exactly(part, state, f"{os.path.basename(path)} does not match DG's architecture")
    return model.eval()
