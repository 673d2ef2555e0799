"""Discriminator Guidance (Kim et al., ICML 2023): the discriminator, its losses and the guided EDM pipeline.

Everything is checked against math written here: the paper's VP-time formulas, an autograd computation in the
paper's coordinates, closed-form Gaussian-mixture denoisers and density ratios, and the EDM pipeline itself."""

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from diffusers_stf import (
    Discriminator,
    DiscriminatorGuidedPipeline,
    EDMHeunScheduler,
    EDMPipeline,
    EDMStochasticScheduler,
)
from diffusers_stf.losses import (
    DiscriminatorBCELoss,
    DiscriminatorLSIFLoss,
    DiscriminatorUKLLoss,
    sample_sigma_log_uniform,
)
from diffusers_stf.guidance import DiscriminatorGuidance, discriminator_correction


pytestmark = pytest.mark.usefixtures("one_thread")


# The paper's VP SDE (DG classifier_lib.vpsde): β(τ) = β0 + (β1 − β0)·τ.
BETA0, BETA1 = 0.1, 20.0


def paper_tau(sigma):
    """τ(σ) of DG's vpsde.compute_tau."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return (-BETA0 + torch.sqrt(BETA0**2 + 2 * (BETA1 - BETA0) * torch.log(1 + sigma**2))) / (BETA1 - BETA0)


def paper_mean_vp(tau):
    """mean_vp(τ) = exp(−¼τ²(β1 − β0) − ½τβ0), DG's vpsde.marginal_prob scale."""
    return torch.exp(-0.25 * tau**2 * (BETA1 - BETA0) - 0.5 * tau * BETA0)


def paper_sigma(tau):
    """σ(τ) = √(e^{∫β} − 1), the VE noise level of VP time τ."""
    tau = torch.as_tensor(tau, dtype=torch.float64)
    return torch.sqrt(torch.exp(0.5 * (BETA1 - BETA0) * tau**2 + BETA0 * tau) - 1)


def make_disc(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    config.update(kwargs)
    return Discriminator(**config)


def make_pipe(discriminator=None, scheduler=None, seed=0):
    pipe = DiscriminatorGuidedPipeline(make_tiny_unet(seed), scheduler or EDMHeunScheduler(), discriminator)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class SigmaRecorder:
    """Records σ of every discriminator call (forward pre-hook)."""

    def __init__(self, disc):
        self.sigmas = []
        disc.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        sigma = args[1] if len(args) > 1 else kwargs["sigma"]
        self.sigmas.append(torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).clone())


# ---------------------------------------------------------------------------------------------------------------
# σ ↔ VP-time translation and the correction term


def test_library_vp_time_has_the_papers_sample_values():
    """The package's σ ↔ VP-time maps (the ``vp`` preconditioning the Discriminator uses, DGDiscriminator's τ and √ᾱ,
    and DG's guidance window) give DG's sample values of τ(σ) (reference notes §3(a)) and the formulas written here
    from DG's ``vpsde``; √ᾱ(τ(σ)) = 1/√(1 + σ²) and σ(τ(σ)) = σ."""
    from diffusers_stf.guidance import DG_GUIDANCE_SIGMA_MAX, DG_GUIDANCE_SIGMA_MIN
    from diffusers_stf.models.dg_discriminator import vp_mean, vp_time
    from diffusers_stf.noise_schedules import vp_sigma
    from diffusers_stf.preconditioning import VPPreconditioning

    sigmas = torch.tensor([80.0, 1.0, 0.1, 0.002], dtype=torch.float64)
    published = torch.tensor([0.9335, 0.259, 0.027, 4e-5], dtype=torch.float64)  # 2 to 4 significant digits
    precond = VPPreconditioning(beta_d=BETA1 - BETA0, beta_min=BETA0)
    for tau in (vp_time(sigmas), precond.sigma_inv(sigmas), precond.c_noise(sigmas) / 999):
        assert torch.allclose(tau, published, rtol=2e-2)
        assert torch.allclose(tau, paper_tau(sigmas), rtol=1e-9, atol=0)  # log1p against log: 3e-11 at σ = 0.002
    assert torch.allclose(vp_mean(vp_time(sigmas)), 1 / torch.sqrt(1 + sigmas**2), rtol=1e-12)
    assert torch.allclose(vp_mean(paper_tau(sigmas)), paper_mean_vp(paper_tau(sigmas)), rtol=1e-12)
    assert torch.allclose(precond.c_in(sigmas), 1 / torch.sqrt(1 + sigmas**2), rtol=1e-12)
    assert torch.allclose(vp_sigma(vp_time(sigmas)), sigmas, rtol=1e-9)
    assert torch.allclose(vp_sigma(paper_tau(sigmas)), paper_sigma(paper_tau(sigmas)), rtol=1e-12)
    # DG guides for τ ∈ [0.01, 1]: σ ∈ [σ(0.01), σ(1)] ≈ [0.0447, 152.2]
    assert math.isclose(DG_GUIDANCE_SIGMA_MIN, float(paper_sigma(0.01)), rel_tol=1e-12)
    assert math.isclose(DG_GUIDANCE_SIGMA_MAX, float(paper_sigma(1.0)), rel_tol=1e-12)
    assert abs(DG_GUIDANCE_SIGMA_MIN - 0.0447) < 1e-4 and abs(DG_GUIDANCE_SIGMA_MAX - 152.167) < 1e-3


def test_discriminator_sees_vp_scaled_input_at_999_tau():
    """With the default ``vp`` preconditioning the network gets x·mean_vp(τ) at noise label 999·τ (DG)."""
    disc = make_disc()
    seen = {}
    disc.head.register_forward_pre_hook(lambda m, args: seen.update(h=args[0].detach(), label=args[1].detach()))
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([80.0, 3.0, 0.3, 0.01], dtype=torch.float64)
    disc(x, sigma)
    tau = paper_tau(sigma)
    assert torch.allclose(seen["label"].double(), 999 * tau, rtol=1e-5)
    expected = (x * paper_mean_vp(tau).reshape(-1, 1, 1, 1)).float()
    assert torch.allclose(seen["h"], expected, rtol=1e-5, atol=1e-7)


def test_correction_matches_autograd_in_paper_coordinates():
    """σ²·∇_x log r equals DG's −(σ²·mean_vp)·∇_{x_vp} log(d/(1−d)) with d = sigmoid clipped to [1e-5, 1−1e-5],
    computed here by autograd on the head in VP coordinates; clipped samples get exactly zero."""
    disc = make_disc(seed=1).double()
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.5, 0.2, 0.1, 0.05] * 2, dtype=torch.float64)
    with torch.no_grad():  # centre the logits on the upper clip so that some samples are clipped and some are not
        disc.head.linear_out.bias.add_(11.513 - disc(x, sigma).logits.median())

    tau = paper_tau(sigma)
    mean_vp = paper_mean_vp(tau).reshape(-1, 1, 1, 1)
    x_vp = (mean_vp * x).requires_grad_(True)
    d = torch.sigmoid(disc.head(x_vp, (999 * tau).float())).clamp(1e-5, 1 - 1e-5)
    (g_vp,) = torch.autograd.grad(torch.log(d / (1 - d)).sum(), x_vp)
    expected = sigma.reshape(-1, 1, 1, 1) ** 2 * mean_vp * g_vp

    correction, log_ratio = discriminator_correction(disc, x, sigma)
    clipped = (d.detach() <= 1e-5) | (d.detach() >= 1 - 1e-5)
    assert 0 < int(clipped.sum()) < len(x), "the test needs clipped and unclipped samples"
    assert torch.allclose(correction, expected, rtol=1e-7, atol=1e-12)
    assert torch.all(correction[clipped] == 0) and torch.all(correction[~clipped].abs().amax((1, 2, 3)) > 0)
    assert torch.allclose(log_ratio, torch.log(d / (1 - d)).detach(), atol=1e-6)


def test_one_euler_step_gives_guided_denoiser():
    """With N = 1 the sampler returns D_guided(x0; σ0) = D + w·σ0²·∇log r; D from EDM eq. 7 written here."""
    disc = make_disc(seed=3)
    sched = EDMHeunScheduler(sigma_max=1.0)
    pipe = make_pipe(disc, sched)
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    w = 0.3
    out = pipe(batch_size=3, num_inference_steps=1, latents=latents, dg_weight_1st_order=w, output_type="pt").images

    sigma, sd = 1.0, 0.5
    x0 = latents.double() * sigma
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / math.sqrt(sigma**2 + sd**2)
    c_in, c_noise = 1 / math.sqrt(sigma**2 + sd**2), math.log(sigma) / 4
    with torch.no_grad():
        F = pipe.unet((c_in * x0).float(), torch.full((3,), c_noise)).sample.double()
    x_vp = (x0 * paper_mean_vp(paper_tau(sigma))).float().requires_grad_(True)
    logit = disc.head(x_vp, (999 * paper_tau(sigma)).float().expand(3))
    (g_vp,) = torch.autograd.grad(logit.sum(), x_vp)
    expected = c_skip * x0 + c_out * F + w * sigma**2 * float(paper_mean_vp(paper_tau(sigma))) * g_vp.double()
    inside = (expected.abs() < 0.99).float()
    assert inside.mean() > 0.5
    assert torch.allclose(out * inside, ((expected / 2 + 0.5) * inside).float(), atol=2e-6)


# ---------------------------------------------------------------------------------------------------------------
# Equivalence with the unguided pipeline, the window, the weights


@pytest.mark.parametrize("s_churn", [0.0, 20.0], ids=["heun", "stochastic"])
def test_weight_zero_and_no_discriminator_equal_edm_pipeline_bit_for_bit(s_churn):
    """Off (weight 0, no discriminator, a window without a schedule σ): EDMPipeline's samples bit for bit. On (w1 = 2
    in DG's window): DG's ``edm_sampler`` transcribed below, with EDM eq. 7 written out as its denoiser, from the same
    latents and churn noise (the transcription's z of an unchurned step is multiplied by 0, so it is not drawn)."""
    scheduler = EDMStochasticScheduler(s_churn=s_churn, s_tmin=0.05, s_tmax=50) if s_churn else EDMHeunScheduler()
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    reference = EDMPipeline(make_tiny_unet(0), scheduler)
    reference.set_progress_bar_config(disable=True)
    expected = reference(batch_size=3, num_inference_steps=6, generator=gen(), output_type="pt").images
    guided = make_pipe(make_disc(), scheduler)
    zero = guided(batch_size=3, num_inference_steps=6, generator=gen(), output_type="pt", dg_weight_1st_order=0.0).images
    none = make_pipe(None, scheduler)(batch_size=3, num_inference_steps=6, generator=gen(), output_type="pt").images
    outside = guided(batch_size=3, num_inference_steps=6, generator=gen(), output_type="pt", dg_sigma_min=500.0, dg_sigma_max=600.0).images
    on = guided(batch_size=3, num_inference_steps=6, generator=gen(), output_type="pt", dg_weight_1st_order=2.0).images
    assert torch.equal(zero, expected) and torch.equal(none, expected) and torch.equal(outside, expected)

    g = gen()
    latents = torch.randn(3, 1, 8, 8, generator=g)
    churned = iter(0.05 <= t <= 50 and s_churn > 0 for t in karras_sigmas(6).tolist())
    noise = lambda x: (torch.randn(x.shape, generator=g) if next(churned) else torch.zeros(x.shape)).to(x.dtype)  # noqa: E731
    with torch.no_grad():
        x = official_edm_sampler(False, 0.01, 1.0, 2.0, 0.0, guided.discriminator, edm_denoiser(guided.unet), latents,
                                 noise, num_steps=6, S_churn=s_churn, S_min=0.05, S_max=50.0)
    official = (x / 2 + 0.5).clamp(0, 1).float()
    assert torch.allclose(on, official, atol=1e-5)
    assert (on - expected).abs().amax() > 1e-3  # the guidance moves the samples by much more than the tolerance


def karras_sigmas(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    i = torch.arange(n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def test_guidance_only_inside_default_window_and_on_the_right_evaluations():
    """Defaults: w1 on the Euler evaluations with σ ≥ σ(τ=0.01) ≈ 0.0447 — the first 15 of 18 EDM steps;
    w2 > 0 adds the Heun evaluations at σ_{i+1} inside the window."""
    disc = make_disc()
    rec = SigmaRecorder(disc)
    pipe = make_pipe(disc)
    pipe(batch_size=2, num_inference_steps=18, output_type="pt")
    sigmas = karras_sigmas(18)
    sigma_lo = float(paper_sigma(0.01))
    assert abs(sigma_lo - 0.0447) < 1e-4
    called = torch.stack([s[0] for s in rec.sigmas])
    assert len(called) == 15 and torch.allclose(called, sigmas[sigmas >= sigma_lo], rtol=1e-12)

    rec.sigmas.clear()
    pipe(batch_size=2, num_inference_steps=18, output_type="pt", dg_weight_2nd_order=1.0)
    called = torch.stack([s[0] for s in rec.sigmas])
    heun = sigmas[1:][sigmas[1:] >= sigma_lo]  # σ_{i+1} of the Heun corrections in the window
    expected = torch.sort(torch.cat([sigmas[sigmas >= sigma_lo], heun]), descending=True).values
    assert torch.allclose(called, expected, rtol=1e-12)

    rec.sigmas.clear()
    pipe(batch_size=2, num_inference_steps=18, output_type="pt", dg_sigma_min=0.5, dg_sigma_max=10.0)
    called = torch.stack([s[0] for s in rec.sigmas])
    assert torch.allclose(called, sigmas[(sigmas >= 0.5) & (sigmas <= 10.0)], rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Boosting (DG Appendix D) and SDEdit


def test_boosting_without_rejections_equals_plain_guidance():
    """When the discriminator accepts every sample (log r > 0), boosting changes nothing: its own per-sample loop
    reproduces the scheduler-driven guided sampler."""
    disc = make_disc(seed=4)
    with torch.no_grad():
        disc.head.linear_out.bias.fill_(8.0)
    pipe = make_pipe(disc)
    latents = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    plain = pipe(batch_size=3, num_inference_steps=8, latents=latents, output_type="pt", dg_weight_2nd_order=1.0).images
    boosted = pipe(batch_size=3, num_inference_steps=8, latents=latents, output_type="pt", dg_weight_2nd_order=1.0, boosting=True).images
    assert torch.allclose(plain, boosted, atol=1e-6)


def test_boosting_churns_rejected_samples_every_fifth_step():
    """A rejecting discriminator (log r < 0): the network sees σ̂_i = σ_i·(1 + min(4/N, √2−1)) on steps i = 5, 10
    (not 0: nothing is known yet) and σ_i elsewhere (deterministic scheduler)."""
    disc = make_disc(seed=5)
    with torch.no_grad():
        disc.head.linear_out.bias.fill_(-8.0)
    pipe = make_pipe(disc)
    n = 12
    rec = SigmaRecorder(disc)
    pipe(batch_size=2, num_inference_steps=n, output_type="pt", boosting=True)
    seen = torch.stack([s[0] for s in rec.sigmas])  # the Euler evaluations inside the window, in order
    sigmas = karras_sigmas(n)
    gamma = min(4 / n, math.sqrt(2) - 1)
    expected = torch.tensor([s * (1 + gamma) if i in (5, 10) else s for i, s in enumerate(sigmas.tolist())], dtype=torch.float64)
    expected = expected[expected >= float(paper_sigma(0.01))]
    assert torch.allclose(seen, expected, rtol=1e-12)


def test_sdedit_runs_the_tail_of_the_schedule_from_the_image():
    pipe = make_pipe(make_disc())
    calls = []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(1))
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(image=image, strength=0.5, num_inference_steps=10, output_type="pt").images
    assert out.shape == (2, 1, 8, 8) and len(calls) == 2 * 5 - 1  # steps 5..9: Heun except the last
    calls.clear()
    # strength 0.1 from σ̂_9 = 0.002: the result stays at the image (up to the tiny noise and one denoising step)
    close = pipe(image=image, strength=0.1, num_inference_steps=10, output_type="pt", dg_weight_1st_order=0.0).images
    assert len(calls) == 1 and (close - image).abs().max() < 0.05
    with pytest.raises(ValueError, match="strength"):
        pipe(image=image, strength=0.0)
    with pytest.raises(ValueError, match="image must have shape"):
        pipe(image=torch.rand(2, 3, 8, 8))


@pytest.mark.parametrize("boosting", [False, True])
def test_sdedit_first_model_input_is_the_image_noised_to_the_starting_sigma(boosting):
    """SDEdit (DG §5.3): the first network input is c_in(σ̂_k)·(y + σ̂_k·z) with y = 2·image − 1 in [−1, 1], z the given
    latents and σ̂_k the (churned) noise level of the first step k = N − round(strength·N), computed here from EDM's
    ρ-schedule; a run that starts from the clean image, or at another level, fails."""
    pipe = make_pipe(make_disc())
    inputs = []
    pipe.unet.register_forward_pre_hook(lambda m, args: inputs.append((args[0].detach().double(), args[1].detach())))
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    n, strength = 10, 0.5
    pipe(image=image, strength=strength, num_inference_steps=n, latents=z, output_type="pt", boosting=boosting,
         dg_weight_1st_order=1.0)
    k = n - round(strength * n)
    rho, smin, smax = 7.0, 0.002, 80.0
    sigma_k = (smax ** (1 / rho) + k / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho  # no churn here
    y = image.double() * 2 - 1
    expected = (y + sigma_k * z.double()) / math.sqrt(sigma_k**2 + 0.5**2)
    first, timestep = inputs[0]
    assert torch.allclose(first, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(timestep.double(), torch.full((2,), math.log(sigma_k) / 4, dtype=torch.float64), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Save / load


def test_save_load_round_trip_with_and_without_discriminator(tmp_path):
    pipe = make_pipe(make_disc(num_class_embeds=None))
    pipe.save_pretrained(tmp_path / "with")
    index = json.loads((tmp_path / "with" / "model_index.json").read_text())
    assert index["discriminator"][1] == "Discriminator"
    assert (tmp_path / "with" / "discriminator" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pkl"))
    loaded = DiscriminatorGuidedPipeline.from_pretrained(tmp_path / "with")
    loaded.set_progress_bar_config(disable=True)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = pipe(batch_size=2, num_inference_steps=5, generator=gen(), output_type="pt").images
    b = loaded(batch_size=2, num_inference_steps=5, generator=gen(), output_type="pt").images
    assert torch.equal(a, b)

    make_pipe(None).save_pretrained(tmp_path / "without")
    empty = DiscriminatorGuidedPipeline.from_pretrained(tmp_path / "without")
    assert empty.discriminator is None
    # a plain EDMPipeline folder loads too, and a discriminator can be passed in
    EDMPipeline(make_tiny_unet(0), EDMHeunScheduler()).save_pretrained(tmp_path / "edm")
    injected = DiscriminatorGuidedPipeline.from_pretrained(tmp_path / "edm", discriminator=make_disc())
    assert isinstance(injected.discriminator, Discriminator)


def test_from_pretrained_hub_snapshot_layout(tmp_path, monkeypatch):
    """A repo id resolves through the Hugging Face cache layout (offline), then loads like a folder."""
    import huggingface_hub.constants

    pipe = make_pipe(make_disc())
    snapshot = tmp_path / "cache" / "models--user--repo" / "snapshots" / "0123abcd"
    pipe.save_pretrained(snapshot)
    (tmp_path / "cache" / "models--user--repo" / "refs").mkdir()
    (tmp_path / "cache" / "models--user--repo" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = DiscriminatorGuidedPipeline.from_pretrained("user/repo", cache_dir=str(tmp_path / "cache"))
    assert isinstance(loaded.discriminator, Discriminator)
    for p, q in zip(pipe.discriminator.parameters(), loaded.discriminator.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="8x8 images but the unet generates 1-channel 8x8|judges"):
        make_pipe(make_disc(sample_size=16))
    with pytest.raises(ValueError, match="judges 3-channel"):
        make_pipe(make_disc(in_channels=3))
    with pytest.raises(ValueError, match="needs a discriminator"):
        make_pipe(None)(dg_weight_1st_order=1.0)
    with pytest.raises(ValueError, match="needs a discriminator"):
        make_pipe(None)(dg_weight_2nd_order=0.5)
    pipe = make_pipe(make_disc())
    with pytest.raises(ValueError, match="dg_weight_1st_order must be a finite number >= 0"):
        pipe(dg_weight_1st_order=-1.0)
    with pytest.raises(ValueError, match="dg_weight_2nd_order must be a finite number >= 0"):
        pipe(dg_weight_2nd_order=-0.1)
    with pytest.raises(ValueError, match="dg_sigma_min"):
        pipe(dg_sigma_min=2.0, dg_sigma_max=1.0)
    with pytest.raises(ValueError, match="boosting"):
        pipe(boosting=True, dg_weight_1st_order=0.0)
    disc = make_disc()
    with pytest.raises(ValueError, match="sample must have shape"):
        disc(torch.randn(2, 1, 4, 4), 1.0)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        disc(torch.randn(2, 1, 8, 8), 0.0)
    with pytest.raises(ValueError, match="norm_num_groups"):
        make_disc(block_out_channels=(6, 16))
    with pytest.raises(ValueError, match="class_labels"):
        make_disc(num_class_embeds=10)(torch.randn(2, 1, 8, 8), 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Feature extractors and class conditioning


def test_unet_encoder_features_are_the_score_unets_mid_block_output(tmp_path):
    unet = make_tiny_unet(2)
    sched = EDMHeunScheduler()
    disc = Discriminator.from_unet_encoder(unet, sched, block_out_channels=(8,), down_block_types=("DownBlock2D",), norm_num_groups=4)
    seen = {}
    unet.mid_block.register_forward_hook(lambda m, args, out: seen.update(mid=out.detach()))
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    sigma = 2.0
    with torch.no_grad():  # the full UNet at EDM's c_in(σ)·x and c_noise(σ) = ln(σ)/4
        unet((x / math.sqrt(sigma**2 + 0.25)).float(), torch.full((2,), math.log(sigma) / 4))
        feats = disc.features(x, torch.full((2,), sigma, dtype=torch.float64))
    assert torch.allclose(feats, seen["mid"], atol=1e-6)
    assert not any(p.requires_grad for p in disc.extractor.parameters())
    disc.save_pretrained(tmp_path)
    loaded = Discriminator.from_pretrained(tmp_path)
    assert not any(p.requires_grad for p in loaded.extractor.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma).logits, disc(x, sigma).logits)


def test_transformers_backbone_and_custom_extractor(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(0)
    backbone = ResNetModel(ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"))
    backbone.save_pretrained(tmp_path / "resnet")
    disc = Discriminator.from_transformers_backbone(str(tmp_path / "resnet"), sample_size=8, in_channels=1, input_resolution=32,
                                                    block_out_channels=(8,), down_block_types=("DownBlock2D",), norm_num_groups=4)
    x = torch.randn(2, 1, 8, 8)
    disc.save_pretrained(tmp_path / "disc")
    loaded = Discriminator.from_pretrained(tmp_path / "disc")
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.5).logits, disc(x, 0.5).logits)
    correction, _ = discriminator_correction(loaded, x, 0.5)
    assert correction.abs().sum() > 0  # the gradient flows through the frozen backbone

    class Extractor(torch.nn.Module):  # sees (x_vp, 999·τ), as DG's ADM classifier
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x, noise_label):
            return self.conv(x) * (1 + noise_label.reshape(-1, 1, 1, 1) / 1000)

    extractor = Extractor()
    custom = Discriminator.from_feature_extractor(extractor, sample_size=8, in_channels=1, block_out_channels=(8,),
                                                  down_block_types=("DownBlock2D",), norm_num_groups=4)
    custom.save_pretrained(tmp_path / "custom")
    reloaded = Discriminator.from_pretrained(tmp_path / "custom")
    with pytest.raises(ValueError, match="attach_feature_extractor"):
        reloaded(x, 0.5)
    reloaded.attach_feature_extractor(extractor)
    with torch.no_grad():
        assert torch.equal(reloaded(x, 0.5).logits, custom(x, 0.5).logits)


def test_class_conditional_discriminator_uses_labels():
    disc = make_disc(num_class_embeds=10)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        a = disc(x, 1.0, torch.tensor([0, 0])).logits
        b = disc(x, 1.0, torch.tensor([3, 3])).logits
        onehot = disc(x, 1.0, torch.nn.functional.one_hot(torch.tensor([3, 3]), 10).float()).logits
    assert not torch.allclose(a, b) and torch.equal(b, onehot)


# ---------------------------------------------------------------------------------------------------------------
# Losses


def test_log_uniform_sigma_is_dgs_importance_sampled_vp_time():
    """DG samples τ with density ∝ β(τ)/(1 − e^{−∫β}) on [1e-5, 1] by its closed-form inverse CDF; mapped to σ
    this is the log-uniform law on [σ(1e-5), σ(1)] (two-sample Kolmogorov–Smirnov)."""
    from scipy.stats import ks_2samp

    n = 20000
    sigma = sample_sigma_log_uniform(n, generator=torch.Generator().manual_seed(0))
    assert abs(float(sigma.min()) - float(paper_sigma(1e-5))) < 1e-4 and float(sigma.max()) <= float(paper_sigma(1.0))
    # DG train.py: A(t) = ln(e^{∫β} − 1), B = ln(1 + exp(Z·u + A(t_min))), t solves ∫β(t) = B
    u = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    integral = lambda t: 0.5 * (BETA1 - BETA0) * t**2 + BETA0 * t  # noqa: E731
    A = lambda t: math.log(math.expm1(integral(t)))  # noqa: E731
    Z = A(1.0) - A(1e-5)
    B = torch.log1p(torch.exp(Z * u + A(1e-5)))
    tau = (-BETA0 + torch.sqrt(BETA0**2 + 2 * (BETA1 - BETA0) * B)) / (BETA1 - BETA0)
    assert ks_2samp(sigma.log().numpy(), paper_sigma(tau).log().numpy()).pvalue > 1e-3


class LinearRatio(torch.nn.Module):
    """ℓ(x, σ) = a·(x − b)/(1 + σ²): contains the exact log ratio of N(μ1, 1+σ²) to N(μ0, 1+σ²)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.zeros(())), torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, sigma, class_labels=None):
        logits = self.a * (x.reshape(len(x)) - self.b) / (1 + sigma.float() ** 2)
        return type("Out", (), {"logits": logits})


@pytest.mark.parametrize("loss_cls", [DiscriminatorBCELoss, DiscriminatorLSIFLoss, DiscriminatorUKLLoss])
def test_each_loss_is_minimised_by_the_density_ratio(loss_cls):
    """Real y ~ N(1, 1), fake y ~ N(0, 1): after diffusion, log r = (x − ½)/(1 + σ²), i.e. a = 1, b = ½
    (DG eq. 6 and Appendix B: every Bregman objective is minimised by the true ratio)."""
    torch.manual_seed(0)
    model, loss_fn = LinearRatio(), loss_cls(sigma_min=0.01, sigma_max=2.0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[200, 300], gamma=0.2)
    g = torch.Generator().manual_seed(0)
    for step in range(400):
        real = 1 + torch.randn(8192, 1, 1, 1, generator=g)
        fake = torch.randn(8192, 1, 1, 1, generator=g)
        out = loss_fn(model, real, fake, generator=g)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
        sched.step()
    a, b = float(model.a.detach()), float(model.b.detach())
    assert abs(a - 1.0) < 0.1 and abs(b - 0.5) < 0.07, (a, b)


# ---------------------------------------------------------------------------------------------------------------
# The 2-D toy of DG Figure 6


R, TRUE_STD, K = 0.7, 0.04, 8
MEANS = torch.stack([R * torch.cos(2 * math.pi * torch.arange(K) / K), R * torch.sin(2 * math.pi * torch.arange(K) / K)], 1).double()
TRUE_WEIGHTS = torch.full((K,), 1 / K, dtype=torch.float64)
WRONG_WEIGHTS = torch.tensor([0.3, 0.05, 0.2, 0.05, 0.2, 0.05, 0.1, 0.05], dtype=torch.float64)


def gmm_sample(n, weights, std, generator):
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    return MEANS[k] + std * torch.randn(n, 2, generator=generator, dtype=torch.float64)


class GMMScoreNet(ModelMixin, ConfigMixin):
    """A 'UNet' whose denoiser is the exact posterior mean of a (deliberately wrong) Gaussian mixture, returned as
    EDM's F = (D − c_skip·x)/c_out; points are 2-channel 1×1 images."""

    @register_to_config
    def __init__(self, weights=tuple(WRONG_WEIGHTS.tolist()), std=0.08, sample_size=1, in_channels=2):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, model_input, timestep, class_labels=None):
        sigma = torch.exp(4 * timestep.double()).reshape(-1, 1)  # EDM c_noise = ln(σ)/4
        sd = 0.5
        x = model_input.double().reshape(-1, 2) * (sigma**2 + sd**2).sqrt()
        var = self.config.std**2 + sigma**2
        logits = torch.tensor(self.config.weights, dtype=torch.float64).log() - ((x[:, None] - MEANS) ** 2).sum(-1) / (2 * var)
        posterior = MEANS + (self.config.std**2 / var)[:, :, None] * (x[:, None] - MEANS)
        D = (torch.softmax(logits, 1)[:, :, None] * posterior).sum(1)
        F = (D - sd**2 / (sigma**2 + sd**2) * x) / (sigma * sd / (sigma**2 + sd**2).sqrt())
        return type("Out", (), {"sample": F.reshape(-1, 2, 1, 1)})


def mmd(x, y, bandwidths=(0.02, 0.05, 0.1, 0.2, 0.5)):
    """Unbiased MMD² with a sum of RBF kernels."""

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    kxx, kyy = k(x, x), k(y, y)
    n, m = len(x), len(y)
    return float((kxx.sum() - kxx.diag().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1)) - 2 * k(x, y).mean())


def test_toy_2d_guidance_moves_samples_towards_the_data():
    """DG Figure 6 in miniature: the score is exact for the wrong mixture (unbalanced weights, modes twice too
    wide); a discriminator trained for a few seconds on real vs. generated points, with DG's loss and σ law, makes
    guided samples (w1 = 2) measurably closer to the data: MMD² to fresh data samples drops by more than 20 %."""
    torch.manual_seed(0)
    pipe = DiscriminatorGuidedPipeline(GMMScoreNet(), EDMHeunScheduler())
    pipe.set_progress_bar_config(disable=True)
    steps, n = 12, 1000
    to_points = lambda images: images.double().reshape(-1, 2) * 2 - 1  # noqa: E731  (all points lie inside [-1, 1])
    fake = to_points(pipe(batch_size=2000, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt").images)

    disc = Discriminator(sample_size=1, in_channels=2, block_out_channels=(32,), down_block_types=("DownBlock2D",), norm_num_groups=1)
    opt = torch.optim.Adam(disc.parameters(), lr=5e-3)
    loss_fn = DiscriminatorBCELoss()
    g = torch.Generator().manual_seed(1)
    for _ in range(250):
        real = gmm_sample(256, TRUE_WEIGHTS, TRUE_STD, g).float().reshape(-1, 2, 1, 1)
        batch = fake[torch.randint(len(fake), (256,), generator=g)].float().reshape(-1, 2, 1, 1)
        out = loss_fn(disc, real, batch, generator=g)
        opt.zero_grad()
        out.loss.mean().backward()
        opt.step()
    disc.eval()
    pipe.register_modules(discriminator=disc)

    data = gmm_sample(n, TRUE_WEIGHTS, TRUE_STD, torch.Generator().manual_seed(2))
    sample = lambda w: to_points(pipe(batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(3), output_type="pt", dg_weight_1st_order=w).images)  # noqa: E731
    unguided, guided = mmd(sample(0.0), data), mmd(sample(2.0), data)
    assert guided < 0.8 * unguided, (unguided, guided)


# ---------------------------------------------------------------------------------------------------------------
# examples/train_discriminator.py


def _train_discriminator_main():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "train_discriminator.py")
    spec = importlib.util.spec_from_file_location("train_discriminator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


TINY_RUN = ["--max_train_steps", "4", "--num_fake_images", "120", "--generation_steps", "3", "--num_inference_steps", "2",
            "--num_validation_images", "4", "--validation_steps", "2", "--checkpointing_steps", "2", "--no_progress_bar",
            "--disc_block_out_channels", "8,16", "--disc_norm_num_groups", "4", "--train_batch_size", "16",
            "--report_to", "none", "--num_heldout_images", "16"]


def test_train_discriminator_script_generates_reuses_and_saves_a_guided_pipeline(tmp_path):
    main = _train_discriminator_main()
    EDMPipeline(make_tiny_unet(0), EDMHeunScheduler()).save_pretrained(tmp_path / "edm")
    out = tmp_path / "run"
    main(["--pretrained_model_name_or_path", str(tmp_path / "edm"), "--output_dir", str(out), "--loss", "ukl", *TINY_RUN])
    fakes = out / "fake_images"
    record = json.loads((fakes / "generation.json").read_text())
    assert record["num_images"] == 120 and len(list(fakes.glob("*.png"))) == 120
    pipe = DiscriminatorGuidedPipeline.from_pretrained(out)
    assert isinstance(pipe.discriminator, Discriminator) and pipe.discriminator.config.sample_size == 8
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert "accuracy" in rows[-1] and any(k.startswith("accuracy_sigma_") for k in rows[-1])
    assert any(k.startswith("loss_sigma_") for k in rows[-1])
    assert len((out / "logs" / "validation.jsonl").read_text().splitlines()) == 2  # steps 2 and 4
    assert (out / "samples.png").exists() and "DiscriminatorGuidedPipeline" in (out / "README.md").read_text()

    # a rerun reuses the saved fakes and resumes from the last checkpoint
    mtime = (fakes / "0000000.png").stat().st_mtime_ns
    result = main(["--pretrained_model_name_or_path", str(tmp_path / "edm"), "--output_dir", str(out), "--loss", "ukl",
                   "--resume_from_checkpoint", "latest", *TINY_RUN[:1], "6", *TINY_RUN[2:]])
    assert result.step == 6 and (fakes / "0000000.png").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="other settings"):  # other generation settings, same folder
        main(["--pretrained_model_name_or_path", str(tmp_path / "edm"), "--output_dir", str(out), "--overwrite_output_dir",
              *TINY_RUN[:2], "--num_fake_images", "60", *TINY_RUN[4:]])

    # fakes read from a folder, no score model: only the discriminator is saved
    only = tmp_path / "only"
    main(["--fake_data_dir", str(fakes), "--output_dir", str(only), *TINY_RUN])
    assert isinstance(Discriminator.from_pretrained(only), Discriminator)
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path"):
        main(["--output_dir", str(only), *TINY_RUN])


def test_train_discriminator_push_to_hub_never_uploads_the_fake_images(tmp_path, monkeypatch):
    import huggingface_hub

    main = _train_discriminator_main()
    EDMPipeline(make_tiny_unet(0), EDMHeunScheduler()).save_pretrained(tmp_path / "edm")
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "edm"), "--output_dir", str(tmp_path / "run"),
            "--push_to_hub", "--hub_model_id", "user/dg", "--hub_token", "hf_offline_test_token", *TINY_RUN]
    uploads = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id}))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: uploads.append(kw))
    main(argv)
    assert uploads and any("fake_images" in p for p in uploads[0]["ignore_patterns"])


# ---------------------------------------------------------------------------------------------------------------
# Guidance under every scheduler (DG §3.5: DDPM, DDIM and EDM samplers), against exact Gaussian maths


def gaussian_pipeline(scheduler, parametrisation, prediction_type, mean_model, mean_real, std, size=4):
    from guidance_exact import ExactLogRatio, ExactMixtureNet

    unet = ExactMixtureNet(means=(mean_model,), weights=(1.0,), std=std, sample_size=size,
                           parametrisation=parametrisation, prediction_type=prediction_type)
    disc = ExactLogRatio(mean_real=mean_real, mean_model=mean_model, std=std, sample_size=size)
    pipe = DiscriminatorGuidedPipeline(unet, scheduler, disc)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def exact_dg_schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler, EDMEulerScheduler, EulerDiscreteScheduler

    return [
        ("edm_heun", lambda: EDMHeunScheduler(), "edm", "epsilon", 18),
        ("edm_heun_v", lambda: EDMHeunScheduler(prediction_type="v_prediction"), "edm", "v_prediction", 18),
        ("ddim", lambda: DDIMScheduler(clip_sample=False), "ddpm", "epsilon", 50),
        ("ddim_v", lambda: DDIMScheduler(clip_sample=False, prediction_type="v_prediction"), "ddpm", "v_prediction", 50),
        ("ddpm", lambda: DDPMScheduler(clip_sample=False), "ddpm", "epsilon", 200),
        ("ddpm_x0", lambda: DDPMScheduler(clip_sample=False, prediction_type="sample"), "ddpm", "sample", 200),
        ("euler", lambda: EulerDiscreteScheduler(), "ddpm", "epsilon", 50),
        ("edm_euler", lambda: EDMEulerScheduler(), "edm", "epsilon", 50),
    ]


@pytest.mark.parametrize("name,make_scheduler,parametrisation,prediction_type,steps", exact_dg_schedulers(),
                         ids=[s[0] for s in exact_dg_schedulers()])
def test_exact_discriminator_guidance_moves_samples_to_the_data_under_every_scheduler(
        name, make_scheduler, parametrisation, prediction_type, steps):
    """Model N(μ, s²), data N(μ', s²), exact network and exact log-ratio log N(x; μ', s² + σ²) − log N(x; μ, s² + σ²):
    with w_DG = 1 on every evaluation the guided score is the data score, so the guided sampler is the sampler of the
    exact N(μ', s²) network: the same samples from the same noise (no discretisation error between the two), whose
    mean is μ' (unguided: μ)."""
    mu, mu_real, std = -0.1, 0.15, 0.2  # far inside [−1, 1]: the pipeline's output clamp never acts
    pipe = gaussian_pipeline(make_scheduler(), parametrisation, prediction_type, mu, mu_real, std)
    data_model = gaussian_pipeline(make_scheduler(), parametrisation, prediction_type, mu_real, mu_real, std)
    kw = dict(batch_size=1000, num_inference_steps=steps, output_type="pt", dg_sigma_min=0.0, dg_sigma_max=math.inf)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = pipe(generator=gen(), dg_weight_1st_order=0.0, **kw).images.double() * 2 - 1
    guided = pipe(generator=gen(), dg_weight_1st_order=1.0, dg_weight_2nd_order=1.0, **kw).images.double() * 2 - 1
    target = data_model(generator=gen(), dg_weight_1st_order=0.0, **kw).images.double() * 2 - 1
    assert (guided - target).abs().max() < 1e-3, (name, float((guided - target).abs().max()))
    for values, mean in ((plain, mu), (guided, mu_real)):  # 16000 pixels: standard error of the mean 0.0016
        assert abs(float(values.mean()) - mean) < 0.01, (name, float(values.mean()), mean)
    # From the same noise a sampler's output is affine in the data mean: guidance moves every sample by the same
    # μ' − μ (less the sampler's shrinkage of the initial noise, under 1 %) and leaves the spread as it is.
    shift = guided - plain
    assert float(shift.std()) < 1e-3 and abs(float(shift.mean()) - (mu_real - mu)) < 0.01 * (mu_real - mu), (
        name, float(shift.std()), float(shift.mean()))


def test_ddpm_states_reach_the_discriminator_in_the_edm_convention():
    """For a DDIM state x_t the discriminator sees x = x_t/√ᾱ_t at σ = √((1 − ᾱ_t)/ᾱ_t) (ᾱ from the β schedule,
    computed here); the guided ε is Dhariwal & Nichol's ε − √(1 − ᾱ_t)·∇_{x_t} log r."""
    from diffusers import DDIMScheduler
    from guidance_exact import ddpm_sigmas

    pipe = gaussian_pipeline(DDIMScheduler(clip_sample=False), "ddpm", "epsilon", -0.2, 0.3, 0.4)
    seen = []
    log_ratio = pipe.discriminator.log_ratio
    pipe.discriminator.log_ratio = lambda x, s, labels=None: seen.append((x.detach().clone(), torch.as_tensor(s, dtype=torch.float64).expand(len(x)))) or log_ratio(x, s, labels)
    states = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: states.append(args[0].detach().double().clone()))
    pipe(batch_size=3, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="pt",
         dg_weight_1st_order=1.0, dg_sigma_min=0.0, dg_sigma_max=math.inf)
    hook.remove()
    sched = DDIMScheduler()
    sched.set_timesteps(5)
    sigma_t = ddpm_sigmas()[sched.timesteps.long()]
    assert len(seen) == 5
    for (x, sigma), x_t, s in zip(seen, states, sigma_t):
        assert torch.allclose(sigma, s.expand(3), rtol=1e-3)  # diffusers keeps ᾱ in float32: 1 − ᾱ_0 = 1e-4 to 1e-3
        assert torch.allclose(x.double(), x_t * (1 + s**2).sqrt(), rtol=1e-6, atol=1e-6)  # 1/√ᾱ = √(1 + σ²)

    # one guided ε against Dhariwal & Nichol's formula, by autograd in x_t
    x_t = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = 600
    alpha_bar = 1 / (1 + float(ddpm_sigmas()[t]) ** 2)
    xt = x_t.clone().requires_grad_(True)
    var = torch.full((2,), 0.4**2 + (1 - alpha_bar) / alpha_bar, dtype=torch.float64)
    from guidance_exact import log_normal

    lr = log_normal(xt / math.sqrt(alpha_bar), 0.3, var) - log_normal(xt / math.sqrt(alpha_bar), -0.2, var)
    (grad_xt,) = torch.autograd.grad(lr.sum(), xt)
    eps = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    pipe.scheduler.set_timesteps(5)
    term = DiscriminatorGuidance(pipe.discriminator, 1.0, 0.0, 0.0, math.inf)
    guided = pipe.guided_output(eps, x_t.float(), torch.tensor(t), [term])
    expected = eps.double() - math.sqrt(1 - alpha_bar) * grad_xt
    assert torch.allclose(guided.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The official EDM-G++ sampler (DG generate.py:edm_sampler, classifier_lib.get_grad_log_ratio), transcribed


def official_get_grad_log_ratio(disc, x_ve, std_wve_t, time_min, time_max, log=False):
    """classifier_lib.get_grad_log_ratio with the discriminator d = sigmoid(head(x_vp, 999·τ)) of ``disc``."""
    tau = paper_tau(std_wve_t)
    mean_vp_tau = paper_mean_vp(tau)
    if tau.min() > time_max or tau.min() < time_min:
        zeros = torch.zeros_like(x_ve)
        return (zeros, 10000000.0 * torch.ones(x_ve.shape[0])) if log else zeros
    x_vp = mean_vp_tau[:, None, None, None] * x_ve
    with torch.enable_grad():
        x_ = x_vp.float().clone().detach().requires_grad_()
        prediction = torch.clip(torch.sigmoid(disc.head(x_, (999 * tau).float())), 1e-5, 1.0 - 1e-5)
        log_ratio = torch.log(prediction / (1.0 - prediction))
        score = torch.autograd.grad(outputs=log_ratio.sum(), inputs=x_, retain_graph=False)[0]
        score = score * -((std_wve_t[:, None, None, None] ** 2) * mean_vp_tau[:, None, None, None])
    return (score, log_ratio) if log else score


def official_edm_sampler(boosting, time_min, time_max, w1, w2, disc, net, latents, randn_like, num_steps=18,
                         sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1):
    """DG generate.py:edm_sampler (EDM-G++ with boosting), line by line; ``net(x, σ)`` is the denoiser D."""
    period, period_weight, S_churn_manual, S_noise_manual = 5, 2, 4.0, 1.0
    step_indices = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = latents.to(torch.float64) * t_steps[0]
    S_churn_vec = torch.tensor([S_churn] * x_next.shape[0], dtype=torch.float64)
    S_churn_max = torch.tensor([np.sqrt(2) - 1] * x_next.shape[0], dtype=torch.float64)
    S_noise_vec = torch.tensor([S_noise] * x_next.shape[0], dtype=torch.float64)
    log_ratio = torch.tensor([np.inf] * latents.shape[0])
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        S_churn_vec_ = S_churn_vec.clone()
        S_noise_vec_ = S_noise_vec.clone()
        if i % period == 0:
            if boosting:
                S_churn_vec_[log_ratio < 0.0] = S_churn_manual
                S_noise_vec_[log_ratio < 0.0] = S_noise_manual
        gamma_vec = torch.minimum(S_churn_vec_ / num_steps, S_churn_max) if S_min <= t_cur <= S_max else torch.zeros_like(S_churn_vec_)
        t_hat = t_cur + gamma_vec * t_cur
        x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt()[:, None, None, None] * S_noise_vec_[:, None, None, None] * randn_like(x_cur)
        denoised = net(x_hat, t_hat).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat[:, None, None, None]
        if w1 != 0.0:
            discriminator_guidance, log_ratio = official_get_grad_log_ratio(disc, x_hat, t_hat, time_min, time_max, log=True)
            if boosting:
                if i % period_weight == 0:
                    discriminator_guidance[log_ratio < 0.0] *= 2.0
            d_cur += w1 * (discriminator_guidance / t_hat[:, None, None, None])
        x_next = x_hat + (t_next - t_hat)[:, None, None, None] * d_cur
        if i < num_steps - 1:
            denoised = net(x_next, t_next.expand(x_next.shape[0])).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            if w2 != 0.0:
                discriminator_guidance = official_get_grad_log_ratio(disc, x_next, t_next.expand(x_next.shape[0]), time_min, time_max, log=False)
                d_prime += w2 * (discriminator_guidance / t_next)
            x_next = x_hat + (t_next - t_hat)[:, None, None, None] * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def edm_denoiser(unet, sigma_data=0.5):
    """D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise) with EDM's Table 1 scalings written out (eq. 7), F in float32 as
    the pipeline runs it: the reference side shares no preconditioning code with the package."""

    def denoise(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0]).reshape(-1, 1, 1, 1)
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
        c_noise = sigma.log().reshape(-1) / 4
        F = unet((c_in * x).float(), c_noise.float()).sample.double()
        return c_skip * x + c_out * F

    return denoise


@pytest.mark.parametrize("bias", [8.0, -8.0, 0.0], ids=["accepting", "rejecting", "mixed"])
@pytest.mark.parametrize("s_churn", [0.0, 10.0], ids=["heun", "stochastic"])
def test_guided_edm_sampler_with_boosting_equals_the_official_sampler(bias, s_churn):
    """Our EDM-G++ (w1 = 2, w2 = 1, DG's window, boosting) equals DG's ``edm_sampler`` transcribed above, from the
    same latents and the same per-step noise (DG draws z at every step, and so do we); the transcription's denoiser is
    EDM eq. 7 written here."""
    disc = make_disc(seed=6)
    with torch.no_grad():
        disc.head.linear_out.bias.fill_(bias)
    scheduler = EDMStochasticScheduler(s_churn=s_churn, s_tmin=0.05, s_tmax=50.0) if s_churn else EDMHeunScheduler()
    pipe = make_pipe(disc, scheduler)
    n, steps = 4, 12
    latents = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = pipe(batch_size=n, num_inference_steps=steps, latents=latents, generator=torch.Generator().manual_seed(1),
                dg_weight_1st_order=2.0, dg_weight_2nd_order=1.0, boosting=True, output_type="pt").images

    g = torch.Generator().manual_seed(1)
    denoiser = edm_denoiser(pipe.unet)
    with torch.no_grad():
        x = official_edm_sampler(True, 0.01, 1.0, 2.0, 1.0, disc, denoiser, latents,
                                 lambda x: torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype),
                                 num_steps=steps, S_churn=s_churn, **(dict(S_min=0.05, S_max=50.0) if s_churn else {}))
    assert torch.allclose(ours, (x / 2 + 0.5).clamp(0, 1).float(), atol=1e-5)


def test_guided_scheduler_loop_equals_the_official_sampler_without_boosting():
    """The scheduler-driven path (guidance converted into F before ``EDMHeunScheduler.step``) equals DG's
    ``edm_sampler`` with boosting off, S_churn = 0, w1 = 2, w2 = 1, its denoiser EDM eq. 7 written here."""
    disc = make_disc(seed=7)
    pipe = make_pipe(disc, EDMHeunScheduler())
    latents = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ours = pipe(batch_size=4, num_inference_steps=12, latents=latents, dg_weight_1st_order=2.0,
                dg_weight_2nd_order=1.0, output_type="pt").images
    with torch.no_grad():
        x = official_edm_sampler(False, 0.01, 1.0, 2.0, 1.0, disc, edm_denoiser(pipe.unet), latents, torch.randn_like,
                                 num_steps=12)
    assert torch.allclose(ours, (x / 2 + 0.5).clamp(0, 1).float(), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Pipeline inputs: images, generators, integer types, NaN


def test_img2img_accepts_its_own_pil_output_and_lists_of_pil_images():
    pipe = make_pipe(make_disc())
    kw = dict(num_inference_steps=6, strength=0.5, generator=torch.Generator().manual_seed(0), output_type="pt")
    pil = pipe(batch_size=2, num_inference_steps=3, output_type="pil").images  # 1-channel: mode "L"
    assert pil[0].mode == "L"
    one = pipe(image=pil[0], **kw).images
    both = pipe(image=pil, **kw).images
    assert one.shape == (1, 1, 8, 8) and both.shape == (2, 1, 8, 8)
    # the PIL image enters as its pixels / 255
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in pil]))[:, None]
    kw["generator"] = torch.Generator().manual_seed(0)
    from_tensor = pipe(image=pixels, **kw).images
    kw["generator"] = torch.Generator().manual_seed(0)
    assert torch.equal(pipe(image=pil, **kw).images, from_tensor)
    with pytest.raises(ValueError, match=r"image values must be in \[0, 1\].*255"):
        pipe(image=pixels * 255, num_inference_steps=6, strength=0.5)
    with pytest.raises(ValueError, match=r"image values must be in \[0, 1\]"):
        pipe(image=pixels - 0.5, num_inference_steps=6, strength=0.5)


def test_img2img_under_a_diffusers_scheduler_starts_from_the_noised_image():
    """DDIM SDEdit: x_t = √ᾱ_t·x0 + √(1 − ᾱ_t)·z at the first timestep of the tail, then the tail of the loop."""
    from diffusers import DDIMScheduler

    pipe = make_pipe(make_disc(), DDIMScheduler())
    calls, inputs = [], []
    pipe.unet.register_forward_pre_hook(lambda m, args: calls.append(args[1].reshape(-1)[0].item())
                                        or inputs.append(args[0].detach().double()))
    image = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = pipe(image=image, strength=0.3, num_inference_steps=10, latents=z, output_type="pt",
               dg_weight_1st_order=0.0).images
    sched = DDIMScheduler()
    sched.set_timesteps(10)
    assert calls == sched.timesteps[7:].tolist() and (out - image).abs().mean() < 0.3
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[int(sched.timesteps[7])]
    expected = alpha_bar.sqrt() * (image.double() * 2 - 1) + (1 - alpha_bar).sqrt() * z.double()
    assert torch.allclose(inputs[0], expected, rtol=1e-5, atol=1e-5)


def test_generators_and_integer_types():
    pipe = make_pipe(make_disc())
    with pytest.raises(ValueError, match="generator is a list of 2 generators but the batch has 3"):
        pipe(batch_size=3, generator=[torch.Generator(), torch.Generator()], num_inference_steps=2)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    a = pipe(batch_size=2, num_inference_steps=3, generator=gens(), output_type="pt").images
    b = pipe(batch_size=np.int64(2), num_inference_steps=torch.tensor(3), generator=gens(), output_type="pt").images
    assert torch.equal(a, b)
    for bad in (1.5, "3", True, torch.tensor(2.0), np.float32(2)):
        with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1"):
            pipe(num_inference_steps=bad)
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            pipe(batch_size=bad)


def test_nan_is_reported_once_at_the_end_of_sampling():
    pipe = make_pipe(None)
    calls = []
    pipe.unet.register_forward_hook(lambda m, args, out: calls.append(1) or out.__class__(sample=out.sample * float("nan")))
    with pytest.raises(ValueError, match="sampling produced NaN"):
        pipe(batch_size=1, num_inference_steps=4)
    assert len(calls) == 7  # the loop ran to the end: no check inside the steps
    with pytest.raises(ValueError, match="sampling produced NaN"):
        EDMPipeline(pipe.unet, EDMHeunScheduler())(batch_size=1, num_inference_steps=2)


# ---------------------------------------------------------------------------------------------------------------
# The DG term at one evaluation: its window, dtypes, shapes and labels


def test_dg_term_window_is_closed_and_its_outputs_are_float64_per_sample():
    """w·σ²·∇ log r inside [σ_min, σ_max], both ends included; outside, zero correction and log r = +inf (DG's
    "accepted"); corrections and log-ratios in float64, one log-ratio per sample whatever the channel count."""
    from guidance_exact import ExactLogRatio, log_normal

    disc = ExactLogRatio(mean_real=0.3, mean_model=-0.1, std=0.2, sample_size=2, in_channels=3)
    term = DiscriminatorGuidance(disc, 1.5, 0.0, sigma_min=0.5, sigma_max=2.0)
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    for sigma in (0.5, 1.0, 2.0):
        correction, log_ratio = term.correction_and_log_ratio(x, sigma, 1.5)
        var = torch.full((2,), 0.2**2 + sigma**2, dtype=torch.float64)
        expected_log_ratio = log_normal(x.double(), 0.3, var) - log_normal(x.double(), -0.1, var)
        assert correction.dtype == log_ratio.dtype == torch.float64 and log_ratio.shape == (2,)
        assert torch.allclose(correction, torch.full_like(correction, 1.5 * sigma**2 * 0.4 / (0.04 + sigma**2)))
        assert torch.allclose(log_ratio, expected_log_ratio, rtol=1e-6)
    for sigma in (0.49, 2.01):
        correction, log_ratio = term.correction_and_log_ratio(x, sigma, 1.5)
        assert correction.dtype == log_ratio.dtype == torch.float64 and log_ratio.shape == (2,)
        assert torch.equal(correction, torch.zeros_like(correction)) and bool(torch.isinf(log_ratio).all())


def test_dg_term_passes_its_labels_to_a_class_conditional_discriminator():
    disc = make_disc(num_class_embeds=4).double()
    labels = torch.tensor([3, 0])
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    correction, log_ratio = DiscriminatorGuidance(disc, 1.0, 0.0, 0.0, math.inf, class_labels=labels) \
        .correction_and_log_ratio(x, 2.0, 1.0)
    expected, expected_log_ratio = discriminator_correction(disc, x, 2.0, labels)
    assert torch.equal(correction, expected) and torch.equal(log_ratio, expected_log_ratio.double())
    other, _ = discriminator_correction(disc, x, 2.0, torch.tensor([1, 2]))
    assert not torch.allclose(other, expected)  # the labels matter to this discriminator
