"""Score-based foundations: NCSN / NCSNv2 / CAS / score-SDE PC samplers, DSM, noise schedules, score preconditionings.

Every check is against math written here from the papers: analytic scores of Gaussians and Gaussian mixtures, the
variance recursions behind NCSNv2 Proposition 3 and CAS Proposition 2, brute-force searches, a transcription of
score_sde's PC sampler (sde_lib + sampling.py), and diffusers' own ``ScoreSdeVeScheduler`` as an oracle for the VE
predictor-corrector updates.
"""

import math

import numpy as np
import pytest
import torch
from scheduler_contract import SchedulerContractTests
from scipy.stats import norm

from diffusers_stf.losses.score_matching import DenoisingScoreMatchingLoss
from diffusers_stf.noise_schedules import (
    alphas_cumprod_from_betas,
    betas_for_schedule,
    cosine_alpha_bar,
    geometric_sigmas,
    max_pairwise_distance,
    ncsnv2_gamma,
    ncsnv2_sigmas,
    ncsnv2_step_size,
    ncsnv2_variance_ratio,
    ve_sigma,
    ve_time,
    vp_sigma,
    vp_time,
)
from diffusers_stf.preconditioning import Denoiser, NCSNPreconditioning, ScoreSDEPreconditioning, make_preconditioning
from diffusers_stf.schedulers import AnnealedLangevinScheduler, PredictorCorrectorScheduler

# --------------------------------------------------------------------------------------------------------------
# Analytic data: a Gaussian mixture Σ_k w_k N(μ_k, s_k² I) in D = 2 (the Gaussian is the one-component case).
# Its perturbed density at x_t = a·x_0 + σ·z is Σ_k w_k N(a μ_k, (a² s_k² + σ²) I), whose score is written out here.

GAUSS = dict(weights=[1.0], means=[[1.0, -2.0]], stds=[0.5])
MIXTURE = dict(weights=[0.2, 0.8], means=[[-3.0, 0.0], [3.0, 0.0]], stds=[0.5, 0.5])


def mixture_score(x, sigma, weights, means, stds, a=1.0):
    x = x.double()
    if len(weights) == 1:
        return -(x - a * torch.tensor(means[0], dtype=torch.float64)) / (a**2 * stds[0] ** 2 + sigma**2)
    logps, grads = [], []
    for w, mu, s in zip(weights, means, stds):
        mu = torch.tensor(mu, dtype=torch.float64)
        var = a**2 * s**2 + sigma**2
        d = x - a * mu
        logps.append(math.log(w) - 0.5 * (d**2).sum(1) / var - x.shape[1] / 2 * math.log(var))
        grads.append(-d / var)
    resp = torch.softmax(torch.stack(logps, 1), dim=1)
    return (resp[:, :, None] * torch.stack(grads, 1)).sum(1)


pytestmark = pytest.mark.usefixtures("one_thread")


def within(estimate, target, sd, k=4.0):
    return abs(float(estimate) - float(target)) <= k * float(sd)


def check_gaussian(x, data=GAUSS, k=4.0):
    """Mean and variance of each coordinate within k standard errors of the target N(μ, s²)."""
    n = x.shape[0]
    mu, s = torch.tensor(data["means"][0]), data["stds"][0]
    errors = ((x.mean(0) - mu).abs().max().item(), (x.var(0) - s**2).abs().max().item())
    for d in range(x.shape[1]):
        assert within(x[:, d].mean(), mu[d], s / math.sqrt(n), k), (d, x[:, d].mean())
        assert within(x[:, d].var(), s**2, s**2 * math.sqrt(2 / (n - 1)), k), (d, x[:, d].var())
    return errors


def run_diffusers_loop(scheduler, model, x, seed=1, track=None):
    """The standard diffusers loop; ``model(x, t)`` sees only the sample and the timestep."""
    g = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, generator=g).prev_sample
        if track is not None:
            track.append(x)
    return x


# --------------------------------------------------------------------------------------------------------------
# Annealed Langevin (NCSN) and consistent annealed sampling

N_SAMPLES = 4000


def als_model(data):
    # timestep_type="log_sigma": the network receives log σ
    return lambda x, t: mixture_score(x, math.exp(float(t)), **data)


def test_als_reaches_gaussian_target():
    # κ = ε/σ_L² = 1 and T = 100: enough Langevin steps per level for the chain to equilibrate down to σ ≈ s/3.
    s = AnnealedLangevinScheduler(
        sigma_max=50.0, sigma_min=0.05, num_train_timesteps=10, steps_per_level=100, step_size=0.05**2,
        denoise_final=True, timestep_type="log_sigma",
    )
    s.set_timesteps()
    assert len(s.timesteps) == 10 * 100 + 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 2, generator=g, dtype=torch.float64) * s.init_noise_sigma
    check_gaussian(run_diffusers_loop(s, als_model(GAUSS), x))


def test_cas_reaches_gaussian_target():
    # CAS on (L-1)·T+1 = 901 geometric levels; η = 0.02·σ_L² keeps its O(η/σ_L²) variance deficit under sampling error.
    s = AnnealedLangevinScheduler(
        sigma_max=50.0, sigma_min=0.01, num_train_timesteps=10, steps_per_level=100, step_size=0.02 * 0.01**2,
        sampler="cas", denoise_final=True, timestep_type="log_sigma",
    )
    s.set_timesteps()
    assert len(s.timesteps) == 9 * 100 + 1 + 1
    expected = np.geomspace(50.0, 0.01, 901)
    np.testing.assert_allclose(np.exp(s.timesteps[:-1].double().numpy()), expected, rtol=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 2, generator=g, dtype=torch.float64) * s.init_noise_sigma
    check_gaussian(run_diffusers_loop(s, als_model(GAUSS), x))


def mixture_run(scheduler, sigmas=None, n=2000):
    scheduler.set_timesteps(sigmas=sigmas)
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0)).double() * 20.0
    return run_diffusers_loop(scheduler, als_model(MIXTURE), x)


def test_annealing_recovers_mixture_weights_als():
    """NCSN §3.2: Langevin at a single small σ cannot find the relative weights of separated modes (each chain stays
    in the mode it falls into first); annealing recovers them approximately. ALS's chains stop crossing between the
    modes at the level where they separate, which leaves a small bias toward ½ (0.78 here), hence the tolerance."""
    kw = dict(sigma_max=20.0, sigma_min=0.05, steps_per_level=50, step_size=0.1 * 0.05**2, timestep_type="log_sigma")
    annealed = mixture_run(AnnealedLangevinScheduler(num_train_timesteps=15, denoise_final=True, **kw))
    plain = AnnealedLangevinScheduler(num_train_timesteps=1, **{**kw, "steps_per_level": 15 * 50})
    plain = mixture_run(plain, sigmas=[0.05])  # as many steps, all at σ_L
    frac_annealed, frac_plain = ((x[:, 0] > 0).double().mean().item() for x in (annealed, plain))
    assert abs(frac_annealed - 0.8) < 0.03, frac_annealed
    assert abs(frac_plain - 0.8) > 0.15, frac_plain
    right = annealed[annealed[:, 0] > 0]
    assert within(right[:, 0].mean(), 3.0, 0.5 / math.sqrt(len(right))), right[:, 0].mean()


def test_cas_recovers_mixture_weights():
    """CAS follows the marginals p_σ (no chain has to cross between modes): the weights come out exactly."""
    s = AnnealedLangevinScheduler(
        sigma_max=20.0, sigma_min=0.05, num_train_timesteps=10, steps_per_level=50, step_size=0.05 * 0.05**2,
        sampler="cas", denoise_final=True, timestep_type="log_sigma",
    )
    x = mixture_run(s)
    assert within((x[:, 0] > 0).double().mean(), 0.8, math.sqrt(0.16 / len(x))), (x[:, 0] > 0).double().mean()
    right = x[x[:, 0] > 0]
    assert within(right[:, 0].mean(), 3.0, 0.5 / math.sqrt(len(right))), right[:, 0].mean()


def point_mass_run(sampler, step_size, L=10, T=10, n=4000, seed=0):
    """Data = the single point μ (score −(x − μ)/σ²), started exactly at N(μ, σ_1²I); the states after every step."""
    mu = torch.tensor([0.5, -1.0], dtype=torch.float64)
    s = AnnealedLangevinScheduler(
        sigma_max=10.0, sigma_min=0.01, num_train_timesteps=L, steps_per_level=T, step_size=step_size,
        sampler=sampler, timestep_type="log_sigma",
    )
    s.set_timesteps()
    g = torch.Generator().manual_seed(seed)
    x = mu + 10.0 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    states = []
    run_diffusers_loop(s, lambda x, t: -(x - mu) / math.exp(2 * float(t)), x, track=states)
    return [((x_ - mu) ** 2).mean().item() for x_ in states], n * 2


def test_cas_keeps_noise_variance_on_schedule_proposition_2():
    L, T, kappa = 10, 10, 0.2
    variances, m = point_mass_run("cas", kappa * 0.01**2, L=L, T=T)
    sigmas = np.geomspace(10.0, 0.01, (L - 1) * T + 1)
    # after the step at σ_i the noise variance is σ_{i+1}² (the last step adds none: (σ_n(1 − κ))²)
    expected = np.append(sigmas[1:] ** 2, (sigmas[-1] * (1 - kappa)) ** 2)
    ratio = np.array(variances) / expected
    assert np.abs(ratio - 1).max() < 5 * math.sqrt(2 / m), np.abs(ratio - 1).max()


def test_als_noise_variance_exceeds_schedule_proposition_1():
    L, T, eps = 10, 10, 2e-5
    variances, m = point_mass_run("als", eps, L=L, T=T)
    sigmas = np.geomspace(10.0, 0.01, L)
    # the exact variance recursion of x ← (1 − α/σ_i²)x + √(2α)z, α = ε σ_i²/σ_L², from v = σ_1²
    v, exact = 100.0, []
    for sigma in sigmas:
        alpha = eps * sigma**2 / 0.01**2
        for _ in range(T):
            v = (1 - alpha / sigma**2) ** 2 * v + 2 * alpha
            exact.append(v)
    ratio = np.array(variances) / np.array(exact)
    assert np.abs(ratio - 1).max() < 5 * math.sqrt(2 / m)
    end_of_level = np.array(variances)[T - 1 :: T]
    assert (end_of_level > sigmas**2).all(), end_of_level / sigmas**2  # Proposition 1: above the schedule
    assert (end_of_level / sigmas**2 > 1 + 5 * math.sqrt(2 / m)).all()  # by more than the sampling error


def test_final_tweedie_denoising_step():
    s = AnnealedLangevinScheduler(sigma_max=1.0, sigma_min=0.1, num_train_timesteps=3, steps_per_level=2,
                                  denoise_final=True, timestep_type="sigma")
    s.set_timesteps()
    assert len(s.timesteps) == 3 * 2 + 1 and float(s.timesteps[-1]) == pytest.approx(0.1)
    s.set_begin_index(len(s.timesteps) - 1)
    x = torch.randn(5, 2, dtype=torch.float64)
    score = torch.randn(5, 2, dtype=torch.float64)
    out = s.step(score, s.timesteps[-1], x).prev_sample
    torch.testing.assert_close(out, x + 0.1**2 * score)


def test_als_timestep_conventions():
    s = AnnealedLangevinScheduler(sigma_max=1.0, sigma_min=0.01, num_train_timesteps=10, steps_per_level=3)
    s.set_timesteps()
    # NCSN labels: 0 for σ_1, repeated T times per level
    assert s.timesteps.dtype == torch.int64
    assert s.timesteps.tolist() == [i for i in range(10) for _ in range(3)]
    torch.testing.assert_close(s.sigmas[::3], torch.from_numpy(np.geomspace(1.0, 0.01, 10)))
    s2 = AnnealedLangevinScheduler(sigma_max=1.0, sigma_min=0.01, num_train_timesteps=10, steps_per_level=3,
                                   timestep_type="log_sigma", prediction_type="scaled_score")
    s2.set_timesteps(4)
    assert s2.timesteps.dtype == torch.float32
    np.testing.assert_allclose(s2.timesteps[::3].numpy(), np.log(np.geomspace(1.0, 0.01, 4)), rtol=1e-6)
    # scaled_score: the network's F is σ·s, so the Langevin step uses F/σ
    x, F = torch.zeros(2, 3), torch.ones(2, 3)
    step = s2.step(F, s2.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(step.pred_original_sample, x + 1.0 * F)  # x + σ²·F/σ at σ = 1
    # add_noise inverts the timestep: x + σ·z
    noisy = s2.add_noise(torch.zeros(4, 3), torch.ones(4, 3), s2.timesteps[::3])
    np.testing.assert_allclose(noisy[:, 0].numpy(), np.geomspace(1.0, 0.01, 4), rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Predictor-corrector samplers (Song et al. 2021)

VE = dict(sigma_min=0.01, sigma_max=50.0)
VP = dict(beta_min=0.1, beta_max=20.0)


def ve_sigma_ref(t):
    return VE["sigma_min"] * (VE["sigma_max"] / VE["sigma_min"]) ** t


def vp_alpha_bar_ref(t):
    return math.exp(-0.5 * t**2 * (VP["beta_max"] - VP["beta_min"]) - t * VP["beta_min"])


def pc_model(sde, data):
    """A score network with timestep_type='t': the perturbed-data score at time t, from the test's own SDE formulas."""

    def model(x, t):
        t = float(t)
        if sde == "ve":
            return mixture_score(x, ve_sigma_ref(t), **data)
        ab = vp_alpha_bar_ref(t)
        return mixture_score(x, math.sqrt(1 - ab), a=math.sqrt(ab), **data)

    return model


def make_pc(sde, **kw):
    base = dict(sde_type=sde, timestep_type="t", snr=0.16, sampling_eps=1e-5 if sde == "ve" else 1e-3)
    base.update(VE if sde == "ve" else VP)
    base.update(kw)
    return PredictorCorrectorScheduler(**base)


@pytest.mark.parametrize("sde", ["ve", "vp"])
@pytest.mark.parametrize("predictor", ["reverse_diffusion", "euler_maruyama"])
def test_pc_sampler_recovers_gaussian(sde, predictor):
    s = make_pc(sde, predictor=predictor, correct_steps=1)
    s.set_timesteps(500)
    assert len(s.timesteps) == 1000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 2, generator=g, dtype=torch.float64) * s.init_noise_sigma
    check_gaussian(run_diffusers_loop(s, pc_model(sde, GAUSS), x))


@pytest.mark.parametrize("sde", ["ve", "vp"])
def test_pc_sampler_recovers_mixture_weights(sde):
    s = make_pc(sde, correct_steps=1)
    s.set_timesteps(300)
    n = 2000
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s.init_noise_sigma
    x = run_diffusers_loop(s, pc_model(sde, MIXTURE), x)
    assert within((x[:, 0] > 0).double().mean(), 0.8, math.sqrt(0.16 / n))


@pytest.mark.parametrize("sde", ["ve", "vp"])
@pytest.mark.parametrize("predictor", ["reverse_diffusion", "euler_maruyama"])
def test_probability_flow_ode_converges_to_exact_map(sde, predictor):
    """For Gaussian data the probability-flow ODE keeps (x_t − m_t)/sd_t fixed, so x_0 = μ + (x_1 − m_1)·s/sd_1;
    the Euler discretisation on the marginals (which ends at t = 0) converges to it at first order."""
    mu, s0 = torch.tensor(GAUSS["means"][0], dtype=torch.float64), GAUSS["stds"][0]
    if sde == "ve":
        m1, sd1 = mu, math.sqrt(s0**2 + ve_sigma_ref(1.0) ** 2)
    else:
        ab = vp_alpha_bar_ref(1.0)
        m1, sd1 = math.sqrt(ab) * mu, math.sqrt(ab * s0**2 + 1 - ab)
    x1 = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    exact = mu + (x1 - m1) * s0 / sd1
    errors = []
    for n in (250, 500):
        sch = make_pc(sde, predictor=predictor, probability_flow=True, correct_steps=0, discretization="marginal")
        sch.set_timesteps(n)
        out = run_diffusers_loop(sch, pc_model(sde, GAUSS), x1.clone())
        errors.append((out - exact).abs().max().item())
    assert errors[1] < 0.15, errors  # VP reverse diffusion has the largest constant: 0.13 at N = 500 (EM: 0.004)
    assert 1.6 < errors[0] / errors[1] < 2.4, errors  # first order: halving the step halves the error


def test_pc_matches_diffusers_score_sde_ve():
    """With the VE reverse-diffusion predictor and Langevin corrector, the updates equal those of diffusers'
    ScoreSdeVeScheduler (as ScoreSdeVePipeline runs it), given the same network outputs and generator."""
    from diffusers import ScoreSdeVeScheduler

    n_steps, shape = 50, (8, 1, 4, 4)
    ref = ScoreSdeVeScheduler(num_train_timesteps=n_steps, sigma_min=0.01, sigma_max=50.0, snr=0.16, correct_steps=2)
    ours = PredictorCorrectorScheduler.from_config(ref.config)
    assert ours.config.timestep_type == "sigma" and ours.config.prediction_type == "score"
    assert ours.init_noise_sigma == ref.init_noise_sigma

    def net(x, sigma):  # a smooth "score network" of (x, σ), not the score of any Gaussian
        return (-(x - 0.3) + 0.1 * torch.sin(3 * x)) / (0.25 + sigma**2)

    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * ref.init_noise_sigma
    # diffusers' ScoreSdeVePipeline loop
    ref.set_timesteps(n_steps)
    ref.set_sigmas(n_steps)
    g, x = torch.Generator().manual_seed(1), x0.clone()
    for i, t in enumerate(ref.timesteps):
        sigma_t = ref.sigmas[i]
        for _ in range(ref.config.correct_steps):
            x = ref.step_correct(net(x, sigma_t), x, generator=g).prev_sample
        out = ref.step_pred(net(x, sigma_t), t, x, generator=g)
        x, x_mean = out.prev_sample, out.prev_sample_mean
    # ours, the standard loop (the last step returns the mean, as the pipeline does)
    ours.set_timesteps(n_steps)
    np.testing.assert_allclose(ours.timesteps[2::3].numpy(), ref.sigmas.numpy(), rtol=1e-6)
    y = run_diffusers_loop(ours, lambda x, t: net(x, t), x0.clone(), seed=1)
    torch.testing.assert_close(y, x_mean, rtol=1e-5, atol=1e-5)  # float32 there, float64 here


def test_pc_timestep_conventions_and_add_noise():
    s = make_pc("vp", timestep_type="discrete", num_train_timesteps=1000, correct_steps=2, prediction_type="epsilon")
    s.set_timesteps(25)
    t = np.linspace(1, 1e-3, 25)
    np.testing.assert_allclose(s.timesteps.numpy(), np.repeat(t * 999, 3), rtol=1e-6)
    ab = np.array([vp_alpha_bar_ref(v) for v in t])
    np.testing.assert_allclose(s.sigmas.numpy(), np.sqrt(1 - ab), rtol=1e-10)
    x0, z = torch.ones(25, 2), torch.full((25, 2), 2.0)
    noisy = s.add_noise(x0, z, s.timesteps[::3])
    np.testing.assert_allclose(noisy[:, 0].numpy(), np.sqrt(ab) + 2 * np.sqrt(1 - ab), rtol=1e-5)
    # epsilon network: the score is −ε/√(1 − ᾱ), so Tweedie gives (x − √(1 − ᾱ)ε)/√ᾱ (DDPM's x_0 prediction)
    x, eps = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    out = s.step(eps, s.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.pred_original_sample, (x - math.sqrt(1 - ab[0]) * eps) / math.sqrt(ab[0]))


def score_sde_pc_sampler(sde, predictor, n_steps, probability_flow, N, eps, snr, x, score_fn, noise, denoise=True):
    """score_sde's ``get_pc_sampler`` with its ``sde_lib.VESDE``/``VPSDE`` (N = the SDE's own N), transcribed.

    ``score_fn(x, t)`` is the score at time t; ``noise()`` returns the next z (``torch.randn_like`` there).
    """
    smin, smax, bmin, bmax = VE["sigma_min"], VE["sigma_max"], VP["beta_min"], VP["beta_max"]
    discrete_sigmas = torch.exp(torch.linspace(np.log(smin), np.log(smax), N, dtype=torch.float64))
    discrete_betas = torch.linspace(bmin / N, bmax / N, N, dtype=torch.float64)
    alphas = 1.0 - discrete_betas

    def index(t):
        return int(torch.tensor(t * (N - 1) / 1.0, dtype=torch.float64).long())  # (t * (N - 1) / T).long()

    def sde_fn(x, t):  # forward SDE: drift, diffusion
        if sde == "ve":
            return torch.zeros_like(x), smin * (smax / smin) ** t * math.sqrt(2 * (np.log(smax) - np.log(smin)))
        beta_t = bmin + t * (bmax - bmin)
        return -0.5 * beta_t * x, math.sqrt(beta_t)

    def discretize(x, t):  # VESDE / VPSDE.discretize
        j = index(t)
        if sde == "ve":
            sigma = discrete_sigmas[j]
            adjacent = 0.0 if j == 0 else discrete_sigmas[j - 1]
            return torch.zeros_like(x), float(torch.sqrt(sigma**2 - adjacent**2))
        return math.sqrt(alphas[j]) * x - x, math.sqrt(discrete_betas[j])

    half = 0.5 if probability_flow else 1.0

    def rsde_sde(x, t):
        drift, diffusion = sde_fn(x, t)
        return drift - diffusion**2 * score_fn(x, t) * half, 0.0 if probability_flow else diffusion

    def rsde_discretize(x, t):
        f, G = discretize(x, t)
        return f - G**2 * score_fn(x, t) * half, 0.0 if probability_flow else G

    def predictor_update(x, t):
        if predictor == "reverse_diffusion":
            f, G = rsde_discretize(x, t)
            z = noise()
            x_mean = x - f
            return x_mean + G * z, x_mean
        if predictor == "euler_maruyama":
            dt = -1.0 / N
            z = noise()
            drift, diffusion = rsde_sde(x, t)
            x_mean = x + drift * dt
            return x_mean + diffusion * np.sqrt(-dt) * z, x_mean
        return x, x  # NonePredictor

    def corrector_update(x, t):  # LangevinCorrector
        alpha = float(alphas[index(t)]) if sde == "vp" else 1.0
        x_mean = x
        for _ in range(n_steps):
            grad = score_fn(x, t)
            z = noise()
            grad_norm = torch.norm(grad.reshape(grad.shape[0], -1), dim=-1).mean()
            noise_norm = torch.norm(z.reshape(z.shape[0], -1), dim=-1).mean()
            step_size = (snr * noise_norm / grad_norm) ** 2 * 2 * alpha
            x_mean = x + step_size * grad
            x = x_mean + torch.sqrt(step_size * 2) * z
        return x, x_mean

    timesteps = torch.linspace(1.0, eps, N, dtype=torch.float64)
    for i in range(N):
        t = float(timesteps[i])
        x, x_mean = corrector_update(x, t) if n_steps > 0 else (x, x)
        x, x_mean = predictor_update(x, t)
    return x_mean if denoise else x


def float32_time_score(sde):
    """The analytic mixture score at time t, with t rounded to float32 as a network's timestep input is."""
    model = pc_model(sde, MIXTURE)
    return lambda x, t: model(x, float(torch.tensor(float(t), dtype=torch.float32)))


@pytest.mark.parametrize("sde,N", [("ve", 40), ("vp", 30)])
@pytest.mark.parametrize(
    "predictor,correct_steps,probability_flow",
    [
        ("reverse_diffusion", 1, False),
        ("euler_maruyama", 1, False),
        ("reverse_diffusion", 0, True),
        ("euler_maruyama", 0, True),
        ("none", 2, False),
    ],
)
def test_pc_default_reproduces_score_sde(sde, N, predictor, correct_steps, probability_flow):
    """The default discretisation is score_sde's PC sampler: the same noise gives the same samples (float64)."""
    eps, snr = (1e-5 if sde == "ve" else 1e-3), 0.16
    s = make_pc(sde, predictor=predictor, correct_steps=correct_steps, probability_flow=probability_flow)
    assert s.config.discretization == "score_sde"
    s.set_timesteps(N)
    x0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s.init_noise_sigma
    score = float32_time_score(sde)
    ours = run_diffusers_loop(s, score, x0.clone(), seed=1)
    g = torch.Generator().manual_seed(1)
    noise = lambda: torch.randn(x0.shape, generator=g, dtype=torch.float32).double()  # noqa: E731
    ref = score_sde_pc_sampler(sde, predictor, correct_steps, probability_flow, N, eps, snr, x0.clone(), score, noise)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert torch.isfinite(ref).all() and (ref - x0).abs().min() > 1e-3  # every coordinate moved
    if predictor != "none":  # a sampler run that reaches the data, not a blow-up that happens to agree
        assert ref.abs().max() < 20


def test_pc_vp_refuses_score_sde_tables_with_beta_at_least_one():
    """score_sde's VP table has β = β_max/N ≥ 1 for N ≤ β_max = 20: refused, naming num_inference_steps."""
    for kw in (dict(predictor="reverse_diffusion", correct_steps=0), dict(predictor="euler_maruyama")):
        s = make_pc("vp", **kw)
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(20)
        s.set_timesteps(21)
        x = torch.zeros(2, 2, dtype=torch.float64)
        assert torch.isfinite(run_diffusers_loop(s, float32_time_score("vp"), x)).all()
    # Euler–Maruyama without a corrector never reads the table
    make_pc("vp", predictor="euler_maruyama", correct_steps=0).set_timesteps(5)
    make_pc("vp", discretization="marginal").set_timesteps(5)


@pytest.mark.parametrize("sde", ["ve", "vp"])
def test_pc_marginal_discretization_is_the_previous_one(sde):
    """``discretization="marginal"``: reverse diffusion with h = σ_i² − σ_{i+1}² (VE) or 1 − ᾱ_i/ᾱ_{i+1} (VP) on
    t = linspace(1, ε, N) plus t_N = 0, the last step returning its mean; written out here."""
    N, eps = 8, 1e-3
    s = make_pc(sde, correct_steps=0, discretization="marginal", sampling_eps=eps)
    s.set_timesteps(N)
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s.init_noise_sigma
    score = float32_time_score(sde)
    ours = run_diffusers_loop(s, score, x0.clone(), seed=2)
    g = torch.Generator().manual_seed(2)
    t = list(np.linspace(1, eps, N)) + [0.0]
    x = x0.clone()
    for i in range(N):
        sc = score(x, t[i])
        if sde == "ve":
            h = ve_sigma_ref(t[i]) ** 2 - (ve_sigma_ref(t[i + 1]) ** 2 if i + 1 < N else 0.0)
            mean = x + h * sc
        else:
            h = 1 - vp_alpha_bar_ref(t[i]) / vp_alpha_bar_ref(t[i + 1])
            mean = (2 - math.sqrt(1 - h)) * x + h * sc
        z = torch.randn(x.shape, generator=g, dtype=torch.float32).double()
        x = mean if i == N - 1 else mean + math.sqrt(h) * z
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sde", ["ve", "vp"])
def test_pc_marginal_corrector_step_size(sde):
    """``discretization="marginal"`` with a Langevin corrector before each predictor step: ε = 2α·(r‖z‖/‖s‖)² (norms
    averaged over the batch) with α = 1 (VE) or α = 1 − h = ᾱ_i/ᾱ_{i+1} (VP), then x ← x + ε·s + √(2ε)·z; written
    out here, with ᾱ and σ from their closed forms."""
    N, eps, snr = 6, 1e-3, 0.16
    s = make_pc(sde, correct_steps=1, discretization="marginal", sampling_eps=eps, snr=snr)
    s.set_timesteps(N)
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * s.init_noise_sigma
    score = float32_time_score(sde)
    ours = run_diffusers_loop(s, score, x0.clone(), seed=3)
    g = torch.Generator().manual_seed(3)
    t = list(np.linspace(1, eps, N)) + [0.0]
    x = x0.clone()
    for i in range(N):
        if sde == "ve":
            h, alpha = ve_sigma_ref(t[i]) ** 2 - (ve_sigma_ref(t[i + 1]) ** 2 if i + 1 < N else 0.0), 1.0
        else:
            h = 1 - vp_alpha_bar_ref(t[i]) / vp_alpha_bar_ref(t[i + 1])
            alpha = 1 - h
        grad = score(x, t[i])
        z = torch.randn(x.shape, generator=g, dtype=torch.float32).double()
        step = 2 * alpha * (snr * z.norm(dim=1).mean() / grad.norm(dim=1).mean()) ** 2
        x = x + step * grad + torch.sqrt(2 * step) * z
        sc = score(x, t[i])
        mean = x + h * sc if sde == "ve" else (2 - math.sqrt(1 - h)) * x + h * sc
        z = torch.randn(x.shape, generator=g, dtype=torch.float32).double()
        x = mean if i == N - 1 else mean + math.sqrt(h) * z
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "scheduler,steps",
    [
        (PredictorCorrectorScheduler(sde_type="vp", correct_steps=1), 25),
        (PredictorCorrectorScheduler(predictor="euler_maruyama", probability_flow=True, correct_steps=0), 5),
        (PredictorCorrectorScheduler(predictor="none", correct_steps=2, discretization="marginal"), 5),
        (AnnealedLangevinScheduler(steps_per_level=2, denoise_final=True), 5),
        (AnnealedLangevinScheduler(sampler="cas", step_size=1e-4, timestep_type="sigma", denoise_final=True), 5),
    ],
)
def test_steps_never_read_values_from_the_device(scheduler, steps):
    """No host–device sync in ``step``: on the meta device any read of a tensor's value (``.item()``, ``bool()``,
    ``float()``, ``isnan().any()`` in an ``if``) raises, so a whole loop on meta tensors runs only if none happens."""
    scheduler.set_timesteps(steps)
    x = torch.empty(2, 3, 4, 4, device="meta")
    g = torch.Generator().manual_seed(0)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.empty_like(x), t, x, generator=g).prev_sample
    assert x.device.type == "meta" and scheduler.step_index == len(scheduler.timesteps)
    with pytest.raises(Exception):  # the check has teeth: a value read on meta fails
        bool(torch.isnan(x).any())


@pytest.mark.parametrize("make", [lambda: make_pc("ve"), lambda: AnnealedLangevinScheduler(timestep_type="log_sigma")])
def test_score_schedulers_validate_steps_and_samples(make):
    s = make()
    for bad in (1.5, "3", True, 0, torch.tensor(2.0)):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(bad)
    for good in (np.int64(3), torch.tensor(3)):
        s.set_timesteps(good)
        assert s.num_inference_steps == 3
    t = s.timesteps[0]
    for bad in (torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.bool)):
        with pytest.raises(ValueError, match="sample"):
            s.step(torch.zeros(2, 2), t, bad)


# --------------------------------------------------------------------------------------------------------------
# NCSNv2 techniques


def test_technique1_max_pairwise_distance_brute_force():
    x = torch.randn(157, 5, generator=torch.Generator().manual_seed(0)) * torch.tensor([1.0, 2, 3, 0.1, 5])
    a = x.double().numpy()
    brute = max(np.linalg.norm(a[i] - a[j]) for i in range(len(a)) for j in range(i + 1, len(a)))
    for chunk in (7, 64, 1000):  # blocks that do and do not divide N
        assert max_pairwise_distance(x, chunk_size=chunk) == pytest.approx(brute, rel=1e-12)
    assert max_pairwise_distance(x.reshape(157, 5, 1, 1)) == pytest.approx(brute, rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        max_pairwise_distance(x[:1])


@pytest.mark.parametrize("dim,C", [(64, 0.5), (3072, 0.5), (12288, 0.3)])
def test_technique2_gamma_solves_its_equation(dim, C):
    gamma = ncsnv2_gamma(dim, C)
    a = math.sqrt(2 * dim) * (gamma - 1)
    assert gamma > 1
    assert norm.cdf(a + 3 * gamma) - norm.cdf(a - 3 * gamma) == pytest.approx(C, abs=1e-9)
    sig = ncsnv2_sigmas(50.0, 0.01, dim, C)
    ratios = (sig[:-1] / sig[1:]).numpy()
    assert sig[0] == pytest.approx(50.0) and sig[-1] == pytest.approx(0.01)
    assert np.allclose(ratios, ratios[0]) and ratios[0] <= gamma + 1e-12
    assert (50.0 / 0.01) ** (1 / (len(sig) - 2)) > gamma  # one level fewer would exceed γ


def test_technique2_rejects_low_dimension():
    with pytest.raises(ValueError, match="dim"):
        ncsnv2_gamma(3)
    with pytest.raises(ValueError, match="C must be"):
        ncsnv2_gamma(64, C=1.0)


def prop3_ratio(eps, gamma, T, sigma_L):
    """NCSNv2 Proposition 3, transcribed from the paper."""
    k = eps / sigma_L**2
    c = 2 * eps / (sigma_L**2 - sigma_L**2 * (1 - k) ** 2)
    return (1 - k) ** (2 * T) * (gamma**2 - c) + c


@pytest.mark.parametrize(
    "gamma,T,sigma_L", [(5000 ** (1 / 231), 5, 0.01), (2.15, 100, 0.01), (1.36, 1, 0.05), (1.2, 20, 0.3)]
)
def test_technique4_step_size_matches_brute_force(gamma, T, sigma_L):
    eps = ncsnv2_step_size(gamma, T, sigma_L)
    grid = np.exp(np.linspace(np.log(1e-9), np.log(0.999), 400_000)) * sigma_L**2
    values = np.abs(prop3_ratio(grid, gamma, T, sigma_L) - 1)
    assert abs(prop3_ratio(eps, gamma, T, sigma_L) - 1) <= values.min() + 1e-9
    assert eps == pytest.approx(grid[values.argmin()], rel=1e-3)


def test_technique4_reproduces_ncsnv2_published_step_sizes():
    # NCSNv2 Table/Appendix: CIFAR-10 σ_1 = 50, L = 232, T = 5 → ε = 6.2e-6; CelebA 64 σ_1 = 90, L = 500 → 3.3e-6
    assert ncsnv2_step_size((50 / 0.01) ** (1 / 231), 5, 0.01) == pytest.approx(6.2e-6, rel=0.02)
    assert ncsnv2_step_size((90 / 0.01) ** (1 / 499), 5, 0.01) == pytest.approx(3.3e-6, rel=0.02)


def test_proposition3_closed_form_equals_variance_recursion():
    gamma, T, sigma_L, sigma_i, eps = 1.3, 7, 0.02, 0.5, 3e-5
    alpha = eps * sigma_i**2 / sigma_L**2
    v = (gamma * sigma_i) ** 2
    for _ in range(T):  # x ← x − (α/σ_i²)x + √(2α)z for a point mass at 0
        v = (1 - alpha / sigma_i**2) ** 2 * v + 2 * alpha
    assert ncsnv2_variance_ratio(eps, gamma, T, sigma_L) == pytest.approx(v / sigma_i**2, rel=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Denoising score matching


class AffineScore(torch.nn.Module):
    """F(x, t) = a·x + b, one (a, b) for a single σ: with ``prediction_type="score"`` the family contains the
    Gaussian's exact score."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(()))
        self.b = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x, t):
        return self.a * x + self.b


def test_dsm_minimiser_is_the_true_score():
    mu, s0, sigma = torch.tensor([1.0, -2.0]), 0.5, 0.7
    data = mu + s0 * torch.randn(8192, 2, generator=torch.Generator().manual_seed(0))
    model = AffineScore()
    denoiser = Denoiser(model, NCSNPreconditioning(prediction_type="score", timestep_type="sigma"))
    loss_fn = DenoisingScoreMatchingLoss(sigma_sampling="log_uniform")
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        opt.zero_grad()
        loss_fn(denoiser, data, sigma=sigma, generator=g).loss.mean().backward()
        opt.step()
    var = s0**2 + sigma**2  # true score −(x − μ)/var
    assert model.a.item() == pytest.approx(-1 / var, rel=0.03)
    torch.testing.assert_close(model.b.detach(), mu / var, rtol=0.03, atol=0.02)


def test_dsm_loss_value_at_the_exact_score():
    """½ E‖σ s*(x̃) + z‖² = ½ D s²/(s² + σ²) for Gaussian data N(μ, s²I) and its exact score s*; the loss sees the
    score through its denoiser D = x̃ + σ²s*."""
    mu, s0, sigma, n = torch.tensor([1.0, -2.0]), 0.5, 0.3, 200_000
    data = (mu + s0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(0))).double()

    def exact_denoiser(x, sig):
        sig = sig.reshape(-1, 1)
        return x + sig**2 * (-(x - mu.double()) / (s0**2 + sig**2))

    loss = DenoisingScoreMatchingLoss(sigma_sampling="log_uniform")(exact_denoiser, data, sigma=sigma,
                                                                    generator=torch.Generator().manual_seed(1))
    loss = loss.loss.mean()
    target = 0.5 * 2 * s0**2 / (s0**2 + sigma**2)
    assert float(loss) == pytest.approx(target, rel=0.01)


def test_dsm_discrete_sigma_sampling_and_epsilon_form():
    sigmas = geometric_sigmas(1.0, 0.01, 10)
    loss_fn = DenoisingScoreMatchingLoss(sigmas)
    drawn = loss_fn.sample_sigmas(10_000, torch.Generator().manual_seed(0))
    assert set(np.round(drawn.numpy(), 12)) <= set(np.round(sigmas.numpy(), 12))
    labels = np.argmin(np.abs(np.log(drawn.numpy())[:, None] - np.log(sigmas.numpy())[None, :]), axis=1)
    assert np.bincount(labels, minlength=10).min() > 850  # uniform over the 10 levels

    class Eps(torch.nn.Module):  # F(x, t) = x
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            return x

    x = torch.randn(16, 3)
    z, sig = torch.randn(16, 3), torch.rand(16) + 0.1
    denoiser = Denoiser(Eps(), NCSNPreconditioning(prediction_type="epsilon", timestep_type="log_sigma"))
    loss = loss_fn(denoiser, x, sigma=sig, noise=z).loss.mean()
    x_noisy = x + sig[:, None] * z
    assert float(loss) == pytest.approx(float(0.5 * ((x_noisy - z) ** 2).sum(1).mean()), rel=1e-5)  # ½‖F − z‖²


def test_dsm_draws_sigma_then_noise_from_the_generator():
    """Without σ and z the loss draws σ (log-uniform) and then z from the generator, on the generator's device."""
    data = torch.randn(64, 2, dtype=torch.float64)
    loss_fn = DenoisingScoreMatchingLoss(sigma_min=0.1, sigma_max=2.0, sigma_sampling="log_uniform")
    denoiser = lambda x, sig: 0.5 * x  # noqa: E731
    g = torch.Generator().manual_seed(3)
    u = torch.rand(64, generator=g, dtype=torch.float64)
    sigma = 0.1 * 20.0**u
    z = torch.randn(64, 2, generator=g, dtype=torch.float64)
    expected = 0.5 * (((0.5 * (data + sigma[:, None] * z) - data) / sigma[:, None]) ** 2).sum(1).mean()
    loss = loss_fn(denoiser, data, generator=torch.Generator().manual_seed(3)).loss.mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-12)


class Record(torch.nn.Module):
    """F(x, t) = w·1, remembering the timestep it received."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen = None

    def forward(self, x, t):
        self.seen = t
        return self.w * torch.ones_like(x)


def test_ncsn_preconditioning_conventions_and_ncsnv2_conditioning():
    x, sig = torch.zeros(3, 1, 2, 2), torch.tensor([0.5, 1.0, 2.0])
    net = Record()
    p = NCSNPreconditioning(prediction_type="score", timestep_type="log_sigma")
    d = Denoiser(net, p)(x, sig)
    assert torch.is_tensor(net.seen) and net.seen.dtype == torch.float32  # never a python float
    torch.testing.assert_close(net.seen, sig.log())
    torch.testing.assert_close(p.score(x, torch.ones_like(x), sig), torch.ones_like(x))
    torch.testing.assert_close(d, x + sig.reshape(-1, 1, 1, 1) ** 2)  # D = x + σ²·s
    ncsnv2 = NCSNPreconditioning(prediction_type="scaled_score", timestep_type="none")  # s(x, σ) = F(x)/σ
    Denoiser(net, ncsnv2)(x, sig)
    torch.testing.assert_close(net.seen, torch.zeros(3))
    torch.testing.assert_close(ncsnv2.score(x, torch.ones_like(x), sig), torch.ones_like(x) / sig.reshape(-1, 1, 1, 1))
    table = geometric_sigmas(1.0, 0.01, 10)
    Denoiser(net, NCSNPreconditioning(timestep_type="index", sigmas=table))(x[:2], table[[0, 9]].float())
    assert net.seen.tolist() == [0, 9]  # NCSN labels: 0 for σ_1
    # off the table: the nearest level by distance in σ (EDM's round_sigma); the midpoint of σ_1, σ_2 splits them
    p = NCSNPreconditioning(timestep_type="index", sigmas=table)
    mid = float(table[0] + table[1]) / 2
    assert p.c_noise(torch.tensor([mid + 1e-9, mid - 1e-9], dtype=torch.float64)).tolist() == [0, 1]
    with pytest.raises(ValueError, match="sigmas"):
        NCSNPreconditioning(timestep_type="index")


@pytest.mark.parametrize("sde", ["ve", "vp"])
@pytest.mark.parametrize("prediction_type", ["score", "scaled_score", "epsilon"])
def test_score_preconditioning_returns_the_score_and_the_posterior_mean(sde, prediction_type):
    """Gaussian data N(μ, s²): x_t = a·y + std·z has score −(x − aμ)/(a²s² + std²) and E[y | x_t] =
    μ + a s²/(a²s² + std²)·(x − aμ). Each prediction type's F is written from its definition (s, std·s, −std·s)."""
    mu, s0, t = 0.7, 0.4, 0.3
    if sde == "ve":
        a, std = 1.0, ve_sigma_ref(t)
    else:
        a, std = math.sqrt(vp_alpha_bar_ref(t)), math.sqrt(1 - vp_alpha_bar_ref(t))
    x = torch.linspace(-3, 3, 11, dtype=torch.float64).reshape(11, 1)
    score = -(x - a * mu) / (a**2 * s0**2 + std**2)
    posterior_mean = mu + a * s0**2 / (a**2 * s0**2 + std**2) * (x - a * mu)
    F = {"score": score, "scaled_score": std * score, "epsilon": -std * score}[prediction_type]
    p = ScoreSDEPreconditioning(sde, prediction_type=prediction_type, timestep_type="t", **(VE if sde == "ve" else VP))
    sigma = p.sigma(t)
    assert float(sigma * p.mean_coefficient(sigma)) == pytest.approx(std, rel=1e-12)
    assert float(p.c_noise(sigma)) == pytest.approx(t, rel=1e-10)
    torch.testing.assert_close(p.score(x, F, sigma), score)
    torch.testing.assert_close(p.denoise(x / a, F, sigma), posterior_mean)
    torch.testing.assert_close(p.c_in(sigma) * (x / a), x)  # the network sees x_t itself


def test_score_sde_vp_discrete_equals_edm_vp_preconditioning():
    """An ε-network of the VP SDE fed t·(N − 1) is EDM's ``vp`` preconditioning (Table 1)."""
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    ours = make_preconditioning("score_sde_vp", prediction_type="epsilon", timestep_type="discrete")
    edm = make_preconditioning("vp")
    for name in ("c_skip", "c_out", "c_in", "c_noise"):
        torch.testing.assert_close(getattr(ours, name)(sigma), getattr(edm, name)(sigma))


# --------------------------------------------------------------------------------------------------------------
# Noise schedules


def test_cosine_and_linear_schedules_match_the_discrete_betas():
    T = 1000
    t = torch.arange(1, T + 1, dtype=torch.float64) / T
    ac_cos = alphas_cumprod_from_betas(betas_for_schedule(T, beta_schedule="squaredcos_cap_v2"))
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731  (Nichol & Dhariwal eq. 17)
    np.testing.assert_allclose(cosine_alpha_bar(t)[:900].numpy(), f(t.numpy())[:900], rtol=1e-12)
    np.testing.assert_allclose(ac_cos[:900].numpy(), (f(t.numpy()) / f(0.0))[:900], rtol=1e-9)
    ac_lin = alphas_cumprod_from_betas(betas_for_schedule(T))  # DDPM linear 1e-4 → 2e-2
    # the VP SDE is its continuous limit, ᾱ(t) = exp(−½t²(β_max − β_min) − t·β_min) = 1/(1 + σ(t)²): log ᾱ agrees
    # to O(1/T)
    late = slice(99, None)
    vp_alpha_bar = np.exp(-0.5 * t.numpy() ** 2 * 19.9 - t.numpy() * 0.1)
    np.testing.assert_allclose(1 / (1 + vp_sigma(t).numpy() ** 2), vp_alpha_bar, rtol=1e-12)
    np.testing.assert_allclose(np.log(vp_alpha_bar)[late], np.log(ac_lin.numpy())[late], rtol=1e-2)


def test_sde_sigma_and_time_are_inverse():
    t = torch.linspace(1e-5, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(vp_time(vp_sigma(t, 19.9, 0.1), 19.9, 0.1), t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ve_time(ve_sigma(t, 0.02, 100.0), 0.02, 100.0), t, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ve_sigma(t, 0.02, 100.0), 0.02 * (100.0 / 0.02) ** t)


# --------------------------------------------------------------------------------------------------------------
# The diffusers scheduler contract, config round trips and bad input


class TestAnnealedLangevinContract(SchedulerContractTests):
    scheduler_class = AnnealedLangevinScheduler
    num_inference_steps = 5

    def step_boundaries(self, scheduler):
        T = scheduler.config.steps_per_level if scheduler.config.sampler == "als" else 1
        n = len(scheduler.timesteps) - int(scheduler.config.denoise_final)  # the final denoising repeats σ_L
        ks = list(range(T, n, T))
        return sorted({ks[0], ks[len(ks) // 2], ks[-1]})

    def get_scheduler_config(self, **overrides):
        config = dict(sigma_max=1.0, sigma_min=0.01, num_train_timesteps=5, steps_per_level=3, step_size=2e-5,
                      sampler="als", denoise_final=True, prediction_type="score", timestep_type="index")
        config.update(overrides)
        return config


class TestCASContract(TestAnnealedLangevinContract):
    def get_scheduler_config(self, **overrides):
        return super().get_scheduler_config(sampler="cas", timestep_type="sigma", step_size=5e-5, **overrides)


class TestPredictorCorrectorContract(SchedulerContractTests):
    scheduler_class = PredictorCorrectorScheduler
    compatible_classes = ("ScoreSdeVeScheduler",)
    num_inference_steps = 25

    def step_boundaries(self, scheduler):
        c = scheduler.config
        per_step = c.correct_steps + (c.predictor != "none")  # M correctors, then the predictor
        ks = list(range(per_step, len(scheduler.timesteps), per_step))
        return sorted({ks[0], ks[len(ks) // 2], ks[-1]})

    def get_scheduler_config(self, **overrides):
        config = dict(num_train_timesteps=100, snr=0.16, sigma_min=0.01, sigma_max=50.0, correct_steps=1)
        config.update(overrides)
        return config


class TestPredictorCorrectorVPContract(TestPredictorCorrectorContract):
    compatible_classes = ()

    def get_scheduler_config(self, **overrides):
        return super().get_scheduler_config(sde_type="vp", timestep_type="t", predictor="euler_maruyama", **overrides)


class TestPredictorCorrectorOnlyContract(TestPredictorCorrectorContract):
    compatible_classes = ()

    def get_scheduler_config(self, **overrides):
        return super().get_scheduler_config(sde_type="vp", predictor="none", correct_steps=2, **overrides)


class TestPredictorCorrectorMarginalContract(TestPredictorCorrectorContract):
    compatible_classes = ()

    def get_scheduler_config(self, **overrides):
        return super().get_scheduler_config(discretization="marginal", timestep_type="log_sigma", **overrides)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(step_size=0.0), "step_size"),
        (dict(step_size=-1e-5), "step_size"),
        (dict(steps_per_level=0), "steps_per_level"),
        (dict(sigma_max=0.01, sigma_min=0.01), "sigma_max > sigma_min"),
        (dict(sampler="langevin"), "sampler"),
        (dict(prediction_type="x0"), "prediction_type"),
        (dict(timestep_type="t"), "timestep_type"),
        (dict(num_train_timesteps=1), "num_train_timesteps"),
        (dict(num_train_timesteps=2.5), "num_train_timesteps"),
        (dict(step_size=math.nan), "step_size"),
    ],
)
def test_annealed_langevin_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnnealedLangevinScheduler(**kwargs)


@pytest.mark.parametrize("sigmas", [[1.0, 1.0, 0.1], [0.1, 0.5, 1.0], [1.0, 0.0], []])
def test_annealed_langevin_rejects_non_decreasing_sigmas(sigmas):
    s = AnnealedLangevinScheduler(timestep_type="log_sigma")
    with pytest.raises(ValueError, match="strictly decreasing"):
        s.set_timesteps(sigmas=sigmas)


def test_annealed_langevin_bad_schedule_combinations():
    with pytest.raises(ValueError, match="num_inference_steps"):
        AnnealedLangevinScheduler().set_timesteps(0)
    with pytest.raises(ValueError, match="CAS"):  # η below σ_L²(1 − γ)
        AnnealedLangevinScheduler(sampler="cas", steps_per_level=1, step_size=1e-7).set_timesteps()
    with pytest.raises(ValueError, match="index"):  # CAS refines the levels: not for an index network
        AnnealedLangevinScheduler(sampler="cas", steps_per_level=5, step_size=5e-5).set_timesteps()
    with pytest.raises(ValueError, match="set_timesteps"):
        AnnealedLangevinScheduler().step(torch.zeros(1), 0, torch.zeros(1))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sde_type="subvp"), "sde_type"),
        (dict(predictor="ancestral"), "predictor"),
        (dict(correct_steps=-1), "correct_steps"),
        (dict(snr=0.0), "snr"),
        (dict(sampling_eps=0.0), "sampling_eps"),
        (dict(predictor="none", correct_steps=0), "predictor='none'"),
        (dict(timestep_type="index"), "timestep_type"),
        (dict(discretization="ddpm"), "discretization"),
        (dict(sigma_max=math.inf), "sigma_max"),
    ],
)
def test_predictor_corrector_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PredictorCorrectorScheduler(**kwargs)


def test_loss_and_schedule_bad_input():
    with pytest.raises(ValueError, match="strictly decreasing"):
        DenoisingScoreMatchingLoss([0.1, 1.0])
    with pytest.raises(ValueError, match="sigmas"):
        DenoisingScoreMatchingLoss()
    with pytest.raises(ValueError, match="sigma_max > sigma_min"):
        DenoisingScoreMatchingLoss(sigma_sampling="log_uniform", sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="steps_per_level"):
        ncsnv2_step_size(1.1, 0, 0.01)
    with pytest.raises(ValueError, match="gamma"):
        ncsnv2_step_size(0.9, 5, 0.01)
    with pytest.raises(ValueError, match="timestep_type"):
        NCSNPreconditioning(timestep_type="t")
    with pytest.raises(ValueError, match="prediction_type"):
        ScoreSDEPreconditioning(prediction_type="v_prediction")


def test_score_samplers_import_only_the_preconditioning():
    """The samplers sit below the losses: their network parametrisation comes from ``preconditioning.py`` alone."""
    import ast
    import inspect

    from diffusers_stf.schedulers import scheduling_annealed_langevin, scheduling_predictor_corrector

    for module in (scheduling_annealed_langevin, scheduling_predictor_corrector):
        tree = ast.parse(inspect.getsource(module))
        imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "preconditioning" in imported, imported
        assert not any("losses" in name for name in imported), imported


def test_configs_written_before_load_and_sample():
    """Scheduler folders written by earlier versions of examples/train_score_model.py (no ``discretization`` key)."""
    common = dict(sigma_max=9.63, sigma_min=0.01, prediction_type="scaled_score")
    als = dict(_class_name="AnnealedLangevinScheduler", _diffusers_version="0.31.0", num_train_timesteps=3,
               steps_per_level=2, step_size=9.2e-05, sampler="als", denoise_final=True, timestep_type="none", **common)
    pc = dict(_class_name="PredictorCorrectorScheduler", _diffusers_version="0.31.0", num_train_timesteps=2000,
              snr=0.16, sampling_eps=1e-05, correct_steps=1, sde_type="ve", beta_min=0.1, beta_max=20.0,
              predictor="reverse_diffusion", probability_flow=False, denoise_final=True, timestep_type="log_sigma",
              **common)
    for cls, config, steps in ((AnnealedLangevinScheduler, als, 3), (PredictorCorrectorScheduler, pc, 3)):
        scheduler = cls.from_config(config)
        scheduler.set_timesteps(steps)
        x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
        out = run_diffusers_loop(scheduler, lambda x, t: -x / (1 + scheduler.init_noise_sigma), x)
        assert torch.isfinite(out).all()
    assert scheduler.config.discretization == "score_sde"


# ----------------------------------------------------------------------------------------------------------------------
# examples/train_score_model.py on the shared training plumbing


def test_train_score_model_example_end_to_end(tmp_path):
    """A few steps of the example, in-process: it leaves the comparison grid, the EMA UNet (safetensors), the four
    sampler configs (loadable with ``from_pretrained``, σ_1 from NCSNv2 Technique 1), a model card and the metrics."""
    import importlib.util
    import json
    import os

    from diffusers import UNet2DModel

    from diffusers_stf import EDMPipeline
    from diffusers_stf.digits import digits_tensor
    from diffusers_stf.training import read_metrics

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                          "train_score_model.py")
    spec = importlib.util.spec_from_file_location("train_score_model", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    out = str(tmp_path / "score")
    threads = torch.get_num_threads()
    try:
        result = example.main([
            "--output_dir", out, "--block_out_channels", "8,16", "--norm_num_groups", "4", "--max_train_steps", "3",
            "--train_batch_size", "16", "--num_validation_images", "4", "--num_inference_steps", "3",
            "--steps_per_level", "2", "--checkpointing_steps", "0", "--logging_steps", "1", "--no_progress_bar",
            "--num_threads", "1",
        ])
    finally:
        torch.set_num_threads(threads)

    assert result.step == 3 and result.samples_path == os.path.join(out, "samples.png")
    assert [row["step"] for row in read_metrics(os.path.join(out, "logs"))] == [1, 2, 3]
    with open(os.path.join(out, "samples.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    unet = UNet2DModel.from_pretrained(os.path.join(out, "unet"))
    assert tuple(unet.config.block_out_channels) == (8, 16)
    card = open(os.path.join(out, "README.md")).read()
    assert "AnnealedLangevinScheduler" in card and "![Samples of the EMA model](samples.png)" in card

    # Technique 1, brute force: the largest distance between two of the 797 training digits (the default
    # --digits_split train; stored as uint8 by the trainer)
    x = digits_tensor("train")[0].flatten(1).double()
    sigma_1 = float(torch.cdist(x, x).max())
    als = AnnealedLangevinScheduler.from_pretrained(out, subfolder="scheduler_als")
    cas = AnnealedLangevinScheduler.from_pretrained(out, subfolder="scheduler_cas")
    pc = PredictorCorrectorScheduler.from_pretrained(out, subfolder="scheduler_pc")
    ode = PredictorCorrectorScheduler.from_pretrained(out, subfolder="scheduler_ode")
    for scheduler in (als, cas, pc, ode):
        assert scheduler.config.sigma_max == pytest.approx(sigma_1, rel=1e-2)
        assert scheduler.config.sigma_min == 0.01 and scheduler.config.prediction_type == "scaled_score"
    assert (als.config.sampler, cas.config.sampler) == ("als", "cas")
    assert (pc.config.correct_steps, pc.config.probability_flow) == (1, False)
    assert (ode.config.correct_steps, ode.config.probability_flow) == (0, True)
    # the same network-evaluation budget: 3 levels x 2 Langevin steps (+ the final denoising step for ALS)
    als.set_timesteps(3), cas.set_timesteps(3), pc.set_timesteps(3), ode.set_timesteps(6)
    assert [len(s.timesteps) for s in (als, cas, pc, ode)] == [7, 6, 6, 6]

    with open(os.path.join(out, "model_index.json")) as f:
        assert json.load(f)["scheduler"][1] == "AnnealedLangevinScheduler"
    pipeline = EDMPipeline.from_pretrained(out)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                      output_type="pt").images
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()
