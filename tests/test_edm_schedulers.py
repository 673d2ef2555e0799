"""EDM Algorithms 1 and 2 as diffusers schedulers, checked against independent math written here."""

import math

import numpy as np
import pytest
import torch
from scheduler_contract import SchedulerContractTests

from diffusers_stf import EDMHeunScheduler, EDMStochasticScheduler

MU, S = 0.3, 0.5  # analytic data N(MU, S²)


# --------------------------------------------------------------------------------------------------------------
# Independent transcriptions (Karras et al. 2022), written from the paper, sharing no code with the package.

def karras_sigmas(n, smin=0.002, smax=80.0, rho=7.0):
    i = np.arange(n, dtype=np.float64)
    return np.append((smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho, 0.0)


def gaussian_denoiser(x, sigma):
    """Exact D(x; σ) = E[y | y + σn = x] for y ~ N(MU, S²)."""
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def algorithm_2(denoiser, x_hat0, t, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, noises=()):
    """EDM Algorithm 2 (Algorithm 1 when s_churn = 0), starting from the already-churned x̂_0.

    ``noises[i]`` is the z of step i ≥ 1 (step 0's churn is part of the initial draw x̂_0).
    """
    n = len(t) - 1
    gammas = churn_gammas(t, s_churn, s_tmin, s_tmax)
    x_next, it = None, iter(noises)
    for i in range(n):
        t_hat = t[i] * (1 + gammas[i])
        if i == 0:
            x_hat = x_hat0
        else:
            x_hat = x_next + math.sqrt(t_hat**2 - t[i] ** 2) * s_noise * next(it) if gammas[i] > 0 else x_next
        d = (x_hat - denoiser(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d_prime = (x_next - denoiser(x_next, t[i + 1])) / t[i + 1]
            x_next = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d_prime)
    return x_next


def churn_gammas(t, s_churn, s_tmin, s_tmax):
    """γ_i = min(S_churn/N, √2 − 1) where S_tmin ≤ t_i ≤ S_tmax, else 0 (Algorithm 2 line 4)."""
    n = len(t) - 1
    return [min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t[i] <= s_tmax else 0.0 for i in range(n)]


def churned_initial_draw(z, t, s_churn, s_tmin, s_tmax, s_noise):
    """x̂_0 of Algorithm 2 lines 2 and 5–6 from one standard normal z: x_0 = t_0·z₁ and x̂_0 = x_0 + √(t̂_0² − t_0²)·
    S_noise·z₂ is Gaussian with variance t_0² + S_noise²·(t̂_0² − t_0²), so one draw z of that standard deviation."""
    t_hat = t[0] * (1 + churn_gammas(t, s_churn, s_tmin, s_tmax)[0])
    return z * math.sqrt(t[0] ** 2 + s_noise**2 * (t_hat**2 - t[0] ** 2))


def euler(denoiser, x0, t):
    x = x0
    for i in range(len(t) - 1):
        x = x + (t[i + 1] - t[i]) * (x - denoiser(x, t[i])) / t[i]
    return x


def exact_ode_solution(x0, sigma0):
    """The probability-flow ODE dx/dσ = (x − D)/σ keeps (x − MU)/√(S² + σ²) constant; its value at σ = 0."""
    return MU + (x0 - MU) * S / math.sqrt(S**2 + sigma0**2)


def edm_network(x_in, t, sigma_data=0.5):
    """The raw EDM network F for the Gaussian denoiser, recovering σ = exp(4·c_noise) and x = x_in/c_in."""
    sigma = torch.exp(4 * t.double())
    x = x_in.double() * torch.sqrt(sigma**2 + sigma_data**2)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / torch.sqrt(sigma**2 + sigma_data**2)
    return (gaussian_denoiser(x, sigma) - c_skip * x) / c_out


def run_standard_loop(scheduler, n, shape, seed, latents=None):
    """The unchanged diffusers loop."""
    scheduler.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) if latents is None else latents) * scheduler.init_noise_sigma
    x0 = x.clone()
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = edm_network(x_in, t)
        x = scheduler.step(out, t, x, generator=g).prev_sample
    return x0, x


# --------------------------------------------------------------------------------------------------------------
# (a) trajectories equal the transcription

@pytest.mark.parametrize("n", [1, 2, 5, 18])
def test_heun_equals_algorithm_1(n):
    x0, x = run_standard_loop(EDMHeunScheduler(), n, (3, 1, 4, 4), seed=1)
    t = karras_sigmas(n) if n > 1 else np.array([80.0, 0.0])
    ref = algorithm_2(gaussian_denoiser, x0, t)
    assert torch.allclose(x, ref, atol=1e-5, rtol=0)


def test_heun_model_evaluations():
    s = EDMHeunScheduler()
    s.set_timesteps(18)
    assert len(s.timesteps) == 35  # 2N − 1 NFE
    assert s.order == 2


@pytest.mark.parametrize("scheduler_class", [EDMStochasticScheduler, EDMHeunScheduler])
@pytest.mark.parametrize("s_churn,s_tmin,s_tmax,s_noise", [(40.0, 0.0, math.inf, 1.0), (10.0, 0.05, 50.0, 1.003),
                                                           (40.0, 0.0, math.inf, 1.5), (20.0, 1.0, 10.0, 1.0)])
def test_stochastic_equals_algorithm_2_under_same_noise(scheduler_class, s_churn, s_tmin, s_tmax, s_noise):
    """Both names take EDM's churn arguments, as NVlabs' edm_sampler and k-diffusion's sample_heun do. The reference
    makes its own initial draw (step 0's churn with its S_noise, from the same standard normal), so a scheduler whose
    initial noise level forgets S_noise fails here (S_noise = 1.5 with step 0 churned); with a window [1, 10] the
    unchurned steps above it come first, so a scheduler that draws noise for them too falls out of step."""
    n, shape = 12, (2, 1, 4, 4)
    sched = scheduler_class(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    x_hat0, x = run_standard_loop(sched, n, shape, seed=3)
    # Replay the generator: the latents, then one z per churned step i >= 1, drawn as float32 as the scheduler does.
    t = karras_sigmas(n)
    g = torch.Generator().manual_seed(3)
    ref_hat0 = churned_initial_draw(torch.randn(shape, generator=g, dtype=torch.float64), t, s_churn, s_tmin, s_tmax,
                                    s_noise)
    assert torch.allclose(x_hat0, ref_hat0, rtol=1e-12, atol=0)
    gammas = churn_gammas(t, s_churn, s_tmin, s_tmax)
    noises = [torch.randn(shape, generator=g).double() for i in range(1, n) if gammas[i] > 0]
    ref = algorithm_2(gaussian_denoiser, ref_hat0, t, s_churn, s_tmin, s_tmax, s_noise, noises)
    assert torch.allclose(x, ref, atol=1e-5, rtol=0)


def test_stochastic_with_zero_churn_is_algorithm_1_exactly():
    latents = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, a = run_standard_loop(EDMHeunScheduler(), 18, latents.shape, 0, latents)
    _, b = run_standard_loop(EDMStochasticScheduler(s_churn=0.0), 18, latents.shape, 0, latents)
    assert torch.equal(a, b)


def test_stochastic_evaluates_model_at_churned_sigma():
    s = EDMStochasticScheduler(s_churn=40.0)
    s.set_timesteps(10)
    gamma = min(40.0 / 10, math.sqrt(2) - 1)
    sigma_hat0 = 80.0 * (1 + gamma)
    # the first model evaluation happens at σ̂_0, so its timestep is c_noise(σ̂_0) = ln(σ̂_0)/4
    assert abs(float(s.timesteps[0]) - math.log(sigma_hat0) / 4) < 1e-6
    # and the initial noise has std √(σ_0² + σ̂_0² − σ_0²) = σ̂_0
    assert abs(s.init_noise_sigma - sigma_hat0) < 1e-9


def test_stochastic_is_reproducible_with_generator():
    a = run_standard_loop(EDMStochasticScheduler(s_churn=30.0), 8, (2, 1, 4, 4), seed=5)[1]
    b = run_standard_loop(EDMStochasticScheduler(s_churn=30.0), 8, (2, 1, 4, 4), seed=5)[1]
    c = run_standard_loop(EDMStochasticScheduler(s_churn=30.0), 8, (2, 1, 4, 4), seed=6)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_core_heun_step_with_per_sample_sigma_hat_equals_the_transcription_per_sample():
    """The sampler core with one σ̂ per sample (DG boosting) equals EDM Algorithm 2's step run on each sample alone."""
    from diffusers_stf.schedulers.edm_sampling import churn, churn_gamma, churn_sigma, heun_step, per_sample

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) * 5.0
    z = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    n, t_cur, t_next = 10, 5.0, 3.0
    s_churn = torch.tensor([0.0, 4.0, 40.0], dtype=torch.float64)
    s_noise = torch.tensor([1.0, 1.0, 1.003], dtype=torch.float64)
    gamma = churn_gamma(t_cur, n, s_churn)
    assert torch.allclose(gamma, torch.tensor([0.0, 0.4, math.sqrt(2) - 1], dtype=torch.float64))
    sigma_hat = churn_sigma(t_cur, gamma)
    denoise = lambda x_, sigma: gaussian_denoiser(x_, per_sample(sigma, x_))  # noqa: E731  (σ is [batch] or a float)
    x_next = heun_step(denoise, churn(x, t_cur, sigma_hat, s_noise, z), sigma_hat, t_next)
    for b in range(3):  # Algorithm 2 lines 4–11 for sample b alone, written out
        g_b = min(float(s_churn[b]) / n, math.sqrt(2) - 1)
        t_hat = t_cur + g_b * t_cur
        x_hat = x[b] + math.sqrt(t_hat**2 - t_cur**2) * float(s_noise[b]) * z[b]
        d = (x_hat - gaussian_denoiser(x_hat, t_hat)) / t_hat
        x_p = x_hat + (t_next - t_hat) * d
        d_p = (x_p - gaussian_denoiser(x_p, t_next)) / t_next
        assert torch.allclose(x_next[b], x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_p), atol=1e-12, rtol=0)


def test_single_step_to_zero_returns_the_denoiser():
    """One Euler step to σ = 0 returns D(x; σ_0) (EDM eq. 7 written here), the denoised estimate too."""
    s = EDMHeunScheduler(sigma_max=2.0)
    s.set_timesteps(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64) * 2.0
    F = torch.randn_like(x)
    t = s.timesteps[0]
    out = s.step(F, t, s.scale_model_input(x, t) * 0 + x)
    sigma, sd = 2.0, 0.5
    D = sd**2 / (sigma**2 + sd**2) * x + sigma * sd / math.sqrt(sigma**2 + sd**2) * F
    assert torch.allclose(out.prev_sample, D, atol=1e-12)
    assert torch.allclose(out.pred_original_sample, D, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# (b) convergence to the exact ODE solution

def heun_error(nfe):
    n = (nfe + 1) // 2
    x0 = torch.linspace(-3, 3, 64, dtype=torch.float64).reshape(4, 1, 4, 4) * 80.0
    s = EDMHeunScheduler()
    s.set_timesteps(n)
    x = x0.clone()
    for t in s.timesteps:
        x = s.step(edm_network(s.scale_model_input(x, t), t), t, x).prev_sample
    return float((x - exact_ode_solution(x0, 80.0)).abs().max())


def euler_error(nfe):
    x0 = torch.linspace(-3, 3, 64, dtype=torch.float64).reshape(4, 1, 4, 4) * 80.0
    return float((euler(gaussian_denoiser, x0, karras_sigmas(nfe)) - exact_ode_solution(x0, 80.0)).abs().max())


def test_heun_converges_at_second_order_and_beats_euler():
    nfes = [9, 17, 35, 79]
    heun = [heun_error(n) for n in nfes]
    steps = [(n + 1) // 2 for n in nfes]
    orders = [math.log(heun[k] / heun[k + 1]) / math.log(steps[k + 1] / steps[k]) for k in range(3)]
    assert all(o > 1.7 for o in orders), (heun, orders)
    # Heun wins at EDM's recommended budgets. At 9 and 17 NFE (5 and 9 Heun steps on the ρ=7 grid) Euler's 9 and 17
    # steps are more accurate on this linear ODE (2.3 vs 0.45 and 0.42 vs 0.24): too few Heun steps cross σ ≈ S.
    for n, h in zip(nfes, heun):
        if n >= 35:
            assert h < euler_error(n), (n, h, euler_error(n))


# --------------------------------------------------------------------------------------------------------------
# (c) with churn, the distribution matches the transcription

def test_churned_samples_match_transcription_in_distribution():
    n, shape, s_churn = 18, (4000, 1, 4, 4), 40.0
    _, ours = run_standard_loop(EDMStochasticScheduler(s_churn=s_churn), n, shape, seed=11)
    # the transcription starts literally: x_0 ~ N(0, σ_0²), then churns step 0 like every other step
    g = torch.Generator().manual_seed(12)
    t = karras_sigmas(n)
    gamma = min(s_churn / n, math.sqrt(2) - 1)
    x_0 = torch.randn(shape, generator=g, dtype=torch.float64) * t[0]
    x_hat0 = x_0 + math.sqrt((t[0] * (1 + gamma)) ** 2 - t[0] ** 2) * torch.randn(shape, generator=g, dtype=torch.float64)
    noises = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(1, n)]
    ref = algorithm_2(gaussian_denoiser, x_hat0, t, s_churn, noises=noises)
    m = ours.numel()
    se_mean = S / math.sqrt(m)
    se_var = S**2 * math.sqrt(2 / m)
    assert abs(float(ours.mean() - ref.mean())) < 5 * math.sqrt(2) * se_mean
    assert abs(float(ours.var() - ref.var())) < 5 * math.sqrt(2) * se_var


# --------------------------------------------------------------------------------------------------------------
# schedule details

def test_karras_schedule_and_explicit_sigmas():
    s = EDMHeunScheduler()
    s.set_timesteps(18)
    assert np.allclose(s.sigmas.numpy(), karras_sigmas(18), rtol=1e-12)
    s.set_timesteps(sigmas=[10.0, 1.0, 0.1])
    assert s.sigmas.tolist() == [10.0, 1.0, 0.1, 0.0]
    assert len(s.timesteps) == 5


def test_add_noise_uses_the_sigma_of_each_timestep():
    s = EDMHeunScheduler()
    s.set_timesteps(5)
    x, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    t = s.timesteps[[0, 2]]
    noisy = s.add_noise(x, noise, t)
    assert torch.allclose(noisy[:, 0, 0, 0], torch.exp(4 * t.double()).float(), rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize(
    "cls,kwargs,word",
    [
        (EDMHeunScheduler, dict(sigma_min=80.0, sigma_max=1.0), "sigma_min"),
        (EDMHeunScheduler, dict(sigma_data=0.0), "sigma_data"),
        (EDMHeunScheduler, dict(sigma_data=-1.0), "sigma_data"),
        (EDMHeunScheduler, dict(rho=0.0), "rho"),
        (EDMHeunScheduler, dict(preconditioning="foo"), "preconditioning"),
        (EDMStochasticScheduler, dict(s_churn=-1.0), "s_churn"),
        (EDMStochasticScheduler, dict(s_noise=-0.1), "s_noise"),
    ],
)
def test_bad_config_raises(cls, kwargs, word):
    with pytest.raises(ValueError, match=word):
        cls(**kwargs)


def test_bad_step_input_raises():
    s = EDMHeunScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="sigmas"):
        s.set_timesteps(sigmas=[1.0, 2.0])
    s.set_timesteps(4)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="shape"):
        s.step(torch.zeros(1, 1, 4, 4), t, torch.zeros(1, 1, 8, 8))
    churned = EDMStochasticScheduler(s_churn=40.0)
    churned.set_timesteps(4)
    three = [torch.Generator().manual_seed(i) for i in range(3)]
    with pytest.raises(ValueError, match="generator is a list of 3 generators but sample has 2 images"):
        churned.step(torch.zeros(2, 1, 4, 4), churned.timesteps[0], torch.zeros(2, 1, 4, 4), generator=three)


@pytest.mark.parametrize("value", [1.5, "3", True, 3.0, None, np.float64(3), torch.tensor(3.0), torch.tensor([3, 4])])
def test_set_timesteps_refuses_non_integer_step_counts(value):
    with pytest.raises(ValueError, match="num_inference_steps"):
        EDMHeunScheduler().set_timesteps(value)


@pytest.mark.parametrize("value", [np.int64(5), np.int32(5), torch.tensor(5), torch.tensor([5], dtype=torch.int32)])
def test_set_timesteps_accepts_numpy_and_tensor_integers(value):
    s = EDMHeunScheduler()
    s.set_timesteps(value)
    assert s.num_inference_steps == 5 and isinstance(s.num_inference_steps, int)
    assert np.allclose(s.sigmas.numpy(), karras_sigmas(5), rtol=1e-12)


@pytest.mark.parametrize(
    "cls,kwargs,word",
    [
        (EDMHeunScheduler, dict(sigma_max=math.inf), "sigma_max"),
        (EDMHeunScheduler, dict(sigma_max=math.nan), "sigma_max"),
        (EDMHeunScheduler, dict(sigma_min=math.nan), "sigma_min"),
        (EDMHeunScheduler, dict(rho=math.inf), "rho"),
        (EDMHeunScheduler, dict(sigma_data=math.inf), "sigma_data"),
        (EDMHeunScheduler, dict(rho=math.nan), "rho"),
        (EDMStochasticScheduler, dict(s_tmin=math.nan), "s_tmin"),
        (EDMStochasticScheduler, dict(s_tmax=math.nan), "s_tmax"),
        (EDMStochasticScheduler, dict(s_tmin=2.0, s_tmax=1.0), "s_tmax"),
        (EDMStochasticScheduler, dict(s_churn=math.nan), "s_churn"),
        (EDMStochasticScheduler, dict(s_noise=math.inf), "s_noise"),
    ],
)
def test_non_finite_config_raises(cls, kwargs, word):
    with pytest.raises(ValueError, match=word):
        cls(**kwargs)


def test_explicit_sigmas_must_be_finite():
    with pytest.raises(ValueError, match="sigmas"):
        EDMHeunScheduler().set_timesteps(sigmas=[math.inf, 1.0, 0.1])
    with pytest.raises(ValueError, match="sigmas"):
        EDMHeunScheduler().set_timesteps(sigmas=[10.0, math.nan, 0.1])


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_integer_and_bool_samples_raise(dtype):
    s = EDMStochasticScheduler(s_churn=10.0)
    s.set_timesteps(4)
    t = s.timesteps[0]
    bad = torch.ones(1, 1, 4, 4, dtype=dtype)
    good = torch.ones(1, 1, 4, 4)
    with pytest.raises(ValueError, match="sample"):
        s.scale_model_input(bad, t)
    with pytest.raises(ValueError, match="sample"):
        s.step(good, t, bad)
    with pytest.raises(ValueError, match="model_output"):
        s.step(bad, t, good)
    with pytest.raises(ValueError, match="original_samples"):
        s.add_noise(bad, good, t[None])
    with pytest.raises(ValueError, match="noise"):
        s.add_noise(good, bad, t[None])


def test_ddpm_timestep_minus_one_is_refused_not_wrapped():
    """With ``ddpm`` preconditioning the timesteps are DDPM indices 0..T−1; −1 must not wrap around to T−1."""
    s = EDMHeunScheduler(preconditioning="ddpm", sigma_max=1000.0)  # clamped to the table's σ_999
    s.set_timesteps(10)
    assert float(s.timesteps.min()) >= 0 and float(s.timesteps.max()) == 999
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    minus_one = torch.tensor(-1.0)
    with pytest.raises(ValueError, match="timestep"):
        s.add_noise(x, x, minus_one[None])
    with pytest.raises(ValueError, match="timestep"):
        s.scale_model_input(x, minus_one)
    with pytest.raises(ValueError, match="timestep"):
        s.step(x, minus_one, x)
    p = s.preconditioning
    with pytest.raises(ValueError, match="timesteps"):
        p.sigma_at_index(torch.tensor([3, -1]))
    with pytest.raises(ValueError, match="timesteps"):
        p.sigma_at_index(torch.tensor([1000]))
    with pytest.raises(ValueError, match="timesteps"):
        p.sigma_at_index(torch.tensor([2.5]))
    abar = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64), 0)
    expected = ((1 - abar[[0, 999]]) / abar[[0, 999]]).sqrt()
    assert torch.allclose(p.sigma_at_index(torch.tensor([0, 999])), expected, rtol=1e-12)


def test_nan_passes_through_step_without_a_check():
    """NaN is the pipeline's to check once after sampling: ``step`` must not read device values to look for it."""
    s = EDMHeunScheduler()
    s.set_timesteps(4)
    t = s.timesteps[0]
    x = torch.full((1, 1, 4, 4), float("nan"))
    out = s.step(torch.zeros(1, 1, 4, 4), t, s.scale_model_input(x, t) * 0 + x).prev_sample
    assert torch.isnan(out).all()


@pytest.mark.parametrize("cls,kwargs", [(EDMHeunScheduler, {}), (EDMStochasticScheduler, dict(s_churn=40.0, s_noise=1.003))])
def test_sampling_loop_never_reads_device_values(cls, kwargs):
    """No host–device sync in the loop: on the ``meta`` device any read of a tensor's value (``bool``, ``float``,
    ``.item()``, ``.any()`` in an ``if``, ``nonzero``) raises, so the whole loop running there proves none happens
    after the first timestep is resolved (which, as in diffusers, compares against the CPU-side ``timesteps``)."""
    s = cls(**kwargs)
    s.set_timesteps(6)
    x = torch.empty(2, 1, 4, 4, device="meta", dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for t in s.timesteps:
        F = s.scale_model_input(x, t) * 0.5
        x = s.step(F, t, x, generator=g).prev_sample
    assert x.device.type == "meta" and s.step_index == len(s.timesteps)


def test_warns_when_scale_model_input_is_skipped(caplog, tiny_unet):
    """diffusers' DDPMPipeline never calls ``scale_model_input`` (nor scales the latents by ``init_noise_sigma``):
    it must be told, once per loop, as diffusers' EDMEulerScheduler does; EDMPipeline must not be."""
    from diffusers import DDPMPipeline

    from diffusers_stf import EDMPipeline

    pipe = DDPMPipeline(unet=tiny_unet, scheduler=EDMHeunScheduler())
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level("WARNING"):
        pipe(batch_size=1, num_inference_steps=3, output_type="np")
    warnings = [r for r in caplog.records if "scale_model_input" in r.getMessage()]
    assert len(warnings) == 1 and "init_noise_sigma" in warnings[0].getMessage()
    caplog.clear()
    edm = EDMPipeline(unet=tiny_unet, scheduler=EDMHeunScheduler())
    edm.set_progress_bar_config(disable=True)
    with caplog.at_level("WARNING"):
        edm(batch_size=1, num_inference_steps=3, output_type="np")
    assert not [r for r in caplog.records if "scale_model_input" in r.getMessage()]


# --------------------------------------------------------------------------------------------------------------
# the diffusers scheduler contract

class TestHeunContract(SchedulerContractTests):
    scheduler_class = EDMHeunScheduler
    compatible_classes = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")

    def get_scheduler_config(self, **overrides):
        return {"sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, **overrides}


class TestStochasticContract(SchedulerContractTests):
    scheduler_class = EDMStochasticScheduler
    compatible_classes = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")

    def get_scheduler_config(self, **overrides):
        return {"s_churn": 20.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003, **overrides}


def test_churned_sigma_is_rounded_to_the_ddpm_table():
    """EDM's round_sigma: with a discrete-time network (``ddpm``) every σ the model is evaluated at, σ̂_i after churn
    included, is a level of the network's table σ_t = √((1 − ᾱ_t)/ᾱ_t) (written here), and the timestep it gets is
    that level's index t."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    table = ((1 - alpha_bar) / alpha_bar).sqrt()
    sched = EDMStochasticScheduler(preconditioning="ddpm", s_churn=40.0, s_tmin=0.05, s_tmax=50.0)
    sched.set_timesteps(10)
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    churned = 0
    for t in sched.timesteps:
        sched.scale_model_input(x, t)
        sigma, index = sched.current_sigma, int(t)
        assert float(t) == index
        assert math.isclose(sigma, float(table[index]), rel_tol=1e-12), (sigma, float(table[index]))
        churned += sched.state_in_first_order and 0.05 <= sigma <= 50 * math.sqrt(2)
        x = sched.step(torch.zeros_like(x), t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert churned >= 3


def test_churn_is_computed_in_the_precision_of_the_state():
    """x̂ = x + √(t̂² − t²)·S_noise·z in float64 (EDM keeps its state in float64), for one level and per sample, with
    z drawn in float32 as the scheduler draws it."""
    from diffusers_stf.schedulers.edm_sampling import churn

    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    expected = x + math.sqrt(6.1**2 - 5.3**2) * 1.003 * z.double()
    assert torch.allclose(churn(x, 5.3, 6.1, 1.003, z), expected, rtol=1e-15, atol=0)
    per_sample = churn(x, 5.3, torch.tensor([6.1, 5.3, 6.1], dtype=torch.float64), 1.003, z)
    expected[1] = x[1]
    assert per_sample.dtype == torch.float64 and torch.allclose(per_sample, expected, rtol=1e-15, atol=0)


def test_add_noise_and_timestep_lookup_keep_float64_levels():
    """add_noise uses the schedule's float64 σ (not a float32 rounding of it), and a timestep given in float64 (a
    c_noise computed in double precision) finds its evaluation like the float32 entry of ``timesteps``."""
    s = EDMHeunScheduler()
    s.set_timesteps(5)
    sigma = s.sigmas[2].item()
    t64 = torch.tensor(math.log(sigma) / 4, dtype=torch.float64)
    assert s.sigma_for_timestep(t64) == sigma == s.sigma_for_timestep(s.timesteps[4])
    x, n = torch.zeros(1, 1, 1, 1, dtype=torch.float64), torch.ones(1, 1, 1, 1, dtype=torch.float64)
    assert s.add_noise(x, n, t64[None]).item() == sigma


def test_after_the_last_step_the_scheduler_is_at_a_first_order_evaluation():
    """The step to σ = 0 is a plain Euler step: it leaves no Heun state behind."""
    s = EDMHeunScheduler()
    s.set_timesteps(3)
    x = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    for t in s.timesteps:
        x = s.step(torch.zeros_like(x), t, s.scale_model_input(x, t) * 0 + x).prev_sample
    assert s.state_in_first_order
