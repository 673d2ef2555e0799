"""NVlabs EDM2 snapshots (pixel and latent models, autoguidance presets) read by the restricted unpickler, on pickles
of the stand-in writer (tests/nvlabs_standin.py): default sampling against an independent float64 transcription of
EDM2's ``generate_images.py`` ``edm_sampler`` around EDM2's Precond written out here and a functional float64 U-Net
(tests/test_edm2.py), latent decoding against EDM2's ``StabilityVAEEncoder.decode`` formula, refusals, and the
command line's folders loaded by the package and by plain diffusers."""

import copy
import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from test_conversion import Reduce, pickle_globals
from test_edm2 import reference_unet

import nvlabs_standin as standin
from diffusers_stf import EDMPipeline
from diffusers_stf.conversion import NVlabsPickleError, load_nvlabs_edm, read_nvlabs_pickle
from diffusers_stf.models.edm2_unet import EDM2UNet

pytestmark = pytest.mark.usefixtures("one_thread")

# NVlabs' UNet defaults that the networks below leave unrecorded (training/networks_edm2.py), written out
NVLABS_DEFAULTS = dict(label_balance=0.5, concat_balance=0.5, res_balance=0.3, attn_balance=0.3, clip_act=256)
# name -> (img_channels, label_dim, model_channels, sigma_data, encoder)
NETWORKS = {
    "pixel": (3, 5, 8, 0.5, "rgb"),          # edm2-img64-s: conditional, StandardRGBEncoder
    "pixel_uncond": (3, 0, 8, 0.6, None),     # no encoder in the file, σ_data not EDM2's default
    "guide": (3, 5, 4, 0.5, "rgb"),           # edm2-img64-xs: the autoguidance presets' gnet
    "guide_uncond": (3, 0, 4, 0.5, "rgb"),    # edm2-img512-xs-uncond: the "-guid-" (CFG) presets' gnet
    "latent": (2, 5, 8, 0.5, "vae"),          # edm2-img512-s with a 2-channel VAE
    "latent_guide": (2, 5, 4, 0.5, "vae"),
}
RAW_MEAN, RAW_STD = [0.9, -1.7], [2.5, 0.6]  # the stand-in VAE encoder's raw latent statistics


def recorded_kwargs(name):
    """The arguments NVlabs' UNet records for network ``name``: interface, width, the changed structure."""
    channels, label_dim, width = NETWORKS[name][:3]
    return dict(img_resolution=8, img_channels=channels, label_dim=label_dim, model_channels=width, dropout=0.0,
                channel_mult=[1, 2], channel_mult_noise=1, channel_mult_emb=2, num_blocks=1, attn_resolutions=[4],
                channels_per_head=4)


def reference_config(name):
    """tests/test_edm2.py's config of the same network (diffusers names), NVlabs' defaults written out."""
    kw = recorded_kwargs(name)
    return dict(sample_size=8, in_channels=kw["img_channels"], out_channels=kw["img_channels"],
                num_class_embeds=kw["label_dim"] or None, model_channels=kw["model_channels"], channel_mult=(1, 2),
                channel_mult_noise=1, channel_mult_emb=2, num_blocks=1, attn_resolutions=(4,), channels_per_head=4,
                **NVLABS_DEFAULTS)


def random_network(name, seed):
    """A random EDM2 U-Net whose every weight shows in the output (the gains start at 0 in a fresh one)."""
    torch.manual_seed(seed)
    cfg = {k: v for k, v in reference_config(name).items() if k not in NVLABS_DEFAULTS}
    net = EDM2UNet(**cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand_like(p) * 0.5 + 0.3 if p.ndim == 0 else torch.randn_like(p))
    return net.eval()


def encoder(kind):
    return {"rgb": standin.standard_rgb_encoder(), None: None,
            "vae": standin.stability_vae_encoder(raw_mean=RAW_MEAN, raw_std=RAW_STD)}[kind]


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """name -> (snapshot path, the float64 state dict as the file holds it (float16 values))."""
    root = tmp_path_factory.mktemp("edm2")
    out = {}
    for seed, (name, (_, _, _, sigma_data, enc)) in enumerate(NETWORKS.items()):
        net = random_network(name, seed)
        snapshot = standin.edm2_snapshot(copy.deepcopy(net), recorded_kwargs(name), encoder(enc), sigma_data)
        path = root / f"edm2-{name}.pkl"
        standin.write(path, snapshot)
        out[name] = (path, {k: v.half().double() for k, v in net.state_dict().items()})
    return out


def tiny_vae(seed=0):
    """A random AutoencoderKL with 2 latent channels and one down-sampling (8x8 latents → 16x16 images)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=2, norm_num_groups=4, sample_size=16)
    return vae.eval()


# ---------------------------------------------------------------------------------------------------------------------
# The reference: EDM2's Precond and generate_images.py's edm_sampler, written out in float64


def raw_network(name, state):
    """F(x, c_noise, labels) of network ``name`` in float64 from the file's weights: the functional U-Net of
    tests/test_edm2.py for a conditional network, EDM2UNet rebuilt from the test's config for an unconditional one."""
    cfg = reference_config(name)
    if cfg["num_class_embeds"]:
        return lambda x, c_noise, labels: reference_unet(state, cfg, x, c_noise, labels)
    net = EDM2UNet(**cfg).double().eval()
    net.load_state_dict(state)
    return lambda x, c_noise, labels: net(x, c_noise).sample.detach()


def precond(name, state, labels):
    """D(x; σ) of EDM2's Precond: c_skip = σ_d²/(σ² + σ_d²), c_out = σ·σ_d/√(σ² + σ_d²), c_in = 1/√(σ_d² + σ²),
    c_noise = ln(σ)/4 (in float32, as the network receives it)."""
    sigma_data = NETWORKS[name][3]
    network = raw_network(name, state)
    conditional = bool(NETWORKS[name][1])

    def denoise(x, sigma):
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
        c_noise = (sigma.log() / 4).float().double().expand(x.shape[0])
        with torch.no_grad():
            return c_skip * x + c_out * network(c_in * x, c_noise, labels if conditional else None)

    return denoise


def edm_sampler(net, noise, gnet=None, guidance=1.0, num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """generate_images.py's edm_sampler (S_churn = 0), float64: Heun on the ρ-schedule from σ_max to σ_min, then 0,
    the last step Euler; with a guide, D = gnet(x).lerp(net(x), guidance)."""

    def denoise(x, t):
        d = net(x, t)
        return d if guidance == 1 else torch.lerp(gnet(x, t), d, guidance)

    i = torch.arange(num_steps, dtype=torch.float64)
    t_steps = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)])
    x_next = noise.double() * t_steps[0]
    for k, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        d_cur = (x_cur - denoise(x_cur, t_cur)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if k < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def edm2_vae_decode(vae, latents):
    """StabilityVAEEncoder.decode: x − bias, / scale (scale = 0.5/raw_std, bias = 0 − raw_mean·scale, float32),
    the VAE's decoder, clamp to [0, 1] (as pixels/255)."""
    scale = np.float32(0.5) / np.float32(RAW_STD)
    bias = np.float32(0) - np.float32(RAW_MEAN) * scale
    x = latents.to(torch.float32)
    x = (x - torch.from_numpy(bias).reshape(1, -1, 1, 1)) / torch.from_numpy(scale).reshape(1, -1, 1, 1)
    with torch.no_grad():
        return vae.decode(x).sample.clamp(0, 1)


def noise_and_labels(name, batch=2, seed=5):
    channels, label_dim = NETWORKS[name][:2]
    noise = torch.randn(batch, channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    labels = torch.tensor([1, 4][:batch]) if label_dim else None
    return noise, labels


def sample(pipe, noise, labels, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 32, "output_type": "latent", **kwargs}
    return pipe(batch_size=len(noise), latents=noise, class_labels=labels, **kwargs).images


def in_float64(pipe):
    pipe = copy.deepcopy(pipe)
    pipe.unet.double()
    if pipe.guide_unet is not None:
        pipe.guide_unet.double()
    return pipe


# ---------------------------------------------------------------------------------------------------------------------
# The stand-in's bytes, the converted parts


def test_standin_writes_the_globals_of_an_edm2_latent_snapshot(snapshots):
    data = (snapshots["latent"][0]).read_bytes()
    numpy_core = "numpy._core" if np.__version__ >= "2" else "numpy.core"
    assert pickle_globals(data) == {
        "torch_utils.persistence._reconstruct_persistent_obj", "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_tensor_v2", "torch.storage._load_from_bytes", "collections.OrderedDict",
        "torch.nn.modules.container.ModuleDict", "numpy.dtype", f"{numpy_core}.multiarray.scalar",
        f"{numpy_core}.multiarray._reconstruct", "numpy.ndarray", "dnnlib.util.EasyDict"}
    data = read_nvlabs_pickle(snapshots["latent"][0])
    assert list(data) == ["ema", "encoder", "loss_fn", "dataset_kwargs"]
    assert data["ema"].describe() == "Precond(UNet)" and data["encoder"].class_name == "StabilityVAEEncoder"
    scale = data["encoder"].attributes["scale"]
    assert scale.dtype == np.float32 and np.array_equal(scale, np.float32(0.5) / np.float32(RAW_STD))
    weights = data["ema"].modules["unet"].state_dict()
    assert all(v.dtype == torch.float16 for v in weights.values())
    assert set(data["ema"].modules) == {"unet", "logvar_fourier", "logvar_linear"}


def test_converted_networks_hold_the_pickled_weights_and_edm_preconditioning(snapshots):
    for name in ("pixel", "pixel_uncond", "guide_uncond"):
        path, state = snapshots[name]
        pipe = load_nvlabs_edm(path)
        assert type(pipe.unet) is EDM2UNet and pipe.unet.dtype == torch.float32
        ours = pipe.unet.state_dict()
        assert set(ours) == set(state) and all(torch.equal(ours[k].double(), v) for k, v in state.items()), name
        cfg = reference_config(name)
        assert {k: pipe.unet.config[k] for k in cfg} == {k: list(v) if isinstance(v, tuple) else v
                                                         for k, v in cfg.items()}, name
        scheduler = pipe.scheduler.config
        assert (scheduler.preconditioning, scheduler.sigma_data) == ("edm", NETWORKS[name][3])
        assert (scheduler.sigma_min, scheduler.sigma_max, scheduler.rho) == (0.002, 80.0, 7.0)
        assert pipe.vae is None and pipe.config.latent_scale is None


# ---------------------------------------------------------------------------------------------------------------------
# Default sampling: generate_images.py's edm_sampler


@pytest.mark.parametrize("name", ["pixel", "pixel_uncond"])
def test_pixel_model_samples_as_edm2s_edm_sampler(snapshots, name):
    path, state = snapshots[name]
    pipe = load_nvlabs_edm(path)
    noise, labels = noise_and_labels(name)
    reference = edm_sampler(precond(name, state, labels), noise)
    ours = sample(in_float64(pipe), noise, labels)
    assert ours.dtype == torch.float64 and reference.abs().max() > 0.5
    # the network's embedding runs in float32 (its noise label is float32, in EDM2 as here): agreement to ~3e-8;
    # sampling σ from 79 instead of 80 moves the samples by 2e-4
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(sample(pipe, noise, labels), reference, rtol=0, atol=2e-6)  # the float32 network
    sigmas = pipe.scheduler.sigmas
    assert len(sigmas) == 33 and float(sigmas[0]) == pytest.approx(80.0) and float(sigmas[-2]) == pytest.approx(0.002)
    # images as StandardRGBEncoder.decode: (x·127.5 + 128) clipped, as uint8
    pil = np.asarray(pipe(batch_size=2, latents=noise, class_labels=labels, num_inference_steps=32).images[1])
    expected = (reference[1].float() * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(pil.astype(int) - expected.astype(int)).max() <= 1


def test_latent_model_samples_and_decodes_as_edm2(snapshots):
    path, state = snapshots["latent"]
    vae = tiny_vae()
    pipe = load_nvlabs_edm(path, vae=vae)
    assert pipe.vae is vae and pipe.config.vae_pixel_range == [0.0, 1.0]
    scale = np.float32(0.5) / np.float32(RAW_STD)
    assert pipe.config.latent_scale == [float(v) for v in scale]
    assert pipe.config.latent_bias == [float(v) for v in np.float32(0) - np.float32(RAW_MEAN) * scale]
    noise, labels = noise_and_labels("latent")
    reference = edm_sampler(precond("latent", state, labels), noise)
    latents = sample(pipe, noise, labels)  # output_type="latent": the undecoded latents
    assert latents.shape == (2, 2, 8, 8)
    torch.testing.assert_close(latents, reference, rtol=0, atol=2e-6)
    images = sample(pipe, noise, labels, output_type="pt")
    expected = edm2_vae_decode(vae, reference)
    assert images.shape == (2, 3, 16, 16) and 0.05 < (expected == 0).float().mean() < 0.95  # the clamp matters
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("guide_name,w", [("guide", 1.7), ("guide_uncond", 1.4)])
def test_autoguidance_presets_sample_as_edm_sampler_with_gnet(snapshots, guide_name, w):
    """EDM2's -autog- presets (a smaller conditional gnet) and -guid- presets (an unconditional XS gnet)."""
    (path, state), (guide_path, guide_state) = snapshots["pixel"], snapshots[guide_name]
    pipe = load_nvlabs_edm(path, guide_path=guide_path)
    assert pipe.guide_unet.config.model_channels == 4
    noise, labels = noise_and_labels("pixel")
    net, gnet = precond("pixel", state, labels), precond(guide_name, guide_state, labels)
    reference = edm_sampler(net, noise, gnet=gnet, guidance=w)
    ours = sample(in_float64(pipe), noise, labels, autoguidance_scale=w)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    unguided = edm_sampler(net, noise)
    assert (reference - unguided).abs().max() > 1e-2  # the guide acts


def test_pipeline_decodes_latents_in_stable_diffusions_pixel_range_by_default():
    """Without vae_pixel_range the VAE's images are in [-1, 1] (diffusers' convention): image = (decoded + 1)/2."""
    from diffusers_stf import EDMHeunScheduler

    vae, scale, bias = tiny_vae(3), [2.0, 0.5], [0.1, -0.3]
    pipe = EDMPipeline(random_network("latent", 3), EDMHeunScheduler(), vae=vae, latent_scale=scale,
                       latent_bias=bias)
    noise, labels = noise_and_labels("latent")
    latents = sample(pipe, noise, labels, num_inference_steps=3)
    raw = (latents - torch.tensor(bias).reshape(1, 2, 1, 1)) / torch.tensor(scale).reshape(1, 2, 1, 1)
    with torch.no_grad():
        expected = (vae.decode(raw.float()).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(sample(pipe, noise, labels, num_inference_steps=3, output_type="pt"), expected,
                               rtol=0, atol=1e-5)
    bad = {"latent_scale": ([2.0], "one finite number per latent channel"),
           "latent_bias": ([0.0, float("nan")], "one finite number per latent channel"),
           "vae_pixel_range": ([1.0, 0.0], "lo < hi")}
    for key, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            EDMPipeline(pipe.unet, pipe.scheduler, vae=vae, **{"latent_scale": scale, "latent_bias": bias,
                                                               key: value})
    with pytest.raises(ValueError, match="latent_scale must be non-zero"):
        EDMPipeline(pipe.unet, pipe.scheduler, vae=vae, latent_scale=[2.0, 0.0], latent_bias=bias)


# ---------------------------------------------------------------------------------------------------------------------
# Refusals


def test_latent_and_pixel_models_refuse_the_wrong_vae(snapshots):
    with pytest.raises(ValueError, match=r"edm2-latent.pkl is a latent model \(encoder StabilityVAEEncoder, VAE "
                                         r"'stabilityai/sd-vae-ft-mse'\).*Pass vae=AutoencoderKL.from_pretrained"):
        load_nvlabs_edm(snapshots["latent"][0])
    with pytest.raises(ValueError, match="edm2-pixel.pkl is a pixel-space model .*it takes no vae"):
        load_nvlabs_edm(snapshots["pixel"][0], vae=tiny_vae())
    four = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    with pytest.raises(ValueError, match="the vae has latent_channels=4, the network samples 2 channels"):
        load_nvlabs_edm(snapshots["latent"][0], vae=four)
    with pytest.raises(ValueError, match="the guide edm2-guide.pkl does not fit edm2-latent.pkl: .* pixel-space"):
        load_nvlabs_edm(snapshots["latent"][0], vae=tiny_vae(), guide_path=snapshots["guide"][0])
    pipe = load_nvlabs_edm(snapshots["latent"][0], vae=tiny_vae())
    latent_only = EDMPipeline(pipe.unet, pipe.scheduler, latent_scale=pipe.config.latent_scale,
                              latent_bias=pipe.config.latent_bias)
    with pytest.raises(ValueError, match="samples latents .* but has no vae to decode them"):
        sample(latent_only, *noise_and_labels("latent"), num_inference_steps=2, output_type="pil")


def test_guides_that_do_not_fit_are_refused(snapshots, tmp_path):
    kwargs = dict(recorded_kwargs("guide"), label_dim=7)
    seven = EDM2UNet(**{**{k: v for k, v in reference_config("guide").items() if k not in NVLABS_DEFAULTS},
                        "num_class_embeds": 7})
    standin.write(tmp_path / "seven.pkl", standin.edm2_snapshot(seven, kwargs))
    with pytest.raises(ValueError, match="conditioned on 7 classes, edm2-pixel.pkl on 5"):
        load_nvlabs_edm(snapshots["pixel"][0], guide_path=tmp_path / "seven.pkl")
    standin.write(tmp_path / "sd.pkl", standin.edm2_snapshot(random_network("guide", 9), recorded_kwargs("guide"),
                                                             sigma_data=0.7))
    with pytest.raises(ValueError, match="has another preconditioning"):
        load_nvlabs_edm(snapshots["pixel"][0], guide_path=tmp_path / "sd.pkl")
    shifted = standin.stability_vae_encoder(raw_mean=[RAW_MEAN[0] + 0.5, RAW_MEAN[1]], raw_std=RAW_STD)
    standin.write(tmp_path / "shifted.pkl", standin.edm2_snapshot(random_network("latent_guide", 9),
                                                                  recorded_kwargs("latent_guide"), shifted))
    with pytest.raises(ValueError, match="the guide shifted.pkl samples another latent space than edm2-latent.pkl"):
        load_nvlabs_edm(snapshots["latent"][0], vae=tiny_vae(), guide_path=tmp_path / "shifted.pkl")


def test_malicious_edm2_pickles_execute_nothing(snapshots, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"open({str(marker)!r}, 'w').write('pwned')\n"
    name = "pixel"
    snapshot = standin.edm2_snapshot(random_network(name, 0), recorded_kwargs(name), standin.standard_rgb_encoder())
    snapshot["ema"].meta["module_src"] = payload
    snapshot["encoder"].meta["module_src"] = payload
    standin.write(tmp_path / "src.pkl", snapshot)
    pipe = load_nvlabs_edm(tmp_path / "src.pkl")  # converts, running nothing
    assert type(pipe.unet) is EDM2UNet and not marker.exists()
    attacks = {"encoder": Reduce(os.system, f"touch {marker}"),
               "dataset_kwargs": Reduce(np.ndarray, (2,)),  # numpy.ndarray itself, called
               "loss_fn": np.array(["a", "b"], dtype=object)}  # a numpy array of objects
    messages = {"encoder": "refers to the global", "dataset_kwargs": "called numpy.ndarray directly",
                "loss_fn": "is not a numeric type"}
    for key, attack in attacks.items():
        standin.write(tmp_path / "attack.pkl", {**snapshot, key: attack})
        with pytest.raises(NVlabsPickleError, match=messages[key]):
            load_nvlabs_edm(tmp_path / "attack.pkl")
        assert not marker.exists(), key
    encoder_record = standin.stability_vae_encoder(raw_mean=RAW_MEAN, raw_std=RAW_STD)
    encoder_record.meta["state"]["scale"] = np.float32([0.2, 0.3, 0.4])  # not one number per latent channel
    standin.write(tmp_path / "scale.pkl", standin.edm2_snapshot(random_network("latent", 0),
                                                                recorded_kwargs("latent"), encoder_record))
    with pytest.raises(NVlabsPickleError, match=r"StabilityVAEEncoder.scale is .*expected 2 finite numbers"):
        load_nvlabs_edm(tmp_path / "scale.pkl", vae=tiny_vae())


# ---------------------------------------------------------------------------------------------------------------------
# The command line: a latent, autoguided folder that the package and plain diffusers load


def test_command_line_writes_an_edm2_folder_that_plain_diffusers_samples_alike(snapshots, tmp_path):
    from safetensors.torch import load_file
    from test_hub import run_blocked

    from diffusers_stf.conversion.cli import main

    vae_folder = tmp_path / "sd-vae"
    tiny_vae().save_pretrained(vae_folder)
    out = tmp_path / "edm2-latent-autog"
    argv = ["edm2", str(snapshots["latent"][0]), str(out), "--vae", str(vae_folder),
            "--guide", str(snapshots["latent_guide"][0]), "--guidance", "2.1"]
    pipe = main(argv)
    card = (out / "README.md").read_text()
    assert f"python -m diffusers_stf.convert {' '.join(argv)}" in card
    assert "license: cc-by-nc-sa-4.0" in card and "CC BY-NC-SA 4.0" in card and "num_inference_steps=32" in card
    assert "autoguidance_scale=2.1" in card and "stabilityai/sd-vae-ft-mse" in card
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["vae_pixel_range"] == [0.0, 1.0]

    noise, labels = noise_and_labels("latent")
    kwargs = dict(num_inference_steps=3, autoguidance_scale=2.1)
    ours = {"pt": sample(pipe, noise, labels, output_type="pt", **kwargs),
            "latent": sample(pipe, noise, labels, **kwargs)}
    package = EDMPipeline.from_pretrained(out)
    assert type(package.vae) is AutoencoderKL and type(package.guide_unet) is EDM2UNet
    assert package.config.latent_scale == pipe.config.latent_scale
    assert torch.equal(sample(package, noise, labels, output_type="pt", **kwargs), ours["pt"])
    torch.save({"noise": noise, "labels": labels}, tmp_path / "inputs.pt")
    result = run_blocked(tmp_path, f"""
        import json
        import torch
        from diffusers import DiffusionPipeline
        from safetensors.torch import save_file
        pipe = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        out = {{t: pipe(batch_size=2, latents=inputs["noise"], class_labels=inputs["labels"], num_inference_steps=3,
                        autoguidance_scale=2.1, output_type=t).images.contiguous() for t in ("pt", "latent")}}
        save_file(out, {str(tmp_path / 'plain.safetensors')!r})
        print(json.dumps({{k: type(v).__name__ for k, v in pipe.components.items()}}))
    """, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    types = json.loads(result.stdout.strip().splitlines()[-1])
    assert types == {"unet": "EDM2UNet", "scheduler": "EDMHeunScheduler", "guide_unet": "EDM2UNet",
                     "vae": "AutoencoderKL"}
    plain = load_file(tmp_path / "plain.safetensors")
    assert torch.equal(plain["pt"], ours["pt"]) and torch.equal(plain["latent"], ours["latent"])


def test_command_line_refusals(snapshots, tmp_path):
    from diffusers_stf.conversion.cli import main

    with pytest.raises(SystemExit, match="--guide and --guidance go together"):
        main(["edm2", str(snapshots["pixel"][0]), str(tmp_path / "a"), "--guidance", "1.7"])
    with pytest.raises(SystemExit, match="is a latent model"):
        main(["edm2", str(snapshots["latent"][0]), str(tmp_path / "b")])
    with pytest.raises(SystemExit, match="edm2-pixel.pkl is an NVlabs EDM2 snapshot: convert it with `convert edm2`"):
        main(["edm", str(snapshots["pixel"][0]), str(tmp_path / "c")])  # EDM's card would say 18 steps
