"""The protocol and the runner of the evidence benchmark (``bench_evidence.py``): budgets, training through the example
scripts' command lines, and FD evaluation, each result cached as a file under the work folder."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRIC = "fd_train"
REFERENCE = "digits:train"


@dataclass
class Protocol:
    """Budgets of the comparisons. ``full()`` is the protocol whose numbers the README reports; ``quick()`` a smoke
    test of every code path with tiny models and a few steps."""

    seeds: List[int]
    num_images: int  # samples per arm and seed (FD is biased at small n: compare only at equal n)
    batch_size: int
    heun_steps: int  # EDM Heun steps (2N − 1 NFE)
    ddim_steps: List[int]  # the first is the comparison's headline
    stf_steps: int
    sa_steps: int
    disc_steps: int
    num_fake_images: Optional[int]  # discriminator training fakes (None: as many as real images)
    gap_budgets: List[int]  # score-model training steps of the gap sweep (the stf_steps model is reused)
    dg_weights: List[float]  # w₁ of the investigation; the comparison uses dg_weight
    dg_weight: float = 2.0
    model_args: List[str] = field(default_factory=list)  # UNet flags of every training script
    disc_model_args: List[str] = field(default_factory=list)
    validation_sigmas: str = "0.01,0.03,0.1,0.3,1,3,10"
    num_validation_images: int = 16  # the training scripts' own sample grids
    disc_validation_steps: int = 250  # held-out accuracy every N discriminator steps (0: at the end only)
    num_heldout_images: int = 128  # real and fake images each, kept out of the discriminator's training
    narrow_sigma_window: tuple = (0.01, 2.0)  # where 8x8 digits in [-1, 1] still differ visibly
    variants: List[str] = field(default_factory=lambda: ["default", "unet_encoder", "narrow_window"])
    selection_seed: int = 3  # guidance weights are chosen on this training seed, never on the reported ones
    guide_args: List[str] = field(default_factory=lambda: ["--block_out_channels", "16,32", "--ema_rampup_ratio",
                                                           "0.117"])  # docs/guidance.md: the guide recipe
    guide_fraction: int = 4  # the guide trains stf_steps // guide_fraction steps
    autoguidance_weights: List[float] = field(default_factory=lambda: [1.25, 1.5, 2.0, 3.0])
    guidance_interval: tuple = (0.05, 5.0)  # Kynkäänniemi et al.: guide only at intermediate σ
    cfg_weights: List[float] = field(default_factory=lambda: [1.5, 2.0, 3.0, 4.0])
    label_dropout: float = 0.1
    ema_stds: tuple = (0.05, 0.10)  # EDM2's tracked power-function EMAs
    ema_snapshot_steps: int = 50  # snapshots every N steps of the posthoc_ema runs
    posthoc_stds: List[float] = field(default_factory=lambda: [0.02, 0.04, 0.06, 0.08, 0.10, 0.15])
    # EDM2's network at the digits size closest to UNet2DModel's 0.634M parameters (0.631M; one head at 4x4), at
    # EDM2's α_ref: the magnitude-preserving layers keep unit-scale weights, so it needs about 10x Adam's usual rate
    edm2_args: List[str] = field(default_factory=lambda: ["--model_channels", "31", "--channel_mult", "1,2",
                                                          "--channels_per_head", "62", "--learning_rate", "1e-2"])

    @classmethod
    def full(cls) -> "Protocol":
        return cls(seeds=[0, 1, 2], num_images=1000, batch_size=250, heun_steps=18, ddim_steps=[10, 20, 50, 100],
                   stf_steps=700, sa_steps=1000, disc_steps=1000, num_fake_images=None, gap_budgets=[200, 2000],
                   dg_weights=[1.0, 2.0, 4.0])

    @classmethod
    def quick(cls) -> "Protocol":
        tiny = ["--block_out_channels", "8,16", "--norm_num_groups", "8"]
        return cls(seeds=[0], num_images=70, batch_size=70, heun_steps=3, ddim_steps=[10, 20], stf_steps=4,
                   sa_steps=4, disc_steps=4, num_fake_images=64, gap_budgets=[], dg_weights=[2.0], model_args=tiny,
                   disc_model_args=["--disc_block_out_channels", "8,16"], variants=["default", "narrow_window"],
                   num_validation_images=4, disc_validation_steps=0, num_heldout_images=32, selection_seed=1,
                   guide_args=["--block_out_channels", "8,8", "--norm_num_groups", "8"], guide_fraction=2,
                   autoguidance_weights=[1.5, 2.0], cfg_weights=[2.0], ema_snapshot_steps=2,
                   posthoc_stds=[0.04, 0.10], edm2_args=["--model_channels", "8", "--channel_mult", "1,2",
                                                         "--channels_per_head", "16", "--learning_rate", "1e-2"])


class Runner:
    """Trains through the example scripts' command lines and caches every result as a file under ``work_dir``."""

    def __init__(self, work_dir: str, protocol: Protocol, log: Callable[[str], None] = print, quiet: bool = False):
        self.work_dir, self.p, self.log, self.quiet = work_dir, protocol, log, quiet
        self._examples: Dict[str, object] = {}
        self._extractor = None
        self.cache_hits = 0  # models and evaluations taken from an earlier run's files
        self._made_here = set()  # folders and files this run made (reusing them is not a cache hit)
        os.makedirs(work_dir, exist_ok=True)

    # -- training -------------------------------------------------------------------------------------------

    def _example(self, name: str):
        if name not in self._examples:
            path = os.path.join(ROOT, "examples", f"{name}.py")
            spec = importlib.util.spec_from_file_location(f"bench_evidence_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self._examples[name] = module
        return self._examples[name]

    def train(self, script: str, name: str, argv: List[str]) -> str:
        """``examples/<script>.py --output_dir <work_dir>/models/<name> <argv>`` unless that folder already holds a
        pipeline finished with the same options; an unfinished folder (a killed run) or one trained with other
        options is trained again from scratch."""
        folder = os.path.join(self.work_dir, "models", name)
        argv = ["--output_dir", folder, "--checkpointing_steps", "0", "--report_to", "none", "--no_progress_bar", *argv]
        record = os.path.join(folder, "bench_train_args.json")
        if os.path.isfile(os.path.join(folder, "model_index.json")) and os.path.isfile(record):
            with open(record) as f:
                if json.load(f) == {"script": script, "argv": argv}:
                    self.cache_hits += folder not in self._made_here
                    return folder
            self.log(f"{folder} was trained with other options: training it again")
        shutil.rmtree(folder, ignore_errors=True)
        self.log(f"train {name}: python examples/{script}.py {' '.join(argv)}")
        start = time.perf_counter()
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink) if self.quiet else contextlib.nullcontext():
            self._example(script).main(argv)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise RuntimeError(f"examples/{script}.py finished without writing a pipeline to {folder}")
        with open(os.path.join(folder, "bench_train_seconds.json"), "w") as f:
            json.dump({"seconds": time.perf_counter() - start}, f)
        with open(record, "w") as f:  # last: its presence marks the folder as finished with these options
            json.dump({"script": script, "argv": argv}, f)
        self._made_here.add(folder)
        return folder

    def score_model(self, loss: str, steps: int, seed: int) -> str:
        """EDM or STF (R = 1024) on the 797-image split with ``train_stf.py``'s defaults otherwise."""
        argv = ["--loss", loss, "--seed", str(seed), "--digits_split", "train", "--max_train_steps", str(steps),
                "--validation_steps", "0", "--num_validation_images", str(self.p.num_validation_images),
                "--logging_steps", str(max(steps // 10, 1)), *self.p.model_args]
        if loss == "stf":
            argv += ["--stf_reference_batch_size", "1024"]
        return self.train("train_stf", f"{loss}-{steps}-seed{seed}", argv)

    def guide_model(self, seed: int) -> str:
        """The autoguidance guide of the EDM score model of ``seed`` (docs/guidance.md's recipe): half the widths, a
        quarter of the steps, EDM2's shorter guide EMA."""
        steps = max(self.p.stf_steps // self.p.guide_fraction, 1)
        argv = ["--loss", "edm", "--seed", str(seed), "--digits_split", "train", "--max_train_steps", str(steps),
                "--validation_steps", "0", "--num_validation_images", str(self.p.num_validation_images),
                "--logging_steps", str(max(steps // 10, 1)), *self.p.guide_args]
        return self.train("train_stf", f"guide-{steps}-seed{seed}", argv)

    def conditional_model(self, seed: int) -> str:
        """A class-conditional EDM model with CFG's label dropout (``train_stf.py --class_conditional``)."""
        steps = self.p.stf_steps
        argv = ["--loss", "edm", "--seed", str(seed), "--digits_split", "train", "--max_train_steps", str(steps),
                "--class_conditional", "--label_dropout", str(self.p.label_dropout), "--validation_steps", "0",
                "--num_validation_images", str(self.p.num_validation_images), "--logging_steps",
                str(max(steps // 10, 1)), *self.p.model_args]
        return self.train("train_stf", f"cond-edm-{steps}-seed{seed}", argv)

    def phema_model(self, seed: int) -> str:
        """The EDM score model of ``seed`` trained with EDM2's power-function EMAs (``--ema_stds``) and their
        snapshots; its saved pipeline holds the run's own half-life EMA."""
        steps = self.p.stf_steps
        argv = ["--loss", "edm", "--seed", str(seed), "--digits_split", "train", "--max_train_steps", str(steps),
                "--ema_stds", ",".join(f"{s:g}" for s in self.p.ema_stds), "--ema_snapshot_steps",
                str(self.p.ema_snapshot_steps), "--validation_steps", "0", "--num_validation_images",
                str(self.p.num_validation_images), "--logging_steps", str(max(steps // 10, 1)), *self.p.model_args]
        return self.train("train_stf", f"phema-edm-{steps}-seed{seed}", argv)

    def posthoc(self, folder: str, std: float) -> str:
        """The post-hoc EMA of σ_rel ``std`` at the last snapshot of the run in ``folder``
        (``python -m diffusers_stf.phema folder --std ...``, all of ``Protocol.posthoc_stds`` at once), cached as its
        pipeline folder ``folder/posthoc_ema/posthoc-<step>-<std>``."""
        from diffusers_stf import phema

        def made(value):
            return os.path.join(folder, phema.RECONSTRUCTION_DIR, f"posthoc-{self.p.stf_steps:09d}-{value:.3f}")

        stds = sorted(set(self.p.posthoc_stds) | {std})
        if all(os.path.isfile(os.path.join(made(s), "posthoc_ema.json")) for s in stds):
            self.cache_hits += made(std) not in self._made_here
            return made(std)
        self.log(f"post-hoc EMA of {os.path.basename(folder)}: σ_rel {', '.join(f'{s:g}' for s in stds)}")
        with contextlib.redirect_stdout(io.StringIO()):
            paths = phema.main([folder, "--std", ",".join(f"{s:g}" for s in stds)])
        self._made_here.update(paths)
        return made(std)

    def ddpm_model(self, sa: bool, seed: int) -> str:
        """DDPM L_simple or SA-2 (K = 2, λ = 1, uniform τ as the official code) with ``train_sequence_aware.py``."""
        options = ["--sa_k", "2", "--sa_lambda", "1"] if sa else ["--sa_lambda", "0"]
        steps = self.p.sa_steps
        argv = ["--seed", str(seed), "--digits_split", "train", "--max_train_steps", str(steps), "--validation_steps",
                "0", "--num_validation_images", str(self.p.num_validation_images), "--num_inference_steps", "10",
                "--logging_steps", str(max(steps // 10, 1)), *options, *self.p.model_args]
        return self.train("train_sequence_aware", f"{'sa2' if sa else 'ddpm'}-{steps}-seed{seed}", argv)

    def edm2_model(self, seed: int) -> str:
        """EDM2's magnitude-preserving U-Net (``--architecture edm2``) with the EDM loss, the EDM arm's steps and
        settings otherwise."""
        steps = self.p.stf_steps
        argv = ["--architecture", "edm2", "--loss", "edm", "--seed", str(seed), "--digits_split", "train",
                "--max_train_steps", str(steps), "--validation_steps", "0", "--num_validation_images",
                str(self.p.num_validation_images), "--logging_steps", str(max(steps // 10, 1)), *self.p.edm2_args]
        return self.train("train_stf", f"edm2-edm-{steps}-seed{seed}", argv)

    def discriminator(self, score_folder: str, seed: int, variant: str = "default") -> str:
        """``train_discriminator.py`` on ``score_folder``'s unguided Heun samples; ``variant``: ``default`` (a small
        noise-conditional encoder, DG's σ range), ``unet_encoder`` (DG's recipe: a head on the frozen score-UNet
        encoder) or ``narrow_window`` (σ only in ``Protocol.narrow_sigma_window``)."""
        argv = ["--pretrained_model_name_or_path", score_folder, "--seed", str(seed), "--digits_split", "train",
                "--max_train_steps", str(self.p.disc_steps), "--validation_steps", str(self.p.disc_validation_steps),
                "--num_validation_images", str(self.p.num_validation_images),
                "--generation_steps", str(self.p.heun_steps), "--num_inference_steps", str(self.p.heun_steps),
                "--validation_sigmas", self.p.validation_sigmas, "--num_heldout_images", str(self.p.num_heldout_images),
                "--logging_steps", str(max(self.p.disc_steps // 10, 1)),
                *self.p.disc_model_args]
        if self.p.num_fake_images:
            argv += ["--num_fake_images", str(self.p.num_fake_images)]
        if variant == "unet_encoder":
            argv += ["--feature_extractor", "unet_encoder"]
        elif variant == "narrow_window":
            argv += ["--sigma_min", str(self.p.narrow_sigma_window[0]), "--sigma_max", str(self.p.narrow_sigma_window[1])]
        elif variant != "default":
            raise ValueError(f"variant must be 'default', 'unet_encoder' or 'narrow_window', got {variant!r}")
        return self.train("train_discriminator", f"disc-{variant}-on-{os.path.basename(score_folder)}", argv)

    # -- evaluation -----------------------------------------------------------------------------------------

    def fd(self, folder: str, key: str, scheduler: Optional[str] = None, steps: Optional[int] = None,
           overrides: Optional[dict] = None, guide: Optional[str] = None, **pipeline_kwargs) -> Dict[str, float]:
        """FD vs the training digits of ``num_images`` samples (seeds 0 … n−1) of the pipeline in ``folder``
        (guided by the autoguidance guide in ``guide``), cached in ``<folder>/bench_eval_<key>.json``. For a
        class-conditional pipeline image s asks for class s mod 10, and the row adds the shipped classifier's accuracy
        of the requested label."""
        path = os.path.join(folder, f"bench_eval_{key}.json")
        if os.path.isfile(path):
            with open(path) as f:
                cached = json.load(f)
            if cached.get("num_images") == self.p.num_images:
                self.cache_hits += path not in self._made_here
                return cached
        from diffusers_stf.evaluation import (
            class_labels_for_seeds, compute_features, evaluate_images, generate_images, load_feature_extractor,
            load_guide_unet, load_pipeline, make_scheduler, pipeline_with_guide, pipeline_with_scheduler,
        )

        if self._extractor is None:
            self._extractor = load_feature_extractor("digits")
        import torch

        pipe = load_pipeline(folder, device="cuda" if torch.cuda.is_available() else "cpu")
        if scheduler is not None:
            pipe = pipeline_with_scheduler(pipe, make_scheduler(pipe.scheduler, scheduler, **(overrides or {})))
        if guide is not None:
            pipe = pipeline_with_guide(pipe, load_guide_unet(guide))
        out = generate_images(pipe, self.p.num_images, steps or self.p.heun_steps, seed=0,
                              batch_size=self.p.batch_size, progress=False, **pipeline_kwargs)
        result = evaluate_images(out["images"], self._extractor, references=(REFERENCE,))
        row = {"fd_train": float(result["fd"][REFERENCE]), "precision_train": float(result["precision"][REFERENCE]),
               "recall_train": float(result["recall"][REFERENCE]), "nfe": out["nfe"], "seconds": out["seconds"],
               "num_images": self.p.num_images}
        requested = class_labels_for_seeds(pipe, range(self.p.num_images))
        if requested is not None:
            logits = compute_features(self._extractor, out["images"])[1]
            row["label_accuracy"] = float((logits.argmax(1) == requested.numpy()).mean())
        with open(path + ".partial", "w") as f:
            json.dump(row, f, indent=1)
        os.replace(path + ".partial", path)
        self._made_here.add(path)
        self.log(f"  {os.path.basename(folder)} [{key}]: FD vs train {row['fd_train']:.2f}")
        return row

    def real_floor(self) -> float:
        """FD of the real held-out digits against the training split, at the same n (the metric's floor)."""
        path = os.path.join(self.work_dir, f"floor_{self.p.num_images}.json")
        if not os.path.isfile(path):
            from diffusers_stf.evaluation import evaluate_images, load_feature_extractor, reference_images

            held = reference_images("digits:heldout")[: self.p.num_images]
            fd = evaluate_images(held, load_feature_extractor("digits"), references=(REFERENCE,))["fd"][REFERENCE]
            with open(path, "w") as f:
                json.dump({"fd_train": float(fd), "num_images": len(held)}, f)
        with open(path) as f:
            return json.load(f)["fd_train"]

    @staticmethod
    def _validation_rows(disc_folder: str) -> List[Dict[str, float]]:
        path = os.path.join(disc_folder, "logs", "validation.jsonl")
        if not os.path.isfile(path):
            return []
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    @classmethod
    def heldout_accuracy(cls, disc_folder: str) -> Dict[str, float]:
        """The last row of ``train_discriminator.py``'s held-out accuracy log: accuracy at each validation σ
        (balanced real/fake held-out sets, so 0.5 is chance)."""
        rows = cls._validation_rows(disc_folder)
        last = rows[-1] if rows else {}
        return {k[len("accuracy_sigma_"):]: v for k, v in last.items() if k.startswith("accuracy_sigma_")}

    @classmethod
    def accuracy_trajectory(cls, disc_folder: str) -> List[Dict[str, float]]:
        """Held-out accuracy averaged over the validation σ at each validation step: still rising at the end means
        the discriminator was stopped too early."""
        out = []
        for row in cls._validation_rows(disc_folder):
            values = [v for k, v in row.items() if k.startswith("accuracy_sigma_")]
            if values:
                out.append({"step": row.get("step"), "mean_accuracy": statistics.fmean(values)})
        return out
