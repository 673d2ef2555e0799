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
    gammas = [min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t[i] <= s_tmax else 0.0 for i in range(n)]
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
    """The unchanged diffusers loop (issue: "use them exactly like diffusers schedulers")."""
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


@pytest.mark.parametrize("s_churn,s_tmin,s_tmax,s_noise", [(40.0, 0.0, math.inf, 1.0), (10.0, 0.05, 50.0, 1.003)])
def test_stochastic_equals_algorithm_2_under_same_noise(s_churn, s_tmin, s_tmax, s_noise):
    n, shape = 12, (2, 1, 4, 4)
    sched = EDMStochasticScheduler(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    x_hat0, x = run_standard_loop(sched, n, shape, seed=3)
    # Replay the generator: the latents, then one z per churned step i >= 1, drawn as float32 as the scheduler does.
    t = karras_sigmas(n)
    g = torch.Generator().manual_seed(3)
    torch.randn(shape, generator=g, dtype=torch.float64)
    gammas = [min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= t[i] <= s_tmax else 0.0 for i in range(n)]
    noises = [torch.randn(shape, generator=g).double() for i in range(1, n) if gammas[i] > 0]
    ref = algorithm_2(gaussian_denoiser, x_hat0, t, s_churn, s_tmin, s_tmax, s_noise, noises)
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
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="NaN at sampler step 0"):
        s.step(torch.zeros(1, 1, 4, 4), t, torch.full((1, 1, 4, 4), float("nan")))


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
