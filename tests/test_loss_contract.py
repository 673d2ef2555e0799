"""What every training loss promises besides its formula (losses/base.py, the contract): it computes where its images
live, its draws come from the generator it is given and from nothing else, class labels reach the network with their
images, and its defaults are the papers'.

The formulas themselves are checked against independent maths in test_losses.py, test_stable_target_field.py,
test_sequence_aware.py, test_score_based.py and test_edm2.py; these tests catch the plumbing around them (a draw
made on the wrong device or from the global generator, labels dropped), which no formula test sees on one CPU.
"""

import math

import pytest
import torch

from diffusers_stf.losses import (
    DDPMEpsilonLoss,
    DDPMStableTargetFieldLoss,
    DenoisingScoreMatchingLoss,
    EDMLoss,
    SequenceAwareLoss,
    StableTargetFieldLoss,
    VELoss,
    VPLoss,
    make_denoising_loss,
)
from diffusers_stf.losses.edm2 import EDM2Loss
from diffusers_stf.noise_schedules import betas_for_schedule

B = 4


class Recorder:
    """A stand-in network that remembers the labels it was called with; its output depends on its input only."""

    def __init__(self, scale=0.9):
        self.labels, self.scale = [], scale

    def __call__(self, x, noise_level, class_labels=None, **kwargs):
        self.labels.append(class_labels)
        return self.scale * x


def edm_like(loss):
    return lambda net, images, labels, generator: loss(net, images, class_labels=labels, generator=generator)


def stf(loss):
    return lambda net, images, labels, generator: loss(net, images, images.flip(0)[:2] * 0.5, class_labels=labels,
                                                       generator=generator)


def sequence_aware(loss):
    return lambda net, images, labels, generator: loss(net, images, class_labels=labels, generator=generator)


def score_matching(loss):
    return lambda net, images, labels, generator: loss(net, images, generator=generator, class_labels=labels)


LOSSES = {
    "edm": lambda: edm_like(EDMLoss()),
    "vp": lambda: edm_like(VPLoss()),
    "ve": lambda: edm_like(VELoss()),
    "edm2": lambda: edm_like(EDM2Loss(logvar_channels=8)),
    "ddpm": lambda: edm_like(DDPMEpsilonLoss(num_train_timesteps=50)),
    "stf": lambda: stf(StableTargetFieldLoss(EDMLoss(), reference_batch_size=B + 2)),
    "stf_ddpm": lambda: stf(DDPMStableTargetFieldLoss(num_train_timesteps=50, reference_batch_size=B + 2)),
    "sequence_aware": lambda: sequence_aware(SequenceAwareLoss(betas_for_schedule(50), num_steps=3)),
    "sequence_aware_official": lambda: sequence_aware(SequenceAwareLoss(betas_for_schedule(50), num_steps=2,
                                                                        window="official", timesteps="antithetic")),
    "dsm": lambda: score_matching(DenoisingScoreMatchingLoss(sigmas=[1.0, 0.5, 0.1])),
    "dsm_log_uniform": lambda: score_matching(DenoisingScoreMatchingLoss(sigma_sampling="log_uniform")),
}


def images(device="cpu"):
    return (torch.rand(B, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device)


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_computes_on_the_device_of_its_images(name):
    """On the ``meta`` device nothing can be computed by mistake on the CPU: every draw, table and σ must follow the
    images (a GPU run would otherwise fail, or copy, at this line). The sequence-aware loss selects its in-range
    window steps with a mask, whose size the meta device cannot know: it is told to assume all of them."""
    import torch.fx.experimental._config as fx_config

    loss = LOSSES[name]()
    if name == "edm2":  # the learned log-variance head lives with the network
        loss = edm_like(EDM2Loss(logvar_channels=8).to("meta"))
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        out = loss(Recorder(), images("meta"), None, None)
    assert out.loss.device.type == "meta" and out.loss.shape == (B,)
    assert out.sigma.device.type == "meta" and out.sigma.shape == (B,)


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_draws_from_its_generator_only(name):
    """The same seed gives the same loss whatever the global generator did in between; another seed another loss."""
    loss = LOSSES[name]()
    x = images()
    torch.manual_seed(1)
    first = loss(Recorder(), x, None, torch.Generator().manual_seed(5))
    torch.manual_seed(2)
    again = loss(Recorder(), x, None, torch.Generator().manual_seed(5))
    other = loss(Recorder(), x, None, torch.Generator().manual_seed(6))
    assert torch.equal(first.loss, again.loss) and torch.equal(first.sigma, again.sigma)
    assert not torch.equal(first.loss, other.loss)


@pytest.mark.parametrize("name", list(LOSSES))
def test_class_labels_reach_the_network_with_their_images(name):
    labels = torch.tensor([3, 1, 4, 1])
    net = Recorder()
    LOSSES[name]()(net, images(), labels, torch.Generator().manual_seed(0))
    seen = torch.cat(net.labels)
    assert len(net.labels) == 1 and len(seen) % B == 0 and len(seen) >= B
    # the network's rows are the batch's images (the sequence-aware loss evaluates each of them at K steps)
    assert sorted(seen.tolist()) == sorted(labels.repeat(len(seen) // B).tolist()) or name.startswith("sequence")
    assert set(seen.tolist()) == set(labels.tolist())


def test_defaults_are_the_papers():
    """EDM Table 1 and NVlabs' training/loss.py: EDM ln σ ~ N(−1.2, 1.2²) with σ_data = 0.5; VP β_d = 19.9,
    β_min = 0.1, ε_t = 1e-5, M = 1000; VE σ ∈ [0.02, 100]; EDM's loss sums over C·H·W. EDM2: ln σ ~ N(−0.4, 1)."""
    edm, vp, ve, edm2 = EDMLoss(), VPLoss(), VELoss(), EDM2Loss()
    assert (edm.P_mean, edm.P_std, edm.sigma_data, edm.reduction) == (-1.2, 1.2, 0.5, "sum")
    assert (vp.beta_d, vp.beta_min, vp.epsilon_t, vp.preconditioning.M, vp.reduction) == (19.9, 0.1, 1e-5, 1000, "sum")
    assert (ve.sigma_min, ve.sigma_max, ve.reduction) == (0.02, 100.0, "sum")
    assert (ve.preconditioning.sigma_min, ve.preconditioning.sigma_max) == (0.02, 100.0)
    assert (edm2.P_mean, edm2.P_std, edm2.sigma_data) == (-0.4, 1.0, 0.5)
    assert math.isclose(vp.preconditioning.sigma_min, math.sqrt(math.exp(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5) - 1),
                        rel_tol=1e-9)
    made = make_denoising_loss()
    assert isinstance(made, EDMLoss) and (made.P_mean, made.P_std, made.sigma_data, made.reduction) == (-1.2, 1.2, 0.5, "sum")
    for precond, cls in (("vp", VPLoss), ("ve", VELoss)):
        for reduction in ("sum", "mean"):
            made = make_denoising_loss(precond, reduction=reduction)
            assert type(made) is cls and made.reduction == reduction
    made = make_denoising_loss("edm", -1.0, 1.4, 0.6, "mean")
    assert (made.P_mean, made.P_std, made.sigma_data, made.reduction) == (-1.0, 1.4, 0.6, "mean")
    ddpm = DDPMEpsilonLoss()
    assert ddpm.num_train_timesteps == 1000 and ddpm.reduction == "mean"
    assert torch.allclose(ddpm.preconditioning.alphas_cumprod,
                          torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0), rtol=1e-12)
    sa = SequenceAwareLoss(betas_for_schedule(10))
    assert (sa.num_steps, sa.sa_lambda, sa.weighting, sa.window, sa.noise, sa.reduction, sa.timesteps,
            sa.prediction_type) == (2, 1.0, "uniform", "paper", "independent", "mean", "uniform", "epsilon")


# ---------------------------------------------------------------------------------------------------------------
# Arguments reach what they configure; invalid ones are refused at their boundary, by name


@pytest.mark.parametrize("make,word", [
    (lambda: EDMLoss(sigma_data=0.0), "sigma_data"), (lambda: EDMLoss(sigma_data=math.inf), "sigma_data"),
    (lambda: VPLoss(beta_d=0.0), "beta_d"), (lambda: VPLoss(beta_d=math.inf), "beta_d"),
    (lambda: VPLoss(beta_min=-0.1), "beta_min"), (lambda: VPLoss(beta_min=math.inf), "beta_min"),
    (lambda: VPLoss(epsilon_t=1.0), "epsilon_t"), (lambda: VPLoss(epsilon_t=1.5), "epsilon_t"),
    (lambda: VELoss(sigma_min=2.0, sigma_max=2.0), "sigma_min"), (lambda: VELoss(sigma_max=math.inf), "sigma_max"),
    (lambda: DenoisingScoreMatchingLoss(sigmas=[1.0, 0.0]), "sigmas"),
    (lambda: DenoisingScoreMatchingLoss(sigmas=[1.0, 1.0]), "sigmas"),
    (lambda: DenoisingScoreMatchingLoss(sigmas=[1.0, 0.1, 0.5]), "sigmas"),
    (lambda: DenoisingScoreMatchingLoss(sigma_sampling="log_uniform", sigma_min=0.5, sigma_max=0.5), "sigma_max"),
    (lambda: DenoisingScoreMatchingLoss(sigma_sampling="log_uniform", sigma_min=0.0), "sigma_min"),
])
def test_invalid_loss_settings_are_refused_by_name(make, word):
    with pytest.raises(ValueError, match=word):
        make()


def test_boundary_settings_are_accepted():
    """The other side of each boundary above: the smallest valid values construct and keep them."""
    assert VPLoss(beta_d=0.5, beta_min=0.0).preconditioning.beta_min == 0.0
    assert DenoisingScoreMatchingLoss(sigmas=[0.5]).sigmas.tolist() == [0.5]  # one noise level is a table
    log_uniform = DenoisingScoreMatchingLoss(sigma_sampling="log_uniform", sigma_min=0.2, sigma_max=0.3)
    assert (log_uniform.sigma_min, log_uniform.sigma_max) == (0.2, 0.3)


def test_settings_reach_the_preconditioning_and_the_reduction():
    vp = VPLoss(beta_d=10.0, beta_min=0.2, epsilon_t=1e-3, reduction="mean")
    assert vp.reduction == "mean" and math.isclose(vp.preconditioning.sigma_min,
                                                    math.sqrt(math.exp(0.5 * 10.0 * 1e-6 + 0.2 * 1e-3) - 1), rel_tol=1e-9)
    ve = VELoss(0.05, 20.0, reduction="mean")
    assert ve.reduction == "mean" and (ve.preconditioning.sigma_min, ve.preconditioning.sigma_max) == (0.05, 20.0)
    betas = torch.linspace(2e-4, 3e-2, 40, dtype=torch.float64) ** 1.2
    for loss in (DDPMEpsilonLoss(trained_betas=betas.tolist(), reduction="sum"),
                 DDPMStableTargetFieldLoss(trained_betas=betas.tolist(), reduction="sum").base_loss):
        assert loss.reduction == "sum" and loss.num_train_timesteps == 40
        assert torch.equal(loss.preconditioning.alphas_cumprod, torch.cumprod(1 - betas, 0))
    dsm = DenoisingScoreMatchingLoss(sigma_sampling="log_uniform")  # NCSN's σ_1 = 1, σ_L = 0.01
    assert (dsm.sigma_min, dsm.sigma_max, dsm.reduction) == (0.01, 1.0, "sum")
    drawn = dsm.sample_sigmas(2000, torch.Generator().manual_seed(0))
    assert drawn.min() >= 0.01 and drawn.max() <= 1.0 and drawn.max() > 0.9 and drawn.min() < 0.012


def test_reductions_sum_and_mean_over_the_pixels():
    """``sum`` over C·H·W is ``mean`` times C·H·W, for every loss with a reduction."""
    x, g = images(), lambda: torch.Generator().manual_seed(3)  # noqa: E731
    pairs = [(EDMLoss(reduction="sum"), EDMLoss(reduction="mean")), (VPLoss(reduction="sum"), VPLoss(reduction="mean")),
             (DDPMEpsilonLoss(50, reduction="sum"), DDPMEpsilonLoss(50, reduction="mean"))]
    for total, mean in pairs:
        assert torch.allclose(total(Recorder(), x, generator=g()).loss, 16 * mean(Recorder(), x, generator=g()).loss)
    total = DenoisingScoreMatchingLoss(sigmas=[1.0, 0.3])(Recorder(), x, generator=g()).loss
    mean = DenoisingScoreMatchingLoss(sigmas=[1.0, 0.3], reduction="mean")(Recorder(), x, generator=g()).loss
    assert torch.allclose(total, 16 * mean)


def test_score_matching_sigma_keeps_its_value_and_the_images_dtype():
    """σ given as a python float or one per sample, also as a column (B, 1), and drawn from a float64 table: the loss
    uses exactly those values, in the images' dtype."""
    x = images().double()
    loss = DenoisingScoreMatchingLoss(sigmas=[0.7, 0.3])
    out = loss(Recorder(), x, sigma=0.3, generator=torch.Generator().manual_seed(0))
    assert out.sigma.dtype == torch.float64 and torch.equal(out.sigma, torch.full((B,), 0.3, dtype=torch.float64))
    column = loss(Recorder(), x, sigma=torch.tensor([[0.7], [0.3], [0.3], [0.7]]), generator=torch.Generator().manual_seed(0))
    assert column.sigma.shape == (B,)
    drawn = loss(Recorder(), x, generator=torch.Generator().manual_seed(1)).sigma
    assert set(drawn.tolist()) <= {0.7, 0.3}  # the float64 table's values, not their float32 roundings
    assert loss(Recorder(), images(), sigma=0.3).sigma.dtype == torch.float32


def test_ddpm_loss_takes_model_outputs_with_or_without_sample_and_reports_its_timesteps():
    """Ho et al. eq. 14 with ε and t given: ((ε_θ(x_t, t) − ε)²) averaged over C·H·W, for a network returning a tensor
    or an object with ``.sample``; the output names the timesteps used; a target function gets the clean images."""
    loss = DDPMEpsilonLoss(50)
    x = images()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 7, 30, 49])
    abar = loss.preconditioning.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * x.double() + (1 - abar).sqrt() * eps.double()
    expected = ((0.5 * x_t - eps.double()) ** 2).mean((1, 2, 3))
    wrapped = lambda x_, t_, **kw: type("Out", (), {"sample": 0.5 * x_})  # noqa: E731
    for net in (Recorder(0.5), wrapped):
        out = loss(net, x, timesteps=t, noise=eps)
        assert torch.allclose(out.loss.double(), expected, rtol=1e-5) and torch.equal(out.timesteps, t)
    seen = []
    target = lambda noisy, sigma, clean: seen.append(clean) or clean  # noqa: E731  (T = y: the plain loss)
    assert torch.allclose(loss(Recorder(0.5), x, timesteps=t, noise=eps, target=target).loss.double(), expected, rtol=1e-5)
    assert torch.equal(seen[0], x)
    with pytest.raises(ValueError, match=r"timesteps must lie in 0\.\.49"):
        loss(Recorder(), x, timesteps=torch.tensor([0, 1, 2, 50]))


class TwoProcesses:
    """An accelerator stand-in whose ``gather`` returns the set of two processes: this one's and its negation."""

    num_processes = 2

    def gather(self, tensor):
        return torch.cat([tensor, -tensor])


def test_stable_target_references_are_the_batch_the_extra_images_and_the_other_processes():
    """R − B extra references per step; the reference set is the batch, then the extras (in the images' dtype), then
    the other processes' sets when ``gather``. The paper's R is 1024."""
    loss = StableTargetFieldLoss(EDMLoss(), reference_batch_size=10)
    assert loss.num_extra_references(4) == 6 and StableTargetFieldLoss().reference_batch_size == 1024
    assert StableTargetFieldLoss().gather is False and DDPMStableTargetFieldLoss().reference_batch_size == 1024
    x, one_extra = images(), torch.rand(1, 1, 4, 4, dtype=torch.float64)
    refs = loss.reference_set(x, one_extra)
    assert refs.dtype == x.dtype and torch.equal(refs, torch.cat([x, one_extra.float()]))
    for gathered in (StableTargetFieldLoss(EDMLoss(), 10, accelerator=TwoProcesses(), gather=True),
                     DDPMStableTargetFieldLoss(50, reference_batch_size=10, accelerator=TwoProcesses(), gather=True)):
        both = gathered.reference_set(x, one_extra)
        assert torch.equal(both, torch.cat([refs, -refs]))


def test_denoising_losses_take_sigma_as_float32_and_hand_the_target_function_the_clean_images():
    """An explicit σ (any dtype, one per sample or one for all) enters as float32, as a drawn one does; a target
    function ``target(noisy, σ, images)`` gets the clean images, so T = y gives the plain loss."""
    x, n = images(), torch.randn(B, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    for loss in (EDMLoss(), VPLoss(), VELoss()):
        plain = loss(Recorder(), x, sigma=torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64), noise=n)
        assert plain.sigma.dtype == torch.float32
        seen = []
        same = loss(Recorder(), x, sigma=[0.5, 1.0, 2.0, 4.0], noise=n, target=lambda noisy, s, y: seen.append(y) or y)
        assert torch.equal(seen[0], x) and torch.equal(same.loss, plain.loss)
        assert loss(Recorder(), x, sigma=2.0, noise=n).sigma.tolist() == [2.0] * B
