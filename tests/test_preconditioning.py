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
from diffusers_stf.noise_schedules import betas_for_schedule

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


# --------------------------------------------------------------------------------------------------------------
# Every diffusers DDPM prediction type (ε, x₀ = "sample", v) on the variance-preserving parametrisations


def iddpm_u_table(M=1000, C1=0.001, C2=0.008):
    """EDM eq. 99 (Appendix C.3.4), written here: u_M = 0, u_{j−1} = √((u_j² + 1)/max(ᾱ(j−1)/ᾱ(j), C1) − 1) with
    ᾱ(j) = sin²(½π·j/(M(C2 + 1))); returned in increasing order, index = the network's timestep."""
    abar = [math.sin(0.5 * math.pi * j / M / (C2 + 1)) ** 2 for j in range(M + 1)]
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar[j - 1] / abar[j], C1) - 1)
    return torch.tensor(u[:M][::-1], dtype=torch.float64)


def ddpm_targets(y, n, alpha_bar):
    """x_t and diffusers' three training targets at ᾱ (DDPMScheduler.add_noise / get_velocity)."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return a * y + s * n, {"epsilon": n, "sample": y, "v_prediction": a * n - s * y}


@pytest.mark.parametrize("name", ["ddpm", "iddpm", "vp"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_every_prediction_type_denoises_its_exact_target(name, prediction_type):
    """With the true target as the network output, D(x; σ) = c_skip·x + c_out·F returns the clean y exactly, where
    x = y + σn is the VE state of the network input x_t = √ᾱ·y + √(1−ᾱ)·n, σ = √((1−ᾱ)/ᾱ)."""
    p = make_preconditioning(name, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    for sigma in (0.01, 0.3, 1.0, 7.0, 150.0):
        sigma = float(p.round_sigma(sigma))
        alpha_bar = torch.tensor(1 / (1 + sigma**2), dtype=torch.float64)
        y, n = torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)
        x_t, targets = ddpm_targets(y, n, alpha_bar)
        c_in = float(p.c_in(torch.tensor(sigma, dtype=torch.float64)))
        x = y + sigma * n
        assert torch.allclose(c_in * x, x_t, atol=1e-12)
        assert torch.allclose(p.denoise(x, targets[prediction_type], sigma), y, atol=1e-9 * max(sigma, 1))


def gaussian_predictor(prediction_type, alpha_bar_of_timestep, mu=0.3, s=0.5):
    """The exact network for data N(μ, s²): E[y | x_t] = μ + √ᾱ·s²·(x_t − √ᾱ·μ)/(ᾱ·s² + 1 − ᾱ), and ε, v from it."""

    def model(x_t, t):
        abar = alpha_bar_of_timestep(t)
        a, sd = abar.sqrt(), (1 - abar).sqrt()
        y_hat = mu + a * s**2 * (x_t - a * mu) / (abar * s**2 + 1 - abar)
        eps_hat = (x_t - a * y_hat) / sd
        return {"epsilon": eps_hat, "sample": y_hat, "v_prediction": a * eps_hat - sd * y_hat}[prediction_type]

    return model


def sample_gaussian(scheduler, model, n_steps=200, n=2000):
    """(x_0, x_N) of the standard loop from x_0 ~ N(0, init_noise_sigma²), the network evaluated at trained levels."""
    scheduler.set_timesteps(n_steps)
    g = torch.Generator().manual_seed(0)
    x = x0 = torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        assert float(t) == int(t)  # discrete timesteps, as the network was trained
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x0, x


def assert_exact_flow(scheduler, x0, x, mu=0.3, s=0.5):
    """For data N(μ, s²) the probability-flow ODE dx/dσ = (x − D)/σ keeps (x − μ)/√(s² + σ²) constant, so x_0 at
    σ_0 lands at μ + (x_0 − μ)·s/√(s² + σ_0²), sample by sample (200 Heun steps: error < 1e-3)."""
    sigma0 = float(scheduler.sigmas[0])
    assert x0.std() > 0.9 * sigma0 and x0.std() < 1.1 * sigma0  # the loop started at the top of the table
    exact = mu + (x0 - mu) * s / math.sqrt(s**2 + sigma0**2)
    assert (x - exact).abs().max() < 1e-3, float((x - exact).abs().max())


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_ddpm_checkpoint_of_every_prediction_type_samples_the_data(prediction_type):
    """A diffusers DDPM config of each prediction type, loaded into EDM Heun with ``preconditioning="ddpm"``, follows
    the exact probability-flow ODE of N(μ, s²) with the exact predictor (ᾱ_t from diffusers' DDPMScheduler)."""
    config = DDPMScheduler(prediction_type=prediction_type).config
    abar = DDPMScheduler().alphas_cumprod.double()
    sched = EDMHeunScheduler.from_config(config, preconditioning="ddpm")
    assert sched.config.prediction_type == prediction_type
    assert_exact_flow(sched, *sample_gaussian(sched, gaussian_predictor(prediction_type, lambda t: abar[t.long()])))


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_iddpm_of_every_prediction_type_samples_the_data(prediction_type):
    u = iddpm_u_table()
    sched = EDMHeunScheduler(preconditioning="iddpm", prediction_type=prediction_type)
    x0, x = sample_gaussian(sched, gaussian_predictor(prediction_type, lambda t: 1 / (1 + u[t.long()] ** 2)))
    assert_exact_flow(sched, x0, x)


@pytest.mark.parametrize(
    "preconditioning,prediction_type",
    [("ddpm", "x0"), ("ddpm", "score"), ("iddpm", "eps"), ("vp", "v"), ("edm", "sample"), ("ve", "v_prediction")],
)
def test_unsupported_prediction_type_is_refused_when_the_scheduler_is_built(preconditioning, prediction_type):
    with pytest.raises(ValueError, match="prediction_type"):
        EDMHeunScheduler(preconditioning=preconditioning, prediction_type=prediction_type)


def test_betas_for_schedule_refuses_schedules_outside_zero_one():
    """0 < β < 1 at every step, and ᾱ_T > 0 in float64 (a β ≥ 1 would make σ_t infinite or NaN)."""
    for kwargs in (dict(beta_start=0.0), dict(beta_end=1.0), dict(beta_start=0.5, beta_end=-0.1),
                   dict(trained_betas=[0.1, float("nan")]), dict(beta_start=0.9, beta_end=0.999)):
        with pytest.raises(ValueError, match="beta"):
            betas_for_schedule(**kwargs)


def test_ddpm_config_with_trained_betas_builds_their_sigma_table():
    betas = torch.linspace(2e-4, 3e-2, 500, dtype=torch.float64) ** 1.1
    config = DDPMScheduler(num_train_timesteps=500, trained_betas=betas.tolist()).config
    sched = EDMHeunScheduler.from_config(config, preconditioning="ddpm")
    abar = torch.cumprod(1 - betas, 0)
    assert torch.allclose(sched.preconditioning.table, ((1 - abar) / abar).sqrt(), rtol=1e-12)


def test_scheduler_constants_of_the_table1_rows():
    """EDMHeunScheduler's config carries EDM Table 1's constants: VP's ε_t sets σ_min = σ(ε_t), VE's σ range, iDDPM's
    C_1, C_2 or explicit levels (closed forms written here)."""
    from diffusers_stf import EDMHeunScheduler

    vp = EDMHeunScheduler(preconditioning="vp", epsilon_t=1e-3).preconditioning
    assert math.isclose(vp.sigma_min, math.sqrt(math.exp(0.5 * 19.9 * 1e-6 + 0.1 * 1e-3) - 1), rel_tol=1e-12)
    ve = EDMHeunScheduler(preconditioning="ve", ve_sigma_min=0.01, ve_sigma_max=50.0)
    assert ve.sigma_range == (0.01, 50.0)
    levels = [9.0, 3.0, 1.0, 0.5]
    iddpm = EDMHeunScheduler(preconditioning="iddpm", num_train_timesteps=4, iddpm_levels=levels).preconditioning
    sigma = torch.tensor([0.6, 2.2, 8.0], dtype=torch.float64)
    assert iddpm.round_sigma(sigma).tolist() == [0.5, 3.0, 9.0]
    assert iddpm.c_noise(torch.tensor([0.5, 9.0], dtype=torch.float64)).tolist() == [0.0, 3.0]  # M − 1 − j
    c2 = EDMHeunScheduler(preconditioning="iddpm", iddpm_c2=0.02).preconditioning
    assert c2.C2 == 0.02 and not torch.allclose(c2.table, EDMHeunScheduler(preconditioning="iddpm").preconditioning.table)
    with pytest.raises(ValueError, match="iddpm_levels must hold M = 4 levels"):
        EDMHeunScheduler(preconditioning="iddpm", num_train_timesteps=4, iddpm_levels=[2.0, 1.0])


# --------------------------------------------------------------------------------------------------------------
# Table 1's VE row, the discrete tables' devices and dtypes, the score preconditionings' conventions


def test_ve_preconditioning_is_edm_table_1():
    """VE: c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(½σ), σ ∈ [0.02, 100]."""
    from diffusers_stf import VEPreconditioning

    p = VEPreconditioning()
    assert (p.sigma_min, p.sigma_max) == (0.02, 100.0)
    c_skip, c_out, c_in, c_noise = p.scalings(SIGMAS)
    assert torch.equal(c_skip, torch.ones_like(SIGMAS)) and torch.equal(c_in, torch.ones_like(SIGMAS))
    assert torch.allclose(c_out, SIGMAS, rtol=1e-15) and torch.allclose(c_noise, torch.log(SIGMAS / 2), rtol=1e-14)


def test_discrete_tables_follow_the_device_and_dtype_of_sigma():
    """The table is copied once to each device a σ lives on (here ``meta``); a rounded σ keeps its dtype; c_noise is
    the level's index as a float of σ's precision; integral float timesteps are indices."""
    p = DDPMPreconditioning(betas_for_schedule(1000))
    on_meta = p.table_on("meta")
    assert on_meta.device.type == "meta" and p.table_on("meta") is on_meta
    assert p.round_sigma(torch.tensor([0.5], device="meta")).device.type == "meta"
    for dtype in (torch.float32, torch.float64):
        sigma = torch.tensor([0.5, 3.0], dtype=dtype)
        assert p.round_sigma(sigma).dtype == dtype and p.c_noise(sigma).dtype == dtype
        assert torch.equal(p.c_noise(sigma), p.index(sigma).to(dtype))
    assert torch.equal(p.sigma_at_index(torch.tensor([3.0, 999.0])), p.table[[3, 999]])


def test_iddpm_table_is_edm_eq_99_in_float64():
    """u_j of EDM eq. 99 written here in python floats; the network's levels, given, are kept as they are."""
    assert torch.allclose(IDDPMPreconditioning().table, iddpm_u_table(), rtol=1e-12, atol=0)
    levels = [9.123456789, 3.0, 1.0, 0.5]
    table = IDDPMPreconditioning(M=4, levels=levels).table
    assert table.dtype == torch.float64 and table.tolist() == levels[::-1]


def test_ncsn_preconditioning_timesteps_and_levels():
    """NCSN: defaults ``scaled_score`` at ln σ; the levels kept in float64; σ snapped to a level only for ``index``
    labels; sigma_of_timestep inverts c_noise for each timestep type; one level fixes the σ range."""
    from diffusers_stf.preconditioning.score import NCSNPreconditioning

    p = NCSNPreconditioning()
    assert (p.prediction_type, p.timestep_type) == ("scaled_score", "log_sigma")
    levels = [1.1, 0.33, 0.1]
    sigma = torch.tensor([1.0, 0.3, 0.12], dtype=torch.float64)
    index = NCSNPreconditioning(timestep_type="index", sigmas=levels)
    assert index.round_sigma(sigma).tolist() == levels and index.c_noise(sigma).tolist() == [0, 1, 2]
    assert index.sigma_of_timestep(torch.tensor([0, 1, 2])).tolist() == levels
    for kind in ("log_sigma", "sigma"):
        q = NCSNPreconditioning(timestep_type=kind, sigmas=levels)
        assert torch.equal(q.round_sigma(sigma), sigma)
        assert torch.allclose(q.sigma_of_timestep(q.c_noise(sigma)), sigma, rtol=1e-15)
    with pytest.raises(ValueError, match="none"):
        NCSNPreconditioning(timestep_type="none").sigma_of_timestep(torch.tensor([0.0]))
    one = NCSNPreconditioning(sigmas=[0.7])
    assert (one.sigma_min, one.sigma_max) == (0.7, 0.7)


@pytest.mark.parametrize("sde", ["ve", "vp"])
@pytest.mark.parametrize("timestep_type", ["sigma", "log_sigma", "t", "discrete"])
def test_score_sde_timesteps_invert_their_noise_levels(sde, timestep_type):
    """c_noise then sigma_of_timestep is the identity for every timestep type; the VP network's ``sigma`` is the
    noise std √(1 − ᾱ) = σ/√(1 + σ²) of its state, so σ = std/√(1 − std²)."""
    from diffusers_stf.preconditioning.score import ScoreSDEPreconditioning

    p = ScoreSDEPreconditioning(sde_type=sde, timestep_type=timestep_type, sigma_min=0.02, sigma_max=60.0,
                                beta_min=0.2, beta_max=15.0, num_train_timesteps=500)
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0], dtype=torch.float64)
    assert torch.allclose(p.sigma_of_timestep(p.c_noise(sigma)), sigma, rtol=1e-9)
    if timestep_type == "sigma":
        std = sigma if sde == "ve" else sigma / (1 + sigma**2).sqrt()
        assert torch.allclose(p.c_noise(sigma), std, rtol=1e-15)
    if sde == "ve":  # σ(t) = σ_min·(σ_max/σ_min)^t
        assert torch.allclose(p.time(sigma), torch.log(sigma / 0.02) / math.log(60.0 / 0.02), rtol=1e-12)


def test_score_sde_defaults_are_song_et_al():
    """VE σ ∈ [0.01, 50] and VP β ∈ [0.1, 20] with N = 1000 (Song et al. 2021), a score at the noise std."""
    from diffusers_stf.preconditioning.score import ScoreSDEPreconditioning

    ve = ScoreSDEPreconditioning()
    assert (ve.sde_type, ve.prediction_type, ve.timestep_type, ve.name) == ("ve", "score", "sigma", "score_sde_ve")
    assert (ve.sigma_min, ve.sigma_max, ve.num_train_timesteps) == (0.01, 50.0, 1000)
    vp = ScoreSDEPreconditioning(sde_type="vp")
    assert vp.name == "score_sde_vp" and (vp.vp.beta_min, vp.vp.beta_d, vp.vp.M) == (0.1, 19.9, 1000)
    for bad in (dict(sigma_min=0.5, sigma_max=0.5), dict(sigma_min=0.0)):
        with pytest.raises(ValueError, match="sigma_max > sigma_min > 0"):
            ScoreSDEPreconditioning(**bad)


class ChannelNet(torch.nn.Module):
    """F(x_in, c_noise) = x_in + c_noise per sample, remembering what it was given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros((), dtype=torch.float32))
        self.seen = {}

    def forward(self, x, t, **kwargs):
        self.seen.update(x=x, t=t, **kwargs)
        return x + t.reshape(-1, *([1] * (x.ndim - 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_denoiser_computes_eq_7_in_the_dtype_of_x(dtype):
    """D = c_skip·x + c_out·F(c_in·x, c_noise) in x's dtype (EDM keeps float64), the network fed its own dtype and a
    float32 c_noise of one entry per sample; a scalar σ serves a batch of any channel count; EDM's augmentation labels
    reach the network."""
    net = ChannelNet()
    D = Denoiser(net, EDMPreconditioning())
    x = torch.randn(2, 3, 2, 2, dtype=dtype, generator=torch.Generator().manual_seed(0))
    augment = torch.zeros(2, 9)
    out = D(x, 0.7, augment_labels=augment)
    sd, s = 0.5, torch.tensor(0.7, dtype=torch.float64)
    c_in, c_noise = 1 / torch.sqrt(s**2 + sd**2), torch.log(s) / 4
    F = ((c_in * x.double()).float() + c_noise.float()).double()  # the network runs in float32
    expected = sd**2 / (s**2 + sd**2) * x.double() + s * sd / torch.sqrt(s**2 + sd**2) * F
    assert out.dtype == dtype and torch.allclose(out.double(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-12)
    assert net.seen["t"].dtype == torch.float32 and net.seen["t"].shape == (2,)
    assert net.seen["x"].dtype == torch.float32 and net.seen["augment_labels"] is augment
    per_sample = D(x, torch.tensor([0.7, 0.7], dtype=dtype))
    assert torch.allclose(per_sample, out, rtol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# make_preconditioning: every family's defaults, and every config entry reaching its class


def scalings_equal(a, b, sigma=torch.tensor([0.01, 0.3, 2.0, 40.0], dtype=torch.float64)):
    return all(torch.allclose(x, y, rtol=1e-12, atol=0) for x, y in zip(a.scalings(sigma), b.scalings(sigma)))


def test_make_preconditioning_defaults_are_the_documented_ones():
    """EDM σ_data 0.5; VP the continuous limit of diffusers' default DDPM schedule (β_min = 0.1, β_d = 19.9, M = 1000,
    ε_t = 1e-5); VE [0.02, 100]; iDDPM M = 1000, C1 = 0.001, C2 = 0.008; DDPM diffusers' linear 1e-4..0.02 over
    1000 steps; NCSN a scaled score at ln σ; score SDEs a score at σ with Song et al.'s ranges."""
    from diffusers_stf.preconditioning.score import NCSNPreconditioning, ScoreSDEPreconditioning

    assert scalings_equal(make_preconditioning("edm"), EDMPreconditioning(0.5, "epsilon"))
    vp = make_preconditioning("vp")
    assert (vp.M, vp.epsilon_t, vp.prediction_type) == (1000, 1e-5, "epsilon")
    assert math.isclose(vp.beta_min, 0.1, rel_tol=1e-12) and math.isclose(vp.beta_d, 19.9, rel_tol=1e-12)
    ve = make_preconditioning("ve")
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100.0)
    iddpm = make_preconditioning("iddpm")
    assert (iddpm.M, iddpm.C1, iddpm.C2, iddpm.prediction_type) == (1000, 0.001, 0.008, "epsilon")
    ddpm = make_preconditioning("ddpm")
    assert ddpm.prediction_type == "epsilon" and torch.allclose(
        ddpm.alphas_cumprod, torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0), rtol=1e-12)
    assert make_preconditioning("ddpm", num_train_timesteps=None).alphas_cumprod.shape == (1000,)
    ncsn = make_preconditioning("ncsn")
    assert isinstance(ncsn, NCSNPreconditioning) and (ncsn.prediction_type, ncsn.timestep_type) == ("scaled_score", "log_sigma")
    for sde in ("ve", "vp"):
        p = make_preconditioning(f"score_sde_{sde}")
        q = ScoreSDEPreconditioning(sde_type=sde)
        assert (p.sde_type, p.prediction_type, p.timestep_type, p.sigma_min, p.sigma_max, p.num_train_timesteps) == \
            (sde, "score", "sigma", q.sigma_min, q.sigma_max, 1000)
    assert make_preconditioning("score_sde_ve").sigma_max == 50.0 and make_preconditioning("score_sde_ve").sigma_min == 0.01


def test_make_preconditioning_reads_every_config_entry():
    from diffusers_stf.preconditioning.score import ScoreSDEPreconditioning

    edm = make_preconditioning("edm", sigma_data=0.7, prediction_type="v_prediction")
    assert scalings_equal(edm, EDMPreconditioning(0.7, "v_prediction"))
    vp = make_preconditioning("vp", num_train_timesteps=500, beta_start=2e-4, beta_end=0.03, epsilon_t=1e-3,
                              prediction_type="sample")
    assert math.isclose(vp.beta_min, 0.1, rel_tol=1e-12) and math.isclose(vp.beta_d, 500 * (0.03 - 2e-4), rel_tol=1e-12)
    assert (vp.M, vp.epsilon_t, vp.prediction_type) == (500, 1e-3, "sample")
    ve = make_preconditioning("ve", ve_sigma_min=0.05, ve_sigma_max=30.0)
    assert (ve.sigma_min, ve.sigma_max) == (0.05, 30.0)
    with pytest.raises(ValueError, match="prediction_type"):
        make_preconditioning("ve", prediction_type="sample")
    iddpm = make_preconditioning("iddpm", num_train_timesteps=100, iddpm_c1=0.002, iddpm_c2=0.01,
                                 prediction_type="v_prediction")
    assert (iddpm.M, iddpm.C1, iddpm.C2, iddpm.prediction_type) == (100, 0.002, 0.01, "v_prediction")
    assert torch.allclose(iddpm.table, iddpm_u_table(100, 0.002, 0.01), rtol=1e-12)
    assert make_preconditioning("iddpm", num_train_timesteps=3, iddpm_levels=[4.0, 2.0, 1.0]).table.tolist() == [1.0, 2.0, 4.0]
    ddpm = make_preconditioning("ddpm", num_train_timesteps=200, beta_start=3e-4, beta_end=0.04,
                                beta_schedule="scaled_linear", prediction_type="v_prediction")
    assert ddpm.prediction_type == "v_prediction" and torch.allclose(
        ddpm.alphas_cumprod, torch.cumprod(1 - betas_for_schedule(200, 3e-4, 0.04, "scaled_linear"), 0), rtol=1e-12)
    trained = [0.01, 0.02, 0.05]
    assert torch.allclose(make_preconditioning("ddpm", num_train_timesteps=3, trained_betas=trained).alphas_cumprod,
                          torch.cumprod(1 - torch.tensor(trained, dtype=torch.float64), 0), rtol=1e-12)
    ncsn = make_preconditioning("ncsn", prediction_type="score", timestep_type="index", sigmas=[1.0, 0.5, 0.1])
    assert (ncsn.prediction_type, ncsn.timestep_type, ncsn.sigmas.tolist()) == ("score", "index", [1.0, 0.5, 0.1])
    ve_sde = make_preconditioning("score_sde_ve", prediction_type="epsilon", timestep_type="t", sigma_min=0.02,
                                  sigma_max=80.0, num_train_timesteps=300)
    assert (ve_sde.prediction_type, ve_sde.timestep_type, ve_sde.sigma_min, ve_sde.sigma_max,
            ve_sde.num_train_timesteps) == ("epsilon", "t", 0.02, 80.0, 300)
    vp_sde = make_preconditioning("score_sde_vp", beta_min=0.2, beta_max=15.0)
    expected = ScoreSDEPreconditioning(sde_type="vp", beta_min=0.2, beta_max=15.0)
    assert (vp_sde.vp.beta_min, vp_sde.vp.beta_d) == (expected.vp.beta_min, expected.vp.beta_d) == (0.2, 14.8)


@pytest.mark.parametrize("sde", ["ve", "vp"])
@pytest.mark.parametrize("prediction_type", ["score", "epsilon"])
def test_score_of_a_network_output_for_one_or_per_sample_levels(sde, prediction_type):
    """Tweedie on the SDE's state x_t = m·x: a ``score`` network's output is the score itself, an ``epsilon``
    network's is −std·s_t with std = m·σ; the same for σ as a number, a 0-d tensor or one per sample, in x_t's
    dtype."""
    from diffusers_stf.preconditioning.score import ScoreSDEPreconditioning

    p = ScoreSDEPreconditioning(sde_type=sde, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x_t, F = torch.randn(2, 1, 2, 2, generator=g), torch.randn(2, 1, 2, 2, generator=g)
    sigma = torch.tensor([0.4, 3.0], dtype=torch.float64)
    std = sigma if sde == "ve" else sigma / (1 + sigma**2).sqrt()
    expected = F.double() if prediction_type == "score" else -F.double() / std.reshape(-1, 1, 1, 1)
    per_sample = p.score(x_t, F, sigma)
    assert per_sample.dtype == torch.float32 and torch.allclose(per_sample.double(), expected, rtol=1e-5)
    for i in range(2):
        for level in (float(sigma[i]), sigma[i], sigma[i:i + 1]):
            assert torch.allclose(p.score(x_t[i:i + 1], F[i:i + 1], level).double(), expected[i:i + 1], rtol=1e-5)


def test_score_sde_vp_range_and_the_none_timestep():
    from diffusers_stf.preconditioning.score import ScoreSDEPreconditioning

    vp = ScoreSDEPreconditioning(sde_type="vp", beta_min=0.5, beta_max=0.5, num_train_timesteps=300)  # β constant
    assert vp.vp.M == 300 and vp.vp.beta_d == 0.0
    with pytest.raises(ValueError, match="beta_max >= beta_min > 0"):
        ScoreSDEPreconditioning(sde_type="vp", beta_min=0.0)
    none = ScoreSDEPreconditioning(timestep_type="none")
    assert torch.equal(none.c_noise(torch.tensor([0.5, 2.0])), torch.zeros(2))
