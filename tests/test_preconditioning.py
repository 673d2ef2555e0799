"""EDM Table 1 preconditionings, checked against the properties they were derived from and against diffusers."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_stf import (
    DDPMPreconditioning,
    Denoiser,
    EDMHeunScheduler,
    EDMPreconditioning,
    IDDPMPreconditioning,
    VPPreconditioning,
    make_preconditioning,
)
from diffusers_stf.preconditioning import betas_for_schedule

SIGMAS = torch.tensor([0.002, 0.05, 0.5, 2.0, 80.0], dtype=torch.float64)


def test_edm_scalings_give_unit_variance_input_and_target():
    """EDM Appendix B.6: c_in makes Var(c_in·x) = 1, c_skip minimises and c_out normalises Var(F_target) to 1."""
    sd = 0.5
    p = EDMPreconditioning(sigma_data=sd)
    c_skip, c_out, c_in, c_noise = p.scalings(SIGMAS)
    assert torch.allclose(c_in**2 * (sd**2 + SIGMAS**2), torch.ones_like(SIGMAS))
    # F_target = (y − c_skip·(y + σn))/c_out with y ~ N(0, sd²), n ~ N(0, 1)
    var_target = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * SIGMAS**2) / c_out**2
    assert torch.allclose(var_target, torch.ones_like(SIGMAS))
    # c_skip minimises that variance: its derivative in c_skip vanishes
    grad = -2 * (1 - c_skip) * sd**2 + 2 * c_skip * SIGMAS**2
    assert torch.allclose(grad, torch.zeros_like(SIGMAS), atol=1e-12)
    assert torch.allclose(c_noise, SIGMAS.log() / 4)


def test_v_prediction_flips_c_out():
    a, b = EDMPreconditioning(prediction_type="epsilon"), EDMPreconditioning(prediction_type="v_prediction")
    assert torch.allclose(a.c_out(SIGMAS), -b.c_out(SIGMAS))


def test_ddpm_matches_diffusers_alphas_cumprod():
    """c_in·(y + σε) = √ᾱ_t·y + √(1−ᾱ_t)·ε, the DDPM forward process, with ᾱ_t from diffusers' DDPMScheduler."""
    for schedule in ("linear", "squaredcos_cap_v2"):
        ddpm = DDPMScheduler(beta_schedule=schedule)
        abar = ddpm.alphas_cumprod.double()
        p = make_preconditioning("ddpm", beta_schedule=schedule)
        for t in (0, 10, 500, 999):
            sigma = math.sqrt((1 - abar[t]) / abar[t])
            c_skip, c_out, c_in, c_noise = p.scalings(sigma)
            assert float(c_noise) == t
            assert math.isclose(float(c_in), math.sqrt(abar[t]), rel_tol=1e-5)
            assert math.isclose(float(c_in) * sigma, math.sqrt(1 - abar[t]), rel_tol=1e-5)
            # with the true noise as the network output, the denoiser returns the clean image exactly
            y, eps = torch.randn(1, 1, 2, 2, dtype=torch.float64), torch.randn(1, 1, 2, 2, dtype=torch.float64)
            assert torch.allclose(p.denoise(y + sigma * eps, eps, sigma), y, atol=1e-9)


def test_ddpm_round_sigma_snaps_to_trained_levels():
    p = DDPMPreconditioning(betas_for_schedule(1000))
    rounded = p.round_sigma(torch.tensor([0.5, 3.0, 1e4], dtype=torch.float64))
    for r in rounded:
        assert torch.isclose(p.table, r).any()
    assert float(rounded[-1]) == p.sigma_max


def test_vp_time_round_trip_and_range():
    p = VPPreconditioning()
    t = torch.linspace(1e-5, 1, 50, dtype=torch.float64)
    assert torch.allclose(p.sigma_inv(p.sigma(t)), t, atol=1e-10)
    assert torch.allclose(p.c_noise(p.sigma(t)), 999 * t, atol=1e-7)
    # EDM's supported range [σ(1e−5), σ(1)] = [0.0010005, 152.167] (reference notes §1)
    assert math.isclose(p.sigma_min, 0.0010005, rel_tol=1e-4) and math.isclose(p.sigma_max, 152.167, rel_tol=1e-4)


def test_iddpm_table_endpoints():
    """EDM's u table for C1 = 0.001, C2 = 0.008, M = 1000 spans [0.006425, 20291.2] (reference notes §1)."""
    p = IDDPMPreconditioning()
    assert math.isclose(p.sigma_min, 0.006425, rel_tol=1e-3) and math.isclose(p.sigma_max, 20291.2, rel_tol=1e-4)
    assert float(p.c_noise(torch.tensor(p.sigma_max, dtype=torch.float64))) == 999


def test_denoiser_passes_float_c_noise_and_learned_variance(tiny_unet):
    calls = {}

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t, **kw):
            calls["t"] = t
            return torch.cat([x, 100 + x], dim=1)  # 2C channels: the second half is a learned variance

    p = EDMPreconditioning()
    D = Denoiser(Spy(), p)
    x = torch.randn(3, 1, 4, 4)
    out = D(x, torch.tensor([0.1, 1.0, 10.0]))
    assert calls["t"].dtype == torch.float32 and torch.allclose(calls["t"], torch.tensor([0.1, 1.0, 10.0]).log() / 4)
    c_skip, c_out, c_in, _ = p.scalings(torch.tensor([0.1, 1.0, 10.0]).reshape(-1, 1, 1, 1))
    assert torch.allclose(out, c_skip * x + c_out * c_in * x, atol=1e-6)
    assert Denoiser(tiny_unet, p)(torch.randn(2, 1, 8, 8), 1.0).shape == (2, 1, 8, 8)


def test_unknown_preconditioning_raises():
    with pytest.raises(ValueError, match="preconditioning"):
        make_preconditioning("cosine")


def test_ddpm_epsilon_model_samples_with_edm_scheduler():
    """An epsilon-prediction model on discrete DDPM timesteps (the exact posterior ε for Gaussian data, using diffusers'
    ᾱ_t) sampled with EDM Heun in the standard loop recovers the data distribution N(μ, s²)."""
    mu, s = 0.3, 0.5
    abar = DDPMScheduler().alphas_cumprod.double()

    def eps_model(x_t, t):
        a = abar[t.long()]
        return (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * s**2 + 1 - a)

    sched = EDMHeunScheduler.from_config(DDPMScheduler().config, preconditioning="ddpm")
    sched.set_timesteps(40)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 1, 1, 1, generator=g, dtype=torch.float64) * sched.init_noise_sigma
    for t in sched.timesteps:
        assert float(t) == int(t)  # discrete timesteps, as the network was trained
        x = sched.step(eps_model(sched.scale_model_input(x, t), t), t, x).prev_sample
    assert abs(float(x.mean()) - mu) < 0.02 and abs(float(x.std()) - s) < 0.02
