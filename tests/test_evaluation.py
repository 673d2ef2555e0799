"""Offline evaluation: Fréchet distance, precision/recall, class statistics, feature extractors, generate/evaluate."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from scipy import linalg

from diffusers_stf.digits import digits_tensor
from diffusers_stf.evaluation import (
    DIGITS_CLASSIFIER_PATH,
    DigitsClassifier,
    FIDInceptionV3,
    InceptionFeatureExtractor,
    TransformersFeatureExtractor,
    class_statistics,
    evaluate_images,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    load_feature_extractor,
    load_images,
    make_scheduler,
    precision_recall,
    reference_statistics,
)
from diffusers_stf.evaluation.feature_extractors import load_state_dict_file

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def digits_extractor():
    return load_feature_extractor("digits")


def _save_pngs(images, folder):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    array = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for i, image in enumerate(array):
        Image.fromarray(image[0]).save(os.path.join(folder, f"{i:06d}.png"))


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


def test_frechet_distance_diagonal_gaussians_closed_form():
    # Commuting (diagonal) covariances: d² = ‖μ₁−μ₂‖² + Σ_i (√a_i − √b_i)².
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_non_commuting_2d_closed_form():
    # For 2×2 matrices with positive eigenvalues, tr √M = √(tr M + 2√det M); here M = Σ₁Σ₂ (Σ₁Σ₂ ≠ Σ₂Σ₁).
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 2.0])
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(1)
    n = 40000
    s1 = np.array([[1.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 0.5]])
    s2 = np.diag([2.0, 0.5, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, -0.5, 2.0])
    x1 = rng.multivariate_normal(mu1, s1, size=n)
    x2 = rng.multivariate_normal(mu2, s2, size=n)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance_from_features(x1, x2) == pytest.approx(expected, rel=0.03)


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric():
    rng = np.random.default_rng(2)
    f1, f2 = rng.normal(size=(300, 12)), rng.normal(1.0, 2.0, size=(200, 12))
    assert frechet_distance_from_features(f1, f1) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance_from_features(f1, f2) == pytest.approx(frechet_distance_from_features(f2, f1), rel=1e-9)


def test_frechet_distance_handles_dead_features():
    # A feature that is always 0 (a dead ReLU) makes Σ singular but the distance stays defined.
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(500, 4)), rng.normal(size=(500, 4)) + 1
    f1[:, 0] = f2[:, 0] = 0
    mu1, s1 = feature_statistics(f1)
    mu2, s2 = feature_statistics(f2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1[1:, 1:] @ s2[1:, 1:]).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_too_few_samples_for_the_covariance_is_a_clear_error():
    with pytest.raises(ValueError, match=r"singular.*at least 65 samples"):
        feature_statistics(np.random.default_rng(0).normal(size=(40, 64)))


def test_mismatched_statistics_are_rejected():
    with pytest.raises(ValueError, match="matching shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------------------------------
# Precision / recall and class statistics


def test_precision_recall_of_identical_sets_is_one():
    f = np.random.default_rng(0).normal(size=(200, 8))
    assert precision_recall(f, f) == {"precision": 1.0, "recall": 1.0}


def test_precision_recall_of_disjoint_sets_is_zero():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 100
    assert precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_matches_brute_force_definition():
    # Kynkäänniemi et al. 2019 eqs. 2–4 written out with loops.
    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(40, 2)), rng.normal(0.7, 1.3, size=(35, 2))
    k = 3

    def radii(points):
        return [sorted(np.linalg.norm(points - p, axis=1))[k] for p in points]

    def covered(manifold, query):
        r = radii(manifold)
        return np.mean([any(np.linalg.norm(q - m) <= rm for m, rm in zip(manifold, r)) for q in query])

    result = precision_recall(real, fake, k=k)
    assert result["precision"] == pytest.approx(covered(real, fake))
    assert result["recall"] == pytest.approx(covered(fake, real))


def test_precision_recall_detect_mode_dropping():
    rng = np.random.default_rng(5)
    centers = np.array([[0.0, 0.0], [50.0, 0.0]])
    real = np.concatenate([c + rng.normal(size=(300, 2)) for c in centers])
    fake = centers[0] + rng.normal(size=(600, 2))  # only the first mode
    result = precision_recall(real, fake)
    assert result["precision"] > 0.95
    assert result["recall"] == pytest.approx(0.5, abs=0.05)


def test_class_statistics():
    uniform = torch.eye(10).repeat(20, 1) * 50  # every class predicted 20 times, with certainty
    stats = class_statistics(uniform)
    assert stats["class_entropy"] == pytest.approx(math.log(10))
    assert stats["confidence"] == pytest.approx(1.0)
    collapsed = class_statistics(torch.zeros(30, 10).index_fill_(1, torch.tensor([3]), 5.0))
    assert collapsed["class_entropy"] == pytest.approx(0.0)
    assert collapsed["class_histogram"][3] == 30
    assert collapsed["confidence"] == pytest.approx(math.exp(5) / (math.exp(5) + 9))


# ----------------------------------------------------------------------------------------------------------------
# The shipped digits classifier and the digits extractor


def test_shipped_classifier_loads_from_safetensors_and_reaches_97_percent():
    weights = os.path.join(DIGITS_CLASSIFIER_PATH, "diffusion_pytorch_model.safetensors")
    assert os.path.isfile(weights) and os.path.getsize(weights) < 1_000_000
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(DIGITS_CLASSIFIER_PATH))
    model = DigitsClassifier.from_pretrained(DIGITS_CLASSIFIER_PATH).eval()
    x, y = digits_tensor("heldout")
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).double().mean().item()
    assert accuracy >= 0.97


def test_digits_extractor_rejects_images_it_was_not_built_for(digits_extractor):
    x, _ = digits_tensor("heldout")
    with pytest.raises(ValueError, match="8x8"):
        digits_extractor(torch.nn.functional.interpolate(x[:4], size=16))
    with pytest.raises(ValueError, match="1-channel"):
        digits_extractor(x[:4].repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match="floats"):
        digits_extractor(((x[:4] + 1) * 127.5).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        digits_extractor((x[:4] + 1) * 127.5)


def test_real_heldout_digits_score_as_real(digits_extractor, tmp_path):
    held, _ = digits_tensor("heldout")
    result = evaluate_images(held, digits_extractor, references=("digits:heldout", "digits:train"), cache_dir=str(tmp_path))
    assert result["fd"]["digits:heldout"] == pytest.approx(0.0, abs=1e-6)
    assert result["precision"]["digits:heldout"] == result["recall"]["digits:heldout"] == 1.0
    assert result["fd"]["digits:train"] < 5  # two samples of the same distribution
    uniform = torch.rand(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = evaluate_images(uniform, digits_extractor, references=("digits:train",), cache_dir=str(tmp_path))
    assert noise["fd"]["digits:train"] > 20 * result["fd"]["digits:train"]
    assert noise["precision"]["digits:train"] < 0.2


def test_reference_statistics_are_cached_per_extractor_and_split(digits_extractor, tmp_path, monkeypatch):
    first = reference_statistics(digits_extractor, "digits:heldout", cache_dir=str(tmp_path))
    files = os.listdir(tmp_path)
    assert files == [f"{digits_extractor.name}--digits-heldout.npz"]
    import diffusers_stf.evaluation.evaluator as evaluator

    def fail(*args, **kwargs):
        raise AssertionError("the cached statistics should have been used")

    monkeypatch.setattr(evaluator, "compute_features", fail)
    second = reference_statistics(digits_extractor, "digits:heldout", cache_dir=str(tmp_path))
    np.testing.assert_array_equal(first["sigma"], second["sigma"])
    np.testing.assert_array_equal(first["features"], second["features"])


# ----------------------------------------------------------------------------------------------------------------
# Image loading


def test_load_images_round_trips_pngs_and_rejects_bad_folders(tmp_path):
    held, _ = digits_tensor("heldout")
    _save_pngs(held[:20], str(tmp_path / "pngs"))
    torch.testing.assert_close(load_images(str(tmp_path / "pngs")), held[:20], atol=0, rtol=0)
    with pytest.raises(ValueError, match="only 20"):
        load_images(str(tmp_path / "pngs"), num_images=30)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        load_images(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="folder of images or an .npz"):
        load_images(str(tmp_path / "missing"))
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "pngs" / "big.png")
    with pytest.raises(ValueError, match="differ in size"):
        load_images(str(tmp_path / "pngs"))


# ----------------------------------------------------------------------------------------------------------------
# Inception (FID) and transformers backbones, on stand-in weights


def test_fid_inception_has_pytorch_fid_layout_and_loads_a_weight_file(tmp_path):
    torch.manual_seed(0)
    network = FIDInceptionV3()
    # torchvision's inception_v3 has 27,161,264 parameters; without the aux classifier (3,326,696) and with
    # 1008 instead of 1000 classes (+8·2049) the FID graph has 23,850,960.
    assert sum(p.numel() for p in network.parameters()) == 23_850_960
    state = network.state_dict()
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["fc.weight"].shape == (1008, 2048)
    path = tmp_path / "pt_inception-stand-in.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    extractor = InceptionFeatureExtractor(str(path))
    x, _ = digits_tensor("heldout")
    with pytest.raises(ValueError, match="3-channel"):
        extractor(x[:2])
    loaded = extractor.network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    features, logits = extractor(x[:2].repeat(1, 3, 1, 1))
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.isfinite(features).all() and (features >= 0).all()  # pool3 averages post-ReLU activations
    with pytest.raises(ValueError, match="not a pytorch-fid Inception"):
        InceptionFeatureExtractor(os.path.join(DIGITS_CLASSIFIER_PATH, "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        InceptionFeatureExtractor(str(tmp_path / "missing.pth"))


def test_state_dict_files_load_without_unpickling(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.arange(3.0)}, str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(load_state_dict_file(str(tmp_path / "w.safetensors"))["w"], torch.arange(3.0))

    class RunsCodeWhenUnpickled:
        def __reduce__(self):
            return (print, ("unpickled arbitrary code",))

    torch.save({"w": RunsCodeWhenUnpickled()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_state_dict_file(str(tmp_path / "evil.pth"))


def test_transformers_backbone_from_a_local_folder(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=16, patch_size=8)  # fmt: skip
    Dinov2Model(config).save_pretrained(tmp_path / "dinov2-tiny")
    extractor = TransformersFeatureExtractor(str(tmp_path / "dinov2-tiny"))
    assert extractor.feature_dim == 32 and extractor.input_size == 16
    held, _ = digits_tensor("heldout")
    result = evaluate_images(held[:200], extractor, references=(), cache_dir=str(tmp_path))
    assert "confidence" not in result  # a backbone has no classifier
    features, logits = extractor(held[:5].repeat(1, 3, 1, 1))
    assert features.shape == (5, 32) and logits is None
    fd = frechet_distance_from_features(*[extractor(h.repeat(1, 3, 1, 1))[0].numpy() for h in (held[:100], held[:100])])
    assert fd == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="could not load"):
        TransformersFeatureExtractor(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------------------------------------------
# Sampling scripts


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from diffusers import UNet2DModel

    from diffusers_stf import EDMHeunScheduler, EDMPipeline

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       add_attention=False, norm_num_groups=8)  # fmt: skip
    folder = str(tmp_path_factory.mktemp("pipe") / "edm")
    EDMPipeline(unet, EDMHeunScheduler()).save_pretrained(folder)
    return folder


def test_generate_resumes_without_duplicating(tiny_pipeline, tmp_path):
    generate = _load_example("generate")
    out = str(tmp_path / "samples")
    common = ["--pipeline", tiny_pipeline, "--output_dir", out, "--num_inference_steps", "2", "--format", "both"]
    first = generate.main(common + ["--num_images", "3", "--batch_size", "2"])
    assert first["generated"] == 3
    mtime = os.path.getmtime(os.path.join(out, "000000.png"))
    second = generate.main(common + ["--num_images", "5", "--batch_size", "4"])
    assert (second["generated"], second["skipped"]) == (2, 3)
    assert os.path.getmtime(os.path.join(out, "000000.png")) == mtime
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert pngs == [f"{i:06d}.png" for i in range(5)]
    with np.load(os.path.join(out, "samples.npz")) as archive:
        assert archive["seeds"].tolist() == [0, 1, 2, 3, 4]
        npz_images = archive["samples"]
    # image i depends on its seed only, not on the batching or on the interruption
    fresh = str(tmp_path / "fresh")
    generate.main(["--pipeline", tiny_pipeline, "--output_dir", fresh, "--num_inference_steps", "2", "--num_images", "5"])
    torch.testing.assert_close(load_images(fresh), load_images(out), atol=0, rtol=0)
    np.testing.assert_array_equal(npz_images, np.stack([np.asarray(load_images(out)[i].add(1).mul(127.5).round().byte().permute(1, 2, 0)) for i in range(5)]))
    with pytest.raises(ValueError, match="other settings"):
        generate.main(common + ["--num_images", "5", "--scheduler", "stochastic", "--s_churn", "10"])


def test_scheduler_swaps_keep_the_config_and_reject_unknown_options(tiny_pipeline):
    from diffusers_stf import EDMHeunScheduler

    base = EDMHeunScheduler(sigma_max=40.0)
    churned = make_scheduler(base, "stochastic", s_churn=20)
    assert type(churned).__name__ == "EDMStochasticScheduler"
    assert churned.config.sigma_max == 40.0 and churned.config.s_churn == 20
    with pytest.raises(ValueError, match="eta"):
        make_scheduler(base, "heun", eta=0.5)
    with pytest.raises(ValueError, match="edm"):
        make_scheduler(EDMHeunScheduler(preconditioning="vp"), "euler")


def test_evaluate_script_writes_json_and_explains_too_few_samples(tmp_path, capsys):
    evaluate = _load_example("evaluate")
    held, _ = digits_tensor("heldout")
    _save_pngs(held[:100], str(tmp_path / "s"))
    result = evaluate.main([str(tmp_path / "s"), "--reference", "digits:heldout", "--cache_dir", str(tmp_path / "c")])
    with open(tmp_path / "s" / "metrics.json") as f:
        written = json.load(f)
    assert written["fd"]["digits:heldout"] == pytest.approx(result["fd"]["digits:heldout"])
    assert written["kid"]["digits:heldout"] == pytest.approx(result["kid"]["digits:heldout"])
    assert result["precision"]["digits:heldout"] == 1.0
    capsys.readouterr()
    # n <= d: the FD is undefined (an error naming the sample count it needs, suggesting KID), KID is still computed
    small = evaluate.main([str(tmp_path / "s"), "--num_images", "50", "--cache_dir", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert "error: FD is undefined" in err and "at least 65 samples" in err and "KID" in err
    assert small["fd"] == {"digits:train": None, "digits:heldout": None}
    assert all(math.isfinite(small["kid"][ref]) for ref in ("digits:train", "digits:heldout"))


# ----------------------------------------------------------------------------------------------------------------
# One grid helper


def test_image_grid_places_each_image_at_its_cell_with_exact_values():
    from diffusers_stf.evaluation import image_grid

    images = torch.rand(5, 1, 3, 2, generator=torch.Generator().manual_seed(0))
    grid = np.asarray(image_grid(images, nrow=3, padding=1, min_cell=4))  # scale = ceil(4 / 2) = 2
    h, w, pad = 3 * 2, 2 * 2, 1
    assert grid.shape == (2 * (h + pad) + pad, 3 * (w + pad) + pad)
    expected = (images * 255).round().to(torch.uint8).numpy()
    for i in range(5):
        r, c = divmod(i, 3)
        top, left = pad + r * (h + pad), pad + c * (w + pad)
        cell = grid[top : top + h, left : left + w]
        np.testing.assert_array_equal(cell, np.kron(expected[i, 0], np.ones((2, 2), np.uint8)))  # nearest upscaling
    assert (grid[0] == 128).all() and (grid[:, 0] == 128).all()  # grey padding, and a grey filler cell
    np.testing.assert_array_equal(grid[pad + h + pad :, pad + 2 * (w + pad) :], 128)
    rgb = image_grid(torch.rand(4, 3, 8, 8) * 2 - 1, value_range=(-1, 1), scale=1, padding=0)
    assert rgb.mode == "RGB" and rgb.size == (16, 16)
    with pytest.raises(ValueError, match="value_range"):
        image_grid(torch.rand(4, 1, 8, 8) * 2 - 1)  # [-1, 1] images given as (0, 1)
    with pytest.raises(ValueError, match="shape"):
        image_grid(torch.rand(4, 2, 8, 8))


# ----------------------------------------------------------------------------------------------------------------
# generate.py on a DDPM folder: the network's parametrisation comes from the folder


def _exact_gaussian_ddpm_class():
    """The exact DDPM network for data y ~ N(m, s²·I), x_t = √ᾱ_t·y + √(1−ᾱ_t)·ε (Ho et al. eq. 4), with
    v_t = ᾱ_t·s² + 1 − ᾱ_t and r = x_t − √ᾱ_t·m:  E[ε | x_t] = √(1−ᾱ_t)·r / v_t,  E[y | x_t] = m + √ᾱ_t·s²·r / v_t and
    E[v | x_t] = √ᾱ_t·E[ε | x_t] − √(1−ᾱ_t)·E[y | x_t] (Salimans & Ho's v). ᾱ comes from diffusers' DDPMScheduler."""
    from diffusers import ConfigMixin, DDPMScheduler, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.unets.unet_2d import UNet2DOutput

    class ExactGaussianDDPM(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, data_std=0.3, data_mean=0.0, sample_size=8, in_channels=1, prediction_type="epsilon",
                     num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"):  # fmt: skip
            super().__init__()
            ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                                 beta_schedule=beta_schedule)  # fmt: skip
            self.register_buffer("alphas_cumprod", ddpm.alphas_cumprod.double())
            self.unused = torch.nn.Parameter(torch.zeros(1))  # gives the model a dtype

        def forward(self, x, t, class_labels=None):
            t = torch.as_tensor(t, device=x.device).reshape(-1).round().long().expand(x.shape[0])
            abar = self.alphas_cumprod[t].reshape(-1, 1, 1, 1)
            x, s2, m = x.double(), self.config.data_std**2, self.config.data_mean
            v = abar * s2 + 1 - abar
            r = x - abar.sqrt() * m
            eps, y = (1 - abar).sqrt() * r / v, m + abar.sqrt() * s2 * r / v
            out = {"epsilon": eps, "sample": y, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * y}
            return UNet2DOutput(sample=out[self.config.prediction_type].float())

    return ExactGaussianDDPM


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_generate_heun_on_a_ddpm_folder_samples_with_its_schedule_and_prediction_type(prediction_type, tmp_path, monkeypatch):
    import diffusers_stf
    from diffusers import DDPMPipeline, DDPMScheduler

    model_class = _exact_gaussian_ddpm_class()
    monkeypatch.setattr(diffusers_stf, "ExactGaussianDDPM", model_class, raising=False)  # loadable by name
    schedule = dict(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")  # not diffusers' default
    folder = str(tmp_path / "ddpm")
    model = model_class(data_std=0.3, data_mean=0.2, prediction_type=prediction_type, **schedule)
    DDPMPipeline(unet=model, scheduler=DDPMScheduler(prediction_type=prediction_type, clip_sample=False, **schedule)
                 ).save_pretrained(folder)  # fmt: skip
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    index["unet"] = ["diffusers_stf", "ExactGaussianDDPM"]
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)

    out = str(tmp_path / "samples")
    generate = _load_example("generate")
    generate.main(["--pipeline", folder, "--output_dir", out, "--scheduler", "heun", "--num_images", "256",
                   "--batch_size", "256", "--num_inference_steps", "50", "--format", "npz"])  # fmt: skip
    with open(os.path.join(out, "generate_config.json")) as f:
        used = json.load(f)
    assert (used["pipeline_class"], used["scheduler_class"]) == ("EDMPipeline", "EDMHeunScheduler")
    config = used["scheduler_config"]
    assert config["preconditioning"] == "ddpm" and config["prediction_type"] == prediction_type
    assert (config["num_train_timesteps"], config["beta_schedule"]) == (100, "squaredcos_cap_v2")
    # The probability-flow ODE maps N(0, σ_max²) to N(m, s²·σ_max²/(s² + σ_max²)) ≈ N(m, s²) (m = 0.2, s = 0.3): the
    # mean of 256 images of 64 pixels has a standard error of 0.0023 and their std one of 0.0017; 50 Heun steps and
    # the uint8 files add under 0.001 to either. A sampler that loses the data's offset or its sign fails here.
    samples = load_images(os.path.join(out, "samples.npz")).double()
    assert abs(float(samples.std()) - 0.3) < 0.007
    assert abs(float(samples.mean()) - 0.2) < 0.01


def test_scheduler_swaps_refuse_what_they_cannot_sample():
    from diffusers import DDPMScheduler

    from diffusers_stf import EDMHeunScheduler
    from diffusers_stf.evaluation import network_parametrisation

    with pytest.raises(ValueError, match="edm"):
        make_scheduler(EDMHeunScheduler(), "DDIMScheduler")  # DDIM cannot sample an EDM-preconditioned network
    with pytest.raises(ValueError, match="trained_betas"):
        make_scheduler(DDPMScheduler(trained_betas=[0.01] * 10, num_train_timesteps=10), "heun")
    with pytest.raises(ValueError, match="edm"):
        make_scheduler(DDPMScheduler(), "euler")
    ddim = make_scheduler(EDMHeunScheduler(preconditioning="ddpm", beta_schedule="scaled_linear",
                                           prediction_type="v_prediction"), "DDIMScheduler")  # fmt: skip
    assert (ddim.config.beta_schedule, ddim.config.prediction_type) == ("scaled_linear", "v_prediction")
    assert network_parametrisation(DDPMScheduler(beta_end=0.03))["beta_end"] == 0.03
    from diffusers import EDMEulerScheduler, ScoreSdeVeScheduler

    assert network_parametrisation(EDMEulerScheduler()) == {"preconditioning": "edm"}
    with pytest.raises(ValueError, match="preconditioning"):
        make_scheduler(ScoreSdeVeScheduler(), "heun")  # a score network: no guess
    assert make_scheduler(ScoreSdeVeScheduler(), "heun", preconditioning="ve").config.preconditioning == "ve"


# ----------------------------------------------------------------------------------------------------------------
# generate.py writes atomically: kills at named points, corrupt leftovers

KILL_CHILD = r"""
import io, os, signal, sys, runpy
import numpy
import PIL.Image

point, nth, script = sys.argv[1], int(sys.argv[2]), sys.argv[3]
calls = [0]


def half_then_kill(write_whole, destination):
    # What a SIGKILL in the middle of the write leaves: the first half of the bytes at the destination.
    buffer = io.BytesIO()
    write_whole(buffer)
    data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    if isinstance(destination, (str, os.PathLike)):
        destination = str(destination) if point != "npz" or str(destination).endswith(".npz") else str(destination) + ".npz"
        with open(destination, "wb") as f:
            f.write(data)
    else:
        destination.write(data)
        destination.flush()
    os.kill(os.getpid(), signal.SIGKILL)


if point == "png":
    original = PIL.Image.Image.save

    def save(self, fp, *args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            half_then_kill(lambda b: original(self, b, format="PNG"), fp)
        return original(self, fp, *args, **kwargs)

    PIL.Image.Image.save = save
else:
    original = numpy.savez

    def savez(file, *args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            half_then_kill(lambda b: original(b, *args, **kwargs), file)
        return original(file, *args, **kwargs)

    numpy.savez = savez
sys.argv = [script] + sys.argv[4:]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("point, nth, fmt", [("png", 3, "png"), ("npz", 2, "npz")])
def test_generate_killed_mid_write_leaves_nothing_a_rerun_or_evaluate_trips_on(tiny_pipeline, tmp_path, point, nth, fmt):
    import subprocess
    import sys

    out, fresh = str(tmp_path / "killed"), str(tmp_path / "fresh")
    options = ["--pipeline", tiny_pipeline, "--num_inference_steps", "2", "--num_images", "5", "--batch_size", "2",
               "--format", fmt, "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.path.dirname(EXAMPLES), "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, point, str(nth), os.path.join(EXAMPLES, "generate.py"),
                            "--output_dir", out, *options], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert child.returncode == -9, child.stderr[-2000:]  # killed at the named point, not finished
    finished = [f for f in os.listdir(out) if f.endswith(".png")]
    assert len(finished) == (nth - 1 if point == "png" else 0)
    if finished:
        load_images(out)  # every file under a final name is whole (a truncated one raises)
    generate = _load_example("generate")
    rerun = generate.main(["--output_dir", out, *options])
    assert rerun["generated"] == (5 - (nth - 1) if point == "png" else 5 - 2)
    generate.main(["--output_dir", fresh, *options])
    if fmt == "png":
        torch.testing.assert_close(load_images(out), load_images(fresh), atol=0, rtol=0)
        assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))  # no temporaries left behind
    else:
        torch.testing.assert_close(load_images(os.path.join(out, "samples.npz")),
                                   load_images(os.path.join(fresh, "samples.npz")), atol=0, rtol=0)  # fmt: skip
        assert not os.path.exists(os.path.join(out, "npz_parts"))


def test_generate_redraws_a_truncated_png_and_ignores_leftover_temporaries(tiny_pipeline, tmp_path, capsys):
    generate = _load_example("generate")
    out, fresh = str(tmp_path / "s"), str(tmp_path / "fresh")
    common = ["--pipeline", tiny_pipeline, "--num_inference_steps", "2", "--num_images", "4", "--format", "both"]
    generate.main(["--output_dir", out] + common)
    generate.main(["--output_dir", fresh] + common)
    png = os.path.join(out, "000002.png")
    with open(png, "rb") as f:
        data = f.read()
    with open(png, "wb") as f:  # what an older, non-atomic version left after a kill
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="000002.png"):  # evaluate.py names the file it cannot read
        _load_example("evaluate").main([out, "--reference", "digits:heldout"])
    os.makedirs(os.path.join(out, "npz_parts"))
    with open(os.path.join(out, "npz_parts", "000000.npz.tmp.npz"), "wb") as f:  # an older version's temporary
        f.write(b"PK\x03\x04 truncated")
    result = generate.main(["--output_dir", out] + common)
    assert result["generated"] == 1 and "000002.png cannot be read" in capsys.readouterr().out
    torch.testing.assert_close(load_images(out), load_images(fresh), atol=0, rtol=0)
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))
