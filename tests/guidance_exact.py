"""Exact networks for the guidance tests: Gaussian (mixture) data with i.i.d. pixels, for which the denoiser, the
density ratio of two Gaussians and the classifier p(y | x, σ) are closed forms written here (Bayes' rule on
N(m_k, s² + σ²)), in the EDM/VE convention x = y + σ·n."""

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config


def log_normal(x: torch.Tensor, mean: float, var: torch.Tensor) -> torch.Tensor:
    """Σ over pixels of log N(x; mean, var), per sample; ``var`` has one entry per sample."""
    var = var.reshape(-1, *([1] * (x.ndim - 1)))
    return (-0.5 * (x - mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).flatten(1).sum(1)


def mixture_log_joint(x, sigma, means, weights, std):
    """log π_k + log N(x; m_k, (s² + σ²)I), shape (batch, K)."""
    var = std**2 + sigma.to(x.dtype) ** 2
    return torch.stack([math.log(w) + log_normal(x, m, var) for m, w in zip(means, weights)], dim=1)


def mixture_denoiser(x, sigma, means, weights, std):
    """E[y | x] for y ~ Σ_k π_k N(m_k, s² I), x = y + σ·n (Bayes: posterior class weights × Gaussian posteriors)."""
    post = torch.softmax(mixture_log_joint(x, sigma, means, weights, std), dim=1)
    shrink = (std**2 / (std**2 + sigma.to(x.dtype) ** 2)).reshape(-1, *([1] * (x.ndim - 1)))
    return sum(post[:, k].reshape(-1, *([1] * (x.ndim - 1))) * (m + shrink * (x - m)) for k, m in enumerate(means))


def ddpm_sigmas(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) of diffusers' linear β schedule, computed here."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


class ExactMixtureNet(ModelMixin, ConfigMixin):
    """The exact network of Gaussian-mixture data, in a scheduler's parametrisation.

    ``edm``: the network input is c_in(σ)·x at timestep ln(σ)/4 and it returns EDM's F (``v_prediction``: −F), as our
    EDM schedulers and diffusers' EDM schedulers call it. ``ddpm``: the input is x_t = x/√(1 + σ²) at a DDPM
    timestep t (a fractional t interpolates ln σ_t linearly, the inverse of the Euler samplers' σ → t map) and it
    returns ε, x₀ or v. ``score_ve``: the input is x at timestep ln σ and it returns the score ∇ log p_σ(x) = (D − x)/σ².
    ``score_vp``: the input is x_t = x/√(1 + σ²) at the VP SDE's time t (β_min = 0.1, β_max = 20) and it returns
    ∇_{x_t} log p(x_t) = √(1 + σ²)·(D − x)/σ².
    """

    @register_to_config
    def __init__(self, means=(0.0,), weights=(1.0,), std=0.5, sample_size=4, in_channels=1, parametrisation="edm",
                 prediction_type="epsilon", sigma_data=0.5, num_class_embeds=None, out_channels=1):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # float32 network

    def mixture(self, label: int):
        """(means, weights) of label k: component k alone, the whole mixture for the null label K (the last index of
        a class-conditional network, as classifier-free guidance trains it)."""
        c = self.config
        return (c.means, c.weights) if label == len(c.means) else ((c.means[label],), (1.0,))

    def sigma(self, timestep):
        t = timestep.double().reshape(-1)
        kind = self.config.parametrisation
        if kind == "edm":
            return torch.exp(4 * t)
        if kind == "score_ve":
            return torch.exp(t)
        if kind == "score_vp":
            return (torch.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1).sqrt()
        log_table = ddpm_sigmas().log()
        low = t.floor().long().clamp(0, len(log_table) - 2)
        frac = t - low
        return torch.exp((1 - frac) * log_table[low] + frac * log_table[low + 1])

    def forward(self, sample, timestep, class_labels=None):
        if self.config.num_class_embeds is not None:  # one class (or the null label) per sample
            timestep = torch.as_tensor(timestep).expand(len(sample))
            out = torch.empty(sample.shape, dtype=torch.float64)
            for label in torch.unique(class_labels).tolist():
                rows = class_labels == label
                out[rows] = self.evaluate(sample[rows], timestep[rows], *self.mixture(label))
            return type("Out", (), {"sample": out.float()})
        return type("Out", (), {"sample": self.evaluate(sample, timestep, self.config.means, self.config.weights).float()})

    def evaluate(self, sample, timestep, means, weights):
        c = self.config
        timestep = torch.as_tensor(timestep).expand(sample.shape[0])
        sigma = self.sigma(timestep)
        view = (-1,) + (1,) * (sample.ndim - 1)
        s = sigma.reshape(view)
        if c.parametrisation == "edm":
            sd = c.sigma_data
            x = sample.double() * (s**2 + sd**2).sqrt()
            D = mixture_denoiser(x, sigma, means, weights, c.std)
            out = (D - sd**2 / (s**2 + sd**2) * x) / (s * sd / (s**2 + sd**2).sqrt())
            out = -out if c.prediction_type == "v_prediction" else out
        elif c.parametrisation == "score_ve":
            x = sample.double()
            out = (mixture_denoiser(x, sigma, means, weights, c.std) - x) / s**2
        elif c.parametrisation == "score_vp":
            x = sample.double() * (1 + s**2).sqrt()
            out = (1 + s**2).sqrt() * (mixture_denoiser(x, sigma, means, weights, c.std) - x) / s**2
        else:
            x = sample.double() * (1 + s**2).sqrt()
            D = mixture_denoiser(x, sigma, means, weights, c.std)
            eps = (x - D) / s
            if c.prediction_type == "epsilon":
                out = eps
            elif c.prediction_type == "sample":
                out = D
            else:  # v = √ᾱ·ε − √(1 − ᾱ)·x₀ with √ᾱ = 1/√(1 + σ²)
                out = (eps - s * D) / (1 + s**2).sqrt()
        return out


class ExactLogRatio(ModelMixin, ConfigMixin):
    """A discriminator whose log-ratio is exactly log p_data,σ(x) − log p_model,σ(x) for Gaussian-mixture data and
    model with a common s: for single Gaussians, log N(x; μ', s² + σ²) − log N(x; μ, s² + σ²)."""

    @register_to_config
    def __init__(self, mean_real=0.0, mean_model=0.0, std=0.5, sample_size=4, in_channels=1, means_real=None,
                 means_model=None, weights_real=None, weights_model=None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def log_ratio(self, sample, sigma, class_labels=None):
        c = self.config
        sigma = torch.as_tensor(sigma, dtype=torch.float64).to(sample.device).reshape(-1)
        real = (c.means_real or (c.mean_real,), c.weights_real or (1.0,))
        model = (c.means_model or (c.mean_model,), c.weights_model or (1.0,))
        log_p = [torch.logsumexp(mixture_log_joint(sample, sigma, means, weights, c.std), dim=1) for means, weights in (real, model)]
        return log_p[0] - log_p[1]


class ExactMixtureClassifier(ModelMixin, ConfigMixin):
    """p(y | x, σ) of the mixture by Bayes' rule: softmax_k(log π_k + log N(x; m_k, (s² + σ²)I))."""

    @register_to_config
    def __init__(self, means=(0.0, 1.0), weights=(0.5, 0.5), std=0.5, sample_size=4, in_channels=1, num_classes=2):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def log_prob(self, sample, sigma, class_labels):
        c = self.config
        sigma = torch.as_tensor(sigma, dtype=torch.float64).to(sample.device).reshape(-1)
        log_post = torch.log_softmax(mixture_log_joint(sample, sigma, c.means, c.weights, c.std), dim=1)
        return log_post.gather(1, torch.as_tensor(class_labels).long().reshape(-1, 1).to(sample.device)).squeeze(1)


class LinearLogProb(ModelMixin, ConfigMixin):
    """A 'classifier' whose log p(y | x, σ) is (2y − 1)·δ·Σ_pixels x/(s² + σ²) (unnormalised: only its gradient
    matters). On the exact network of N(μ, s²), classifier guidance at scale w adds w·(2y − 1)·δ/(s² + σ²) to the score
    −(x − μ)/(s² + σ²): the score of N(μ + w·(2y − 1)·δ, s²) at every σ, so class y samples that Gaussian exactly."""

    @register_to_config
    def __init__(self, shift=0.05, std=0.5, sample_size=4, in_channels=1, num_classes=2):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def log_prob(self, sample, sigma, class_labels):
        c = self.config
        sigma = torch.as_tensor(sigma, dtype=torch.float64).to(sample.device).reshape(-1)
        sign = 2 * torch.as_tensor(class_labels).to(sample.device).reshape(-1).double() - 1
        return sign * c.shift * sample.flatten(1).sum(1) / (c.std**2 + sigma**2)
