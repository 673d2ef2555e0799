"""Classifier guidance (Dhariwal & Nichol 2021) and its combination with Discriminator Guidance (DG eq. 6), under
every scheduler the guided pipeline takes: the noise-conditional classifier, exact Gaussian-mixture maths (the
classifier from Bayes' rule), bit-identity with unguided sampling at zero weights, save/load and bad input."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.utils.torch_utils import randn_tensor
from guidance_exact import ExactLogRatio, ExactMixtureClassifier, ExactMixtureNet, LinearLogProb

from diffusers_stf import Discriminator, DiscriminatorGuidedPipeline, EDMPipeline, NoiseConditionalClassifier
from diffusers_stf import EDMHeunScheduler, EDMStochasticScheduler
from diffusers_stf.models import NoiseConditionalEncoder
from diffusers_stf.guidance import classifier_correction


pytestmark = pytest.mark.usefixtures("one_thread")


def make_classifier(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(sample_size=8, in_channels=1, num_classes=10, block_out_channels=(8, 16), norm_num_groups=4)
    config.update(kwargs)
    return NoiseConditionalClassifier(**config)


def make_disc(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = dict(sample_size=8, in_channels=1, block_out_channels=(8, 16), norm_num_groups=4)
    config.update(kwargs)
    return Discriminator(**config)


def vp_tau(sigma):
    """DG's vpsde.compute_tau (β0 = 0.1, β1 = 20)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return (-0.1 + torch.sqrt(0.01 + 2 * 19.9 * torch.log(1 + sigma**2))) / 19.9


# ---------------------------------------------------------------------------------------------------------------
# The classifier


def test_classifier_shares_the_discriminator_network_and_sees_vp_inputs():
    """The same NoiseConditionalEncoder as the discriminator, with K outputs; the network gets x/√(1 + σ²) at
    noise label 999·τ(σ) (guided_diffusion's classifier inputs), and log_prob is the log-softmax at the label."""
    clf = make_classifier()
    assert isinstance(clf.encoder, NoiseConditionalEncoder) and clf.encoder.linear_out.out_features == 10
    seen = {}
    clf.encoder.register_forward_pre_hook(lambda m, args: seen.update(h=args[0].detach(), label=args[1].detach()))
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([50.0, 2.0, 0.3, 0.02], dtype=torch.float64)
    labels = torch.tensor([0, 3, 9, 3])
    with torch.no_grad():
        logits = clf(x, sigma).logits
        log_prob = clf.log_prob(x, sigma, labels)
    assert torch.allclose(seen["label"].double(), 999 * vp_tau(sigma), rtol=1e-5)
    assert torch.allclose(seen["h"], (x / torch.sqrt(1 + sigma**2).reshape(-1, 1, 1, 1)).float(), rtol=1e-5, atol=1e-7)
    expected = logits[torch.arange(4), labels] - torch.logsumexp(logits, dim=1)
    assert logits.shape == (4, 10) and torch.allclose(log_prob, expected, atol=1e-6)
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    with torch.no_grad():
        assert torch.equal(clf.log_prob(x, sigma, onehot), log_prob)


def test_classifier_correction_is_sigma_squared_times_the_input_gradient():
    """σ²·∇_x log p(y | x, σ), computed here by autograd on the log-softmax."""
    clf = make_classifier(seed=1).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([4.0, 0.5, 0.1], dtype=torch.float64)
    labels = torch.tensor([1, 2, 7])
    xg = x.clone().requires_grad_(True)
    logp = torch.log_softmax(clf(xg, sigma).logits, dim=1)[torch.arange(3), labels]
    (grad,) = torch.autograd.grad(logp.sum(), xg)
    correction = classifier_correction(clf, x, sigma, labels)
    assert torch.allclose(correction, sigma.reshape(-1, 1, 1, 1) ** 2 * grad, rtol=1e-6, atol=1e-12)


def test_classifier_save_load_round_trip(tmp_path):
    clf = make_classifier(num_classes=3, preconditioning="edm")
    clf.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = NoiseConditionalClassifier.from_pretrained(tmp_path)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.7).logits, clf(x, 0.7).logits)


# ---------------------------------------------------------------------------------------------------------------
# Zero weights: bit-identical to unguided sampling, for every scheduler


def reference_loop(unet, scheduler, batch_size, steps, generator):
    """diffusers' standard loop (as its Euler/EDM-Euler examples): float32 latents × init_noise_sigma."""
    scheduler.set_timesteps(steps)
    x = randn_tensor((batch_size, 1, 8, 8), generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(out, t, x, generator=generator).prev_sample
    return (x / 2 + 0.5).clamp(0, 1)


def unguided_reference(name, unet, steps):
    gen = torch.Generator().manual_seed(5)
    if name == "ddpm":
        return torch.from_numpy(DDPMPipeline(unet, DDPMScheduler())(batch_size=3, num_inference_steps=steps, generator=gen, output_type="np").images).permute(0, 3, 1, 2)
    if name == "ddim":
        return torch.from_numpy(DDIMPipeline(unet, DDIMScheduler())(batch_size=3, num_inference_steps=steps, generator=gen, output_type="np").images).permute(0, 3, 1, 2)
    if name == "euler":
        return reference_loop(unet, EulerDiscreteScheduler(), 3, steps, gen)
    if name == "edm_euler":
        return reference_loop(unet, EDMEulerScheduler(), 3, steps, gen)
    scheduler = EDMHeunScheduler() if name == "edm_heun" else EDMStochasticScheduler(s_churn=20.0)
    pipe = EDMPipeline(unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=3, num_inference_steps=steps, generator=gen, output_type="pt").images


SCHEDULERS = {
    "ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "edm_euler": EDMEulerScheduler,
    "edm_heun": EDMHeunScheduler, "edm_stochastic": lambda: EDMStochasticScheduler(s_churn=20.0),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_zero_weights_and_no_components_are_bit_identical_to_unguided_sampling(name):
    unet = make_tiny_unet(0)
    unet.set_progress_bar_config = None
    expected = unguided_reference(name, unet, 6)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    kw = dict(batch_size=3, num_inference_steps=6, output_type="pt")
    full = DiscriminatorGuidedPipeline(unet, SCHEDULERS[name](), make_disc(), make_classifier())
    empty = DiscriminatorGuidedPipeline(unet, SCHEDULERS[name]())
    for pipe in (full, empty):
        pipe.set_progress_bar_config(disable=True)
    zero = full(generator=gen(), dg_weight_1st_order=0.0, classifier_guidance_scale=0.0, class_labels=[1, 2, 3], **kw).images
    none = empty(generator=gen(), **kw).images
    assert torch.equal(zero, expected) and torch.equal(none, expected)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_guidance_at_weight_two_moves_the_samples_by_twice_the_exact_shift(name):
    """Guidance on, under the same schedulers, with exact Gaussian parts whose effect has a closed form: on the
    network of N(μ, s²), DG at weight w with the exact log-ratio to N(μ', s²) is the score of N(μ + w·(μ' − μ), s²),
    and classifier guidance at scale w with ∇log p(y | x, σ) = (2y − 1)·δ/(s² + σ²) that of N(μ + w·(2y − 1)·δ, s²)
    (tests/guidance_exact.py). At w = 2 the samples must be those of these exact networks, from the same noise."""
    parametrisation = "edm" if name.startswith("edm") else "ddpm"
    mu, mu_real, std, delta, w = 0.1, 0.2, 0.2, 0.05, 2.0
    net = lambda mean: ExactMixtureNet(means=(mean,), weights=(1.0,), std=std, sample_size=4,  # noqa: E731
                                       parametrisation=parametrisation)
    disc = ExactLogRatio(mean_real=mu_real, mean_model=mu, std=std, sample_size=4)
    pipe = DiscriminatorGuidedPipeline(net(mu), SCHEDULERS[name](), disc, LinearLogProb(shift=delta, std=std, sample_size=4))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=64, num_inference_steps=6, output_type="pt")
    run = lambda p, **extra: p(generator=torch.Generator().manual_seed(5), **kw, **extra).images.double() * 2 - 1  # noqa: E731
    labels = torch.arange(64) % 2
    dg = run(pipe, dg_weight_1st_order=w, dg_weight_2nd_order=w, dg_sigma_min=0.0, dg_sigma_max=math.inf)
    cg = run(pipe, dg_weight_1st_order=0.0, classifier_guidance_scale=w, class_labels=labels)
    plain = run(pipe, dg_weight_1st_order=0.0)
    for guided, rows, mean in ((dg, labels >= 0, mu + w * (mu_real - mu)), (cg, labels == 0, mu - w * delta),
                               (cg, labels == 1, mu + w * delta)):
        exact = DiscriminatorGuidedPipeline(net(mean), SCHEDULERS[name]())
        exact.set_progress_bar_config(disable=True)
        target = run(exact)
        assert (guided[rows] - target[rows]).abs().max() < 2e-3, (name, mean, float((guided - target)[rows].abs().max()))
        # the shift of the mean, sample by sample (the sampler's path is an affine map of the same noise)
        shift = float((guided[rows] - plain[rows]).mean())
        assert abs(shift - (mean - mu)) < 0.2 * abs(mean - mu), (name, shift, mean - mu)


# ---------------------------------------------------------------------------------------------------------------
# Exact classifier guidance: a two-class Gaussian mixture, the exact denoiser and p(y | x, σ) by Bayes' rule


MEANS, WEIGHTS, STD = (-0.4, 0.3), (0.5, 0.5), 0.15


def mixture_pipeline(scheduler, parametrisation, prediction_type, means=MEANS, weights=WEIGHTS, classifier=True):
    unet = ExactMixtureNet(means=means, weights=weights, std=STD, sample_size=2, parametrisation=parametrisation,
                           prediction_type=prediction_type)
    clf = ExactMixtureClassifier(means=means, weights=weights, std=STD, sample_size=2) if classifier else None
    pipe = DiscriminatorGuidedPipeline(unet, scheduler, classifier=clf)
    pipe.set_progress_bar_config(disable=True)
    return pipe


EXACT_CG = [
    ("edm_heun", lambda: EDMHeunScheduler(), "edm", "epsilon", 18),
    ("ddim", lambda: DDIMScheduler(clip_sample=False), "ddpm", "epsilon", 50),
    ("ddpm", lambda: DDPMScheduler(clip_sample=False), "ddpm", "epsilon", 200),
    ("euler_v", lambda: EulerDiscreteScheduler(prediction_type="v_prediction"), "ddpm", "v_prediction", 50),
]


@pytest.mark.parametrize("name,make_scheduler,parametrisation,prediction_type,steps", EXACT_CG, ids=[c[0] for c in EXACT_CG])
def test_exact_classifier_guidance_samples_the_requested_class(name, make_scheduler, parametrisation, prediction_type, steps):
    """With w_CG = 1, ∇log p(x) + ∇log p(y | x) = ∇log p(x | y): the guided sampler of the mixture is the sampler of
    class y's Gaussian N(m_y, s²) — the same samples from the same noise — and each half of the batch has its class mean."""
    n = 600
    labels = torch.cat([torch.zeros(n // 2, dtype=torch.long), torch.ones(n // 2, dtype=torch.long)])
    pipe = mixture_pipeline(make_scheduler(), parametrisation, prediction_type)
    kw = dict(batch_size=n, num_inference_steps=steps, output_type="pt")
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    guided = pipe(generator=gen(), class_labels=labels, classifier_guidance_scale=1.0, **kw).images.double() * 2 - 1
    for k in (0, 1):
        rows = labels == k
        target_pipe = mixture_pipeline(make_scheduler(), parametrisation, prediction_type, means=(MEANS[k],), weights=(1.0,),
                                       classifier=False)
        target = target_pipe(generator=gen(), **kw).images.double() * 2 - 1
        assert (guided[rows] - target[rows]).abs().max() < 1e-3, (name, k, float((guided[rows] - target[rows]).abs().max()))
        assert abs(float(guided[rows].mean()) - MEANS[k]) < 0.015, (name, k, float(guided[rows].mean()))
    plain = pipe(generator=gen(), **kw).images.double() * 2 - 1  # unguided: both modes in each half
    assert abs(float(plain[labels == 0].mean()) - sum(MEANS) / 2) < 0.1


def test_exact_classifier_guidance_inside_the_boosted_sampler():
    """Boosting runs its own per-sample loop on the EDM sampler core; with a discriminator whose log-ratio is exactly 0
    (data = model: no rejection, no DG correction) and w_CG = 1 it still samples class y's Gaussian."""
    n = 200
    labels = torch.cat([torch.zeros(n // 2, dtype=torch.long), torch.ones(n // 2, dtype=torch.long)])
    unet = ExactMixtureNet(means=MEANS, weights=WEIGHTS, std=STD, sample_size=2, parametrisation="edm")
    disc = ExactLogRatio(std=STD, sample_size=2, means_real=MEANS, weights_real=WEIGHTS, means_model=MEANS,
                         weights_model=WEIGHTS)
    clf = ExactMixtureClassifier(means=MEANS, weights=WEIGHTS, std=STD, sample_size=2)
    pipe = DiscriminatorGuidedPipeline(unet, EDMHeunScheduler(), disc, clf)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=n, num_inference_steps=18, output_type="pt")
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    boosted = pipe(generator=gen(), class_labels=labels, classifier_guidance_scale=1.0, dg_weight_1st_order=1.0,
                   boosting=True, **kw).images.double() * 2 - 1
    for k in (0, 1):
        rows = labels == k
        target = mixture_pipeline(EDMHeunScheduler(), "edm", "epsilon", means=(MEANS[k],), weights=(1.0,),
                                  classifier=False)(generator=gen(), **kw).images.double() * 2 - 1
        assert (boosted[rows] - target[rows]).abs().max() < 1e-3, (k, float((boosted[rows] - target[rows]).abs().max()))


@pytest.mark.parametrize("make_scheduler,parametrisation,steps", [(lambda: EDMHeunScheduler(), "edm", 18),
                                                                    (lambda: DDIMScheduler(clip_sample=False), "ddpm", 50)],
                         ids=["edm_heun", "ddim"])
def test_classifier_and_discriminator_guidance_add_up_to_the_data_class(make_scheduler, parametrisation, steps):
    """DG eq. 6 with exact parts: the model's mixture has the wrong means and weights; the discriminator's log ratio
    is log p_data,σ − log p_model,σ and the classifier is the data's Bayes classifier. With both weights 1,
    s_θ + ∇log r + ∇log p(y | x) = ∇log p_data(x | y): the samples of class y's data Gaussian, from the same noise."""
    data_means, model_means, model_weights = (-0.3, 0.35), (-0.4, 0.2), (0.7, 0.3)
    unet = ExactMixtureNet(means=model_means, weights=model_weights, std=STD, sample_size=2,
                           parametrisation=parametrisation)
    disc = ExactLogRatio(std=STD, sample_size=2, means_real=data_means, weights_real=WEIGHTS, means_model=model_means,
                         weights_model=model_weights)
    clf = ExactMixtureClassifier(means=data_means, weights=WEIGHTS, std=STD, sample_size=2)
    pipe = DiscriminatorGuidedPipeline(unet, make_scheduler(), disc, clf)
    pipe.set_progress_bar_config(disable=True)
    n = 400
    labels = torch.cat([torch.zeros(n // 2, dtype=torch.long), torch.ones(n // 2, dtype=torch.long)])
    kw = dict(batch_size=n, num_inference_steps=steps, output_type="pt")
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    both = pipe(generator=gen(), class_labels=labels, classifier_guidance_scale=1.0, dg_weight_1st_order=1.0,
                dg_weight_2nd_order=1.0, dg_sigma_min=0.0, dg_sigma_max=math.inf, **kw).images.double() * 2 - 1
    for k in (0, 1):
        rows = labels == k
        target = mixture_pipeline(make_scheduler(), parametrisation, "epsilon", means=(data_means[k],), weights=(1.0,),
                                  classifier=False)(generator=gen(), **kw).images.double() * 2 - 1
        assert (both[rows] - target[rows]).abs().max() < 1e-3, (k, float((both[rows] - target[rows]).abs().max()))
        assert abs(float(both[rows].mean()) - data_means[k]) < 0.02


# ---------------------------------------------------------------------------------------------------------------
# Save / load, bad input


def test_save_load_with_a_classifier(tmp_path):
    pipe = DiscriminatorGuidedPipeline(make_tiny_unet(0), EDMHeunScheduler(), make_disc(), make_classifier())
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both" / "classifier" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pkl"))
    loaded = DiscriminatorGuidedPipeline.from_pretrained(tmp_path / "both")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.classifier, NoiseConditionalClassifier)
    kw = dict(batch_size=2, num_inference_steps=4, output_type="pt", class_labels=[3, 4], classifier_guidance_scale=2.0)
    a = pipe(generator=torch.Generator().manual_seed(1), **kw).images
    b = loaded(generator=torch.Generator().manual_seed(1), **kw).images
    assert torch.equal(a, b)
    # diffusers alone, through the remote code written at save time
    from diffusers import DiffusionPipeline

    plain = DiffusionPipeline.from_pretrained(tmp_path / "both", trust_remote_code=True)
    plain.set_progress_bar_config(disable=True)
    assert type(plain.classifier).__name__ == "NoiseConditionalClassifier"
    assert torch.equal(plain(generator=torch.Generator().manual_seed(1), **kw).images, a)
    only = DiscriminatorGuidedPipeline(make_tiny_unet(0), DDIMScheduler(), classifier=make_classifier())
    only.save_pretrained(tmp_path / "only")
    reloaded = DiscriminatorGuidedPipeline.from_pretrained(tmp_path / "only")
    assert reloaded.discriminator is None and isinstance(reloaded.classifier, NoiseConditionalClassifier)
    assert isinstance(reloaded.scheduler, DDIMScheduler)


def test_bad_input_raises_clear_errors():
    unet = make_tiny_unet(0)
    with pytest.raises(ValueError, match="classifier classifies 1-channel 16x16"):
        DiscriminatorGuidedPipeline(unet, EDMHeunScheduler(), classifier=make_classifier(sample_size=16))
    with pytest.raises(ValueError, match="classifier classifies 3-channel"):
        DiscriminatorGuidedPipeline(unet, EDMHeunScheduler(), classifier=make_classifier(in_channels=3))
    pipe = DiscriminatorGuidedPipeline(unet, EDMHeunScheduler())
    with pytest.raises(ValueError, match="classifier_guidance_scale=1.0 needs a classifier"):
        pipe(classifier_guidance_scale=1.0, class_labels=[0])
    pipe = DiscriminatorGuidedPipeline(unet, EDMHeunScheduler(), classifier=make_classifier())
    with pytest.raises(ValueError, match="needs class_labels"):
        pipe(classifier_guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 9\]"):
        pipe(batch_size=2, classifier_guidance_scale=1.0, class_labels=[3, 10])
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 9\]"):
        pipe(batch_size=2, classifier_guidance_scale=1.0, class_labels=torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="one label per image"):
        pipe(batch_size=3, classifier_guidance_scale=1.0, class_labels=[1, 2])
    with pytest.raises(ValueError, match="classifier_guidance_scale must be a finite number >= 0"):
        pipe(classifier_guidance_scale=-1.0, class_labels=[1])
    with pytest.raises(ValueError, match="classifier_guidance_scale must be a finite number >= 0"):
        pipe(classifier_guidance_scale=float("nan"), class_labels=[1])
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler: its config has no preconditioning"):
        DiscriminatorGuidedPipeline(unet, FlowMatchEulerDiscreteScheduler(), classifier=make_classifier())(
            classifier_guidance_scale=1.0, class_labels=[1])
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler: prediction_type 'flow_prediction'"):
        DiscriminatorGuidedPipeline(unet, DPMSolverMultistepScheduler(prediction_type="flow_prediction"),
                                    classifier=make_classifier())(classifier_guidance_scale=1.0, class_labels=[1])
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        DiscriminatorGuidedPipeline(unet, DDPMScheduler(prediction_type="flow"), classifier=make_classifier())(
            classifier_guidance_scale=1.0, class_labels=[1])
    with pytest.raises(ValueError, match="boosting=True needs one of our EDM schedulers"):
        DiscriminatorGuidedPipeline(unet, DDIMScheduler(), make_disc())(boosting=True)
    with pytest.raises(ValueError, match="num_classes"):
        make_classifier(num_classes=1)


# ---------------------------------------------------------------------------------------------------------------
# examples/train_classifier.py


def _train_classifier_main():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "train_classifier.py")
    spec = importlib.util.spec_from_file_location("train_classifier", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_RUN = ["--max_train_steps", "4", "--num_validation_images", "4", "--validation_steps", "2",
            "--checkpointing_steps", "2", "--no_progress_bar", "--clf_block_out_channels", "8,16",
            "--clf_norm_num_groups", "4", "--train_batch_size", "16", "--report_to", "none", "--num_heldout_images", "16",
            "--num_inference_steps", "2"]


def test_train_classifier_script_on_the_digits_saves_a_guided_pipeline(tmp_path):
    import json

    module = _train_classifier_main()
    EDMPipeline(make_tiny_unet(0), EDMHeunScheduler()).save_pretrained(tmp_path / "edm")
    out = tmp_path / "run"
    result = module.main(["--pretrained_model_name_or_path", str(tmp_path / "edm"), "--output_dir", str(out), *TINY_RUN])
    assert result.step == 4
    pipe = DiscriminatorGuidedPipeline.from_pretrained(out)
    assert isinstance(pipe.classifier, NoiseConditionalClassifier) and pipe.classifier.config.num_classes == 10
    assert pipe.discriminator is None
    rows = [json.loads(line) for line in (out / "logs" / "validation.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "accuracy_sigma_0.05" in rows[-1]
    card = (out / "README.md").read_text()
    assert "classifier guidance" in card and "classifier_guidance_scale" in card
    assert (out / "samples.png").exists()


def test_train_classifier_reads_labels_from_class_subfolders(tmp_path):
    """An imagefolder with one subfolder per class: the labels are the subfolders; without a score model only the
    classifier is saved; the σ law is the discriminator's."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(("cats", "dogs", "owls")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray((rng.random((8, 8)) * 80 + 80 * k).astype(np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    module = _train_classifier_main()
    out = tmp_path / "run"
    module.main(["--train_data_dir", str(tmp_path / "data"), "--output_dir", str(out), *TINY_RUN[:-2],
                 "--train_batch_size", "8", "--num_heldout_images", "6"])
    classifier = NoiseConditionalClassifier.from_pretrained(out)
    assert classifier.config.num_classes == 3 and classifier.config.sample_size == 8
    # saved alone, it still carries its code for diffusers' AutoModel (tests/test_hub.py loads such folders plainly)
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]["AutoModel"]
    assert (out / (auto_map.split(".")[0] + ".py")).is_file() and auto_map.endswith(".NoiseConditionalClassifier")

    from diffusers_stf.losses.discriminator import DG_TRAIN_SIGMA_MAX, DG_TRAIN_SIGMA_MIN

    parser = module.build_parser()
    defaults = parser.parse_args([])
    assert (defaults.sigma_min, defaults.sigma_max) == (DG_TRAIN_SIGMA_MIN, DG_TRAIN_SIGMA_MAX)
    with pytest.raises(ValueError, match="--sigma_min"):
        module.main(["--output_dir", str(tmp_path / "bad"), "--sigma_min", "2", "--sigma_max", "1", *TINY_RUN])


def test_classifier_term_defaults_to_scale_one_and_differentiates_in_the_classifiers_dtype():
    """Dhariwal & Nichol's s = 1 by default; the gradient is taken in the classifier's own dtype (float32 here) and
    returned in float64."""
    from diffusers_stf.guidance import ClassifierGuidance

    seen = []

    class Float32Classifier(LinearLogProb):
        def log_prob(self, sample, sigma, class_labels):
            seen.append(sample.dtype)
            return super().log_prob(sample, sigma, class_labels)

    clf = Float32Classifier(shift=0.05, std=0.2, sample_size=2).float()
    term = ClassifierGuidance(clf, torch.tensor([1, 0]))
    assert term.guidance_scale == 1.0
    x = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    delta = classifier_correction(clf, x, 1.0, torch.tensor([1, 0]))
    assert seen == [torch.float32] and delta.dtype == torch.float64
    assert torch.allclose(delta[0], torch.full_like(delta[0], 0.05 / 1.04)) and torch.allclose(delta[1], -delta[0])
