"""Every setting of a run is checked before any work, and a bad one is refused with a ValueError that names its flag
(or argument): validation settings, β schedules, run lengths, flag prefixes, image files the decoder would misread,
and inputs that used to crash without saying which argument was wrong."""

import argparse
import ast
import importlib.util
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_stf.digits import digits_tensor
from diffusers_stf.training import ImageData, Trainer, TrainingConfig, add_training_args, parse_training_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_STF = ["--block_out_channels", "8,16", "--train_batch_size", "16", "--stf_reference_batch_size", "48",
            "--num_validation_images", "4", "--num_inference_steps", "2", "--no_progress_bar", "--logging_steps", "2",
            "--validation_steps", "0", "--lr_warmup_steps", "2", "--report_to", "none"]
TINY_SA = ["--block_out_channels", "8,16", "--norm_num_groups", "4", "--max_train_steps", "2", "--train_batch_size",
           "16", "--num_validation_images", "4", "--checkpointing_steps", "0", "--validation_steps", "0",
           "--logging_steps", "1", "--no_progress_bar", "--report_to", "none"]
TINY_CLF = ["--max_train_steps", "2", "--num_validation_images", "4", "--validation_steps", "0", "--checkpointing_steps",
            "0", "--clf_block_out_channels", "8,16", "--clf_norm_num_groups", "4", "--train_batch_size", "16",
            "--report_to", "none", "--num_heldout_images", "16", "--no_progress_bar"]


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shared_config(argv):
    return parse_training_args(add_training_args(argparse.ArgumentParser(allow_abbrev=False)), argv)[1]


# --- validation and sampling settings are checked before the first step ----------------------------------------------

def test_sequence_aware_refuses_more_sampling_steps_than_training_steps_before_training(tmp_path):
    out = tmp_path / "sa"
    with pytest.raises(ValueError, match=r"--num_inference_steps 50 .*--num_train_timesteps 10"):
        load_example("train_sequence_aware").main([*TINY_SA, "--num_train_timesteps", "10", "--num_inference_steps",
                                                   "50", "--output_dir", str(out)])
    assert not (out / "logs" / "metrics.jsonl").exists() and not (out / "model_index.json").exists()


def test_trainer_tries_the_validation_sampler_before_the_first_step(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    from conftest import make_tiny_unet

    steps = []

    def loss_fn(model, batch, generator):
        steps.append(1)
        return model(batch["images"], 0).sample.pow(2).flatten(1).mean(1)

    data = ImageData.from_tensor(digits_tensor("train")[0][:32])
    config = TrainingConfig(output_dir=str(tmp_path / "run"), max_train_steps=2, train_batch_size=16,
                            num_inference_steps=50, num_validation_images=2, report_to="none", checkpointing_steps=0,
                            validation_steps=0, logging_steps=1, no_progress_bar=True, lr_warmup_steps=0)
    make_pipeline = lambda unet: DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=10))  # noqa: E731
    with pytest.raises(ValueError, match=r"--num_inference_steps 50"):
        Trainer(config, make_tiny_unet(), loss_fn, data, make_pipeline=make_pipeline).train()
    assert steps == []  # refused before the first training step


def test_classifier_refuses_non_positive_validation_sigmas_before_training(tmp_path):
    out = tmp_path / "clf"
    with pytest.raises(ValueError, match=r"--validation_sigmas .*> 0"):
        load_example("train_classifier").main([*TINY_CLF, "--validation_sigmas", "0.5,-1", "--output_dir", str(out)])
    assert not (out / "logs" / "metrics.jsonl").exists()


# --- silently accepted input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_an_inverted_beta_schedule_is_refused(schedule):
    from diffusers_stf.noise_schedules import betas_for_schedule

    with pytest.raises(ValueError, match=r"beta_start .*<= beta_end"):
        betas_for_schedule(10, 0.02, 1e-4, schedule)
    increasing = betas_for_schedule(10, 1e-4, 0.02, schedule)
    assert bool((increasing.diff() > 0).all())


def test_sequence_aware_refuses_an_inverted_schedule_and_betas_with_cosine(tmp_path):
    sa = load_example("train_sequence_aware")
    with pytest.raises(ValueError, match=r"--beta_start 0.02 .*--beta_end 0.0001"):
        sa.main([*TINY_SA, "--beta_start", "0.02", "--beta_end", "0.0001", "--output_dir", str(tmp_path / "a")])
    with pytest.raises(ValueError, match=r"--beta_end .*--beta_schedule cosine"):
        sa.main([*TINY_SA, "--beta_schedule", "cosine", "--beta_end", "0.01", "--output_dir", str(tmp_path / "b")])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resuming_a_run_past_max_train_steps_is_refused(tmp_path):
    stf = load_example("train_stf")
    out = str(tmp_path / "run")
    stf.main([*TINY_STF, "--output_dir", out, "--max_train_steps", "4", "--checkpointing_steps", "2"])
    with pytest.raises(ValueError, match=r"--max_train_steps 2 .*step 4"):
        stf.main([*TINY_STF, "--output_dir", out, "--max_train_steps", "2", "--checkpointing_steps", "2",
                  "--resume_from_checkpoint", "latest"])


def test_flag_prefixes_are_refused(capsys):
    parser = load_example("train_stf").build_parser()
    with pytest.raises(SystemExit):
        parse_training_args(parser, ["--learning_rat", "0.1"])
    assert "--learning_rat" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_example("generate").parse_args(["--pipeline", "p", "--output_dir", "o", "--num_image", "3"])
    with pytest.raises(SystemExit):
        load_example("evaluate").parse_args(["samples", "--batch_siz", "3"])


def test_every_argument_parser_refuses_abbreviations():
    missing = []
    for folder in ("diffusers_stf", "examples", "scripts", "benchmarks"):
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "ArgumentParser":
                        keywords = {k.arg: k.value for k in node.keywords}
                        value = keywords.get("allow_abbrev")
                        if not (isinstance(value, ast.Constant) and value.value is False):
                            missing.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert missing == []


# --- image files the decoder used to misread -----------------------------------------------------------------------

def decode_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("diffusers_stf.training.data")]


def test_16_bit_pngs_are_scaled_to_8_bits_with_one_warning(tmp_path, caplog):
    from diffusers_stf.training.data import DataConfig, load_training_images

    folder = tmp_path / "deep"
    folder.mkdir()
    values = np.array([[0, 1, 128, 129, 256, 257, 32767, 32768], [40001, 50000, 60000, 65000, 65279, 65280, 65534,
                                                                    65535]] * 4, dtype=np.uint16)
    for i in range(2):
        Image.fromarray(np.roll(values, i, axis=1)).save(folder / f"{i}.png")
    with caplog.at_level(logging.WARNING):
        data = load_training_images(DataConfig(train_data_dir=str(folder)))
    # the same fraction of full scale: v / 65535 · 255, rounded
    expected = np.stack([np.floor(np.roll(values, i, axis=1) / 257 + 0.5) for i in range(2)])[:, None]
    assert data.images.dtype == torch.uint8 and np.array_equal(data.images.numpy(), expected.astype(np.uint8))
    warnings = [m for m in decode_warnings(caplog) if "16 bits" in m]
    assert len(warnings) == 1 and "2 images" in warnings[0] and "--preserve_input_precision" in warnings[0]


def test_float_tiffs_are_refused_naming_the_file(tmp_path):
    from diffusers_stf.training.data import DataConfig, load_training_images

    folder = tmp_path / "float"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 0.75, np.float32)).save(folder / "a.tiff")
    with pytest.raises(ValueError, match=r"a\.tiff.*mode F"):
        load_training_images(DataConfig(train_data_dir=str(folder)))


def test_transparent_images_warn_once_with_the_counts(tmp_path, caplog):
    from diffusers_stf.training.data import DataConfig, load_training_images

    folder = tmp_path / "rgba"
    folder.mkdir()
    clear = np.zeros((8, 8, 4), np.uint8)
    clear[..., :3] = (200, 10, 30)  # colour stored under alpha 0
    half = np.full((8, 8, 4), 90, np.uint8)
    half[:4, :, 3] = 255
    opaque = np.full((8, 8, 4), 255, np.uint8)
    for name, array in (("a", clear), ("b", half), ("c", opaque), ("d", clear)):
        Image.fromarray(array, "RGBA").save(folder / f"{name}.png")
    with caplog.at_level(logging.WARNING):
        data = load_training_images(DataConfig(train_data_dir=str(folder)))
    # the alpha channel is dropped (PIL's convert("RGB"), as diffusers' train_unconditional.py): stored colours
    assert np.array_equal(data.images[0].numpy(), clear[..., :3].transpose(2, 0, 1))
    assert np.array_equal(data.images[1].numpy(), half[..., :3].transpose(2, 0, 1))
    warnings = [m for m in decode_warnings(caplog) if "transparen" in m]
    assert len(warnings) == 1
    assert "3 images" in warnings[0] and "2 of them fully transparent" in warnings[0]


def test_palette_gifs_keep_their_colours_and_a_grey_palette_reads_as_greyscale(tmp_path, caplog):
    from diffusers_stf.training.data import DataConfig, load_training_images

    digits = ((digits_tensor("train")[0][:3, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(2):
        Image.fromarray(digits[i]).convert("P").save(grey / f"{i}.gif")  # an all-grey palette
    Image.fromarray(digits[2]).save(grey / "2.png")  # and an 8-bit grey PNG beside them
    with caplog.at_level(logging.WARNING):
        data = load_training_images(DataConfig(train_data_dir=str(grey)))
    assert tuple(data.images.shape) == (3, 1, 8, 8)
    assert np.array_equal(data.images[:, 0].numpy(), digits)
    assert not [m for m in decode_warnings(caplog) if "mix" in m]
    warnings = [m for m in decode_warnings(caplog) if "palette" in m]
    assert len(warnings) == 1 and "2 images" in warnings[0] and "greyscale" in warnings[0]

    colour = tmp_path / "colour"
    colour.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = rgb[..., 0] // 64 * 64  # few colours: the palette holds them exactly
    rgb[..., 1] = rgb[..., 0] // 2
    rgb[..., 2] = 255 - rgb[..., 0]
    Image.fromarray(rgb).quantize(16).save(colour / "a.gif")
    data = load_training_images(DataConfig(train_data_dir=str(colour)))
    assert tuple(data.images.shape) == (1, 3, 8, 8) and np.array_equal(data.images[0].numpy(), rgb.transpose(2, 0, 1))


def test_animated_gifs_warn_that_only_the_first_frame_is_used(tmp_path, caplog):
    from diffusers_stf.training.data import decode_images

    frames = [Image.new("L", (8, 8), v).convert("P") for v in (10, 200)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with caplog.at_level(logging.WARNING):
        images = decode_images([Image.open(path), Image.open(path)])
    assert tuple(images.shape) == (2, 1, 8, 8) and bool((images == 10).all())
    warnings = [m for m in decode_warnings(caplog) if "frames" in m]
    assert len(warnings) == 1 and "2 images" in warnings[0] and "first frame" in warnings[0]


# --- crashes that did not name the argument ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--block_out_channels", "0,8"], r"--block_out_channels entries must be >= 1, got 0"),
    (["--learning_rate", "1e39"], r"--learning_rate must be <= 1"),
    (["--seed", "-1"], r"--seed must be in \[0, 4294967295\], got -1"),
    (["--seed", str(2**32)], r"--seed must be in \[0, 4294967295\], got 4294967296"),
])
def test_out_of_range_options_name_their_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        shared_config(argv)


def test_encoder_widths_name_their_flag():
    from diffusers_stf.training import EncoderConfig

    with pytest.raises(ValueError, match=r"--disc_block_out_channels entries must be >= 1, got 0"):
        EncoderConfig(flag_prefix="disc", block_out_channels=(8, 0))


def test_evaluate_batch_size_zero_names_the_flag(capsys):
    from diffusers_stf.evaluation import compute_features, load_feature_extractor

    with pytest.raises(SystemExit):
        load_example("evaluate").parse_args(["samples", "--batch_size", "0"])
    assert "--batch_size must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_example("generate").parse_args(["--pipeline", "p", "--output_dir", "o", "--batch_size", "0"])
    assert "--batch_size must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"batch_size must be >= 1, got 0"):
        compute_features(load_feature_extractor("digits"), torch.zeros(4, 1, 8, 8), batch_size=0)


def test_a_sigma_of_the_wrong_length_names_sigma():
    from diffusers_stf.losses import EDMLoss

    loss = EDMLoss()
    images = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"sigma must hold one value or one per image \(4\), got shape \(3,\)"):
        loss(lambda x, s, class_labels=None: x, images, sigma=torch.ones(3))
    # one value for all images, and one per image, are both fine: D = identity gives a loss of exactly 0
    for sigma in (torch.tensor(0.5), torch.full((4,), 0.5)):
        assert torch.equal(loss(lambda x, s, class_labels=None: images, images, sigma=sigma).loss, torch.zeros(4))


def three_d_losses():
    from diffusers_stf.losses import (DDPMEpsilonLoss, DiscriminatorBCELoss, EDMLoss, NoisyCrossEntropyLoss,
                                      SequenceAwareLoss, StableTargetFieldLoss)
    from diffusers_stf.losses.edm2 import EDM2Loss

    never = lambda *args, **kwargs: pytest.fail("the network must not be called")  # noqa: E731
    refs = torch.zeros(8, 1, 8, 8)
    return {
        "EDMLoss": lambda x: EDMLoss()(never, x),
        "EDM2Loss": lambda x: EDM2Loss(logvar_channels=8)(never, x),
        "StableTargetFieldLoss": lambda x: StableTargetFieldLoss(EDMLoss(), 8)(never, x, refs),
        "DDPMEpsilonLoss": lambda x: DDPMEpsilonLoss()(never, x),
        "SequenceAwareLoss": lambda x: SequenceAwareLoss(torch.linspace(1e-4, 0.02, 100), num_steps=2)(never, x),
        "DiscriminatorBCELoss": lambda x: DiscriminatorBCELoss()(never, x, x),
        "NoisyCrossEntropyLoss": lambda x: NoisyCrossEntropyLoss()(never, x, torch.zeros(1, dtype=torch.long)),
    }


@pytest.mark.parametrize("name", sorted(three_d_losses()))
def test_a_single_chw_image_given_to_a_loss_names_the_argument(name):
    with pytest.raises(ValueError, match=r"must be a batch \(B, C, H, W\).*got shape \(1, 8, 8\).*\[None\]"):
        three_d_losses()[name](torch.zeros(1, 8, 8))


def test_a_single_chw_image_given_to_augment_pipe_names_the_argument():
    from diffusers_stf import AugmentPipe

    with pytest.raises(ValueError, match=r"images must be a batch \(N, C, H, W\).*got shape \(1, 8, 8\)"):
        AugmentPipe(0.5)(torch.zeros(1, 8, 8), torch.Generator())


def test_img2img_takes_a_chw_tensor_and_names_a_channel_first_array():
    from diffusers_stf import DiscriminatorGuidedPipeline, EDMHeunScheduler

    from conftest import make_tiny_unet

    pipe = DiscriminatorGuidedPipeline(make_tiny_unet(), EDMHeunScheduler())
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 8, 8)
    kwargs = dict(num_inference_steps=2, output_type="pt", strength=0.5)
    # a single CHW tensor is one image: the same result as the batch of one
    single = pipe(image=image, generator=torch.Generator().manual_seed(0), **kwargs).images
    batch = pipe(image=image[None], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert single.shape == (1, 1, 8, 8) and torch.equal(single, batch)
    # a channel-first numpy array would be read channel-last: refused, naming the shape it was given
    with pytest.raises(ValueError, match=r"image .*channel-last.*got shape \(1, 8, 8\)"):
        pipe(image=image.numpy(), **kwargs)
