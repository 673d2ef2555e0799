"""EDM2's recipe in ``examples/train_stf.py``, checked on the trained weights against closed forms written here:
``--ema_stds`` tracks the integrated power-function profile of the network's weights, writes its snapshots and resumes
them bit for bit; ``--lr_scheduler inverse_sqrt`` gives the optimizer α_ref/√max(t/t_ref, 1)·min(t/t_ramp, 1); the
log-variance head of ``--loss edm2`` takes Adam steps with the network and travels in the checkpoints."""

import importlib.util
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from scipy.optimize import brentq
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from diffusers_stf.training import Trainer, list_checkpoints, parse_training_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("train_stf_edm2", os.path.join(ROOT, "examples", "train_stf.py"))
train_stf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_stf)

BATCH = 16
TINY = ["--train_batch_size", str(BATCH), "--num_validation_images", "2", "--num_inference_steps", "2",
        "--no_progress_bar", "--logging_steps", "2", "--validation_steps", "0", "--report_to", "none",
        "--max_train_samples", "64", "--block_out_channels", "8,16", "--norm_num_groups", "8", "--loss", "edm",
        "--checkpoints_total_limit", "100"]
STDS = (0.05, 0.10)
pytestmark = pytest.mark.usefixtures("one_thread")


def run(out, *argv):
    return train_stf.main(["--output_dir", str(out), *TINY, *argv])


def interrupt_in_step(monkeypatch, step):
    """Make the run raise KeyboardInterrupt when it draws the batch of optimizer step ``step`` (1-based)."""
    original = Trainer.micro_batch

    def interrupted(self, micro_step):
        if micro_step == step - 1:
            raise KeyboardInterrupt
        return original(self, micro_step)

    monkeypatch.setattr(Trainer, "micro_batch", interrupted)
    return original


def model_weights(checkpoint):
    folder = os.path.join(checkpoint, "model")
    return load_file(os.path.join(folder, next(f for f in os.listdir(folder) if f.endswith(".safetensors"))))


def gamma_of(std):
    """The exponent γ whose profile (γ+1)τ^γ/t^(γ+1) has relative std σ_rel: σ_rel² = (γ+1)/((γ+2)²(γ+3))."""
    return brentq(lambda g: (g + 1) / ((g + 2) ** 2 * (g + 3)) - std ** 2, 1e-9, 1e6, xtol=1e-14)


# --- --ema_stds ---------------------------------------------------------------------------------------------------

STEPS = 6
EMA_FLAGS = ["--ema_stds", ",".join(map(str, STDS)), "--ema_snapshot_steps", "1", "--max_train_steps", str(STEPS),
             "--lr_warmup_steps", "0", "--learning_rate", "3e-2"]


@pytest.fixture(scope="module")
def straight_ema_run(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("phema") / "run"
    run(out, *EMA_FLAGS, "--checkpointing_steps", "1")  # a checkpoint, so the network's weights, after every step
    torch.set_num_threads(threads)
    return out


def snapshots(out):
    folder = os.path.join(out, "phema_snapshots")
    found = {}
    for name in sorted(os.listdir(folder)):
        with safe_open(os.path.join(folder, name), "pt") as f:
            found[name] = (f.metadata(), {k: f.get_tensor(k) for k in f.keys()})
    return found


def test_power_emas_are_the_integrated_profile_of_the_trained_weights(straight_ema_run):
    """After step S (t_k = k·B images) the average is Σ_k w_k θ_k with w_k = ∫_{t_{k-1}}^{t_k} p_{t_S}(τ) dτ =
    (k^(γ+1) − (k−1)^(γ+1))/S^(γ+1), θ_k the network after step k (its checkpoints)."""
    out = straight_ema_run
    thetas = {k: model_weights(os.path.join(out, f"checkpoint-{k}")) for k in range(1, STEPS + 1)}
    assert not torch.equal(thetas[1][next(iter(thetas[1]))], thetas[STEPS][next(iter(thetas[1]))])  # it trained
    files = snapshots(out)
    assert sorted(files) == sorted(f"phema-{s:09d}-{std:.3f}.safetensors" for s in range(1, STEPS + 1)
                                   for std in STDS)
    state = load_file(os.path.join(out, f"checkpoint-{STEPS}", "power_ema.safetensors"))
    for i, std in enumerate(STDS):
        g = gamma_of(std)
        for step in (1, 3, STEPS):
            w = [(k ** (g + 1) - (k - 1) ** (g + 1)) / step ** (g + 1) for k in range(1, step + 1)]
            metadata, tensors = files[f"phema-{step:09d}-{std:.3f}.safetensors"]
            assert int(metadata["step"]) == step and float(metadata["time"]) == step * BATCH
            assert float(metadata["std"]) == std
            for key, value in tensors.items():
                expected = sum(wk * thetas[k][key].double() for k, wk in zip(range(1, step + 1), w))
                assert value.dtype == torch.float16
                torch.testing.assert_close(value.double(), expected, rtol=2e-3, atol=1e-4)
                if step == STEPS:  # the checkpoint's float32 state
                    torch.testing.assert_close(state[f"ema{i}.{key}"].double(), expected, rtol=1e-5, atol=1e-6)


def test_killed_and_resumed_run_has_the_power_emas_and_snapshots_of_a_straight_run(straight_ema_run, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    original = interrupt_in_step(monkeypatch, 6)  # snapshots of steps 1–5 written, the last checkpoint at 4
    with pytest.raises(KeyboardInterrupt):
        run(out, *EMA_FLAGS, "--checkpointing_steps", "2")
    assert [s for s, _ in list_checkpoints(str(out))] == [2, 4]
    assert "phema-000000005-0.050.safetensors" in os.listdir(out / "phema_snapshots")
    monkeypatch.setattr(Trainer, "micro_batch", original)
    run(out, *EMA_FLAGS, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")

    ours, theirs = snapshots(out), snapshots(straight_ema_run)
    assert sorted(ours) == sorted(theirs)
    for name, (metadata, tensors) in theirs.items():
        assert ours[name][0] == metadata, name
        assert ours[name][1].keys() == tensors.keys()
        assert all(torch.equal(ours[name][1][k], v) for k, v in tensors.items()), name
    ema_ours = load_file(str(out / f"checkpoint-{STEPS}" / "power_ema.safetensors"))
    ema_theirs = load_file(str(straight_ema_run / f"checkpoint-{STEPS}" / "power_ema.safetensors"))
    assert ema_ours.keys() == ema_theirs.keys() and all(torch.equal(ema_ours[k], v) for k, v in ema_theirs.items())


@pytest.mark.parametrize("value", ["0", "-0.05", "0.289", "0.05,0.3", "nan"])
def test_ema_stds_outside_the_valid_range_are_refused_naming_the_flag(tmp_path, capsys, value):
    with pytest.raises((ValueError, SystemExit)) as info:
        run(tmp_path / "run", f"--ema_stds={value}", "--max_train_steps", "1")
    message = str(info.value) if info.type is ValueError else capsys.readouterr().err
    assert "--ema_stds" in message and (value == "nan" or "0.2887" in message), message  # the bound 1/√12
    assert not os.path.exists(tmp_path / "run" / "phema_snapshots")


def test_ema_stds_just_inside_the_range_are_accepted():
    _, config = parse_training_args(train_stf.build_parser(), ["--ema_stds", "0.001,0.288"])
    assert tuple(config.training.ema_stds) == (0.001, 0.288)  # 1/√12 = 0.28868


# --- --lr_scheduler inverse_sqrt ----------------------------------------------------------------------------------

def test_the_optimizer_steps_with_the_inverse_sqrt_learning_rate(tmp_path):
    """α(t) = α_ref/√max(t/t_ref, 1)·min(t/t_ramp, 1) at the images t seen before each step: α_ref = 0.02, t_ref = 3
    steps = 48 images, the ramp-up 0.04 kimg = 40 images (2.5 steps: a ramp in images, not in rounded steps)."""
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append([group["lr"] for group in optimizer.param_groups]))
    try:
        run(tmp_path / "run", "--lr_scheduler", "inverse_sqrt", "--learning_rate", "0.02", "--lr_ref_steps", "3",
            "--lr_rampup_kimg", "0.04", "--max_train_steps", "9")
    finally:
        handle.remove()
    assert len(seen) == 9
    for k, lrs in enumerate(seen):  # k optimizer steps (k·16 images) before this one
        t = k * BATCH
        expected = 0.02 / math.sqrt(max(t / 48, 1)) * min(t / 40, 1)
        assert lrs == pytest.approx([expected] * len(lrs), rel=1e-12, abs=1e-15), (k, lrs)
    assert seen[0] == [0.0] and seen[3][0] == pytest.approx(0.02) and seen[8][0] == pytest.approx(0.02 * math.sqrt(3 / 8))


# --- --loss edm2: the log-variance head -----------------------------------------------------------------------------

EDM2_FLAGS = ["--loss", "edm2", "--lr_warmup_steps", "0", "--learning_rate", "1e-3", "--max_train_steps", "4",
              "--checkpointing_steps", "2"]
HEAD = "edm2_logvar.logvar_linear.weight"


def test_edm2_heads_weight_takes_adam_steps_and_resumes_bit_identically(tmp_path, monkeypatch):
    """The first AdamW step (no weight decay, bias-corrected moments m̂ = g, v̂ = g²) moves each weight by exactly
    −lr·g/(|g| + ε): the head is among the optimizer's parameters, at the network's learning rate."""
    before, after = {}, {}

    def head_of(optimizer):
        return next(p for group in optimizer.param_groups for p in group["params"] if p.shape == (1, 128))

    def pre(optimizer, args, kwargs):
        if not before:
            p = head_of(optimizer)
            before.update(weight=p.detach().clone(), grad=p.grad.detach().clone())

    def post(optimizer, args, kwargs):
        if not after:
            after["weight"] = head_of(optimizer).detach().clone()

    handles = [register_optimizer_step_pre_hook(pre),
               register_optimizer_step_post_hook(post)]
    try:
        run(tmp_path / "straight", *EDM2_FLAGS)
    finally:
        for handle in handles:
            handle.remove()
    g = before["grad"].double()
    assert (g.abs() > 1e-4).all()
    torch.testing.assert_close(after["weight"].double() - before["weight"].double(), -1e-3 * g / (g.abs() + 1e-8),
                               rtol=1e-4, atol=1e-9)

    heads = {s: load_file(str(tmp_path / "straight" / f"checkpoint-{s}" / "trained_modules.safetensors"))
             for s in (2, 4)}
    assert list(heads[4]) and HEAD in heads[4] and not torch.equal(heads[2][HEAD], heads[4][HEAD])

    original = interrupt_in_step(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed", *EDM2_FLAGS)
    monkeypatch.setattr(Trainer, "micro_batch", original)
    run(tmp_path / "resumed", *EDM2_FLAGS, "--resume_from_checkpoint", "latest")
    resumed = load_file(str(tmp_path / "resumed" / "checkpoint-4" / "trained_modules.safetensors"))
    assert resumed.keys() == heads[4].keys() and all(torch.equal(resumed[k], v) for k, v in heads[4].items())
