"""``--architecture unet2d|ddpmpp|ncsnpp|adm|edm2`` in the training scripts: each network trains on the digits, resumes
bit-identically, saves a folder that the package and plain diffusers load and sample, takes the script's class and
augmentation conditioning, and refuses the flags of other architectures; the presets of docs/training.md parse, build
and (the digits ones) train."""

import argparse
import importlib.util
import json
import os
import re
import shlex
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_stf import EDMPipeline
from diffusers_stf.training import Trainer, list_checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"{name}_architectures", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_stf = load_example("train_stf")
train_sequence_aware = load_example("train_sequence_aware")
train_score_model = load_example("train_score_model")

COMMON = ["--train_batch_size", "16", "--stf_reference_batch_size", "48", "--num_validation_images", "4",
          "--num_inference_steps", "2", "--no_progress_bar", "--logging_steps", "2", "--validation_steps", "0",
          "--lr_warmup_steps", "2", "--report_to", "none", "--max_train_samples", "64"]
# tiny networks, and each architecture with one more feature of the script
CASES = {
    "unet2d": ["--block_out_channels", "8,16", "--norm_num_groups", "8", "--augment_p", "0.5"],
    "ddpmpp": ["--model_channels", "8", "--class_conditional", "--label_dropout", "0.2", "--dropout", "0.1"],
    "ncsnpp": ["--model_channels", "8", "--attn_resolutions", "8"],
    "adm": ["--model_channels", "8", "--augment_p", "0.5", "--num_blocks", "2"],
    "edm2": ["--model_channels", "8", "--channels_per_head", "16", "--loss", "edm2"],
}
CLASSES = {"unet2d": "AugmentConditionedUNet2DModel", "ddpmpp": "SongUNet", "ncsnpp": "SongUNet",
           "adm": "DhariwalUNet", "edm2": "EDM2UNet"}

pytestmark = pytest.mark.usefixtures("one_thread")


def run(out, arch, *argv):
    return train_stf.main(["--output_dir", str(out), "--architecture", arch, *COMMON, *CASES[arch], *argv])


def weights(folder):
    return load_file(os.path.join(folder, [f for f in os.listdir(folder) if f.endswith(".safetensors")][0]))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Each architecture trained 4 steps without interruption (checkpoints at 2 and 4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("architectures")
    for arch in CASES:
        run(root / arch, arch, "--max_train_steps", "4", "--checkpointing_steps", "2")
    torch.set_num_threads(threads)
    return root


@pytest.mark.parametrize("arch", list(CASES))
def test_each_architecture_trains_resumes_bit_identically_and_samples(straight, tmp_path, monkeypatch, arch):
    original = Trainer.micro_batch

    def interrupt_in_step_4(self, micro_step):
        if micro_step == 3:
            raise KeyboardInterrupt
        return original(self, micro_step)

    monkeypatch.setattr(Trainer, "micro_batch", interrupt_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", arch, "--max_train_steps", "4", "--checkpointing_steps", "2")
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run"))] == [2]
    monkeypatch.setattr(Trainer, "micro_batch", original)
    run(tmp_path / "run", arch, "--max_train_steps", "4", "--checkpointing_steps", "2", "--resume_from_checkpoint",
        "latest")
    ours, theirs = tmp_path / "run", straight / arch
    assert same(weights(ours / "unet"), weights(theirs / "unet"))  # the EMA of the saved pipeline
    assert same(weights(ours / "checkpoint-4" / "model"), weights(theirs / "checkpoint-4" / "model"))
    assert weights(theirs / "unet").keys() and not same(weights(theirs / "checkpoint-2" / "model"),
                                                        weights(theirs / "checkpoint-4" / "model"))  # it trained

    pipe = EDMPipeline.from_pretrained(str(theirs))
    config = pipe.unet.config
    assert type(pipe.unet).__name__ == CLASSES[arch]
    conditional = arch == "ddpmpp"
    assert config.get("num_class_embeds") == (11 if conditional else None)  # K + 1: the null label of CFG
    assert config.get("augment_dim", 0) == (9 if arch in ("unet2d", "adm") else 0)  # EDM's augmentation labels
    assert (pipe.config.get("null_class_label") == 10) is conditional
    kwargs = {"class_labels": torch.tensor([3, 7]), "guidance_scale": 2.0} if conditional else {}
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                  **kwargs).images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    card = (theirs / "README.md").read_text()
    assert f"`{CLASSES[arch] if arch != 'unet2d' else 'UNet2DModel'}`" in card
    assert ("| `architecture` | `" + arch + "` |" in card) is (arch != "unet2d")


def test_plain_diffusers_loads_every_architecture_and_samples_what_the_package_samples(straight, tmp_path):
    from test_hub import run_blocked

    ours, folders = {}, {}
    for arch in CASES:
        folders[arch] = str(straight / arch)
        pipe = EDMPipeline.from_pretrained(folders[arch])
        pipe.set_progress_bar_config(disable=True)
        kwargs = {"class_labels": torch.tensor([1, 2])} if arch == "ddpmpp" else {}
        ours[arch] = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(5),
                          output_type="pt", **kwargs).images
    out_file = tmp_path / "samples.safetensors"
    result = run_blocked(tmp_path, f"""
        import json, torch
        from diffusers import DiffusionPipeline
        from safetensors.torch import save_file
        out = {{}}
        for arch, folder in json.loads({json.dumps(json.dumps(folders))}).items():
            pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
            pipe.set_progress_bar_config(disable=True)
            kwargs = {{"class_labels": torch.tensor([1, 2])}} if arch == "ddpmpp" else {{}}
            out[arch] = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(5),
                             output_type="pt", **kwargs).images.contiguous()
            assert type(pipe.unet).__module__.startswith("diffusers_modules."), type(pipe.unet)
        save_file(out, {str(out_file)!r})
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = load_file(out_file)
    for arch in CASES:
        torch.testing.assert_close(theirs[arch], ours[arch], rtol=0, atol=1e-6)


def test_the_scripts_conditioning_sets_each_networks_inputs():
    from diffusers_stf.training import UNetConfig
    from diffusers_stf.training.network import NetworkConfig, make_network

    for arch in ("unet2d", "ddpmpp", "ncsnpp", "adm", "edm2"):
        size = {} if arch == "unet2d" else {"model_channels": 8, "channels_per_head": 16} if arch == "edm2" else \
            {"model_channels": 8}
        unet = UNetConfig(block_out_channels=(8, 16), norm_num_groups=8)
        model = make_network(NetworkConfig(arch, **size), unet, 8, 3, num_class_embeds=11)
        assert model.config.num_class_embeds == 11 and model.config.in_channels == model.config.out_channels == 3
        x = torch.randn(2, 3, 8, 8)
        assert model(x, torch.tensor([0.1, -0.3]), class_labels=torch.tensor([0, 10])).sample.shape == x.shape
        if arch == "edm2":
            with pytest.raises(ValueError, match="--augment_p.*EDM2"):
                make_network(NetworkConfig(arch, **size), unet, 8, 3, augment_dim=9)
            continue
        model = make_network(NetworkConfig(arch, **size), unet, 8, 3, augment_dim=9)
        assert model.config.augment_dim == 9
        labels = torch.zeros(2, 9)
        torch.manual_seed(0)
        with_zero = model(x, torch.tensor([0.1, -0.3]), augment_labels=labels).sample
        assert torch.equal(with_zero, model(x, torch.tensor([0.1, -0.3])).sample)  # zero labels: no augmentation


def parse(argv):
    parser = train_stf.build_parser()
    from diffusers_stf.training import parse_training_args

    return parse_training_args(parser, argv)


@pytest.mark.parametrize("argv,message", [
    (["--architecture", "ddpmpp", "--block_out_channels", "32,64"], "--block_out_channels does not apply to "
                                                                    "--architecture ddpmpp"),
    (["--architecture", "edm2", "--norm_num_groups", "8", "--attention_levels", "1"],
     "--attention_levels, --norm_num_groups do not apply to --architecture edm2"),
    (["--model_channels", "64"], "--model_channels does not apply to --architecture unet2d"),
    (["--architecture", "adm", "--channels_per_head", "32"], "--channels_per_head does not apply"),
    (["--architecture", "resnet"], "--architecture"),
    (["--architecture", "ddpmpp", "--channel_mult", "1,0"], "--channel_mult must be >= 1"),
    (["--lr_ref_steps", "100"], "--lr_ref_steps sets the decay of --lr_scheduler inverse_sqrt"),
])
def test_flags_of_another_architecture_are_refused_naming_them(argv, message):
    with pytest.raises((ValueError, SystemExit)) as info:
        parse(argv)
    if info.type is ValueError:
        assert message in str(info.value)


@pytest.mark.parametrize("argv,message", [
    (["--architecture", "edm2", "--augment_p", "0.1"], "--augment_p conditions the network"),
    (["--architecture", "ddpmpp", "--attn_resolutions", "16"], r"--attn_resolutions \(16,\): \[16\] are not"),
    (["--loss", "edm", "--stf_base_loss", "edm2"], "--stf_base_loss chooses the loss under STF's target"),
    (["--loss", "edm2", "--precond", "vp"], "--precond must be edm"),
    (["--stf_base_loss", "edm2", "--precond", "ve"], "--stf_base_loss edm2 is EDM2's loss"),
    (["--P_preset", "edm2_img64", "--P_std", "1.0"], "drop --P_std"),
])
def test_bad_combinations_are_refused_before_training(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message):
        train_stf.main(["--output_dir", str(tmp_path / "run"), *COMMON, "--max_train_steps", "1", *argv])
    assert not list_checkpoints(str(tmp_path / "run"))


@pytest.mark.parametrize("arch", ["ncsnpp", "edm2"])
def test_ddpm_training_refuses_fourier_noise_embeddings(tmp_path, arch):
    with pytest.raises(ValueError, match=f"--architecture {arch}: a DDPM network takes the step index"):
        train_sequence_aware.main(["--output_dir", str(tmp_path), "--architecture", arch, "--max_train_steps", "1"])


def test_ddpm_and_score_scripts_train_edm_networks(tmp_path):
    out = tmp_path / "sa"
    train_sequence_aware.main(["--output_dir", str(out), "--architecture", "ddpmpp", "--model_channels", "8",
                               "--max_train_steps", "2", "--train_batch_size", "16", "--num_validation_images", "4",
                               "--num_inference_steps", "2", "--no_progress_bar", "--validation_steps", "0",
                               "--report_to", "none"])
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"][1] == "SongUNet" and index["scheduler"][1] == "DDPMScheduler"  # an EDMPipeline folder
    pipe = EDMPipeline.from_pretrained(str(out))
    images = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert np.isfinite(images).all()
    assert "DDPM++ network (`SongUNet`" in (out / "README.md").read_text()

    out = tmp_path / "score"
    train_score_model.main(["--output_dir", str(out), "--architecture", "ncsnpp", "--model_channels", "8",
                            "--max_train_steps", "1", "--train_batch_size", "16", "--num_validation_images", "2",
                            "--steps_per_level", "1", "--num_inference_steps", "2", "--no_progress_bar",
                            "--report_to", "none"])
    assert json.loads((out / "unet" / "config.json").read_text())["_class_name"] == "SongUNet"
    assert "from diffusers_stf.models import SongUNet" in (out / "README.md").read_text()


# --- the presets of docs/training.md -------------------------------------------------------------------------------

def doc_presets():
    """{name: argv} of the preset table of docs/training.md: rows ``| name | `accelerate launch ... train_stf.py
    FLAGS` |``."""
    text = open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8").read()
    rows = re.findall(r"^\| (\S[^|]*?) \| `accelerate launch examples/train_stf\.py ([^`]*)` \|", text, re.M)
    return {name.strip(): shlex.split(flags) for name, flags in rows}


PRESETS = doc_presets()
SHAPES = {"CIFAR": (32, 3), "ADM": (64, 3), "EDM2": (64, 3), "digits": (8, 1)}


def test_the_docs_list_every_preset():
    names = list(PRESETS)
    for expected in ("DDPM++ CIFAR-10 uncond", "DDPM++ CIFAR-10 cond", "NCSN++ CIFAR-10 uncond",
                     "NCSN++ CIFAR-10 cond", "ADM ImageNet-64", "EDM2-XS ImageNet-64", "EDM2-S ImageNet-64"):
        assert expected in names, names
    assert sum(name.endswith("digits") for name in names) == 5


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.endswith("digits")])
def test_paper_presets_parse_and_build_the_papers_networks(name):
    from diffusers_stf.training.network import make_network

    argv = [a for a in PRESETS[name] if not a.startswith("$")]
    argv = [a for i, a in enumerate(argv) if not (i and argv[i - 1] in ("--train_data_dir", "--dataset_name"))
            and a not in ("--train_data_dir", "--dataset_name")]
    _, config = parse(argv)
    size, channels = next(v for k, v in SHAPES.items() if k in name)
    with torch.device("meta"):
        model = make_network(config.network, config.unet, size, channels,
                             num_class_embeds=1001 if "cond" in name and "uncond" not in name or "ImageNet" in name
                             else None)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    # the papers' counts (EDM Table 7: 55.73M, 56.38M, 295.90M; EDM2 Table 2/3: XS 125M, S 280M), with ImageNet's
    # 1000 classes
    expected = {"DDPM++ CIFAR-10": 55.7, "NCSN++ CIFAR-10": 56.4, "ADM ImageNet-64": 296.0, "EDM2-XS": 124.6,
                "EDM2-S": 280.2}
    key = next(k for k in expected if name.startswith(k))
    assert count == pytest.approx(expected[key], rel=0.03), (name, count)


@pytest.mark.parametrize("name", [n for n in PRESETS if n.endswith("digits")])
def test_digits_presets_train_and_sample(tmp_path, name):
    argv = [*PRESETS[name], "--output_dir", str(tmp_path / "run"), "--max_train_steps", "2",
            "--num_validation_images", "2", "--num_inference_steps", "2", "--no_progress_bar", "--report_to", "none"]
    train_stf.main(drop_repeated(argv))
    pipe = EDMPipeline.from_pretrained(str(tmp_path / "run"))
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def drop_repeated(argv):
    """The last value of each repeated ``--flag value`` (the test's overrides of the preset's length)."""
    out, seen = [], {}
    i = 0
    pairs = []
    while i < len(argv):
        if argv[i].startswith("--") and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            pairs.append((argv[i], argv[i + 1]))
            i += 2
        else:
            pairs.append((argv[i], None))
            i += 1
    for flag, value in pairs:
        seen[flag] = value
    for flag, value in seen.items():
        out += [flag] + ([value] if value is not None else [])
    return out


def test_help_lists_the_architectures():
    parser = train_stf.build_parser()
    text = parser.format_help()
    assert "unet2d" in text and "edm2" in text and "--channel_mult" in text
    assert isinstance(parser, argparse.ArgumentParser) and sys.modules
