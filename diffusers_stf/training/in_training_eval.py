"""Metrics during training: every ``--eval_every_steps`` optimizer steps (and at the last step), FD and KID of
``--eval_num_images`` samples of the EMA model against a reference set, with the sampler of the script's validation
grid (:func:`~diffusers_stf.evaluation.evaluate_pipeline`: image i drawn with seed ``--eval_seed + i``, the same
images every time, so successive values differ only in the model). The guidance scripts measure "the guidance
metric": the score model's samples guided by the network being trained, plus the held-out accuracy.

Each evaluation is a row of ``logs/metrics.jsonl`` (``fd``, ``kid``, ``kid_se``, ``precision``, ``recall``,
``eval_seconds``, ...; no ``loss``), written after the loss row of its step, so the rows stay in step order and a
resume drops the rows of the lost steps with the others; the same values go to the trackers, and
``logs/metrics.png`` (FD and KID against the step) is redrawn. Evaluation runs on the main process while the others
wait; its time is kept out of the training time (the ``seconds`` of the loss rows, the progress bar's it/s, the
summary's training time) and reported as ``eval_seconds``. Its random draws use their own generators and leave the
global random states as they were, and no flag of it is part of the resume fingerprint: a run with or without
evaluation trains the same weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional

import numpy as np
import torch

from ..evaluation.evaluator import DIGITS_REFERENCES, compute_features, fd_undefined_reason, reference_statistics
from ..evaluation.feature_extractors import load_feature_extractor
from ..evaluation.frechet import feature_statistics
from ..evaluation.images import list_image_files, match_channels
from ..evaluation.streaming import evaluate_pipeline
from .eval_plots import plot_evaluation_curves
from .metrics_log import read_metrics
from .validation import check_sampling_steps

TRAINING_DATA_REFERENCE = "training_data"
FEATURE_EXTRACTORS = ("digits", "inception", "transformers")
EVAL_FLAGS = ("eval_num_images", "eval_reference", "eval_num_inference_steps", "eval_generation_batch_size",
              "eval_feature_extractor", "eval_feature_weights", "eval_seed", "eval_kid_subsets")
ROW_METRICS = ("fd", "kid", "kid_std", "kid_se", "precision", "recall", "confidence", "class_entropy")


def check_offline_reference(reference: str) -> None:
    """Raise a ValueError naming ``--eval_reference`` unless ``reference`` can be read without a network: a digits
    split, ``training_data``, a folder holding images, or an ``.npz`` (images, or statistics ``mu``/``sigma``)."""
    if reference in DIGITS_REFERENCES or reference == TRAINING_DATA_REFERENCE:
        return
    if os.path.isdir(reference):
        if not list_image_files(reference):
            raise ValueError(f"--eval_reference {reference!r} is a folder without image files")
        return
    if os.path.isfile(reference) and reference.lower().endswith(".npz"):
        return
    kinds = (f"{', '.join(DIGITS_REFERENCES)}, {TRAINING_DATA_REFERENCE} (this run's training images), a folder of "
             "images, or an .npz of images or of reference statistics (mu, sigma[, features])")
    if os.path.exists(reference):
        raise ValueError(f"--eval_reference {reference!r} is a file but not an .npz; give {kinds}")
    raise ValueError(
        f"--eval_reference {reference!r} cannot be loaded offline: no such folder or file. The in-training evaluation "
        f"reads its reference from disk and never downloads it (a Hub dataset name is not a reference). Give {kinds}; "
        "for a Hub dataset, save its images to a folder once, or their statistics with `python examples/evaluate.py "
        "--reference FOLDER --save_reference stats.npz`, or use training_data")


@dataclass
class EvaluationConfig:
    """The in-training evaluation (flags ``--eval_<field>``; see the module docstring).

    Args:
        every_steps: evaluate every N optimizer steps and at the last step; 0: never.
        num_images: images per evaluation (FD needs more than the feature dimension; KID is computed at any n ≥ 2).
        reference: ``digits:train`` (default), ``digits:heldout``, ``digits:all``, ``training_data`` (the run's
            training images), a folder of images, or an ``.npz`` of images or of reference statistics.
        num_inference_steps: sampler steps (None: those of the script's validation grid).
        generation_batch_size: images per pipeline call.
        feature_extractor: ``digits``, ``inception`` or ``transformers``.
        feature_weights: the weights of ``inception`` (pytorch-fid's file) or ``transformers`` (a local folder).
        seed: image i is drawn with seed ``seed + i``.
        kid_subsets: KID's number of random subsets (of at most 1000 images).
    """

    every_steps: int = 0
    num_images: int = 1000
    reference: str = "digits:train"
    num_inference_steps: Optional[int] = None
    generation_batch_size: int = 250
    feature_extractor: str = "digits"
    feature_weights: Optional[str] = None
    seed: int = 0
    kid_subsets: int = 100

    def __post_init__(self):
        for name, minimum in (("every_steps", 0), ("num_images", 2), ("generation_batch_size", 1), ("seed", 0),
                              ("kid_subsets", 1), ("num_inference_steps", 1)):
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ValueError(f"--eval_{name} must be >= {minimum}, got {value}")
        if self.feature_extractor not in FEATURE_EXTRACTORS:
            raise ValueError(f"--eval_feature_extractor must be one of {FEATURE_EXTRACTORS}, got "
                             f"{self.feature_extractor!r}")
        if not self.every_steps:
            return
        if self.feature_extractor != "digits" and not self.feature_weights:
            raise ValueError(f"--eval_feature_extractor {self.feature_extractor} needs --eval_feature_weights (local "
                             "weights: pytorch-fid's Inception file, or a transformers model folder)")
        if self.feature_weights and not os.path.exists(self.feature_weights):
            raise ValueError(f"--eval_feature_weights {self.feature_weights!r} does not exist")
        check_offline_reference(self.reference)

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0


def add_evaluation_args(parser):
    """The ``--eval_*`` flags of :class:`EvaluationConfig`."""
    g = parser.add_argument_group("metrics during training (FD/KID of the EMA model's samples)")
    g.add_argument("--eval_every_steps", type=int, default=0,
                   help="FD and KID of the EMA model's samples every N steps and at the last step, to the trackers, "
                        "logs/metrics.jsonl and logs/metrics.png; 0: never")
    g.add_argument("--eval_num_images", type=int, default=1000,
                   help="images per evaluation; FD needs more than the feature dimension (digits: 64), KID does not")
    g.add_argument("--eval_reference", type=str, default="digits:train",
                   help="digits:train | digits:heldout | digits:all | training_data (this run's images) | a folder of "
                        "images | an .npz of images or of statistics (mu, sigma; KID needs the features too)")
    g.add_argument("--eval_num_inference_steps", type=int, default=None,
                   help="sampler steps (default: those of the validation grids)")
    g.add_argument("--eval_generation_batch_size", type=int, default=250, help="images per pipeline call")
    g.add_argument("--eval_feature_extractor", type=str, default="digits", choices=FEATURE_EXTRACTORS)
    g.add_argument("--eval_feature_weights", type=str, default=None,
                   help="inception: pytorch-fid's weight file; transformers: a local model folder")
    g.add_argument("--eval_seed", type=int, default=0, help="image i is drawn with seed --eval_seed + i")
    g.add_argument("--eval_kid_subsets", type=int, default=100, help="KID: number of random subsets")
    return g


def evaluation_config(args, explicit=frozenset()) -> EvaluationConfig:
    """The :class:`EvaluationConfig` of parsed ``--eval_*`` flags; such a flag given without ``--eval_every_steps``
    is refused (it would have no effect)."""
    values = vars(args)
    if not values["eval_every_steps"]:
        given = [f"--{name}" for name in EVAL_FLAGS if name in explicit]
        if given:
            raise ValueError(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect without "
                             "--eval_every_steps N")
    return EvaluationConfig(**{name: values[f"eval_{name}"] for name in EvaluationConfig.__dataclass_fields__})


@dataclass
class EvaluationSampler:
    """What the evaluation samples: ``make_pipeline(ema_model)`` called with ``num_inference_steps`` and
    ``pipeline_kwargs`` (e.g. guidance weights); ``extra_metrics(ema_model)`` adds values to the row (e.g. the
    held-out accuracy); ``class_cycle`` K: image i asks for class (seed mod K) through ``class_labels`` (classifier
    guidance of an unconditional score model; a class-conditional unet gets this from the pipeline already)."""

    make_pipeline: Callable
    num_inference_steps: int
    pipeline_kwargs: Mapping = field(default_factory=dict)
    extra_metrics: Optional[Callable[[torch.nn.Module], Dict[str, float]]] = None
    class_cycle: Optional[int] = None


class SeedCycledClasses:
    """``pipeline`` called with ``class_labels`` = (seed of each image's generator) mod K: the class of an image is a
    function of its seed, as :func:`~diffusers_stf.evaluation.class_labels_for_seeds` makes it for a
    class-conditional unet."""

    def __init__(self, pipeline, num_classes: int):
        self.pipeline, self.num_classes = pipeline, int(num_classes)

    @property
    def device(self):
        return self.pipeline.device

    def set_progress_bar_config(self, **kwargs):
        self.pipeline.set_progress_bar_config(**kwargs)

    def __call__(self, *, generator, **kwargs):
        labels = torch.tensor([g.initial_seed() % self.num_classes for g in generator], device=self.device)
        return self.pipeline(generator=generator, class_labels=labels, **kwargs)


@contextlib.contextmanager
def preserved_random_state(device: torch.device):
    """The global random states (Python, NumPy, torch's CPU generator and ``device``'s) as they were on entry, after
    the block: what the block draws does not shift the training's dropout."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    accelerator = device.type not in ("cpu", "meta")
    with torch.random.fork_rng(devices=[device] if accelerator else [],
                               device_type=device.type if accelerator else "cuda"):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def evaluation_rows(rows: List[Dict]) -> List[Dict]:
    """The evaluation rows among the rows of ``logs/metrics.jsonl``."""
    return [row for row in rows if "eval_seconds" in row]


def training_data_statistics(extractor, data, batch_size: int = 250) -> Dict[str, np.ndarray]:
    """Features, μ and Σ of every training image (centred crops, no flips)."""
    features = []
    for start in range(0, len(data), batch_size):
        images = data.batch(torch.arange(start, min(start + batch_size, len(data))))["images"]
        features.append(compute_features(extractor, images, batch_size)[0])
    features = np.concatenate(features)
    mu, sigma = feature_statistics(features, "the features of the training images (--eval_reference training_data)")
    return {"features": features, "mu": mu, "sigma": sigma}


class InTrainingEvaluation:
    """The evaluation of a run (see the module docstring). Built by the trainer before training: the checks that
    can refuse the run come then, and the main process loads the feature network and the reference once.

    Args:
        config: the run's :class:`EvaluationConfig`.
        accelerator: the run's ``Accelerator``.
        sampler: what to sample; None when the script has no pipeline (then ``--eval_every_steps`` is refused).
        data: the training :class:`~diffusers_stf.training.data.ImageData` (image size; ``training_data``).
        model: the trained model, for checking the sampler's steps.
    """

    def __init__(self, config: EvaluationConfig, accelerator, sampler: Optional[EvaluationSampler], data, model):
        self.config, self.accelerator, self.sampler = config, accelerator, sampler
        self.segment_seconds = 0.0  # evaluation time of this segment of the run, on this process
        self.log_dir: Optional[str] = None
        if not config.enabled:
            return
        if sampler is None:
            raise ValueError("--eval_every_steps: this run has no pipeline to sample (the discriminator and classifier "
                             "scripts need --pretrained_model_name_or_path, the score model they guide)")
        self.num_inference_steps = config.num_inference_steps or sampler.num_inference_steps
        pipeline = sampler.make_pipeline(model)
        check_sampling_steps(pipeline.scheduler, self.num_inference_steps,
                             "--eval_num_inference_steps" if config.num_inference_steps else "--num_inference_steps")
        self.sampler_name = f"{type(pipeline.scheduler).__name__}, {self.num_inference_steps} steps"
        if sampler.pipeline_kwargs:
            self.sampler_name += ", " + ", ".join(f"{k}={v}" for k, v in sampler.pipeline_kwargs.items())
        self.notes: List[str] = []
        if accelerator.is_main_process:
            self.load(data)

    def load(self, data):
        """Load the feature network and the reference statistics; refuse what cannot be measured."""
        config, device = self.config, self.accelerator.device
        try:
            self.extractor = load_feature_extractor(config.feature_extractor, config.feature_weights).to(device)
        except (ValueError, OSError) as err:
            raise ValueError(f"--eval_feature_extractor {config.feature_extractor}: {err}") from err
        probe = match_channels(torch.zeros(1, data.channels, data.resolution, data.resolution), self.extractor.channels)
        try:
            self.extractor.check_images(probe)
        except ValueError as err:
            raise ValueError(f"--eval_feature_extractor {config.feature_extractor} cannot embed this run's "
                             f"{data.channels}x{data.resolution}x{data.resolution} images: {err}") from err
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if config.reference == TRAINING_DATA_REFERENCE:
                    self.reference = training_data_statistics(self.extractor, data, config.generation_batch_size)
                else:
                    self.reference = reference_statistics(self.extractor, config.reference)
            except (ValueError, OSError) as err:
                raise ValueError(f"--eval_reference {config.reference!r}: {err}") from err
        self.notes += [str(w.message) for w in caught]  # e.g. which network a statistics file records
        d = self.extractor.feature_dim
        fd_reason = fd_undefined_reason(config.num_images, d)
        no_features = "features" not in self.reference
        if fd_reason and no_features:
            raise ValueError(f"--eval_num_images {config.num_images} with --eval_reference {config.reference!r}: "
                             f"{fd_reason.split(':')[0]}, and the reference holds only mu and sigma, not the features "
                             f"that KID needs; give --eval_num_images > {d} or a reference with features")
        if fd_reason:
            self.notes.append(f"--eval_num_images {config.num_images}: {fd_reason}. The rows get fd = null.")
        if no_features:
            self.notes.append(f"--eval_reference {config.reference!r} holds only mu and sigma (no features): FD is "
                              "measured, KID and precision/recall are not (null in the rows)")

    def start(self, log_dir: str):
        """Say what will be measured (and the notes, once), before the first step."""
        self.log_dir = log_dir
        if not self.config.enabled or not self.accelerator.is_main_process:
            return
        config = self.config
        print(f"Evaluation every {config.every_steps} steps: FD/KID of {config.num_images} images of the EMA model "
              f"({self.sampler_name}) vs {config.reference}, {self.extractor.name} features")
        for note in self.notes:
            print(f"Evaluation: {note}")

    def due(self, step: int, max_steps: int) -> bool:
        return self.config.enabled and (step % self.config.every_steps == 0 or step == max_steps)

    def after_step(self, step: int, max_steps: int, ema_model: torch.nn.Module, progress=None):
        """Evaluate ``ema_model`` when ``step`` is due (main process; the others wait); the time it takes is added to
        ``segment_seconds`` and kept out of the progress bar's rate."""
        if not self.due(step, max_steps):
            return
        start = time.perf_counter()
        if self.accelerator.is_main_process:
            self.record(self.evaluate(step, ema_model), start)
        self.accelerator.wait_for_everyone()
        elapsed = time.perf_counter() - start
        self.segment_seconds += elapsed
        if progress is not None and not progress.disable:  # the bar's elapsed time and rate: training only
            progress.start_t += elapsed
            progress.last_print_t += elapsed

    @torch.no_grad()
    def evaluate(self, step: int, model: torch.nn.Module) -> Dict:
        """The row of ``model`` at ``step`` (without its ``eval_seconds``)."""
        config, sampler, device = self.config, self.sampler, self.accelerator.device
        with preserved_random_state(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FD undefined at this n: said once at the start
            pipeline = sampler.make_pipeline(model).to(device)
            if sampler.class_cycle:
                pipeline = SeedCycledClasses(pipeline, sampler.class_cycle)
            result = evaluate_pipeline(pipeline, config.num_images, reference=self.reference,
                                       feature_extractor=self.extractor, num_inference_steps=self.num_inference_steps,
                                       seed=config.seed, batch_size=config.generation_batch_size,
                                       pipeline_kwargs=dict(sampler.pipeline_kwargs), kid_subsets=config.kid_subsets)
            extra = sampler.extra_metrics(model) if sampler.extra_metrics is not None else {}
        return {"step": int(step), **{k: _number(result.get(k)) for k in ROW_METRICS if k in result}, **extra,
                "eval_num_images": int(result["num_images"])}

    def record(self, row: Dict, start: float):
        """Redraw ``metrics.png`` with ``row``, then append it to ``metrics.jsonl`` with ``eval_seconds``, the time
        since ``start`` (the plot included), send its numbers to the trackers and print it."""
        acc = self.accelerator
        rows = evaluation_rows(read_metrics(self.log_dir)) + [row]
        plot_evaluation_curves(rows, os.path.join(self.log_dir, "metrics.png"),
                               title=f"{self.config.num_images} images vs {self.config.reference} · "
                                     f"{self.sampler_name} · {self.extractor.name}")
        row["eval_seconds"] = round(time.perf_counter() - start, 3)
        os.makedirs(self.log_dir, exist_ok=True)
        with open(os.path.join(self.log_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if acc.trackers:
            acc.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=row["step"])
        fd = "undefined" if row.get("fd") is None else f"{row['fd']:.4g}"
        kid = "n/a" if row.get("kid") is None else f"{row['kid']:.4g}" + _error(row.get("kid_se"))
        print(f"step {row['step']}: FD {fd}, KID {kid} ({row['eval_num_images']} images, {row['eval_seconds']:.1f} s)")

    def total_seconds(self) -> float:
        """Evaluation time of the whole run: the ``eval_seconds`` of the rows in the log (main process)."""
        if not self.config.enabled or self.log_dir is None or not self.accelerator.is_main_process:
            return 0.0
        return float(sum(row["eval_seconds"] for row in evaluation_rows(read_metrics(self.log_dir))))

    def card_facts(self) -> Dict[str, object]:
        """The last evaluation's FD and KID, for the model card."""
        if not self.config.enabled or self.log_dir is None:
            return {}
        rows = evaluation_rows(read_metrics(self.log_dir))
        if not rows:
            return {}
        last, where = rows[-1], f"{self.config.num_images} images, {self.sampler_name}, vs {self.config.reference}"
        facts = {}
        if last.get("fd") is not None:
            facts[f"FD ({where})"] = round(last["fd"], 4)
        if last.get("kid") is not None:
            facts[f"KID ({where})"] = f"{last['kid']:.4g}" + _error(last.get("kid_se"))
        return facts


def _number(value):
    """A JSON number, or None for a missing or non-finite one."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _error(standard_error) -> str:
    return "" if standard_error is None else f" ± {standard_error:.2g}"
