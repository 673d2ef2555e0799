"""The training-loop driver shared by the scripts: a script supplies its loss, the trainer does the rest.

One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``train_batch_size`` images per process. For
micro-step m, every random draw of the step (crops, flips, σ, noise, references) comes from
``step_generator(seed, m, process_index)`` and the images from :class:`~diffusers_stf.training.data.BatchSchedule`,
so a run resumed from a checkpoint repeats an uninterrupted run exactly; accelerate restores the global RNGs
(dropout) and the optimizer, the trainer the EMA, the lr schedule and the step.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Union

import torch

from .accelerator import make_accelerator, step_generator
from .checkpoints import (
    list_checkpoints, load_checkpoint, model_fingerprint, register_model_hooks, resolve_checkpoint, save_checkpoint,
    save_weights,
)
from .data import BatchSchedule, ImageData
from .ema import EMAModel
from .hub import push_folder_to_hub
from .metrics_log import MetricsLogger
from .model_card import ModelCardInfo, write_model_card
from .validation import sample_grid

logger = logging.getLogger(__name__)


@dataclass
class LossOutput:
    """What a loss function returns to the trainer.

    Args:
        loss: the scalar to minimise.
        per_sample: detached per-sample losses (B,), logged per σ bucket together with ``sigma``.
        sigma: the noise level of each sample (B,).
        logs: more scalars to log (averaged between writes).
    """

    loss: torch.Tensor
    per_sample: Optional[torch.Tensor] = None
    sigma: Optional[torch.Tensor] = None
    logs: Dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingResult:
    """Where a finished run put things."""

    output_dir: str
    step: int
    nimg: int
    wall_time: float
    samples_path: Optional[str] = None
    model_card_path: Optional[str] = None
    metrics_path: Optional[str] = None
    pushed_to: Optional[str] = None


LossFn = Callable[[torch.nn.Module, Dict[str, torch.Tensor], torch.Generator], Union[LossOutput, torch.Tensor]]


class Trainer:
    """Train ``model`` on ``data`` by minimising ``loss_fn``; EMA, checkpoints, logs, grids, card, Hub.

    Args:
        args: options of :func:`~diffusers_stf.training.args.add_training_args`.
        model: the network to train (a diffusers ``ModelMixin`` to get ``save_pretrained`` folders).
        loss_fn: ``loss_fn(model, batch, generator) -> LossOutput`` (or a scalar tensor). ``model`` is the
            accelerate-prepared model (DDP-wrapped with several processes); ``batch`` is
            ``{"images": (B, C, H, W) in [−1, 1], "index": (B,), "labels": (B,)}`` on the device, already randomly
            cropped/flipped; ``generator`` (on the device) must be the source of every random draw of the loss.
        data: the training :class:`~diffusers_stf.training.data.ImageData`.
        accelerator: from :func:`make_accelerator` (made here when None).
        make_pipeline: ``make_pipeline(model) -> DiffusionPipeline`` around the EMA weights, for the validation grids
            and the final ``save_pretrained`` folder. Without it the final folder holds the EMA model only.
        optimizer: default AdamW with the ``--adam_*`` options.
        model_card: the script's :class:`ModelCardInfo` (None: no card).
        fingerprint: the script's resume-critical settings (e.g. the loss); a checkpoint written with other values
            (or another model config) is refused.
        validation_fn: ``validation_fn(ema_model, step, path) -> path or None``, replacing the sample grid.
        make_validation_pipeline: a different pipeline for the grids only (e.g. DDIM while saving DDPM);
            default ``make_pipeline``.
    """

    def __init__(self, args, model: torch.nn.Module, loss_fn: LossFn, data: ImageData, accelerator=None,
                 make_pipeline: Optional[Callable] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                 model_card: Optional[ModelCardInfo] = None, fingerprint: Optional[Dict] = None,
                 validation_fn: Optional[Callable] = None, make_validation_pipeline: Optional[Callable] = None):
        self.args, self.model, self.loss_fn, self.data = args, model, loss_fn, data
        self.accelerator = accelerator if accelerator is not None else make_accelerator(args)
        self.make_pipeline, self.model_card, self.validation_fn = make_pipeline, model_card, validation_fn
        self.make_validation_pipeline = make_validation_pipeline or make_pipeline
        self.optimizer = optimizer or torch.optim.AdamW(
            model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
        acc = self.accelerator
        self.schedule = BatchSchedule(len(data), args.train_batch_size, args.seed, acc.num_processes, acc.process_index)
        self.accumulation = args.gradient_accumulation_steps
        self.steps_per_epoch = self.schedule.batches_per_epoch // self.accumulation
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"one optimizer step needs {self.schedule.global_batch * self.accumulation} images "
                f"(batch x processes x gradient_accumulation_steps) but the dataset has {len(data)}")
        self.max_steps = args.max_train_steps or args.num_epochs * self.steps_per_epoch
        self.global_batch = self.schedule.global_batch * self.accumulation
        warmup = args.lr_warmup_steps
        if warmup is None:
            warmup = round(getattr(args, "lr_rampup_kimg", 0.0) * 1000 / self.global_batch)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(args.lr_scheduler, self.optimizer, num_warmup_steps=warmup,
                                          num_training_steps=self.max_steps)
        self.fingerprint = {**model_fingerprint(model), "global_batch_size": self.global_batch,
                            "gradient_accumulation_steps": self.accumulation, "seed": args.seed,
                            "script": dict(fingerprint or {})}
        self.output_dir = args.output_dir
        self.step, self.nimg = 0, 0
        self.last_row: Dict = {}

    # -- pieces ---------------------------------------------------------------------------------------------------
    def micro_batch(self, micro_step: int):
        """The batch and generator of ``micro_step`` on this process."""
        acc = self.accelerator
        generator = step_generator(self.args.seed, micro_step, acc.process_index, acc.device)
        batch = self.data.batch(self.schedule.indices(micro_step), generator)
        return {k: v.to(acc.device) for k, v in batch.items()}, generator

    def trainer_state(self) -> Dict:
        return {"step": self.step, "nimg": self.nimg, "epoch": self.step // self.steps_per_epoch,
                "lr_scheduler": self.lr_scheduler.state_dict(), "num_processes": self.accelerator.num_processes,
                "fingerprint": self.fingerprint}

    def validate(self, path: str) -> Optional[str]:
        """Sample grid (or ``validation_fn``) of the EMA weights, on the main process."""
        acc = self.accelerator
        out = None
        if acc.is_main_process:
            ema_model = self.ema.model
            if self.validation_fn is not None:
                out = self.validation_fn(ema_model, self.step, path)
            elif self.make_validation_pipeline is not None:
                pipeline = self.make_validation_pipeline(ema_model).to(acc.device)
                out = sample_grid(pipeline, path, self.args.num_validation_images, self.args.num_inference_steps,
                                  self.args.validation_seed)
        acc.wait_for_everyone()
        return out

    def resume(self):
        args, acc = self.args, self.accelerator
        path = resolve_checkpoint(self.output_dir, getattr(args, "resume_from_checkpoint", None))
        if path is None:
            if getattr(args, "resume_from_checkpoint", None) == "latest":
                acc.print(f"No checkpoint in {self.output_dir}; starting a new run.")
            elif list_checkpoints(self.output_dir):
                acc.print(f"Note: {self.output_dir} already holds checkpoints of an earlier run; they will be replaced. "
                          "Pass --resume_from_checkpoint latest to continue that run instead.")
            return
        state = load_checkpoint(acc, path, self.ema, self.fingerprint)
        self.step, self.nimg = int(state["step"]), int(state["nimg"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        acc.print(f"Resumed from {path} at step {self.step}.")

    # -- the loop -------------------------------------------------------------------------------------------------
    def train(self) -> TrainingResult:
        from tqdm.auto import tqdm

        args, acc = self.args, self.accelerator
        start_time = time.time()
        os.makedirs(self.output_dir, exist_ok=True)
        unwrapped = self.model
        self.ema = EMAModel(unwrapped, args.ema_halflife_kimg, args.ema_rampup_ratio).to(acc.device)
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        register_model_hooks(acc)
        self.resume()
        if acc.trackers == [] and acc.log_with:
            acc.init_trackers(os.path.basename(os.path.normpath(self.output_dir)))
        metrics = MetricsLogger(acc, os.path.join(self.output_dir, args.logging_dir), args.sigma_buckets)
        progress = tqdm(total=self.max_steps, initial=self.step, desc="training", dynamic_ncols=True,
                        disable=not acc.is_local_main_process or getattr(args, "no_progress_bar", False))
        self.model.train()
        last_loss = None
        while self.step < self.max_steps:
            for micro in range(self.accumulation):
                batch, generator = self.micro_batch(self.step * self.accumulation + micro)
                with acc.accumulate(self.model):
                    out = self.loss_fn(self.model, batch, generator)
                    out = out if isinstance(out, LossOutput) else LossOutput(loss=out)
                    acc.backward(out.loss)
                    if acc.sync_gradients:
                        for p in self.model.parameters():  # as EDM: NaN → 0, ±inf → ±1e5
                            if p.grad is not None:
                                torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
                        if args.max_grad_norm:
                            acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                metrics.accumulate(out.loss, out.per_sample, out.sigma, out.logs)
                last_loss = float(out.loss.detach())
            lr = self.lr_scheduler.get_last_lr()[0]
            self.lr_scheduler.step()
            beta = self.ema.update(acc.unwrap_model(self.model), self.nimg, self.global_batch)
            self.nimg += self.global_batch
            self.step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
            if self.step % args.logging_steps == 0 or self.step == self.max_steps:
                self.last_row = metrics.write(self.step, nimg=self.nimg, epoch=self.step // self.steps_per_epoch, lr=lr, ema_beta=beta,
                              seconds=round(time.time() - start_time, 2))
            if args.checkpointing_steps and self.step % args.checkpointing_steps == 0:
                save_checkpoint(acc, self.output_dir, self.step, self.ema, self.trainer_state(),
                                args.checkpoints_total_limit)
            if args.validation_steps and self.step % args.validation_steps == 0 and self.step < self.max_steps:
                self.validate(os.path.join(self.output_dir, "samples", f"step_{self.step:07d}.png"))
        progress.close()
        return self.finish(time.time() - start_time, metrics)

    def finish(self, wall_time: float, metrics: MetricsLogger) -> TrainingResult:
        """Final grid, ``save_pretrained`` folder, model card and Hub upload (main process)."""
        args, acc = self.args, self.accelerator
        result = TrainingResult(self.output_dir, self.step, self.nimg, wall_time, metrics_path=metrics.jsonl_path)
        result.samples_path = self.validate(os.path.join(self.output_dir, "samples.png"))
        if acc.is_main_process:
            if self.make_pipeline is not None:
                self.make_pipeline(self.ema.model).save_pretrained(self.output_dir)
            else:
                save_weights(self.ema.model, self.output_dir)
            if self.model_card is not None:
                repo = args.hub_model_id if getattr(args, "push_to_hub", False) else os.path.abspath(self.output_dir)
                facts = {"optimizer steps": self.step, "training images seen": self.nimg,
                         "wall time (s)": round(wall_time, 1), "processes": acc.num_processes,
                         "parameters": sum(p.numel() for p in self.ema.model.parameters())}
                if "loss" in self.last_row:
                    facts[f"training loss (last {args.logging_steps} steps)"] = round(self.last_row["loss"], 4)
                config = {k: v for k, v in sorted(vars(args).items()) if k != "hub_token"}
                datasets = [self.data.name] if self.data.name and self.data.name != "imagefolder" else None
                grid = os.path.relpath(result.samples_path, self.output_dir) if result.samples_path else None
                result.model_card_path = write_model_card(self.output_dir, self.model_card, repo, datasets, config,
                                                          grid, facts)
            if getattr(args, "push_to_hub", False):
                push_folder_to_hub(self.output_dir, args.hub_model_id, token=args.hub_token,
                                   private=args.hub_private_repo, commit_message=f"Training finished at step {self.step}")
                result.pushed_to = args.hub_model_id
        acc.wait_for_everyone()
        acc.end_training()
        return result


def run_training(args, model, loss_fn: LossFn, data: ImageData, **kwargs) -> TrainingResult:
    """``Trainer(args, model, loss_fn, data, **kwargs).train()``."""
    return Trainer(args, model, loss_fn, data, **kwargs).train()
