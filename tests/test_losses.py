"""The training losses against transcriptions of the official code, written here: EDM's VPLoss (σ law and weight),
the loss reductions of EDM's training loop, SA-DPM's ``train_ddp.py`` / ``sequence_aware_loss`` and DG's ``train.py``
(one Adam step each), and the argument checks."""

import importlib.util
import json
import math
import os

import pytest
import torch

from diffusers_stf.losses import (
    DDPMEpsilonLoss,
    DiscriminatorBCELoss,
    EDMLoss,
    SequenceAwareLoss,
    StableTargetFieldLoss,
    VELoss,
    VPLoss,
    make_denoising_loss,
    reduce_per_sample,
)
from diffusers_stf.preconditioning import (
    DDPMPreconditioning,
    EDMPreconditioning,
    VEPreconditioning,
    VPPreconditioning,
)
from diffusers_stf.noise_schedules import betas_for_schedule

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyNet(torch.nn.Module):
    """F(x, c_noise) = conv(x)·(1 + 0.01·c_noise): a network with a few parameters and a noise input."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t, class_labels=None):
        return self.conv(x) * (1 + 0.01 * t.float().reshape(-1, 1, 1, 1))


def adam_step(model, loss):
    """The gradients of ``loss`` and the parameters after one Adam step (eps 1e-8, as EDM/SA-DPM/DG)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-8)
    opt.zero_grad()
    loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.step()
    return grads, [p.detach().clone() for p in model.parameters()]


def assert_same_step(a, b):
    """Same gradients (Adam's first step is nearly scale-free, so the gradients are what tells reductions apart) and
    the same parameters after the step."""
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def batch(n=4, seed=1):
    return torch.rand(n, 2, 5, 5, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def recording_inputs(fn):
    """``fn`` wrapped to keep the noisy input x of its last call (detached) in the returned dict, under "x"."""
    seen = {}

    def wrapped(x, *args, **kwargs):
        seen["x"] = x.detach()
        return fn(x, *args, **kwargs)

    return wrapped, seen


# --- EDM Table 1 losses --------------------------------------------------------------------------------------------


def test_vp_loss_sigma_law_and_weight_transcribe_edm():
    # EDM loss.py VPLoss: t = 1 + u·(ε_t − 1), u ~ U(0, 1); σ = √(exp(½β_d t² + β_min t) − 1); weight 1/σ².
    beta_d, beta_min, eps_t = 19.9, 0.1, 1e-5
    loss = VPLoss()
    sigma = loss.sample_sigma(5000, torch.Generator().manual_seed(0))
    u = torch.rand(5000, generator=torch.Generator().manual_seed(0))
    expected = [math.sqrt(math.expm1(0.5 * beta_d * t**2 + beta_min * t)) for t in (1 + u.double() * (eps_t - 1)).tolist()]
    torch.testing.assert_close(sigma.double(), torch.tensor(expected, dtype=torch.float64), rtol=2e-6, atol=0)
    # t(σ) is uniform on [ε_t, 1]: mean (1 + ε_t)/2, variance (1 − ε_t)²/12
    t = ((beta_min**2 + 2 * beta_d * torch.log1p(sigma.double() ** 2)).sqrt() - beta_min) / beta_d
    assert t.min() >= eps_t * (1 - 1e-3) and t.max() <= 1 + 1e-6
    assert abs(float(t.mean()) - 0.5) < 0.01 and abs(float(t.var()) - 1 / 12) < 0.005
    torch.testing.assert_close(loss.weight(torch.tensor([0.5, 4.0])), torch.tensor([4.0, 1 / 16]))
    assert isinstance(loss.preconditioning, VPPreconditioning)
    # the smallest σ, at t = ε_t, is EDM's VPPrecond σ_min = 0.0010005
    assert abs(float(VPPreconditioning().sigma(torch.tensor(eps_t, dtype=torch.float64))) - 0.0010005) < 1e-7


def test_vp_loss_is_its_equation_for_a_given_sigma():
    y = batch()
    sigma = torch.tensor([0.01, 0.3, 2.0, 80.0])
    net = TinyNet()
    loss = VPLoss()
    denoiser, seen = recording_inputs(lambda x, s, class_labels=None: loss.denoiser(net)(x, s))

    per_sample = loss(denoiser, y, sigma=sigma, generator=torch.Generator().manual_seed(3)).loss
    x = seen["x"]
    # VP preconditioning, EDM Table 1: D = x − σ·F(x/√(σ²+1), 999·t(σ))
    t = ((0.1**2 + 2 * 19.9 * torch.log1p(sigma.double() ** 2)).sqrt() - 0.1) / 19.9
    s = sigma.reshape(-1, 1, 1, 1)
    D = x - s * net(x / (s**2 + 1).sqrt(), (999 * t).float())
    torch.testing.assert_close(per_sample, ((D - y) ** 2 / s**2).flatten(1).sum(1), rtol=1e-5, atol=1e-6)
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(x, y + s * noise)


def test_given_noise_is_the_perturbation_and_draws_nothing():
    y = batch()
    sigma = torch.tensor([0.01, 0.3, 2.0, 80.0])
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(11))
    loss = EDMLoss(sigma_data=0.5)

    def identity(x, s, class_labels=None):  # D(x̃) = x̃, so the loss is λ(σ)·(σ·n)²
        return x

    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    per_sample = loss(identity, y, sigma=sigma, noise=noise, generator=generator).loss
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s**2 + 0.25) / (s * 0.5) ** 2  # EDM Table 1: λ(σ) = (σ² + σ_data²)/(σ·σ_data)²
    torch.testing.assert_close(per_sample, (weight * (s * noise) ** 2).flatten(1).sum(1), rtol=1e-5, atol=1e-6)
    assert torch.equal(generator.get_state(), state)
    stf = StableTargetFieldLoss(loss, reference_batch_size=4)
    recording, seen = recording_inputs(lambda x, s, class_labels=None: x)
    stf(recording, y, None, sigma=sigma, noise=noise)
    torch.testing.assert_close(seen["x"], y + s * noise)
    with pytest.raises(ValueError, match="noise must have the shape of images"):
        loss(identity, y, sigma=sigma, noise=noise[:2])


@pytest.mark.parametrize("name,loss_cls,precond_cls", [("edm", EDMLoss, EDMPreconditioning),
                                                       ("vp", VPLoss, VPPreconditioning),
                                                       ("ve", VELoss, VEPreconditioning)])
def test_precond_selects_loss_and_preconditioning_together(name, loss_cls, precond_cls):
    loss = make_denoising_loss(name)
    assert type(loss) is loss_cls and type(loss.preconditioning) is precond_cls
    stf = StableTargetFieldLoss(loss, reference_batch_size=4)
    assert stf.preconditioning is loss.preconditioning


def test_bad_arguments_are_refused_with_their_name():
    for kwargs, name in [(dict(P_mean=float("nan")), "P_mean"), (dict(P_std=0.0), "P_std"),
                         (dict(P_std=-1.0), "P_std"), (dict(P_std=float("inf")), "P_std"),
                         (dict(sigma_data=0.0), "sigma_data")]:
        with pytest.raises(ValueError, match=name):
            EDMLoss(**kwargs)
    with pytest.raises(ValueError, match="sigma_min"):
        VELoss(sigma_min=0.0)
    with pytest.raises(ValueError, match="epsilon_t"):
        VPLoss(epsilon_t=0.0)
    with pytest.raises(ValueError, match="precond"):
        make_denoising_loss("iddpm")
    y = batch()
    for bad in ([0.1, 0.0, 1.0, 2.0], [0.1, -1.0, 1.0, 2.0], [0.1, float("nan"), 1.0, 2.0]):
        with pytest.raises(ValueError, match="sigma must be > 0"):
            EDMLoss()(lambda x, s, class_labels=None: x, y, sigma=torch.tensor(bad))
    with pytest.raises(ValueError, match="timesteps"):
        DDPMEpsilonLoss()(lambda x, t: x, y, timesteps=torch.tensor([0, 1, 1000, 3]))
    with pytest.raises(ValueError, match="reduction"):
        reduce_per_sample(y, "max")


def test_ddpm_epsilon_loss_is_ho_et_al_eq_14():
    # diffusers' DDPM training: x_t = √ᾱ_t·y + √(1 − ᾱ_t)·ε, loss (ε_θ(x_t, t) − ε)²
    y = batch()
    t = torch.tensor([0, 10, 500, 999])
    loss = DDPMEpsilonLoss()
    net = TinyNet()
    model, seen = recording_inputs(net)

    per_sample = loss(model, y, timesteps=t, generator=torch.Generator().manual_seed(4)).loss
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t].reshape(-1, 1, 1, 1)
    eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))  # ε·σ_t is the drawn noise
    x_t = (abar.sqrt() * y + (1 - abar).sqrt() * eps).float()
    torch.testing.assert_close(seen["x"], x_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(per_sample, ((net(x_t, t) - eps) ** 2).flatten(1).mean(1), rtol=1e-4, atol=2e-5)
    assert isinstance(loss.preconditioning, DDPMPreconditioning)


# --- one optimizer step against each reference's reduction ---------------------------------------------------------


def test_edm_step_matches_edm_training_loop_sum_over_pixels_mean_over_batch():
    # EDM training_loop.py: loss = loss_fn(net, images) (per element); loss.sum().mul(loss_scaling / batch_gpu_total)
    # .backward(); no gradient clipping; Adam.
    y, sigma = batch(), torch.tensor([0.05, 0.4, 1.3, 9.0])
    ours, ref = TinyNet(), TinyNet()
    loss = EDMLoss()
    denoiser, seen = recording_inputs(lambda x, s, class_labels=None: loss.denoiser(ours)(x, s))

    per_sample = loss(denoiser, y, sigma=sigma, generator=torch.Generator().manual_seed(5)).loss
    per_pixel = EDMLoss(reduction="mean")(denoiser, y, sigma=sigma, generator=torch.Generator().manual_seed(5)).loss
    after_ours = adam_step(ours, per_sample.mean())

    sd, s = 0.5, sigma.reshape(-1, 1, 1, 1)  # EDMLoss and EDMPrecond, transcribed
    weight = (s**2 + sd**2) / (s * sd) ** 2
    x = seen["x"]
    D = sd**2 / (s**2 + sd**2) * x + s * sd / (s**2 + sd**2).sqrt() * ref(x / (s**2 + sd**2).sqrt(), s.log().flatten() / 4)
    edm_loss = weight * (D - y) ** 2
    after_ref = adam_step(ref, edm_loss.sum().mul(1.0 / len(y)))
    assert_same_step(after_ours, after_ref)
    # the mean over pixels is 1/(C·H·W) of it
    torch.testing.assert_close(per_pixel * 50, per_sample.detach())


def sa_dpm_loss(model, x0, t, e, abar, K, lam):
    """SA-DPM functions/losses.py sequence_aware_loss, transcribed: t 0-based, e[k] the noise of step t − k."""
    a = abar[t].reshape(-1, 1, 1, 1)
    r0 = e[0] - model(x0 * a.sqrt() + e[0] * (1 - a).sqrt(), t.float())
    simple = r0.square().sum(dim=(1, 2, 3)).mean(dim=0)
    if lam == 0:
        return simple
    total = r0
    for k in range(1, K):
        tk = (t - k).clamp(min=0)
        ak = abar[tk].reshape(-1, 1, 1, 1)
        rk = e[k] - model(x0 * ak.sqrt() + e[k] * (1 - ak).sqrt(), tk.float())
        total = total + rk * (t >= k).float().reshape(-1, 1, 1, 1)
    return simple + lam * total.square().sum(dim=(1, 2, 3)).mean(dim=0) / K**2


@pytest.mark.parametrize("K,lam", [(2, 1.0), (3, 0.3)])
def test_sequence_aware_step_matches_sa_dpm_train_ddp(K, lam):
    T = 1000
    betas = betas_for_schedule(T)
    abar = torch.cumprod(1 - betas, 0).float()
    y = batch(n=5)
    t = torch.tensor([0, 1, 2, 500, 999])  # t < K − 1 rows exercise the mask
    e = torch.randn(K, *y.shape, generator=torch.Generator().manual_seed(6))
    ours, ref = TinyNet(), TinyNet()
    loss = SequenceAwareLoss(betas, num_steps=K, sa_lambda=lam, window="official", reduction="sum")
    s = t + 1  # 1-based L_simple step; the official window ends there, noise entry j belongs to step s − (K−1) + j
    out = loss(lambda x, idx: ours(x, idx), y, window_start=s - (K - 1), position=torch.full_like(s, K - 1),
               noise=torch.stack([e[K - 1 - j] for j in range(K)]))
    after_ours = adam_step(ours, out.loss.mean())
    after_ref = adam_step(ref, sa_dpm_loss(lambda x, tt: ref(x, tt), y, t, e, abar, K, lam))
    assert_same_step(after_ours, after_ref)


def test_antithetic_timesteps_transcribe_train_ddp():
    # train_ddp.py: t = randint(0, T, (n // 2 + 1,)); t = cat([t, T − t − 1])[:n]
    T, n = 1000, 7
    loss = SequenceAwareLoss(betas_for_schedule(T), num_steps=2, window="official", timesteps="antithetic")
    start, position = loss.sample_windows(n, generator=torch.Generator().manual_seed(7))
    t = torch.randint(0, T, (n // 2 + 1,), generator=torch.Generator().manual_seed(7))
    t = torch.cat([t, T - t - 1])[:n]
    assert torch.equal(start + position, t + 1)  # 1-based
    big = loss.sample_windows(20000, generator=torch.Generator().manual_seed(8))
    s = (big[0] + big[1]).double()
    assert s.min() >= 1 and s.max() <= T and abs(float(s.mean()) - (T + 1) / 2) < 1
    assert abs(float(s.std()) - T / math.sqrt(12)) < 5


def test_discriminator_bce_step_matches_dg_mean_over_the_shuffled_mixed_batch():
    # DG train.py: a shuffled batch of real (label 1) and fake (label 0) images, BCELoss()(sigmoid output, label):
    # the mean over the mixed batch.
    class Disc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(50, 1)
            self.inputs = []

        def forward(self, x, sigma, labels=None):
            self.inputs.append((x.detach(), sigma))
            logits = self.lin(x.flatten(1)).squeeze(1) / (1 + sigma.float())
            return type("Out", (), {"logits": logits})

    real, fake = batch(n=6, seed=2), batch(n=6, seed=3)
    ours, ref = Disc(), Disc()
    out = DiscriminatorBCELoss()(ours, real, fake, generator=torch.Generator().manual_seed(9))
    after_ours = adam_step(ours, out.loss.mean())
    x = torch.cat([ours.inputs[0][0], ours.inputs[1][0]])
    sigma = torch.cat([ours.inputs[0][1], ours.inputs[1][1]])
    label = torch.cat([torch.ones(6), torch.zeros(6)])
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(10))
    d = torch.sigmoid(ref(x[perm], sigma[perm]).logits)
    after_ref = adam_step(ref, torch.nn.BCELoss()(d, label[perm]))
    assert_same_step(after_ours, after_ref)
    with pytest.raises(ValueError, match="reduction"):
        DiscriminatorBCELoss(reduction="sum")


# --- the scripts default to the references -------------------------------------------------------------------------


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def test_script_defaults_follow_the_official_training_loops():
    stf = load_script("train_stf")
    assert stf.get_default("loss_reduction") == "sum" and stf.get_default("max_grad_norm") == 0.0
    assert stf.get_default("precond") == "edm"
    sa = load_script("train_sequence_aware")
    assert sa.get_default("loss_reduction") == "sum" and sa.get_default("sa_timesteps") == "antithetic"
    assert sa.get_default("sa_window") == "official"
    assert load_script("train_discriminator").get_default("loss_reduction") == "mean"


def test_train_stf_precond_vp_trains_and_saves_a_vp_sampler(tmp_path):
    spec = importlib.util.spec_from_file_location("train_stf", os.path.join(ROOT, "examples", "train_stf.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "run"
    module.main(["--output_dir", str(out), "--precond", "vp", "--max_train_steps", "2", "--checkpointing_steps", "0",
                 "--block_out_channels", "8,16", "--train_batch_size", "8", "--stf_reference_batch_size", "24",
                 "--num_validation_images", "2", "--num_inference_steps", "2", "--validation_steps", "0",
                 "--no_progress_bar", "--report_to", "none"])
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["preconditioning"] == "vp"


# --- one contract: every loss returns a LossOutput with the per-sample loss and σ -----------------------------------


class NoisyModel(torch.nn.Module):
    """A small network with every call signature the losses use: D(x, σ, class_labels), ε(x_t, t), ℓ(x, σ, labels)."""

    def __init__(self, outputs=2):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(50, outputs)
        self.conv = torch.nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t, class_labels=None):
        if self.lin.out_features != 2:  # a classifier / discriminator: logits
            logits = self.lin(x.flatten(1)) / (1 + t.float().reshape(-1, 1))
            return type("Out", (), {"logits": logits.squeeze(1) if logits.shape[1] == 1 else logits})
        return self.conv(x) * (1 + 0.01 * t.float().reshape(-1, 1, 1, 1))


def every_loss():
    from diffusers_stf.losses import DDPMStableTargetFieldLoss, DenoisingScoreMatchingLoss, NoisyCrossEntropyLoss

    def denoising(loss):
        return lambda y, g: loss(loss.denoiser(NoisyModel()), y, generator=g)

    stf = StableTargetFieldLoss(EDMLoss(), reference_batch_size=6)
    ddpm_stf = DDPMStableTargetFieldLoss(reference_batch_size=6)
    sa = SequenceAwareLoss(betas_for_schedule(100), num_steps=2, sa_lambda=1.0)
    dsm = DenoisingScoreMatchingLoss(sigma_sampling="log_uniform")
    disc, clf = DiscriminatorBCELoss(), NoisyCrossEntropyLoss()
    return {
        "edm": denoising(EDMLoss()), "vp": denoising(VPLoss()), "ve": denoising(VELoss()),
        "ddpm": lambda y, g: DDPMEpsilonLoss()(NoisyModel(), y, generator=g),
        "stf": lambda y, g: stf(EDMLoss().denoiser(NoisyModel()), y, batch(2, seed=5), generator=g),
        "ddpm_stf": lambda y, g: ddpm_stf(NoisyModel(), y, batch(2, seed=5), generator=g),
        "sequence_aware": lambda y, g: sa(NoisyModel(), y, generator=g),
        "score_matching": lambda y, g: dsm(lambda x, s: x * 0.9 + NoisyModel()(x, s), y, generator=g),
        "discriminator": lambda y, g: disc(NoisyModel(1), y[:1], y[1:], generator=g),
        "classifier": lambda y, g: clf(NoisyModel(10), y, torch.tensor([0, 3, 9, 1]), generator=g),
    }


@pytest.mark.parametrize("name", sorted(every_loss()))
def test_every_loss_returns_the_per_sample_loss_and_its_sigma(name):
    from diffusers_stf.losses import LossOutput

    out = every_loss()[name](batch(4), torch.Generator().manual_seed(0))
    assert isinstance(out, LossOutput)
    assert out.loss.shape == (4,) and out.sigma.shape == (4,), (out.loss.shape, out.sigma.shape)
    assert out.loss.requires_grad and bool(torch.isfinite(out.loss).all()) and bool((out.sigma > 0).all())


def test_balanced_discriminator_loss_is_the_sum_of_the_two_means_whatever_the_counts():
    # mean_real + mean_fake (DG Appendix B's minimiser-preserving form) with 2 real and 5 fake images; the per-image
    # loss carries each image's share, so its mean over the 7 images is the objective
    from diffusers_stf.losses import DiscriminatorLSIFLoss

    real, fake = batch(2, seed=2), batch(5, seed=3)
    loss = DiscriminatorLSIFLoss(reduction="balanced")
    out = loss(NoisyModel(1), real, fake, generator=torch.Generator().manual_seed(1))
    r = out.logits.double().exp()  # LSIF: E_fake[r²/2] − E_real[r]
    expected = -r[:2].mean() + (r[2:] ** 2 / 2).mean()
    torch.testing.assert_close(out.loss.double().mean(), expected, rtol=1e-6, atol=1e-7)
    assert out.is_real.tolist() == [1, 1, 0, 0, 0, 0, 0]


def test_noisy_cross_entropy_transcribes_the_classifier_objective():
    # σ log-uniform on [σ_min, σ_max] (drawn first), then n ~ N(0, I); −log softmax(ℓ(y + σ·n, σ))_c per image
    from diffusers_stf.losses import NoisyCrossEntropyLoss

    y, labels = batch(4), torch.tensor([0, 3, 9, 1])
    model = NoisyModel(10)
    out = NoisyCrossEntropyLoss(0.01, 5.0)(model, y, labels, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    u = torch.rand(4, generator=g, dtype=torch.float64)
    sigma = torch.exp(math.log(0.01) + u * (math.log(5.0) - math.log(0.01)))
    x = y + sigma.float().reshape(-1, 1, 1, 1) * torch.randn(y.shape, generator=g)
    log_p = torch.log_softmax(model(x, sigma).logits.double(), dim=1)
    torch.testing.assert_close(out.loss.double(), -log_p[torch.arange(4), labels], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sigma, sigma)
    expected_correct = (log_p.argmax(1) == labels).double()
    assert torch.equal(out.per_sample_logs["accuracy"], expected_correct)
