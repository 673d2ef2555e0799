"""Power-function EMA and post-hoc reconstruction (EDM2 Sec. 3.1–3.2, Eq. 3, Algorithms 2 and 3), checked against
the profile p_t(τ) = (γ+1)τ^γ/t^(γ+1) itself: its moments, its integrals over the training steps, and numerical
quadrature of the least-squares residual."""

import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scipy.optimize import brentq
from torch import nn

from diffusers_stf.phema import (
    PowerFunctionEMA,
    exp_to_std,
    list_snapshots,
    main,
    power_function_beta,
    reconstruct,
    save_snapshots,
    solve_posthoc_coefficients,
    std_to_exp,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def profile_std(gamma):
    """σ_rel from the definition: the std of the density (γ+1)τ^γ on [0, 1] (mean (γ+1)/(γ+2), E τ² = (γ+1)/(γ+3))."""
    return math.sqrt((gamma + 1) / (gamma + 3) - ((gamma + 1) / (gamma + 2)) ** 2)


def gamma_of(std):
    """γ with profile_std(γ) = std, by bracketing (profile_std decreases on γ > 0)."""
    return brentq(lambda g: profile_std(g) - std, 1e-12, 1e6, xtol=1e-14, rtol=1e-15)


def profile(tau, t, gamma):
    return np.where(tau <= t, (gamma + 1) * (tau / t) ** gamma / t, 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# γ ↔ σ_rel and β


def test_std_and_exp_are_inverse_and_match_the_profile_moments_and_the_paper():
    for gamma in (0.5, 2.0, 6.94, 16.97, 100.0):
        assert exp_to_std(gamma) == pytest.approx(profile_std(gamma), rel=1e-12)
        assert std_to_exp(exp_to_std(gamma)) == pytest.approx(gamma, rel=1e-10)
    stds = np.array([0.01, 0.05, 0.07, 0.10, 0.2, 0.28])
    np.testing.assert_allclose(exp_to_std(std_to_exp(stds)), stds, rtol=1e-12)
    np.testing.assert_allclose(std_to_exp(stds), [gamma_of(s) for s in stds], rtol=1e-9)
    # the paper: σ_rel 0.05 and 0.10 are γ = 16.97 and 6.94
    assert round(float(std_to_exp(0.05)), 2) == 16.97 and round(float(std_to_exp(0.10)), 2) == 6.94


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.2887, 0.289, 0.3, float("nan")])
def test_stds_outside_the_valid_range_are_refused(bad):
    # the exact bound is σ_rel < 1/√12 = 0.28868 (γ > 0); the paper rounds it to 0.289
    with pytest.raises(ValueError, match="std"):
        std_to_exp(bad)
    with pytest.raises(ValueError, match="stds"):
        PowerFunctionEMA([torch.zeros(3)], stds=(0.05, bad))
    with pytest.raises(ValueError, match="out_stds"):
        solve_posthoc_coefficients([10, 20], [0.05, 0.1], 20, bad)


def test_power_function_beta_is_the_closed_form_and_its_products_give_the_profile():
    for std in (0.05, 0.10, 0.2):
        gamma = gamma_of(std)
        for t_next, t_delta in ((1, 1), (2, 1), (10, 1), (4096, 2048), (1e7, 2048)):
            assert power_function_beta(std, t_next, t_delta) == pytest.approx((1 - t_delta / t_next) ** (gamma + 1),
                                                                            rel=1e-9, abs=1e-300)
        # the weight of the update at step τ in the average at step T is ∫_{τ−1}^{τ} p_T: Π_{s>τ} β_s = (τ/T)^(γ+1)
        T, tau = 50, 20
        prod = np.prod([power_function_beta(std, s, 1) for s in range(tau + 1, T + 1)])
        assert prod == pytest.approx((tau / T) ** (gamma + 1), rel=1e-10)
    assert power_function_beta(0.1, 5, 5) == 0.0  # the first update copies the weights
    with pytest.raises(ValueError, match="t_delta"):
        power_function_beta(0.1, 1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# Tracking


def walk(steps, dim, seed=0):
    """A random walk with a smooth drift: θ_1 … θ_steps, float64."""
    g = torch.Generator().manual_seed(seed)
    increments = 0.05 * torch.randn(steps, dim, generator=g, dtype=torch.float64)
    drift = torch.sin(torch.linspace(0, 3, steps, dtype=torch.float64))[:, None] * torch.linspace(-1, 1, dim,
                                                                                                 dtype=torch.float64)
    return increments.cumsum(0) + drift


def track(trajectory, stds, snapshot_every=None):
    """Track ``stds`` over ``trajectory`` (one step = one unit of time); returns the tracker and the snapshots
    [(step, {std: tensor})]."""
    param = torch.zeros(trajectory.shape[1], dtype=torch.float64)
    ema = PowerFunctionEMA([param], stds=stds)
    snapshots = []
    for step, theta in enumerate(trajectory, start=1):
        param.copy_(theta)
        ema.update(step, 1)
        if snapshot_every and step % snapshot_every == 0:
            snapshots.append((step, {s: w["0"] for s, w in ema.snapshot().items()}))
    return ema, snapshots


def test_tracked_average_is_the_profile_integrated_over_each_step():
    trajectory = walk(300, 3)
    ema, _ = track(trajectory, (0.05, 0.15))
    T = len(trajectory)
    tau = np.arange(1, T + 1, dtype=np.float64)
    for std, average in ema.snapshot().items():
        gamma = gamma_of(std)
        weights = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / T ** (gamma + 1)
        expected = (torch.from_numpy(weights)[:, None] * trajectory).sum(0)
        torch.testing.assert_close(average["0"], expected, rtol=1e-9, atol=1e-12)


def quadrature(in_times, out_time, nodes_per_interval=400):
    """Gauss–Legendre nodes and weights on (0, out_time), split at the snapshot times (the kinks of the profiles)."""
    nodes, weights = np.polynomial.legendre.leggauss(nodes_per_interval)
    edges = np.unique(np.concatenate([[0.0], np.asarray(in_times, float), [out_time]]))
    taus = [0.5 * (b - a) * nodes + 0.5 * (a + b) for a, b in zip(edges[:-1], edges[1:])]
    return np.concatenate(taus), np.concatenate([0.5 * (b - a) * weights for a, b in zip(edges[:-1], edges[1:])])


def least_squares_by_quadrature(in_times, in_stds, out_time, out_std):
    """Algorithm 3 with the inner products integrated numerically: the coefficients (rescaled to sum 1) and the L²
    residual ‖Σ x_i p_i − q‖ of a given coefficient vector."""
    tau, w = quadrature(in_times, out_time)
    basis = np.stack([profile(tau, t, gamma_of(s)) for t, s in zip(in_times, in_stds)])
    target = profile(tau, out_time, gamma_of(out_std))
    x = np.linalg.solve((basis * w) @ basis.T, (basis * w) @ target)

    def residual(coefficients):
        return math.sqrt(np.sum(w * (coefficients @ basis - target) ** 2))

    return x / x.sum(), residual


def test_posthoc_reconstruction_reproduces_a_directly_tracked_ema():
    """Track 0.05 and 0.10 with snapshots every 50 of 2000 steps, and 0.07 directly; reconstruct 0.07 at the end.

    The coefficients are Algorithm 3's least squares (checked against the same fit with numerically integrated inner
    products). The discrete EMA is exactly ∫ p θ dτ for weights constant within a step, and the coefficients sum to
    1, so the error is ∫ (Σ x_i p_i − q)(θ − θ_T) dτ, at most ‖Σ x_i p_i − q‖·‖θ − θ_T‖ (Cauchy–Schwarz). Measured:
    the fit's relative L² residual is 6e-4, the error 5e-5 of the gap between the 0.05 and 0.10 averages."""
    trajectory = walk(2000, 16)
    _, snapshots = track(trajectory, (0.05, 0.10), snapshot_every=50)
    direct, _ = track(trajectory, (0.07,))
    target = direct.snapshot()[0.07]["0"]

    in_times = [step for step, snap in snapshots for _ in snap]
    in_stds = [std for _, snap in snapshots for std in snap]
    states = [w for _, snap in snapshots for w in snap.values()]
    T = snapshots[-1][0]
    x = solve_posthoc_coefficients(in_times, in_stds, T, 0.07)[:, 0]
    x_quadrature, residual_of = least_squares_by_quadrature(in_times, in_stds, T, 0.07)
    np.testing.assert_allclose(x, x_quadrature, rtol=1e-6, atol=1e-9)
    rebuilt = sum(float(c) * w for c, w in zip(x, states))

    error = (rebuilt - target).abs()
    spread = (trajectory - trajectory[-1]).square().sum(0).sqrt()  # ‖θ − θ_T‖ in L²(0, T), per coordinate
    assert torch.all(error <= residual_of(x) * spread * (1 + 1e-6) + 1e-10), (error.max(), residual_of(x))
    # far smaller than the gap between the two tracked averages it interpolates across
    gap = (snapshots[-1][1][0.05] - snapshots[-1][1][0.10]).abs()
    assert error.max() < 5e-4 * gap.max(), (error.max(), gap.max())


def test_reconstructing_a_tracked_std_at_the_last_snapshot_returns_that_ema():
    trajectory = walk(600, 4, seed=1)
    _, snapshots = track(trajectory, (0.05, 0.10), snapshot_every=60)
    in_times = [step for step, snap in snapshots for _ in snap]
    in_stds = [std for _, snap in snapshots for std in snap]
    states = [w for _, snap in snapshots for w in snap.values()]
    x = solve_posthoc_coefficients(in_times, in_stds, snapshots[-1][0], [0.05, 0.10])
    for j, std in enumerate((0.05, 0.10)):
        rebuilt = sum(float(c) * w for c, w in zip(x[:, j], states))
        torch.testing.assert_close(rebuilt, snapshots[-1][1][std], rtol=1e-7, atol=1e-9)


def test_resume_from_state_dict_is_bit_exact(tmp_path):
    model = nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(0)

    def perturb():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))

    ema = PowerFunctionEMA(model, stds=(0.05, 0.10))
    for step in range(1, 21):
        perturb()
        ema.update(step * 8, 8)
    save_file(ema.state_dict(), str(tmp_path / "ema.safetensors"))
    g_state, weights = g.get_state(), {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(21, 41):
        perturb()
        ema.update(step * 8, 8)
    uninterrupted = ema.snapshot()

    g.set_state(g_state)
    model.load_state_dict(weights)
    resumed = PowerFunctionEMA(model, stds=(0.05, 0.10))
    resumed.load_state_dict(load_file(str(tmp_path / "ema.safetensors")))
    for step in range(21, 41):
        perturb()
        resumed.update(step * 8, 8)
    for std in (0.05, 0.10):
        for key, value in uninterrupted[std].items():
            assert torch.equal(resumed.snapshot()[std][key], value), key
    with pytest.raises(ValueError, match="stds"):
        PowerFunctionEMA(model, stds=(0.05, 0.2)).load_state_dict(ema.state_dict())


# ----------------------------------------------------------------------------------------------------------------------
# Snapshot files and the command line


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 32)
        self.register_buffer("scale", torch.arange(5, dtype=torch.float32))


def write_run(folder, steps=120, every=20, dtype=torch.float16, seed=0):
    """Train-like updates of a small module with snapshots; returns the module, a directly tracked 0.07 EMA."""
    torch.manual_seed(seed)
    model = WithBuffer()
    ema = PowerFunctionEMA(model, stds=(0.05, 0.10))
    direct = PowerFunctionEMA(model, stds=(0.07,))
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p) + 0.001)
        ema.update(step * 16, 16)
        direct.update(step * 16, 16)
        if step % every == 0:
            save_snapshots(str(folder), ema, step, step * 16, dtype=dtype)
    return model, direct


def test_snapshot_files_hold_the_format_and_the_reconstruction_matches_tracking(tmp_path):
    model, direct = write_run(tmp_path / "phema_snapshots", dtype=None)
    snapshots = list_snapshots(str(tmp_path / "phema_snapshots"))
    assert [(s.step, s.std) for s in snapshots[:2]] == [(20, 0.05), (20, 0.10)] and len(snapshots) == 12
    with safe_open(snapshots[0].path, framework="pt") as f:
        meta = f.metadata()
    assert os.path.basename(snapshots[0].path) == "phema-000000020-0.050.safetensors"
    assert meta["format"] == "diffusers_stf.phema.snapshot" and float(meta["time"]) == 320.0
    assert meta["step"] == "20" and float(meta["std"]) == 0.05 and json.loads(meta["buffers"]) == ["scale"]

    states, step, time = reconstruct(str(tmp_path / "phema_snapshots"), [0.07, 0.10])
    assert (step, time) == (120, 1920.0)
    target = direct.snapshot()[0.07]
    assert set(states[0.07]) == set(model.state_dict())
    assert torch.equal(states[0.07]["scale"], model.scale)  # buffers copied, not averaged
    for key in ("linear.weight", "linear.bias"):
        err = (states[0.07][key] - target[key]).abs().max()
        gap = (load_file(snapshots[-2].path)[key] - load_file(snapshots[-1].path)[key]).abs().max()
        assert err < 0.05 * gap, (key, err, gap)
        torch.testing.assert_close(states[0.10][key], load_file(snapshots[-1].path)[key], rtol=1e-4, atol=1e-5)


def test_command_line_writes_reconstructions_and_float16_snapshots_stay_small(tmp_path, capsys):
    model, direct = write_run(tmp_path / "phema_snapshots")  # float16, the default
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    snapshot_bytes = sum(os.path.getsize(p) for p in (tmp_path / "phema_snapshots").glob("phema-000000120-*"))
    assert snapshot_bytes <= 2 * model_bytes

    paths = main([str(tmp_path), "--std", "0.10,0.07"])
    assert [os.path.basename(p) for p in paths] == ["posthoc-000000120-0.070.safetensors",
                                                    "posthoc-000000120-0.100.safetensors"]
    assert all(os.path.dirname(p) == str(tmp_path / "posthoc_ema") for p in paths)
    rebuilt = load_file(paths[0])
    err = (rebuilt["linear.weight"] - direct.snapshot()[0.07]["linear.weight"]).abs().max()
    assert err < 2e-3, err  # float16 snapshots: a few ulps of weights of magnitude ~1
    main([str(tmp_path), "--std", "0.05", "--at_step", "60", "--out_dir", str(tmp_path / "early")])
    assert os.listdir(tmp_path / "early") == ["posthoc-000000060-0.050.safetensors"]


@pytest.mark.parametrize("args,message", [
    (["--std", "0.05", "--at_step", "10"], "before the first snapshot"),
    (["--std", "0.05", "--at_step", "50"], "not a snapshot step"),
    (["--std", "0.05,0.3"], "--std must lie in"),
])
def test_command_line_refuses_bad_requests(tmp_path, capsys, args, message):
    write_run(tmp_path / "phema_snapshots", steps=80)
    with pytest.raises(SystemExit):
        main([str(tmp_path)] + args)
    assert message in capsys.readouterr().err


def test_command_line_refuses_a_folder_without_snapshots(tmp_path, capsys):
    (tmp_path / "other.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--std", "0.05"])
    assert "no power-function EMA snapshots" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not exist"):
        list_snapshots(str(tmp_path / "missing"))
