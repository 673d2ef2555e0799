"""EDM's non-leaky augmentation (NVlabs/edm training/augment.py), checked against closed forms written here: the
sym6 filter's defining properties, exact blits, a 90° rotation, an integer translation with edge-exclusive
reflection, a half-pixel shift through the sym6 up/down-sampling, EDM's label layout and probabilities."""

import math

import pytest
import torch

from diffusers_stf.augment import SYM6, AugmentParameters, AugmentPipe

OFF = dict(xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)


def images(n=3, c=2, h=8, w=8, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1


def mirror(i, size):
    """Edge-exclusive reflection, written as a walk: …, 2, 1, 0, 1, 2, …, size−1, size−2, …"""
    while not 0 <= i < size:
        i = -i if i < 0 else 2 * (size - 1) - i
    return i


def test_sym6_constants_are_an_orthonormal_wavelet_with_six_vanishing_moments():
    h = [float(v) for v in SYM6]
    assert len(h) == 12
    assert abs(sum(h) - math.sqrt(2)) < 1e-12
    for k in range(6):  # Σ h[n]·h[n + 2k] = δ_k
        assert abs(sum(h[n] * h[n + 2 * k] for n in range(12 - 2 * k)) - (k == 0)) < 1e-11
    g = [(-1) ** n * h[11 - n] for n in range(12)]  # the high-pass filter
    for p in range(6):  # Σ n^p g[n] = 0: six vanishing moments
        assert abs(sum(n**p * g[n] for n in range(12))) < 1e-6 * 11**p


def test_all_zero_labels_return_exactly_the_input():
    x = images()
    out, labels = AugmentPipe(p=0.0)(x, torch.Generator().manual_seed(1))
    assert torch.equal(out, x) and torch.equal(labels, torch.zeros(3, 9, dtype=x.dtype))
    pipe = AugmentPipe(p=1.0, rotate_int=1, translate_int=1, brightness=1, contrast=1, lumaflip=1, hue=1,
                       saturation=1)
    zeros = pipe.sample_parameters(3)
    for name in vars(zeros):
        value = getattr(zeros, name)
        if value is not None:
            setattr(zeros, name, torch.zeros_like(value))
    x = images(c=3)
    out, labels = pipe.apply(x, zeros)
    assert torch.equal(out, x) and labels.shape == (3, 19) and not labels.any()


def test_flips_and_integer_rotation_are_exact_with_edm_labels():
    x = images(n=4)
    pipe = AugmentPipe(p=1.0, **{**OFF, "xflip": 1, "yflip": 1}, rotate_int=1)
    params = AugmentParameters(xflip=torch.tensor([1, 0, 0, 1]), yflip=torch.tensor([0, 1, 0, 1]),
                               rotate_int=torch.tensor([1, 2, 3, 0]))
    out, labels = pipe.apply(x, params)
    # written out: x-flip reverses columns, y-flip rows; rotate_int k = 1, 2, 3 turns by k·90° (k = 2: both flips)
    expected = [x[0].flip(-1), x[1].flip(-2), x[2], x[3].flip(-1).flip(-2)]
    rot = {1: lambda a: a.flip(-1).transpose(-2, -1), 2: lambda a: a.flip(-1).flip(-2),
           3: lambda a: a.flip(-2).transpose(-2, -1), 0: lambda a: a}
    for i, k in enumerate([1, 2, 3, 0]):
        assert torch.equal(out[i], rot[k](expected[i]))
    n = x.shape[-1]  # k = 1: output (r, c) reads input (c, n−1−r); k = 3: input (n−1−c, r)
    assert all(torch.equal(out[0, :, r, c], expected[0][:, c, n - 1 - r]) for r in range(n) for c in range(n))
    assert all(torch.equal(out[2, :, r, c], x[2, :, n - 1 - c, r]) for r in range(n) for c in range(n))
    # EDM's labels: [xflip, yflip, (k==1)|(k==2), (k==2)|(k==3)]
    assert labels.tolist() == [[1, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 0, 0]]


def test_integer_translation_reflects_without_repeating_the_edge_pixel():
    x = images(n=2, h=6, w=8)
    pipe = AugmentPipe(p=1.0, **OFF, translate_int=1, translate_int_max=0.5)
    # w·size·max = shift: t_x = 3 (of 8 columns), t_y = -2 (of 6 rows); second image t_x = -4, t_y = 1
    w = torch.tensor([[3 / 4, -4 / 4], [-2 / 3, 1 / 3]], dtype=torch.float64)
    out, labels = pipe.apply(x, AugmentParameters(translate_int=w))
    for b, (tx, ty) in enumerate([(3, -2), (-4, 1)]):
        for i in range(6):
            for j in range(8):  # EDM: column j reads column j − t_x, row i reads row i + t_y, mirrored
                assert torch.equal(out[b, :, i, j], x[b, :, mirror(i + ty, 6), mirror(j - tx, 8)])
    assert labels.tolist() == [[3 / 4, -2 / 3], [-4 / 4, 1 / 3]]


def ramps(n=16, slope=0.05):
    """Images linear in the column index (first) and in the row index (second), zero at the centre."""
    coord = (torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * slope
    return torch.stack([coord.expand(n, n), coord[:, None].expand(n, n)])[:, None]


def slopes(out, border=4):
    """(d/d column, d/d row) of each image, from differences in the interior (linear images stay linear under the
    sym6 resampling; only a constant offset from the filter's asymmetry remains)."""
    inner = out[..., border:-border, border:-border]
    return inner.diff(dim=-1), inner.diff(dim=-2)


def test_rotation_and_aniso_signs_follow_edm_labels():
    # G⁻¹ = R(θ): the output at p reads the input at R(θ)·p; for θ = +90° (x right, y down) x_in = −y_out and
    # y_in = x_out, so a ramp α·x becomes −α·y and a ramp α·y becomes α·x.
    alpha = 0.05
    pipe = AugmentPipe(p=1.0, **{**OFF, "rotate_frac": 1})
    out, labels = pipe.apply(ramps(slope=alpha), AugmentParameters(rotate_frac=torch.full((2,), math.pi / 2)))
    d_col, d_row = slopes(out)
    torch.testing.assert_close(d_row[0], torch.full_like(d_row[0], -alpha), rtol=0, atol=1e-4)  # x_in = −y_out
    torch.testing.assert_close(d_col[0], torch.zeros_like(d_col[0]), rtol=0, atol=1e-4)
    torch.testing.assert_close(d_col[1], torch.full_like(d_col[1], alpha), rtol=0, atol=1e-4)  # y_in = x_out
    assert labels[:, 1].tolist() == [1.0, 1.0] and abs(float(labels[0, 0]) + 1) < 1e-12  # sin θ = +1, cos θ − 1 = −1
    # anisotropic scaling with w = 1, std = 1, r = 0: s = 2, G⁻¹ = diag(1/s, s): x_in = x/2, y_in = 2y
    pipe = AugmentPipe(p=1.0, **{**OFF, "aniso": 1}, aniso_std=1.0)
    out, labels = pipe.apply(ramps(n=40, slope=alpha), AugmentParameters(aniso=torch.ones(2),
                                                                          aniso_angle=torch.zeros(2)))
    d_col, d_row = slopes(out, border=16)  # y_in = 2y reaches twice as far out: stay clear of the border
    torch.testing.assert_close(d_col[0], torch.full_like(d_col[0], alpha / 2), rtol=0, atol=1e-4)
    torch.testing.assert_close(d_row[1], torch.full_like(d_row[1], alpha * 2), rtol=0, atol=1e-4)
    assert labels.tolist() == [[1.0, 0.0], [1.0, 0.0]]


def test_half_pixel_shift_is_the_sym6_half_band_interpolation():
    # Upsampling by 2 and downsampling with the same orthonormal filter h is the identity; between them a shift of
    # one upsampled sample (half a pixel) leaves out[j] = Σ_k a(2k+1)·(x[j−1−k] + x[j+k]), with a the
    # autocorrelation a(m) = Σ_n h[n]·h[n+m] (its odd taps sum to ½ on each side).
    h = [float(v) for v in SYM6]
    a = {m: sum(h[n] * h[n + m] for n in range(12 - m)) for m in range(12)}
    assert abs(2 * sum(a[2 * k + 1] for k in range(6)) - 1) < 1e-12
    w = 8
    x = images(n=1, c=1, h=5, w=w)
    pipe = AugmentPipe(p=1.0, **{**OFF, "translate_frac": 1}, translate_frac_std=0.125)
    shift = torch.tensor([[0.5 / (w * 0.125)], [0.0]], dtype=torch.float64)  # +½ pixel along x
    out, labels = pipe.apply(x, AugmentParameters(translate_frac=shift))
    expected = torch.empty_like(x)
    for i in range(5):
        for j in range(w):
            expected[0, 0, i, j] = sum(a[2 * k + 1] * (x[0, 0, i, mirror(j - 1 - k, w)] + x[0, 0, i, mirror(j + k, w)])
                                       for k in range(6))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert labels.tolist() == [[0.5, 0.0]]
    # the bilinear warp the issue measured against differs from this by far more
    bilinear = 0.5 * (x + torch.cat([x[..., 1:2], x[..., :-1]], dim=-1))
    assert (bilinear - expected).abs().mean() > 10 * (out - expected).abs().max()


def test_label_vector_for_known_parameters():
    n = 2
    params = AugmentParameters(
        xflip=torch.tensor([1, 0]), yflip=torch.tensor([0, 1]), scale=torch.tensor([0.5, -1.0]),
        rotate_frac=torch.tensor([0.3, -2.0]), aniso=torch.tensor([1.5, 0.0]), aniso_angle=torch.tensor([0.7, 1.0]),
        translate_frac=torch.tensor([[0.1, -0.4], [0.2, 0.0]]))
    _, labels = AugmentPipe(p=1.0).apply(images(n=n), params)
    # EDM's order: [xflip, yflip, scale w, cos θ − 1, sin θ, w_a·cos r, w_a·sin r, t_x, t_y]
    expected = [[1, 0, 0.5, math.cos(0.3) - 1, math.sin(0.3), 1.5 * math.cos(0.7), 1.5 * math.sin(0.7), 0.1, 0.2],
                [0, 1, -1.0, math.cos(-2.0) - 1, math.sin(-2.0), 0.0, 0.0, -0.4, 0.0]]
    torch.testing.assert_close(labels, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    colour = AugmentPipe(p=1.0, **OFF, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
    _, labels = colour.apply(images(n=1, c=3), AugmentParameters(
        brightness=torch.tensor([0.2]), contrast=torch.tensor([-0.3]), lumaflip=torch.tensor([1]),
        hue=torch.tensor([1.1]), saturation=torch.tensor([0.4])))
    torch.testing.assert_close(labels, torch.tensor([[0.2, -0.3, 1, math.cos(1.1) - 1, math.sin(1.1), 0.4]],
                                                    dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert AugmentPipe().label_dim == 9 and AugmentPipe(xflip=0).label_dim == 8 and colour.label_dim == 6


def test_isotropic_scale_and_brightness_in_closed_form():
    # scale 2^(w·std) = 2 about the centre: the output at p reads the input at p/2, so every slope halves;
    # brightness adds w·brightness_std to every channel.
    alpha = 0.05
    out, _ = AugmentPipe(p=1.0, **{**OFF, "scale": 1}, scale_std=1.0).apply(
        ramps(slope=alpha), AugmentParameters(scale=torch.ones(2)))
    d_col, d_row = slopes(out)
    torch.testing.assert_close(d_col[0], torch.full_like(d_col[0], alpha / 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(d_row[1], torch.full_like(d_row[1], alpha / 2), rtol=0, atol=1e-6)
    x = images(n=1, c=3)
    out, _ = AugmentPipe(p=1.0, **OFF, brightness=1).apply(x, AugmentParameters(brightness=torch.tensor([1.5])))
    torch.testing.assert_close(out, x + 1.5 * 0.2, rtol=0, atol=1e-12)


def test_probabilities_follow_edm():
    # xflip = 1e8 at p = 0.12 is always eligible, then a fair coin: half the images flip. yflip fires with p, then a
    # coin: p/2. The aniso frame is rotated with probability 0.5 whatever p.
    pipe = AugmentPipe()
    params = pipe.sample_parameters(40000, torch.Generator().manual_seed(0))
    assert abs(params.xflip.double().mean() - 0.5) < 0.01
    assert abs(params.yflip.double().mean() - 0.06) < 0.006
    assert abs((params.scale != 0).double().mean() - 0.12) < 0.008
    assert abs((params.aniso_angle != 0).double().mean() - 0.5) < 0.01
    assert abs((params.translate_frac[0] != 0).double().mean() - 0.12) < 0.008
    assert (params.rotate_frac.abs() <= math.pi).all()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="p must be in"):
        AugmentPipe(p=1.5)
    with pytest.raises(ValueError, match="scale_std"):
        AugmentPipe(scale_std=float("nan"))
    with pytest.raises(ValueError, match="colour augmentation"):
        AugmentPipe(p=1.0, **OFF, brightness=1)(torch.zeros(2, 2, 4, 4), torch.Generator().manual_seed(0))
