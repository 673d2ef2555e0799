"""Training plumbing (diffusers_stf.training) and examples/train_stf.py end to end, on tiny models."""

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_stf import AugmentConditionedUNet2DModel, AugmentPipe, EDMPipeline
from diffusers_stf.training import (
    BatchSchedule,
    EMAModel,
    MetricsLogger,
    Trainer,
    add_training_args,
    check_world_size,
    ema_beta,
    image_grid,
    list_checkpoints,
    load_training_images,
    parse_training_args,
    read_metrics,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_stf.py")


def load_script():
    spec = importlib.util.spec_from_file_location("train_stf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_stf = load_script()

TINY = ["--block_out_channels", "8,16", "--train_batch_size", "16", "--stf_reference_batch_size", "48",
        "--num_validation_images", "4", "--num_inference_steps", "2", "--no_progress_bar", "--logging_steps", "2",
        "--validation_steps", "0", "--lr_warmup_steps", "2", "--dropout", "0.1"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_args(argv):
    return parse_training_args(add_training_args(argparse.ArgumentParser()), argv)


# --- plumbing ------------------------------------------------------------------------------------------------------

def test_ema_beta_is_edm_half_life_with_ramp_up():
    assert ema_beta(0, 64) == 0.0  # the first step copies the weights
    # ramp-up: half-life = 0.05 · images seen
    assert ema_beta(64_000, 64, 500, 0.05) == pytest.approx(0.5 ** (64 / 3200))
    # steady state: half-life 500k images
    assert ema_beta(1e9, 512, 500, 0.05) == pytest.approx(0.5 ** (512 / 500_000))
    assert ema_beta(1e9, 512, 500, 0.05) == pytest.approx(0.99929, abs=1e-5)  # EDM's quoted value
    assert ema_beta(1e9, 64, 0, 0.05) == 0.0 and ema_beta(10, 64, 500, 0) == pytest.approx(0.5 ** (64 / 500_000))
    model = torch.nn.Linear(3, 2)
    ema = EMAModel(model, 500, 0.05)
    old = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    beta = ema.update(model, 64_000, 64)
    for p_ema, p_old, p in zip(ema.model.parameters(), old, model.parameters()):
        torch.testing.assert_close(p_ema, beta * p_old + (1 - beta) * p)


def test_batch_schedule_is_a_per_epoch_permutation_sharded_over_processes():
    shards = [BatchSchedule(100, 8, seed=3, num_processes=2, process_index=p) for p in range(2)]
    assert shards[0].batches_per_epoch == 6  # 100 // 16, the last partial batch dropped
    epoch0 = torch.cat([torch.cat([s.indices(m) for s in shards]) for m in range(6)])
    assert len(set(epoch0.tolist())) == 96
    epoch1 = torch.cat([torch.cat([s.indices(m) for s in shards]) for m in range(6, 12)])
    assert not torch.equal(epoch0, epoch1)
    again = BatchSchedule(100, 8, seed=3, num_processes=2, process_index=1)
    assert torch.equal(again.indices(7), shards[1].indices(7))
    with pytest.raises(ValueError, match="exceeds the dataset size"):
        BatchSchedule(10, 8, num_processes=2)


def write_png(path, size, value=128, mode="L"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder_loading_and_bad_folders(tmp_path):
    good = tmp_path / "good"
    for i in range(3):
        write_png(str(good / f"{i}.png"), (6, 6), 40 * i)
    data = load_training_images(shared_args(["--train_data_dir", str(good)]))
    assert data.images.shape == (3, 1, 6, 6) and data.resolution == 6
    batch = data.batch(torch.arange(3))["images"]
    assert batch.min() >= -1 and batch.max() <= 1

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="contains no files"):
        load_training_images(shared_args(["--train_data_dir", str(empty)]))
    text = tmp_path / "text"
    text.mkdir()
    (text / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="train_data_dir|no images|cannot read"):
        load_training_images(shared_args(["--train_data_dir", str(text)]))
    broken = tmp_path / "broken"
    write_png(str(broken / "a.png"), (6, 6))
    (broken / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ValueError, match="cannot read|could not read"):
        load_training_images(shared_args(["--train_data_dir", str(broken)]))
    mixed = tmp_path / "mixed"
    write_png(str(mixed / "a.png"), (8, 8))
    write_png(str(mixed / "b.png"), (12, 12))
    with pytest.raises(ValueError, match="mixed sizes.*--resolution"):
        load_training_images(shared_args(["--train_data_dir", str(mixed)]))
    resized = load_training_images(shared_args(["--train_data_dir", str(mixed), "--resolution", "8"]))
    assert resized.images.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="not a folder"):
        load_training_images(shared_args(["--train_data_dir", str(tmp_path / "missing")]))


def test_bad_options_give_value_errors():
    with pytest.raises(ValueError, match="--train_batch_size must be >= 1"):
        shared_args(["--train_batch_size", "0"])
    with pytest.raises(ValueError, match="--sigma_buckets"):
        shared_args(["--sigma_buckets", "1,0.5"])
    with pytest.raises(ValueError, match="--attention_levels"):
        shared_args(["--attention_levels", "3"])


def test_world_size_guard():
    check_world_size(2, "2")
    check_world_size(1, "1")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 but Accelerate sees a single process"):
        check_world_size(1, "2")


def test_metrics_are_averaged_per_sigma_bucket(tmp_path):
    logger = MetricsLogger(None, str(tmp_path), sigma_buckets=(0.1, 1.0))
    logger.accumulate(torch.tensor(2.0), torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0.05, 0.5, 0.7]))
    logger.accumulate(torch.tensor(4.0), torch.tensor([7.0]), torch.tensor([0.09]), logs={"x": 1.0})
    row = logger.write(10, lr=0.1)
    assert row["loss"] == 3.0 and row["loss_sigma_<0.1"] == 4.0 and row["loss_sigma_0.1-1"] == 4.0
    assert np.isnan(row["loss_sigma_>=1"]) and row["x"] == 1.0
    assert read_metrics(str(tmp_path))[0]["loss_sigma_<0.1"] == 4.0
    assert "loss_sigma_0.1-1" in open(tmp_path / "metrics.csv").readline()


def test_image_grid_layout():
    grid = image_grid(torch.rand(10, 1, 8, 8), nrow=5, padding=1, min_cell=32)
    assert grid.size == (5 * 33 + 1, 2 * 33 + 1) and grid.mode == "L"


def test_augment_pipe_flips_are_exact_and_labels_match():
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out, labels = AugmentPipe(p=0.0)(x)
    assert torch.equal(out, x) and torch.equal(labels, torch.zeros(64, 9))
    out, labels = AugmentPipe(p=0.5, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0)(
        x, torch.Generator().manual_seed(1))
    flipped = labels[:, 0].bool()
    assert 10 < int(flipped.sum()) < 54 and torch.equal(labels[:, 1:], torch.zeros(64, 8))
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])
    out, labels = AugmentPipe(p=1.0)(torch.full((16, 3, 8, 8), 0.3), torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, torch.full_like(out, 0.3))  # geometry keeps a constant image constant
    torch.testing.assert_close((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, torch.ones(16))  # cos, sin of one angle


def test_augment_conditioned_unet_zero_labels_contribute_exactly_zero():
    unet = AugmentConditionedUNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False, norm_num_groups=8, num_class_embeds=9)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.1, -0.3])
    assert torch.equal(unet.class_embedding(torch.zeros(2, 9)), torch.zeros(2, unet.class_embedding.embedding_dim))
    assert torch.equal(unet(x, t).sample, unet(x, t, class_labels=torch.zeros(2, 9)).sample)
    assert not torch.allclose(unet(x, t).sample, unet(x, t, class_labels=torch.ones(2, 9)).sample)


# --- the script, end to end ----------------------------------------------------------------------------------------

def test_train_stf_end_to_end_writes_a_loadable_pipeline_and_model_card(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))
    out = tmp_path / "run"
    result = train_stf.main(["--output_dir", str(out), "--max_train_steps", "4", "--checkpointing_steps", "2",
                             "--augment_p", "0.5", "--push_to_hub", "--hub_model_id", "someone/stf-digits", *TINY])
    assert result.step == 4 and result.nimg == 64
    for name in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/config.json",
                 "scheduler/scheduler_config.json", "samples.png", "README.md", "logs/metrics.csv"):
        assert (out / name).is_file(), name
    assert not list(out.glob("**/*.bin")) or all("checkpoint-" in str(p) for p in out.glob("**/*.bin"))
    card = ModelCard.load(str(out / "README.md"))
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "unconditional-image-generation"
    assert "stable-target-field" in card.data.tags and card.data.datasets == ["sklearn-digits-8x8"]
    assert "from diffusers_stf import EDMPipeline" in card.text and "someone/stf-digits" in card.text
    assert "![Samples of the EMA model](samples.png)" in card.text and "stf_reference_batch_size" in card.text
    assert calls["create"][0] == "someone/stf-digits"
    assert calls["upload"]["repo_id"] == "someone/stf-digits" and calls["upload"]["folder_path"] == str(out)
    assert "checkpoint-*" in calls["upload"]["ignore_patterns"]
    rows = read_metrics(str(out / "logs"))
    assert [r["step"] for r in rows] == [2, 4] and any(k.startswith("loss_sigma_") for k in rows[0])

    pipe = EDMPipeline.from_pretrained(str(out))
    assert isinstance(pipe.unet, AugmentConditionedUNet2DModel)  # sampled with zero augmentation labels
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def unet_parameters(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    common = ["--max_train_steps", "8", "--checkpointing_steps", "3", "--loss", "stf", *TINY]
    train_stf.main(["--output_dir", str(tmp_path / "straight"), *common])

    original = Trainer.micro_batch

    def interrupt_at_step_7(self, micro_step):
        if micro_step == 7:
            raise KeyboardInterrupt
        return original(self, micro_step)

    monkeypatch.setattr(Trainer, "micro_batch", interrupt_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train_stf.main(["--output_dir", str(tmp_path / "resumed"), *common])
    # Interrupted during step 8: only the step since checkpoint-6 is lost.
    assert [step for step, _ in list_checkpoints(str(tmp_path / "resumed"))] == [3, 6]
    monkeypatch.setattr(Trainer, "micro_batch", original)

    with pytest.raises(ValueError, match="another configuration"):
        train_stf.main(["--output_dir", str(tmp_path / "resumed"), *common, "--block_out_channels", "16,32",
                        "--resume_from_checkpoint", "latest"])
    with pytest.raises(ValueError, match="another configuration"):
        train_stf.main(["--output_dir", str(tmp_path / "resumed"), *common, "--loss", "edm",
                        "--resume_from_checkpoint", "latest"])
    train_stf.main(["--output_dir", str(tmp_path / "resumed"), *common, "--resume_from_checkpoint", "latest"])
    for sub in ("unet",):
        a, b = unet_parameters(tmp_path / "straight" / sub), unet_parameters(tmp_path / "resumed" / sub)
        assert all(torch.equal(a[k], b[k]) for k in a)  # EMA weights of the final pipeline
    a = unet_parameters(tmp_path / "straight" / "checkpoint-6" / "model")
    b = unet_parameters(tmp_path / "resumed" / "checkpoint-6" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_script_refuses_bad_settings(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="reference batch size R=8 must be >= the per-process batch size B=16"):
        train_stf.main(["--output_dir", str(tmp_path), *TINY, "--stf_reference_batch_size", "8"])
    with pytest.raises(ValueError, match="--augment_p"):
        train_stf.main(["--output_dir", str(tmp_path), *TINY, "--augment_p", "1.5"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="duplicate"):
        train_stf.main(["--output_dir", str(tmp_path), *TINY])


WORKER = """
import json, sys, torch
from accelerate import Accelerator
from diffusers_stf.losses import StableTargetFieldLoss, stable_target_field

acc = Accelerator(cpu=True)
p, B, R, D = acc.process_index, 4, 10, 12
g = torch.Generator().manual_seed(0)  # the same global data on both processes; each takes its shard
images = torch.rand(2 * B, D, generator=g) * 2 - 1
extras = torch.rand(2 * (R - B), D, generator=g) * 2 - 1
sigma = (torch.randn(2 * B, generator=g) * 1.2 - 1.2).exp()
noisy = images + sigma[:, None] * torch.randn(2 * B, D, generator=g)
loss = StableTargetFieldLoss(reference_batch_size=R, accelerator=acc, gather=True)
mine = slice(p * B, (p + 1) * B)
refs = loss.reference_set(images[mine], extras[p * (R - B):(p + 1) * (R - B)])
targets = acc.gather(stable_target_field(noisy[mine], sigma[mine], refs))
single = stable_target_field(noisy, sigma, torch.cat([images, extras]))

sys.path.insert(0, sys.argv[2])
import train_stf
result = train_stf.main(["--cpu", "--output_dir", sys.argv[3], "--max_train_steps", "3", "--stf_gather_references",
                         "--checkpointing_steps", "2"] + sys.argv[4:])
if acc.is_main_process:
    json.dump({"processes": acc.num_processes, "refs": len(refs), "max_diff": float((targets - single).abs().max()),
               "nimg": result.nimg}, open(sys.argv[1], "w"))
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_gather_references_like_one_process(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(WORKER))
    result_file = tmp_path / "result.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(worker), str(result_file), os.path.join(ROOT, "examples"),
           str(tmp_path / "run"), *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["processes"] == 2 and result["refs"] == 20  # R grows with the world size
    assert result["max_diff"] < 1e-6
    assert result["nimg"] == 3 * 16 * 2
    assert (tmp_path / "run" / "model_index.json").is_file()
    for name in ("trainer_state.json", "random_states_0.pkl", "random_states_1.pkl", "model/config.json"):
        assert (tmp_path / "run" / "checkpoint-2" / name).is_file(), name
