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

from diffusers_stf import AugmentConditionedUNet2DModel, EDMPipeline
from diffusers_stf.training import (
    BatchSchedule,
    HalfLifeEMA,
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
sys.path.insert(0, os.path.join(ROOT, "examples"))

TINY = ["--block_out_channels", "8,16", "--train_batch_size", "16", "--stf_reference_batch_size", "48",
        "--num_validation_images", "4", "--num_inference_steps", "2", "--no_progress_bar", "--logging_steps", "2",
        "--validation_steps", "0", "--lr_warmup_steps", "2", "--dropout", "0.1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def shared_config(argv):
    return parse_training_args(add_training_args(argparse.ArgumentParser()), argv)[1]


def shared_data(argv):
    return load_training_images(shared_config(argv).data)


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
    ema = HalfLifeEMA(model, 500, 0.05)
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
    data = shared_data(["--train_data_dir", str(good)])
    assert data.images.shape == (3, 1, 6, 6) and data.resolution == 6
    batch = data.batch(torch.arange(3))["images"]
    assert batch.min() >= -1 and batch.max() <= 1

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="contains no files"):
        shared_data(["--train_data_dir", str(empty)])
    text = tmp_path / "text"
    text.mkdir()
    (text / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="train_data_dir|no images|cannot read"):
        shared_data(["--train_data_dir", str(text)])
    broken = tmp_path / "broken"
    write_png(str(broken / "a.png"), (6, 6))
    (broken / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(ValueError, match="cannot read|could not read"):
        shared_data(["--train_data_dir", str(broken)])
    mixed = tmp_path / "mixed"
    write_png(str(mixed / "a.png"), (8, 8))
    write_png(str(mixed / "b.png"), (12, 12))
    with pytest.raises(ValueError, match="mixed sizes.*--resolution"):
        shared_data(["--train_data_dir", str(mixed)])
    resized = shared_data(["--train_data_dir", str(mixed), "--resolution", "8"])
    assert resized.images.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="not a folder"):
        shared_data(["--train_data_dir", str(tmp_path / "missing")])


def test_bad_options_give_value_errors():
    with pytest.raises(ValueError, match="--train_batch_size must be >= 1"):
        shared_config(["--train_batch_size", "0"])
    with pytest.raises(ValueError, match="--sigma_buckets"):
        shared_config(["--sigma_buckets", "1,0.5"])
    with pytest.raises(ValueError, match="--attention_levels"):
        shared_config(["--attention_levels", "3"])


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


def test_augment_conditioned_unet_zero_labels_contribute_exactly_zero():
    unet = AugmentConditionedUNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        add_attention=False, norm_num_groups=8, augment_dim=9)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.1, -0.3])
    augment = unet.class_embedding.augment
    assert torch.equal(augment(torch.zeros(2, 9)), torch.zeros(2, augment.embedding_dim))
    assert torch.equal(unet(x, t).sample, unet(x, t, augment_labels=torch.zeros(2, 9)).sample)
    assert not torch.allclose(unet(x, t).sample, unet(x, t, augment_labels=torch.ones(2, 9)).sample)
    assert unet.config.num_class_embeds is None and unet.config.augment_dim == 9


# --- the script, end to end ----------------------------------------------------------------------------------------

def test_train_stf_end_to_end_writes_a_loadable_pipeline_and_model_card(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard

    calls = {}
    monkeypatch.setenv("HF_TOKEN", "hf_test")
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
    assert "stable-target-field" in card.data.tags and card.data.datasets is None  # not a Hub dataset
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
                         "--checkpointing_steps", "2", "--checkpointing_minutes", "1e-9"] + sys.argv[4:])
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
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(result_file.read_text())
    assert result["processes"] == 2 and result["refs"] == 20  # R grows with the world size
    assert result["max_diff"] < 1e-6
    assert result["nimg"] == 3 * 16 * 2
    assert (tmp_path / "run" / "model_index.json").is_file()
    for name in ("trainer_state.json", "random_states_0.pkl", "random_states_1.pkl", "model/config.json"):
        assert (tmp_path / "run" / "checkpoint-2" / name).is_file(), name
    # the main process's clock decided a checkpoint by wall time at the last logging step, for both processes
    assert json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())["reason"] == "time"


# --- explicit configuration, validation up front -------------------------------------------------------------------

def run_stf(out, *argv):
    return train_stf.main(["--output_dir", str(out), *TINY, "--loss", "edm", *argv])


@pytest.mark.parametrize("flag,value", [("--P_mean", "nan"), ("--learning_rate", "inf"), ("--max_grad_norm", "nan"),
                                        ("--ema_halflife_kimg", "nan"), ("--adam_beta2", "1.5"),
                                        ("--sigma_buckets", "0.1,nan")])
def test_non_finite_or_out_of_range_flags_are_refused_before_training(tmp_path, flag, value):
    with pytest.raises(ValueError, match=flag):
        run_stf(tmp_path / "run", flag, value)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_missing_model_config_path_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--model_config_name_or_path"):
        run_stf(tmp_path / "run", "--model_config_name_or_path", str(tmp_path / "nowhere" / "config.json"))


def test_sequence_aware_beta_schedule_is_validated(tmp_path):
    import train_sequence_aware

    out = str(tmp_path / "sa")
    with pytest.raises(ValueError, match="ᾱ_T"):  # Π(1 − β_t) with every β_t >= 0.1 underflows to 0 in float32
        train_sequence_aware.main(["--output_dir", out, "--beta_start", "0.1", "--beta_end", "0.5"])
    with pytest.raises(ValueError, match=r"--beta_start/--beta_end.*(\(0, 1\)|0 < beta < 1)"):
        train_sequence_aware.main(["--output_dir", out, "--beta_end", "1.5"])


def test_trainer_takes_typed_config_and_dead_code_is_gone():
    import inspect

    import diffusers_stf.training.data as data_module
    import diffusers_stf.training as training

    for name in ("make_image_transform", "EpochBatchSampler", "make_dataloader", "str_list", "count_parameters",
                 "EMAModel"):
        assert not hasattr(training, name) and not hasattr(data_module, name), name
    assert "make_validation_pipeline" not in inspect.signature(Trainer.__init__).parameters
    assert next(iter(inspect.signature(Trainer.__init__).parameters.values())).name == "self"
    assert list(inspect.signature(Trainer.__init__).parameters)[1] == "config"
    plumbing = [os.path.join(folder, f) for folder in (os.path.join(ROOT, "diffusers_stf", "training"),
                                                       os.path.join(ROOT, "diffusers_stf", "training", "data"))
                for f in os.listdir(folder) if f.endswith(".py")]
    for path in plumbing:
        assert "getattr(args" not in open(path).read(), path


def test_mixed_grey_and_colour_folder_warns_and_converts(tmp_path, caplog):
    folder = tmp_path / "mixed"
    write_png(str(folder / "a.png"), (4, 4), 100, mode="L")
    write_png(str(folder / "b.png"), (4, 4), (200, 40, 10), mode="RGB")
    with caplog.at_level("WARNING"):
        rgb = shared_data(["--train_data_dir", str(folder)])
    assert "mix greyscale and colour" in caplog.text and rgb.channels == 3
    # a grey pixel v becomes (v, v, v); the colour pixel is kept
    assert sorted(tuple(int(v) for v in im[:, 0, 0]) for im in rgb.images) == [(100, 100, 100), (200, 40, 10)]
    grey = shared_data(["--train_data_dir", str(folder), "--channels", "1"])
    luma = (200 * 299 + 40 * 587 + 10 * 114) // 1000  # ITU-R 601-2 luma, PIL's convert("L")
    assert grey.channels == 1 and sorted(int(im[0, 0, 0]) for im in grey.images) == sorted([100, luma])


def test_dependency_floors_load_checkpoint_pickles_with_weights_only():
    import re

    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    floors = dict(re.findall(r'"(torch|accelerate)>=([0-9.]+)', text))
    as_tuple = lambda v: tuple(int(x) for x in v.split("."))  # noqa: E731
    assert as_tuple(floors["torch"]) >= (2, 6)  # torch.load defaults to weights_only=True from 2.6
    assert as_tuple(floors["accelerate"]) >= (1, 0)
    assert as_tuple(torch.__version__.split("+")[0]) >= as_tuple(floors["torch"])


# --- run length, output folder, resume --------------------------------------------------------------------------------

def test_num_epochs_alone_decides_the_length_and_the_winner_is_named(tmp_path, capsys):
    result = run_stf(tmp_path / "a", "--max_train_samples", "64", "--num_epochs", "2", "--checkpointing_steps", "0")
    assert result.step == 2 * 64 // 16
    out = capsys.readouterr().out
    assert "1 training process" in out and "Trained 8 steps" in out  # the summary is the trainer's
    result = run_stf(tmp_path / "b", "--max_train_samples", "64", "--num_epochs", "2", "--max_train_steps", "3",
                     "--checkpointing_steps", "0")
    assert result.step == 3 and "--max_train_steps wins" in capsys.readouterr().out


def test_a_used_output_dir_is_refused_unless_overwritten(tmp_path):
    out = tmp_path / "run"
    run_stf(out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--max_train_samples", "64")
    assert [s for s, _ in list_checkpoints(str(out))] == [2, 4]
    with pytest.raises(ValueError, match="--overwrite_output_dir"):
        run_stf(out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--max_train_samples", "64")
    run_stf(out, "--max_train_steps", "2", "--checkpointing_steps", "1", "--max_train_samples", "64",
            "--overwrite_output_dir")
    assert [s for s, _ in list_checkpoints(str(out))] == [1, 2]  # none of the first run's
    assert [r["step"] for r in read_metrics(str(out / "logs"))] == [2]


def test_resume_refuses_changed_settings_unless_allowed(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--max_train_samples", "64", "--checkpointing_steps", "2"]
    run_stf(out, "--max_train_steps", "2", *common)
    changes = {"settings.learning_rate": ["--learning_rate", "2e-3"],
               "settings.ema_halflife_kimg": ["--ema_halflife_kimg", "1"],
               "settings.optimizer.betas": ["--adam_beta1", "0.8"], "settings.max_grad_norm": ["--max_grad_norm", "1"],
               "settings.num_images": ["--max_train_samples", "48"], "settings.lr_scheduler": ["--lr_scheduler", "linear"],
               "settings.lr_warmup_steps": ["--lr_warmup_steps", "5"], "script.P_mean": ["--P_mean", "-1"]}
    for key, change in changes.items():
        with pytest.raises(ValueError, match=rf"another configuration(.|\n)*{key}: checkpoint"):
            run_stf(out, "--max_train_steps", "4", *common, *change, "--resume_from_checkpoint", "latest")
    capsys.readouterr()
    run_stf(out, "--max_train_steps", "3", *common, "--learning_rate", "2e-3", "--lr_warmup_steps", "0",
            "--resume_from_checkpoint", "latest", "--allow_changed_settings")
    assert "WARNING: resuming with changed settings" in capsys.readouterr().out
    rows = read_metrics(str(out / "logs"))
    assert rows[-1]["step"] == 3 and rows[-1]["lr"] == pytest.approx(2e-3)  # the new value is in force


def test_kill_before_rename_keeps_the_previous_checkpoint_and_resume_truncates_metrics(tmp_path):
    out = tmp_path / "run"
    argv = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
            "--max_train_samples", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT,
           "DIFFUSERS_STF_TEST_KILL_AT": "checkpoint_before_rename@4"}
    proc = subprocess.run([sys.executable, SCRIPT, "--output_dir", str(out), *TINY, "--loss", "edm", *argv],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [s for s, _ in list_checkpoints(str(out))] == [2]  # pruned only after the new one is complete
    assert (out / "checkpoint-4.partial").is_dir()
    assert [r["step"] for r in read_metrics(str(out / "logs"))] == [2, 4]  # step 4 was logged before the kill
    wall_2 = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["wall_time"]
    result = run_stf(out, *argv, "--resume_from_checkpoint", "latest")
    rows = read_metrics(str(out / "logs"))
    assert [r["step"] for r in rows] == [2, 4]  # the lost step's row was dropped, not repeated
    assert result.wall_time > wall_2 and rows[-1]["seconds"] > rows[0]["seconds"] == pytest.approx(wall_2, abs=0.5)
    assert [s for s, _ in list_checkpoints(str(out))] == [4] and not (out / "checkpoint-4.partial").exists()


# --- damaged checkpoints, full disk ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_stf(out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--max_train_samples", "64")
    torch.set_num_threads(threads)
    return out


def damaged_copy(src, tmp_path, damage):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(src, out)
    damage(out / "checkpoint-4")
    return out


@pytest.mark.parametrize("what,damage,bad_file", [
    ("truncated weights", lambda c: (c / "model" / "diffusion_pytorch_model.safetensors").write_bytes(
        (c / "model" / "diffusion_pytorch_model.safetensors").read_bytes()[:-100]), "diffusion_pytorch_model"),
    ("corrupt state", lambda c: (c / "trainer_state.json").write_text("{not json"), "trainer_state.json"),
    ("missing RNG state", lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl"),
    ("corrupt RNG state", lambda c: (c / "random_states_0.pkl").write_bytes(b"\x80\x04garbage"), "random_states_0.pkl"),
    ("flipped bit", lambda c: (c / "optimizer.bin").write_bytes(
        bytes([(c / "optimizer.bin").read_bytes()[0] ^ 1]) + (c / "optimizer.bin").read_bytes()[1:]), "optimizer.bin"),
])
def test_latest_falls_back_to_the_newest_intact_checkpoint(two_checkpoints, tmp_path, what, damage, bad_file):
    from diffusers_stf.training import resolve_checkpoint

    out = damaged_copy(two_checkpoints, tmp_path, damage)
    warnings = []
    assert resolve_checkpoint(str(out), "latest", warn=warnings.append) == str(out / "checkpoint-2")
    assert len(warnings) == 1 and bad_file in warnings[0] and "checkpoint-4" in warnings[0]
    with pytest.raises(ValueError, match=f"not be exact.*{bad_file}"):
        resolve_checkpoint(str(out), str(out / "checkpoint-4"))


def test_full_disk_says_so_and_where(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    out = tmp_path / "run"
    monkeypatch.setenv("DIFFUSERS_STF_TEST_FAULT", "disk_full")
    with pytest.raises(RuntimeError, match=f"disk is full.*{out}"):
        run_stf(out, "--max_train_steps", "1", "--checkpointing_steps", "1", "--max_train_samples", "64")
    assert not any(p.name.endswith(".partial") for p in out.iterdir())
    # torch's zip writer reports a full disk as "unexpected pos": recognised from the free space
    from accelerate import Accelerator

    monkeypatch.delenv("DIFFUSERS_STF_TEST_FAULT")
    monkeypatch.setattr(Accelerator, "save_state", lambda self, d: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 244864 vs 244756")))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 0))
    with pytest.raises(RuntimeError, match="disk is full"):
        run_stf(tmp_path / "run2", "--max_train_steps", "1", "--checkpointing_steps", "1", "--max_train_samples", "64")


def test_non_finite_loss_stops_at_the_next_logging_step_naming_the_first_bad_step(tmp_path):
    from diffusers_stf.training import ImageData, NonFiniteLossError, TrainingConfig

    calls = []

    def loss_fn(model, batch, generator):
        calls.append(1)
        loss = model(batch["images"].flatten(1)).pow(2).mean()
        return loss * float("nan") if len(calls) >= 3 else loss

    data = ImageData.from_tensor(torch.rand(8, 1, 2, 2) * 2 - 1)
    config = TrainingConfig(output_dir=str(tmp_path / "run"), train_batch_size=2, max_train_steps=20, logging_steps=4,
                            checkpointing_steps=0, validation_steps=0, no_progress_bar=True, report_to="none")
    trainer = Trainer(config, torch.nn.Linear(4, 4), loss_fn, data)
    with pytest.raises(NonFiniteLossError, match="not finite.*at step 3"):
        trainer.train()
    assert trainer.step == 4  # found at the first logging step after it, not at the end


def test_checkpoint_files_are_fsynced_before_the_atomic_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b))[1])
    out = tmp_path / "run"
    run_stf(out, "--max_train_steps", "1", "--checkpointing_steps", "1", "--max_train_samples", "64")
    partial = str(out / "checkpoint-1.partial")
    rename = events.index(("replace", partial))
    synced = {path for kind, path in events[:rename] if kind == "fsync"}
    files = {str(p).replace("checkpoint-1", "checkpoint-1.partial") for p in (out / "checkpoint-1").rglob("*")}
    assert files and files <= synced  # every file and folder of the checkpoint


def test_latest_ignores_checkpoints_of_another_run(two_checkpoints, tmp_path):
    from diffusers_stf.training import resolve_checkpoint

    out = damaged_copy(two_checkpoints, tmp_path, lambda c: None)
    this_run = json.loads((out / "run.json").read_text())["run_id"]
    assert resolve_checkpoint(str(out), "latest", run_id=this_run) == str(out / "checkpoint-4")
    notes = []
    assert resolve_checkpoint(str(out), "latest", run_id="another-run", warn=notes.append) is None
    assert len(notes) == 2 and all("another run" in n for n in notes)


# --- diffusers train_unconditional.py command lines -------------------------------------------------------------------

def test_warmup_ema_follows_diffusers_ema_model_decay():
    from diffusers.training_utils import EMAModel as DiffusersEMA

    from diffusers_stf.training import WarmupEMA

    model = torch.nn.Linear(3, 2)
    reference = DiffusersEMA(model.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=2.0, power=0.5)
    ours = WarmupEMA(model, inv_gamma=2.0, power=0.5, max_decay=0.999)
    for step in range(60):  # diffusers counts optimization steps from 1 and decays with step − 1
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        reference.step(model.parameters())
        beta = ours.update(model, nimg=0, batch_images=16, step=step)
        assert beta == pytest.approx(reference.cur_decay_value, rel=1e-12, abs=1e-15)
    for p_ours, p_ref in zip(ours.model.parameters(), reference.shadow_params):
        torch.testing.assert_close(p_ours, p_ref)


def test_a_diffusers_command_line_runs_unchanged(tmp_path, capsys):
    import train_sequence_aware

    diffusers_flags = ["--train_batch_size", "16", "--eval_batch_size", "4", "--num_epochs", "2", "--use_ema",
                       "--ema_inv_gamma", "1.0", "--ema_power", "0.75", "--ema_max_decay", "0.9999",
                       "--prediction_type", "epsilon", "--ddpm_num_steps", "100", "--ddpm_num_inference_steps", "2",
                       "--ddpm_beta_schedule", "squaredcos_cap_v2", "--save_images_epochs", "1", "--save_model_epochs",
                       "1", "--dataloader_num_workers", "0", "--learning_rate", "1e-4", "--lr_warmup_steps", "0",
                       "--adam_beta1", "0.95", "--mixed_precision", "no", "--checkpointing_steps", "0"]
    args, config = parse_training_args(train_sequence_aware.build_parser(), ["--output_dir", "x", *diffusers_flags])
    assert (args.num_train_timesteps, args.beta_schedule) == (100, "cosine")
    assert (config.training.num_inference_steps, config.training.num_validation_images) == (2, 4)
    assert config.training.use_ema and config.training.save_images_epochs == 1
    result = train_sequence_aware.main(["--output_dir", str(tmp_path / "sa"), "--block_out_channels", "8,16",
                                        "--max_train_samples", "32", "--no_progress_bar", "--logging_steps", "2",
                                        *diffusers_flags])
    out = capsys.readouterr().out
    assert result.step == 4 and "EMA: diffusers' warm-up EMA" in out
    assert "Defaults that differ from diffusers" in out and "--learning_rate" not in out.split("Defaults")[1][:200]
    assert (tmp_path / "sa" / "samples" / "step_0000002.png").is_file()  # --save_images_epochs 1: 2 steps per epoch


@pytest.mark.parametrize("argv,message", [
    (["--ddpm_beta_schedule", "linear"], "--ddpm_beta_schedule is an option of DDPM training"),
    (["--prediction_type", "epsilon"], "--prediction_type is an option of DDPM training"),
    (["--use_ema", "--ema_halflife_kimg", "0"], "--use_ema.*two EMA rules"),
    (["--ema_power", "0.5"], "add --use_ema"),
    (["--logger", "wandb", "--report_to", "none"], "--logger .*--report_to"),
    (["--save_images_epochs", "0"], "--save_images_epochs must be >= 1"),
    (["--eval_batch_size", "4", "--num_validation_images", "8"], "--eval_batch_size .*--num_validation_images"),
])
def test_flags_that_make_no_sense_here_are_refused(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        run_stf(tmp_path / "run", "--max_train_steps", "1", *argv)


def hide_package(monkeypatch, hidden: str):
    """Make ``importlib.util.find_spec`` report ``hidden`` as not installed, whatever this machine has."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == hidden else find_spec(name, *a))


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_a_tracker_that_is_not_installed_is_refused(tmp_path, monkeypatch, tracker):
    hide_package(monkeypatch, tracker)
    with pytest.raises(ValueError, match=f"--report_to {tracker} needs the '{tracker}' package"):
        run_stf(tmp_path / "run", "--max_train_steps", "1", "--report_to", tracker)


def test_truncating_the_logs_drops_later_rows_and_a_line_cut_by_a_crash(tmp_path):
    logger = MetricsLogger(None, str(tmp_path), sigma_buckets=(1.0,))
    for step in (1, 2, 3):
        logger.accumulate(torch.tensor(float(step)))
        logger.write(step)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # the process died mid-write
    (tmp_path / "validation.jsonl").write_text('{"step": 2, "acc": 0.5}\n{"step": 3, "acc": 0.6}\n')
    logger.truncate(2)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    assert [json.loads(line)["step"] for line in (tmp_path / "validation.jsonl").read_text().splitlines()] == [2]
    assert [line.split(",")[0] for line in (tmp_path / "metrics.csv").read_text().splitlines()] == ["step", "1", "2"]


# --- --preserve_input_precision: 16-bit images ---------------------------------------------------------------------

# Four 8x8 greyscale ramps with a step of 1/65535: neighbouring values collapse under any 8-bit reduction. The bases
# put one ramp across 255 (where PIL's 8-bit conversion saturates) and one next to the top of the 16-bit range.
RAMP_BASES = (200, 300, 30001, 65471)


def write_sixteen_bit_ramps(folder):
    os.makedirs(folder, exist_ok=True)
    ramps = []
    for k, base in enumerate(RAMP_BASES):
        ramp = (base + np.arange(64)).reshape(8, 8).astype(np.uint16)
        Image.fromarray(ramp).save(os.path.join(folder, f"{k}.png"))  # a 16-bit greyscale PNG
        ramps.append(ramp)
    return np.stack(ramps)[:, None]  # (N, 1, 8, 8), in file-name order as imagefolder reads them


def served_batches(data, steps=2, batch_size=2):
    """The batches a Trainer serves to its loss during ``steps`` optimizer steps on ``data``."""
    from diffusers_stf.training import TrainingConfig

    seen = []

    def loss_fn(model, batch, generator):
        seen.append((batch["index"].clone(), batch["images"].detach().cpu().clone()))
        return model(batch["images"].flatten(1)).pow(2).mean()

    import tempfile
    with tempfile.TemporaryDirectory() as out:
        config = TrainingConfig(output_dir=os.path.join(out, "run"), train_batch_size=batch_size,
                                max_train_steps=steps, logging_steps=1, checkpointing_steps=0, validation_steps=0,
                                no_progress_bar=True, report_to="none")
        channels, side = data.channels, data.resolution
        Trainer(config, torch.nn.Linear(channels * side * side, 1), loss_fn, data).train()
    assert len(seen) == steps
    return seen


def test_preserve_input_precision_trains_on_16_bit_pngs_at_16_bits(tmp_path):
    folder = str(tmp_path / "ramps")
    ramps = write_sixteen_bit_ramps(folder)
    data = shared_data(["--train_data_dir", folder, "--preserve_input_precision"])
    assert data.images.dtype == torch.uint16
    assert np.array_equal(data.images.numpy(), ramps)  # stored losslessly
    for index, images in served_batches(data):
        expected = torch.from_numpy(ramps[index.numpy()].astype(np.float64) / 65535 * 2 - 1)
        torch.testing.assert_close(images.double(), expected, rtol=0, atol=1e-7)
        # neighbouring pixels stay 2/65535 apart, which no 8-bit image can represent
        torch.testing.assert_close(images.double().diff(dim=-1), torch.full_like(expected[..., 1:], 2 / 65535),
                                   rtol=0, atol=1e-6)


def test_without_preserve_input_precision_16_bit_pngs_are_reduced_to_8_bits(tmp_path):
    folder = str(tmp_path / "ramps")
    ramps = write_sixteen_bit_ramps(folder)
    data = shared_data(["--train_data_dir", folder])
    # the same fraction of full scale in 8 bits: round(v · 255 / 65535) = round(v / 257) (PIL's convert would clip
    # to min(v, 255), nearly white)
    quantised = np.floor(ramps.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert data.images.dtype == torch.uint8 and np.array_equal(data.images.numpy(), quantised)
    for index, images in served_batches(data):
        expected = torch.from_numpy(quantised[index.numpy()].astype(np.float64) / 255 * 2 - 1)
        torch.testing.assert_close(images.double(), expected, rtol=0, atol=1e-7)


def decode_keeping_precision(pil_images):
    from diffusers_stf.training.data import decode_images

    return decode_images(pil_images, preserve_input_precision=True)


def test_preserve_input_precision_keeps_16_bits_through_rgb_resizing_and_mixed_8_bit_images(tmp_path):
    folder = str(tmp_path / "mixed")
    os.makedirs(folder)
    deep = 40001  # not a multiple of 257: an 8-bit round trip cannot give it back
    Image.fromarray(np.full((8, 8), deep, np.uint16)).save(os.path.join(folder, "a.png"))
    Image.new("L", (8, 8), 77).save(os.path.join(folder, "b.png"))  # an 8-bit image in the same set
    data = shared_data(["--train_data_dir", folder, "--preserve_input_precision", "--channels", "3",
                        "--resolution", "4"])
    assert data.images.dtype == torch.uint16 and tuple(data.images.shape) == (2, 3, 4, 4)
    served = data.batch(torch.tensor([0, 1]))["images"].double()
    # a constant image stays constant under bilinear resizing; grey becomes RGB by repeating the channel
    torch.testing.assert_close(served[0], torch.full((3, 4, 4), deep / 65535 * 2 - 1, dtype=torch.float64),
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(served[1], torch.full((3, 4, 4), 77 / 255 * 2 - 1, dtype=torch.float64),
                               rtol=0, atol=1e-7)
    # PIL mode I (32-bit integers) holding 16-bit values is kept as those values
    wide = decode_keeping_precision([Image.fromarray(np.full((2, 2), 1000, np.int32))])
    assert wide.dtype == torch.uint16 and torch.equal(wide, torch.full((1, 1, 2, 2), 1000, dtype=torch.uint16))


def test_preserve_input_precision_refuses_what_it_cannot_keep(tmp_path, monkeypatch):
    from diffusers_stf.training.data import decode as data_module

    with pytest.raises(ValueError, match="--preserve_input_precision.*mode F"):
        data_module.decode_images([Image.fromarray(np.zeros((4, 4), np.float32))], preserve_input_precision=True)
    with pytest.raises(ValueError, match="--preserve_input_precision.*outside the 16-bit range"):
        data_module.decode_images([Image.fromarray(np.full((4, 4), 70000, np.int32))], preserve_input_precision=True)
    folder = str(tmp_path / "ramps")
    write_sixteen_bit_ramps(folder)
    monkeypatch.setattr(data_module, "MAX_IN_MEMORY_BYTES", 64)  # the four ramps need 4 * 64 * 2 bytes
    with pytest.raises(ValueError, match="--preserve_input_precision.*MAX_IN_MEMORY_BYTES"):
        shared_data(["--train_data_dir", folder, "--preserve_input_precision", "--cache_dir", str(tmp_path / "c")])


@pytest.mark.parametrize("prefix", ["clf", "disc"])
def test_encoder_flags_become_the_models_arguments(prefix):
    from diffusers_stf.training import add_encoder_args, encoder_config

    parser = argparse.ArgumentParser()
    add_encoder_args(parser.add_argument_group("encoder"), prefix, "how (x, sigma) enter")
    args = parser.parse_args([f"--{prefix}_block_out_channels", "8,16,32", f"--{prefix}_attention_levels", "1,2",
                              f"--{prefix}_mid_block", "attention", f"--{prefix}_norm_num_groups", "4",
                              f"--{prefix}_layers_per_block", "2", f"--{prefix}_preconditioning", "edm"])
    assert encoder_config(args, prefix).model_kwargs() == dict(
        block_out_channels=(8, 16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        layers_per_block=2, norm_num_groups=4, mid_block_type="UNetMidBlock2D", preconditioning="edm")
    args = parser.parse_args([f"--{prefix}_attention_levels", "2"])  # two default levels: 0 and 1
    with pytest.raises(ValueError, match=f"--{prefix}_attention_levels entries must be in \\[0, 1\\], got 2"):
        encoder_config(args, prefix)
