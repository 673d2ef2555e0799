"""Class-conditional training with label dropout, the training half of classifier-free guidance (Ho & Salimans 2022,
"Classifier-Free Diffusion Guidance", §3.2): one network learns D(x; σ, y) and, on the labels dropped with
probability P, D(x; σ, ∅), where ∅ is a label of its own.

With K classes the UNet gets ``num_class_embeds = K + 1`` and the null label is the last index, K; the saved
pipeline records it as ``null_class_label = K``, which ``guidance_scale`` (D_u + w·(D_c − D_u)) needs. With P = 0
nothing is dropped: the UNet gets K embeddings and no null label, a plain conditional model that CFG refuses.

The dropout is drawn like σ and the noise (:mod:`~diffusers_stf.training.global_batch`): for the whole global batch
from the step generator, each process keeping its rows, so the labels the network sees do not depend on the number of
processes.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from ..losses.draws import rand
from .config import check_finite
from .data.labels import require_labels
from .global_batch import BatchShare
from .model_card import DEFAULT_TEMPLATE, ModelCardInfo

DEFAULT_LABEL_DROPOUT = 0.1  # Ho & Salimans 2022 tried 0.1, 0.2 and 0.5; the first two did best


def add_class_conditioning_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("class-conditional training (classifier-free guidance)")
    g.add_argument("--class_conditional", action="store_true",
                   help="condition the UNet on the images' classes (the digits' classes, an image folder's class "
                        "subfolders, or --label_column): num_class_embeds = K + 1, the null label is K")
    g.add_argument("--label_dropout", type=float, default=DEFAULT_LABEL_DROPOUT,
                   help="P: each label is replaced by the null label K with probability P (CFG's recipe), drawn for "
                        "the global batch; in [0, 1); 0: no null label (no classifier-free guidance)")
    return g


def drop_labels(labels: torch.Tensor, null_label: int, p: float, share: BatchShare,
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """``labels`` (this process's rows) with each replaced by ``null_label`` with probability ``p``: u ~ U(0, 1) is
    drawn for the ``share.total`` images of the global batch and a label is dropped where u < p."""
    u = share.draw(rand, labels.shape, generator, labels.device)
    return torch.where(u < p, torch.full_like(labels, null_label), labels)


@dataclass(frozen=True)
class ClassConditioning:
    """The class conditioning of a training run.

    Args:
        num_classes: K, the classes of the data (labels in [0, K)).
        label_dropout: P, the probability that a label is replaced by the null label.
    """

    num_classes: int
    label_dropout: float

    def __post_init__(self):
        check_finite("label_dropout", self.label_dropout, 0.0, True, 1.0, False)
        if self.num_classes < 1:
            raise ValueError(f"--class_conditional needs at least one class, the data have {self.num_classes}")

    @property
    def null_label(self) -> Optional[int]:
        """K with label dropout, None without (no network input was ever trained as "no class")."""
        return self.num_classes if self.label_dropout > 0 else None

    @property
    def num_class_embeds(self) -> int:
        return self.num_classes + (1 if self.label_dropout > 0 else 0)

    def unet_kwargs(self) -> Dict:
        return {"num_class_embeds": self.num_class_embeds}

    def pipeline_kwargs(self) -> Dict:
        """What the saved pipeline records: ``null_class_label``."""
        return {"null_class_label": self.null_label}

    def labels(self, batch: Dict, generator: Optional[torch.Generator]) -> torch.Tensor:
        """The labels the network trains on at this micro-step: the batch's, dropped at rate P over the global batch
        (``batch["share"]``)."""
        labels = batch["labels"]
        if self.label_dropout > 0:
            labels = drop_labels(labels, self.num_classes, self.label_dropout, batch["share"], generator)
        return labels

    def fingerprint(self) -> Dict:
        return {"class_conditional": True, "num_classes": self.num_classes, "label_dropout": self.label_dropout}

    def description(self) -> str:
        """The model card's paragraph on the conditioning."""
        if self.null_label is None:
            return (f"It is **class-conditional** on {self.num_classes} classes (`class_labels` in "
                    f"[0, {self.num_classes - 1}]), trained without label dropout, so it has no null label and "
                    "classifier-free guidance does not apply.")
        return (f"It is **class-conditional** on {self.num_classes} classes (`class_labels` in "
                f"[0, {self.num_classes - 1}]), trained with label dropout P = {self.label_dropout:g} (Ho & Salimans "
                f"2022): each label was replaced by the null label {self.null_label} with probability "
                f"{self.label_dropout:g}, so the one network is also the unconditional model. Sample with "
                f"`class_labels` and `guidance_scale` w: classifier-free guidance D_u + w·(D_c − D_u) (w = 1: plain "
                f"conditional sampling; w > 1 trades diversity for class fidelity). The pipeline records "
                f"`null_class_label = {self.null_label}`.")

    def usage(self, pipeline_class: str = "EDMPipeline", num_inference_steps: int = 18,
              scheduler: Optional[str] = None) -> str:
        """The package snippet of the model card (``{repo}`` is filled in by the card); ``scheduler``: a diffusers
        scheduler class to sample with instead of the saved one (e.g. ``DDIMScheduler``)."""
        k = self.num_classes
        lines = ["import torch"] + ([f"from diffusers import {scheduler}"] if scheduler else [])
        lines += [f"from diffusers_stf import {pipeline_class}", "",
                  f'pipeline = {pipeline_class}.from_pretrained("{{repo}}")']
        if scheduler:
            lines.append(f"pipeline.scheduler = {scheduler}.from_config(pipeline.scheduler.config)")
        lines += [f"labels = torch.arange(16) % {k}  # image i asks for class i mod {k}",
                  f"images = pipeline(batch_size=16, num_inference_steps={num_inference_steps}, class_labels=labels,",
                  "                  generator=torch.Generator().manual_seed(0)).images"]
        if self.null_label is not None:
            lines += ["# classifier-free guidance with w = 2: two rows of one batched forward pass per evaluation",
                      f"guided = pipeline(batch_size=16, num_inference_steps={num_inference_steps}, "
                      "class_labels=labels, guidance_scale=2.0,",
                      "                  generator=torch.Generator().manual_seed(0)).images"]
        return "\n".join(lines)

    def sample_kwargs(self) -> Dict:
        """The pipeline call of the card's plain-diffusers snippet."""
        out = {"class_labels": [i % self.num_classes for i in range(16)]}
        if self.null_label is not None:
            out["guidance_scale"] = 2.0
        return out

    def facts(self) -> Dict:
        return {"classes": self.num_classes, "label dropout": self.label_dropout, "null_class_label": self.null_label}

    def card(self, card: ModelCardInfo, usage: str, grid_caption: str = "EMA weights") -> ModelCardInfo:
        """``card`` of the unconditional model made class-conditional: its description says so (and how to guide),
        the snippets pass ``class_labels`` (and ``guidance_scale``), the facts list K, P and the null label."""
        description = card.description.replace("An unconditional", "A class-conditional", 1)
        tags = [*card.tags, "class-conditional"] + (["classifier-free-guidance"] if self.null_label is not None else [])
        rows = f"row r asks for class r mod {self.num_classes}, without guidance (w = 1)"
        return dataclasses.replace(
            card, title=f"Class-conditional {card.title}", description=f"{description}\n\n{self.description()}",
            tags=tags, usage=usage,
            sample_kwargs=self.sample_kwargs(), template=DEFAULT_TEMPLATE,
            facts={**card.facts, **self.facts(), "grid_caption": f"{grid_caption}; {rows}."})


def class_conditioning(args: argparse.Namespace, data, explicit=frozenset()) -> Optional[ClassConditioning]:
    """The run's :class:`ClassConditioning` from ``--class_conditional``, ``--label_dropout`` and ``--label_column``
    (None for an unconditional run). ``explicit``: the options given on the command line; ``--label_dropout`` or
    ``--label_column`` without ``--class_conditional`` would change nothing and are refused."""
    check_finite("label_dropout", args.label_dropout, 0.0, True, 1.0, False)
    if not args.class_conditional:
        for flag in ("label_dropout", "label_column"):
            if flag in explicit:
                raise ValueError(f"--{flag} only applies to class-conditional training: add --class_conditional")
        return None
    return ClassConditioning(require_labels(data, "--class_conditional"), float(args.label_dropout))
