"""Model cards (the Hub's README.md with YAML metadata) from the Jinja templates in ``diffusers_stf/model_cards/``.

The templates are package data, read with ``importlib.resources``, so a wheel install renders the same cards as a
source checkout. Every card shows the plain-diffusers load first (``DiffusionPipeline.from_pretrained(repo,
trust_remote_code=True)`` when the folder carries generated code), then the package route.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Dict, List, Optional

DEFAULT_TEMPLATE = "unconditional_image_generation.md"
# How to install the package, as a clause of a card's sentence: it is not on PyPI yet
INSTALL = ("not on PyPI yet: `pip install .` in a checkout of its source, or `python -m build` there and "
           "`pip install dist/diffusers_stf-*.whl`; `pip install diffusers-stf` once it is published")

DEFAULT_USAGE = """import torch
from diffusers_stf import EDMPipeline

pipeline = EDMPipeline.from_pretrained("{repo}")
images = pipeline(batch_size=16, num_inference_steps=18, generator=torch.Generator().manual_seed(0)).images
images[0].save("sample.png")"""

# a namespaced or canonical Hub id: letters, digits, "-", "_", "."; at most one "/"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
_CACHE_SNAPSHOT = re.compile(r"(?:^|[/\\])(models|datasets)--([^/\\]+?)--([^/\\]+)[/\\]snapshots[/\\][^/\\]+[/\\]?$")


@dataclass
class ModelCardInfo:
    """What a training script says about its model; the trainer adds the run's facts (config, grid, repo).

    Args:
        title: the card's heading.
        description: a markdown paragraph (the method, the data, a paper link).
        tags: Hub tags besides ``diffusers`` and ``diffusers_stf``.
        template: a file name in ``diffusers_stf/model_cards/`` or a path to a Jinja template.
        pipeline_tag: the Hub task.
        license: the Hub license id.
        usage: the package route, a Python snippet; ``{repo}`` is replaced by the Hub id or the local folder.
        loading_note: an optional sentence after the snippets.
        sample_kwargs: keyword arguments of the pipeline call in the plain-diffusers snippet (default: the pipeline's
            own defaults).
        base_model: the Hub id of the model this one builds on (a discriminator: the score model it guides).
        facts: extra rows of the results table (e.g. the loss's hyper-parameters).
        extra: more template variables.
    """

    title: str = "Diffusion model trained with diffusers_stf"
    description: str = ""
    tags: List[str] = field(default_factory=list)
    template: str = DEFAULT_TEMPLATE
    pipeline_tag: str = "unconditional-image-generation"
    license: str = "apache-2.0"
    usage: str = DEFAULT_USAGE
    loading_note: str = ""
    sample_kwargs: Optional[Dict] = None
    base_model: Optional[str] = None
    facts: Dict = field(default_factory=dict)
    extra: Dict = field(default_factory=dict)


def local_name(path: str) -> str:
    """How a card's snippets name a local folder: its path relative to the working directory when it lies below it,
    else the folder's name (an absolute path names one machine's disk)."""
    absolute = os.path.abspath(path)
    try:
        relative = os.path.relpath(absolute)
    except ValueError:  # another drive
        relative = os.pardir
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return os.path.basename(os.path.normpath(absolute))
    return relative


def is_hub_repo_id(value) -> bool:
    """Whether ``value`` is a well-formed Hub repo id (``name`` or ``namespace/name``) and not a local path."""
    return (isinstance(value, str) and bool(_REPO_ID.match(value)) and ".." not in value
            and not value.endswith((".", "-")) and not os.path.exists(value))


def hub_dataset_ids(dataset_name: Optional[str]) -> Optional[List[str]]:
    """``[dataset_name]`` for a ``--dataset_name`` that is a Hub dataset id, None for a local path or no name.

    A card's ``datasets:`` links to Hub dataset pages, so it takes only ids given on the command line (never a local
    folder, nor a name made up for built-in data)."""
    return [dataset_name] if is_hub_repo_id(dataset_name) else None


def hub_id_of(path_or_id: Optional[str]) -> Optional[str]:
    """The Hub id behind ``path_or_id``: the id itself, the id of a Hub cache snapshot folder
    (``…/models--ns--name/snapshots/<rev>``), or None for another local folder."""
    if not path_or_id:
        return None
    path_or_id = os.fspath(path_or_id)
    match = _CACHE_SNAPSHOT.search(os.path.abspath(path_or_id)) if os.path.isdir(path_or_id) else None
    if match:
        return f"{match.group(2)}/{match.group(3)}"
    return path_or_id if is_hub_repo_id(path_or_id) else None


def template_names() -> List[str]:
    """The templates shipped with the package."""
    folder = resources.files("diffusers_stf") / "model_cards"
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".md"))


def load_template(template: str) -> str:
    """The text of ``template``: a path to a Jinja file, or a name in ``diffusers_stf/model_cards/``."""
    if os.path.isfile(template):
        with open(template, encoding="utf-8") as f:
            return f.read()
    path = resources.files("diffusers_stf") / "model_cards" / template
    if not path.is_file():
        raise ValueError(f"model card template {template!r} is neither a file nor one of the package's templates "
                         f"{template_names()}")
    return path.read_text(encoding="utf-8")


def plain_usage(folder: str, repo: str, sample_kwargs: Optional[Dict] = None) -> Optional[str]:
    """The plain-diffusers snippet for a saved pipeline folder, or for a model saved alone (``AutoModel``); None when
    ``folder`` holds neither."""
    index_path = os.path.join(folder, "model_index.json")
    literal = lambda v: json.dumps(v) if isinstance(v, str) else repr(v)  # noqa: E731
    if not os.path.isfile(index_path):
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            return None
        with open(config_path, encoding="utf-8") as f:
            remote = "AutoModel" in json.load(f).get("auto_map", {})
        flag = ", trust_remote_code=True" if remote else ""
        return f"from diffusers import AutoModel\n\nmodel = AutoModel.from_pretrained({literal(repo)}{flag})"
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    remote = isinstance(index.get("_class_name"), list)
    flag = ", trust_remote_code=True" if remote else ""
    call = "".join(f", {k}={literal(v)}" for k, v in (sample_kwargs or {}).items())
    return (f"import torch\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipeline = DiffusionPipeline.from_pretrained({literal(repo)}{flag})\n"
            f"images = pipeline(batch_size=16{call}, generator=torch.Generator().manual_seed(0)).images\n"
            f'images[0].save("sample.png")')


def write_model_card(folder: str, info: ModelCardInfo, repo: str, datasets: Optional[List[str]] = None,
                     training_config: Optional[Dict] = None, sample_grid: Optional[str] = None,
                     metrics: Optional[Dict] = None, weights: str = "EMA") -> str:
    """Render ``folder/README.md``; returns its path.

    Args:
        folder: the saved pipeline folder.
        info: the script's :class:`ModelCardInfo`.
        repo: Hub repo id (``namespace/name``) or local path used in the usage snippets.
        datasets: Hub dataset ids for the metadata (see :func:`hub_dataset_ids`); a local path is refused.
        training_config: option → value table. Its ``pretrained_model_name_or_path``, when it names a Hub model, is
            the card's ``base_model`` unless ``info.base_model`` is set.
        sample_grid: path of the sample grid, relative to ``folder``.
        metrics: extra facts for the template (e.g. final loss, steps, wall time).
        weights: which weights the folder and the grid hold, ``EMA`` or ``trained`` (a run without an EMA).
    """
    from huggingface_hub import ModelCard, ModelCardData

    for name in datasets or ():
        if not is_hub_repo_id(name):
            raise ValueError(f"datasets must be Hub dataset ids, got {name!r} (a local path or a malformed id)")
    base_model = info.base_model or hub_id_of((training_config or {}).get("pretrained_model_name_or_path"))
    if base_model is not None and not is_hub_repo_id(base_model):
        raise ValueError(f"base_model must be a Hub model id, got {base_model!r}")
    tags = list(dict.fromkeys(["diffusers", "diffusers_stf", info.pipeline_tag, "diffusers-training", *info.tags]))
    card_data = ModelCardData(library_name="diffusers", pipeline_tag=info.pipeline_tag, license=info.license,
                              tags=tags, datasets=list(datasets) if datasets else None, base_model=base_model)
    index_path = os.path.join(folder, "model_index.json")
    config_path = os.path.join(folder, "config.json")
    remote_code = False
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            remote_code = isinstance(json.load(f).get("_class_name"), list)
    elif os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            remote_code = "auto_map" in json.load(f)
    context = dict(title=info.title, description=info.description, usage=info.usage.replace("{repo}", repo),
                   plain_usage=plain_usage(folder, repo, info.sample_kwargs), remote_code=remote_code,
                   install=INSTALL, sample_grid=sample_grid, training_config=training_config or {},
                   metrics={**(metrics or {}), **info.facts}, repo=repo, loading_note=info.loading_note,
                   weights=weights, **info.extra)
    context.setdefault("script", os.path.basename(sys.argv[0]) or "diffusers_stf")
    card = ModelCard.from_template(card_data, template_str=load_template(info.template), **context)
    out = os.path.join(folder, "README.md")
    card.save(out)
    return out
