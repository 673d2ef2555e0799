"""Model cards (the Hub's README.md with YAML metadata) from the Jinja templates in ``model_cards/``."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

DEFAULT_TEMPLATE = "unconditional_image_generation.md"

# Used when the repository's model_cards/ folder is not next to the package (a non-editable install).
FALLBACK_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ description }}

![samples]({{ sample_grid }})

## Usage

```python
{{ usage }}
```

## Training configuration

| option | value |
|---|---|
{% for key, value in training_config.items() %}| `{{ key }}` | `{{ value }}` |
{% endfor %}
"""

DEFAULT_USAGE = """import torch
from diffusers_stf import EDMPipeline

pipeline = EDMPipeline.from_pretrained("{repo}")
images = pipeline(batch_size=16, num_inference_steps=18, generator=torch.Generator().manual_seed(0)).images
images[0].save("sample.png")"""

DEFAULT_LOADING_NOTE = (
    "`DiffusionPipeline.from_pretrained` cannot load this folder by itself: its scheduler (and, with augmentation, its "
    "network) are classes of `diffusers_stf`, so load it through `diffusers_stf.EDMPipeline` as above."
)


@dataclass
class ModelCardInfo:
    """What a training script says about its model; the trainer adds the run's facts (config, grid, repo).

    Args:
        title: the card's heading.
        description: a markdown paragraph (the method, the data, a paper link).
        tags: Hub tags besides ``diffusers`` and ``diffusers_stf``.
        template: a file name in ``model_cards/`` or a path to a Jinja template.
        pipeline_tag: the Hub task.
        license: the Hub license id.
        usage: a Python snippet; ``{repo}`` is replaced by the Hub id or the local folder.
        loading_note: a sentence after the snippet (default: why ``EDMPipeline`` rather than ``DiffusionPipeline``).
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
    loading_note: str = DEFAULT_LOADING_NOTE
    facts: Dict = field(default_factory=dict)
    extra: Dict = field(default_factory=dict)


def template_dirs() -> List[str]:
    """Folders searched for templates: the repository's ``model_cards/`` (next to the package)."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return [os.path.join(os.path.dirname(package_dir), "model_cards")]


def find_template(template: str) -> Optional[str]:
    """The path of ``template`` (a path, or a name in ``model_cards/``); None when it cannot be found."""
    if os.path.isfile(template):
        return template
    for folder in template_dirs():
        path = os.path.join(folder, template)
        if os.path.isfile(path):
            return path
    return None


def write_model_card(folder: str, info: ModelCardInfo, repo: str, datasets: Optional[List[str]] = None,
                     training_config: Optional[Dict] = None, sample_grid: Optional[str] = None,
                     metrics: Optional[Dict] = None) -> str:
    """Render ``folder/README.md``; returns its path.

    Args:
        folder: the saved pipeline folder.
        info: the script's :class:`ModelCardInfo`.
        repo: Hub repo id or local path used in the usage snippet.
        datasets: dataset names for the metadata.
        training_config: option → value table.
        sample_grid: path of the sample grid, relative to ``folder``.
        metrics: extra facts for the template (e.g. final loss, steps, wall time).
    """
    from huggingface_hub import ModelCard, ModelCardData

    tags = list(dict.fromkeys(["diffusers", "diffusers_stf", info.pipeline_tag, "diffusers-training", *info.tags]))
    card_data = ModelCardData(library_name="diffusers", pipeline_tag=info.pipeline_tag, license=info.license,
                              tags=tags, datasets=list(datasets) if datasets else None)
    context = dict(title=info.title, description=info.description, usage=info.usage.replace("{repo}", repo),
                   sample_grid=sample_grid, training_config=training_config or {},
                   metrics={**(metrics or {}), **info.facts}, repo=repo, loading_note=info.loading_note,
                   **info.extra)
    context.setdefault("script", os.path.basename(sys.argv[0]) or "diffusers_stf")
    path = find_template(info.template)
    if path is not None:
        card = ModelCard.from_template(card_data, template_path=path, **context)
    elif info.template == DEFAULT_TEMPLATE:
        card = ModelCard.from_template(card_data, template_str=FALLBACK_TEMPLATE, **context)
    else:
        raise ValueError(f"model card template {info.template!r} not found (looked in {template_dirs()})")
    out = os.path.join(folder, "README.md")
    card.save(out)
    return out
