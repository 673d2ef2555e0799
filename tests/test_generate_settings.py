"""examples/generate.py's settings check: a folder holds the images of one model and one set of settings, and a
folder without images holds nothing to protect."""

import importlib.util
import os

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

pytestmark = pytest.mark.usefixtures("one_thread")


def load_generate():
    spec = importlib.util.spec_from_file_location("example_generate", os.path.join(EXAMPLES, "generate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_pipeline(folder, seed):
    from diffusers_stf import EDMHeunScheduler, EDMPipeline

    from conftest import make_tiny_unet

    EDMPipeline(make_tiny_unet(seed=seed), EDMHeunScheduler()).save_pretrained(folder)


def pngs(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".png"))


def test_a_corrected_rerun_after_a_failed_first_call_is_not_refused(tmp_path):
    generate = load_generate()
    pipeline, out = str(tmp_path / "pipe"), str(tmp_path / "samples")
    save_pipeline(pipeline, seed=0)
    common = ["--pipeline", pipeline, "--output_dir", out, "--num_inference_steps", "2", "--num_images", "2"]
    with pytest.raises(TypeError, match="not_an_option"):  # the pipeline refuses the keyword: nothing is drawn
        generate.main(common + ["--pipeline_kwargs", '{"not_an_option": 1}'])
    assert pngs(out) == []
    result = generate.main(common)
    assert result["generated"] == 2 and pngs(out) == ["000000.png", "000001.png"]


def test_a_pipeline_retrained_in_place_does_not_mix_into_the_folder(tmp_path):
    from diffusers_stf.evaluation import load_images

    generate = load_generate()
    pipeline, out = str(tmp_path / "pipe"), str(tmp_path / "samples")
    save_pipeline(pipeline, seed=0)
    common = ["--pipeline", pipeline, "--output_dir", out, "--num_inference_steps", "2"]
    generate.main(common + ["--num_images", "2"])
    first = load_images(out)
    save_pipeline(pipeline, seed=1)  # the same folder, the same config, other weights
    with pytest.raises(ValueError, match=r"other settings.*pipeline_weights"):
        generate.main(common + ["--num_images", "4"])
    assert pngs(out) == ["000000.png", "000001.png"]
    torch.testing.assert_close(load_images(out), first, rtol=0, atol=0)
    # the same weights saved again (a re-save, not a retraining) are the same model
    fresh = str(tmp_path / "fresh")
    save_pipeline(pipeline, seed=0)
    assert generate.main(common + ["--num_images", "4"])["generated"] == 2
    generate.main(["--pipeline", pipeline, "--output_dir", fresh, "--num_inference_steps", "2", "--num_images", "4"])
    torch.testing.assert_close(load_images(out), load_images(fresh), rtol=0, atol=0)
