"""EDM's networks, SongUNet (DDPM++/NCSN++) and DhariwalUNet (ADM), against an independent float64 reference.

The reference below is written from the papers' equations and the architecture facts of EDM's ``training/networks.py``
(names, widths, where each layer sits); it reads the weights from ``state_dict()`` by name and uses only
``torch.nn.functional`` and tensor algebra, with its own formulations of the FIR resampling (zero insertion then
filtering, filtering then decimation by slicing), GroupNorm (explicit group statistics) and attention (explicit
per-head softmax). Every parameter is randomised first: EDM initialises several layers at (or near) zero, which would
hide wiring errors behind them.

The expected state-dict keys and shapes are built from the architecture's rules (and, for one tiny config, listed by
hand), so that EDM's state dicts load into these classes unchanged.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_stf.models.dhariwal_unet import DhariwalUNet
from diffusers_stf.models.song_unet import SongUNet

DDPMPP = dict(sample_size=16, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,),
              channel_mult_emb=2)
NCSNPP = dict(DDPMPP, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", decoder_type="skip",
              resample_filter=(1, 3, 3, 1))
SKIP_ENCODER = dict(DDPMPP, encoder_type="skip", resample_filter=(1, 3, 3, 1), out_channels=2)
# 32, 64, 128 channels at 8, 4, 2: 0, 1 and 2 heads of 64 channels (no attention at 8×8 although it is asked for).
ADM = dict(sample_size=8, model_channels=32, channel_mult=(1, 2, 4), num_blocks=1, attn_resolutions=(8, 4, 2))

SONG_CONFIGS = {"ddpmpp": DDPMPP, "ncsnpp": NCSNPP, "skip_encoder": SKIP_ENCODER}
ALL_CONFIGS = [(SongUNet, name, cfg) for name, cfg in SONG_CONFIGS.items()] + [(DhariwalUNet, "adm", ADM)]
CONDITIONS = [(None, 0), (5, 0), (None, 3), (5, 3)]  # (num_class_embeds, augment_dim)


def make(cls, cfg, num_class_embeds=None, augment_dim=0, seed=0, **extra):
    torch.manual_seed(seed)
    return cls(**cfg, num_class_embeds=num_class_embeds, augment_dim=augment_dim, **extra)


@torch.no_grad()
def randomise_(model, seed=1):
    """Every parameter drawn anew: matrices N(0, 1/fan_in), GroupNorm scales 1 + N(0, 0.3²), other vectors
    N(0, 0.5²)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if p.ndim > 1:
            p.copy_(noise / math.sqrt(p[0].numel()))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.3 * noise)
        else:
            p.copy_(0.5 * noise)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Reference: the architecture written functionally from the papers and EDM's layer facts.

def silu(x):
    return x * torch.sigmoid(x)


def fir(taps):
    f = torch.tensor(taps, dtype=torch.float64)
    return torch.outer(f, f) / f.sum() ** 2


def per_channel(x, kernel):
    """Correlate each channel of x with one 2-D kernel (no padding)."""
    b, c, h, w = x.shape
    y = F.conv2d(x.reshape(b * c, 1, h, w), kernel[None, None])
    return y.reshape(b, c, *y.shape[-2:])


def downsample(x, taps, pad):
    """Low-pass with f fᵀ/(Σf)², then keep every other pixel."""
    return per_channel(F.pad(x, [pad] * 4), fir(taps))[..., ::2, ::2]


def upsample(x, taps):
    """Insert zeros between pixels, then low-pass with 4·f fᵀ/(Σf)² (the transposed convolution, upfirdn form)."""
    k, p = len(taps), (len(taps) - 1) // 2
    b, c, h, w = x.shape
    z = x.new_zeros(b, c, 2 * h, 2 * w)
    z[..., ::2, ::2] = x
    return per_channel(F.pad(z, [k - 1 - p, p, k - 1 - p, p]), (4 * fir(taps)).flip(0, 1))


def linear(sd, name, x, bias=True):
    y = x @ sd[f"{name}.weight"].T
    return y + sd[f"{name}.bias"] if bias else y


def conv(sd, name, x, bias=True):
    w = sd[f"{name}.weight"]
    y = F.conv2d(x, w, padding=w.shape[-1] // 2)
    return y + sd[f"{name}.bias"][None, :, None, None] if bias else y


def group_norm(sd, name, x, eps):
    b, c, h, w = x.shape
    g = min(32, c // 4)
    xg = x.reshape(b, g, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)
    return y * sd[f"{name}.weight"][None, :, None, None] + sd[f"{name}.bias"][None, :, None, None]


def attention(sd, name, x, heads, eps):
    """softmax(qᵀk/√d) v per head; qkv channels laid out (head, channel, q/k/v)."""
    b, c, h, w = x.shape
    qkv = conv(sd, f"{name}.qkv", group_norm(sd, f"{name}.norm2", x, eps)).reshape(b, heads, c // heads, 3, h * w)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    weights = torch.softmax(torch.einsum("bhcq,bhck->bhqk", q, k) / math.sqrt(c // heads), dim=-1)
    return conv(sd, f"{name}.proj", torch.einsum("bhqk,bhck->bhcq", weights, v).reshape(b, c, h, w))


# Song et al.: one head; ADM: 64 channels per head (none below 64 channels).
SONG_BLOCK = dict(skip_scale=math.sqrt(0.5), eps=1e-6, adaptive=False, resample_proj=True, heads=lambda c: 1)
ADM_BLOCK = dict(skip_scale=1.0, eps=1e-5, adaptive=True, resample_proj=False, taps=(1, 1), heads=lambda c: c // 64)


def block(sd, name, x, emb, cout, arch, up=False, down=False, attn=False):
    cin = x.shape[1]
    s, eps, taps = arch["skip_scale"], arch["eps"], arch["taps"]

    def resample(t):
        return upsample(t, taps) if up else downsample(t, taps, (len(taps) - 1) // 2) if down else t

    h = conv(sd, f"{name}.conv0", resample(silu(group_norm(sd, f"{name}.norm0", x, eps))))
    params = linear(sd, f"{name}.affine", emb)[:, :, None, None]
    if arch["adaptive"]:
        h = silu(group_norm(sd, f"{name}.norm1", h, eps) * (1 + params[:, :cout]) + params[:, cout:])
    else:
        h = silu(group_norm(sd, f"{name}.norm1", h + params, eps))
    h = conv(sd, f"{name}.conv1", h)
    skip = x
    if cin != cout or up or down:
        skip = resample(x)
        if arch["resample_proj"] or cin != cout:
            skip = conv(sd, f"{name}.skip", skip)
    x = (h + skip) * s
    heads = arch["heads"](cout) if attn else 0
    if heads:
        x = (attention(sd, name, x, heads, eps) + x) * s
    return x


def one_hot(labels, k):
    return torch.eye(k, dtype=torch.float64)[labels]


def song_reference(sd, cfg, x, t, rows, augment):
    """DDPM++/NCSN++ (Song et al. 2021, App. H; EDM App. F.2)."""
    mc, mults, nb, attn = cfg["model_channels"], cfg["channel_mult"], cfg["num_blocks"], cfg["attn_resolutions"]
    taps = cfg.get("resample_filter", (1, 1))
    arch = dict(SONG_BLOCK, taps=taps)
    n = mc * cfg.get("channel_mult_noise", 1)
    if cfg.get("embedding_type", "positional") == "positional":
        omega = (1 / 10000) ** (torch.arange(n // 2, dtype=torch.float64) / (n // 2 - 1))
    else:
        omega = 2 * math.pi * sd["map_noise.freqs"]
    phase = t[:, None] * omega[None]
    emb = torch.cat([phase.sin(), phase.cos()], dim=1)  # Song et al. put sin first
    if rows is not None:
        emb = emb + linear(sd, "map_label", rows * math.sqrt(rows.shape[1]))
    if augment is not None:
        emb = emb + linear(sd, "map_augment", augment, bias=False)
    emb = silu(linear(sd, "map_layer1", silu(linear(sd, "map_layer0", emb))))

    encoder, decoder = cfg.get("encoder_type", "standard"), cfg.get("decoder_type", "standard")
    skips, aux = [], x
    for level, mult in enumerate(mults):
        r = cfg["sample_size"] >> level
        if level == 0:
            x = conv(sd, f"enc.{r}x{r}_conv", x)
        else:
            x = block(sd, f"enc.{r}x{r}_down", x, emb, x.shape[1], arch, down=True)
            if encoder == "skip":
                aux = downsample(aux, taps, (len(taps) - 1) // 2)
                x = x + conv(sd, f"enc.{r}x{r}_aux_skip", aux)
            if encoder == "residual":  # fused: 3×3 conv on an input padded by 1 + filter padding, then filter, stride
                w = sd[f"enc.{r}x{r}_aux_residual.weight"]
                y = downsample(F.conv2d(aux, w, padding=1 + (len(taps) - 1) // 2), taps, 0)
                x = aux = (x + y + sd[f"enc.{r}x{r}_aux_residual.bias"][None, :, None, None]) / math.sqrt(2)
        skips.append(x)
        for i in range(nb):
            x = block(sd, f"enc.{r}x{r}_block{i}", x, emb, mc * mult, arch, attn=r in attn)
            skips.append(x)

    out = None
    for level, mult in reversed(list(enumerate(mults))):
        r = cfg["sample_size"] >> level
        if level == len(mults) - 1:
            x = block(sd, f"dec.{r}x{r}_in0", x, emb, x.shape[1], arch, attn=True)
            x = block(sd, f"dec.{r}x{r}_in1", x, emb, x.shape[1], arch)
        else:
            x = block(sd, f"dec.{r}x{r}_up", x, emb, x.shape[1], arch, up=True)
        for i in range(nb + 1):
            x = torch.cat([x, skips.pop()], dim=1)
            x = block(sd, f"dec.{r}x{r}_block{i}", x, emb, mc * mult, arch, attn=(i == nb and r in attn))
        if decoder == "skip" or level == 0:
            head = conv(sd, f"dec.{r}x{r}_aux_conv", silu(group_norm(sd, f"dec.{r}x{r}_aux_norm", x, 1e-6)))
            out = head if out is None else upsample(out, taps) + head
    return out


def adm_reference(sd, cfg, x, t, rows, augment):
    """ADM (Dhariwal & Nichol 2021; EDM App. F.2)."""
    mc, mults, nb, attn = cfg["model_channels"], cfg["channel_mult"], cfg["num_blocks"], cfg["attn_resolutions"]
    omega = (1 / 10000) ** (torch.arange(mc // 2, dtype=torch.float64) / (mc // 2))
    phase = t[:, None] * omega[None]
    emb = torch.cat([phase.cos(), phase.sin()], dim=1)
    if augment is not None:
        emb = emb + linear(sd, "map_augment", augment, bias=False)
    emb = linear(sd, "map_layer1", silu(linear(sd, "map_layer0", emb)))
    if rows is not None:
        emb = emb + linear(sd, "map_label", rows, bias=False)
    emb = silu(emb)

    skips = []
    for level, mult in enumerate(mults):
        r = cfg["sample_size"] >> level
        if level == 0:
            x = conv(sd, f"enc.{r}x{r}_conv", x)
        else:
            x = block(sd, f"enc.{r}x{r}_down", x, emb, x.shape[1], ADM_BLOCK, down=True)
        skips.append(x)
        for i in range(nb):
            x = block(sd, f"enc.{r}x{r}_block{i}", x, emb, mc * mult, ADM_BLOCK, attn=r in attn)
            skips.append(x)
    for level, mult in reversed(list(enumerate(mults))):
        r = cfg["sample_size"] >> level
        if level == len(mults) - 1:
            x = block(sd, f"dec.{r}x{r}_in0", x, emb, x.shape[1], ADM_BLOCK, attn=True)
            x = block(sd, f"dec.{r}x{r}_in1", x, emb, x.shape[1], ADM_BLOCK)
        else:
            x = block(sd, f"dec.{r}x{r}_up", x, emb, x.shape[1], ADM_BLOCK, up=True)
        for i in range(nb + 1):
            x = torch.cat([x, skips.pop()], dim=1)
            x = block(sd, f"dec.{r}x{r}_block{i}", x, emb, mc * mult, ADM_BLOCK, attn=r in attn)
    return conv(sd, "out_conv", silu(group_norm(sd, "out_norm", x, 1e-5)))


def reference(cls, sd, cfg, x, t, rows, augment):
    return (song_reference if cls is SongUNet else adm_reference)(sd, cfg, x, t, rows, augment)


def inputs(cfg, k, a, seed=2, batch=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.get("in_channels", 3), cfg["sample_size"], cfg["sample_size"], generator=g,
                    dtype=torch.float64)
    t = torch.tensor([-1.1, 0.2, 0.9, 0.4, -0.3][:batch], dtype=torch.float64)
    labels = torch.randint(0, k, (batch,), generator=g) if k else None
    augment = torch.randn(batch, a, generator=g, dtype=torch.float64) if a else None
    return x, t, labels, augment


def assert_matches(out, ref):
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())


@pytest.mark.parametrize("k,a", CONDITIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("cls,name,cfg", ALL_CONFIGS, ids=[n for _, n, _ in ALL_CONFIGS])
def test_forward_matches_reference(cls, name, cfg, k, a):
    model = randomise_(make(cls, cfg, k, a).double()).eval()
    sd = model.state_dict()
    x, t, labels, augment = inputs(cfg, k, a)
    if cls is DhariwalUNet:
        t = t * 400 + 500  # the iDDPM step index range
    rows = one_hot(labels, k) if k else None
    with torch.no_grad():
        out = model(x, t, class_labels=labels, augment_labels=augment).sample
        assert_matches(out, reference(cls, sd, cfg, x, t, rows, augment))
        if a:  # None: no augmentation embedding at all (EDM's sampling)
            out = model(x, t, class_labels=labels).sample
            assert_matches(out, reference(cls, sd, cfg, x, t, rows, None))
        if k:  # float rows are used as given (soft labels, mixtures, zero rows for classifier-free guidance)
            soft = torch.rand(x.shape[0], k, dtype=torch.float64)
            soft[0] = 0
            out = model(x, t, class_labels=soft, augment_labels=augment).sample
            assert_matches(out, reference(cls, sd, cfg, x, t, soft, augment))


@pytest.mark.parametrize("cls,name,cfg", ALL_CONFIGS, ids=[n for _, n, _ in ALL_CONFIGS])
def test_one_hot_rows_equal_integer_labels(cls, name, cfg):
    model = randomise_(make(cls, cfg, 5, 0).double()).eval()
    x, t, labels, _ = inputs(cfg, 5, 0)
    with torch.no_grad():
        by_index = model(x, t, class_labels=labels).sample
        by_rows = model(x, t, class_labels=F.one_hot(labels, 5).double()).sample
    torch.testing.assert_close(by_index, by_rows, rtol=0, atol=0)


def test_timestep_forms_broadcast():
    model = randomise_(make(SongUNet, DDPMPP).double()).eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        full = model(x, torch.full((2,), 0.7, dtype=torch.float64)).sample
        assert torch.equal(model(x, torch.tensor(0.7, dtype=torch.float64)).sample, full)
        assert torch.equal(model(x, 0.7).sample, full)
        (as_tuple,) = model(x, 0.7, return_dict=False)
        assert torch.equal(as_tuple, full)
        # a batch of distinct labels is not one label repeated
        assert not torch.allclose(model(x, torch.tensor([0.7, -0.5], dtype=torch.float64)).sample, full)


# ----------------------------------------------------------------------------------------------------------------------
# State-dict keys and shapes: EDM's names, built from the architecture's rules.

def conv_keys(name, cin, cout, kernel, resample_taps=None, bias=True):
    keys = {}
    if kernel:
        keys[f"{name}.weight"] = (cout, cin, kernel, kernel)
        if bias:
            keys[f"{name}.bias"] = (cout,)
    if resample_taps:
        keys[f"{name}.resample_filter"] = (1, 1, len(resample_taps), len(resample_taps))
    return keys


def norm_keys(name, c):
    return {f"{name}.weight": (c,), f"{name}.bias": (c,)}


def block_keys(name, cin, cout, emb, adm, taps, resample=False, attn=False):
    keys = {**norm_keys(f"{name}.norm0", cin), **conv_keys(f"{name}.conv0", cin, cout, 3, taps if resample else None),
            f"{name}.affine.weight": (cout * (2 if adm else 1), emb),
            f"{name}.affine.bias": (cout * (2 if adm else 1),),
            **norm_keys(f"{name}.norm1", cout), **conv_keys(f"{name}.conv1", cout, cout, 3)}
    if cin != cout or resample:
        kernel = 1 if (not adm or cin != cout) else 0
        keys.update(conv_keys(f"{name}.skip", cin, cout, kernel, taps if resample else None))
    if attn and (cout // 64 if adm else 1):
        keys.update({**norm_keys(f"{name}.norm2", cout), **conv_keys(f"{name}.qkv", cout, 3 * cout, 1),
                     **conv_keys(f"{name}.proj", cout, cout, 1)})
    return keys


def expected_keys(cls, cfg, k, a):
    adm = cls is DhariwalUNet
    mc, mults, nb, attn = cfg["model_channels"], cfg["channel_mult"], cfg["num_blocks"], cfg["attn_resolutions"]
    cin_img, cout_img = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    taps = (1, 1) if adm else cfg.get("resample_filter", (1, 1))
    emb = mc * cfg.get("channel_mult_emb", 4)
    noise = mc if adm else mc * cfg.get("channel_mult_noise", 1)
    encoder, decoder = cfg.get("encoder_type", "standard"), cfg.get("decoder_type", "standard")
    keys = {}
    if cfg.get("embedding_type") == "fourier":
        keys["map_noise.freqs"] = (noise // 2,)
    if k:
        keys["map_label.weight"] = (emb if adm else noise, k)
        if not adm:
            keys["map_label.bias"] = (noise,)
    if a:
        keys["map_augment.weight"] = (noise, a)
    keys.update({"map_layer0.weight": (emb, noise), "map_layer0.bias": (emb,),
                 "map_layer1.weight": (emb, emb), "map_layer1.bias": (emb,)})
    skips, c, caux = [], None, cin_img
    for level, mult in enumerate(mults):
        r = cfg["sample_size"] >> level
        if level == 0:
            c = mc * mult if adm else mc
            keys.update(conv_keys(f"enc.{r}x{r}_conv", cin_img, c, 3))
        else:
            keys.update(block_keys(f"enc.{r}x{r}_down", c, c, emb, adm, taps, resample=True))
            if encoder == "skip":
                keys.update(conv_keys(f"enc.{r}x{r}_aux_down", caux, caux, 0, taps))
                keys.update(conv_keys(f"enc.{r}x{r}_aux_skip", caux, c, 1))
            if encoder == "residual":
                keys.update(conv_keys(f"enc.{r}x{r}_aux_residual", caux, c, 3, taps))
                caux = c
        skips.append(c)
        for i in range(nb):
            keys.update(block_keys(f"enc.{r}x{r}_block{i}", c, mc * mult, emb, adm, taps, attn=r in attn))
            c = mc * mult
            skips.append(c)
    for level, mult in reversed(list(enumerate(mults))):
        r = cfg["sample_size"] >> level
        if level == len(mults) - 1:
            keys.update(block_keys(f"dec.{r}x{r}_in0", c, c, emb, adm, taps, attn=True))
            keys.update(block_keys(f"dec.{r}x{r}_in1", c, c, emb, adm, taps))
        else:
            keys.update(block_keys(f"dec.{r}x{r}_up", c, c, emb, adm, taps, resample=True))
        for i in range(nb + 1):
            with_attn = r in attn if adm else (i == nb and r in attn)
            keys.update(block_keys(f"dec.{r}x{r}_block{i}", c + skips.pop(), mc * mult, emb, adm, taps, attn=with_attn))
            c = mc * mult
        if not adm and (decoder == "skip" or level == 0):
            if decoder == "skip" and level < len(mults) - 1:
                keys.update(conv_keys(f"dec.{r}x{r}_aux_up", cout_img, cout_img, 0, taps))
            keys.update(norm_keys(f"dec.{r}x{r}_aux_norm", c))
            keys.update(conv_keys(f"dec.{r}x{r}_aux_conv", c, cout_img, 3))
    if adm:
        keys.update({**norm_keys("out_norm", c), **conv_keys("out_conv", c, cout_img, 3)})
    return keys


@pytest.mark.parametrize("k,a", CONDITIONS, ids=lambda v: str(v))
@pytest.mark.parametrize("cls,name,cfg", ALL_CONFIGS, ids=[n for _, n, _ in ALL_CONFIGS])
def test_state_dict_keys_and_shapes_are_edms(cls, name, cfg, k, a):
    model = make(cls, cfg, k, a)
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert got == expected_keys(cls, cfg, k, a)
    for key, value in model.state_dict().items():
        if key.endswith("resample_filter"):
            taps = (1, 1) if cls is DhariwalUNet else cfg.get("resample_filter", (1, 1))
            torch.testing.assert_close(value, fir(taps).float()[None, None], rtol=0, atol=0)


def test_state_dict_keys_by_hand():
    """A tiny conditional, augmented DDPM++ (8×8, widths 16/32, one block, attention at 4×4), listed from EDM's
    source: skips are [conv 16, block0 16, down 16, block0 32]; the decoder pops them in reverse."""
    model = SongUNet(sample_size=8, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                     num_class_embeds=3, augment_dim=2)

    def blk(name, cin, cout, skip=None, attn=False, resample=False):
        keys = {f"{name}.norm0.weight": (cin,), f"{name}.norm0.bias": (cin,), f"{name}.conv0.weight": (cout, cin, 3, 3),
                f"{name}.conv0.bias": (cout,), f"{name}.affine.weight": (cout, 64), f"{name}.affine.bias": (cout,),
                f"{name}.norm1.weight": (cout,), f"{name}.norm1.bias": (cout,),
                f"{name}.conv1.weight": (cout, cout, 3, 3), f"{name}.conv1.bias": (cout,)}
        if resample:
            keys[f"{name}.conv0.resample_filter"] = (1, 1, 2, 2)
        if skip:
            keys.update({f"{name}.skip.weight": (cout, cin, 1, 1), f"{name}.skip.bias": (cout,)})
            if resample:
                keys[f"{name}.skip.resample_filter"] = (1, 1, 2, 2)
        if attn:
            keys.update({f"{name}.norm2.weight": (cout,), f"{name}.norm2.bias": (cout,),
                         f"{name}.qkv.weight": (3 * cout, cout, 1, 1), f"{name}.qkv.bias": (3 * cout,),
                         f"{name}.proj.weight": (cout, cout, 1, 1), f"{name}.proj.bias": (cout,)})
        return keys

    expected = {
        "map_label.weight": (16, 3), "map_label.bias": (16,), "map_augment.weight": (16, 2),
        "map_layer0.weight": (64, 16), "map_layer0.bias": (64,),
        "map_layer1.weight": (64, 64), "map_layer1.bias": (64,),
        "enc.8x8_conv.weight": (16, 3, 3, 3), "enc.8x8_conv.bias": (16,),
        **blk("enc.8x8_block0", 16, 16),
        **blk("enc.4x4_down", 16, 16, skip=True, resample=True),
        **blk("enc.4x4_block0", 16, 32, skip=True, attn=True),
        **blk("dec.4x4_in0", 32, 32, attn=True),
        **blk("dec.4x4_in1", 32, 32),
        **blk("dec.4x4_block0", 64, 32, skip=True),
        **blk("dec.4x4_block1", 48, 32, skip=True, attn=True),
        **blk("dec.8x8_up", 32, 32, skip=True, resample=True),
        **blk("dec.8x8_block0", 48, 16, skip=True),
        **blk("dec.8x8_block1", 32, 16, skip=True),
        "dec.8x8_aux_norm.weight": (16,), "dec.8x8_aux_norm.bias": (16,),
        "dec.8x8_aux_conv.weight": (3, 16, 3, 3), "dec.8x8_aux_conv.bias": (3,),
    }
    assert {key: tuple(v.shape) for key, v in model.state_dict().items()} == expected


def test_state_dict_of_a_fresh_model_loads_strictly():
    """An EDM-style state dict (another instance's) loads with strict=True and gives the same function."""
    a = randomise_(make(SongUNet, NCSNPP, 5, 3).double(), seed=3).eval()
    b = make(SongUNet, NCSNPP, 5, 3, seed=9).double().eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x, t, labels, augment = inputs(NCSNPP, 5, 3)
    with torch.no_grad():
        assert torch.equal(a(x, t, labels, augment).sample, b(x, t, labels, augment).sample)


# ----------------------------------------------------------------------------------------------------------------------
# Initialisation (EDM App. F.2): Song's networks Xavier-uniform, ADM PyTorch's default uniform; residual-closing
# layers zero (ADM) or 1e-5 scaled (Song).

def test_initialisation():
    song = make(SongUNet, dict(DDPMPP, model_channels=32), 5, 3)
    w = song.enc["16x16_block0"].conv0.weight
    bound = math.sqrt(6 / (w[0].numel() + w.shape[0] * 9))
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert song.enc["16x16_block0"].conv0.bias.abs().max() == 0
    assert 0 < song.enc["16x16_block0"].conv1.weight.abs().max() <= 1e-5 * bound
    qkv = song.enc["8x8_block0"].qkv.weight
    assert qkv.abs().max() <= math.sqrt(0.2) * math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))
    adm = make(DhariwalUNet, ADM, 7, 3)
    w, b = adm.enc["8x8_block0"].conv0.weight, adm.enc["8x8_block0"].conv0.bias
    assert w.abs().max() <= 1 / math.sqrt(w[0].numel()) and b.abs().max() <= 1 / math.sqrt(w[0].numel())
    assert b.abs().max() > 0
    for zero in (adm.enc["8x8_block0"].conv1.weight, adm.out_conv.weight, adm.out_conv.bias, adm.map_augment.weight,
                 adm.enc["4x4_block0"].proj.weight):
        assert zero.abs().max() == 0
    assert abs(adm.map_label.weight.std().item() - 1) < 0.15  # unit-normal class embedding


# ----------------------------------------------------------------------------------------------------------------------
# Class-label dropout (classifier-free guidance training).

@pytest.mark.parametrize("cls,name,cfg", [ALL_CONFIGS[0], ALL_CONFIGS[-1]], ids=["ddpmpp", "adm"])
def test_label_dropout(cls, name, cfg):
    batch = 40
    model = randomise_(make(cls, dict(cfg, dropout=0.0), 5, 0, label_dropout=0.25).double())
    x, t, _, _ = inputs(cfg, 5, 0, batch=1)
    x, t = x.expand(batch, -1, -1, -1), t.expand(batch)
    labels = torch.arange(batch) % 5
    with torch.no_grad():
        model.eval()
        conditional = model(x, t, class_labels=labels).sample
        unconditional = model(x, t, class_labels=torch.zeros(batch, 5, dtype=torch.float64)).sample
        model.train()
        torch.manual_seed(0)
        trained = model(x, t, class_labels=labels).sample
    dropped = [(trained[i] - unconditional[i]).abs().max() < 1e-12 for i in range(batch)]
    kept = [(trained[i] - conditional[i]).abs().max() < 1e-12 for i in range(batch)]
    assert all(d != k for d, k in zip(dropped, kept))  # each sample is exactly one of the two
    assert 3 <= sum(dropped) <= 18  # Binomial(40, 0.25): mean 10, sd 2.7
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t, class_labels=labels).sample, conditional)  # no dropout at evaluation


# ----------------------------------------------------------------------------------------------------------------------
# diffusers integration.

@pytest.mark.parametrize("cls,name,cfg", [ALL_CONFIGS[1], ALL_CONFIGS[-1]], ids=["ncsnpp", "adm"])
def test_save_load_round_trip(cls, name, cfg, tmp_path):
    model = randomise_(make(cls, cfg, 5, 3)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = cls.from_pretrained(tmp_path).eval()
    for key in ("sample_size", "in_channels", "out_channels", "num_class_embeds", "augment_dim"):
        assert loaded.config[key] == model.config[key]
    assert loaded.config.num_class_embeds == 5 and loaded.config.augment_dim == 3
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x, t, labels, augment = (v.float() if v is not None and v.is_floating_point() else v
                             for v in inputs(cfg, 5, 3))
    with torch.no_grad():
        assert torch.equal(model(x, t, labels, augment).sample, loaded(x, t, labels, augment).sample)


# ----------------------------------------------------------------------------------------------------------------------
# Refusals.

@pytest.mark.parametrize("kwargs,match", [
    (dict(embedding_type="sinusoidal"), "embedding_type.*positional.*fourier"),
    (dict(encoder_type="progressive"), "encoder_type.*standard.*skip.*residual"),
    (dict(decoder_type="residual"), "decoder_type.*standard.*skip"),
    (dict(sample_size=18), "sample_size must be divisible by 4"),
    (dict(resample_filter=()), "resample_filter"),
])
def test_song_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SongUNet(**{**DDPMPP, **kwargs})


def test_input_errors():
    cond = make(SongUNet, DDPMPP, 5, 3).eval()
    uncond = make(DhariwalUNet, ADM).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.zeros(2)
    xa = torch.randn(2, 3, 8, 8)
    cases = [
        (lambda: uncond(xa, t, class_labels=torch.tensor([0, 1])), "unconditional"),
        (lambda: cond(x, t), "class_labels are required"),
        (lambda: cond(x, t, class_labels=torch.tensor([0, 5])), r"\[0, 4\]"),
        (lambda: cond(x, t, class_labels=torch.tensor([-1, 2])), r"\[0, 4\]"),
        (lambda: cond(x, t, class_labels=torch.tensor([0, 1, 2])), r"shape \(2,\)"),
        (lambda: cond(x, t, class_labels=torch.zeros(2, 4)), r"shape \(2, 5\)"),
        (lambda: cond(x, t, class_labels=torch.zeros(2, 5, dtype=torch.bool)), "integer indices or float rows"),
        (lambda: cond(x, t, torch.tensor([0, 1]), augment_labels=torch.zeros(2, 2)), r"shape \(2, 3\)"),
        (lambda: uncond(xa, t, augment_labels=torch.zeros(2, 3)), "augment_dim=0"),
        (lambda: cond(torch.randn(2, 4, 16, 16), t, torch.tensor([0, 1])), r"\(batch, 3, H, W\)"),
        (lambda: cond(torch.randn(2, 3, 18, 18), t, torch.tensor([0, 1])), "divisible by 4"),
        (lambda: cond(x, torch.zeros(3), torch.tensor([0, 1])), r"timestep must have shape \(\) or \(2,\)"),
        (lambda: cond(x, "1.0", torch.tensor([0, 1])), "timestep must be a number"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_dhariwal_config_errors():
    with pytest.raises(ValueError, match="sample_size must be divisible by 4"):
        DhariwalUNet(**{**ADM, "sample_size": 6})
    with pytest.raises(ValueError, match="num_class_embeds"):
        DhariwalUNet(**ADM, num_class_embeds=-1)
