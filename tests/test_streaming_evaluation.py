"""Streaming evaluation of a pipeline: the accumulated statistics equal the two-pass ones, a killed run resumes to the
same result, settings are checked on resume, and evaluate_pipeline (what a training loop calls) scores a pipeline."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import make_tiny_unet
from diffusers_stf.evaluation import (
    class_statistics,
    compute_features,
    evaluate_pipeline,
    frechet_distance,
    generate_images,
    kernel_inception_distance,
    load_feature_extractor,
    load_pipeline,
    quantize,
    reference_statistics,
    stream_features,
)

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
STEPS = 2


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from diffusers_stf import EDMHeunScheduler, EDMPipeline

    folder = str(tmp_path_factory.mktemp("pipe") / "edm")
    EDMPipeline(make_tiny_unet(), EDMHeunScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def extractor():
    return load_feature_extractor("digits")


def two_pass(pipe, extractor, num_images, seed):
    """Generate everything, then embed everything, then the statistics (np.mean, np.cov)."""
    images = generate_images(pipe, num_images, STEPS, seed=seed, batch_size=num_images, progress=False)["images"]
    features, logits = compute_features(extractor, quantize(images))
    return features, logits, features.mean(0), np.cov(features, rowvar=False)


def test_streaming_statistics_equal_the_two_pass_statistics(tiny_pipeline, extractor, tmp_path):
    pipe = load_pipeline(tiny_pipeline)
    accumulator = stream_features(pipe, extractor, 70, STEPS, seed=3, batch_size=16, state_dir=str(tmp_path / "s"),
                                  checkpoint_every=2, progress=False)  # fmt: skip
    features, logits, mu, sigma = two_pass(pipe, extractor, 70, seed=3)
    stream_mu, stream_sigma = accumulator.statistics()
    np.testing.assert_allclose(stream_mu, mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stream_sigma, sigma, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(accumulator.features().double().numpy(), features, rtol=0, atol=1e-6)
    expected = class_statistics(logits)
    streamed = accumulator.class_statistics()
    assert streamed["class_histogram"] == expected["class_histogram"]
    assert streamed["confidence"] == pytest.approx(expected["confidence"], rel=1e-6)
    assert streamed["class_entropy"] == pytest.approx(expected["class_entropy"], rel=1e-9)
    # the checkpoints tile the images: 2 batches of 16 per part, then the rest
    parts = sorted(f for f in os.listdir(tmp_path / "s") if f.startswith("features-"))
    assert parts == [f"features-{a:09d}-{b:09d}.safetensors" for a, b in ((0, 32), (32, 64), (64, 70))]


def test_evaluate_pipeline_equals_generate_then_evaluate(tiny_pipeline, tmp_path):
    generate, evaluate = _load_example("generate"), _load_example("evaluate")
    common = ["--num_images", "70", "--seed", "5", "--batch_size", "32", "--num_inference_steps", str(STEPS),
              "--device", "cpu"]  # fmt: skip
    generate.main(["--pipeline", tiny_pipeline, "--output_dir", str(tmp_path / "png"), "--format", "npz"] + common)
    scoring = ["--reference", "digits:heldout", "--cache_dir", str(tmp_path / "cache"), "--kid_subsets", "10"]
    from_files = evaluate.main([str(tmp_path / "png" / "samples.npz"), "--num_images", "70"] + scoring)
    streamed = evaluate.main(["--pipeline", tiny_pipeline, "--state_dir", str(tmp_path / "state")] + common + scoring)
    assert streamed["num_images"] == from_files["num_images"] == 70
    for key in ("fd", "kid", "kid_se", "precision", "recall"):
        assert streamed[key]["digits:heldout"] == pytest.approx(from_files[key]["digits:heldout"], rel=1e-6), key
    assert streamed["class_histogram"] == from_files["class_histogram"]
    with open(tmp_path / "state" / "metrics.json") as f:
        assert json.load(f)["fd"]["digits:heldout"] == pytest.approx(streamed["fd"]["digits:heldout"])


def test_a_run_killed_after_some_batches_resumes_to_the_uninterrupted_result(tiny_pipeline, extractor, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    import diffusers_stf.evaluation.streaming as streaming

    pipe = load_pipeline(tiny_pipeline)
    whole = stream_features(pipe, extractor, 60, STEPS, batch_size=10, progress=False)
    drawn, original = [], streaming.generate_batch

    def killed_at_the_fifth_batch(pipe, seeds, *args, **kwargs):
        if len(drawn) == 4:
            raise KeyboardInterrupt("killed")
        drawn.append(list(seeds))
        return original(pipe, seeds, *args, **kwargs)

    monkeypatch.setattr(streaming, "generate_batch", killed_at_the_fifth_batch)
    state = str(tmp_path / "state")
    with pytest.raises(KeyboardInterrupt):
        stream_features(pipe, extractor, 60, STEPS, batch_size=10, state_dir=state, checkpoint_every=3, progress=False)
    monkeypatch.setattr(streaming, "generate_batch", lambda p, seeds, *a, **k: drawn.append(list(seeds)) or original(p, seeds, *a, **k))
    drawn.clear()
    resumed = stream_features(pipe, extractor, 60, STEPS, batch_size=7, state_dir=state, checkpoint_every=3,
                              progress=False)  # fmt: skip
    assert [s for batch in drawn for s in batch] == list(range(30, 60))  # from the checkpoint at 30, in batches of 7
    # equal up to float32 round-off: the networks' arithmetic depends on the batch size (7 vs 10) in the last bits
    for a, b in zip(resumed.statistics(), whole.statistics()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(resumed.features().numpy(), whole.features().numpy(), rtol=0, atol=1e-5)
    resumed_classes, whole_classes = resumed.class_statistics(), whole.class_statistics()
    assert resumed_classes["class_histogram"] == whole_classes["class_histogram"]
    assert resumed_classes["confidence"] == pytest.approx(whole_classes["confidence"], rel=1e-6)
    # a finished state answers a rerun without generating, and a larger run adds only the missing images
    drawn.clear()
    stream_features(pipe, extractor, 60, STEPS, batch_size=10, state_dir=state, progress=False)
    assert drawn == []
    assert stream_features(pipe, extractor, 65, STEPS, batch_size=10, state_dir=state, progress=False).num_images == 65
    assert [s for batch in drawn for s in batch] == list(range(60, 65))
    with pytest.raises(ValueError, match="already holds 65 images, more than num_images = 50"):
        stream_features(pipe, extractor, 50, STEPS, state_dir=state, progress=False)


KILL_CHILD = r"""
import os, signal, sys, runpy
import safetensors.torch

nth, script = int(sys.argv[1]), sys.argv[2]
calls, original = [0], safetensors.torch.save_file


def save_file(tensors, filename, metadata=None):
    calls[0] += 1
    if calls[0] == nth:  # a SIGKILL in the middle of the write: half of the bytes under the file's (temporary) name
        original(tensors, filename, metadata=metadata)
        with open(filename, "rb") as f:
            data = f.read()
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return original(tensors, filename, metadata=metadata)


safetensors.torch.save_file = save_file
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def test_a_run_killed_mid_checkpoint_resumes_to_the_uninterrupted_result(tiny_pipeline, tmp_path):
    # Writes: part 0-16, sums (16), part 16-32, sums (32) ... The 4th write is killed: the state says 16 images and
    # a whole part 16-32 lies beside it, which the resume must drop.
    options = ["--pipeline", tiny_pipeline, "--num_images", "70", "--batch_size", "16", "--checkpoint_every", "1",
               "--num_inference_steps", str(STEPS), "--device", "cpu", "--reference", "digits:heldout",
               "--cache_dir", str(tmp_path / "cache"), "--kid_subsets", "10"]  # fmt: skip
    state = str(tmp_path / "state")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(EXAMPLES), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, "4", os.path.join(EXAMPLES, "evaluate.py"),
                            "--state_dir", state, *options], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert child.returncode == -9, child.stderr[-2000:]
    assert any(f.endswith(".partial") for f in os.listdir(state))  # the half-written sums
    evaluate = _load_example("evaluate")
    resumed = evaluate.main(["--state_dir", state] + options)
    fresh = evaluate.main(["--state_dir", str(tmp_path / "fresh")] + options)
    for key in ("fd", "kid", "precision", "recall"):
        assert resumed[key]["digits:heldout"] == pytest.approx(fresh[key]["digits:heldout"], rel=1e-9), key
    assert sorted(os.listdir(state)) == sorted(os.listdir(tmp_path / "fresh"))  # no temporaries, no orphan parts


def test_resuming_with_other_settings_is_refused_naming_them(tiny_pipeline, tmp_path):
    evaluate = _load_example("evaluate")
    options = ["--pipeline", tiny_pipeline, "--num_images", "20", "--batch_size", "10", "--device", "cpu",
               "--state_dir", str(tmp_path / "state"), "--reference", "digits:heldout",
               "--cache_dir", str(tmp_path / "cache"), "--kid_subsets", "5"]  # fmt: skip
    evaluate.main(options + ["--num_inference_steps", "2"])
    with pytest.raises(ValueError, match=r"other settings \(num_inference_steps: 2 -> 3\)"):
        evaluate.main(options + ["--num_inference_steps", "3"])
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 -> 1\)"):
        evaluate.main(options + ["--num_inference_steps", "2", "--seed", "1"])
    from diffusers_stf import EDMHeunScheduler, EDMPipeline

    retrained = str(tmp_path / "retrained")
    EDMPipeline(make_tiny_unet(seed=1), EDMHeunScheduler()).save_pretrained(retrained)
    with pytest.raises(ValueError, match=r"other settings \(pipeline_files: "):
        evaluate.main(options[2:] + ["--pipeline", retrained, "--num_inference_steps", "2"])
    # the default state folder is keyed by the settings: another sampler gets its own
    default = ["--pipeline", tiny_pipeline, "--num_images", "20", "--device", "cpu", "--reference", "digits:heldout",
               "--cache_dir", str(tmp_path / "cache"), "--kid_subsets", "5", "--num_inference_steps", "2"]  # fmt: skip
    first = evaluate.main(default)
    second = evaluate.main(default + ["--scheduler", "stochastic", "--s_churn", "10"])
    assert first["state_dir"] != second["state_dir"]
    assert os.path.dirname(first["state_dir"]) == os.path.join(tiny_pipeline, "eval_state")


def test_evaluate_pipeline_scores_a_pipeline_like_the_two_pass_computation(tiny_pipeline, extractor, tmp_path):
    pipe = load_pipeline(tiny_pipeline)
    reference = reference_statistics(extractor, "digits:heldout", cache_dir=str(tmp_path))
    result = evaluate_pipeline(pipe, 80, reference, extractor, num_inference_steps=STEPS, seed=2, batch_size=32,
                               kid_subsets=10)  # fmt: skip
    features, _, mu, sigma = two_pass(pipe, extractor, 80, seed=2)
    assert result["fd"] == pytest.approx(frechet_distance(mu, sigma, reference["mu"], reference["sigma"]), rel=1e-6)
    kid, std = kernel_inception_distance(features, reference["features"], num_subsets=10)
    assert result["kid"] == pytest.approx(kid, rel=1e-6) and result["kid_std"] == pytest.approx(std, rel=1e-5)
    assert result["num_images"] == 80 and result["seconds"] > 0 and "fd_undefined" not in result
    # fewer images than feature dimensions: no FD, a reason, and KID all the same
    with pytest.warns(UserWarning, match="FD is undefined for 40 images of 64-d features.*KID"):
        small = evaluate_pipeline(pipe, 40, "digits:heldout", extractor, num_inference_steps=STEPS, kid_subsets=10,
                                  cache_dir=str(tmp_path))  # fmt: skip
    assert small["fd"] is None and "at least 65 samples" in small["fd_undefined"]
    assert np.isfinite(small["kid"])


def test_accumulator_update_does_not_synchronise_and_rejects_bad_shapes(extractor):
    from diffusers_stf.evaluation import FeatureAccumulator

    accumulator = FeatureAccumulator(64, 10)
    with pytest.raises(ValueError, match=r"shape \(B, 64\)"):
        accumulator.update(torch.zeros(3, 32), torch.zeros(3, 10))
    with pytest.raises(ValueError, match="logits"):
        accumulator.update(torch.zeros(3, 64))
    with pytest.raises(ValueError, match="at least 2 images"):
        FeatureAccumulator(4).statistics()
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call in update raises
        try:
            on_gpu = FeatureAccumulator(64, 10, device="cuda")
            on_gpu.update(torch.rand(8, 64, device="cuda"), torch.rand(8, 10, device="cuda"))
        finally:
            torch.cuda.set_sync_debug_mode(0)
