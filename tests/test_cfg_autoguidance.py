"""Classifier-free guidance and autoguidance are exact, against closed-form Gaussian models (tests/guidance_exact.py).

* CFG ≡ classifier guidance: for a two-class mixture, Tweedie gives D_c − D_u = σ²·∇ log p(y | x), so CFG at scale w
  with the exact conditional/unconditional denoisers is classifier guidance at scale w with the exact classifier.
* Autoguidance: a guide whose output is 2·(good) − (target) (every parametrisation is affine in D) gives, at w = 2,
  D_guide + 2·(D_good − D_guide) = D_target: the samples of the target model.
"""

import math

import pytest
import torch
from diffusers import ConfigMixin, DDIMScheduler, DPMSolverMultistepScheduler, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from guidance_exact import ExactMixtureClassifier, ExactMixtureNet
from test_guidance_schedulers import CASES, IDS, assert_same_samples, exact_net, plain_loop, sample

from diffusers_stf import DiscriminatorGuidedPipeline, EDMHeunScheduler, EDMPipeline

pytestmark = pytest.mark.usefixtures("one_thread")

MEANS, WEIGHTS, STD = (-0.4, 0.3), (0.5, 0.5), 0.15


def conditional_mixture(parametrisation, prediction_type):
    """The exact class-conditional network of the mixture: label k is class k's Gaussian, label 2 (null) the mixture."""
    return ExactMixtureNet(means=MEANS, weights=WEIGHTS, std=STD, sample_size=2, parametrisation=parametrisation,
                           prediction_type=prediction_type, num_class_embeds=3)


CFG_SCHEDULERS = [
    ("edm_heun", lambda: EDMHeunScheduler(), "edm", "epsilon", 12),
    ("ddim", lambda: DDIMScheduler(clip_sample=False), "ddpm", "epsilon", 25),
    ("dpmsolver", lambda: DPMSolverMultistepScheduler(), "ddpm", "epsilon", 15),
    ("dpmsolver_v", lambda: DPMSolverMultistepScheduler(prediction_type="v_prediction"), "ddpm", "v_prediction", 15),
]


@pytest.mark.parametrize("w", [1.0, 3.0])
@pytest.mark.parametrize("name,make,parametrisation,prediction_type,steps", CFG_SCHEDULERS,
                         ids=[c[0] for c in CFG_SCHEDULERS])
def test_cfg_equals_classifier_guidance_with_the_exact_classifier(name, make, parametrisation, prediction_type,
                                                                   steps, w):
    n = 128
    labels = torch.arange(n) % 2
    cfg = DiscriminatorGuidedPipeline(conditional_mixture(parametrisation, prediction_type), make(), null_class_label=2)
    by_cfg = sample(cfg, steps, n, class_labels=labels, guidance_scale=w)
    mixture = exact_net(parametrisation, prediction_type, MEANS, WEIGHTS, STD, 2)
    clf = ExactMixtureClassifier(means=MEANS, weights=WEIGHTS, std=STD, sample_size=2)
    cg = DiscriminatorGuidedPipeline(mixture, make(), classifier=clf)
    by_classifier = sample(cg, steps, n, class_labels=labels, classifier_guidance_scale=w)
    assert_same_samples(by_cfg, by_classifier, (name, w))
    if w == 3.0:  # guidance beyond the class: the class means move past m_y, away from the other class
        assert float(by_cfg[labels == 0].mean()) < MEANS[0] - 0.01 and float(by_cfg[labels == 1].mean()) > MEANS[1] + 0.01


def test_cfg_at_scale_one_is_one_conditional_evaluation_bit_identical_to_plain_sampling():
    net = conditional_mixture("edm", "epsilon")
    calls = []
    net.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    pipe = EDMPipeline(net, EDMHeunScheduler(), null_class_label=2)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.tensor([0, 1, 1])
    kwargs = dict(batch_size=3, num_inference_steps=6, output_type="pt", class_labels=labels)
    plain = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert calls == [3] * 11  # one batch of 3 rows per evaluation, 2·6 − 1 evaluations
    calls.clear()
    one = pipe(generator=torch.Generator().manual_seed(1), guidance_scale=1.0, **kwargs).images
    assert torch.equal(one, plain) and calls == [3] * 11
    calls.clear()
    pipe(generator=torch.Generator().manual_seed(1), guidance_scale=2.0, **kwargs)
    assert calls == [6] * 11  # conditional and unconditional halves in one batched forward


class LinearCombination(ModelMixin, ConfigMixin):
    """Σ_i c_i·net_i(x, t): a network whose output is a fixed linear combination of others' outputs."""

    @register_to_config
    def __init__(self, sample_size=4, in_channels=1, out_channels=1, num_class_embeds=None):
        super().__init__()

    @classmethod
    def of(cls, nets, coefficients):
        c = nets[0].config
        combination = cls(c.sample_size, c.in_channels, c.out_channels, c.num_class_embeds)
        combination.nets, combination.coefficients = torch.nn.ModuleList(nets), coefficients
        return combination

    def forward(self, sample, timestep, class_labels=None):
        out = sum(c * net(sample, timestep, class_labels=class_labels).sample.double()
                  for c, net in zip(self.coefficients, self.nets))
        return type("Out", (), {"sample": out.float()})


@pytest.mark.parametrize("name,make,parametrisation,prediction_type,steps", CASES, ids=IDS)
def test_autoguidance_with_guide_two_good_minus_target_samples_the_target(name, make, parametrisation,
                                                                           prediction_type, steps):
    good = exact_net(parametrisation, prediction_type, (0.05,), (1.0,), 0.2, 4)
    target = exact_net(parametrisation, prediction_type, (0.25,), (1.0,), 0.2, 4)
    guide = LinearCombination.of([good, target], (2.0, -1.0))
    pipe = EDMPipeline(good, make(prediction_type))
    pipe.register_modules(guide_unet=guide)
    guided = sample(pipe, steps, 256, autoguidance_scale=2.0)
    expected = sample(EDMPipeline(target, make(prediction_type)), steps, 256)
    assert_same_samples(guided, expected, name)
    plain = sample(EDMPipeline(good, make(prediction_type)), steps, 256)
    assert float(expected.mean() - plain.mean()) > 0.05


def test_an_interval_without_a_schedule_sigma_is_bit_identical_to_unguided():
    """Guidance restricted to an interval that holds no σ of the schedule changes nothing, bit for bit; the same
    guidance without the interval gives its exact samples: CFG at w = 4 those of classifier guidance with the exact
    classifier, autoguidance at w = 1.5 with a guide N(0, s²) of the classes' s those of class k's N(1.5·m_k, s²)."""
    net = conditional_mixture("edm", "epsilon")
    guide = exact_net("edm", "epsilon", (0.0,), (1.0,), STD, 2)
    pipe = EDMPipeline(net, EDMHeunScheduler(), null_class_label=2)
    pipe.register_modules(guide_unet=LinearCombination.of([guide], (1.0,)))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler.set_timesteps(6)
    levels = sorted(set(pipe.scheduler.sigmas.tolist()) | set(pipe.scheduler.sigmas_hat.tolist()))
    gap = next((a, b) for a, b in zip(levels, levels[1:]) if b > a * 1.5)  # between two consecutive σ of the schedule
    interval = (gap[0] * 1.1, gap[1] * 0.9)
    labels = torch.arange(32) % 2
    kwargs = dict(batch_size=32, num_inference_steps=6, output_type="pt", class_labels=labels)
    plain = pipe(generator=torch.Generator().manual_seed(2), **kwargs).images
    clf = ExactMixtureClassifier(means=MEANS, weights=WEIGHTS, std=STD, sample_size=2)
    by_classifier = DiscriminatorGuidedPipeline(exact_net("edm", "epsilon", MEANS, WEIGHTS, STD, 2), EDMHeunScheduler(),
                                                classifier=clf)
    scaled_classes = ExactMixtureNet(means=tuple(1.5 * m for m in MEANS), weights=WEIGHTS, std=STD, sample_size=2,
                                     num_class_embeds=3)
    exact = {"guidance_scale": sample(by_classifier, 6, 32, seed=2, class_labels=labels, classifier_guidance_scale=4.0),
             "autoguidance_scale": sample(EDMPipeline(scaled_classes, EDMHeunScheduler()), 6, 32, seed=2,
                                          class_labels=labels)}
    for guidance in ({"guidance_scale": 4.0}, {"autoguidance_scale": 1.5}):
        kept = pipe(generator=torch.Generator().manual_seed(2), guidance_interval=interval, **guidance, **kwargs).images
        assert torch.equal(kept, plain)
        moved = pipe(generator=torch.Generator().manual_seed(2), **guidance, **kwargs).images.double() * 2 - 1
        assert_same_samples(moved, exact[next(iter(guidance))], guidance)


def test_zero_effect_scales_are_bit_identical_to_the_plain_loop_under_every_scheduler():
    for name, make, parametrisation, prediction_type, steps in CASES[::4]:
        net = exact_net(parametrisation, prediction_type, (0.1,), (1.0,), 0.2, 4)
        pipe = EDMPipeline(net, make(prediction_type))
        pipe.register_modules(guide_unet=exact_net(parametrisation, prediction_type, (0.0,), (1.0,), 0.2, 4))
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=3, num_inference_steps=steps, generator=torch.Generator().manual_seed(3),
                      output_type="pt", autoguidance_scale=1.0).images
        assert torch.equal(images, plain_loop(net, make(prediction_type), steps, 3, 3)), name


def tiny_unet(num_class_embeds=None, sample_size=8, block_out_channels=(8, 16)):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=sample_size, in_channels=1, out_channels=1, block_out_channels=block_out_channels,
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=num_class_embeds)


def test_bad_input_names_the_argument():
    conditional = EDMPipeline(tiny_unet(11), EDMHeunScheduler(), null_class_label=10)
    unconditional = EDMPipeline(tiny_unet(), EDMHeunScheduler())
    kwargs = dict(batch_size=2, num_inference_steps=2)
    with pytest.raises(ValueError, match="guidance_scale=2.0 .* needs a class-conditional unet and class_labels"):
        unconditional(guidance_scale=2.0, **kwargs)
    with pytest.raises(ValueError, match="the unet is class-conditional: pass class_labels"):
        conditional(guidance_scale=2.0, **kwargs)
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 9\]"):
        conditional(guidance_scale=2.0, class_labels=[10, 1], **kwargs)  # the null label is not a request
    with pytest.raises(ValueError, match="class_labels must be integer class indices"):
        conditional(class_labels=torch.tensor([0.0, 1.0]), **kwargs)
    with pytest.raises(ValueError, match="one label per image"):
        conditional(class_labels=[1, 2, 3], **kwargs)
    with pytest.raises(ValueError, match="needs the unet's null label"):
        EDMPipeline(tiny_unet(11), EDMHeunScheduler())(guidance_scale=2.0, class_labels=[1, 2], **kwargs)
    with pytest.raises(ValueError, match="null_class_label must be a label index"):
        EDMPipeline(tiny_unet(11), EDMHeunScheduler(), null_class_label=11)
    with pytest.raises(ValueError, match="autoguidance_scale=2.0 needs a guide_unet"):
        unconditional(autoguidance_scale=2.0, **kwargs)
    with pytest.raises(ValueError, match="guide_unet has sample_size=16"):
        EDMPipeline(tiny_unet(), EDMHeunScheduler(), guide_unet=tiny_unet(sample_size=16))
    with pytest.raises(ValueError, match=r"guidance_interval must satisfy 0 <= sigma_lo < sigma_hi"):
        unconditional(guidance_interval=(2.0, 1.0), **kwargs)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        conditional(guidance_scale=math.nan, class_labels=[1, 2], **kwargs)


def test_a_guide_trained_with_another_preconditioning_is_refused(tmp_path):
    from diffusers_stf import EDMHeunScheduler as Scheduler

    EDMPipeline(tiny_unet(), Scheduler(preconditioning="vp")).save_pretrained(tmp_path / "guide")
    guide = UNet2DModel.from_pretrained(tmp_path / "guide", subfolder="unet")
    with pytest.raises(ValueError, match="guide_unet was trained with another preconditioning"):
        EDMPipeline(tiny_unet(), Scheduler(), guide_unet=guide)
    EDMPipeline(tiny_unet(), Scheduler(preconditioning="vp"), guide_unet=guide)  # the same one is accepted


# ---------------------------------------------------------------------------------------------------------------
# The terms themselves, at one evaluation


class RecordingGuide(torch.nn.Module):
    """A guide network F_g(x_in, t) = 0.5·x_in + t, in float64, remembering its inputs."""

    def __init__(self, num_class_embeds=None):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.config = {"num_class_embeds": num_class_embeds}
        self.seen = {}

    @property
    def dtype(self):
        return self.anchor.dtype

    def forward(self, x, t, class_labels=None):
        self.seen.update(x=x, t=t, class_labels=class_labels)
        return type("Out", (), {"sample": 0.5 * x + t.reshape(-1, 1, 1, 1)})


@pytest.mark.parametrize("conditional", [False, True])
def test_autoguidance_term_is_w_minus_one_times_the_denoiser_difference(conditional):
    """ΔD = (w − 1)·(D_1 − D_0) in float64 (Karras et al. 2024, eq. 1), the guide evaluated at the main network's
    own input (in the guide's dtype) and timestep (float32, one per sample), with the labels only if it takes them."""
    from diffusers_stf.guidance import Autoguidance, GuidedEvaluation
    from diffusers_stf.preconditioning import EDMPreconditioning

    p, sigma, w = EDMPreconditioning(), 1.3, 2.5
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    model_output = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    model_input = (x / math.sqrt(sigma**2 + 0.25)).float()
    labels = torch.tensor([1, 0])
    guide = RecordingGuide(num_class_embeds=3 if conditional else None)
    term = Autoguidance(guide, w, conditional=conditional)
    evaluation = GuidedEvaluation(x, sigma, model_output, p, model_input=model_input,
                                  timestep=torch.tensor(math.log(sigma) / 4), class_labels=labels)
    delta = term.correction(evaluation)
    guide_output = 0.5 * model_input.double() + math.log(sigma) / 4
    c_out = sigma * 0.5 / math.sqrt(sigma**2 + 0.25)
    expected = (w - 1) * c_out * (model_output.double() - guide_output)  # D_1 − D_0 = c_out·(F_1 − F_0)
    assert delta.dtype == torch.float64 and torch.allclose(delta, expected, rtol=1e-6)
    assert guide.seen["x"].dtype == torch.float64 and torch.equal(guide.seen["x"], model_input.double())
    assert guide.seen["t"].dtype == torch.float32 and guide.seen["t"].shape == (2,)
    assert (guide.seen["class_labels"] is labels) if conditional else guide.seen["class_labels"] is None


def test_scale_one_switches_cfg_and_autoguidance_off():
    """w = 1 is plain sampling: the terms are inactive at every σ (no extra rows, no guide evaluation)."""
    from diffusers_stf.guidance import Autoguidance, ClassifierFreeGuidance

    for term in (ClassifierFreeGuidance(1.0, 2), Autoguidance(RecordingGuide(), 1.0)):
        assert not term.is_active(1.0) and not term.is_active(1.0, first_order=False)
    for term in (ClassifierFreeGuidance(0.0, 2), Autoguidance(RecordingGuide(), 0.0),
                 ClassifierFreeGuidance(3.0, 2), Autoguidance(RecordingGuide(), 3.0)):
        assert term.is_active(1.0) and term.weight(True) == term.guidance_scale - 1


def test_cfg_term_is_w_minus_one_times_conditional_minus_unconditional():
    from diffusers_stf.guidance import ClassifierFreeGuidance, GuidedEvaluation
    from diffusers_stf.preconditioning import EDMPreconditioning

    p, sigma, w = EDMPreconditioning(), 0.8, 3.0
    x = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    conditional, unconditional = (torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    term = ClassifierFreeGuidance(w, null_class_label=5)
    assert torch.equal(term.network_labels(torch.tensor([1, 3])), torch.tensor([5, 5]))
    evaluation = GuidedEvaluation(x, sigma, conditional, p, extra_outputs={id(term): unconditional})
    c_out = sigma * 0.5 / math.sqrt(sigma**2 + 0.25)
    delta = term.correction(evaluation)
    assert delta.dtype == torch.float64
    assert torch.allclose(delta, (w - 1) * c_out * (conditional - unconditional).double(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# guidance/base.py: the checks every term uses, the window, σ per sample, the σ²·gradient


@pytest.mark.parametrize("value", [True, -0.1, math.nan, math.inf, "1", None])
def test_check_weight_refuses_what_is_not_a_finite_number_at_least_zero(value):
    from diffusers_stf.guidance import check_weight

    with pytest.raises(ValueError, match="my_weight must be a finite number >= 0"):
        check_weight("my_weight", value)


def test_check_weight_and_check_interval_accept_their_boundaries():
    from diffusers_stf.guidance import check_interval, check_weight

    assert check_weight("w", 0) == 0.0 and isinstance(check_weight("w", 2), float) and check_weight("w", 1.5) == 1.5
    assert check_interval("i", (0, math.inf)) == (0.0, math.inf) and check_interval("i", [0.5, 2]) == (0.5, 2.0)
    assert check_interval("i", (1.0, 1.0), strict=False) == (1.0, 1.0)
    for bad, strict in (((1.0, 1.0), True), ((2.0, 1.0), False), ((-1.0, 1.0), False), ((math.nan, 1.0), False)):
        with pytest.raises(ValueError, match=r"my_interval must satisfy 0 <= sigma_lo " + ("<" if strict else "<=")):
            check_interval("my_interval", bad, strict=strict)
    for bad in ("ab", (1.0,), None, (1.0, 2.0, 3.0), ("x", 1.0)):
        with pytest.raises(ValueError, match="my_interval must be a pair"):
            check_interval("my_interval", bad)


def test_a_term_is_active_on_its_closed_window_at_non_zero_weight():
    from diffusers_stf.guidance import ClassifierFreeGuidance

    term = ClassifierFreeGuidance(2.0, 0, sigma_interval=(0.5, 2.0))
    assert [term.is_active(s) for s in (0.49, 0.5, 1.0, 2.0, 2.01)] == [False, True, True, True, False]
    assert term.network_labels(torch.tensor([1])).tolist() == [0]
    from diffusers_stf.guidance import GuidanceTerm

    class Plain(GuidanceTerm):
        def correction(self, evaluation):
            return evaluation.x

    plain = Plain()
    assert plain.weight(True) == plain.weight(False) == 1.0 and plain.network_labels(torch.tensor([1])) is None
    assert plain.sigma_interval == (0.0, math.inf) and plain.is_active(1e6)


def test_sigma_squared_gradient_per_sample_in_the_given_dtype_under_no_grad():
    """σ²·∇ₓ f for f(x, σ) = Σ a·x²/σ (gradient 2a·x/σ), σ one level or one per sample, as a python float, a 0-d or a
    (B,) tensor; the gradient is taken in the dtype given, returned in float64 with f detached."""
    from diffusers_stf.guidance import sigma_squared_gradient

    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    seen = []

    def f(x_, sigma):
        seen.append((x_.dtype, x_.requires_grad, sigma if isinstance(sigma, float) else sigma.shape))
        s = sigma if isinstance(sigma, float) else sigma.to(x_.dtype).reshape(-1, 1, 1, 1)
        return (0.7 * x_**2 / s).flatten(1).sum(1)

    with torch.no_grad():
        for sigma in (1.5, torch.tensor(1.5), torch.tensor([1.5, 1.5, 1.5])):
            value, log_density = sigma_squared_gradient(f, torch.float32, x, sigma)
            assert value.dtype == torch.float64 and torch.allclose(value, 1.5**2 * 1.4 * x / 1.5, rtol=1e-6)
            assert not log_density.requires_grad and log_density.shape == (3,)
        per_sample, _ = sigma_squared_gradient(f, torch.float64, x, torch.tensor([0.5, 1.0, 2.0]))
    s = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64).reshape(-1, 1, 1, 1)
    assert torch.allclose(per_sample, s**2 * 1.4 * x / s, rtol=1e-12)
    assert seen[0] == (torch.float32, True, 1.5) and seen[1][2] == (3,) and seen[2][2] == (3,)
    assert seen[3][0] == torch.float64
