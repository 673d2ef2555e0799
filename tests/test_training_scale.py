"""Training at scale and its pictures: memory-mapped Arrow images, process-count-independent steps, bf16 on the CPU,
logs/loss.png, captioned grids and the tracker's sample images."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)


def synthetic_dataset(sizes, seed=0, mode="RGB"):
    """A ``datasets.Dataset`` of random images of the given (W, H) sizes, and their pixel arrays (H, W, C)."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (h, w, 3) if mode == "RGB" else (h, w), dtype=np.uint8) for w, h in sizes]
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in arrays],
                                     "label": list(range(len(arrays)))},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    return ds, arrays


# --- memory-mapped Arrow images ---------------------------------------------------------------------------------------

def load_memory_mapped_images(dataset, config, cache_root):
    from diffusers_stf.training.data import ImageData, prepare_arrow_images

    images = prepare_arrow_images(dataset, "image", cache_root, config.resolution, config.channels, config.center_crop)
    return ImageData(images, None, config.resolution, config.center_crop, config.random_flip)


def test_arrow_images_are_the_pixels_read_back_from_a_memory_mapped_file(tmp_path):
    from diffusers_stf.training.data import DataConfig

    ds, arrays = synthetic_dataset([(6, 6)] * 20)
    data = load_memory_mapped_images(ds, DataConfig(), str(tmp_path))
    files = data.images.cache_files()
    assert len(files) == 1 and files[0].startswith(str(tmp_path)) and os.path.getsize(files[0]) >= 20 * 3 * 36
    assert tuple(data.images.shape) == (20, 3, 6, 6) and (data.channels, data.resolution) == (3, 6)
    order = torch.tensor([7, 0, 19, 7, 3])  # random access, repeats allowed
    batch = data.batch(order)
    expected = torch.from_numpy(np.stack([arrays[i] for i in order])).permute(0, 3, 1, 2).double() / 127.5 - 1
    torch.testing.assert_close(batch["images"].double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(batch["index"], order)


def test_arrow_images_resize_and_crop_like_pil(tmp_path):
    from PIL import Image

    from diffusers_stf.training.data import DataConfig

    ds, arrays = synthetic_dataset([(12, 8), (16, 8), (8, 8)], mode="L")
    data = load_memory_mapped_images(ds, DataConfig(resolution=4, center_crop=True), str(tmp_path))
    assert tuple(data.images.shape) == (3, 1, 4, 4)  # other aspect ratios: square crops at preparation
    for i, (a, (w, h)) in enumerate(zip(arrays, [(6, 4), (8, 4), (4, 4)])):
        resized = np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR))
        top, left = (h - 4) // 2, (w - 4) // 2
        assert np.array_equal(data.images[torch.tensor([i])][0, 0].numpy(), resized[top:top + 4, left:left + 4])


def test_arrow_cache_is_reused_and_bad_columns_are_refused(tmp_path):
    import datasets

    from diffusers_stf.training.data import ArrowImages, DataConfig

    ds, _ = synthetic_dataset([(4, 4)] * 5)
    first = load_memory_mapped_images(ds, DataConfig(), str(tmp_path)).images.cache_files()
    second = load_memory_mapped_images(ds, DataConfig(), str(tmp_path)).images.cache_files()
    assert first == second and len(os.listdir(tmp_path)) == 1
    with pytest.raises(ValueError, match="'pixels' column of Array3D uint8"):
        ArrowImages(datasets.Dataset.from_dict({"pixels": [[1, 2]]}))


# --- pictures ---------------------------------------------------------------------------------------------------------

def test_loss_png_has_the_loss_and_one_curve_per_sigma_band(tmp_path):
    from PIL import Image

    from diffusers_stf.training.plots import plot_loss_curves, sigma_columns

    rows = [{"step": s, "loss": 1.0 / s, "loss_sigma_<0.1": 0.5 / s, "loss_sigma_0.1-1": None if s == 2 else 2.0 / s}
            for s in (1, 2, 3, 4)]
    assert sigma_columns(rows) == ["loss_sigma_<0.1", "loss_sigma_0.1-1"]
    path = plot_loss_curves(rows, str(tmp_path / "logs" / "loss.png"))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1100, 400)  # two panels: the loss and the σ bands
    assert plot_loss_curves([], str(tmp_path / "empty.png")) is None and not (tmp_path / "empty.png").exists()
    assert [n for n in os.listdir(tmp_path / "logs") if n.startswith(".")] == []  # no temporary file left


def test_caption_band_sits_above_the_unchanged_grid():
    from PIL import Image

    from diffusers_stf.training.plots import captioned, sampler_caption

    class Pipe:
        scheduler = type("EDMHeunScheduler", (), {})()

    caption = sampler_caption(500, Pipe(), 18)
    assert caption == "step 500 · EDMHeunScheduler, 18 steps"
    narrow = captioned(Image.new("L", (20, 20), 128), caption)  # centred on a canvas as wide as the caption
    assert narrow.width > 150 and np.asarray(narrow)[-20:, (narrow.width - 20) // 2:][:, :20].min() == 128
    grid = Image.fromarray(np.full((530, 530, 3), 128, dtype=np.uint8))
    out = captioned(grid, caption)
    array = np.asarray(out)
    band = out.height - grid.height
    assert out.width == grid.width and 10 <= band <= 30
    assert np.array_equal(array[band:], np.asarray(grid))  # the grid is unchanged below the band
    assert (array[:band] < 64).sum() > 100 and (array[:band] == 255).mean() > 0.7  # dark text on white


def stand_in_tracker():
    """An accelerate tracker that keeps what it is given (tensorboard and wandb are not installed here)."""
    from accelerate.tracking import GeneralTracker

    class StandIn(GeneralTracker):
        name, requires_logging_directory = "stand-in", False

        def __init__(self):
            super().__init__()
            self.images, self.scalars = [], []

        @property
        def tracker(self):
            return self

        def log(self, values, step=None, **kwargs):
            self.scalars.append((values, step))

        def log_images(self, values, step=None, **kwargs):
            self.images.append((values, step))

    return StandIn()


def test_the_grid_reaches_every_tracker_that_takes_images():
    from accelerate import Accelerator
    from PIL import Image

    from diffusers_stf.training.plots import log_image

    tracker = stand_in_tracker()
    accelerator = Accelerator(cpu=True, log_with=[tracker])
    accelerator.init_trackers("run")
    grid = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    log_image(accelerator, "samples", grid, step=7, caption="step 7")
    (values, step), = tracker.images
    assert step == 7 and list(values) == ["samples"]
    array, = values["samples"]
    assert array.shape == (8, 8, 3) and np.array_equal(array[..., 1], np.asarray(grid))


# --- the process count does not change the maths ----------------------------------------------------------------------

def test_a_process_share_of_global_draws_is_the_rows_of_the_one_process_draw():
    from diffusers_stf.training.data import BatchSchedule
    from diffusers_stf.training.global_batch import BatchShare, global_indices, share_of

    def one_process_draws(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(12, generator=g), torch.randn(12, 3, 4, 4, generator=g)

    sigma, noise = one_process_draws(5)
    pieces = []
    for p in range(3):
        share = BatchShare.of_process(4, 3, p)
        g = torch.Generator().manual_seed(5)  # every process: the same step generator
        pieces.append((share.draw(torch.randn, (4,), generator=g), share.draw(torch.randn, (4, 3, 4, 4), generator=g)))
    assert torch.equal(torch.cat([s for s, _ in pieces]), sigma)
    assert torch.equal(torch.cat([n for _, n in pieces]), noise)

    schedules = [BatchSchedule(50, 4, seed=1, num_processes=3, process_index=p) for p in range(3)]
    for micro_step in (0, 3, 4, 9):  # 4 global batches per epoch: 9 is in the third epoch
        shards = torch.cat([s.indices(micro_step) for s in schedules])
        assert torch.equal(global_indices(schedules[1], micro_step), shards)
        assert torch.equal(share_of(schedules[1]).take(shards), schedules[1].indices(micro_step))
    with pytest.raises(ValueError, match="expected 12 rows"):
        BatchShare.of_process(4, 3, 0).take(torch.zeros(4))
    with pytest.raises(ValueError, match="process_index must be in"):
        BatchShare.of_process(4, 3, 3)


# --- mixed precision on the CPU ---------------------------------------------------------------------------------------

@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a run with another mixed precision needs it reset."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def test_bf16_on_the_cpu_trains_close_to_fp32(tmp_path, fresh_accelerate_state):
    import train_stf
    from accelerate.state import AcceleratorState

    from diffusers_stf.training import read_metrics

    losses = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(True)
        out = tmp_path / precision
        train_stf.main(["--output_dir", str(out), "--cpu", "--loss", "edm", "--mixed_precision", precision,
                        "--block_out_channels", "8,16", "--train_batch_size", "16", "--max_train_samples", "64",
                        "--max_train_steps", "2", "--logging_steps", "1", "--validation_steps", "0",
                        "--num_validation_images", "4", "--num_inference_steps", "2", "--no_progress_bar",
                        "--checkpointing_steps", "0", "--digits_split", "all"])  # the images it was calibrated on
        losses[precision] = [row["loss"] for row in read_metrics(str(out / "logs"))]
    assert all(np.isfinite(losses["bf16"])) and len(losses["bf16"]) == 2
    # the first step sees the same weights and draws: bf16's 8-bit mantissa moves the loss by ~1e-3..1e-2, not 0
    relative = abs(losses["bf16"][0] - losses["no"][0]) / losses["no"][0]
    assert 1e-5 < relative < 0.05, relative


def test_captioned_grid_tiles_are_at_least_64_pixels(tmp_path):
    from PIL import Image

    from diffusers_stf.training.plots import save_captioned_grid

    images = torch.rand(64, 1, 8, 8)
    images[:, :, 0, 0] = 0  # a black corner pixel per tile, to find the tiles
    path = save_captioned_grid(images, str(tmp_path / "grid.png"), "step 3 · EDMHeunScheduler, 18 steps")
    with Image.open(path) as grid:
        array = np.asarray(grid)
    # 8 x 8 tiles of 8 px upscaled by the smallest integer factor reaching 64 px (8), 1 px padding, caption band above
    assert array.shape[1] == 8 * 64 + 9
    band = array.shape[0] - (8 * 64 + 9)
    assert 10 <= band <= 30
    tile = array[band + 1:band + 1 + 64, 1:1 + 64].astype(int)
    upscaled = np.repeat(np.repeat(images[0, 0].numpy() * 255, 8, 0), 8, 1)  # nearest upscaling by 8
    assert np.abs(tile - upscaled).max() <= 1  # 8-bit rounding


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def final_weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("loss", [["--loss", "edm"], ["--loss", "stf", "--stf_reference_batch_size", "32"]],
                         ids=["edm", "stf"])
def test_two_processes_take_the_steps_of_one_process_at_the_same_global_batch(tmp_path, fresh_accelerate_state, loss):
    """With STF, both runs use one reference set of R = 32 per step: the global batch of 16 and 16 extras drawn from
    the shared generator."""
    import train_stf

    from diffusers_stf.training import read_metrics

    common = [*loss, "--cpu", "--block_out_channels", "8,16", "--max_train_samples", "64",
              "--max_train_steps", "4", "--logging_steps", "1", "--validation_steps", "0", "--checkpointing_steps", "0",
              "--num_validation_images", "4", "--num_inference_steps", "2", "--no_progress_bar", "--lr_warmup_steps",
              "0", "--learning_rate", "2e-3", "--ema_halflife_kimg", "0.01", "--random_flip",
              # biases in front of a group norm get gradients that are pure rounding noise; with Adam's ε = 1e-8 their
              # updates are ±lr whatever the noise, so the float reduction order would decide them
              "--adam_epsilon", "1e-4"]
    train_stf.main(["--output_dir", str(tmp_path / "one"), "--train_batch_size", "16", *common])
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), os.path.join(EXAMPLES, "train_stf.py"),
           "--output_dir", str(tmp_path / "two"), "--train_batch_size", "8", *common]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 training processes" in proc.stdout
    one, two = (read_metrics(str(tmp_path / name / "logs")) for name in ("one", "two"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert a["nimg"] == b["nimg"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    weights_one, weights_two = final_weights(str(tmp_path / "one")), final_weights(str(tmp_path / "two"))
    diffs = torch.cat([(weights_one[k] - weights_two[k]).abs().reshape(-1) for k in weights_one])
    # a few of those biases still move by rounding noise / ε; every other weight agrees to float32 precision
    assert float(diffs.max()) < 1e-4 and float((diffs > 1e-6).float().mean()) < 0.02, diffs.max()


def test_a_set_over_the_in_memory_cap_trains_from_the_arrow_file_with_the_same_steps(tmp_path, monkeypatch, capsys):
    import train_stf
    from PIL import Image

    import diffusers_stf.training.data.decode as data_module
    from diffusers_stf.training import read_metrics

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    common = ["--train_data_dir", str(folder), "--cache_dir", str(tmp_path / "cache"), "--cpu", "--loss", "stf",
              "--stf_reference_batch_size", "16", "--block_out_channels", "8,16", "--train_batch_size", "8",
              "--max_train_steps", "3", "--logging_steps", "1", "--validation_steps", "0", "--checkpointing_steps", "0",
              "--num_validation_images", "4", "--num_inference_steps", "2", "--no_progress_bar", "--random_flip"]
    train_stf.main(["--output_dir", str(tmp_path / "in_memory"), *common])
    assert "memory-mapped" not in capsys.readouterr().out
    monkeypatch.setattr(data_module, "MAX_IN_MEMORY_BYTES", 40 * 3 * 8 * 8 - 1)  # one byte short of the set
    train_stf.main(["--output_dir", str(tmp_path / "mapped"), *common])
    out = capsys.readouterr().out
    assert "over the in-memory cap" in out and "memory-mapped file" in out
    arrow_files = list((tmp_path / "cache" / "diffusers_stf_pixels").glob("pixels-*.arrow"))
    assert len(arrow_files) == 1 and arrow_files[0].stat().st_size >= 40 * 3 * 8 * 8
    # the same pixels, batches, flips and references: the same losses, step by step (to the last float32 bit or so)
    in_memory, mapped = (read_metrics(str(tmp_path / name / "logs")) for name in ("in_memory", "mapped"))
    assert len(mapped) == len(in_memory) == 3
    assert [r["loss"] for r in mapped] == pytest.approx([r["loss"] for r in in_memory], rel=1e-6, abs=0)


def test_each_validation_writes_a_captioned_grid_loss_png_and_tracker_images(tmp_path):
    from accelerate import Accelerator
    from conftest import make_tiny_unet
    from PIL import Image

    from diffusers_stf import EDMHeunScheduler, EDMPipeline
    from diffusers_stf.digits import digits_tensor
    from diffusers_stf.losses import EDMLoss
    from diffusers_stf.training import Trainer, TrainingConfig
    from diffusers_stf.training.data import ImageData

    tracker = stand_in_tracker()
    accelerator = Accelerator(cpu=True, log_with=[tracker])
    loss = EDMLoss()

    def loss_fn(model, batch, generator):
        return loss(loss.denoiser(model), batch["images"], generator=generator)

    config = TrainingConfig(output_dir=str(tmp_path / "run"), train_batch_size=8, max_train_steps=4, logging_steps=1,
                            validation_steps=2, checkpointing_steps=0, num_validation_images=4, num_inference_steps=2,
                            no_progress_bar=True, report_to="none", lr_warmup_steps=0)
    images, _ = digits_tensor()
    trainer = Trainer(config, make_tiny_unet(), loss_fn, ImageData.from_tensor(images[:64], resolution=8),
                      accelerator=accelerator,
                      make_pipeline=lambda unet: EDMPipeline(unet=unet, scheduler=EDMHeunScheduler()))
    trainer.train()
    with Image.open(tmp_path / "run" / "samples" / "step_0000002.png") as grid:
        # 2 x 2 tiles of 8 px upscaled to 64 px with 1 px padding, under a caption band (and as wide as the caption)
        assert grid.width >= 2 * 64 + 3 and grid.height - (2 * 64 + 3) in range(10, 31)
    with Image.open(tmp_path / "run" / "logs" / "loss.png") as plot:
        assert plot.size == (1100, 400)
    assert [step for _, step in tracker.images] == [2, 4]  # the step-2 validation and the final one
    assert all(list(values) == ["samples"] for values, _ in tracker.images)
    assert sorted({step for _, step in tracker.scalars}) == [1, 2, 3, 4]


def test_torch_compile_compiles_the_trained_model_and_checkpoints_stay_plain(tmp_path, monkeypatch,
                                                                             fresh_accelerate_state):
    from conftest import make_tiny_unet
    from safetensors.torch import load_file

    import diffusers_stf.training.accelerator as accelerator_module
    from diffusers_stf.digits import digits_tensor
    from diffusers_stf.training import Trainer, TrainingConfig, make_accelerator
    from diffusers_stf.training.data import ImageData

    monkeypatch.setattr(accelerator_module, "TORCH_COMPILE_BACKEND", "eager")  # inductor needs minutes on a CPU
    config = TrainingConfig(output_dir=str(tmp_path / "run"), train_batch_size=8, max_train_steps=2,
                            checkpointing_steps=2, validation_steps=0, num_validation_images=4, num_inference_steps=2,
                            no_progress_bar=True, report_to="none", torch_compile=True, cpu=True)
    images, _ = digits_tensor()
    unet = make_tiny_unet()
    def loss_fn(model, batch, generator):
        return model(batch["images"], torch.ones(8)).sample.square().mean()

    trainer = Trainer(config, unet, loss_fn, ImageData.from_tensor(images[:32], resolution=8),
                      accelerator=make_accelerator(config))
    trainer.train()
    assert isinstance(trainer.model, torch._dynamo.eval_frame.OptimizedModule)
    saved = load_file(str(tmp_path / "run" / "checkpoint-2" / "model" / "diffusion_pytorch_model.safetensors"))
    assert set(saved) == set(unet.state_dict())  # no "_orig_mod." prefixes


# --- --dataloader_num_workers: reading the next batches ahead from the memory-mapped file -----------------------------

def batches_seen_by_the_loss(data, output_dir, num_workers, steps=5):
    from diffusers_stf.training import Trainer, TrainingConfig

    seen = []

    def loss_fn(model, batch, generator):
        seen.append((batch["index"].clone(), batch["images"].detach().cpu().clone()))
        return model(batch["images"].flatten(1)).pow(2).mean()

    config = TrainingConfig(output_dir=output_dir, train_batch_size=4, max_train_steps=steps, logging_steps=1,
                            checkpointing_steps=0, validation_steps=0, no_progress_bar=True, report_to="none",
                            dataloader_num_workers=num_workers)
    trainer = Trainer(config, torch.nn.Linear(3 * 6 * 6, 1), loss_fn, data)
    trainer.train()
    return seen, trainer


def test_dataloader_workers_read_the_arrow_batches_ahead_with_identical_results(tmp_path, capsys):
    from diffusers_stf.training.data import DataConfig

    ds, arrays = synthetic_dataset([(6, 6)] * 12)
    data = load_memory_mapped_images(ds, DataConfig(random_flip=True), str(tmp_path / "cache"))
    direct, _ = batches_seen_by_the_loss(data, str(tmp_path / "direct"), num_workers=0)
    assert data.images.prefetched_reads == 0
    ahead, trainer = batches_seen_by_the_loss(data, str(tmp_path / "ahead"), num_workers=2)
    assert "2 threads read the next 2 batches" in capsys.readouterr().out
    # every micro-step after the first was read in the background, and the pool is gone after training
    assert data.images.prefetched_reads == len(ahead) - 1 == 4 and data.images._pool is None
    assert len(direct) == len(ahead) == 5
    for (index_direct, images_direct), (index_ahead, images_ahead) in zip(direct, ahead):
        assert torch.equal(index_direct, index_ahead) and torch.equal(images_direct, images_ahead)
        # and they are the file's pixels, x / 255 · 2 − 1, up to the flips
        pixels = torch.from_numpy(np.stack([arrays[i] for i in index_ahead])).permute(0, 3, 1, 2).double()
        expected = pixels / 255 * 2 - 1
        unflipped = torch.isclose(images_ahead.double(), expected, atol=1e-6).flatten(1).all(1)
        flipped = torch.isclose(images_ahead.double(), expected.flip(-1), atol=1e-6).flatten(1).all(1)
        assert bool((unflipped | flipped).all())


def test_dataloader_workers_on_a_set_in_memory_say_they_have_no_effect(tmp_path, capsys):
    from diffusers_stf.training.data import ImageData

    data = ImageData.from_tensor(torch.rand(12, 3, 6, 6) * 2 - 1)
    batches_seen_by_the_loss(data, str(tmp_path / "run"), num_workers=3, steps=1)
    assert "--dataloader_num_workers has no effect: the images are held in memory" in capsys.readouterr().out
