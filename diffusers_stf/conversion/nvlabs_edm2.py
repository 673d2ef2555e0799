"""NVlabs EDM2 snapshots (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models") as
:class:`~diffusers_stf.EDMPipeline` s, read without executing them.

An EDM2 snapshot (the published ``edm2-img64-*.pkl`` and ``edm2-img512-*.pkl``, training's
``network-snapshot-*.pkl``, ``reconstruct_phema.py``'s output) is ``EasyDict(ema=Precond(UNet), encoder, loss_fn,
dataset_kwargs)`` with the network stored in float16. Its parts become:

* ``UNet`` → :class:`~diffusers_stf.models.edm2_unet.EDM2UNet` (NVlabs' parameter names), the float16 weights held
  exactly in float32;
* ``Precond`` → :class:`EDMHeunScheduler` with the ``edm`` preconditioning and the pickled σ_data (EDM2's Precond is
  EDM's, c_noise = ln(σ)/4), sampling σ from 80 to 0.002 as ``generate_images.py``'s ``edm_sampler`` (which does not
  clamp to the network). The log-variance head u(σ) (``logvar_fourier``, ``logvar_linear``) weights only the training
  loss and is not converted;
* ``encoder``: ``StandardRGBEncoder`` (pixel models, ``edm2-img64-*``) maps x ∈ [-1, 1] to pixels as every pixel
  pipeline of this package does. ``StabilityVAEEncoder`` (latent models, ``edm2-img512-*``) stores a per-channel
  ``scale`` and ``bias`` (latents = raw·scale + bias) and the name of a Stable Diffusion VAE, not its weights: the
  caller supplies that VAE as the pipeline's ``vae``, and the pipeline decodes as EDM2 does, pixels =
  clamp(vae.decode((latents − bias)/scale), 0, 1) (EDM2 runs the VAE on pixels in [0, 1]: ``vae_pixel_range``);
* ``loss_fn`` and ``dataset_kwargs`` are not used.

Sampling: ``edm_sampler`` takes 32 Heun steps, so ``pipeline(num_inference_steps=32)`` (the pipeline's default, 18,
is EDM's). It runs in float32 and ours in float64, and EDM2 runs the network in float16 on CUDA (``use_fp16``):
samples agree to those precisions. A class-conditional network takes class indices (EDM2 passes one-hot rows;
:class:`EDM2UNet` takes either). Guidance: ``edm_sampler(net, gnet=…, guidance=w)`` evaluates
``gnet(x).lerp(net(x), w)``, which is ``autoguidance_scale=w`` with ``guide_unet`` = gnet's network, both for the
``-guid-`` presets (gnet an unconditional XS model: EDM2's classifier-free guidance) and the ``-autog-`` presets (gnet
a smaller or shorter-trained model): :func:`~.nvlabs_edm.load_nvlabs_edm` with ``guide_path``.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from ..models.edm2_unet import EDM2UNet
from ..pipelines.pipeline_edm import EDMPipeline
from .nvlabs_edm import (
    NETWORK_CONVERTERS,
    SAMPLER_SIGMA_MAX,
    SAMPLER_SIGMA_MIN,
    SNAPSHOT_READERS,
    _attribute,
    edm_network_record,
    load_weights,
    register_network_converter,
    register_preconditioning_converter,
    scheduler_from_record,
)
from .unpickler import ModuleRecord, NVlabsPickleError

# NVlabs' defaults (EDM2 training/networks_edm2.py: UNet and the Block keywords it passes on), for the arguments a
# snapshot did not record
EDM2_UNET_DEFAULTS = dict(
    label_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_noise=None, channel_mult_emb=None,
    num_blocks=3, attn_resolutions=[16, 8], label_balance=0.5, concat_balance=0.5, resample_filter=[1, 1],
    channels_per_head=64, dropout=0, res_balance=0.3, attn_balance=0.3, clip_act=256,
)
EDM2_PIXEL_RANGE = [0.0, 1.0]  # StabilityVAEEncoder encodes pixels / 255 and clamps the decoded images to [0, 1]


def edm2_unet_config(record: ModuleRecord) -> Dict[str, object]:
    """Our config for EDM2's ``UNet`` record: NVlabs' arguments with ``img_resolution`` → ``sample_size``,
    ``img_channels`` → ``in_channels`` and ``out_channels``, ``label_dim`` → ``num_class_embeds`` (None for 0)."""
    required = ("img_resolution", "img_channels")
    unknown = sorted(set(record.init_kwargs) - set(EDM2_UNET_DEFAULTS) - set(required))
    missing = [k for k in required if k not in record.init_kwargs]
    if unknown or missing or record.init_args:
        raise ValueError(f"{record.class_name} was built with arguments this converter does not know: "
                         f"{unknown or list(record.init_args) or f'{missing} missing'}")
    kwargs = {**EDM2_UNET_DEFAULTS, **record.init_kwargs}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()
              if k not in (*required, "label_dim")}
    config.update(sample_size=kwargs["img_resolution"], in_channels=kwargs["img_channels"],
                  out_channels=kwargs["img_channels"], num_class_embeds=kwargs["label_dim"] or None)
    return config


@register_network_converter("UNet")
def _edm2_unet(record: ModuleRecord, source: str) -> EDM2UNet:
    """EDM2's magnitude-preserving network → :class:`EDM2UNet` (NVlabs' parameter names)."""
    return load_weights(EDM2UNet(**edm2_unet_config(record)), record, source)


@register_preconditioning_converter("Precond")
def _edm2_preconditioning(record: ModuleRecord) -> Dict[str, object]:
    """EDM's preconditioning with the pickled σ_data; σ from 80 to 0.002, unclamped (``generate_images.py``)."""
    return {"preconditioning": "edm", "sigma_data": _attribute(record, "sigma_data"),
            "sigma_min": SAMPLER_SIGMA_MIN, "sigma_max": SAMPLER_SIGMA_MAX}


def latent_decoding(encoder, source: str, channels: int, vae=None) -> Dict[str, object]:
    """The pipeline's decoding entries for EDM2's ``encoder`` record: none for ``StandardRGBEncoder`` (or no encoder:
    ``generate_images.py`` then uses it), the ``vae`` with ``latent_scale``, ``latent_bias`` and ``vae_pixel_range``
    for ``StabilityVAEEncoder``."""
    name = encoder.class_name if isinstance(encoder, ModuleRecord) else None
    if encoder is None or name == "StandardRGBEncoder":
        if vae is not None:
            raise ValueError(f"{source} is a pixel-space model (encoder {name or 'none, i.e. StandardRGBEncoder'}); "
                             "it takes no vae")
        return {}
    if name != "StabilityVAEEncoder":
        raise NVlabsPickleError(f"{source}: the encoder is {name or type(encoder).__name__!r}, not one EDM2 writes "
                                "(StandardRGBEncoder, StabilityVAEEncoder)")
    vae_name = encoder.attributes.get("vae_name")
    values = {}
    for key in ("scale", "bias"):
        value = encoder.attributes.get(key)
        if not (isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.shape == (channels,)
                and np.isfinite(value).all()):
            raise NVlabsPickleError(f"{source}: StabilityVAEEncoder.{key} is {value!r}, expected {channels} finite "
                                    "numbers (one per latent channel)")
        values[key] = [float(v) for v in value]
    if vae is None:
        raise ValueError(f"{source} is a latent model (encoder StabilityVAEEncoder, VAE {vae_name!r}): its images "
                         f"need that VAE's decoder, which the file does not hold. Pass vae=AutoencoderKL."
                         f"from_pretrained(<a folder of {vae_name}>) (command line: --vae FOLDER)")
    latent_channels = getattr(vae, "config", {}).get("latent_channels")
    if latent_channels != channels:
        raise ValueError(f"{source}: the vae has latent_channels={latent_channels!r}, the network samples {channels} "
                         f"channels (EDM2 names the VAE {vae_name!r})")
    return dict(vae=vae, latent_scale=values["scale"], latent_bias=values["bias"], vae_pixel_range=EDM2_PIXEL_RANGE)


def pipeline_from_edm2_snapshot(data, source: str = "the snapshot", vae=None) -> EDMPipeline:
    """An :class:`EDMPipeline` from the plain data of an EDM2 snapshot (:func:`~.unpickler.read_nvlabs_pickle`)."""
    precond = edm_network_record(data, source)
    network = precond.modules.get("unet")
    if precond.class_name != "Precond" or not isinstance(network, ModuleRecord):
        raise NVlabsPickleError(f"{source}: an EDM2 snapshot whose ema is {precond.describe()}, expected "
                                "Precond(UNet)")
    if network.class_name not in NETWORK_CONVERTERS:
        raise NVlabsPickleError(f"{source}: no converter for the network {network.class_name!r}; "
                                f"known: {sorted(NETWORK_CONVERTERS)}")
    scheduler = scheduler_from_record(precond)
    unet = NETWORK_CONVERTERS[network.class_name](network, source).eval()
    for name, ours in (("img_resolution", "sample_size"), ("img_channels", "in_channels"),
                       ("label_dim", "num_class_embeds")):
        theirs = precond.attributes.get(name)
        if name == "label_dim":
            theirs = theirs or None
        if name in precond.attributes and unet.config.get(ours) != theirs:
            raise ValueError(f"{source}: Precond.{name}={precond.attributes[name]} but the network has {ours}="
                             f"{unet.config.get(ours)}")
    decoding = latent_decoding(data.get("encoder"), source, unet.config.in_channels, vae)
    return EDMPipeline(unet=unet, scheduler=scheduler, **decoding)


SNAPSHOT_READERS["edm2"] = pipeline_from_edm2_snapshot

