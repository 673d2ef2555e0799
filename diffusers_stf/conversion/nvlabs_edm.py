"""NVlabs EDM snapshots (Karras et al. 2022) as :class:`~diffusers_stf.EDMPipeline` s, read without executing them;
the entry point :func:`load_nvlabs_edm` for EDM and EDM2 (:mod:`.nvlabs_edm2`) snapshots.

Layer 2 of the reader: :func:`~.unpickler.read_nvlabs_pickle` gives plain records; the two tables here turn them into
this package's objects, keyed by NVlabs' class names (a snapshot pickles the bare class name, e.g. ``'SongUNet'``):

* :data:`NETWORK_CONVERTERS`: network class → ``converter(record, source) -> model`` with the weights loaded
  (:func:`load_weights` refuses any mismatch). ``SongUNet`` and ``DhariwalUNet`` map to this package's classes of
  the same names, whose state-dict keys are NVlabs' own.
* :data:`PRECONDITIONING_CONVERTERS`: preconditioning class → ``converter(record) -> dict`` of
  :class:`~diffusers_stf.EDMHeunScheduler` config entries that express its constants (EDM Table 1).

A new architecture or project is one entry (:func:`register_network_converter`,
:func:`register_preconditioning_converter`); a project whose snapshot is laid out differently (EDM2: an encoder beside
the network) also registers how its snapshot becomes a pipeline (:data:`SNAPSHOT_READERS`, keyed by
:func:`snapshot_kind`).

Default sampling is NVlabs ``generate.py``'s ``edm_sampler``: 18 Heun steps of the ρ = 7 schedule from 80 to 0.002,
clamped to the network's own range (σ_min = max(0.002, net.σ_min), σ_max = min(80, net.σ_max)) and snapped by
``round_sigma`` (iDDPM's discrete levels). The scheduler's σ_min/σ_max are set to the clamped range, and the range the
scheduler actually samples is checked against it.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Dict, Mapping, Optional

import torch

from ..models.dhariwal_unet import DhariwalUNet
from ..models.song_unet import SongUNet
from ..pipelines.pipeline_edm import EDMPipeline, same_scalings
from ..schedulers import EDMHeunScheduler
from .unpickler import EasyDictRecord, ModuleRecord, NVlabsPickleError, read_nvlabs_pickle
from .weights import load_exactly

EDM_SNAPSHOT_KEYS = ("ema", "loss_fn", "augment_pipe", "dataset_kwargs")
EDM2_SNAPSHOT_KEYS = ("ema", "encoder", "loss_fn", "dataset_kwargs")
STYLEGAN_SNAPSHOT_KEYS = ("G", "D", "G_ema")
SAMPLER_SIGMA_MIN, SAMPLER_SIGMA_MAX = 0.002, 80.0  # generate.py's edm_sampler defaults
RANGE_RTOL = 1e-6

NetworkConverter = Callable[[ModuleRecord, str], torch.nn.Module]
PreconditioningConverter = Callable[[ModuleRecord], Dict[str, object]]
SnapshotReader = Callable[..., EDMPipeline]  # reader(data, source, vae=None) -> EDMPipeline
NETWORK_CONVERTERS: Dict[str, NetworkConverter] = {}
PRECONDITIONING_CONVERTERS: Dict[str, PreconditioningConverter] = {}
SNAPSHOT_READERS: Dict[str, SnapshotReader] = {}


def register_network_converter(class_name: str, converter: Optional[NetworkConverter] = None):
    """Register ``converter(record, source) -> model`` for NVlabs network class ``class_name`` (usable as a
    decorator). It returns the model with the record's weights loaded, e.g. with :func:`load_weights`."""
    if converter is None:
        return lambda function: register_network_converter(class_name, function)
    NETWORK_CONVERTERS[class_name] = converter
    return converter


def register_preconditioning_converter(class_name: str, converter: Optional[PreconditioningConverter] = None):
    """Register ``converter(record) -> EDMHeunScheduler config entries`` for NVlabs preconditioning class
    ``class_name`` (usable as a decorator). Without ``sigma_min``/``sigma_max`` entries the sampling range is
    ``edm_sampler``'s, clamped to the record's ``sigma_min``/``sigma_max`` attributes; a converter for a sampler
    that does not clamp (EDM2's: 0.002 to 80) sets them."""
    if converter is None:
        return lambda function: register_preconditioning_converter(class_name, function)
    PRECONDITIONING_CONVERTERS[class_name] = converter
    return converter


# ---------------------------------------------------------------------------------------------------------------------
# Weights


def load_weights(model: torch.nn.Module, record: ModuleRecord, source: str) -> torch.nn.Module:
    """Load ``record``'s parameters and buffers into ``model`` by name, refusing any difference in names or shapes
    (the message names the first ones). The values are cast to the model's dtypes (EDM2 stores float16)."""
    return load_exactly(model, record.state_dict(), f"{source}: the weights of {record.class_name} do not match "
                        f"{type(model).__name__} built from its pickled arguments")


def _network_kwargs(record: ModuleRecord, defaults: Mapping[str, object]) -> Dict[str, object]:
    """The network's constructor arguments: NVlabs' defaults updated with what the pickle recorded; an argument
    NVlabs' class does not take is refused."""
    unknown = sorted(set(record.init_kwargs) - set(defaults) - {"img_resolution", "in_channels", "out_channels"})
    if unknown or record.init_args:
        raise ValueError(f"{record.class_name} was built with arguments this converter does not know: "
                         f"{unknown or list(record.init_args)}")
    return {**defaults, **record.init_kwargs}


# NVlabs' defaults (EDM training/networks.py), for the arguments a snapshot did not record.
SONG_UNET_DEFAULTS = dict(
    label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4, num_blocks=4,
    attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type="positional", channel_mult_noise=1,
    encoder_type="standard", decoder_type="standard", resample_filter=[1, 1],
)
DHARIWAL_UNET_DEFAULTS = dict(
    label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4, num_blocks=3,
    attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0,
)


def nvlabs_unet_config(record: ModuleRecord, defaults: Mapping[str, object]) -> Dict[str, object]:
    """Our config for an EDM UNet record: NVlabs' arguments with ``img_resolution`` → ``sample_size`` and
    ``label_dim`` → ``num_class_embeds`` (None for 0)."""
    kwargs = _network_kwargs(record, defaults)
    config = {k: v for k, v in kwargs.items() if k not in ("img_resolution", "label_dim")}
    config.update(sample_size=kwargs["img_resolution"], num_class_embeds=kwargs["label_dim"] or None)
    for key, value in config.items():
        if isinstance(value, tuple):
            config[key] = list(value)
    return config


@register_network_converter("SongUNet")
def _song_unet(record: ModuleRecord, source: str) -> SongUNet:
    """EDM's DDPM++/NCSN++ network → :class:`~diffusers_stf.models.song_unet.SongUNet` (NVlabs' parameter names)."""
    return load_weights(SongUNet(**nvlabs_unet_config(record, SONG_UNET_DEFAULTS)), record, source)


@register_network_converter("DhariwalUNet")
def _dhariwal_unet(record: ModuleRecord, source: str) -> DhariwalUNet:
    """EDM's ADM network → :class:`~diffusers_stf.models.dhariwal_unet.DhariwalUNet` (NVlabs' parameter names)."""
    return load_weights(DhariwalUNet(**nvlabs_unet_config(record, DHARIWAL_UNET_DEFAULTS)), record, source)


# ---------------------------------------------------------------------------------------------------------------------
# Preconditionings (EDM Table 1) as scheduler config entries


def _attribute(record: ModuleRecord, name: str) -> float:
    value = record.attributes.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{record.class_name} has no numeric attribute {name!r} (got {value!r})")
    return float(value)


@register_preconditioning_converter("EDMPrecond")
def _edm_preconditioning(record: ModuleRecord) -> Dict[str, object]:
    return {"preconditioning": "edm", "sigma_data": _attribute(record, "sigma_data")}


@register_preconditioning_converter("VPPrecond")
def _vp_preconditioning(record: ModuleRecord) -> Dict[str, object]:
    """σ(t) = √(exp(½β_d t² + β_min t) − 1), c_noise = (M − 1)·t(σ): the scheduler's ``vp`` takes β_min = T·β_start and
    β_d = T·(β_end − β_start) with T = M. ε_t enters through the sampling range's lower bound max(0.002, net.σ_min),
    taken from the pickle as NVlabs computed it (in float32; σ(ε_t) in float64 differs in the 5th digit)."""
    beta_d, beta_min, M = (_attribute(record, k) for k in ("beta_d", "beta_min", "M"))
    if M != int(M) or M < 2:
        raise ValueError(f"VPPrecond.M must be an integer >= 2, got {M}")
    return {"preconditioning": "vp", "num_train_timesteps": int(M), "beta_start": beta_min / M,
            "beta_end": (beta_d + beta_min) / M, "beta_schedule": "linear"}


@register_preconditioning_converter("VEPrecond")
def _ve_preconditioning(record: ModuleRecord) -> Dict[str, object]:
    """c_noise = ln(σ/2); the network's σ range [σ_min, σ_max] clamps sampling."""
    return {"preconditioning": "ve", "ve_sigma_min": _attribute(record, "sigma_min"),
            "ve_sigma_max": _attribute(record, "sigma_max")}


@register_preconditioning_converter("iDDPMPrecond")
def _iddpm_preconditioning(record: ModuleRecord) -> Dict[str, object]:
    """The levels u_j of EDM eq. 99 with the network's M, C_1 and C_2, and the pickled levels themselves (NVlabs
    computes them in float32, which differs from eq. 99 in float64 by up to ~1e-3 at the smallest levels; sampling
    snaps σ to the network's own)."""
    c1, c2, M = (_attribute(record, k) for k in ("C_1", "C_2", "M"))
    if M != int(M) or M < 2:
        raise ValueError(f"iDDPMPrecond.M must be an integer >= 2, got {M}")
    config = {"preconditioning": "iddpm", "num_train_timesteps": int(M), "iddpm_c1": c1, "iddpm_c2": c2}
    u = record.buffers.get("u")
    if u is not None:
        if u.shape != (int(M) + 1,):
            raise ValueError(f"iDDPMPrecond's levels u have shape {tuple(u.shape)}, expected ({int(M) + 1},)")
        config["iddpm_levels"] = u[:-1].double().tolist()  # u_M = 0 is not a level
    return config


def sampling_range(record: ModuleRecord):
    """edm_sampler's σ range for this network: (max(0.002, net.σ_min), min(80, net.σ_max))."""
    return (max(SAMPLER_SIGMA_MIN, _attribute(record, "sigma_min")),
            min(SAMPLER_SIGMA_MAX, _attribute(record, "sigma_max")))


def scheduler_from_record(record: ModuleRecord) -> EDMHeunScheduler:
    """The :class:`EDMHeunScheduler` of a preconditioning record: its Table 1 row and constants, sampling as
    ``edm_sampler`` does. What the scheduler's config cannot express is refused (ValueError)."""
    if record.class_name not in PRECONDITIONING_CONVERTERS:
        raise ValueError(f"no converter for the preconditioning {record.class_name!r}; "
                         f"known: {sorted(PRECONDITIONING_CONVERTERS)}")
    config = PRECONDITIONING_CONVERTERS[record.class_name](record)
    if "sigma_min" not in config or "sigma_max" not in config:
        config.update(zip(("sigma_min", "sigma_max"), sampling_range(record)))
    sigma_min, sigma_max = config["sigma_min"], config["sigma_max"]
    scheduler = EDMHeunScheduler(**config)

    def snap(values):  # compared after round_sigma, as sampling uses them (iDDPM: NVlabs' float32 levels, ours float64)
        return scheduler.preconditioning.round_sigma(torch.tensor(values, dtype=torch.float64)).tolist()

    got = scheduler.sigma_range
    if not all(math.isclose(a, b, rel_tol=RANGE_RTOL) for a, b in zip(snap(got), snap((sigma_min, sigma_max)))):
        raise ValueError(
            f"{record.class_name} supports σ ∈ [{record.attributes.get('sigma_min')}, "
            f"{record.attributes.get('sigma_max')}], so edm_sampler samples σ ∈ [{sigma_min:.6g}, {sigma_max:.6g}]; "
            f"EDMHeunScheduler's {scheduler.config.preconditioning!r} preconditioning limits the range to "
            f"[{got[0]:.6g}, {got[1]:.6g}] and cannot express it"
        )
    _check_constants(record, scheduler)
    return scheduler


def _check_constants(record: ModuleRecord, scheduler: EDMHeunScheduler):
    """The scheduler's preconditioning has the record's constants (a wrong mapping fails here, not in sampling)."""
    p = scheduler.preconditioning
    names = {"VPPrecond": ("beta_d", "beta_min", "M"), "VEPrecond": ("sigma_min", "sigma_max"),
             "iDDPMPrecond": ("M", "C1", "C2")}.get(record.class_name, ())
    for name in names:
        theirs = _attribute(record, {"C1": "C_1", "C2": "C_2"}.get(name, name))
        if not math.isclose(getattr(p, name), theirs, rel_tol=1e-12):
            raise ValueError(f"{record.class_name}.{name}={theirs} became {getattr(p, name)}")


# ---------------------------------------------------------------------------------------------------------------------
# Snapshots


def snapshot_kind(data, source: str) -> str:
    """``'edm'`` or ``'edm2'`` for an NVlabs diffusion snapshot; a ValueError naming what was found otherwise."""
    if not isinstance(data, dict):
        raise NVlabsPickleError(f"{source} holds a {type(data).__name__}, not an NVlabs snapshot dict")
    keys = list(data)
    if any(k in data for k in STYLEGAN_SNAPSHOT_KEYS) and "ema" not in data:
        raise NVlabsPickleError(f"{source} is a StyleGAN-family snapshot (top-level keys {keys}), not an EDM one")
    ema = data.get("ema")
    if not isinstance(ema, ModuleRecord):
        raise NVlabsPickleError(f"{source} is not an NVlabs EDM snapshot: top-level keys {keys}, expected "
                                f"{list(EDM_SNAPSHOT_KEYS)} with 'ema' a pickled network")
    if isinstance(data, EasyDictRecord) or "encoder" in data or ema.class_name == "Precond":
        return "edm2"
    return "edm"


def edm_network_record(data, source: str) -> ModuleRecord:
    """The ``ema`` preconditioning record of a snapshot, refused with a message naming what the file holds where
    no converter knows it (StyleGAN, another network)."""
    kind = snapshot_kind(data, source)
    ema = data["ema"]
    if ema.class_name not in PRECONDITIONING_CONVERTERS:
        raise NVlabsPickleError(f"{source}: an NVlabs {kind.upper()} snapshot whose ema is {ema.describe()}, not one "
                                f"of the known preconditionings {sorted(PRECONDITIONING_CONVERTERS)}")
    return ema


def pipeline_from_snapshot(data, source: str = "the snapshot", vae=None) -> EDMPipeline:
    """An :class:`EDMPipeline` from the plain data of a snapshot (:func:`~.unpickler.read_nvlabs_pickle`), by the
    reader of its kind (:data:`SNAPSHOT_READERS`); ``vae`` decodes a latent model's samples."""
    kind = snapshot_kind(data, source)
    if kind not in SNAPSHOT_READERS:
        raise NVlabsPickleError(f"{source} is an NVlabs {kind.upper()} snapshot (top-level keys {list(data)}, ema = "
                                f"{data['ema'].describe()}); no reader is registered for it")
    return SNAPSHOT_READERS[kind](data, source, vae=vae)


def _edm_pipeline(data, source: str, vae=None) -> EDMPipeline:
    """EDM's snapshot: the ``ema`` preconditioning's ``model`` network and its scheduler (pixel models only)."""
    if vae is not None:
        raise ValueError(f"{source} is an EDM snapshot of a pixel-space model; it takes no vae")
    precond = edm_network_record(data, source)
    network = precond.modules.get("model")
    if not isinstance(network, ModuleRecord):
        raise NVlabsPickleError(f"{source}: {precond.class_name} has no 'model' network")
    expected = precond.init_kwargs.get("model_type")
    if expected is not None and expected != network.class_name:
        raise NVlabsPickleError(f"{source}: {precond.class_name} says model_type={expected!r} but holds "
                                f"{network.class_name}")
    if network.class_name not in NETWORK_CONVERTERS:
        raise NVlabsPickleError(f"{source}: no converter for the network {network.class_name!r}; "
                                f"known: {sorted(NETWORK_CONVERTERS)}")
    scheduler = scheduler_from_record(precond)
    unet = NETWORK_CONVERTERS[network.class_name](network, source).eval()
    for name, ours in (("img_resolution", "sample_size"), ("img_channels", "in_channels")):
        theirs = precond.attributes.get(name)
        if theirs is not None and unet.config.get(ours) != theirs:
            raise ValueError(f"{source}: {precond.class_name}.{name}={theirs} but the network has {ours}="
                             f"{unet.config.get(ours)}")
    return EDMPipeline(unet=unet, scheduler=scheduler)


SNAPSHOT_READERS["edm"] = _edm_pipeline


def with_guide(pipeline: EDMPipeline, guide: EDMPipeline, source: str, guide_source: str) -> EDMPipeline:
    """``pipeline`` with ``guide``'s network as its autoguidance ``guide_unet`` (``autoguidance_scale=w`` then
    samples with D_guide + w·(D − D_guide), EDM2's ``gnet(x).lerp(net(x), w)``). The guide must denoise the same
    images in the same coordinates: the same preconditioning, latent space and, if it takes labels, label set."""
    if not same_scalings(guide.scheduler.preconditioning, pipeline.scheduler.preconditioning):
        raise ValueError(f"the guide {guide_source} has another preconditioning than {source} "
                         f"({dict(guide.scheduler.config)} vs {dict(pipeline.scheduler.config)})")
    latent_keys = ("latent_scale", "latent_bias", "vae_pixel_range")
    ours, theirs = ({k: p.config.get(k) for k in latent_keys} for p in (pipeline, guide))
    if ours != theirs:
        raise ValueError(f"the guide {guide_source} samples another latent space than {source}: {theirs} vs {ours}")
    guide_classes = guide.unet.config.get("num_class_embeds")
    if guide_classes is not None and guide_classes != pipeline.unet.config.get("num_class_embeds"):
        raise ValueError(f"the guide {guide_source} is conditioned on {guide_classes} classes, "
                         f"{source} on {pipeline.unet.config.get('num_class_embeds')}")
    components = {k: v for k, v in pipeline.components.items() if k != "guide_unet"}
    config = {k: pipeline.config.get(k) for k in ("null_class_label", *latent_keys)
              if pipeline.config.get(k) is not None}
    return EDMPipeline(**components, guide_unet=guide.unet, **config)


def guide_from_snapshot(data, guide_source: str, source: str, vae=None) -> EDMPipeline:
    """The pipeline of a guide snapshot for the model ``source`` (the same ``vae``); a guide that cannot be built so
    is refused naming both."""
    try:
        return pipeline_from_snapshot(data, guide_source, vae=vae)
    except NVlabsPickleError:
        raise
    except ValueError as err:
        raise ValueError(f"the guide {guide_source} does not fit {source}: {err}") from None


def load_nvlabs_edm(path: str, device: Optional[torch.device] = None, vae=None,
                    guide_path: Optional[str] = None) -> EDMPipeline:
    """An NVlabs EDM or EDM2 snapshot as an :class:`EDMPipeline`, read without executing anything from the file.

    * EDM (``edm-*.pkl``, ``network-snapshot-*.pkl``): the ``ema`` network converted to this package's class of the
      same name, with its weights, and an :class:`EDMHeunScheduler` whose preconditioning and constants are the
      pickled ``EDMPrecond`` / ``VPPrecond`` / ``VEPrecond`` / ``iDDPMPrecond``'s. ``pipeline(num_inference_steps=18)``
      samples as NVlabs' ``generate.py`` (``edm_sampler``). ``loss_fn``, ``augment_pipe`` and ``dataset_kwargs`` are
      not used.
    * EDM2 (``edm2-img64-*.pkl``, ``edm2-img512-*.pkl``, its training and post-hoc EMA snapshots): see
      :mod:`.nvlabs_edm2`; ``pipeline(num_inference_steps=32)`` samples as EDM2's ``generate_images.py``. A latent
      model (``edm2-img512-*``) needs ``vae``.

    Args:
        path: the ``.pkl`` file.
        device: where to put the pipeline (default: the CPU).
        vae: for a latent EDM2 model, the ``AutoencoderKL`` its encoder names (``stabilityai/sd-vae-ft-mse``),
            loaded by the caller, e.g. ``AutoencoderKL.from_pretrained(folder)``; refused for a pixel model.
        guide_path: a second snapshot whose network becomes the autoguidance ``guide_unet`` (EDM2's ``--gnet``);
            sample with ``autoguidance_scale=`` the preset's ``guidance``.

    Raises:
        NVlabsPickleError: the file is not an EDM or EDM2 snapshot (a global outside the format, a StyleGAN
            snapshot, a truncated file); nothing from it was executed.
        ValueError: the weights do not match the architecture, a constant the scheduler cannot express, a latent
            model without a vae, a guide that does not fit.
    """
    source = os.path.basename(os.fspath(path))
    pipeline = pipeline_from_snapshot(read_nvlabs_pickle(path), source, vae=vae)
    if guide_path is not None:
        guide_source = os.path.basename(os.fspath(guide_path))
        guide = guide_from_snapshot(read_nvlabs_pickle(guide_path), guide_source, source, vae)
        pipeline = with_guide(pipeline, guide, source, guide_source)
    return pipeline.to(device) if device is not None else pipeline
