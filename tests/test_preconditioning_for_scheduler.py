"""``preconditioning_for`` on config mappings (diffusers' defaults for missing entries, an EDM-style ``preconditioning``
entry with its constants) and the refusals that name the scheduler; ``EvaluationFrame``'s timestep range."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_stf.preconditioning import preconditioning_for
from diffusers_stf.preconditioning.for_scheduler import EvaluationFrame

pytestmark = pytest.mark.usefixtures("one_thread")


def ddpm_sigmas(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02):
    """σ_t = √((1 − ᾱ_t)/ᾱ_t) of diffusers' linear β schedule, in float64."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def test_a_ddpm_config_without_its_defaults_reads_diffusers_defaults():
    """DDPMScheduler's defaults (1000 steps, β from 1e-4 to 0.02, linear, ε-prediction) fill what a config leaves
    out: the σ table and c_out = −σ (D = x − σ·ε) are those of the defaults written out here."""
    p = preconditioning_for({"_class_name": "DDPMScheduler", "beta_schedule": "linear"})
    expected = ddpm_sigmas()
    for t in (0, 1, 500, 999):
        sigma = expected[t : t + 1]
        assert torch.allclose(p.c_noise(sigma), torch.tensor([float(t)], dtype=torch.float64))
        assert torch.allclose(p.c_out(sigma), -sigma, rtol=1e-12)
    shorter = preconditioning_for({"beta_schedule": "linear", "num_train_timesteps": 10, "beta_start": 0.001,
                                   "beta_end": 0.2, "prediction_type": "sample"})
    sigma = ddpm_sigmas(10, 0.001, 0.2)[9:10]
    assert torch.allclose(shorter.c_noise(sigma), torch.tensor([9.0], dtype=torch.float64))
    # x₀-prediction: D = 0·x + 1·F
    assert torch.allclose(shorter.c_out(sigma), torch.ones(1, dtype=torch.float64))
    assert torch.allclose(shorter.c_skip(sigma), torch.zeros(1, dtype=torch.float64))


def test_a_config_with_a_preconditioning_entry_builds_that_family_with_the_configs_constants():
    """EDM Table 1, VP row: c_noise(σ) = (M − 1)·t(σ) with t(σ) = (√(β_min² + 2β_d ln(1 + σ²)) − β_min)/β_d, where
    the scheduler's β schedule gives M = T, β_min = T·β_start and β_d = T·(β_end − β_start)."""
    beta_d, beta_min, M = 15.0, 0.2, 500
    p = preconditioning_for({"_class_name": "EDMHeunScheduler", "preconditioning": "vp", "num_train_timesteps": M,
                             "beta_start": beta_min / M, "beta_end": (beta_d + beta_min) / M, "sigma_min": 0.01,
                             "sigma_max": 50.0})
    sigma = torch.tensor([0.3, 2.0], dtype=torch.float64)
    t = ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d
    assert torch.allclose(p.c_noise(sigma), (M - 1) * t, rtol=1e-10)
    v = preconditioning_for({"preconditioning": "edm", "sigma_data": 0.25, "prediction_type": "v_prediction"})
    s = torch.tensor([0.7], dtype=torch.float64)
    assert torch.allclose(v.c_out(s), -s * 0.25 / (s**2 + 0.25**2).sqrt(), rtol=1e-12)  # the prediction type reaches it
    assert torch.allclose(v.c_skip(s), 0.25**2 / (s**2 + 0.25**2), rtol=1e-12)


@pytest.mark.parametrize("config,message", [
    ({"_class_name": "MyEDMScheduler", "sigma_data": 0.5, "prediction_type": "sample"},
     r"^MyEDMScheduler: prediction_type 'sample' of an EDM scheduler is not one of \('epsilon', 'v_prediction'\)"),
    ({"_class_name": "MyDDPM", "beta_schedule": "linear", "prediction_type": "flow_prediction"},
     r"^MyDDPM: prediction_type 'flow_prediction' is not one of .*DDPM network"),
    ({"_class_name": "MyDDPM", "beta_schedule": "linear", "rescale_betas_zero_snr": True},
     r"^MyDDPM: rescale_betas_zero_snr makes sigma infinite .*no EDM coordinates"),
    ({"_class_name": "MyDDPM", "beta_schedule": "linear", "use_flow_sigmas": True}, r"^MyDDPM: use_flow_sigmas"),
    ({"num_train_timesteps": 1000}, r"^the scheduler: its config has no preconditioning, sigma_data or beta schedule"),
])
def test_configs_without_edm_coordinates_are_refused_naming_the_scheduler_and_the_reason(config, message):
    with pytest.raises(ValueError, match=message):
        preconditioning_for(config)


def test_trained_betas_alone_make_a_ddpm_table():
    betas = torch.linspace(1e-3, 0.1, 20, dtype=torch.float64)
    p = preconditioning_for({"trained_betas": betas.tolist()})
    alpha_bar = torch.cumprod(1 - betas, 0)
    sigma = ((1 - alpha_bar[7]) / alpha_bar[7]).sqrt().reshape(1)
    assert torch.allclose(p.c_noise(sigma), torch.tensor([7.0], dtype=torch.float64))


def test_a_vp_form_scheduler_is_evaluated_only_at_its_integer_training_timesteps():
    """x_t = √ᾱ_t·(x + σ_t·n): the frame gives σ_t = √((1 − ᾱ_t)/ᾱ_t) and the scale √ᾱ_t for t in [0, T − 1], and
    refuses any other timestep, naming the range."""
    scheduler = DDIMScheduler(num_train_timesteps=50)
    scheduler.set_timesteps(5)
    frame = EvaluationFrame(scheduler)
    sigmas = ddpm_sigmas(50)
    for t in (0, 49, torch.tensor(20)):
        sigma, scale = frame.sigma_and_scale(t)
        alpha_bar = 1 / (1 + float(sigmas[int(t)]) ** 2)
        # diffusers keeps ᾱ in float32
        assert math.isclose(sigma, float(sigmas[int(t)]), rel_tol=2e-4)
        assert math.isclose(scale, math.sqrt(alpha_bar), rel_tol=1e-6)
    for bad in (50, -1, 3.5, torch.tensor(50)):
        with pytest.raises(ValueError, match=r"DDIMScheduler evaluates its network at timestep .* in \[0, 49\]"):
            frame.sigma_and_scale(bad)
