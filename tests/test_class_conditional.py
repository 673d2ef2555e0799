"""Class-conditional training with label dropout (train_stf.py / train_sequence_aware.py --class_conditional), the
labels' sources, the saved null label, class rows in the grids, sampling a class-conditional folder (generate.py),
class-matched STF targets and the EMA length of the autoguidance guide recipe. Tiny models, a few steps each."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image

from diffusers_stf import EDMHeunScheduler, EDMPipeline
from diffusers_stf.evaluation.images import to_uint8
from diffusers_stf.training import BatchSchedule, Trainer, list_checkpoints
from diffusers_stf.training.global_batch import BatchShare, global_indices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"class_conditional_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_stf = load_example("train_stf")
train_sequence_aware = load_example("train_sequence_aware")
generate = load_example("generate")

pytestmark = pytest.mark.usefixtures("one_thread")

B = 8  # images per step
RUN = ["--block_out_channels", "8,16", "--train_batch_size", str(B), "--num_validation_images", "9",
       "--num_inference_steps", "2", "--no_progress_bar", "--logging_steps", "1", "--validation_steps", "0",
       "--lr_warmup_steps", "0", "--checkpointing_steps", "0", "--report_to", "none", "--max_train_steps", "2"]
STF = [*RUN, "--loss", "edm"]
SA = [*RUN, "--sa_k", "1", "--sa_lambda", "0"]  # one UNet row per image, in batch order
GRID_LABELS_9 = [0, 0, 0, 1, 1, 1, 2, 2, 2]  # 9 images, 3 per row: row r asks for class r


@pytest.fixture
def unet_labels(monkeypatch):
    """The class labels of every UNet2DModel forward call: ``train`` (training steps) and ``eval`` (sampling)."""
    seen = {"train": [], "eval": []}
    forward = UNet2DModel.forward

    def recording(self, sample, timestep, class_labels=None, **kwargs):
        labels = None if class_labels is None else class_labels.detach().cpu().clone()
        seen["train" if self.training else "eval"].append(labels)
        return forward(self, sample, timestep, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(UNet2DModel, "forward", recording)
    return seen


def expected_labels(data_labels: torch.Tensor, steps: int, batch: int = B, seed: int = 0):
    """The data's labels of the images of each step, by the batch order of the run (BatchSchedule)."""
    schedule = BatchSchedule(len(data_labels), batch, seed)
    return [data_labels[global_indices(schedule, step)] for step in range(steps)]


def check_dropped(seen, expected, null_label):
    """Each label the network saw is the data's or, dropped, the null label; some of each."""
    seen, expected = torch.cat(seen), torch.cat(expected)
    dropped = seen == null_label
    assert not bool((expected == null_label).any())
    assert torch.equal(seen[~dropped], expected[~dropped])
    assert 0 < int(dropped.sum()) < len(seen)


def sklearn_digit_labels():
    """The labels of the digits' training split (the scripts' default ``--digits_split train``), in its order."""
    from sklearn.datasets import load_digits

    from diffusers_stf.digits import digits_split_indices

    return torch.from_numpy(load_digits().target[digits_split_indices()["train"]]).long()


# --- label dropout over the global batch --------------------------------------------------------------------------

def test_label_dropout_happens_at_the_requested_rate_over_the_global_batch():
    from diffusers_stf.training import drop_labels

    n, p, null = 20_000, 0.1, 10
    labels = torch.arange(n) % 10
    out = drop_labels(labels, null, p, BatchShare.of_process(n), torch.Generator().manual_seed(0))
    dropped = out == null
    assert torch.equal(out[~dropped], labels[~dropped])
    # Binomial(n, p): mean n·p = 2000, sd √(n·p·(1−p)) = 42.4; 5 sd
    assert abs(int(dropped.sum()) - n * p) <= 5 * math.sqrt(n * p * (1 - p))
    # two processes, each with the same step generator, keep their rows of the one global draw
    shares = [drop_labels(labels[q * n // 2:(q + 1) * n // 2], null, p, BatchShare.of_process(n // 2, 2, q),
                          torch.Generator().manual_seed(0)) for q in range(2)]
    assert torch.equal(torch.cat(shares), out)
    assert torch.equal(drop_labels(labels, null, 0.0, BatchShare.of_process(n), torch.Generator()), labels)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RECORDER = """
import json, os, sys
from diffusers import UNet2DModel

seen = []
forward = UNet2DModel.forward


def recording(self, sample, timestep, class_labels=None, **kwargs):
    if self.training:
        seen.append(class_labels.tolist())
    return forward(self, sample, timestep, class_labels=class_labels, **kwargs)


UNet2DModel.forward = recording
sys.path.insert(0, sys.argv[2])
import train_stf

train_stf.main(sys.argv[3:])
with open(os.path.join(sys.argv[1], "labels_%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump(seen, f)
"""


def test_one_and_two_processes_give_the_same_labels(tmp_path, unet_labels):
    common = [*STF, "--class_conditional", "--label_dropout", "0.5", "--cpu", "--max_train_steps", "3",
              "--num_validation_images", "4"]
    train_stf.main(["--output_dir", str(tmp_path / "one"), *common, "--train_batch_size", "16"])
    one = unet_labels["train"]
    recorder = tmp_path / "recorder.py"
    recorder.write_text(RECORDER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(recorder), str(tmp_path), EXAMPLES, "--output_dir", str(tmp_path / "two"), *common,
           "--train_batch_size", "8"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"labels_{q}.json").read_text()) for q in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 3
    for step in range(3):
        assert torch.equal(torch.tensor(ranks[0][step] + ranks[1][step]), one[step])
    check_dropped(one, expected_labels(sklearn_digit_labels(), 3, batch=16), null_label=10)


# --- the labels' sources reach the network; the null label is K and is saved ---------------------------------------

def test_digit_labels_reach_the_network_and_the_null_label_is_saved(tmp_path, unet_labels):
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    train_stf.main(["--output_dir", str(out), *STF, "--class_conditional", "--label_dropout", "0.3"])
    check_dropped(unet_labels["train"], expected_labels(sklearn_digit_labels(), 2), null_label=10)
    # the final samples.png: 9 images, 3 per row, row r asks for class r
    assert unet_labels["eval"][0].tolist() == GRID_LABELS_9
    index = json.loads((out / "model_index.json").read_text())
    assert index["null_class_label"] == 10
    assert json.loads((out / "unet" / "config.json").read_text())["num_class_embeds"] == 11
    pipe = EDMPipeline.from_pretrained(str(out))
    assert pipe.config.null_class_label == 10 and pipe.unet.config.num_class_embeds == 11
    pipe.save_pretrained(str(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "model_index.json").read_text())["null_class_label"] == 10
    assert UNet2DModel.from_pretrained(str(out), subfolder="unet").config.num_class_embeds == 11  # a guide's load
    card = ModelCard.load(str(out / "README.md"))
    assert {"class-conditional", "classifier-free-guidance"} <= set(card.data.tags)
    for text in ("class-conditional** on 10 classes", "label dropout P = 0.3", "null label 10", "guidance_scale=2.0",
                 "`null_class_label = 10`", "row r asks for class r mod 10"):
        assert text in card.text, text


def test_a_class_conditional_folder_loads_with_plain_diffusers_and_guides_the_same(tmp_path, unet_labels):
    from safetensors.torch import load_file
    from test_hub import run_blocked

    out = tmp_path / "run"
    train_stf.main(["--output_dir", str(out), *STF, "--class_conditional", "--num_validation_images", "4"])
    kwargs = dict(batch_size=2, num_inference_steps=3, class_labels=torch.tensor([3, 7]), guidance_scale=2.0,
                  output_type="pt")
    pipe = EDMPipeline.from_pretrained(str(out))
    ours = pipe(generator=torch.Generator().manual_seed(5), **kwargs).images
    result = run_blocked(tmp_path, f"""
        import torch
        from diffusers import DiffusionPipeline
        from safetensors.torch import save_file
        pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)
        assert pipe.config.null_class_label == 10, pipe.config
        images = pipe(batch_size=2, num_inference_steps=3, class_labels=torch.tensor([3, 7]), guidance_scale=2.0,
                      output_type="pt", generator=torch.Generator().manual_seed(5)).images
        save_file({{"images": images.contiguous()}}, {str(tmp_path / "plain.safetensors")!r})
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(load_file(str(tmp_path / "plain.safetensors"))["images"], ours)


def write_class_folders(root, classes, per_class=6):
    """An image folder with one subfolder per class; image j of class c has the constant grey value 30 + 80·c + j."""
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for j in range(per_class):
            Image.new("L", (8, 8), 30 + 80 * c + j).save(root / name / f"{j}.png")


def labels_by_pixel(argv):
    """The class of each training image, read from its grey value (30 + 80·c + j), in the loader's order."""
    from diffusers_stf.training import add_training_args, load_training_images, parse_training_args
    import argparse

    config = parse_training_args(add_training_args(argparse.ArgumentParser()), argv)[1]
    pixels = load_training_images(config.data).images[:, 0, 0, 0].long()
    return (pixels - 30) // 80


def test_class_subfolder_labels_reach_the_network(tmp_path, unet_labels):
    folder = tmp_path / "images"
    write_class_folders(folder, ["ant", "bee", "cat"])
    data = ["--train_data_dir", str(folder), "--cache_dir", str(tmp_path / "cache")]
    train_stf.main(["--output_dir", str(tmp_path / "run"), *STF, *data, "--class_conditional", "--label_dropout",
                    "0.3", "--num_validation_images", "4"])
    check_dropped(unet_labels["train"], expected_labels(labels_by_pixel(data), 2), null_label=3)
    assert json.loads((tmp_path / "run" / "model_index.json").read_text())["null_class_label"] == 3


def write_label_column_dataset(folder):
    """A parquet dataset whose ``digit`` column holds the classes (grey value 30 + 80·c + j) and whose ``label``
    column is a decoy."""
    import datasets

    rows = [(c, j) for c in range(3) for j in range(6)]
    ds = datasets.Dataset.from_dict(
        {"image": [Image.new("L", (8, 8), 30 + 80 * c + j) for c, j in rows], "digit": [c for c, _ in rows],
         "label": [(c + 1) % 3 for c, _ in rows]},
        features=datasets.Features({"image": datasets.Image(), "digit": datasets.Value("int64"),
                                    "label": datasets.Value("int64")}))
    os.makedirs(folder, exist_ok=True)
    ds.to_parquet(str(folder / "train.parquet"))


def test_a_label_column_reaches_the_network_and_a_missing_one_is_refused(tmp_path, unet_labels):
    folder = tmp_path / "dataset"
    write_label_column_dataset(folder)
    data = ["--dataset_name", str(folder), "--cache_dir", str(tmp_path / "cache")]
    train_stf.main(["--output_dir", str(tmp_path / "run"), *STF, *data, "--class_conditional", "--label_column",
                    "digit", "--label_dropout", "0.3", "--num_validation_images", "4"])
    check_dropped(unet_labels["train"], expected_labels(labels_by_pixel(data), 2), null_label=3)
    with pytest.raises(ValueError, match="--label_column 'nope' is not a column of the dataset"):
        train_stf.main(["--output_dir", str(tmp_path / "bad"), *STF, *data, "--class_conditional",
                        "--label_column", "nope"])


def test_sequence_aware_trains_on_the_labels_and_saves_a_class_conditional_pipeline(tmp_path, unet_labels):
    from diffusers import DDPMScheduler

    out = tmp_path / "run"
    train_sequence_aware.main(["--output_dir", str(out), *SA, "--class_conditional", "--label_dropout", "0.3",
                               "--stf", "--stf_reference_batch_size", "24"])
    check_dropped(unet_labels["train"], expected_labels(sklearn_digit_labels(), 2), null_label=10)
    assert unet_labels["eval"][0].tolist() == GRID_LABELS_9  # the DDIM grid: row r asks for class r
    pipe = EDMPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, DDPMScheduler) and pipe.config.null_class_label == 10
    images = pipe(batch_size=2, num_inference_steps=3, class_labels=[1, 2], guidance_scale=2.0,
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


# --- resume, sample grids --------------------------------------------------------------------------------------------

def unet_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


def test_a_class_conditional_stf_run_resumes_bit_identically(tmp_path, monkeypatch):
    common = [*RUN, "--class_conditional", "--label_dropout", "0.3", "--loss", "stf", "--stf_reference_batch_size",
              "24", "--max_train_steps", "4", "--checkpointing_steps", "2", "--num_validation_images", "4"]
    train_stf.main(["--output_dir", str(tmp_path / "straight"), *common])
    original = Trainer.micro_batch

    def interrupt_at_step_4(self, micro_step):
        if micro_step == 3:
            raise KeyboardInterrupt
        return original(self, micro_step)

    monkeypatch.setattr(Trainer, "micro_batch", interrupt_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_stf.main(["--output_dir", str(tmp_path / "resumed"), *common])
    monkeypatch.setattr(Trainer, "micro_batch", original)
    assert [step for step, _ in list_checkpoints(str(tmp_path / "resumed"))] == [2]
    resume = ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match="label_dropout: checkpoint 0.3, now 0.2"):  # the fingerprint has the flags
        train_stf.main([*resume, *common, "--label_dropout", "0.2"])
    with pytest.raises(ValueError, match="num_class_embeds"):  # an unconditional resume is another model
        train_stf.main([*resume, *[a for a in common if a not in ("--class_conditional", "--label_dropout", "0.3")]])
    train_stf.main([*resume, *common])
    for sub in ("unet", "checkpoint-2/model", "checkpoint-4/model", "checkpoint-4/ema"):
        a, b = unet_weights(tmp_path / "straight" / sub), unet_weights(tmp_path / "resumed" / sub)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), sub


def conditional_pipeline(num_classes=10):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=num_classes + 1)
    return EDMPipeline(unet.eval(), EDMHeunScheduler(), null_class_label=num_classes)


@pytest.mark.parametrize("num_images,num_classes,rows", [
    (16, 10, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]),
    (12, 2, [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]),  # more rows than classes: row r asks for class r mod K
])
def test_the_sample_grid_has_class_r_in_row_r(tmp_path, unet_labels, num_images, num_classes, rows):
    from diffusers_stf.training import sample_grid

    path = sample_grid(conditional_pipeline(num_classes), str(tmp_path / "grid.png"), num_images, 2)
    assert unet_labels["eval"][0].tolist() == rows
    with Image.open(path) as grid:  # 4 cells of 8 px upscaled to 64 px per row, 1 px padding
        assert grid.width == 4 * 64 + 5 and grid.height == math.ceil(num_images / 4) * 65 + 1


# --- sampling a class-conditional folder -------------------------------------------------------------------------------

def test_generate_asks_image_i_for_class_i_mod_k_and_guides(tmp_path, unet_labels):
    folder, guide = tmp_path / "pipe", tmp_path / "guide"
    conditional_pipeline().save_pretrained(str(folder))
    torch.manual_seed(1)
    EDMPipeline(UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                            layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4),
                EDMHeunScheduler()).save_pretrained(str(guide))
    common = ["--pipeline", str(folder), "--num_images", "6", "--num_inference_steps", "2", "--format", "npz"]
    generate.main([*common, "--output_dir", str(tmp_path / "a"), "--seed", "7"])
    assert unet_labels["eval"][0].tolist() == [7, 8, 9, 0, 1, 2]  # seed s asks for class s mod 10
    unet_labels["eval"].clear()
    generate.main([*common, "--output_dir", str(tmp_path / "b"), "--class_labels", "4", "--guidance_scale", "3"])
    assert unet_labels["eval"][0].tolist() == [4] * 6 + [10] * 6  # CFG: the null rows in the same forward pass
    settings = json.loads((tmp_path / "b" / "generate_config.json").read_text())
    assert settings["class_labels"] == 4 and settings["pipeline_kwargs"] == {"guidance_scale": 3.0}

    generate.main([*common, "--output_dir", str(tmp_path / "c"), "--guide_unet", str(guide), "--autoguidance_scale",
                   "2", "--guidance_interval", "0,100"])
    with np.load(tmp_path / "c" / "samples.npz") as archive:
        autoguided = archive["samples"]
    pipe = EDMPipeline.from_pretrained(str(folder))
    pipe = EDMPipeline(pipe.unet, pipe.scheduler, guide_unet=UNet2DModel.from_pretrained(str(guide), subfolder="unet"),
                       null_class_label=10)

    def direct(**kwargs):  # image i: seed i, class i, as an uint8 NHWC array
        images = pipe(batch_size=6, num_inference_steps=2, class_labels=torch.arange(6), output_type="pt",
                      generator=[torch.Generator().manual_seed(s) for s in range(6)], **kwargs).images
        return to_uint8(images * 2 - 1)

    expected = direct(autoguidance_scale=2.0, guidance_interval=(0.0, 100.0))
    assert np.array_equal(autoguided, expected) and not np.array_equal(expected, direct())

    unconditional = tmp_path / "unconditional"
    EDMPipeline.from_pretrained(str(guide)).save_pretrained(str(unconditional))
    with pytest.raises(ValueError, match="--class_labels 3: the pipeline's unet is not class-conditional"):
        generate.main(["--pipeline", str(unconditional), "--output_dir", str(tmp_path / "d"), "--class_labels", "3"])


# --- bad input ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--class_conditional", "--label_dropout", "1"], "--label_dropout must be < 1, got 1.0"),
    (["--class_conditional", "--label_dropout", "-0.1"], "--label_dropout must be >= 0, got -0.1"),
    (["--label_dropout", "0.2"], "--label_dropout only applies to class-conditional training"),
    (["--class_conditional", "--label_column", "digit"], "--label_column 'digit' is not a column of the embedded digits"),
])
def test_bad_class_conditional_flags_name_the_flag(tmp_path, argv, message):
    for script, base in ((train_stf, STF), (train_sequence_aware, SA)):
        with pytest.raises(ValueError, match=message):
            script.main(["--output_dir", str(tmp_path / script.__name__), *base, *argv])


def test_class_conditional_training_on_images_without_labels_is_refused(tmp_path):
    flat = tmp_path / "flat"  # no class subfolders: the imagefolder builder gives no label column
    flat.mkdir()
    for j in range(16):
        Image.new("L", (8, 8), 10 * j).save(flat / f"{j}.png")
    with pytest.raises(ValueError, match="--class_conditional needs labelled images"):
        train_stf.main(["--output_dir", str(tmp_path / "run"), *STF, "--train_data_dir", str(flat),
                        "--cache_dir", str(tmp_path / "cache"), "--class_conditional"])


def test_a_label_column_that_holds_no_classes_is_refused():
    import datasets

    from diffusers_stf.training import read_labels

    ds = datasets.Dataset.from_dict({"label": [0, -1, 2], "score": [0.5, 0.1, 0.9], "name": ["b", "a", "b"]})
    with pytest.raises(ValueError, match="--label_column 'label' has negative labels"):
        read_labels(ds, "label")
    assert read_labels(ds) == (None, None)  # the default column is read only when it holds classes
    with pytest.raises(ValueError, match="--label_column 'score' holds"):
        read_labels(ds, "score")
    labels, names = read_labels(ds, "name")  # strings: classes in sorted order
    assert labels.tolist() == [1, 0, 1] and names == ["a", "b"]


# --- class-matched STF targets -----------------------------------------------------------------------------------------

def test_class_conditional_stf_targets_average_the_references_of_the_class():
    from diffusers_stf.losses import stable_target_field

    g = torch.Generator().manual_seed(0)
    refs = torch.randn(12, 3, 2, 2, generator=g, dtype=torch.float64)
    ref_labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0, 1])
    noisy = torch.randn(5, 3, 2, 2, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.3, 1.0, 2.0, 0.7, 5.0], dtype=torch.float64)
    labels = torch.tensor([0, 2, 3, 1, 3])  # 3: the null label
    target = stable_target_field(noisy, sigma, refs, labels=labels, reference_labels=ref_labels, null_label=3)
    for i in range(5):  # the posterior mean under the class's empirical distribution, written out
        members = [j for j in range(12) if labels[i] == 3 or ref_labels[j] == labels[i]]
        logw = torch.tensor([-((noisy[i] - refs[j]) ** 2).sum() / (2 * sigma[i] ** 2) for j in members])
        w = torch.exp(logw - logw.max())
        expected = sum(wj * refs[j] for wj, j in zip(w / w.sum(), members))
        torch.testing.assert_close(target[i], expected, rtol=1e-10, atol=1e-12)


def test_a_class_with_one_reference_makes_the_stf_loss_the_plain_loss():
    """When each row's class holds only its own image among the references, the class-conditional stable target is
    the clean image, so the STF losses equal their plain losses with the same draws."""
    from diffusers_stf.losses import EDMLoss, SequenceAwareLoss, StableTargetFieldLoss

    g = torch.Generator().manual_seed(1)
    images, extras = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.rand(6, 1, 8, 8, generator=g) * 2 - 1
    labels, extra_labels = torch.tensor([0, 1, 2, 3]), torch.full((6,), 4)
    unet = conditional_pipeline(5).unet
    base = EDMLoss()
    draws = dict(sigma=torch.tensor([0.5, 1.0, 2.0, 4.0]), noise=torch.randn(4, 1, 8, 8, generator=g))
    plain = base(base.denoiser(unet), images, class_labels=labels, **draws).loss
    stf = StableTargetFieldLoss(base, reference_batch_size=10)(base.denoiser(unet), images, extras, class_labels=labels,
                                                               labels=labels, extra_reference_labels=extra_labels,
                                                               null_label=5, **draws).loss
    torch.testing.assert_close(stf, plain, rtol=1e-5, atol=1e-6)
    unconditional = StableTargetFieldLoss(base, reference_batch_size=10)(base.denoiser(unet), images, extras,
                                                                         class_labels=labels, **draws).loss
    assert (unconditional - plain).abs().max() > 1e-3  # all ten references: another target

    sa = SequenceAwareLoss(torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), num_steps=2, sa_lambda=1.0)
    plain = sa(unet, images, class_labels=labels, generator=torch.Generator().manual_seed(2)).loss
    stf = sa(unet, images, class_labels=labels, generator=torch.Generator().manual_seed(2),
             reference_images=torch.cat([images, extras]), reference_labels=torch.cat([labels, extra_labels]),
             null_label=5).loss
    torch.testing.assert_close(stf, plain, rtol=1e-4, atol=1e-5)


# --- the guide's EMA ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rampup_ratio", [0.05, 0.117])
def test_the_ramp_up_half_life_ema_has_edm2s_power_function_length(rampup_ratio):
    """Replay the EMA of ``ema_beta`` over 20000 one-image steps, read off the weight of each step's parameters, and
    compare the relative standard deviation of that profile with EDM2's σ_rel of the exponent γ = ln 2 / r − 1."""
    from diffusers_stf.training import ema_beta, halflife_ema_std, rampup_ratio_for_std

    steps = 20_000
    betas = np.array([ema_beta(k, 1, halflife_kimg=1e6, rampup_ratio=rampup_ratio) for k in range(steps)])
    # the parameters after step k enter with (1 − β_k)·Π_{j>k} β_j
    later = np.concatenate([np.cumprod(betas[::-1])[::-1][1:], [1.0]])
    weights = (1 - betas) * later
    times = np.arange(1, steps + 1) / steps
    mean = (weights * times).sum() / weights.sum()
    std = math.sqrt((weights * (times - mean) ** 2).sum() / weights.sum())
    gamma = math.log(2) / rampup_ratio - 1
    sigma_rel = math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))
    assert weights.sum() == pytest.approx(1.0, abs=1e-9)
    assert std == pytest.approx(sigma_rel, rel=0.01)
    assert halflife_ema_std(rampup_ratio) == pytest.approx(sigma_rel, rel=1e-12)
    assert rampup_ratio_for_std(sigma_rel) == pytest.approx(rampup_ratio, rel=1e-9)
