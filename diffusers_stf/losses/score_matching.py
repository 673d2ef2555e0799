"""Denoising score matching for noise-conditional score networks (Vincent 2011; Song & Ermon 2019, "NCSN").

A noise-conditional score network s_θ(x, σ) ≈ ∇_x log p_σ(x), p_σ = p_data ∗ N(0, σ²I), is trained with

    ℓ(θ; σ) = ½ E_{x ~ p_data, x̃ ~ N(x, σ²I)} ‖s_θ(x̃, σ) + (x̃ − x)/σ²‖²                (NCSN eq. 5)
    L(θ)    = E_σ λ(σ)·ℓ(θ; σ),   λ(σ) = σ²                                              (NCSN eq. 6)

and the clean sample is estimated from a noisy one by Tweedie's formula E[x | x̃] = x̃ + σ²·∇ log p_σ(x̃).

The raw network (a diffusers ``UNet2DModel``) and the score are related by two choices, shared with the score-based
schedulers (``AnnealedLangevinScheduler``, ``PredictorCorrectorScheduler``) through their config keys of the same names:

``prediction_type`` (what the network outputs)
    ``score``: s_θ(x, σ) itself (NCSN; diffusers' ``ScoreSdeVeScheduler`` with NCSN++).
    ``scaled_score``: σ·s_θ(x, σ), i.e. s_θ(x, σ) = F(x)/σ (NCSNv2 Technique 3; EDM's "VE" preconditioning).
    ``epsilon``: the noise, s_θ(x, σ) = −F/σ (DDPM; with λ = σ² the loss is ½‖F − z‖²).
``timestep_type`` (what the network receives as its ``timestep``; always a tensor, because ``UNet2DModel`` casts a
python float to int)
    ``log_sigma``: log σ (float).  ``sigma``: σ (float; NCSN++ with Fourier features).
    ``index``: the NCSN label, 0 for the largest level σ_1 … L−1 for σ_L (int64); needs the table of levels.
    ``none``: always 0, an unconditional network (NCSNv2's s_θ(x)/σ with ``scaled_score``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

PREDICTION_TYPES = ("score", "scaled_score", "epsilon")
TIMESTEP_TYPES = ("log_sigma", "sigma", "index", "none")


def _check_choice(name: str, value: str, allowed: Sequence[str]):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _per_sample(sigma, like: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=like.device, dtype=like.dtype)
    return sigma.reshape(-1, *([1] * (like.ndim - 1))) if sigma.ndim else sigma


def score_from_model_output(model_output: torch.Tensor, sigma, prediction_type: str = "score") -> torch.Tensor:
    """s_θ(x, σ) from the raw network output F (see the module docstring for ``prediction_type``).

    Args:
        model_output: F, shape (B, ...).
        sigma: σ, a scalar or one per sample (the marginal standard deviation for a VP model).
        prediction_type: ``score``, ``scaled_score`` or ``epsilon``.
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "score":
        return model_output
    sigma = _per_sample(sigma, model_output)
    return model_output / sigma if prediction_type == "scaled_score" else -model_output / sigma


def tweedie_denoise(sample: torch.Tensor, score: torch.Tensor, sigma, alpha=1.0) -> torch.Tensor:
    """E[x_0 | x] = (x + σ²·∇ log p(x))/α for x = α·x_0 + σ·z (Tweedie's formula; α = 1 for NCSN/VE, α = √ᾱ for VP).

    With α = 1 this is NCSNv2's final denoising step x̃ + σ² s_θ(x̃, σ).
    """
    sigma, alpha = _per_sample(sigma, sample), _per_sample(alpha, sample)
    return (sample + sigma**2 * score) / alpha


def noise_level_timestep(
    sigma, timestep_type: str = "log_sigma", sigmas: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """The ``timestep`` a noise-conditional network receives at noise level σ (see ``timestep_type`` above).

    Args:
        sigma: σ, a scalar or a 1-D tensor.
        timestep_type: ``log_sigma``, ``sigma``, ``index`` or ``none``.
        sigmas: the decreasing table σ_1 > … > σ_L of an ``index`` network; σ is matched to its nearest level.
    """
    _check_choice("timestep_type", timestep_type, TIMESTEP_TYPES)
    sigma = torch.as_tensor(sigma, dtype=torch.float64) if not torch.is_tensor(sigma) else sigma.double()
    if timestep_type == "log_sigma":
        return sigma.log().float()
    if timestep_type == "sigma":
        return sigma.float()
    if timestep_type == "none":
        return torch.zeros_like(sigma, dtype=torch.float32)
    if sigmas is None:
        raise ValueError("timestep_type='index' needs the table of noise levels (sigmas)")
    table = torch.as_tensor(sigmas, dtype=torch.float64, device=sigma.device)
    return (sigma.reshape(-1, 1).log() - table.reshape(1, -1).log()).abs().argmin(1).reshape(sigma.shape)


def sigma_from_timestep(
    timestep, timestep_type: str = "log_sigma", sigmas: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """σ of a ``timestep`` of type ``timestep_type``, the inverse of :func:`noise_level_timestep` (float64)."""
    _check_choice("timestep_type", timestep_type, TIMESTEP_TYPES)
    timestep = torch.as_tensor(timestep)
    if timestep_type == "log_sigma":
        return timestep.double().exp()
    if timestep_type == "sigma":
        return timestep.double()
    if timestep_type == "none":
        raise ValueError("timestep_type='none' carries no noise level; σ cannot be recovered from it")
    if sigmas is None:
        raise ValueError("timestep_type='index' needs the table of noise levels (sigmas)")
    table = torch.as_tensor(sigmas, dtype=torch.float64)
    return table.to(timestep.device)[timestep.long()]


class ScoreModel(nn.Module):
    """s_θ(x, σ) from a raw network F (a diffusers ``UNet2DModel``): F receives x and the timestep of σ, and its
    output becomes a score according to ``prediction_type`` (module docstring).

    NCSNv2's noise conditioning (Technique 3, s_θ(x, σ) = s_θ(x)/σ with an unconditional network) is
    ``ScoreModel(unet, prediction_type="scaled_score", timestep_type="none")`` or :meth:`ncsnv2`.

    Args:
        model: the raw network, called as ``model(x, timesteps, class_labels=...)`` returning ``.sample`` or a tensor.
        prediction_type: ``score``, ``scaled_score`` or ``epsilon``.
        timestep_type: ``log_sigma``, ``sigma``, ``index`` or ``none``.
        sigmas: the decreasing table σ_1 > … > σ_L (needed for ``index``).
    """

    def __init__(
        self,
        model: nn.Module,
        prediction_type: str = "scaled_score",
        timestep_type: str = "log_sigma",
        sigmas: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_type", timestep_type, TIMESTEP_TYPES)
        if timestep_type == "index" and sigmas is None:
            raise ValueError("timestep_type='index' needs the table of noise levels (sigmas)")
        self.model = model
        self.prediction_type = prediction_type
        self.timestep_type = timestep_type
        self.register_buffer(
            "sigmas", None if sigmas is None else torch.as_tensor(sigmas, dtype=torch.float64), persistent=False
        )

    @classmethod
    def ncsnv2(cls, model: nn.Module) -> "ScoreModel":
        """NCSNv2 Technique 3: s_θ(x, σ) = F(x)/σ, F unconditional (it always receives timestep 0)."""
        return cls(model, prediction_type="scaled_score", timestep_type="none")

    def forward(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])
        timestep = noise_level_timestep(sigma, self.timestep_type, self.sigmas)
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        model_dtype = next(self.model.parameters(), x).dtype
        out = self.model(x.to(model_dtype), timestep, **kwargs)
        out = out.sample if hasattr(out, "sample") else out
        return score_from_model_output(out.to(x.dtype), sigma, self.prediction_type)


class DenoisingScoreMatchingLoss:
    """NCSN's annealed denoising score matching loss (eqs. 5–6):

        ½ λ(σ)·‖s_θ(x̃, σ) + (x̃ − x)/σ²‖²,  x̃ = x + σz,  λ(σ) = σ²,  i.e.  ½‖σ·s_θ(x̃, σ) + z‖²,

    summed over the dimensions of a sample and averaged over the batch (as NCSN's ``anneal_dsm_score_estimation``).

    Args:
        sigmas: the decreasing table σ_1 > … > σ_L; σ is drawn uniformly from it (NCSN) with
            ``sigma_sampling="discrete"``.
        sigma_min, sigma_max: the range of ``sigma_sampling="log_uniform"`` (log σ ~ U[log σ_min, log σ_max]),
            for networks sampled on continuous schedules (CAS, the VE SDE).
        sigma_sampling: ``discrete`` or ``log_uniform``.
    """

    def __init__(
        self,
        sigmas: Optional[Sequence[float]] = None,
        sigma_min: float = 0.01,
        sigma_max: float = 1.0,
        sigma_sampling: str = "discrete",
    ):
        _check_choice("sigma_sampling", sigma_sampling, ("discrete", "log_uniform"))
        if sigma_sampling == "discrete":
            if sigmas is None:
                raise ValueError("sigma_sampling='discrete' needs the table of noise levels (sigmas)")
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
            if len(sigmas) < 1 or not bool((sigmas > 0).all()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
                raise ValueError("sigmas must be a non-empty, strictly decreasing sequence of positive noise levels")
        elif not (sigma_max > sigma_min > 0):
            raise ValueError(f"need sigma_max > sigma_min > 0, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigmas, self.sigma_min, self.sigma_max, self.sigma_sampling = sigmas, sigma_min, sigma_max, sigma_sampling

    def sample_sigmas(self, batch_size: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """σ for each sample of a batch (float64)."""
        if self.sigma_sampling == "discrete":
            idx = torch.randint(len(self.sigmas), (batch_size,), generator=generator)
            return self.sigmas[idx].to(device)
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return torch.exp(math.log(self.sigma_min) + u * math.log(self.sigma_max / self.sigma_min)).to(device)

    def __call__(
        self,
        score_model,
        x: torch.Tensor,
        sigma: Optional[Union[torch.Tensor, float]] = None,
        noise: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        **model_kwargs,
    ) -> torch.Tensor:
        """The batch loss. ``score_model(x̃, σ, **model_kwargs)`` returns s_θ(x̃, σ) (e.g. a :class:`ScoreModel`);
        σ and z are drawn unless given."""
        if sigma is None:
            sigma = self.sample_sigmas(x.shape[0], generator)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).to(x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        s = _per_sample(sigma, x)
        score = score_model(x + s * noise, sigma, **model_kwargs)
        return 0.5 * (s * score + noise).pow(2).flatten(1).sum(1).mean()
