"""EDMPipeline: diffusers pipeline conventions on a tiny UNet2DModel."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet
from PIL import Image

from diffusers_stf import EDMHeunScheduler, EDMPipeline, EDMStochasticScheduler


def make_pipe(scheduler=None):
    pipe = EDMPipeline(make_tiny_unet(), scheduler or EDMHeunScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("output_type", ["np", "pt", "pil"])
def test_output_types_and_shapes(output_type):
    images = make_pipe()(batch_size=3, num_inference_steps=3, output_type=output_type).images
    if output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (3, 8, 8, 1) and images.dtype == np.float32
        assert images.min() >= 0 and images.max() <= 1
    elif output_type == "pt":
        assert torch.is_tensor(images) and images.shape == (3, 1, 8, 8) and images.dtype == torch.float32
    else:
        assert len(images) == 3 and all(isinstance(i, Image.Image) and i.size == (8, 8) for i in images)


def test_return_dict_false_and_seeding():
    pipe = make_pipe(EDMStochasticScheduler(s_churn=20.0))
    a = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    (b,) = pipe(
        batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np", return_dict=False
    )
    c = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(1), output_type="np").images
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_pipeline_equals_manual_standard_loop():
    """The pipeline is the standard diffusers loop: replaying it by hand gives the same samples."""
    pipe = make_pipe()
    latents = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    out = pipe(batch_size=2, num_inference_steps=5, latents=latents, output_type="pt").images
    s = EDMHeunScheduler()
    s.set_timesteps(5)
    x = latents.double() * s.init_noise_sigma
    with torch.no_grad():
        for t in s.timesteps:
            F = pipe.unet(s.scale_model_input(x, t).float(), t.expand(2)).sample
            x = s.step(F, t, x).prev_sample
    assert torch.allclose(out, (x / 2 + 0.5).clamp(0, 1).float(), atol=1e-6)


def test_save_load_round_trip(tmp_path):
    pipe = make_pipe(EDMStochasticScheduler(s_churn=10.0))
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"][1] == "EDMStochasticScheduler"
    assert os.path.exists(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    loaded = EDMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, EDMStochasticScheduler)
    kw = dict(batch_size=2, num_inference_steps=3, output_type="np")
    a = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    b = loaded(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.array_equal(a, b)


def test_from_pretrained_repo_id_reads_hub_snapshot(tmp_path, monkeypatch):
    """A repo id is resolved through the Hub cache layout (models--user--repo/snapshots/<rev>), offline."""
    snapshot = tmp_path / "models--user--edm-digits" / "snapshots" / ("a" * 40)
    make_pipe().save_pretrained(snapshot)
    (tmp_path / "models--user--edm-digits" / "refs").mkdir()
    (tmp_path / "models--user--edm-digits" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = EDMPipeline.from_pretrained("user/edm-digits", cache_dir=str(tmp_path))
    assert isinstance(loaded.scheduler, EDMHeunScheduler)


def test_bad_arguments():
    pipe = make_pipe()
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(num_inference_steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        pipe(batch_size=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="jpeg")
    with pytest.raises(ValueError, match="latents"):
        pipe(batch_size=2, latents=torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="latents must be a floating-point tensor"):
        pipe(batch_size=1, latents=torch.zeros(1, 1, 8, 8, dtype=torch.int64))


def test_integer_types_generator_lists_and_labels():
    pipe = make_pipe()
    a = pipe(batch_size=2, num_inference_steps=3, generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np").images
    b = pipe(batch_size=np.int32(2), num_inference_steps=torch.tensor(3), output_type="np",
             generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="generator is a list of 1 generators but the batch has 2"):
        pipe(batch_size=2, generator=[torch.Generator()])
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1"):
        pipe(num_inference_steps=2.0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        pipe(batch_size=True)
    with pytest.raises(ValueError, match="not class-conditional"):
        pipe(class_labels=torch.tensor([1]))
