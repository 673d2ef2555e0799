"""Stable Target Field targets and the EDM/VE/DDPM losses, checked against brute-force formulas and closed forms."""

import itertools
import math

import pytest
import torch

from diffusers_stf.losses import (
    DDPMEpsilonLoss,
    DDPMStableTargetFieldLoss,
    EDMLoss,
    StableTargetFieldLoss,
    VELoss,
    VPLoss,
    stable_target_epsilon,
    stable_target_field,
)


def brute_force_target(x, sigma, refs):
    """T_i = Σ_j softmax_j(−‖x_i − r_j‖²/(2σ_i²)) r_j with explicit differences, float64."""
    x, refs = x.double().flatten(1), refs.double().flatten(1)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(len(x), 1)
    d2 = ((x[:, None, :] - refs[None, :, :]) ** 2).sum(-1)
    return torch.softmax(-d2 / (2 * sigma**2), dim=1) @ refs


pytestmark = pytest.mark.usefixtures("one_thread")


def test_matches_brute_force_float64_over_sigmas_and_chunks():
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(37, 3, 2, 2, generator=g, dtype=torch.float64)
    y = refs[:6]
    sigma = torch.tensor([0.002, 0.03, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)
    x = y + sigma[:, None, None, None] * torch.randn(y.shape, generator=g, dtype=torch.float64)
    expected = brute_force_target(x, sigma, refs)
    for chunk in (None, 1, 5, 37, 100):
        got = stable_target_field(x, sigma, refs, chunk_size=chunk)
        assert got.shape == x.shape and got.dtype == torch.float64
        torch.testing.assert_close(got.flatten(1), expected, rtol=0, atol=1e-12)
    got32 = stable_target_field(x.float(), sigma.float(), refs.float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double().flatten(1), expected, rtol=0, atol=1e-6)


def test_small_sigma_near_duplicates_in_float32_at_cifar_size():
    # ‖a‖²+‖b‖²−2ab in float32 has an absolute error ~1e-7·‖a‖² ≈ 3e-4 at D = 3072; divided by 2σ² = 8e-6 it would
    # scramble the weights between an image and a near-duplicate at distance ~σ. The float64 logits must not.
    g = torch.Generator().manual_seed(1)
    d = 3 * 32 * 32
    base = torch.rand(4, d, generator=g) * 2 - 1
    near = base + 0.002 * torch.randn(4, d, generator=g) / math.sqrt(d)
    refs = torch.cat([base, near, torch.rand(56, d, generator=g) * 2 - 1])
    sigma = torch.full((4,), 0.002)
    x = base + sigma[:, None] * torch.randn(4, d, generator=g)
    expected = brute_force_target(x, sigma, refs)
    weights_self = torch.softmax(-((x.double()[:, None] - refs.double()[None]) ** 2).sum(-1) / (2 * 0.002**2), 1)
    assert 0.05 < float(weights_self[:, :4].diagonal().min()) < 0.95  # the near-duplicates really compete
    torch.testing.assert_close(stable_target_field(x, sigma, refs).double(), expected, rtol=0, atol=1e-6)


def test_invariant_to_reference_order():
    g = torch.Generator().manual_seed(2)
    refs = torch.randn(50, 10, generator=g, dtype=torch.float64)
    x = refs[:5] + 0.7 * torch.randn(5, 10, generator=g, dtype=torch.float64)
    perm = torch.randperm(50, generator=g)
    torch.testing.assert_close(stable_target_field(x, 0.7, refs), stable_target_field(x, 0.7, refs[perm]),
                               rtol=0, atol=1e-13)


def test_limits_small_and_large_sigma_and_self_only():
    g = torch.Generator().manual_seed(3)
    refs = torch.rand(30, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    y = refs[:4]
    # σ → 0 with the image in the reference set: the target is the clean image.
    x = y + 1e-4 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(stable_target_field(x, 1e-4, refs), y, rtol=0, atol=1e-10)
    # σ → ∞: the target is the mean of the references.
    x = y + 1e7 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    mean = refs.mean(0, keepdim=True).expand_as(y)
    torch.testing.assert_close(stable_target_field(x, 1e7, refs), mean, rtol=0, atol=1e-6)
    # R = 1 (self only): denoising score matching, the target is y at every σ.
    for sigma in (0.002, 1.0, 80.0):
        x = y[:1] + sigma * torch.randn(y[:1].shape, generator=g, dtype=torch.float64)
        torch.testing.assert_close(stable_target_field(x, sigma, y[:1]), y[:1], rtol=0, atol=1e-12)


# A known finite dataset: 8 points in 2-D in four pairs. With a uniform prior over it the posterior is
# p(y_n | x) ∝ exp(−‖x − y_n‖²/(2σ²)) and the true denoiser is E[y | x] = Σ_n p(y_n | x) y_n.
DATA = torch.tensor([[0, 0], [0.3, 0], [2, 0], [2, 0.4], [0, 2], [0.2, 2.2], [2, 2], [2.5, 2]], dtype=torch.float64)
POINTS = [torch.tensor(v, dtype=torch.float64) for v in ([1.0, 1.0], [0.5, 0.2], [1.8, 1.0])]


def posterior(x, sigma):
    w = torch.softmax(-((x[None] - DATA) ** 2).sum(1) / (2 * sigma**2), 0)
    return w, w @ DATA


def expected_target_given_self(x, sigma, i, R):
    """E over the R − 1 other references (uniform subsets of the rest of the dataset) of the STF target."""
    others = [j for j in range(len(DATA)) if j != i]
    subsets = list(itertools.combinations(others, R - 1))
    return sum(stable_target_field(x[None], sigma, DATA[[i, *s]])[0] for s in subsets) / len(subsets)


def test_bias_given_the_clean_image_shrinks_with_R_and_vanishes_with_the_whole_dataset():
    sigma, n = 1.0, len(DATA)
    rms_bias = []
    for R in range(1, n + 1):
        sq = 0.0
        for x in POINTS:
            w, mean = posterior(x, sigma)
            sq += sum(float(w[i]) * float((expected_target_given_self(x, sigma, i, R) - mean).norm()) ** 2
                      for i in range(n))
        rms_bias.append(math.sqrt(sq / len(POINTS)))
    assert all(a > b for a, b in zip(rms_bias, rms_bias[1:])), rms_bias
    assert rms_bias[-1] < 1e-12 and rms_bias[0] > 0.5


def test_regression_function_is_the_posterior_mean_for_every_R():
    # Averaging also over the clean image y ~ p(y | x) (the training distribution of pairs), the STF target's
    # conditional mean is exactly E[y | x]: the minimiser of the STF objective is the true denoiser.
    sigma = 0.7
    for R in (1, 2, 4, 8):
        for x in POINTS:
            w, mean = posterior(x, sigma)
            avg = sum(w[i] * expected_target_given_self(x, sigma, i, R) for i in range(len(DATA)))
            torch.testing.assert_close(avg, mean, rtol=0, atol=1e-12)


def test_target_covariance_much_smaller_than_dsm_at_intermediate_sigma():
    # The paper's central claim: at intermediate σ, where several modes explain x, the STF targets vary far less
    # than the DSM target y (whose covariance given x is the posterior covariance).
    g = torch.Generator().manual_seed(4)
    centers = torch.randn(4, 8, generator=g, dtype=torch.float64) * 2
    data = centers.repeat_interleave(16, 0) + 0.3 * torch.randn(64, 8, generator=g, dtype=torch.float64)
    sigma, R, draws = 2.0, 16, 300
    x = 0.5 * (centers[0] + centers[1])  # between modes
    w = torch.softmax(-((x[None] - data) ** 2).sum(1) / (2 * sigma**2), 0)
    selves = torch.multinomial(w, draws, replacement=True, generator=g)
    targets = []
    for i in selves.tolist():
        others = torch.tensor([j for j in range(64) if j != i])
        refs = torch.cat([data[i:i + 1], data[others[torch.randperm(63, generator=g)[:R - 1]]]])
        targets.append(stable_target_field(x[None], sigma, refs)[0])
    tr_stf = torch.stack(targets).var(0).sum()
    tr_dsm = ((data - w @ data) ** 2 * w[:, None]).sum()  # exact posterior covariance trace
    assert tr_dsm > 5.0  # several modes explain x
    # about the 1/(R − 1) factor of the paper's analysis (measured: ≈ 0.04 here)
    assert tr_stf < 2 / (R - 1) * tr_dsm


def test_vp_epsilon_target_matches_vp_kernel_formula():
    g = torch.Generator().manual_seed(5)
    refs = torch.randn(20, 6, generator=g, dtype=torch.float64)
    y, eps = refs[:4], torch.randn(4, 6, generator=g, dtype=torch.float64)
    abar = torch.tensor([0.9999, 0.9, 0.3, 4e-5], dtype=torch.float64)
    x_t = abar.sqrt()[:, None] * y + (1 - abar).sqrt()[:, None] * eps
    logits = -((x_t[:, None] - abar.sqrt()[:, None, None] * refs[None]) ** 2).sum(-1) / (2 * (1 - abar)[:, None])
    expected = (x_t - abar.sqrt()[:, None] * (torch.softmax(logits, 1) @ refs)) / (1 - abar).sqrt()[:, None]
    torch.testing.assert_close(stable_target_epsilon(x_t, abar, refs), expected, rtol=1e-9, atol=1e-9)
    # R = 1: the implied noise is the noise that was drawn.
    for i in range(4):
        torch.testing.assert_close(stable_target_epsilon(x_t[i:i + 1], abar[i], y[i:i + 1]), eps[i:i + 1],
                                   rtol=0, atol=1e-7)


def test_edm_loss_is_one_per_element_for_the_optimal_denoiser_of_gaussian_data():
    # For y ~ N(μ, σ_d² I) the ideal denoiser is μ + σ_d²/(σ_d²+σ²)·(x − μ) and E[(D* − y)²] = σ_d²σ²/(σ_d²+σ²); EDM's
    # weight λ(σ) = (σ²+σ_d²)/(σ·σ_d)² makes the expected loss exactly 1 at every σ. μ ≠ 0, so a loss that noises or
    # compares anything but y itself (a sign, a dropped offset) cannot pass by the symmetry of zero-mean data.
    mu = 0.3
    g = torch.Generator().manual_seed(6)
    loss = EDMLoss(sigma_data=0.5)
    y = mu + 0.5 * torch.randn(4000, 1, 4, 4, generator=g, dtype=torch.float64)

    def ideal(x, sigma, class_labels=None):
        s = sigma.reshape(-1, 1, 1, 1).double()
        return mu + 0.25 / (0.25 + s**2) * (x - mu)

    per_pixel = EDMLoss(sigma_data=0.5, reduction="mean")(ideal, y, generator=g).loss
    # given σ, each element of λ·(D* − y)² is a χ²₁ variable: the mean of 64000 has a standard error of 0.0056
    assert abs(per_pixel.mean().item() - 1.0) < 0.025
    # sample by sample, with σ and n given: λ(σ)·mean((D*(y + σn) − y)²), computed here
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(4000, generator=g, dtype=torch.float64))
    n = torch.randn(y.shape, generator=g, dtype=torch.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    expected = ((s**2 + 0.25) / (s * 0.5) ** 2 * (ideal(y + s * n, sigma) - y) ** 2).mean((1, 2, 3))
    given = EDMLoss(sigma_data=0.5, reduction="mean")(ideal, y, sigma=sigma, noise=n).loss
    torch.testing.assert_close(given, expected, rtol=2e-6, atol=0)  # σ enters the loss in float32
    # ln σ ~ N(P_mean, P_std²): σ is exp(−1.2 + 1.2·z) for the generator's standard normal z
    drawn = loss.sample_sigma(20000, torch.Generator().manual_seed(7))
    z = torch.randn(20000, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(drawn, (z * 1.2 - 1.2).exp(), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.weight(torch.tensor([0.5])), torch.tensor([8.0]))


def test_ve_loss_sigma_range_and_weight():
    loss = VELoss(0.02, 100.0)
    sigma = loss.sample_sigma(20000, torch.Generator().manual_seed(8))
    u = (sigma.log() - math.log(0.02)) / math.log(100 / 0.02)
    assert 0 <= u.min() and u.max() <= 1 and abs(u.mean().item() - 0.5) < 0.01
    torch.testing.assert_close(loss.weight(torch.tensor([0.5, 2.0])), torch.tensor([4.0, 0.25]))


def test_stf_loss_regresses_onto_the_stable_target():
    g = torch.Generator().manual_seed(9)
    images = torch.rand(3, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    extra = torch.rand(9, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    seen = {}

    def zero_denoiser(x, sigma, class_labels=None):
        seen["x"], seen["sigma"] = x, sigma
        return torch.zeros_like(x)

    for base in (EDMLoss(), VPLoss(), VELoss()):
        loss = StableTargetFieldLoss(base, reference_batch_size=12)
        per_sample = loss(zero_denoiser, images, extra, generator=g).loss
        target = brute_force_target(seen["x"], seen["sigma"], torch.cat([images, extra])).reshape(images.shape)
        weight = base.weight(seen["sigma"].double()).reshape(-1, 1, 1, 1)
        torch.testing.assert_close(per_sample, (weight * target**2).flatten(1).sum(1), rtol=1e-6, atol=1e-9)


def test_reference_batch_smaller_than_batch_is_refused():
    loss = StableTargetFieldLoss(reference_batch_size=8)
    with pytest.raises(ValueError, match="reference batch size R=8 must be >= the per-process batch size B=16"):
        loss(lambda x, s, class_labels=None: x, torch.zeros(16, 1, 2, 2), None)
    with pytest.raises(ValueError, match="reference_batch_size"):
        StableTargetFieldLoss(reference_batch_size=0)


def test_ddpm_stf_loss_with_self_only_reference_is_the_epsilon_loss():
    g = torch.Generator().manual_seed(10)
    loss = DDPMStableTargetFieldLoss(reference_batch_size=1)
    y = torch.rand(1, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    seen = {}

    def zero_model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    per_sample = loss(zero_model, y, None, generator=g).loss
    abar = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64), 0)[seen["t"]]
    eps = (seen["x_t"] - abar.sqrt() * y) / (1 - abar).sqrt()
    torch.testing.assert_close(per_sample, (eps**2).flatten(1).mean(1), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss.base_loss.sigma(seen["t"]), ((1 - abar) / abar).sqrt())


def test_ddpm_stf_loss_regresses_onto_the_vp_kernel_epsilon():
    # STF over the DDPM ε form with R > 1: the target is ε̂ = (x_t − √ᾱ·Σ_j w_j r_j)/√(1 − ᾱ), with w_j the softmax of
    # the VP kernel log N(x_t; √ᾱ·r_j, (1 − ᾱ)·I), transcribed here in float64.
    g = torch.Generator().manual_seed(11)
    images = torch.rand(3, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    extra = torch.rand(5, 1, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    refs = torch.cat([images, extra]).flatten(1)
    loss = StableTargetFieldLoss(DDPMEpsilonLoss(), reference_batch_size=8)
    seen = {}

    def zero_model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)

    per_sample = loss(zero_model, images, extra, timesteps=torch.tensor([5, 300, 900]), generator=g).loss
    abar = torch.cumprod(1 - torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64), 0)[seen["t"]][:, None]
    x_t = seen["x_t"].flatten(1)
    logits = -((x_t[:, None] - abar.sqrt()[:, :, None] * refs[None]) ** 2).sum(-1) / (2 * (1 - abar))
    eps = (x_t - abar.sqrt() * (torch.softmax(logits, 1) @ refs)) / (1 - abar).sqrt()
    torch.testing.assert_close(per_sample, (eps**2).mean(1), rtol=1e-6, atol=1e-9)
