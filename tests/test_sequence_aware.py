"""SA-DPM (Nguyen et al. 2024): Theorem 1 weights, the sequence-aware loss, Theorem 2, the estimation gap.

Time convention in this file: paper time t = 1..T; diffusers' timestep index is t − 1.
"""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_unet
from diffusers import DDPMScheduler

from diffusers_stf.evaluation.estimation_gap import estimation_gap
from diffusers_stf.losses.sequence_aware import SequenceAwareLoss, sequence_aware_weights
from diffusers_stf.noise_schedules import betas_for_schedule


# --------------------------------------------------------------------------------------------------------------
# Independent transcriptions of the paper, in plain python floats (1-based lists: entry 0 unused).

def paper_tau(betas):
    """Theorem 1, term by term: τ_i = √ᾱ_{i−1}(1−ᾱ_1)/(√α_1(1−ᾱ_{i−1})) · γ_{1,i} · √(1−ᾱ_i)/√ᾱ_i, τ_1 = 0."""
    b = [None] + [float(v) for v in betas]
    T = len(b) - 1
    alpha = [None] + [1 - b[i] for i in range(1, T + 1)]
    abar = [1.0]
    for i in range(1, T + 1):
        abar.append(abar[-1] * alpha[i])
    tau = [None, 0.0]
    for i in range(2, T + 1):
        gamma_1 = math.sqrt(abar[i - 1]) * b[i] / (1 - abar[i])
        first = math.sqrt(abar[i - 1]) * (1 - abar[1]) / (math.sqrt(alpha[1]) * (1 - abar[i - 1]))
        tau.append(first * gamma_1 * math.sqrt(1 - abar[i]) / math.sqrt(abar[i]))
    return tau, abar


def tau_from_posterior_chain(betas):
    """The derivation behind Theorem 1: Π_{j=2}^{i−1} γ_{2,j} times the ε-coefficient β_i/(√α_i √(1−ᾱ_i)) of μ_θ."""
    b = [None] + [float(v) for v in betas]
    T = len(b) - 1
    abar = [1.0]
    for i in range(1, T + 1):
        abar.append(abar[-1] * (1 - b[i]))
    tau = [None, 0.0]
    for i in range(2, T + 1):
        prod = 1.0
        for j in range(2, i):
            prod *= math.sqrt(1 - b[j]) * (1 - abar[j - 1]) / (1 - abar[j])  # γ_{2,j}
        tau.append(prod * b[i] / (math.sqrt(1 - b[i]) * math.sqrt(1 - abar[i])))
    return tau


SMALL_T = 10
SMALL_BETAS = torch.linspace(1e-2, 0.3, SMALL_T, dtype=torch.float64)  # large βs so that the τ are not tiny


def unet_eps(unet, x, index):
    with torch.no_grad():
        return unet(x, torch.tensor([index] * x.shape[0])).sample


def residual_table(unet, x0, noise_table, alphas_cumprod):
    """r_s = f(x_s, s) − ε_s for s = 1..T, one network call per s (the brute-force loop). noise_table[s−1] = ε_s."""
    T = len(alphas_cumprod)
    r = []
    for s in range(1, T + 1):
        a = float(alphas_cumprod[s - 1])
        x_s = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise_table[s - 1]
        r.append(unet_eps(unet, x_s, s - 1) - noise_table[s - 1])
    return r


# --------------------------------------------------------------------------------------------------------------
# Theorem 1 weights

@pytest.mark.parametrize("schedule,T", [("linear", 1000), ("squaredcos_cap_v2", 1000), ("linear", SMALL_T)])
def test_weights_match_theorem_1(schedule, T):
    betas = SMALL_BETAS if T == SMALL_T else betas_for_schedule(T, beta_schedule=schedule)
    tau = sequence_aware_weights(betas)
    ref, _ = paper_tau(betas)
    assert tau.shape == (T,) and tau.dtype == torch.float64
    assert tau[0] == 0  # τ_1 = 0
    assert torch.isfinite(tau).all() and (tau[1:] > 0).all()
    assert torch.allclose(tau, torch.tensor(ref[1:], dtype=torch.float64), rtol=1e-10, atol=0)
    chain = tau_from_posterior_chain(betas[:200])  # the O(T²) product form; τ_i depends on β_1..β_i only
    assert torch.allclose(tau[:200], torch.tensor(chain[1:], dtype=torch.float64), rtol=1e-9, atol=0)


def test_uniform_weights_and_bad_input():
    betas = betas_for_schedule(50)
    assert torch.equal(sequence_aware_weights(betas, "uniform"), torch.ones(50, dtype=torch.float64))
    with pytest.raises(ValueError, match="weighting"):
        sequence_aware_weights(betas, "snr")
    with pytest.raises(ValueError, match="betas"):
        sequence_aware_weights(torch.tensor([0.0, 0.1]))
    with pytest.raises(ValueError, match="num_steps"):
        SequenceAwareLoss(betas, num_steps=0)
    with pytest.raises(ValueError, match="sa_lambda"):
        SequenceAwareLoss(betas, sa_lambda=-1)
    with pytest.raises(ValueError, match="window"):
        SequenceAwareLoss(betas, window="centered")


# --------------------------------------------------------------------------------------------------------------
# The loss against brute force

@pytest.fixture(scope="module")
def unet():
    return make_tiny_unet(seed=1)


def window_loss_paper(r, tau, t, K, T):
    """‖(1/K) Σ_{s=t}^{t+K−1} τ_s r_s‖² with out-of-range terms zero (paper eq. 10), summed over pixels."""
    acc = torch.zeros_like(r[0])
    for s in range(t, t + K):
        if 1 <= s <= T:
            acc = acc + tau[s] * r[s - 1]
    return (acc / K).pow(2).flatten(1).sum(1)


@pytest.mark.parametrize("weighting", ["uniform", "paper"])
@pytest.mark.parametrize("window", ["paper", "official"])
def test_loss_expectation_equals_paper_formula(unet, weighting, window):
    """Averaging our per-sample loss over every (window, position) draw, with probabilities 1/(T·K), gives exactly
    E_{s~U{1..T}}‖r_s‖² + λ·E_{t~U{1−K..T}}‖(1/K)Σ τ_s r_s‖² (paper window) or the official code's formula."""
    T, K, lam = SMALL_T, 3, 0.3
    loss = SequenceAwareLoss(SMALL_BETAS, num_steps=K, sa_lambda=lam, weighting=weighting, window=window,
                             reduction="sum")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    table = torch.randn(T, 2, 1, 8, 8, generator=g)  # ε_s shared by every window containing s
    tau_list, abar = paper_tau(SMALL_BETAS)
    tau = tau_list if weighting == "paper" else [None] + [1.0] * T
    r = residual_table(unet, x0, table, abar[1:])

    starts, positions = [], []
    for s in range(1, T + 1):
        for k in (range(K) if window == "paper" else [K - 1]):
            starts.append(s - k)
            positions.append(k)
    n = len(starts)
    starts, positions = torch.tensor(starts), torch.tensor(positions)
    x = x0.repeat(n, 1, 1, 1)  # row m*2 + b ↔ draw m, image b
    st, po = starts.repeat_interleave(2), positions.repeat_interleave(2)
    noise = torch.stack([torch.stack([table[(st[i] + j - 1).clamp(0, T - 1), i % 2] for i in range(len(st))])
                         for j in range(K)])
    with torch.no_grad():
        out = loss(unet, x, window_start=st, position=po, noise=noise)

    simple_ref = sum(r[s - 1].pow(2).flatten(1).sum(1) for s in range(1, T + 1)) / T
    if window == "paper":
        sa_ref = sum(window_loss_paper(r, tau, t, K, T) for t in range(1 - K, T + 1)) / (T + K)
    else:  # the official code: the window ends at s ~ U{1..T}
        sa_ref = sum(window_loss_paper(r, tau, s - K + 1, K, T) for s in range(1, T + 1)) / T
    simple = out.simple.reshape(n, 2).mean(0)
    sa = out.sa.reshape(n, 2).mean(0)
    assert torch.allclose(simple, simple_ref, rtol=1e-5)
    assert torch.allclose(sa, sa_ref.float(), rtol=1e-5, atol=1e-12)
    assert torch.allclose(out.loss.reshape(n, 2).mean(0), simple_ref + lam * sa_ref.float(), rtol=1e-5)


@pytest.mark.parametrize("window", ["paper", "official"])
def test_k1_is_tau_squared_weighted_simple_loss(unet, window):
    """K = 1: L = (1 + λ·c·τ_s²)·‖r_s‖² per sample, c = T/(T+1) for the paper's t ~ U{0..T} (t = 0 is empty)."""
    T, lam = SMALL_T, 2.0
    loss = SequenceAwareLoss(SMALL_BETAS, num_steps=1, sa_lambda=lam, weighting="paper", window=window)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    s = torch.tensor([1, 2, 7, 10])
    noise = torch.randn(1, 4, 1, 8, 8, generator=g)
    with torch.no_grad():
        out = loss(unet, x0, window_start=s, position=torch.zeros(4, dtype=torch.long), noise=noise)
    tau, abar = paper_tau(SMALL_BETAS)
    c = T / (T + 1) if window == "paper" else 1.0
    for b in range(4):
        a = abar[int(s[b])]
        x_s = math.sqrt(a) * x0[b:b + 1] + math.sqrt(1 - a) * noise[0, b:b + 1]
        mse = (unet_eps(unet, x_s, int(s[b]) - 1) - noise[0, b:b + 1]).pow(2).mean()
        assert torch.allclose(out.loss[b], (1 + lam * c * tau[int(s[b])] ** 2) * mse, rtol=1e-5)


def test_lambda_zero_is_diffusers_ddpm_loss(unet):
    """λ = 0 is the DDPM L_simple of diffusers' train_unconditional: add_noise at 0-based index s − 1, MSE on ε."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    loss = SequenceAwareLoss.from_scheduler_config(scheduler.config, num_steps=3, sa_lambda=0.0)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(5, 1, 8, 8, generator=g) * 2 - 1
    s = torch.tensor([1, 2, 500, 999, 1000])
    noise = torch.randn(3, 5, 1, 8, 8, generator=g)
    position = torch.tensor([0, 1, 2, 1, 0])
    with torch.no_grad():
        out = loss(unet, x0, window_start=s - position, position=position, noise=noise)
        eps = noise[position, torch.arange(5)]
        noisy = scheduler.add_noise(x0, eps, s - 1)
        ref = F.mse_loss(unet(noisy, s - 1).sample, eps, reduction="none").mean((1, 2, 3))
    assert torch.allclose(out.loss, ref, rtol=1e-5)
    assert torch.equal(out.sa, torch.zeros(5))


def test_stable_target_field_replaces_the_noise(unet):
    """With reference_images, ε_s becomes the STF ε̂ = (x_s − √ᾱ_s·T)/√(1−ᾱ_s), T = Σ_j w_j r_j with the VP kernel
    w_j ∝ exp(−‖x_s − √ᾱ_s r_j‖²/(2(1−ᾱ_s))), in both terms."""
    T, K = SMALL_T, 2
    loss = SequenceAwareLoss(SMALL_BETAS, num_steps=K, sa_lambda=1.0, reduction="sum")
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 1, 8, 8, generator=g) * 0.2 - 0.1  # two close images: non-trivial weights at every step
    refs = torch.cat([x0, torch.rand(3, 1, 8, 8, generator=g) * 0.2 - 0.1])
    start, position = torch.tensor([3, 9]), torch.tensor([1, 0])
    noise = torch.randn(K, 2, 1, 8, 8, generator=g)
    with torch.no_grad():
        out = loss(unet, x0, window_start=start, position=position, noise=noise, reference_images=refs)
    _, abar = paper_tau(SMALL_BETAS)
    for b in range(2):
        acc = torch.zeros(1, 1, 8, 8)
        for j in range(K):
            s = int(start[b]) + j
            if not 1 <= s <= T:
                continue
            a = abar[s]
            x_s = math.sqrt(a) * x0[b:b + 1] + math.sqrt(1 - a) * noise[j, b:b + 1]
            logits = torch.tensor([-float((x_s.double() - math.sqrt(a) * r.double()).pow(2).sum()) / (2 * (1 - a))
                                   for r in refs], dtype=torch.float64)
            target = (torch.softmax(logits, 0).reshape(-1, 1, 1, 1) * refs.double()).sum(0, keepdim=True)
            eps_hat = (x_s.double() - math.sqrt(a) * target) / math.sqrt(1 - a)
            r = unet_eps(unet, x_s, s - 1).double() - eps_hat
            acc = acc + r
            if j == int(position[b]):
                assert torch.allclose(out.simple[b].double(), r.pow(2).sum(), rtol=1e-4)
        sa = (T * K / ((T + K) * 2)) * (acc / K).pow(2).sum()  # both steps in range: n = 2
        assert torch.allclose(out.sa[b].double(), sa, rtol=1e-4)
        plain = loss(unet, x0, window_start=start, position=position, noise=noise)
        assert not torch.allclose(out.simple, plain.simple)  # the references change the targets


class CountingUNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet, self.batch_sizes = unet, []

    def forward(self, x, t, **kwargs):
        self.batch_sizes.append(x.shape[0])
        return self.unet(x, t, **kwargs)


def test_one_batched_forward_and_gradients_reach_the_unet():
    unet = make_tiny_unet(seed=3)
    counting = CountingUNet(unet)
    K, B = 4, 6
    loss = SequenceAwareLoss(betas_for_schedule(20), num_steps=K, sa_lambda=0.2)
    x0 = torch.rand(B, 1, 8, 8) * 2 - 1
    start = torch.tensor([-2, 1, 5, 17, 20, 10])  # windows cut at both ends: 1, 4, 4, 4, 1, 4 steps in range
    position = torch.tensor([3, 0, 2, 3, 0, 1])
    out = loss(counting, x0, window_start=start, position=position)
    assert counting.batch_sizes == [1 + 4 + 4 + 4 + 1 + 4]
    out.loss.mean().backward()
    grads = [p.grad for p in unet.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    counting.batch_sizes.clear()
    SequenceAwareLoss(betas_for_schedule(20), num_steps=K, sa_lambda=0.0)(counting, x0)
    assert counting.batch_sizes == [B]  # the baseline evaluates only the L_simple step


def test_noise_couplings():
    x0 = torch.zeros(3, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    shared = SequenceAwareLoss(betas_for_schedule(10), num_steps=3, noise="shared").draw_noise(x0, g)
    indep = SequenceAwareLoss(betas_for_schedule(10), num_steps=3, noise="independent").draw_noise(x0, g)
    assert shared.shape == indep.shape == (3, 3, 1, 4, 4)
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[0], shared[2])
    assert not torch.equal(indep[0], indep[1])
    corr = float((indep[0] * indep[1]).mean())  # independent draws: correlation ~ N(0, 1/48)
    assert abs(corr) < 0.6


def test_sampled_windows_are_unbiased_for_the_paper_range():
    """The window starts drawn by sample_windows, reweighted by window_weights, are uniform on {1−K..T}."""
    T, K, n = 6, 3, 200_000
    loss = SequenceAwareLoss(betas_for_schedule(T, 0.05, 0.3), num_steps=K)
    start, position = loss.sample_windows(n, generator=torch.Generator().manual_seed(0))
    s = start + position
    assert int(s.min()) == 1 and int(s.max()) == T
    w = loss.window_weights(start)
    for t in range(1 - K, T + 1):
        mass = float(w[start == t].sum()) / n
        assert abs(mass - 1 / (T + K)) < 0.004 if t > 1 - K else mass == 0.0


def test_official_windows_end_at_the_drawn_step_and_the_output_names_it():
    """``window="official"``: k = K − 1 (s is the window's last step). The output's ``timestep`` is s = t + k and its
    σ is σ_s of the table (1-based s: σ_s = √((1 − ᾱ_s)/ᾱ_s), ᾱ computed here); ``logs`` carries both terms' means."""
    T, K, B = 12, 3, 64
    betas = torch.linspace(0.02, 0.3, T, dtype=torch.float64)
    loss = SequenceAwareLoss(betas, num_steps=K, window="official")
    start, position = loss.sample_windows(B, generator=torch.Generator().manual_seed(0))
    assert position.dtype == torch.long and torch.equal(position, torch.full((B,), K - 1))
    abar = torch.cumprod(1 - betas, 0)
    x = torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    window_start, position = torch.tensor([1, 4, 7, 10]), torch.tensor([2, 0, 1, 2])
    out = loss(lambda x_, t: 0.5 * x_, x, window_start=window_start, position=position,
               generator=torch.Generator().manual_seed(2))
    s = window_start + position
    assert torch.equal(out.timestep, s)
    assert torch.allclose(out.sigma.double(), ((1 - abar[s - 1]) / abar[s - 1]).sqrt(), rtol=1e-6)
    assert set(out.logs) == {"loss_simple", "loss_sa"}
    assert torch.allclose(out.logs["loss_simple"], out.simple.mean()) and torch.allclose(out.logs["loss_sa"], out.sa.mean())


@pytest.mark.parametrize("window_start,position", [(1, 3), (1, -1), (10, 3), (0, 0), (12, 1)])
def test_explicit_windows_outside_the_schedule_are_refused(window_start, position):
    """The position k must lie in 0..K−1 and the L_simple step t + k in 1..T (T = 12, K = 3)."""
    loss = SequenceAwareLoss(torch.linspace(0.02, 0.3, 12, dtype=torch.float64), num_steps=3)
    with pytest.raises(ValueError, match="position|window_start"):
        loss(lambda x_, t: x_, torch.zeros(1, 1, 2, 2), window_start=torch.tensor([window_start]),
             position=torch.tensor([position]))


def test_betas_are_checked_and_kept_in_float64():
    """β from a python list keeps its float64 value (ᾱ and the weights too); β must be a 1-D table of length >= 2
    with 0 < β < 1 (T = 2 and β close to 1 are fine)."""
    betas = [0.0123456789, 0.2, 0.3]
    loss = SequenceAwareLoss(betas, num_steps=2)
    expected = torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)
    assert loss.alphas_cumprod.dtype == torch.float64 and torch.equal(loss.alphas_cumprod, expected)
    assert sequence_aware_weights(betas).dtype == torch.float64
    assert torch.equal(sequence_aware_weights(betas), sequence_aware_weights(torch.tensor(betas, dtype=torch.float64)))
    SequenceAwareLoss([0.1, 0.999], num_steps=2)
    for bad in ([0.1], [[0.1, 0.2], [0.2, 0.3]], [0.1, 1.0], [0.1, 1.5], [0.0, 0.1]):
        with pytest.raises(ValueError, match="betas|beta"):
            SequenceAwareLoss(bad, num_steps=1)
    with pytest.raises(ValueError, match="num_steps"):
        SequenceAwareLoss([0.1, 0.2], num_steps=3)
    SequenceAwareLoss([0.1, 0.2], num_steps=2)  # K = T


def test_from_scheduler_config_reads_every_schedule_setting():
    """T, β_start, β_end, the schedule and trained βs, from a config dict or an object with attributes."""
    from types import SimpleNamespace

    settings = dict(num_train_timesteps=30, beta_start=2e-4, beta_end=0.05, beta_schedule="scaled_linear")
    expected = torch.cumprod(1 - betas_for_schedule(30, 2e-4, 0.05, "scaled_linear"), 0)
    for config in (dict(settings), SimpleNamespace(**settings), DDPMScheduler(**settings).config):
        loss = SequenceAwareLoss.from_scheduler_config(config, num_steps=3)
        assert loss.num_steps == 3 and torch.allclose(loss.alphas_cumprod, expected, rtol=1e-12, atol=0)
    trained = torch.linspace(1e-3, 0.1, 20, dtype=torch.float64)
    for config in (dict(trained_betas=trained.tolist()), SimpleNamespace(trained_betas=trained.tolist())):
        loss = SequenceAwareLoss.from_scheduler_config(config)
        assert torch.equal(loss.alphas_cumprod, torch.cumprod(1 - trained, 0))
    defaults = SequenceAwareLoss.from_scheduler_config(SimpleNamespace())  # diffusers' DDPMScheduler defaults
    assert torch.allclose(defaults.alphas_cumprod, torch.cumprod(1 - betas_for_schedule(1000), 0), rtol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# Theorem 2 and the estimation gap

def ddpm_chain(eps_fn, x0, abar, betas, x_T, zs):
    """DDPM ancestral sampling x_{s−1} = μ(x_s, ε) + σ̃_s z (Ho et al. eq. 11, σ̃² = β̃) from x_T with given z."""
    b = [None] + [float(v) for v in betas]
    T = len(b) - 1
    xs, eps_list = {T: x_T}, {}
    for i, s in enumerate(range(T, 0, -1)):
        eps = eps_fn(xs[s], s)
        eps_list[s] = eps
        alpha = 1 - b[s]
        var = (1 - abar[s - 1]) / (1 - abar[s]) * b[s]
        mean = (xs[s] - b[s] / math.sqrt(1 - abar[s]) * eps) / math.sqrt(alpha)
        xs[s - 1] = mean + math.sqrt(var) * zs[i]
    return xs, eps_list


def test_estimation_gap_follows_theorem_1():
    """d̄ = x̂ − x of the diagnostic equals an independent DDPM transcription, and d̄_1 = −Σ_{s=2}^T τ_s r̂_s."""
    T = 20
    betas = torch.linspace(1e-3, 0.2, T, dtype=torch.float64)
    scheduler = DDPMScheduler(num_train_timesteps=T, beta_start=1e-3, beta_end=0.2, clip_sample=False)
    unet = make_tiny_unet(seed=4).double()
    g = torch.Generator().manual_seed(5)
    x0 = (torch.rand(3, 1, 8, 8, generator=g) * 2 - 1).double()
    eps_T = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    zs = torch.randn(T, 3, 1, 8, 8, generator=g, dtype=torch.float64)
    out = estimation_gap(unet, scheduler, x0, noise=eps_T, sampling_noise=zs, progress=False)
    assert out.timesteps.tolist() == list(range(T - 1, -2, -1))

    tau, abar = paper_tau(betas)
    x_T = math.sqrt(abar[T]) * x0 + math.sqrt(1 - abar[T]) * eps_T
    model, model_eps = ddpm_chain(lambda x, s: unet_eps(unet, x, s - 1), x0, abar, betas, x_T, zs)
    truth, _ = ddpm_chain(lambda x, s: (x - math.sqrt(abar[s]) * x0) / math.sqrt(1 - abar[s]), x0, abar, betas, x_T, zs)
    for k, s in enumerate(range(T, -1, -1)):  # state k of the diagnostic is x_s (paper time s)
        assert torch.allclose(out.gaps[k], model[s] - truth[s], atol=1e-5, rtol=1e-5), s
    r_hat = {s: model_eps[s] - (model[s] - math.sqrt(abar[s]) * x0) / math.sqrt(1 - abar[s]) for s in range(1, T + 1)}
    d1 = -sum(float(sequence_aware_weights(betas)[s - 1]) * r_hat[s] for s in range(2, T + 1))
    d1_paper = -sum(tau[s] * r_hat[s] for s in range(2, T + 1))
    assert torch.allclose(out.gaps[T - 1], d1, atol=1e-5, rtol=1e-5)
    assert torch.allclose(d1, d1_paper, rtol=1e-10, atol=0)


def test_oracle_model_has_no_gap_on_ddim_grids():
    """A model that knows x_0 predicts the true noise: the gap stays 0 for DDPM (η=1) and a 5-step DDIM grid (η=0)."""
    scheduler = DDPMScheduler(num_train_timesteps=100, clip_sample=False)
    abar = scheduler.alphas_cumprod.double()
    x0 = torch.rand(2, 1, 4, 4, dtype=torch.float64) * 2 - 1

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

        def forward(self, x, t):
            a = abar[t].reshape(-1, 1, 1, 1)
            return (x - a.sqrt() * x0) / (1 - a).sqrt()

    for eta, steps, start in [(1.0, None, None), (0.0, 5, None), (1.0, 10, 55)]:
        out = estimation_gap(Oracle(), scheduler, x0, num_inference_steps=steps, start_timestep=start, eta=eta,
                             generator=torch.Generator().manual_seed(0), progress=False)
        assert float(out.gap_norm.max()) < 1e-9
    assert out.timesteps.tolist() == [50, 40, 30, 20, 10, 0, -1]


@pytest.mark.parametrize("K", [2, 3])
def test_theorem_2_bounds(unet, K):
    """(T−1)/(T+K)·L^τ_simple ≥ L_sa ≥ L_θ/(T+K)² for an untrained (random) noise predictor, small T.

    L_sa is our loss's exact expectation over windows (enumerated, paper weights and window), L^τ_simple the
    τ²-weighted simple loss E_{s~U{2..T}} τ_s²‖r_s‖², and L_θ = ‖Σ τ_s r_s‖² on the same residuals r_s at the
    ground-truth x_s ~ q(x_s | x_0), per realisation as in the proof. (Along a sampling chain the residuals are taken
    at the model's own x̂_s instead; for an untrained model those drift far off and E‖d̄_1‖² is not bounded this way.)
    """
    T = SMALL_T
    tau, abar = paper_tau(SMALL_BETAS)
    loss = SequenceAwareLoss(SMALL_BETAS, num_steps=K, sa_lambda=1.0, weighting="paper", reduction="sum")
    g = torch.Generator().manual_seed(7)
    B = 4
    x0 = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    table = torch.randn(T, B, 1, 8, 8, generator=g)
    r = residual_table(unet, x0, table, abar[1:])

    pairs = [(s - k, k) for s in range(1, T + 1) for k in range(K)]
    st = torch.tensor([p[0] for p in pairs]).repeat_interleave(B)
    po = torch.tensor([p[1] for p in pairs]).repeat_interleave(B)
    rows = torch.arange(len(st)) % B
    noise = torch.stack([table[(st + j - 1).clamp(0, T - 1), rows] for j in range(K)])
    with torch.no_grad():
        l_sa = loss(unet, x0.repeat(len(pairs), 1, 1, 1), window_start=st, position=po, noise=noise).sa
    l_sa = l_sa.reshape(len(pairs), B).mean(0)

    l_tau_simple = sum(tau[s] ** 2 * r[s - 1].pow(2).flatten(1).sum(1) for s in range(2, T + 1)) / (T - 1)
    l_theta = sum(tau[s] * r[s - 1] for s in range(2, T + 1)).pow(2).flatten(1).sum(1)
    assert (l_sa <= (T - 1) / (T + K) * l_tau_simple * (1 + 1e-5)).all()
    assert (l_sa >= l_theta / (T + K) ** 2 * (1 - 1e-5)).all()
    assert (l_sa < (T - 1) / (T + K) * l_tau_simple).any()  # the bounds are not both equalities



# --------------------------------------------------------------------------------------------------------------
# The training script end to end

def train_tiny_ddpm(out_dir: str, *flags: str):
    """examples/train_sequence_aware.py on a 8→16-channel UNet for a few steps, with ``flags`` added."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import train_sequence_aware

    train_sequence_aware.main([
        "--output_dir", out_dir, "--block_out_channels", "8,16", "--norm_num_groups", "4",
        "--num_validation_images", "2", "--num_inference_steps", "2", "--checkpointing_steps", "0",
        "--validation_steps", "0", "--no_progress_bar", *flags,
    ])


def test_tiny_training_run_writes_a_ddpm_pipeline(tmp_path):
    from diffusers import DDPMPipeline

    from diffusers_stf import EDMHeunScheduler, EDMPipeline
    from diffusers_stf.training import read_metrics

    out_dir = str(tmp_path / "sa")
    train_tiny_ddpm(out_dir, "--max_train_steps", "4", "--train_batch_size", "16", "--logging_steps", "2",
                    "--sa_k", "3", "--sa_lambda", "0.3", "--beta_schedule", "cosine", "--num_train_timesteps", "100")
    rows = read_metrics(os.path.join(out_dir, "logs"))
    assert rows and all(r["loss_sa"] > 0 and r["loss_simple"] > 0 for r in rows)
    assert os.path.isfile(os.path.join(out_dir, "samples.png"))
    assert "DDPMPipeline" in open(os.path.join(out_dir, "README.md")).read()

    ddpm = DDPMPipeline.from_pretrained(out_dir)  # diffusers alone loads it
    assert ddpm.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert ddpm.scheduler.config.num_train_timesteps == 100
    g = torch.Generator().manual_seed(0)
    images = ddpm(batch_size=2, num_inference_steps=5, generator=g, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and torch.isfinite(torch.as_tensor(images)).all()

    scheduler = EDMHeunScheduler.from_config(ddpm.scheduler.config, preconditioning="ddpm")
    edm = EDMPipeline(unet=ddpm.unet, scheduler=scheduler)
    samples = edm(batch_size=2, num_inference_steps=3, generator=g, output_type="pt").images
    assert samples.shape == (2, 1, 8, 8) and torch.isfinite(samples).all()


# --------------------------------------------------------------------------------------------------------------
# x₀- and v-prediction (diffusers' --prediction_type), checked on Gaussian data where the optimum is closed-form

GAUSS_MEAN, GAUSS_STD = 0.3, 0.5


class ExactGaussianPredictor(torch.nn.Module):
    """The MMSE predictor of ε, x₀ or v for data x₀ ~ N(μ, s²) per pixel: with x_t = a·x₀ + b·ε (a² = ᾱ_t,
    b² = 1 − ᾱ_t), E[x₀|x_t] = μ + a·s²/(a²s² + b²)·(x_t − aμ), E[ε|x_t] = b/(a²s² + b²)·(x_t − aμ) and
    E[v|x_t] = a·E[ε|x_t] − b·E[x₀|x_t]."""

    def __init__(self, alphas_cumprod, prediction_type):
        super().__init__()
        self.abar, self.prediction_type = alphas_cumprod, prediction_type

    def forward(self, x, index):
        abar = self.abar[index].reshape(-1, *([1] * (x.ndim - 1)))
        a, b, mu, s2 = abar.sqrt(), (1 - abar).sqrt(), GAUSS_MEAN, GAUSS_STD**2
        centred = x.double() - a * mu
        eps = b / (a**2 * s2 + b**2) * centred
        x0 = mu + a * s2 / (a**2 * s2 + b**2) * centred
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - b * x0}[self.prediction_type]
        return out.float()


def gaussian_setup(T=100):
    betas = betas_for_schedule(T, 1e-4, 2e-2, "linear")
    return betas, torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_epsilon_from_prediction_of_an_exact_predictor_is_the_posterior_noise(prediction_type):
    from diffusers_stf.losses.sequence_aware import epsilon_from_prediction
    from diffusers_stf.preconditioning import DDPMPreconditioning

    betas, abar_table = gaussian_setup()
    g = torch.Generator().manual_seed(0)
    index = torch.tensor([0, 10, 50, 99])
    abar = abar_table[index].reshape(-1, 1, 1, 1)
    x_t = (abar.sqrt() * (GAUSS_MEAN + GAUSS_STD * torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64))
           + (1 - abar).sqrt() * torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)).float()
    eps_true = ExactGaussianPredictor(abar_table, "epsilon")(x_t, index)
    output = ExactGaussianPredictor(abar_table, prediction_type)(x_t, index)
    sigma = ((1 - abar) / abar).sqrt().flatten()  # EDM coordinates: x = x_t/√ᾱ = x_0 + σ·ε
    eps_hat = epsilon_from_prediction(output, x_t / abar.sqrt(), sigma, DDPMPreconditioning(betas, prediction_type))
    assert torch.allclose(eps_hat, eps_true, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_exact_predictor_sits_at_the_analytic_minimum(prediction_type):
    """E[L_simple] of the MMSE predictor is the posterior variance of the target: a²s²/(a²s²+b²) for ε, the same
    for the SNR-weighted x₀ loss (SNR·s²b²/(a²s²+b²)), and s²/(a²s²+b²) for v (v − E[v|x_t] = (ε − E[ε|x_t])/a).
    E[L_sa] (K = 2, uniform τ) is ¼ Σ_{j,k} Cov(r_j, r_k) of the ε-residuals r_s = c_s a_s (x₀ − μ) + (c_s b_s − 1) ε_s,
    c_s = b_s/(a_s²s² + b_s²), the same for every parametrisation."""
    betas, abar_table = gaussian_setup()
    loss = SequenceAwareLoss(betas, num_steps=2, sa_lambda=1.0, window="official", reduction="mean",
                             prediction_type=prediction_type)
    B, t = 20000, 30  # window {t, t+1} (1-based), L_simple at s = t + 1
    g = torch.Generator().manual_seed(1)
    x0 = GAUSS_MEAN + GAUSS_STD * torch.randn(B, 1, 2, 2, generator=g)
    window_start, position = torch.full((B,), t), torch.ones(B, dtype=torch.long)
    with torch.no_grad():
        out = loss(ExactGaussianPredictor(abar_table, prediction_type), x0, window_start=window_start,
                   position=position, generator=g)
    s2 = GAUSS_STD**2
    a2 = abar_table[[t - 1, t]]  # ᾱ_t, ᾱ_{t+1}
    a, b = a2.sqrt(), (1 - a2).sqrt()
    var_eps = a2[1] * s2 / (a2[1] * s2 + b[1] ** 2)
    expected_simple = var_eps / a2[1] if prediction_type == "v_prediction" else var_eps
    c = b / (a2 * s2 + b**2)
    cov = torch.outer(c * a, c * a) * s2 + torch.diag((c * b - 1) ** 2)
    expected_sa = cov.sum() / 4
    assert abs(out.simple.mean().item() / float(expected_simple) - 1) < 0.03
    assert abs(out.sa.mean().item() / float(expected_sa) - 1) < 0.03
    # a predictor moved off the optimum scores worse
    shifted = ExactGaussianPredictor(abar_table, prediction_type)
    with torch.no_grad():
        worse = loss(lambda x, i: shifted(x, i) + 0.1, x0, window_start=window_start, position=position,
                     generator=torch.Generator().manual_seed(1))
    assert worse.simple.mean() > out.simple.mean()


def test_parametrisations_share_the_epsilon_residuals():
    """Same draws: L_sa is identical for the three exact predictors (their ε̂ coincide); the SNR-weighted x₀ loss
    equals the ε loss (SNR·(x̂₀ − x₀)² = (ε̂ − ε)²) and the v loss is the ε loss over ᾱ_s (ε̂ − ε = √ᾱ·(v̂ − v))."""
    betas, abar_table = gaussian_setup()
    g = torch.Generator().manual_seed(3)
    x0 = GAUSS_MEAN + GAUSS_STD * torch.randn(6, 1, 2, 2, generator=g)
    window_start, position = torch.tensor([-1, 5, 40, 60, 98, 99]), torch.tensor([2, 0, 1, 2, 1, 0])
    noise = torch.randn(3, 6, 1, 2, 2, generator=g)
    outs = {}
    for p in ("epsilon", "sample", "v_prediction"):
        loss = SequenceAwareLoss(betas, num_steps=3, sa_lambda=0.5, window="paper", prediction_type=p)
        with torch.no_grad():
            outs[p] = loss(ExactGaussianPredictor(abar_table, p), x0, window_start=window_start, position=position,
                           noise=noise)
    eps = outs["epsilon"]
    abar_s = abar_table[window_start + position - 1].float()
    for p in ("sample", "v_prediction"):
        assert torch.allclose(outs[p].sa, eps.sa, rtol=1e-3, atol=1e-6)
    assert torch.allclose(outs["sample"].simple, eps.simple, rtol=1e-3, atol=1e-6)
    assert torch.allclose(outs["v_prediction"].simple, eps.simple / abar_s, rtol=1e-3, atol=1e-6)


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        SequenceAwareLoss(gaussian_setup()[0], prediction_type="x0")


def test_v_prediction_run_writes_a_v_prediction_pipeline(tmp_path):
    from diffusers import DDPMPipeline

    from diffusers_stf import EDMHeunScheduler
    from diffusers_stf.training import read_metrics

    out_dir = str(tmp_path / "sa_v")
    train_tiny_ddpm(out_dir, "--max_train_steps", "2", "--train_batch_size", "8", "--logging_steps", "1",
                    "--num_train_timesteps", "50", "--prediction_type", "v_prediction")
    rows = read_metrics(os.path.join(out_dir, "logs"))
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    ddpm = DDPMPipeline.from_pretrained(out_dir)
    assert ddpm.scheduler.config.prediction_type == "v_prediction"
    edm = EDMHeunScheduler.from_config(ddpm.scheduler.config, preconditioning="ddpm")
    assert edm.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="--prediction_type must be one of"):
        train_tiny_ddpm(str(tmp_path / "bad"), "--prediction_type", "x0")
