"""Network preconditioning of Karras et al. 2022 ("EDM"), eq. 7: a raw network F becomes a denoiser

    D(x; σ) = c_skip(σ) · x + c_out(σ) · F(c_in(σ) · x, c_noise(σ)),

with x = y + σ·n in EDM coordinates. :class:`Preconditioning` holds the four scalings; :class:`Denoiser` wraps a
network in one. A change ΔD of the denoiser at fixed x is a change ΔD/c_out of the network output
(:meth:`Preconditioning.output_change`): this is how guidance reaches any scheduler's model output.
"""

from __future__ import annotations

import abc
import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

TensorOrFloat = Union[torch.Tensor, float]


def check_choice(name: str, value, allowed: Sequence[str]) -> str:
    """``value``, or a ValueError naming the argument and the allowed values."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def as_sigma(sigma: TensorOrFloat) -> torch.Tensor:
    """σ as a floating tensor (a python number becomes a float64 scalar)."""
    if torch.is_tensor(sigma):
        return sigma if sigma.is_floating_point() else sigma.double()
    return torch.tensor(float(sigma), dtype=torch.float64)


def is_host_level(sigma) -> bool:
    """One noise level known on the host (a number or a 0-d CPU tensor): scalings can be python floats, so the
    device never waits for a copy."""
    return not torch.is_tensor(sigma) or (sigma.ndim == 0 and sigma.device.type == "cpu")


def per_sample_view(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """σ on ``like``'s device and dtype, shaped to broadcast over its samples."""
    sigma = as_sigma(sigma).to(device=like.device, dtype=like.dtype)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


class Preconditioning(abc.ABC):
    """The four scalings of EDM eq. 7 and the σ range the network supports."""

    name: str = ""
    sigma_min: float = 0.0
    sigma_max: float = math.inf

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(sigma)

    @abc.abstractmethod
    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        ...

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / (sigma**2 + 1).sqrt()

    @abc.abstractmethod
    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        ...

    def round_sigma(self, sigma: TensorOrFloat) -> torch.Tensor:
        """Snap σ to a value the network was trained on (the identity for continuous-time networks)."""
        return as_sigma(sigma)

    def scalings(self, sigma: TensorOrFloat):
        """(c_skip, c_out, c_in, c_noise) at ``sigma``."""
        sigma = as_sigma(sigma)
        return self.c_skip(sigma), self.c_out(sigma), self.c_in(sigma), self.c_noise(sigma)

    def denoise(self, sample: torch.Tensor, network_output: torch.Tensor, sigma: TensorOrFloat) -> torch.Tensor:
        """D(x; σ) = c_skip·x + c_out·F (EDM eq. 7), computed in the dtype of ``sample``.

        A network with 2C output channels (iDDPM's learned variance) contributes its first C channels.
        """
        channels = sample.shape[1]
        if network_output.shape[1] == 2 * channels:
            network_output = network_output[:, :channels]
        if network_output.shape != sample.shape:
            raise ValueError(
                f"model_output has shape {tuple(network_output.shape)} but sample has shape {tuple(sample.shape)}; "
                "they must match (or the model output may have twice the channels, for a learned variance)"
            )
        if is_host_level(sigma):
            sigma = as_sigma(sigma).double()
            return float(self.c_skip(sigma)) * sample + float(self.c_out(sigma)) * network_output.to(sample.dtype)
        sigma = per_sample_view(sigma, sample)
        return self.c_skip(sigma) * sample + self.c_out(sigma) * network_output.to(sample.dtype)

    def output_change(self, denoised_change: torch.Tensor, sigma: TensorOrFloat) -> torch.Tensor:
        """ΔF = ΔD/c_out(σ): the change of the network output that changes D(x; σ) by ``denoised_change`` at fixed x
        (EDM eq. 7 is affine in F). For ε-prediction (c_out = −σ) this is Dhariwal & Nichol's ε̂ = ε − σ·∇ log p."""
        if is_host_level(sigma):
            return denoised_change / float(self.c_out(as_sigma(sigma).double()))
        return denoised_change / self.c_out(per_sample_view(sigma, denoised_change))


class Denoiser(nn.Module):
    """D(x; σ): a raw network (a diffusers ``UNet2DModel`` or any model called the same way) wrapped in a
    :class:`Preconditioning` (EDM eq. 7).

    The network sees ``c_in·x`` in its own dtype and ``c_noise`` as a float tensor of shape [B] (a python float
    would be cast to int inside ``UNet2DModel``); the skip connection is computed in the dtype of ``x``
    (float64 in the samplers, as in EDM).

    Args:
        model: the raw network, called as ``model(x, timesteps, class_labels=...)`` returning ``.sample`` or a tensor.
        preconditioning: a :class:`Preconditioning`.
    """

    def __init__(self, model: nn.Module, preconditioning: Preconditioning):
        super().__init__()
        self.model = model
        self.preconditioning = preconditioning

    def forward(self, x: torch.Tensor, sigma: TensorOrFloat, class_labels: Optional[torch.Tensor] = None,
                augment_labels: Optional[torch.Tensor] = None):
        sigma = as_sigma(sigma).to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])
        c_in = self.preconditioning.c_in(sigma).reshape(-1, *([1] * (x.ndim - 1)))
        model_dtype = next(self.model.parameters()).dtype
        c_noise = self.preconditioning.c_noise(sigma).to(torch.float32)
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        if augment_labels is not None:  # EDM's augmentation labels, a network input of their own
            kwargs["augment_labels"] = augment_labels
        out = self.model((c_in * x).to(model_dtype), c_noise, **kwargs)
        out = out.sample if hasattr(out, "sample") else out
        return self.preconditioning.denoise(x, out, sigma)
