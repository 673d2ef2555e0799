"""EDM2 (Karras et al. 2024): the magnitude-preserving layers against their closed forms, the U-Net against an
independent float64 functional reference written here from the paper's equations (Sec. 3, App. B, Fig. 21) and
NVlabs' naming, the uncertainty-weighted loss (Eq. 21) and the inverse-square-root learning rate."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.integrate import quad
from torch import nn

from diffusers_stf.losses.edm2 import EDM2Loss, LogVarianceHead
from diffusers_stf.losses.stable_target_field import StableTargetFieldLoss, stable_target_field
from diffusers_stf.models.edm2_unet import EDM2UNet
from diffusers_stf.mp_layers import MPConv, mp_cat, mp_silu, mp_sum, normalize
from diffusers_stf.preconditioning import Denoiser, EDMPreconditioning
from diffusers_stf.training.lr_schedules import get_inverse_sqrt_schedule, inverse_sqrt_lr, inverse_sqrt_lr_lambda

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# Magnitude-preserving layers


def orthogonal_pair(n, seed=0):
    """Two exactly orthogonal vectors of squared norm n (unit magnitude per element), float64."""
    q, _ = torch.linalg.qr(torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:, 0] * math.sqrt(n), q[:, 1] * math.sqrt(n)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_mp_sum_of_orthogonal_unit_inputs_has_unit_magnitude(t):
    a, b = orthogonal_pair(64)
    out = mp_sum(a, b, t)
    assert out.square().mean().item() == pytest.approx(1.0, rel=1e-12)
    assert torch.dot(out, b).item() / 64 == pytest.approx(t / math.sqrt((1 - t) ** 2 + t**2), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("t,n_a,n_b", [(0.5, 8, 8), (0.3, 4, 12), (0.8, 10, 3)])
def test_mp_cat_of_unit_inputs_has_unit_magnitude_and_the_balance_sets_the_shares(t, n_a, n_b):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, n_a, 6, generator=g, dtype=torch.float64), torch.randn(5, n_b, 6, generator=g,
                                                                                   dtype=torch.float64)
    a, b = a / a.square().mean(1, keepdim=True).sqrt(), b / b.square().mean(1, keepdim=True).sqrt()  # rms 1 per pixel
    out = mp_cat(a, b, dim=1, t=t)
    assert out.shape == (5, n_a + n_b, 6)
    torch.testing.assert_close(out.square().mean(1), torch.ones(5, 6, dtype=torch.float64))
    share_b = out[:, n_a:].square().sum(1) / out.square().sum(1)  # b's share of the energy is t²/((1−t)² + t²)
    torch.testing.assert_close(share_b, torch.full((5, 6), t**2 / ((1 - t) ** 2 + t**2), dtype=torch.float64))


def test_mp_silu_keeps_unit_magnitude_of_a_standard_normal():
    second_moment = quad(lambda z: (z / (1 + math.exp(-z))) ** 2 * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
                         -40, 40)[0]
    z = torch.linspace(-1, 1, 3, dtype=torch.float64)
    torch.testing.assert_close(mp_silu(z), z * torch.sigmoid(z) / 0.596)
    assert math.sqrt(second_moment) / 0.596 == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("kernel,gain", [((), 1.0), ((3, 3), 1.0), ((3, 3), 0.5), ((1, 1), 2.0)])
def test_weight_normalised_layer_maps_unit_gaussian_input_to_magnitude_gain(kernel, gain):
    """y = Σ ŵ·x/√fan_in with ŵ = w/(ε + rms(w)): for x ~ N(0, I), E[y²] = gain²/(1 + ε/rms(w))² per output."""
    torch.manual_seed(0)
    layer = MPConv(16, 32, kernel).double().eval()
    with torch.no_grad():
        layer.weight.mul_(3.0)  # any scale: the normalisation removes it
    rms = layer.weight.detach().flatten(1).square().mean(1).sqrt()
    expected = (gain / (1 + EPS / rms)) ** 2
    g = torch.Generator().manual_seed(2)
    if kernel:
        x = torch.randn(64, 16, 18, 18, generator=g, dtype=torch.float64)
        y = layer(x, gain=gain)[:, :, 1:-1, 1:-1]  # interior pixels: the padding is outside
        measured = y.square().mean((0, 2, 3))
    else:
        x = torch.randn(40000, 16, generator=g, dtype=torch.float64)
        measured = layer(x, gain=gain).square().mean(0)
    torch.testing.assert_close(measured, expected, rtol=0.03, atol=0)


def test_normalize_closed_form():
    x = torch.randn(4, 3, 5, dtype=torch.float64) * 7
    rms = x.flatten(1).square().mean(1).sqrt()[:, None, None]
    torch.testing.assert_close(normalize(x), x / (EPS + rms))
    pixel_rms = x.square().mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(normalize(x, dim=1), x / (EPS + pixel_rms))


# ----------------------------------------------------------------------------------------------------------------------
# The U-Net: NVlabs' naming rule, an independent reference forward


TINY = dict(sample_size=8, in_channels=2, out_channels=3, num_class_embeds=3, model_channels=8, channel_mult=(1, 2),
            channel_mult_noise=1, channel_mult_emb=3, num_blocks=1, attn_resolutions=(8, 4), label_balance=0.3,
            concat_balance=0.6, res_balance=0.4, attn_balance=0.2, clip_act=2.0, channels_per_head=4)


def layout(cfg):
    """The modules of NVlabs' UNet for ``cfg``, in order: (name, kind, in, out, flavor, resample, attention)."""
    widths = [cfg["model_channels"] * m for m in cfg["channel_mult"]]
    size, attn = cfg["sample_size"], cfg["attn_resolutions"]
    enc, dec, skips = [], [], []
    width = cfg["in_channels"] + 1
    for level, channels in enumerate(widths):
        res = size // 2**level
        if level == 0:
            enc.append((f"enc.{res}x{res}_conv", "conv", width, channels, None, None, False))
            width = channels
        else:
            enc.append((f"enc.{res}x{res}_down", "block", width, width, "enc", "down", False))
        skips.append(width)
        for i in range(cfg["num_blocks"]):
            enc.append((f"enc.{res}x{res}_block{i}", "block", width, channels, "enc", None, res in attn))
            width = channels
            skips.append(width)
    for level in reversed(range(len(widths))):
        res, channels = size // 2**level, widths[level]
        if level == len(widths) - 1:
            dec.append((f"dec.{res}x{res}_in0", "block", width, width, "dec", None, True))
            dec.append((f"dec.{res}x{res}_in1", "block", width, width, "dec", None, False))
        else:
            dec.append((f"dec.{res}x{res}_up", "block", width, width, "dec", "up", False))
        for i in range(cfg["num_blocks"] + 1):
            dec.append((f"dec.{res}x{res}_block{i}", "block", width + skips.pop(), channels, "dec", None, res in attn))
            width = channels
    return enc, dec, width


def expected_state(cfg):
    """[(key, shape)] of NVlabs' UNet state_dict for ``cfg`` (module's own parameters, then buffers, then children)."""
    cnoise = cfg["model_channels"] * cfg["channel_mult_noise"]
    cemb = cfg["model_channels"] * cfg["channel_mult_emb"]
    keys = [("out_gain", ()), ("emb_fourier.freqs", (cnoise,)), ("emb_fourier.phases", (cnoise,)),
            ("emb_noise.weight", (cemb, cnoise)), ("emb_label.weight", (cemb, cfg["num_class_embeds"]))]
    enc, dec, width = layout(cfg)
    for name, kind, cin, cout, flavor, _, attention in enc + dec:
        if kind == "conv":
            keys.append((f"{name}.weight", (cout, cin, 3, 3)))
            continue
        keys += [(f"{name}.emb_gain", ()), (f"{name}.conv_res0.weight", (cout, cout if flavor == "enc" else cin, 3, 3)),
                 (f"{name}.emb_linear.weight", (cout, cemb)), (f"{name}.conv_res1.weight", (cout, cout, 3, 3))]
        if cin != cout:
            keys.append((f"{name}.conv_skip.weight", (cout, cin, 1, 1)))
        if attention:
            keys += [(f"{name}.attn_qkv.weight", (3 * cout, cout, 1, 1)),
                     (f"{name}.attn_proj.weight", (cout, cout, 1, 1))]
    keys.append(("out_conv.weight", (cfg["out_channels"], width, 3, 3)))
    return keys


def ref_weight(w, gain=1.0):
    fan_in = w[0].numel()
    rms = w.flatten(1).square().mean(1).sqrt().reshape(-1, *[1] * (w.ndim - 1))
    return w / (EPS + rms) * gain / math.sqrt(fan_in)


def ref_layer(x, w, gain=1.0):
    w = ref_weight(w, gain)
    return x @ w.T if w.ndim == 2 else F.conv2d(x, w, padding=w.shape[-1] // 2)


def ref_silu(x):
    return x * torch.sigmoid(x) / 0.596


def ref_sum(a, b, t):
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)


def ref_cat(a, b, t):
    n_a, n_b = a.shape[1], b.shape[1]
    c = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * c * (1 - t) / math.sqrt(n_a), b * c * t / math.sqrt(n_b)], dim=1)


def ref_pixel_norm(x):
    return x / (EPS + x.square().mean(1, keepdim=True).sqrt())


def ref_attention(x, w_qkv, w_proj, heads):
    """Cosine attention; qkv channel index = head·3·d + channel·3 + (0 q, 1 k, 2 v) (NVlabs' layout)."""
    n, c, h, w = x.shape
    d = c // heads
    qkv = ref_layer(x, w_qkv).flatten(2)  # (n, 3c, hw)
    out = torch.zeros(n, c, h * w, dtype=x.dtype)
    for head in range(heads):
        q, k, v = (qkv[:, [head * 3 * d + ch * 3 + j for ch in range(d)]] for j in range(3))
        q, k, v = (u / (EPS + u.square().mean(1, keepdim=True).sqrt()) for u in (q, k, v))
        scores = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(d), dim=-1)  # (n, queries, keys)
        out[:, head * d:(head + 1) * d] = v @ scores.transpose(1, 2)
    return ref_layer(out.reshape(n, c, h, w), w_proj)


def ref_block(sd, name, x, emb, cfg, flavor, resample, attention):
    if resample == "down":
        x = F.avg_pool2d(x, 2)
    elif resample == "up":
        x = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    skip = sd.get(f"{name}.conv_skip.weight")
    if flavor == "enc":
        x = ref_pixel_norm(x if skip is None else ref_layer(x, skip))
    y = ref_layer(ref_silu(x), sd[f"{name}.conv_res0.weight"])
    y = ref_silu(y * (ref_layer(emb, sd[f"{name}.emb_linear.weight"], sd[f"{name}.emb_gain"]) + 1)[:, :, None, None])
    y = ref_layer(y, sd[f"{name}.conv_res1.weight"])
    if flavor == "dec" and skip is not None:
        x = ref_layer(x, skip)
    x = ref_sum(x, y, cfg["res_balance"])
    if attention:
        heads = x.shape[1] // cfg["channels_per_head"]
        x = ref_sum(x, ref_attention(x, sd[f"{name}.attn_qkv.weight"], sd[f"{name}.attn_proj.weight"], heads),
                    cfg["attn_balance"])
    return x.clamp(-cfg["clip_act"], cfg["clip_act"])


def reference_unet(sd, cfg, x, c_noise, labels):
    """EDM2's U-Net (Fig. 21) as plain float64 functions of the state dict."""
    fourier = math.sqrt(2) * torch.cos(c_noise[:, None] * sd["emb_fourier.freqs"] + sd["emb_fourier.phases"])
    emb = ref_layer(fourier, sd["emb_noise.weight"])
    onehot = F.one_hot(labels, cfg["num_class_embeds"]).double() * math.sqrt(cfg["num_class_embeds"])
    emb = ref_silu(ref_sum(emb, ref_layer(onehot, sd["emb_label.weight"]), cfg["label_balance"]))
    enc, dec, _ = layout(cfg)
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    skips = []
    for name, kind, _, _, flavor, resample, attention in enc:
        x = ref_layer(x, sd[f"{name}.weight"]) if kind == "conv" else \
            ref_block(sd, name, x, emb, cfg, flavor, resample, attention)
        skips.append(x)
    for name, _, _, _, flavor, resample, attention in dec:
        if "_block" in name:
            x = ref_cat(x, skips.pop(), cfg["concat_balance"])
        x = ref_block(sd, name, x, emb, cfg, flavor, resample, attention)
    return ref_layer(x, sd["out_conv.weight"], sd["out_gain"])


def randomised_tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = EDM2UNet(**{**TINY, **overrides}).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if p.ndim == 0 else torch.randn_like(p) * 2)  # gains start at 0
    return model


def test_state_dict_keys_and_shapes_follow_nvlabs_naming():
    model = EDM2UNet(**TINY)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == expected_state(TINY)
    # the published S model at 64 px: 280M parameters (EDM2 Table 2), the same key rule
    cfg = dict(sample_size=64, in_channels=3, out_channels=3, num_class_embeds=1000, model_channels=192,
               channel_mult=(1, 2, 3, 4), channel_mult_noise=1, channel_mult_emb=4, num_blocks=3,
               attn_resolutions=(16, 8))
    with torch.device("meta"):
        big = EDM2UNet(**{k: v for k, v in cfg.items() if k not in ("channel_mult_noise", "channel_mult_emb")})
    assert [(k, tuple(v.shape)) for k, v in big.state_dict().items()] == expected_state(cfg)
    assert round(sum(p.numel() for p in big.parameters()) / 1e6) == 280


def test_forward_equals_the_float64_functional_reference():
    model = randomised_tiny().eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 8, 8, generator=g, dtype=torch.float64)
    c_noise = torch.log(torch.tensor([0.05, 1.0, 40.0], dtype=torch.float64)) / 4
    labels = torch.tensor([2, 0, 1])
    out = model(x, c_noise, class_labels=labels).sample
    expected = reference_unet({k: v.detach() for k, v in model.state_dict().items()}, TINY, x, c_noise, labels)
    assert out.shape == (3, 3, 8, 8)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert expected.abs().max() > 0.1
    # one-hot float rows are the same labels; a scalar timestep is broadcast
    rows = F.one_hot(labels, 3).double()
    torch.testing.assert_close(model(x, c_noise, class_labels=rows).sample, out, rtol=0, atol=0)
    same_t = reference_unet(model.state_dict(), TINY, x, c_noise[1].expand(3), labels)
    torch.testing.assert_close(model(x, float(c_noise[1]), class_labels=labels).sample, same_t, rtol=1e-10, atol=1e-10)


def test_output_is_zero_at_initialisation_and_unconditional_model_runs():
    model = EDM2UNet(**{**TINY, "num_class_embeds": None})
    out = model(torch.randn(2, 2, 8, 8), torch.zeros(2)).sample
    assert torch.equal(out, torch.zeros(2, 3, 8, 8))  # out_gain starts at 0


def test_forced_weight_normalisation_happens_in_training_mode_only():
    model = randomised_tiny()
    x, t, y = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), torch.tensor([0, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()(x, t, class_labels=y)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.train()(x, t, class_labels=y)
    for key, value in model.state_dict().items():
        if key.endswith(".weight"):
            w = before[key]
            rms = w.flatten(1).square().mean(1).sqrt().reshape(-1, *[1] * (w.ndim - 1))
            torch.testing.assert_close(value, w / (EPS + rms), rtol=1e-12, atol=0)
        else:  # gains, Fourier buffers
            assert torch.equal(value, before[key]), key


def test_save_and_load_round_trip_gives_the_trained_model(tmp_path):
    torch.manual_seed(0)
    model = EDM2UNet(**TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    x, t, y = torch.randn(4, 2, 8, 8), torch.randn(4), torch.tensor([0, 1, 2, 0])
    for _ in range(3):  # weights leave the sphere after each step; the gains move off 0
        loss = (model(x, t, class_labels=y).sample - x[:, :1]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "unet")
    loaded = EDM2UNet.from_pretrained(tmp_path / "unet")
    assert not loaded.training and loaded.config.attn_resolutions == [8, 4]
    assert torch.equal(loaded(x, t, class_labels=y).sample, model(x, t, class_labels=y).sample)
    assert model(x, t, class_labels=y).sample.abs().max() > 0


def test_edm_preconditioning_is_edm2s_precond():
    """EDM2's Precond: D = c_skip·x + c_out·F(c_in·x, ln(σ)/4) with σ_data = 0.5 (c_skip = σd²/(σ²+σd²),
    c_out = σ·σd/√(σ²+σd²), c_in = 1/√(σ²+σd²))."""
    cfg = {**TINY, "out_channels": 2}
    model = randomised_tiny(out_channels=2).eval()
    x, sigma, y = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.tensor([0.3, 7.0], dtype=torch.float64), \
        torch.tensor([1, 2])
    s = sigma[:, None, None, None]
    expected = 0.25 / (s**2 + 0.25) * x + s * 0.5 / (s**2 + 0.25).sqrt() * \
        reference_unet(model.state_dict(), cfg, x / (s**2 + 0.25).sqrt(), sigma.log() / 4, y)
    out = Denoiser(model, EDMPreconditioning(0.5))(x, sigma, class_labels=y)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)  # c_noise reaches the network in float32


@pytest.mark.parametrize("overrides,message", [
    (dict(sample_size=9), "sample_size 9 must be divisible"),
    (dict(attn_resolutions=(16,)), "attn_resolutions"),
    (dict(channels_per_head=32), "channels_per_head"),
    (dict(num_class_embeds=0), "num_class_embeds"),
    (dict(label_balance=1.5), "label_balance"),
    (dict(dropout=1.0), "dropout"),
    (dict(channel_mult=()), "channel_mult"),
    (dict(resample_filter=(1, 2, 1)), "resample_filter"),
])
def test_bad_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        EDM2UNet(**{**TINY, **overrides})


def test_bad_inputs_are_refused():
    model = EDM2UNet(**TINY)
    x = torch.randn(2, 2, 8, 8)
    with pytest.raises(ValueError, match="class_labels should be provided"):
        model(x, torch.zeros(2))
    with pytest.raises(ValueError, match="0..2"):
        model(x, torch.zeros(2), class_labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="rows of shape"):
        model(x, torch.zeros(2), class_labels=torch.ones(2, 4))
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.zeros(3), class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="sample must have shape"):
        model(torch.randn(2, 3, 8, 8), torch.zeros(2), class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        EDM2UNet(**{**TINY, "num_class_embeds": None})(x, torch.zeros(2), class_labels=torch.tensor([0, 1]))


# ----------------------------------------------------------------------------------------------------------------------
# The uncertainty-weighted loss (Eq. 21)


def toy_denoiser(x, sigma, class_labels=None):
    return 0.7 * x / (1 + sigma.reshape(-1, 1, 1, 1)) + 0.1


def head_logvar(head, sigma):
    """u(σ) = √2 cos(c·f + φ) · ŵ/√K with c = ln(σ)/4, from the head's buffers and weight."""
    c = sigma.double().log() / 4
    features = math.sqrt(2) * torch.cos(c[:, None] * head.logvar_fourier.freqs.double() +
                                        head.logvar_fourier.phases.double())
    w = head.logvar_linear.weight.detach().double()
    w = w / (EPS + w.square().mean().sqrt()) / math.sqrt(w.shape[1])
    return (features @ w.T)[:, 0]


def test_loss_equals_the_uncertainty_weighted_formula():
    torch.manual_seed(0)
    loss_fn = EDM2Loss()
    images = torch.randn(6, 1, 4, 4) * 0.5
    out = loss_fn(toy_denoiser, images, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    sigma = (torch.randn(6, generator=g) * 1.0 - 0.4).exp()  # EDM2's ImageNet-512 preset: P_mean −0.4, P_std 1.0
    noisy = images + sigma[:, None, None, None] * torch.randn(images.shape, generator=g)
    lam = ((sigma**2 + 0.25) / (0.5 * sigma) ** 2)[:, None, None, None]
    u = head_logvar(loss_fn.logvar_head, sigma).float()[:, None, None, None]
    expected = lam / u.exp() * (toy_denoiser(noisy, sigma) - images) ** 2 + u
    torch.testing.assert_close(out.loss, expected.sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)  # EDM: sum over C·H·W
    torch.testing.assert_close(out.sigma, sigma)
    assert u.std() > 0  # a σ-dependent head


def test_loss_takes_a_target_and_composes_with_stf():
    loss_fn = EDM2Loss(P_mean=-0.8, P_std=1.6)
    images, extra = torch.randn(4, 1, 4, 4), torch.randn(6, 1, 4, 4)
    sigma = torch.tensor([0.1, 0.5, 1.0, 3.0])
    noise = torch.randn(4, 1, 4, 4)
    noisy = images + sigma[:, None, None, None] * noise
    target = stable_target_field(noisy, sigma, torch.cat([images, extra]))
    lam = ((sigma**2 + 0.25) / (0.5 * sigma) ** 2)[:, None, None, None]
    u = head_logvar(loss_fn.logvar_head, sigma).float()[:, None, None, None]
    expected = lam / u.exp() * (toy_denoiser(noisy, sigma) - target) ** 2 + u
    stf = StableTargetFieldLoss(loss_fn, reference_batch_size=10)
    torch.testing.assert_close(stf(toy_denoiser, images, extra, sigma=sigma, noise=noise).loss,
                               expected.sum(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(target, images, atol=1e-3)


def test_the_optimal_log_variance_is_the_log_of_the_weighted_error():
    """∂/∂u Σ (λ e^{−u} (D − y)² + u) = 0 exactly when e^u = mean of λ(D − y)² (Eq. 21 at fixed D and σ)."""

    class FreeLogvar(nn.Module):
        def __init__(self):
            super().__init__()
            self.u = nn.Parameter(torch.zeros([], dtype=torch.float64))

        def forward(self, c_noise):
            return self.u.expand(c_noise.shape[0])

    head = FreeLogvar()
    loss_fn = EDM2Loss(logvar_head=head)
    images = torch.randn(32, 1, 4, 4, dtype=torch.float64)
    noise = torch.randn(32, 1, 4, 4, dtype=torch.float64)
    sigma = torch.full((32,), 0.7)
    s = torch.tensor(0.7, dtype=torch.float32).double()  # σ is float32 in the loss
    lam = (s**2 + 0.25) / (0.5 * s) ** 2
    weighted_error = lam * (toy_denoiser(images + s * noise, s.expand(32)) - images).square().mean()

    def grad_at(u):
        with torch.no_grad():
            head.u.fill_(u)
        head.u.grad = None
        loss_fn(toy_denoiser, images, sigma=sigma, noise=noise).loss.sum().backward()
        return head.u.grad.item()

    u_star = weighted_error.log().item()
    assert abs(grad_at(u_star)) < 1e-6 * images.numel()  # λ is evaluated in float32
    assert grad_at(u_star - 0.5) < -0.1 * images.numel() and grad_at(u_star + 0.5) > 0.1 * images.numel()
    grad_at(u_star)
    per_element = loss_fn(toy_denoiser, images, sigma=sigma, noise=noise).loss / images[0].numel()
    assert per_element.mean().item() == pytest.approx(1 + u_star)


def test_log_variance_head_is_trained_with_the_network_and_named_as_nvlabs_precond():
    loss_fn = EDM2Loss()
    assert list(loss_fn.state_dict()) == ["logvar_fourier.freqs", "logvar_fourier.phases", "logvar_linear.weight"]
    assert loss_fn.logvar_head.logvar_linear.weight.shape == (1, 128)
    params = list(loss_fn.parameters())
    assert len(params) == 1 and params[0] is loss_fn.logvar_head.logvar_linear.weight
    loss_fn(toy_denoiser, torch.randn(2, 1, 4, 4)).loss.sum().backward()
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="logvar_channels"):
        LogVarianceHead(0)
    with pytest.raises(ValueError, match="P_std"):
        EDM2Loss(P_std=0)


# ----------------------------------------------------------------------------------------------------------------------
# Inverse-square-root learning rate


def test_inverse_sqrt_lr_closed_form():
    # α_ref = 0.01, t_ref = 1000, ramp-up 100: linear to t = 100, flat to 1000, then α_ref·√(1000/t)
    for t, lr in ((0, 0.0), (25, 0.0025), (100, 0.01), (1000, 0.01), (4000, 0.005), (16000, 0.0025)):
        assert inverse_sqrt_lr(t, 0.01, 1000, 100) == pytest.approx(lr, rel=1e-12, abs=1e-15)
    assert inverse_sqrt_lr(250, 0.01, 1000, 0) == 0.01  # no ramp-up
    assert inverse_sqrt_lr(1e6, 0.01, 0, 0) == 0.01  # no decay
    with pytest.raises(ValueError, match="t_ref"):
        inverse_sqrt_lr(1, 0.01, -1)
    with pytest.raises(ValueError, match="ref_lr"):
        inverse_sqrt_lr(1, 0.0, 10)


def test_lambda_lr_schedule_counts_steps_like_edm2_counts_images():
    batch = 2048
    schedule = inverse_sqrt_lr_lambda(ref_steps=70_000, num_warmup_steps=10e6 / batch)  # EDM2's img512 recipe
    for step in (0, 1, 100, 4882, 4883, 70_000, 280_000):
        assert 0.012 * schedule(step) == pytest.approx(inverse_sqrt_lr(step * batch, 0.012, 70_000 * batch, 10e6),
                                                       rel=1e-12, abs=1e-18)
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.01)
    scheduler = get_inverse_sqrt_schedule(optimizer, ref_steps=4, num_warmup_steps=2)
    seen = []
    for _ in range(9):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(seen, [0, 0.005, 0.01, 0.01, 0.01, 0.01 * math.sqrt(4 / 5), 0.01 * math.sqrt(4 / 6),
                                      0.01 * math.sqrt(4 / 7), 0.01 * math.sqrt(4 / 8)], rtol=1e-12, atol=1e-15)
