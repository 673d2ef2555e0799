"""Feature extractors for the Fréchet distance and precision/recall, all loaded from local files.

* :class:`DigitsFeatureExtractor` (default): the small CNN classifier shipped in this package, trained on the
  embedded digits' training split by ``scripts/train_digits_classifier.py``; 64-d penultimate features, 10 logits.
* :class:`InceptionFeatureExtractor`: the FID Inception-v3 (2048-d pool3) from pytorch-fid's weight file
  ``pt_inception-2015-12-05-6726825d.pth`` on disk, so the distance is the standard FID.
* :class:`TransformersFeatureExtractor`: any ``transformers`` vision backbone loaded with ``AutoModel``; a DINOv2
  checkpoint gives FD_DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics").

Every extractor takes images as float tensors (N, C, H, W) in [−1, 1], the package's convention, and checks that
they have the channels (and, for fixed-size networks, the size) it was built for.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .inception import INCEPTION_FID_WEIGHTS_URL, FIDInceptionV3

DIGITS_CLASSIFIER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_classifier")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def file_fingerprint(path: str, chunk: int = 1 << 20) -> str:
    """A short hash of a weights file (its size, first and last MiB), to key cached reference statistics."""
    digest = hashlib.sha256(str(os.path.getsize(path)).encode())
    with open(path, "rb") as f:
        digest.update(f.read(chunk))
        if os.path.getsize(path) > chunk:
            f.seek(-chunk, os.SEEK_END)
            digest.update(f.read(chunk))
    return digest.hexdigest()[:12]


class FeatureExtractor(nn.Module, abc.ABC):
    """Base class: ``forward(images)`` → (features (N, d), logits (N, C) or None).

    Attributes:
        name: identifies the network and its weights (keys the reference-statistics cache).
        channels: the number of image channels the network takes.
        resolution: the image size it takes, or None when it resizes any input itself.
        feature_dim: d.
        num_classes: C, or None for a backbone without classifier.
    """

    name: str = "feature-extractor"
    channels: int = 3
    resolution: Optional[int] = None
    feature_dim: int = 0
    num_classes: Optional[int] = None

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a ValueError unless ``images`` is a float (N, C, H, W) batch this network can embed."""
        if not torch.is_tensor(images) or images.ndim != 4:
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ValueError(f"images must be a 4-D tensor (N, C, H, W), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"images must be floats in [-1, 1], got dtype {images.dtype}")
        n, c, h, w = images.shape
        if c != self.channels:
            hint = " (grey images can be repeated to RGB with evaluation.match_channels)" if c == 1 else ""
            raise ValueError(f"{self.name} takes {self.channels}-channel images, got {c} channels{hint}")
        if self.resolution is not None and (h, w) != (self.resolution, self.resolution):
            raise ValueError(
                f"{self.name} takes {self.resolution}x{self.resolution} images, got {h}x{w}; generate at that size or "
                "use a feature extractor that resizes its input (inception, transformers)"
            )
        if n and (images.min() < -1.5 or images.max() > 1.5):
            raise ValueError(
                f"images must lie in [-1, 1], got values in [{float(images.min()):.3g}, {float(images.max()):.3g}] "
                "(images in [0, 1] or [0, 255] must be rescaled to [-1, 1])"
            )

    @abc.abstractmethod
    def embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        ...

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        self.check_images(images)
        device = next(self.parameters()).device
        return self.embed(images.to(device=device, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# The shipped digits classifier


class DigitsClassifier(ModelMixin, ConfigMixin):
    """A small CNN for 8×8 digits: conv3×3 → ReLU → conv3×3 → ReLU → max-pool 2 → fc → ReLU (the features) → fc.

    Args:
        in_channels: image channels.
        sample_size: image side length.
        conv_channels: output channels of the two 3×3 convolutions.
        feature_dim: width of the penultimate layer, whose post-ReLU activations are the features.
        num_classes: number of classes.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        sample_size: int = 8,
        conv_channels: Sequence[int] = (32, 64),
        feature_dim: int = 64,
        num_classes: int = 10,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, conv_channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(conv_channels[0], conv_channels[1], 3, padding=1)
        self.fc1 = nn.Linear(conv_channels[1] * (sample_size // 2) ** 2, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


class DigitsFeatureExtractor(FeatureExtractor):
    """The default extractor for the embedded 8×8 digits: :class:`DigitsClassifier` from ``path`` (the shipped one
    unless given), 64-d post-ReLU penultimate features and 10 class logits."""

    def __init__(self, path: Optional[str] = None):
        super().__init__()
        path = path or DIGITS_CLASSIFIER_PATH
        if not os.path.isdir(path):
            raise ValueError(f"path must be a folder saved with DigitsClassifier.save_pretrained, got {path!r}")
        self.classifier = DigitsClassifier.from_pretrained(path).eval()
        config = self.classifier.config
        weights = os.path.join(path, "diffusion_pytorch_model.safetensors")
        self.name = f"digits-cnn-{file_fingerprint(weights)}"
        self.channels, self.resolution = config.in_channels, config.sample_size
        self.feature_dim, self.num_classes = config.feature_dim, config.num_classes

    def embed(self, images):
        features = self.classifier.features(images)
        return features, self.classifier.fc2(features)


# ---------------------------------------------------------------------------------------------------------------
# Inception-v3 (FID) from pytorch-fid's weight file


def load_state_dict_file(path: str) -> dict:
    """Tensors of a ``.safetensors`` file, or of a ``torch.save``-d state dict read with ``weights_only=True`` (no
    unpickling of arbitrary objects)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


class InceptionFeatureExtractor(FeatureExtractor):
    """The FID Inception-v3 from pytorch-fid's weights ``pt_inception-2015-12-05-6726825d.pth`` (or the same state
    dict saved as ``.safetensors``): 2048-d pool3 features, 1008 logits. Takes RGB images of any size (resized to
    299×299), so its Fréchet distance is the FID.

    Args:
        weights_path: the local weight file. Nothing is downloaded: fetch it once from
            ``INCEPTION_FID_WEIGHTS_URL`` (e.g. with :func:`download_inception_weights` on a machine with internet).
    """

    channels, resolution, feature_dim, num_classes = 3, None, 2048, 1008

    def __init__(self, weights_path: str):
        super().__init__()
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"Inception weights not found at {weights_path!r}; download pytorch-fid's FID weights from "
                f"{INCEPTION_FID_WEIGHTS_URL} and pass the file's path"
            )
        self.network = FIDInceptionV3()
        state = load_state_dict_file(weights_path)
        result = self.network.load_state_dict(state, strict=False)
        # BatchNorm's num_batches_tracked counters are absent from older state dicts and unused in eval mode.
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{weights_path} is not a pytorch-fid Inception state dict: missing {missing[:5]}"
                f"{'...' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]}"
            )
        self.network.eval()
        self.name = f"inception-fid-{file_fingerprint(weights_path)}"

    def embed(self, images):
        return self.network(images)


def download_inception_weights(destination: str) -> str:
    """Download pytorch-fid's FID Inception weights to ``destination`` (needs internet; never called implicitly)."""
    os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
    torch.hub.download_url_to_file(INCEPTION_FID_WEIGHTS_URL, destination, progress=True)
    return destination


# ---------------------------------------------------------------------------------------------------------------
# Any transformers vision backbone (DINOv2, ViT, ...)


class TransformersFeatureExtractor(FeatureExtractor):
    """A ``transformers`` vision backbone loaded with ``AutoModel.from_pretrained``. Images are resized (bicubic) to
    the model's input size and normalised with its image processor's mean/std (ImageNet's if it has none). Features
    are ``pooler_output`` (for DINOv2 the layer-normed CLS token, as FD_DINOv2 uses), else the mean of the last
    hidden states.

    Args:
        name_or_path: a local folder saved with ``save_pretrained`` (or a Hub id, which needs internet unless cached).
        resolution: input size; default: the processor's crop size, else its size, else ``config.image_size``
            (224 for the public DINOv2 processors).
        local_files_only: never touch the network (default True).
    """

    def __init__(self, name_or_path: str, resolution: Optional[int] = None, local_files_only: bool = True):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(name_or_path, local_files_only=local_files_only)
            self.model = AutoModel.from_pretrained(name_or_path, local_files_only=local_files_only).eval()
        except OSError as err:
            raise ValueError(f"could not load a transformers model from {name_or_path!r}: {err}") from err
        processor = self._processor_config(name_or_path)
        self.input_size = int(resolution or self._processor_size(processor) or getattr(config, "image_size", 224))
        self.register_buffer("mean", torch.tensor(processor.get("image_mean", IMAGENET_MEAN)).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(processor.get("image_std", IMAGENET_STD)).reshape(1, -1, 1, 1))
        self.channels = int(getattr(config, "num_channels", 3))
        self.feature_dim = int(getattr(config, "hidden_size", 0) or config.hidden_sizes[-1])
        fingerprint = hashlib.sha256(config.to_json_string().encode())
        if os.path.isdir(name_or_path):
            for file in sorted(os.listdir(name_or_path)):
                if file.endswith((".safetensors", ".bin")):
                    fingerprint.update(file_fingerprint(os.path.join(name_or_path, file)).encode())
        self.name = f"transformers-{config.model_type}-{self.input_size}px-{fingerprint.hexdigest()[:12]}"

    @staticmethod
    def _processor_config(name_or_path: str) -> dict:
        path = os.path.join(name_or_path, "preprocessor_config.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        return {}

    @staticmethod
    def _processor_size(processor: dict) -> Optional[int]:
        for key in ("crop_size", "size"):
            size = processor.get(key)
            if isinstance(size, dict):
                size = size.get("height") or size.get("shortest_edge")
            if size:
                return int(size)
        return None

    def embed(self, images):
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bicubic", antialias=True)
        x = ((x + 1) / 2 - self.mean) / self.std
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        features = pooled if pooled is not None else out.last_hidden_state.mean(dim=1)
        return features.flatten(1), None


def load_feature_extractor(name: str = "digits", path: Optional[str] = None) -> FeatureExtractor:
    """A feature extractor by name.

    Args:
        name: ``digits`` (the shipped classifier; ``path`` may point to another saved DigitsClassifier),
            ``inception`` (``path``: pytorch-fid's weight file) or ``transformers`` (``path``: a local model folder).
        path: see ``name``.
    """
    if name == "digits":
        return DigitsFeatureExtractor(path)
    if name in ("inception", "transformers") and not path:
        raise ValueError(f"feature extractor {name!r} needs a path to local weights")
    if name == "inception":
        return InceptionFeatureExtractor(path)
    if name == "transformers":
        return TransformersFeatureExtractor(path)
    raise ValueError(f"feature extractor name must be 'digits', 'inception' or 'transformers', got {name!r}")
