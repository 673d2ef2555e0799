"""diffusers' ``examples/unconditional_image_generation/train_unconditional.py`` command lines on our scripts, and its
EMA rule against a transcription of ``diffusers.training_utils.EMAModel.get_decay``."""

from __future__ import annotations

import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

# Every option of diffusers' train_unconditional.py (diffusers main), with a value of the kind its README uses.
DIFFUSERS_COMMON = [
    "--dataset_name", "huggan/flowers-102-categories", "--dataset_config_name", "default",
    "--model_config_name_or_path", "google/ddpm-cifar10-32", "--output_dir", "ddpm-ema-flowers-64",
    "--cache_dir", "hf-cache", "--resolution", "64", "--center_crop", "--random_flip",
    "--train_batch_size", "16", "--eval_batch_size", "16", "--dataloader_num_workers", "0", "--num_epochs", "100",
    "--save_images_epochs", "10", "--save_model_epochs", "10", "--gradient_accumulation_steps", "1",
    "--learning_rate", "1e-4", "--lr_scheduler", "cosine", "--lr_warmup_steps", "500", "--adam_beta1", "0.95",
    "--adam_beta2", "0.999", "--adam_weight_decay", "1e-6", "--adam_epsilon", "1e-08", "--use_ema",
    "--ema_inv_gamma", "1.0", "--ema_power", "0.75", "--ema_max_decay", "0.9999", "--hub_private_repo",
    "--logger", "wandb", "--logging_dir", "logs", "--local_rank", "-1", "--mixed_precision", "bf16",
    "--checkpointing_steps", "500",
    "--checkpoints_total_limit", "3", "--resume_from_checkpoint", "latest",
    "--enable_xformers_memory_efficient_attention", "--preserve_input_precision",
]
DIFFUSERS_DDPM = ["--prediction_type", "epsilon", "--ddpm_num_steps", "1000", "--ddpm_num_inference_steps", "1000",
                  "--ddpm_beta_schedule", "linear"]


def parse(script, argv):
    from diffusers_stf.training import parse_training_args

    module = importlib.import_module(script)
    return parse_training_args(module.build_parser(), argv)


@pytest.mark.parametrize("script", ["train_stf", "train_score_model", "train_sequence_aware"])
def test_every_non_ddpm_flag_of_train_unconditional_means_the_same_here(script):
    argv = DIFFUSERS_COMMON + (DIFFUSERS_DDPM if script == "train_sequence_aware" else [])
    args, config = parse(script, argv)
    training, data = config.training, config.data
    assert (data.dataset_name, data.dataset_config_name, data.cache_dir) == ("huggan/flowers-102-categories",
                                                                            "default", "hf-cache")
    assert (data.resolution, data.center_crop, data.random_flip) == (64, True, True)
    assert data.preserve_input_precision
    assert config.unet.model_config_name_or_path == "google/ddpm-cifar10-32"
    assert (training.train_batch_size, training.num_epochs, training.gradient_accumulation_steps) == (16, 100, 1)
    assert (training.num_validation_images, training.save_images_epochs, training.save_model_epochs) == (16, 10, 10)
    assert (training.learning_rate, training.lr_scheduler, training.lr_warmup_steps) == (1e-4, "cosine", 500)
    assert (training.adam_beta1, training.adam_beta2, training.adam_weight_decay, training.adam_epsilon) == \
        (0.95, 0.999, 1e-6, 1e-8)
    assert (training.use_ema, training.ema_inv_gamma, training.ema_power, training.ema_max_decay) == \
        (True, 1.0, 0.75, 0.9999)
    assert (training.report_to, training.logging_dir, training.mixed_precision) == ("wandb", "logs", "bf16")
    assert (training.checkpointing_steps, training.checkpoints_total_limit, training.resume_from_checkpoint) == \
        (500, 3, "latest")
    assert training.enable_xformers_memory_efficient_attention and training.hub_private_repo
    if script == "train_sequence_aware":
        assert (args.num_train_timesteps, args.beta_schedule, training.num_inference_steps) == (1000, "linear", 1000)


@pytest.mark.parametrize("script", ["train_stf", "train_score_model"])
@pytest.mark.parametrize("flag,value", [("--prediction_type", "epsilon"), ("--ddpm_num_steps", "1000"),
                                        ("--ddpm_num_inference_steps", "50"), ("--ddpm_beta_schedule", "linear")])
def test_a_ddpm_flag_on_a_non_ddpm_script_is_refused_by_name(script, flag, value):
    with pytest.raises(ValueError, match=f"^{flag} is an option of DDPM training"):
        parse(script, ["--output_dir", "x", flag, value])


def diffusers_get_decay(optimization_step, inv_gamma, power, max_decay, min_decay=0.0, update_after_step=0):
    """Transcription of diffusers.training_utils.EMAModel.get_decay with use_ema_warmup=True (``step`` is called
    with optimization_step already incremented, so the first optimizer step asks for optimization_step 1)."""
    step = max(0, optimization_step - update_after_step - 1)
    if step <= 0:
        return 0.0
    value = 1 - (1 + step / inv_gamma) ** -power
    return max(min(value, max_decay), min_decay)


@pytest.mark.parametrize("inv_gamma,power,max_decay", [(1.0, 0.75, 0.9999), (1.0, 2 / 3, 0.999), (10.0, 0.5, 0.99),
                                                       (0.5, 1.0, 0.9)])
def test_use_ema_decay_is_diffusers_warmup_rule(inv_gamma, power, max_decay):
    import torch

    from diffusers_stf.training import WarmupEMA, warmup_ema_beta

    for k in list(range(50)) + [10**3, 10**5, 10**7]:  # our k is 0-based; diffusers' optimization_step is k + 1
        assert warmup_ema_beta(k, inv_gamma, power, max_decay) == \
            pytest.approx(diffusers_get_decay(k + 1, inv_gamma, power, max_decay), rel=1e-12, abs=0)
    # θ_ema ← β θ_ema + (1 − β) θ: after steps with β_0 = 0 and β_1, the average is β_1 θ_0 + (1 − β_1) θ_1
    model = torch.nn.Linear(2, 1)
    ema = WarmupEMA(model, inv_gamma, power, max_decay)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.update(model, nimg=0, batch_images=8, step=0)
        model.weight.fill_(3.0)
        beta = ema.update(model, nimg=8, batch_images=8, step=1)
    assert beta == pytest.approx(diffusers_get_decay(2, inv_gamma, power, max_decay))
    torch.testing.assert_close(ema.model.weight, torch.full((1, 2), beta * 1.0 + (1 - beta) * 3.0))


def test_an_uninstalled_tracker_named_with_logger_is_refused_naming_logger(tmp_path, monkeypatch):
    import importlib.util

    from diffusers_stf.training import make_accelerator

    find_spec = importlib.util.find_spec  # wandb reported as not installed, whatever this machine has
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    _, config = parse("train_stf", ["--output_dir", str(tmp_path / "run"), "--logger", "wandb"])
    with pytest.raises(ValueError, match="needs the 'wandb' package.*--logger wandb"):
        make_accelerator(config.training)
