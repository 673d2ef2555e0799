"""A stand-in writer of NVlabs training snapshots for the tests: pickles with the structure of EDM's (and EDM2's and
StyleGAN's) files, written without NVlabs' code (/work/shared/notes/official-checkpoints.md has the facts).

While pickling, stub modules ``torch_utils.persistence`` (with ``_reconstruct_persistent_obj``) and ``dnnlib.util``
(with ``EasyDict``) sit in ``sys.modules``, so that plain ``pickle.dump`` records those globals; they are removed
afterwards. Every network module becomes a REDUCE of ``_reconstruct_persistent_obj(meta)`` with ``meta = dict(type,
version, module_src, class_name, state)`` and ``state`` the module's ``__dict__`` (torch's internals, ``_init_args``,
``_init_kwargs`` and attributes); a ``torch.nn.ModuleDict`` stays a torch ModuleDict whose children are persistent;
tensors and parameters pickle the way plain pickle pickles them.
"""

from __future__ import annotations

import collections
import contextlib
import math
import pickle
import sys
import types
from typing import Dict, Optional

import numpy as np
import torch

STANDIN_SOURCE = '"""Stand-in for the source of training/networks.py; a safe reader never runs it."""\n'
TORCH_INTERNALS = frozenset(torch.nn.Module().__dict__)  # _parameters, _buffers, _modules, the hook dicts, training


@contextlib.contextmanager
def nvlabs_globals():
    """Stub ``torch_utils.persistence`` and ``dnnlib.util`` in ``sys.modules`` for the duration of the block."""

    def _reconstruct_persistent_obj(meta):
        raise RuntimeError("the stand-in only writes snapshots")

    modules = {name: types.ModuleType(name) for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")}
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    modules["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    modules["dnnlib.util"].EasyDict = EasyDictValue
    modules["torch_utils"].persistence = modules["torch_utils.persistence"]
    modules["dnnlib"].util = modules["dnnlib.util"]
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield modules
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class Persistent:
    """A persistent object: pickles as REDUCE(torch_utils.persistence._reconstruct_persistent_obj, (meta,))."""

    def __init__(self, class_name: str, state: dict, module_src: str = STANDIN_SOURCE, version: int = 6):
        self.meta = dict(type="class", version=version, module_src=module_src, class_name=class_name, state=state)

    def __reduce__(self):
        return sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,)


class EasyDictValue(dict):
    """A dict that pickles as ``dnnlib.util.EasyDict`` (EDM2's top level) inside :func:`nvlabs_globals`."""


EasyDictValue.__module__, EasyDictValue.__qualname__ = "dnnlib.util", "EasyDict"


def module_state(module: torch.nn.Module, children: Dict[str, object], init_kwargs: dict, attributes: dict) -> dict:
    """``module.__dict__`` as NVlabs pickles it: torch's internals (with ``_modules`` replaced by ``children``), the
    recorded constructor arguments and the given attributes."""
    state = {k: v for k, v in module.__dict__.items() if k in TORCH_INTERNALS}
    state["_modules"] = collections.OrderedDict(children)
    state.update(_init_args=(), _init_kwargs=dict(init_kwargs), **attributes)
    return state


def persistent_tree(module: torch.nn.Module, class_name: str, init_kwargs: dict, attributes: Optional[dict] = None,
                    module_src: str = STANDIN_SOURCE):
    """``module`` and its descendants as persistent objects (a ModuleDict as a torch ModuleDict holding them).
    Descendants are named by their torch class and record numpy scalars in their arguments, as NVlabs' blocks do
    (``skip_scale=np.sqrt(0.5)``)."""

    def convert(child):
        if child is None:
            return None
        if isinstance(child, torch.nn.ModuleDict):
            holder = torch.nn.ModuleDict()
            holder.__dict__["_modules"] = collections.OrderedDict((k, convert(v)) for k, v in child._modules.items())
            return holder
        grandchildren = {k: convert(v) for k, v in child._modules.items()}
        return Persistent(type(child).__name__, module_state(child, grandchildren, {"skip_scale": np.sqrt(0.5)}, {}),
                          module_src)

    children = {k: convert(v) for k, v in module._modules.items()}
    return Persistent(class_name, module_state(module, children, init_kwargs, attributes or {}), module_src)


# ---------------------------------------------------------------------------------------------------------------------
# EDM's preconditionings (networks.py's four classes), with the attributes NVlabs sets in __init__


def vp_sigma(beta_d, beta_min, t):
    """σ(t) as NVlabs' VPPrecond computes it at construction (float32 tensors)."""
    t = torch.as_tensor(t)
    return float(((0.5 * beta_d * t**2 + beta_min * t).exp() - 1).sqrt())


def iddpm_levels(M, C_1, C_2) -> torch.Tensor:
    """u_0 > … > u_M = 0 as NVlabs' iDDPMPrecond stores them (float32)."""
    u = torch.zeros(M + 1)
    alpha_bar = lambda j: (0.5 * math.pi * torch.as_tensor(j) / M / (C_2 + 1)).sin() ** 2  # noqa: E731
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


def preconditioning(kind: str, network: Persistent, img_resolution: int, img_channels: int, label_dim: int = 0,
                    model_type: str = "TinyUNet", model_kwargs: Optional[dict] = None, **constants) -> Persistent:
    """A ``{kind}`` record (``EDMPrecond``, ``VPPrecond``, ``VEPrecond``, ``iDDPMPrecond``) around ``network``."""
    defaults = {"EDMPrecond": dict(sigma_min=0, sigma_max=float("inf"), sigma_data=0.5),
                "VPPrecond": dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
                "VEPrecond": dict(sigma_min=0.02, sigma_max=100),
                "iDDPMPrecond": dict(C_1=0.001, C_2=0.008, M=1000)}[kind]
    values = {**defaults, **constants}
    attributes = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, use_fp16=False,
                      **values)
    buffers = collections.OrderedDict()
    if kind == "VPPrecond":
        attributes.update(sigma_min=vp_sigma(values["beta_d"], values["beta_min"], values["epsilon_t"]),
                          sigma_max=vp_sigma(values["beta_d"], values["beta_min"], 1))
    if kind == "iDDPMPrecond":
        buffers["u"] = iddpm_levels(values["M"], values["C_1"], values["C_2"])
        attributes.update(sigma_min=float(buffers["u"][values["M"] - 1]), sigma_max=float(buffers["u"][0]))
    init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                       model_type=model_type, **constants, **(model_kwargs or {}))
    holder = torch.nn.Module()
    for name, tensor in buffers.items():
        holder.register_buffer(name, tensor)
    return Persistent(kind, module_state(holder, {"model": network}, init_kwargs, attributes))


def edm_snapshot(ema: Persistent, augment: bool = True) -> dict:
    """EDM's training snapshot: ``dict(ema, loss_fn, augment_pipe, dataset_kwargs)``."""
    loss = Persistent("EDMLoss", module_state(torch.nn.Module(), {}, dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5),
                                              dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5)))
    pipe = Persistent("AugmentPipe", module_state(torch.nn.Module(), {}, dict(p=np.float32(0.12), xflip=1e8),
                                                  dict(p=np.float32(0.12), xflip=1e8))) if augment else None
    dataset = dict(class_name="training.dataset.ImageFolderDataset", path="datasets/cifar10-32x32.zip",
                   use_labels=False, xflip=False, cache=True, resolution=32, max_size=50000)
    return dict(ema=ema, loss_fn=loss, augment_pipe=pipe, dataset_kwargs=dataset)


# ---------------------------------------------------------------------------------------------------------------------
# EDM2 (NVlabs/edm2): Precond(UNet) with the log-variance head, the encoders, the loss, stored in float16

ENCODERS_SOURCE = '"""Stand-in for the source of training/encoders.py; a safe reader never runs it."""\n'
SD_VAE_RAW_MEAN, SD_VAE_RAW_STD = [5.81, 3.25, 0.12, -2.15], [4.17, 4.62, 3.71, 3.28]  # StabilityVAEEncoder's defaults


def standard_rgb_encoder() -> Persistent:
    """EDM2's ``StandardRGBEncoder`` (pixel models): a persistent plain object with no attributes of its own."""
    return Persistent("StandardRGBEncoder", dict(_init_args=(), _init_kwargs={}), ENCODERS_SOURCE)


def stability_vae_encoder(raw_mean=SD_VAE_RAW_MEAN, raw_std=SD_VAE_RAW_STD, final_mean=0.0, final_std=0.5,
                          vae_name="stabilityai/sd-vae-ft-mse", **recorded) -> Persistent:
    """EDM2's ``StabilityVAEEncoder`` (latent models) as pickled: ``scale`` and ``bias`` float32 numpy arrays
    (final = raw·scale + bias), ``_vae`` None (the VAE itself is not pickled)."""
    scale = np.float32(final_std) / np.float32(raw_std)
    bias = np.float32(final_mean) - np.float32(raw_mean) * scale
    state = dict(_init_args=(), _init_kwargs=dict(recorded), vae_name=vae_name, scale=scale, bias=bias, batch_size=8,
                 _vae=None)
    return Persistent("StabilityVAEEncoder", state, ENCODERS_SOURCE)


def logvar_head(channels: int = 128, seed: int = 0) -> Dict[str, Persistent]:
    """Precond's ``logvar_fourier`` (MPFourier: buffers freqs, phases) and ``logvar_linear`` (MPConv: weight (1, C))."""
    g = torch.Generator().manual_seed(seed)
    fourier, linear = torch.nn.Module(), torch.nn.Module()
    fourier.register_buffer("freqs", 2 * np.pi * torch.randn(channels, generator=g))
    fourier.register_buffer("phases", 2 * np.pi * torch.rand(channels, generator=g))
    linear.weight = torch.nn.Parameter(torch.randn(1, channels, generator=g))
    return {"logvar_fourier": Persistent("MPFourier", module_state(fourier.half(), {}, {"num_channels": channels}, {})),
            "logvar_linear": Persistent("MPConv", module_state(linear.half(), {}, {}, {"out_channels": 1}))}


def edm2_snapshot(network: torch.nn.Module, unet_kwargs: dict, encoder: Optional[Persistent] = None,
                  sigma_data: float = 0.5, logvar_channels: int = 128, use_fp16: bool = True,
                  network_class: str = "UNet") -> EasyDictValue:
    """EDM2's snapshot: ``EasyDict(ema=Precond(UNet), encoder, loss_fn, dataset_kwargs)``, the network in float16
    (``ema.to(torch.float16)``; ``network`` is converted in place).

    ``unet_kwargs`` are the UNet's recorded constructor arguments (NVlabs' names: ``img_resolution``,
    ``img_channels``, ``label_dim``, ``model_channels``, …). Precond records the interface arguments, the network
    keywords train_edm2.py passes (``model_channels``, ``dropout``) and ``use_fp16``; ``sigma_data`` and
    ``logvar_channels`` are recorded only when not NVlabs' defaults (0.5, 128)."""
    unet = persistent_tree(network.half(), network_class, unet_kwargs)
    interface = {k: unet_kwargs[k] for k in ("img_resolution", "img_channels", "label_dim")}
    init_kwargs = dict(interface, use_fp16=use_fp16,
                       **{k: unet_kwargs[k] for k in ("model_channels", "dropout") if k in unet_kwargs})
    if sigma_data != 0.5:
        init_kwargs["sigma_data"] = sigma_data
    if logvar_channels != 128:
        init_kwargs["logvar_channels"] = logvar_channels
    attributes = dict(interface, use_fp16=use_fp16, sigma_data=sigma_data)
    children = {"unet": unet, **logvar_head(logvar_channels)}
    precond = Persistent("Precond", module_state(torch.nn.Module().eval(), children, init_kwargs, attributes))
    loss_kwargs = dict(P_mean=-0.4, P_std=1.0)
    loss = Persistent("EDM2Loss", dict(_init_args=(), _init_kwargs=loss_kwargs, sigma_data=0.5, **loss_kwargs))
    dataset = EasyDictValue(class_name="training.dataset.ImageFolderDataset", path="datasets/img512-sd.zip",
                            use_labels=bool(unet_kwargs["label_dim"]))
    return EasyDictValue(ema=precond, encoder=encoder if encoder is not None else standard_rgb_encoder(),
                         loss_fn=loss, dataset_kwargs=dataset)


def stylegan_snapshot(network: torch.nn.Module) -> dict:
    """StyleGAN2-ADA's snapshot: ``dict(G, D, G_ema, augment_pipe, training_set_kwargs)``."""
    tree = lambda name: persistent_tree(network, name, {})  # noqa: E731
    return dict(G=tree("Generator"), D=tree("Discriminator"), G_ema=tree("Generator"), augment_pipe=None,
                training_set_kwargs=dict(resolution=8))


def write(path, snapshot) -> bytes:
    """Pickle ``snapshot`` to ``path`` as NVlabs' training loop does (``pickle.dump``, default protocol)."""
    with nvlabs_globals():
        data = pickle.dumps(snapshot)
    with open(path, "wb") as f:
        f.write(data)
    return data
