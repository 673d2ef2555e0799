"""Sampling for evaluation: load a saved pipeline, swap its scheduler, add an autoguidance guide, draw images with
one seed per image.

One ``torch.Generator`` per image (seeded with that image's seed) makes image *i* the same whatever the batch size,
so an interrupted run resumes exactly and sample sets of different sizes share their first images. The class an image
of a class-conditional pipeline asks for is a function of its seed too (:func:`class_labels_for_seeds`: by default
seed mod K, so with seeds 0, 1, … image i asks for class i mod K and every class is equally represented).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch

from ..preconditioning import EDMPreconditioning, preconditioning_for

SCHEDULER_ALIASES = {
    "heun": "EDMHeunScheduler",  # EDM Algorithm 1
    "stochastic": "EDMStochasticScheduler",  # EDM Algorithm 2 (churn)
    "euler": "EDMEulerScheduler",  # diffusers' first-order EDM sampler
}


def _find_class(name: str):
    """A pipeline, scheduler or model class by name: the package's (its pipelines and the classes their components
    may be) first, then diffusers'."""
    import diffusers

    from .. import pipelines
    from ..pipelines import components

    cls = getattr(pipelines, name, None) or getattr(components, name, None) or getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{name!r} is neither a diffusers_stf nor a diffusers class")
    return cls


def load_pipeline(folder: str, device: Optional[str] = None):
    """The pipeline saved in ``folder``, of the class named by its ``model_index.json`` (``_class_name``), looked up
    in ``diffusers_stf`` first (EDMPipeline, DiscriminatorGuidedPipeline, ...) and then in ``diffusers``."""
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise ValueError(f"{folder!r} is not a saved pipeline folder (no model_index.json)")
    with open(index) as f:
        class_name = json.load(f).get("_class_name")
    if isinstance(class_name, (list, tuple)):  # [module, class] of a folder saved with its own pipeline code
        class_name = class_name[-1]
    if not isinstance(class_name, str):
        raise ValueError(f"{index!r} names no pipeline class (_class_name = {class_name!r})")
    pipe = _find_class(class_name).from_pretrained(folder)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def _takes(cls, name: str) -> bool:
    return name in inspect.signature(cls.__init__).parameters


def network_parametrisation(scheduler) -> Dict[str, object]:
    """What the network of a pipeline predicts, as the config entries an EDM scheduler needs to sample it.

    The parametrisation is :func:`~diffusers_stf.preconditioning.preconditioning_for`'s (which refuses, naming the
    scheduler, what it cannot read): our schedulers' ``preconditioning`` entry; EDM's F for diffusers' EDM schedulers
    (``sigma_data`` carries over with the config); a DDPM network of the β schedule and ``prediction_type`` for a
    discrete-time diffusers scheduler.

    Returns:
        ``preconditioning`` and, for ``ddpm``, ``num_train_timesteps``, ``beta_start``, ``beta_end``,
        ``beta_schedule`` and ``prediction_type``.
    """
    config = scheduler.config
    name = type(scheduler).__name__
    precond = preconditioning_for(scheduler)
    if "preconditioning" in config:
        return {"preconditioning": config["preconditioning"]}
    if isinstance(precond, EDMPreconditioning):
        return {"preconditioning": "edm"}
    if config.get("trained_betas") is not None:
        raise ValueError(f"the {name} of this pipeline has explicit trained_betas, which the EDM schedulers do not take")
    if config.get("timestep_type") == "continuous":
        raise ValueError(f"the {name} of this pipeline feeds its network continuous timesteps, not the DDPM indices "
                         "of the 'ddpm' preconditioning")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    return {"preconditioning": "ddpm", **{k: config[k] for k in keys if k in config},
            "prediction_type": precond.prediction_type}


def make_scheduler(base_scheduler, name: str, **overrides):
    """A scheduler of class ``name`` (``heun``, ``stochastic``, ``euler`` or any diffusers_stf/diffusers scheduler
    class name) built with ``from_config`` from ``base_scheduler``'s config, so the σ range, σ_data and the network's
    parametrisation (:func:`network_parametrisation`: preconditioning, β schedule, prediction type) carry over;
    ``overrides`` (e.g. ``s_churn=40``) replace config entries. Overrides the target class does not know are an
    error rather than silently ignored, and so is a target that cannot sample the network's parametrisation."""
    cls = _find_class(SCHEDULER_ALIASES.get(name, name))
    if "preconditioning" in overrides:  # the caller says what the network predicts
        parametrisation = {"preconditioning": overrides["preconditioning"]}
    else:
        parametrisation = network_parametrisation(base_scheduler)
    preconditioning = overrides.get("preconditioning", parametrisation["preconditioning"])
    if cls.__name__ == "EDMEulerScheduler" and preconditioning != "edm":
        raise ValueError(f"EDMEulerScheduler only implements the 'edm' preconditioning, the model uses {preconditioning!r}")
    if _takes(cls, "preconditioning"):
        overrides = {**parametrisation, **overrides}
    elif _takes(cls, "beta_schedule") and preconditioning != "ddpm":
        raise ValueError(f"{cls.__name__} samples DDPM networks (a β schedule), but the model uses the "
                         f"{preconditioning!r} preconditioning; use 'heun' or 'stochastic'")
    scheduler = cls.from_config(base_scheduler.config, **overrides)
    unknown = [k for k in overrides if k not in scheduler.config and k not in parametrisation]
    if unknown:
        raise ValueError(f"{cls.__name__} has no option(s) {unknown}")
    return scheduler


def pipeline_with_scheduler(pipe, scheduler):
    """``pipe`` sampling with ``scheduler``, moved into a pipeline whose loop drives that scheduler correctly.

    diffusers' ``DDPMPipeline`` and ``DDIMPipeline`` never call ``scale_model_input`` nor scale the initial noise by
    ``init_noise_sigma``, so an EDM scheduler (one with a ``preconditioning``) placed in them would start at the
    wrong noise level and feed the network unscaled inputs. Their UNet moves into an :class:`EDMPipeline` instead;
    a ``DDIMScheduler`` on a ``DDPMPipeline`` moves into a ``DDIMPipeline`` (which takes ``eta``). Anything else
    keeps its pipeline.
    """
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    from ..pipelines import EDMPipeline

    if "preconditioning" in scheduler.config and not isinstance(pipe, EDMPipeline):
        if not isinstance(pipe, (DDPMPipeline, DDIMPipeline)):
            raise ValueError(f"{type(scheduler).__name__} needs a pipeline that scales the model input "
                             f"(EDMPipeline); cannot tell whether {type(pipe).__name__} does")
        new = EDMPipeline(unet=pipe.unet, scheduler=scheduler)
        return new.to(pipe.device)
    if isinstance(scheduler, DDIMScheduler) and isinstance(pipe, DDPMPipeline):
        return DDIMPipeline(unet=pipe.unet, scheduler=scheduler).to(pipe.device)
    pipe.scheduler = scheduler
    return pipe


def load_guide_unet(folder: str):
    """The autoguidance guide of a training folder: its ``unet`` subfolder (a pipeline folder) or the folder itself (a
    model saved alone), of the class its ``config.json`` names."""
    sub = os.path.join(folder, "unet")
    kwargs = {"subfolder": "unet"} if os.path.isfile(os.path.join(sub, "config.json")) else {}
    config_path = os.path.join(folder, kwargs.get("subfolder", ""), "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"guide_unet {folder!r} holds no unet (neither unet/config.json nor config.json)")
    with open(config_path) as f:
        class_name = json.load(f).get("_class_name", "UNet2DModel")
    if isinstance(class_name, (list, tuple)):
        class_name = class_name[-1]
    return _find_class(class_name).from_pretrained(folder, **kwargs)


def pipeline_with_guide(pipe, guide_unet):
    """``pipe`` with ``guide_unet`` as its autoguidance guide (a new pipeline of the same class, so the guide is
    checked against the unet: image size, channels, preconditioning). diffusers' ``DDPMPipeline``/``DDIMPipeline``
    move into an :class:`EDMPipeline` with the same scheduler, whose loop guides."""
    from diffusers import DDIMPipeline, DDPMPipeline

    from ..pipelines import EDMPipeline

    if isinstance(pipe, EDMPipeline):  # its components and config entries (null_class_label, latent scaling, ...)
        kwargs = {k: v for k, v in pipe.components.items() if k != "guide_unet"}
        kwargs.update({k: pipe.config[k] for k in inspect.signature(type(pipe).__init__).parameters
                       if k not in kwargs and k != "guide_unet" and k in pipe.config})
        new = type(pipe)(**kwargs, guide_unet=guide_unet)
    elif isinstance(pipe, (DDPMPipeline, DDIMPipeline)):
        new = EDMPipeline(unet=pipe.unet, scheduler=pipe.scheduler, guide_unet=guide_unet)
    else:
        raise ValueError(f"guide_unet needs a pipeline with a guided sampling loop (EDMPipeline, "
                         f"DiscriminatorGuidedPipeline), not {type(pipe).__name__}")
    return new.to(pipe.device)


@contextlib.contextmanager
def count_calls(module: torch.nn.Module) -> Iterator[List[int]]:
    """Count forward calls of ``module`` (the number of function evaluations of a sampler) inside the block."""
    counter = [0]
    handle = module.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    try:
        yield counter
    finally:
        handle.remove()


def pipeline_num_classes(pipe) -> Optional[int]:
    """K of a pipeline whose UNet is class-conditional (its ``null_class_label`` when it has one, which is the last
    label index, else the UNet's ``num_class_embeds``); None for an unconditional one."""
    unet = getattr(pipe, "unet", None)
    num_class_embeds = unet.config.get("num_class_embeds") if unet is not None else None
    if num_class_embeds is None:
        return None
    null = getattr(pipe, "config", {}).get("null_class_label")
    return int(null) if null is not None else int(num_class_embeds)


CLASS_LABEL_POLICIES = ("cycle",)


def class_labels_for_seeds(pipe, seeds: Sequence[int], policy: Union[str, int, None] = "cycle") -> Optional[torch.Tensor]:
    """The class each image asks for, as a function of its seed, for a class-conditional ``pipe`` (None for an
    unconditional one).

    Args:
        pipe: the pipeline (its K from :func:`pipeline_num_classes`).
        seeds: one seed per image.
        policy: ``"cycle"`` (or None): the image of seed s asks for class s mod K (with seeds 0, 1, …: image i,
            class i mod K); an int c: every image asks for class c.
    """
    num_classes = pipeline_num_classes(pipe)
    if num_classes is None:
        if policy is not None and policy != "cycle":
            raise ValueError(f"class_labels={policy!r} was given but the pipeline's unet is not class-conditional")
        return None
    if policy is None or policy == "cycle":
        return torch.tensor([int(s) % num_classes for s in seeds], dtype=torch.long)
    if isinstance(policy, bool) or not isinstance(policy, int) or not 0 <= policy < num_classes:
        raise ValueError(f"class_labels must be 'cycle' or a class index in [0, {num_classes - 1}], got {policy!r}")
    return torch.full((len(seeds),), policy, dtype=torch.long)


def generate_batch(pipe, seeds: Sequence[int], num_inference_steps: int, class_labels=None,
                   **pipeline_kwargs) -> torch.Tensor:
    """Images (N, C, H, W) in [−1, 1], image *i* drawn with ``torch.Generator().manual_seed(seeds[i])``.

    Args:
        pipe: a pipeline whose ``__call__`` takes ``batch_size``, ``num_inference_steps``, ``generator`` (a list,
            one per image) and ``output_type="np"`` (images in [0, 1], NHWC), as diffusers' unconditional pipelines do.
        seeds: one seed per image.
        num_inference_steps: sampler steps.
        class_labels: for a class-conditional unet, the class of each image: a tensor (one per image), or a
            policy of :func:`class_labels_for_seeds` (``"cycle"``, the default: seed mod K; an int: one class).
            With an unconditional unet they are passed on as given (e.g. the y of classifier guidance).
        pipeline_kwargs: passed on (e.g. ``guidance_scale``, ``autoguidance_scale`` or the options of a guided
            pipeline).
    """
    if pipeline_num_classes(pipe) is not None and not torch.is_tensor(class_labels):
        class_labels = class_labels_for_seeds(pipe, seeds, class_labels)
    if class_labels is not None:
        pipeline_kwargs["class_labels"] = class_labels
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(
        batch_size=len(seeds),
        num_inference_steps=num_inference_steps,
        generator=generators,
        output_type="np",
        **pipeline_kwargs,
    )
    images = out.images if hasattr(out, "images") else out[0]
    images = torch.as_tensor(images, dtype=torch.float32)
    if images.ndim == 3:
        images = images[..., None]
    return images.permute(0, 3, 1, 2) * 2 - 1


def generate_images(
    pipe,
    num_images: int,
    num_inference_steps: int,
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = True,
    **pipeline_kwargs,
) -> Dict[str, object]:
    """``num_images`` images with seeds ``seed, seed+1, ...``, in batches; returns ``images`` ([−1, 1], N C H W),
    ``nfe`` (model evaluations per image, counted on ``pipe.unet``; None without one) and ``seconds``.

    Args:
        pipe: see :func:`generate_batch`.
        num_images: how many images.
        num_inference_steps: sampler steps.
        seed: seed of the first image.
        batch_size: images per pipeline call.
        progress: show a progress bar over batches.
        pipeline_kwargs: passed to :func:`generate_batch` (``class_labels`` there as a policy, not a tensor).
    """
    import time

    from tqdm.auto import tqdm

    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be >= 1, got {num_images} and {batch_size}")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    seeds = list(range(seed, seed + num_images))
    batches, calls, start = [], 0, time.perf_counter()
    network = getattr(pipe, "unet", None)
    with count_calls(network) if network is not None else contextlib.nullcontext([None]) as counter:
        for i in tqdm(range(0, num_images, batch_size), desc="sampling", disable=not progress, leave=False):
            batches.append(generate_batch(pipe, seeds[i : i + batch_size], num_inference_steps, **pipeline_kwargs))
            calls += 1
        nfe = None if counter[0] is None else counter[0] / calls
    return {"images": torch.cat(batches), "nfe": nfe, "seconds": time.perf_counter() - start}
