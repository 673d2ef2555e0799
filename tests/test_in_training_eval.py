"""Metrics during training (``--eval_every_steps``): FD/KID of the EMA model's samples at the requested steps, in the
trackers, ``logs/metrics.jsonl`` and ``logs/metrics.png``; the training is the same with or without them."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from conftest import make_tiny_unet
from diffusers_stf import EDMHeunScheduler, EDMPipeline
from diffusers_stf.digits import digits_tensor
from diffusers_stf.training import Trainer, TrainingConfig, read_metrics
from diffusers_stf.training.data import ImageData
from diffusers_stf.training.in_training_eval import EvaluationConfig, EvaluationSampler, evaluation_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def reference_cache(tmp_path_factory, monkeypatch):
    """The reference statistics are cached in a folder of the test session, not in the user's cache."""
    monkeypatch.setenv("DIFFUSERS_STF_CACHE", str(tmp_path_factory.getbasetemp() / "stf-cache"))


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def steps_of(rows):
    return [row["step"] for row in rows]


def loss_fn_of(loss):
    return lambda model, batch, generator: loss(loss.denoiser(model), batch["images"], generator=generator)


def digits_data(n=64):
    return ImageData.from_tensor(digits_tensor()[0][:n], resolution=8)


def fd_brute_force(a, b):
    """FD of two feature sets from their sample statistics, the matrix square root by scipy (the NVlabs formula)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


# --- the trainer ------------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Matrix is singular")  # dead ReLU features: sqrtm of a singular product
def test_the_metric_reaches_the_trackers_metrics_jsonl_and_metrics_png_at_the_requested_steps(tmp_path, capsys):
    from accelerate import Accelerator
    from test_training_scale import stand_in_tracker

    from diffusers_stf.evaluation import load_feature_extractor
    from diffusers_stf.losses import EDMLoss

    tracker = stand_in_tracker()
    accelerator = Accelerator(cpu=True, log_with=[tracker])
    config = TrainingConfig(output_dir=str(tmp_path / "run"), train_batch_size=8, max_train_steps=5, logging_steps=2,
                            validation_steps=0, checkpointing_steps=0, num_validation_images=4, num_inference_steps=2,
                            no_progress_bar=True, report_to="none", lr_warmup_steps=0,
                            evaluation=EvaluationConfig(every_steps=2, num_images=80, kid_subsets=5))
    trainer = Trainer(config, make_tiny_unet(), loss_fn_of(EDMLoss()), digits_data(), accelerator=accelerator,
                      make_pipeline=lambda unet: EDMPipeline(unet=unet, scheduler=EDMHeunScheduler()))
    result = trainer.train()

    rows = read_metrics(str(tmp_path / "run" / "logs"))
    evaluations = evaluation_rows(rows)
    assert steps_of(evaluations) == [2, 4, 5]  # every 2 steps, and the last step
    assert steps_of(rows) == sorted(steps_of(rows))  # after the loss row of the same step
    assert all("loss" not in row and row["eval_num_images"] == 80 and row["eval_seconds"] > 0 for row in evaluations)
    logged = {step: values for values, step in tracker.scalars if "kid" in values}
    assert sorted(logged) == [2, 4, 5]
    for row in evaluations:
        assert logged[row["step"]]["fd"] == row["fd"] and logged[row["step"]]["kid"] == row["kid"]
        assert logged[row["step"]]["eval_seconds"] == row["eval_seconds"]
    with Image.open(tmp_path / "run" / "logs" / "metrics.png") as plot:
        assert plot.format == "PNG" and plot.size == (1100, 400)
    # the evaluation time is reported apart and kept out of the training time
    assert result.eval_seconds == pytest.approx(sum(row["eval_seconds"] for row in evaluations))
    assert "Metrics during training:" in capsys.readouterr().out

    # the last row measures the saved EMA pipeline: images of seeds 0..79 with Heun's 2 steps, 8-bit, vs digits:train
    pipeline = EDMPipeline.from_pretrained(str(tmp_path / "run"))
    pipeline.set_progress_bar_config(disable=True)
    images = np.concatenate([pipeline(batch_size=1, num_inference_steps=2, output_type="np",
                                      generator=[torch.Generator().manual_seed(seed)]).images for seed in range(80)])
    images = torch.from_numpy(np.round(images * 255) / 255 * 2 - 1).float().permute(0, 3, 1, 2)
    extractor = load_feature_extractor("digits")
    with torch.no_grad():
        generated = extractor(images)[0].double().numpy()
        reference = extractor(digits_tensor("train")[0])[0].double().numpy()
    assert evaluations[-1]["fd"] == pytest.approx(fd_brute_force(generated, reference), rel=1e-6)


def test_fd_is_undefined_below_the_feature_dimension_and_said_once_while_kid_is_computed(tmp_path, capsys):
    from diffusers_stf.losses import EDMLoss

    config = TrainingConfig(output_dir=str(tmp_path / "run"), train_batch_size=8, max_train_steps=3, logging_steps=1,
                            validation_steps=0, checkpointing_steps=0, num_inference_steps=2, no_progress_bar=True,
                            report_to="none", lr_warmup_steps=0,
                            evaluation=EvaluationConfig(every_steps=1, num_images=20, kid_subsets=5))
    Trainer(config, make_tiny_unet(), loss_fn_of(EDMLoss()), digits_data(),
            make_pipeline=lambda unet: EDMPipeline(unet=unet, scheduler=EDMHeunScheduler())).train()
    evaluations = evaluation_rows(read_metrics(str(tmp_path / "run" / "logs")))
    assert steps_of(evaluations) == [1, 2, 3]
    assert all(row["fd"] is None and np.isfinite(row["kid"]) for row in evaluations)
    assert capsys.readouterr().out.count("FD is undefined for 20 images of 64-d features") == 1


class GreedyPipeline:
    """An EDM pipeline that also draws from every global random generator, as careless sampling code might."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def to(self, device):
        self.pipeline.to(device)
        return self

    def __call__(self, **kwargs):
        import random

        torch.rand(1000), np.random.rand(1000), random.random()
        return self.pipeline(**kwargs)


def test_evaluation_leaves_the_training_draws_weights_and_time_unchanged(tmp_path):
    """Dropout draws from torch's global generator: an evaluation that shifted it would change the weights. Each
    evaluation here takes at least a second, which the training time must not count."""
    import time

    from diffusers import UNet2DModel

    from diffusers_stf.losses import EDMLoss

    def train(name, evaluation):
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           add_attention=False, norm_num_groups=4, dropout=0.3)
        config = TrainingConfig(output_dir=str(tmp_path / name), train_batch_size=8, max_train_steps=4,
                                logging_steps=1, validation_steps=0, checkpointing_steps=0, num_inference_steps=2,
                                no_progress_bar=True, report_to="none", lr_warmup_steps=0, evaluation=evaluation)
        pipeline = lambda model: GreedyPipeline(EDMPipeline(unet=model, scheduler=EDMHeunScheduler()))  # noqa: E731
        slow = lambda model: time.sleep(1.0) or {"slept": 1.0}  # noqa: E731
        trainer = Trainer(config, unet, loss_fn_of(EDMLoss()), digits_data(), make_pipeline=pipeline,
                          evaluation_sampler=EvaluationSampler(pipeline, 2, extra_metrics=slow))
        result = trainer.train()
        weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        return weights, read_metrics(str(tmp_path / name / "logs")), result

    plain_weights, plain_rows, plain = train("plain", EvaluationConfig())
    torch.manual_seed(123)  # the global generators are in another state when the second run starts ...
    weights, rows, result = train("evaluated", EvaluationConfig(every_steps=1, num_images=10, kid_subsets=2))
    assert steps_of(evaluation_rows(rows)) == [1, 2, 3, 4] and all(r["slept"] == 1.0 for r in evaluation_rows(rows))
    assert result.eval_seconds >= 4.0 and result.wall_time < plain.wall_time + 2.0  # the evaluations apart
    assert max(r["seconds"] for r in rows if "loss" in r) < max(r["seconds"] for r in plain_rows) + 2.0
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in plain_rows]
    for name, value in plain_weights.items():  # ... and the training is the same to the bit
        assert torch.equal(weights[name], value), name


# --- the scripts ------------------------------------------------------------------------------------------------------

TINY = ["--cpu", "--block_out_channels", "8,16", "--train_batch_size", "16", "--stf_reference_batch_size", "48",
        "--num_validation_images", "4", "--num_inference_steps", "2", "--no_progress_bar", "--logging_steps", "2",
        "--validation_steps", "0", "--lr_warmup_steps", "2", "--dropout", "0.1", "--report_to", "none",
        "--checkpointing_steps", "2", "--max_train_steps", "4"]


def unet_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def test_the_eval_flags_leave_the_fingerprint_and_a_resume_exact(tmp_path, capsys, fresh_accelerate_state):
    train_stf = script("train_stf")
    train_stf.main(["--output_dir", str(tmp_path / "plain"), *TINY])
    evaluate = ["--eval_every_steps", "1", "--eval_num_images", "10", "--eval_kid_subsets", "2"]
    train_stf.main(["--output_dir", str(tmp_path / "evaluated"), *TINY, *evaluate])
    state = lambda run: json.loads((tmp_path / run / "checkpoint-2" / "trainer_state.json").read_text())  # noqa: E731
    assert state("evaluated")["fingerprint"] == state("plain")["fingerprint"]
    plain = unet_weights(str(tmp_path / "plain"))
    for name, value in unet_weights(str(tmp_path / "evaluated")).items():
        assert torch.equal(value, plain[name]), name
    capsys.readouterr()

    # resumed at step 2 with other eval flags: no refusal, no "changed settings", the same weights; the evaluations
    # of steps 3 and 4 of the first segment are dropped with the rest of the lost steps and measured again
    train_stf.main(["--output_dir", str(tmp_path / "evaluated"), *TINY, "--resume_from_checkpoint",
                    str(tmp_path / "evaluated" / "checkpoint-2"), "--eval_every_steps", "3", "--eval_num_images", "12",
                    "--eval_kid_subsets", "2"])
    out = capsys.readouterr().out
    assert "Resumed from" in out and "changed settings" not in out and "WARNING" not in out
    for name, value in unet_weights(str(tmp_path / "evaluated")).items():
        assert torch.equal(value, plain[name]), name
    rows = read_metrics(str(tmp_path / "evaluated" / "logs"))
    assert steps_of(rows) == sorted(steps_of(rows))
    assert [(r["step"], r["eval_num_images"]) for r in evaluation_rows(rows)] == [(1, 10), (2, 10), (3, 12), (4, 12)]
    assert steps_of([r for r in rows if "loss" in r]) == [2, 4]


@pytest.mark.parametrize("argv,message", [
    (["--eval_every_steps", "2", "--eval_reference", "cifar10"], "cannot be loaded offline"),
    (["--eval_every_steps", "2", "--eval_reference", "uoft-cs/cifar10"], "never downloads it"),
    (["--eval_every_steps", "2", "--eval_reference", "missing/folder"], "no such folder or file"),
    (["--eval_every_steps", "2", "--eval_reference", "{empty}"], "without image files"),
    (["--eval_every_steps", "2", "--eval_feature_extractor", "inception"], "needs --eval_feature_weights"),
    (["--eval_num_images", "500"], "--eval_num_images has no effect without --eval_every_steps"),
    (["--eval_every_steps", "2", "--eval_num_images", "1"], "--eval_num_images must be >= 2"),
])
def test_an_evaluation_that_cannot_run_offline_is_refused_before_anything_is_written(tmp_path, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{empty}", str(tmp_path / "empty")) for a in argv]
    with pytest.raises(ValueError, match=message):
        script("train_stf").main(["--output_dir", str(tmp_path / "run"), *TINY, *argv])
    assert not (tmp_path / "run").exists()


def test_a_statistics_only_reference_gives_fd_without_kid_and_refuses_a_count_that_gives_neither(tmp_path, capsys,
                                                                                                 fresh_accelerate_state):
    from diffusers_stf.evaluation import load_feature_extractor, reference_statistics, save_reference_stats

    stats = reference_statistics(load_feature_extractor("digits"), "digits:train")
    save_reference_stats(str(tmp_path / "stats.npz"), stats["mu"], stats["sigma"])  # NVlabs' format: mu, sigma
    train_stf = script("train_stf")
    common = ["--eval_every_steps", "4", "--eval_reference", str(tmp_path / "stats.npz")]
    with pytest.raises(ValueError, match="holds only mu and sigma, not the features that KID needs"):
        train_stf.main(["--output_dir", str(tmp_path / "few"), *TINY, *common, "--eval_num_images", "64"])
    train_stf.main(["--output_dir", str(tmp_path / "run"), *TINY, *common, "--eval_num_images", "65"])
    row, = evaluation_rows(read_metrics(str(tmp_path / "run" / "logs")))
    assert row["step"] == 4 and np.isfinite(row["fd"]) and row["kid"] is None and row["precision"] is None
    assert "holds only mu and sigma (no features)" in capsys.readouterr().out


def test_two_processes_evaluate_on_the_main_process_and_train_as_one(tmp_path, fresh_accelerate_state):
    common = ["--cpu", "--loss", "edm", "--block_out_channels", "8,16", "--max_train_samples", "64",
              "--max_train_steps", "4", "--logging_steps", "1", "--validation_steps", "0", "--checkpointing_steps", "0",
              "--num_validation_images", "4", "--num_inference_steps", "2", "--no_progress_bar", "--lr_warmup_steps",
              "0", "--learning_rate", "2e-3", "--ema_halflife_kimg", "0.01", "--adam_epsilon", "1e-4",
              "--report_to", "none"]
    script("train_stf").main(["--output_dir", str(tmp_path / "one"), "--train_batch_size", "16", *common])
    from test_training_scale import free_port

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), os.path.join(EXAMPLES, "train_stf.py"),
           "--output_dir", str(tmp_path / "two"), "--train_batch_size", "8", *common,
           "--eval_every_steps", "2", "--eval_num_images", "10", "--eval_kid_subsets", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 training processes" in proc.stdout and proc.stdout.count("step 2: FD undefined, KID") == 1
    rows = read_metrics(str(tmp_path / "two" / "logs"))
    assert steps_of(evaluation_rows(rows)) == [2, 4]  # one row per evaluation: the main process's
    losses_one = [r["loss"] for r in read_metrics(str(tmp_path / "one" / "logs"))]
    assert [r["loss"] for r in rows if "loss" in r] == pytest.approx(losses_one, rel=1e-5)
    one, two = unet_weights(str(tmp_path / "one")), unet_weights(str(tmp_path / "two"))
    diffs = torch.cat([(one[k] - two[k]).abs().reshape(-1) for k in one])
    assert float(diffs.max()) < 1e-4 and float((diffs > 1e-6).float().mean()) < 0.02, diffs.max()


def kid_of_pipeline(pipeline, num_images, steps, **pipeline_kwargs):
    from diffusers_stf.evaluation import evaluate_pipeline

    return evaluate_pipeline(pipeline, num_images, "digits:train", num_inference_steps=steps, kid_subsets=2,
                             pipeline_kwargs=pipeline_kwargs)["kid"]


def test_the_ddpm_script_measures_its_grids_ddim_sampler(tmp_path, fresh_accelerate_state):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    script("train_sequence_aware").main([
        "--output_dir", str(tmp_path / "run"), "--cpu", "--block_out_channels", "8,16", "--train_batch_size", "16",
        "--max_train_steps", "2", "--num_inference_steps", "3", "--validation_eta", "0.5", "--validation_steps", "0",
        "--num_validation_images", "4", "--no_progress_bar", "--report_to", "none", "--checkpointing_steps", "0",
        "--eval_every_steps", "2", "--eval_num_images", "12", "--eval_kid_subsets", "2"])
    row, = evaluation_rows(read_metrics(str(tmp_path / "run" / "logs")))
    saved = DDPMPipeline.from_pretrained(str(tmp_path / "run"))
    ddim = DDIMPipeline(unet=saved.unet, scheduler=DDIMScheduler.from_config(saved.scheduler.config))
    assert row["kid"] == pytest.approx(kid_of_pipeline(ddim, 12, 3, eta=0.5), rel=1e-9)
    assert row["kid"] != pytest.approx(kid_of_pipeline(ddim, 12, 3, eta=0.0), rel=1e-6)


def test_the_score_model_script_measures_its_saved_sampler(tmp_path, fresh_accelerate_state):
    script("train_score_model").main([
        "--output_dir", str(tmp_path / "run"), "--cpu", "--block_out_channels", "8,16", "--train_batch_size", "16",
        "--max_train_steps", "2", "--num_inference_steps", "3", "--steps_per_level", "1", "--validation_steps", "0",
        "--num_validation_images", "4", "--no_progress_bar", "--report_to", "none", "--checkpointing_steps", "0",
        "--eval_every_steps", "2", "--eval_num_images", "12", "--eval_kid_subsets", "2", "--num_threads", "0"])
    row, = evaluation_rows(read_metrics(str(tmp_path / "run" / "logs")))
    saved = EDMPipeline.from_pretrained(str(tmp_path / "run"))
    assert type(saved.scheduler).__name__ == "AnnealedLangevinScheduler"
    assert row["kid"] == pytest.approx(kid_of_pipeline(saved, 12, 3), rel=1e-9)


@pytest.fixture
def score_pipeline(tmp_path):
    path = tmp_path / "edm"
    EDMPipeline(make_tiny_unet(0), EDMHeunScheduler()).save_pretrained(path)
    return str(path)


GUIDED = ["--cpu", "--max_train_steps", "2", "--num_inference_steps", "2", "--num_validation_images", "4",
          "--validation_steps", "0", "--checkpointing_steps", "0", "--no_progress_bar", "--train_batch_size", "16",
          "--report_to", "none", "--num_heldout_images", "16", "--eval_every_steps", "2", "--eval_num_images", "12",
          "--eval_kid_subsets", "2"]


def test_the_discriminator_script_measures_the_guided_sampler_and_the_heldout_accuracy(tmp_path, score_pipeline,
                                                                                        fresh_accelerate_state):
    from diffusers_stf import DiscriminatorGuidedPipeline

    main = script("train_discriminator").main
    main(["--pretrained_model_name_or_path", score_pipeline, "--output_dir", str(tmp_path / "run"), *GUIDED,
          "--num_fake_images", "60", "--generation_steps", "2", "--disc_block_out_channels", "8,16",
          "--disc_norm_num_groups", "4", "--dg_weight_1st_order", "3.0"])
    row, = evaluation_rows(read_metrics(str(tmp_path / "run" / "logs")))
    assert {"heldout_accuracy_sigma_0.05", "heldout_bce_sigma_5"} <= set(row)
    saved = DiscriminatorGuidedPipeline.from_pretrained(str(tmp_path / "run"))
    assert row["kid"] == pytest.approx(kid_of_pipeline(saved, 12, 2, dg_weight_1st_order=3.0, dg_weight_2nd_order=0.0),
                                       rel=1e-9)
    assert row["kid"] != pytest.approx(kid_of_pipeline(saved, 12, 2, dg_weight_1st_order=0.0), rel=1e-6)
    with pytest.raises(ValueError, match="guidance metric.*needs --pretrained_model_name_or_path"):
        main(["--fake_data_dir", str(tmp_path / "run" / "fake_images"), "--output_dir", str(tmp_path / "alone"),
              *GUIDED])


def test_the_classifier_script_measures_the_guided_sampler_with_classes_cycled_by_seed(tmp_path, score_pipeline,
                                                                                        fresh_accelerate_state):
    from diffusers_stf import DiscriminatorGuidedPipeline
    from diffusers_stf.evaluation import evaluate_pipeline

    script("train_classifier").main([
        "--pretrained_model_name_or_path", score_pipeline, "--output_dir", str(tmp_path / "run"), *GUIDED,
        "--clf_block_out_channels", "8,16", "--clf_norm_num_groups", "4", "--classifier_guidance_scale", "4.0"])
    row, = evaluation_rows(read_metrics(str(tmp_path / "run" / "logs")))
    assert "heldout_accuracy_sigma_0.05" in row and "heldout_cross_entropy_sigma_5" in row
    saved = DiscriminatorGuidedPipeline.from_pretrained(str(tmp_path / "run"))
    guided = DiscriminatorGuidedPipeline(saved.unet, saved.scheduler, classifier=saved.classifier)
    guided.set_progress_bar_config(disable=True)

    def kid(scale):  # image i (seed i) guided to class i mod 10, batch by batch
        images = []

        class Labelled:
            device = guided.device

            def set_progress_bar_config(self, **kwargs):
                pass

            def __call__(self, *, generator, **kwargs):
                labels = torch.tensor([g.initial_seed() % 10 for g in generator])
                images.append(labels)
                return guided(generator=generator, class_labels=labels, classifier_guidance_scale=scale, **kwargs)

        value = evaluate_pipeline(Labelled(), 12, "digits:train", num_inference_steps=2, kid_subsets=2)["kid"]
        assert torch.equal(torch.cat(images), torch.arange(12) % 10)
        return value

    assert row["kid"] == pytest.approx(kid(4.0), rel=1e-9)
    assert row["kid"] != pytest.approx(kid(0.0), rel=1e-6)
