"""What a newcomer meets first: ``make demo`` (threads, a rerun of a finished run, the training split), the files a
run writes (strict JSON, the model card) and what the package prints (no noise)."""

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import re
import shlex
import warnings

import pytest
import torch

from diffusers_stf.digits import digits_tensor
from diffusers_stf.training import add_training_args, load_training_images, parse_training_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_STF = ["--block_out_channels", "8,16", "--train_batch_size", "16", "--stf_reference_batch_size", "48",
            "--num_validation_images", "4", "--num_inference_steps", "2", "--no_progress_bar", "--logging_steps", "1",
            "--validation_steps", "0", "--lr_warmup_steps", "2", "--report_to", "none"]


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(folder):
    """Every file under ``folder``: (size, modification time, SHA-256)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = (os.path.getsize(path), os.stat(path).st_mtime_ns,
                                                        hashlib.sha256(f.read()).hexdigest())
    return files


def makefile_demo_command():
    """The demo recipe of the Makefile, its continuation lines joined and its ``NAME ?= value`` variables filled in,
    as shell words."""
    with open(os.path.join(ROOT, "Makefile")) as f:
        text = f.read()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", text, re.M).group(1)
    recipe = recipe.replace("\\\n", " ").replace("\t", " ").replace("$(BIN)/", "")
    for name, value in re.findall(r"^(\w+) \?= (.*)$", text, re.M):
        recipe = recipe.replace(f"$({name})", value.strip())
    return shlex.split(recipe)


# --- make demo ------------------------------------------------------------------------------------------------------

def test_demo_trains_one_thread_with_passive_waits():
    """2 OpenMP threads that spin at every barrier ran 8x slower than 1 thread next to a busy process
    (benchmarks/bench_threads.py, docs/results.md): the demo uses one thread and sleeping waits."""
    words = makefile_demo_command()
    env = dict(w.split("=", 1) for w in words[:words.index("accelerate")] if "=" in w)
    assert env.get("OMP_WAIT_POLICY") == "PASSIVE"
    assert words[words.index("--num_cpu_threads_per_process") + 1] == "1"


def test_rerunning_a_finished_run_changes_nothing_and_says_where_the_results_are(tmp_path, capsys):
    stf = load_example("train_stf")
    out = str(tmp_path / "demo")
    # the last step (3) is not a checkpoint step: a resume would redo it from checkpoint-2
    argv = [*TINY_STF, "--output_dir", out, "--max_train_steps", "3", "--checkpointing_steps", "2",
            "--resume_from_checkpoint", "latest"]
    first = stf.main(argv)
    before = snapshot(out)
    capsys.readouterr()
    again = stf.main(argv)
    printed = capsys.readouterr().out
    assert snapshot(out) == before
    assert "finished" in printed and os.path.abspath(out) in printed and "README.md" in printed
    assert (again.step, again.nimg, again.model_card_path) == (first.step, first.nimg, first.model_card_path)
    with open(os.path.join(out, "README.md")) as f:
        assert "training loss" in f.read()
    # asking for more steps continues the run
    more = stf.main([*argv[:-6], "--output_dir", out, "--max_train_steps", "4", "--checkpointing_steps", "2",
                     "--resume_from_checkpoint", "latest"])
    assert more.step == 4


def test_the_default_digits_are_the_training_split_evaluation_holds_out():
    config = parse_training_args(add_training_args(argparse.ArgumentParser(allow_abbrev=False)), [])[1]
    assert config.data.digits_split == "train"
    data = load_training_images(config.data)
    train, heldout = digits_tensor("train")[0], digits_tensor("heldout")[0]
    served = data.batch(torch.arange(len(data)))["images"]
    assert len(data) == len(train) == 797
    torch.testing.assert_close(served, train, rtol=0, atol=1 / 255)
    seen = {bytes(((image + 1) * 127.5).round().byte().numpy()) for image in served}
    assert not seen & {bytes(((image + 1) * 127.5).round().byte().numpy()) for image in heldout}


# --- strict JSON ----------------------------------------------------------------------------------------------------

def strict_json(text):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_scheduler_config_is_strict_json_and_the_old_form_still_loads(tmp_path):
    from diffusers_stf import EDMHeunScheduler, EDMPipeline, EDMStochasticScheduler

    from conftest import make_tiny_unet

    EDMPipeline(make_tiny_unet(), EDMStochasticScheduler(s_churn=40)).save_pretrained(tmp_path / "pipe")
    with open(tmp_path / "pipe" / "scheduler" / "scheduler_config.json") as f:
        saved = strict_json(f.read())
    assert saved["s_tmax"] is None  # no upper bound

    # None (no upper bound) churns every level at or above s_tmin: γ_i = min(S_churn/N, √2 − 1) everywhere
    scheduler = EDMStochasticScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    scheduler.set_timesteps(5)
    sigmas = scheduler.sigmas[:-1]
    gamma = min(40 / 5, 2**0.5 - 1)
    torch.testing.assert_close(scheduler.sigmas_hat, sigmas * (1 + gamma))
    bounded = EDMStochasticScheduler(s_churn=40, s_tmax=1.0)
    bounded.set_timesteps(5)
    torch.testing.assert_close(bounded.sigmas_hat, torch.where(sigmas <= 1.0, sigmas * (1 + gamma), sigmas))

    # the old form, "s_tmax": Infinity, loads as no upper bound and is saved strict
    old = dict(saved, s_tmax=float("inf"))
    (tmp_path / "old").mkdir()
    with open(tmp_path / "old" / "scheduler_config.json", "w") as f:
        f.write(json.dumps(old))
    assert "Infinity" in (tmp_path / "old" / "scheduler_config.json").read_text()
    loaded = EDMStochasticScheduler.from_pretrained(tmp_path / "old")
    assert loaded.config.s_tmax is None
    loaded.set_timesteps(5)
    torch.testing.assert_close(loaded.sigmas_hat, scheduler.sigmas_hat)
    loaded.save_config(tmp_path / "resaved")
    assert strict_json((tmp_path / "resaved" / "scheduler_config.json").read_text())["s_tmax"] is None
    assert EDMHeunScheduler(s_tmax=float("inf")).config.s_tmax is None
    with pytest.raises(ValueError, match="s_tmax"):
        EDMHeunScheduler(s_tmin=2.0, s_tmax=1.0)


# --- noise ----------------------------------------------------------------------------------------------------------

def test_pyproject_license_is_an_spdx_string_without_a_deprecation_warning():
    import tomllib

    import setuptools
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    path = os.path.join(ROOT, "pyproject.toml")
    with open(path, "rb") as f:
        project = tomllib.load(f)
    assert project["project"]["license"] == "Apache-2.0"
    floor = re.search(r"setuptools>=([0-9.]+)", " ".join(project["build-system"]["requires"])).group(1)
    version = lambda v: tuple(int(x) for x in (v.split(".") + ["0"])[:2])  # noqa: E731
    assert version(floor) >= (77, 0)  # the first setuptools that takes an SPDX expression (PEP 639)
    assert version(setuptools.__version__) >= version(floor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), path)
    assert [str(w.message)[:80] for w in caught if "license" in str(w.message).lower()] == []


def test_a_model_saved_alone_loads_without_the_auto_map_warning(tmp_path, caplog):
    from diffusers import AutoModel
    from diffusers.utils import logging as diffusers_logging

    from diffusers_stf import NoiseConditionalClassifier
    from diffusers_stf.hub import write_model_remote_code

    model = NoiseConditionalClassifier(sample_size=8, in_channels=1, num_classes=3, block_out_channels=(8, 16),
                                       norm_num_groups=4)
    model.save_pretrained(tmp_path)
    write_model_remote_code(model, str(tmp_path))
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            ours = NoiseConditionalClassifier.from_pretrained(str(tmp_path))
            plain = AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True)
    finally:
        diffusers_logging.disable_propagation()
    assert [r.getMessage()[:120] for r in caplog.records if "auto_map" in r.getMessage()] == []
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(ours(x, 0.5).logits, plain(x, 0.5).logits)


def test_defaults_that_differ_from_diffusers_are_one_short_line_each():
    parser = load_example("train_stf").build_parser()
    notes = parse_training_args(parser, [])[1].training.notes
    lines = "\n".join(notes).splitlines()
    assert lines and max(len(line) for line in lines) <= 120
    listed = [line for line in lines if line.startswith("  --")]
    assert any(line.startswith("  --learning_rate 0.001 ") for line in listed)
    assert len(listed) >= 5


def test_the_model_card_and_summary_of_a_cpu_run_without_ema(tmp_path, monkeypatch, capsys):
    stf = load_example("train_stf")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # what `accelerate launch --cpu` sets, without --cpu
    out = str(tmp_path / "run")
    stf.main([*TINY_STF, "--output_dir", out, "--max_train_steps", "2", "--checkpointing_steps", "0",
              "--ema_halflife_kimg", "0"])
    printed = capsys.readouterr().out
    assert "EMA: no EMA" in printed and "EMA weights" not in printed.split("EMA: no EMA")[1]
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert "EDM's EDM" not in card and "EDM's preconditioning" in card
    assert "| `cpu` | `False` |" not in card and "| device | cpu |" in card
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert snippets and not [s for s in snippets if str(tmp_path) in s or os.path.abspath(out) in s]
    assert 'from_pretrained("run"' in "".join(snippets)
    assert "Samples of the EMA" not in card
