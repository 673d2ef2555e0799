"""The training-loop driver shared by the scripts: a script supplies its loss, the trainer does the rest.

One optimizer step = ``gradient_accumulation_steps`` micro-batches of ``train_batch_size`` images per process. For
micro-step m, every random draw of the step (crops, flips, σ, noise, references) comes from
``step_generator(seed, m, process_index)`` and the images from :class:`~diffusers_stf.training.data.BatchSchedule`, so
a run resumed from a checkpoint repeats an uninterrupted run exactly; accelerate restores the global RNGs (dropout) and
the optimizer, the trainer the EMA, the lr schedule, the step and the wall time.

The training step never waits for the host: losses are summed on the device, and whether a loss was NaN or ±inf is
checked at each logging step, checkpoint and at the end; the run then stops with the first bad step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Callable, Dict, Optional, Union

import torch

from ..digits import DIGITS_NAME
from ..hub import write_model_remote_code
from ..hub.push import DEFAULT_IGNORE, check_hub_settings, create_repo_early, push_or_explain
from ..losses import LossOutput
from .accelerator import check_launcher, launcher_pid, make_accelerator, step_generator, to_device
from .checkpoints import kill_point, list_checkpoints, register_model_hooks, save_weights, saved_state
from .config import TrainingConfig
from .data import ArrowImages, BatchSchedule, ImageData, derived_seed
from .finished_run import FINISHED_FILE, finished_record, write_finished
from .global_batch import BatchShare, global_indices, share_of, take_rows
from .in_training_eval import EvaluationSampler, InTrainingEvaluation
from .metrics_log import MetricsLogger
from .plots import record_validation, sampler_caption
from .model_card import ModelCardInfo, hub_dataset_ids, local_name, write_model_card
from .optimization import (
    finish_gradients, make_ema, make_lr_scheduler, make_optimizer, optimizer_settings, warmup_steps,
)
from .power_ema import power_ema_tracking
from .resume_settings import run_fingerprint
from .run_result import TrainingResult, print_summary, record_of_result, result_of_record
from .run_checkpoints import RunCheckpoints
from .run_folder import final_save_error, install_folder, open_run_folder
from .trained_modules import TrainedModules
from .validation import check_sampling_steps, sample_grid

logger = logging.getLogger(__name__)

class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or ±inf."""


LossFn = Callable[[torch.nn.Module, Dict[str, torch.Tensor], torch.Generator], Union[LossOutput, torch.Tensor]]


class Trainer(RunCheckpoints):
    """Train ``model`` on ``data`` by minimising ``loss_fn``; EMA, checkpoints, logs, grids, card, Hub.

    Args:
        config: the run's :class:`~diffusers_stf.training.config.TrainingConfig`.
        model: the network to train (a diffusers ``ModelMixin`` to get ``save_pretrained`` folders).
        loss_fn: ``loss_fn(model, batch, generator) -> LossOutput``: what every loss of
            :mod:`~diffusers_stf.losses` returns, the per-sample loss (B,) whose mean is minimised, with σ and logs
            (a tensor is taken as the per-sample loss, or its mean). ``model`` is the
            accelerate-prepared model (DDP-wrapped with several processes); ``batch`` is
            ``{"images": (B, C, H, W) in [−1, 1], "index": (B,), "labels": (B,)}`` on the device (``index`` on the
            CPU), with ``"data_generator"``, the CPU generator for drawing more dataset images (e.g.
            ``data.random_batch(k, batch["data_generator"])``) and ``"share"``, this process's
            :class:`~diffusers_stf.training.global_batch.BatchShare` of the batch (see ``global_draws``) and
            ``"global_index"``, the CPU indices of the whole global batch (``share.total`` of them), already
            randomly cropped/flipped; ``generator`` (on the device) must be the source of every random draw of the loss.
        data: the training :class:`~diffusers_stf.training.data.ImageData`.
        accelerator: from :func:`make_accelerator` (made here when None).
        make_pipeline: ``make_pipeline(model) -> DiffusionPipeline`` around the EMA weights, for the sample grids and
            the final ``save_pretrained`` folder. Without it the final folder holds the EMA model only.
        validation_fn: ``validation_fn(ema_model, step, path) -> path or None``, replacing the sample grid.
        optimizer: default AdamW with the ``adam_*`` settings of ``config``.
        model_card: the script's :class:`ModelCardInfo` (None: no card).
        fingerprint: the script's settings that change the maths (e.g. the loss and its parameters); together with
            the model config and the trainer's own settings they must match a checkpoint to resume it.
        hub_ignore_patterns: more patterns of files in ``output_dir`` that the Hub upload leaves out.
        trained_modules: ``{name: module}`` trained with the model but not part of it, e.g. the log-variance head of
            EDM2's loss (:mod:`~diffusers_stf.training.trained_modules`): optimised with it, on the device in training
            mode, gradients averaged over the processes, saved in checkpoints.
        global_draws: every process gets the same step generator and the batch of the whole global batch's rows
            (images, crops, flips), so that a ``loss_fn`` drawing σ and noise for ``batch["share"].total`` images and
            keeping ``batch["share"]``'s rows makes the same steps with any number of processes (see
            :mod:`~diffusers_stf.training.global_batch`). Without it each process draws for its own rows; then
            ``batch["share"]`` covers just this process's batch, so the same ``loss_fn`` works either way.
        evaluation_sampler: what ``--eval_every_steps`` samples (default: ``make_pipeline`` with
            ``num_inference_steps``); see :mod:`~diffusers_stf.training.in_training_eval`.
    """

    def __init__(self, config: TrainingConfig, model: torch.nn.Module, loss_fn: LossFn, data: ImageData,
                 accelerator=None, make_pipeline: Optional[Callable] = None, validation_fn: Optional[Callable] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None, model_card: Optional[ModelCardInfo] = None,
                 fingerprint: Optional[Dict] = None, hub_ignore_patterns: tuple = (), global_draws: bool = False,
                 trained_modules: Optional[Dict[str, torch.nn.Module]] = None,
                 evaluation_sampler: Optional[EvaluationSampler] = None):
        self.config, self.model, self.loss_fn, self.data = config, model, loss_fn, data
        self.trained_modules, self.power_ema = TrainedModules(trained_modules), None
        config.hub_model_id = check_hub_settings(config.push_to_hub, config.hub_model_id, config.hub_token,
                                                 config.output_dir)
        self.accelerator = accelerator if accelerator is not None else make_accelerator(config)
        self.make_pipeline, self.validation_fn, self.model_card = make_pipeline, validation_fn, model_card
        if make_pipeline is not None and validation_fn is None and config.num_inference_steps:
            # the grids' sampler takes the run's settings: a refusal stops the run now, not after training
            check_sampling_steps(make_pipeline(model).scheduler, config.num_inference_steps)
        if evaluation_sampler is None and make_pipeline is not None:
            evaluation_sampler = EvaluationSampler(make_pipeline, config.num_inference_steps)
        self.evaluation = InTrainingEvaluation(config.evaluation, self.accelerator, evaluation_sampler, data, model)
        self.hub_ignore_patterns = tuple(hub_ignore_patterns)
        self.optimizer = optimizer or make_optimizer(config, [*model.parameters(), *self.trained_modules.parameters()])
        self.optimizer_settings = optimizer_settings(self.optimizer)
        acc = self.accelerator
        self.schedule = BatchSchedule(len(data), config.train_batch_size, config.seed, acc.num_processes,
                                      acc.process_index)
        self.global_draws = bool(global_draws)
        self.share = share_of(self.schedule) if self.global_draws else \
            BatchShare.of_process(config.train_batch_size)
        # --dataloader_num_workers N: N threads read the rows of the next N micro-batches from a memory-mapped set
        # ahead of time (a set in memory has nothing to read ahead). The look-ahead uses its own schedule so that
        # near an epoch's end it does not evict the current epoch's cached permutation.
        memory_mapped = isinstance(getattr(data, "images", None), ArrowImages)
        self.read_ahead = config.dataloader_num_workers if memory_mapped else 0
        self.lookahead_schedule = BatchSchedule(len(data), config.train_batch_size, config.seed, acc.num_processes,
                                                acc.process_index)
        if config.dataloader_num_workers:
            self.read_ahead_note = (
                f"--dataloader_num_workers {self.read_ahead}: {self.read_ahead} threads read the next "
                f"{self.read_ahead} batches from the memory-mapped file ahead of time" if self.read_ahead else
                "--dataloader_num_workers has no effect: the images are held in memory (nothing to read ahead)")
        else:
            self.read_ahead_note = None
        self.accumulation = config.gradient_accumulation_steps
        self.steps_per_epoch = self.schedule.batches_per_epoch // self.accumulation
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"one optimizer step needs {self.schedule.global_batch * self.accumulation} images "
                f"(batch x processes x gradient_accumulation_steps) but the dataset has {len(data)}")
        epochs = config.num_epochs or config.default_num_epochs
        self.max_steps = config.max_train_steps or epochs * self.steps_per_epoch
        self.global_batch = self.schedule.global_batch * self.accumulation
        self.lr_scheduler = make_lr_scheduler(config, self.optimizer, self.global_batch, self.max_steps)
        self.fingerprint = run_fingerprint(config, model, self.optimizer_settings,
                                           warmup_steps(config, self.global_batch), data, acc.num_processes,
                                           self.accumulation, self.global_batch, self.max_steps,
                                           self.global_draws, fingerprint)
        self.validation_steps = config.validation_steps
        if config.save_images_epochs:
            self.validation_steps = config.save_images_epochs * self.steps_per_epoch
        self.save_model_steps = (config.save_model_epochs or 0) * self.steps_per_epoch
        if config.enable_xformers_memory_efficient_attention:
            import importlib.util

            usable = hasattr(model, "enable_xformers_memory_efficient_attention")
            if importlib.util.find_spec("xformers") is None or not usable:
                raise ValueError("--enable_xformers_memory_efficient_attention needs the xformers package and a "
                                 "diffusers model")
            model.enable_xformers_memory_efficient_attention()
        self.output_dir = config.output_dir
        self.run_folder = open_run_folder(self.accelerator, config)  # made by make_accelerator unless given ours
        self.launcher = launcher_pid()
        self.last_checkpoint = time.monotonic()
        self.step, self.nimg, self.wall_offset = 0, 0, 0.0
        self.run_id: Optional[str] = None
        self.last_row: Dict = {}

    # -- pieces ---------------------------------------------------------------------------------------------------
    def micro_batch(self, micro_step: int):
        """The batch and generator of ``micro_step`` on this process.

        Draws on the data (crops, flips, and the loss's extra images through ``batch["data_generator"]``) use a CPU
        generator, where the images live, so that they never wait for an accelerator; on the CPU it is the loss's
        generator itself."""
        acc = self.accelerator
        stream = 0 if self.global_draws else acc.process_index  # global draws: one stream for every process
        generator = step_generator(self.config.seed, micro_step, stream, acc.device)
        data_generator = generator
        if generator.device.type != "cpu":
            data_generator = torch.Generator().manual_seed(derived_seed(self.config.seed, micro_step, stream, 1))
        for ahead in range(1, self.read_ahead + 1):
            upcoming = micro_step + ahead
            self.data.images.prefetch(global_indices(self.lookahead_schedule, upcoming) if self.global_draws
                                      else self.lookahead_schedule.indices(upcoming))
        global_index = None
        if self.global_draws:  # crops and flips drawn for the whole global batch, then this process's rows
            global_index = global_indices(self.schedule, micro_step)
            batch = take_rows(self.data.batch(global_index, data_generator), self.share)
        else:
            batch = self.data.batch(self.schedule.indices(micro_step), data_generator)
        # the indices stay on the CPU, where the images live (e.g. to exclude them from STF's references)
        batch = {k: v if k == "index" else to_device(v, acc.device) for k, v in batch.items()}
        batch["global_index"] = batch["index"] if global_index is None else global_index
        batch["data_generator"] = data_generator
        batch["share"] = self.share
        return batch, generator

    def validate(self, path: str) -> Optional[str]:
        """Sample grid (or ``validation_fn``) of the EMA weights, captioned with the step and the sampler, on the main
        process; the grid also goes to the tracker, and ``logs/loss.png`` is redrawn."""
        acc = self.accelerator
        out, caption = None, None
        if acc.is_main_process:
            self.run_folder.claim(path)
            ema_model = self.ema.model
            if self.validation_fn is not None:
                out = self.validation_fn(ema_model, self.step, path)
            elif self.make_pipeline is not None:
                pipeline = self.make_pipeline(ema_model).to(acc.device)
                caption = sampler_caption(self.step, pipeline, self.config.num_inference_steps)
                out = sample_grid(pipeline, path, self.config.num_validation_images, self.config.num_inference_steps,
                                  self.config.validation_seed, caption=caption)
            record_validation(acc, out, self.step, self.run_folder.log_dir, caption)
        acc.wait_for_everyone()
        return out

    def check_finite(self, first_bad: torch.Tensor):
        """Raise :class:`NonFiniteLossError` naming the first step whose loss was NaN or ±inf (on any process)."""
        first = self.accelerator.gather(first_bad.reshape(1))
        bad = first[first >= 0]
        if len(bad):
            step = int(bad.min())
            raise NonFiniteLossError(
                f"the training loss is not finite (NaN or inf) at step {step}; training stopped at step {self.step}. "
                "Check the loss options and the learning rate. Checkpoints written before step "
                f"{step} are intact.")

    # -- the loop -------------------------------------------------------------------------------------------------
    def train(self) -> TrainingResult:
        """Train for ``max_steps`` optimizer steps (resuming from ``resume_from_checkpoint``), then :meth:`finish`.

        A ``latest`` resume of a run that already finished with these settings and this length changes nothing: it
        says so and returns that run's result."""
        record = finished_record(self.output_dir, self.config.resume_from_checkpoint, self.fingerprint, self.max_steps)
        if record is not None:
            self.run_folder.release()
            return self.report_finished(record)
        if self.read_ahead:
            self.data.images.start_prefetch(self.read_ahead)
        try:
            return self.train_and_finish()
        finally:
            if self.read_ahead:
                self.data.images.stop_prefetch()
            self.run_folder.release()

    def train_and_finish(self) -> TrainingResult:
        from tqdm.auto import tqdm

        config, acc = self.config, self.accelerator
        for note in (*config.notes, config.length_note(), self.read_ahead_note):
            if note:
                acc.print(note)
        acc.print(f"{self.max_steps} optimizer steps of {self.global_batch} images "
                  f"({self.max_steps / self.steps_per_epoch:.3g} epochs of {self.steps_per_epoch} steps)")
        segment_start = time.time()
        self.run_folder.start()
        self.ema = make_ema(config, self.model).to(acc.device)
        acc.print(f"EMA: {self.ema.rule}")
        self.power_ema = power_ema_tracking(config, self.model, self.global_batch, self.max_steps, self.run_folder,
                                            acc)
        self.trained_modules.prepare(acc.device)
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        register_model_hooks(acc)
        metrics = MetricsLogger(acc, self.run_folder.log_dir, config.sigma_buckets)
        self.resume(metrics)
        self.evaluation.start(self.run_folder.log_dir)
        if config.push_to_hub and acc.is_main_process:  # a bad token or a taken name stops the run before training
            config.hub_model_id = create_repo_early(config.hub_model_id, config.hub_token,
                                                    private=config.hub_private_repo)
        if acc.trackers == [] and acc.log_with:
            acc.init_trackers(os.path.basename(os.path.normpath(self.output_dir)))
        progress = tqdm(total=self.max_steps, initial=self.step, desc="training", dynamic_ncols=True,
                        disable=not acc.is_local_main_process or config.no_progress_bar)
        first_bad = torch.full((), -1, dtype=torch.long, device=acc.device)
        self.model.train()
        self.last_checkpoint = time.monotonic()  # --checkpointing_minutes count from here

        def wall_time():
            return self.wall_offset + time.time() - segment_start - self.evaluation.segment_seconds

        while self.step < self.max_steps:
            for micro in range(self.accumulation):
                batch, generator = self.micro_batch(self.step * self.accumulation + micro)
                with acc.accumulate(self.model):
                    out = self.loss_fn(self.model, batch, generator)
                    out = out if isinstance(out, LossOutput) else LossOutput(loss=out)
                    objective = out.loss.mean()
                    acc.backward(objective)
                    if acc.sync_gradients:
                        finish_gradients(acc, self.model, self.trained_modules, config.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                finite = torch.isfinite(objective.detach())
                first_bad = torch.where(~finite & (first_bad < 0), self.step + 1, first_bad)
                metrics.accumulate(objective, out.loss, out.sigma, out.logs, out.per_sample_logs)
            lr = self.lr_scheduler.get_last_lr()[0]
            self.lr_scheduler.step()
            beta = self.ema.update(acc.unwrap_model(self.model), self.nimg, self.global_batch, self.step)
            self.nimg += self.global_batch
            self.step += 1
            if self.power_ema is not None:  # before any checkpoint of this step: a resume never lacks its snapshot
                self.power_ema.update(self.step, self.nimg, self.global_batch)
            progress.update(1)
            kill_point("step", self.step)
            check_launcher(self.launcher, self.step)
            logging_step = self.step % config.logging_steps == 0 or self.step == self.max_steps
            if logging_step:
                self.last_row = metrics.write(self.step, nimg=self.nimg, epoch=self.step // self.steps_per_epoch,
                                              lr=lr, ema_beta=beta, seconds=round(wall_time(), 2))
                progress.set_postfix(loss=f"{self.last_row['loss']:.4f}", lr=f"{lr:.2e}")
                self.check_finite(first_bad)
            self.evaluation.after_step(self.step, self.max_steps, self.ema.model, progress)
            by_steps = bool(config.checkpointing_steps) and self.step % config.checkpointing_steps == 0
            if by_steps or (logging_step and self.checkpoint_due_by_time()):
                self.check_finite(first_bad)
                self.save_checkpoint(wall_time(), "steps" if by_steps else "time")
            if self.validation_steps and self.step % self.validation_steps == 0 and self.step < self.max_steps:
                self.validate(os.path.join(self.output_dir, "samples", f"step_{self.step:07d}.png"))
            if self.save_model_steps and self.step % self.save_model_steps == 0 and self.step < self.max_steps:
                if acc.is_main_process:
                    self.save_folder()
                acc.wait_for_everyone()
        progress.close()
        self.check_finite(first_bad)
        return self.finish(wall_time, metrics)

    def finish(self, wall_time: Callable[[], float], metrics: MetricsLogger) -> TrainingResult:
        """Final grid, ``save_pretrained`` folder, model card, summary, and last the Hub upload (main process; a
        failed upload keeps every file and exits with the command that retries it).

        The final state stays in a checkpoint until the folder and the card are complete: when no checkpoint holds
        it, one is written for the time of the final save (outside ``checkpoints_total_limit``) and deleted after it,
        so a kill or a full disk during the save loses nothing (``--resume_from_checkpoint latest`` redoes it)."""
        config, acc = self.config, self.accelerator
        kept = next((p for s, p in list_checkpoints(self.output_dir)
                     if s == self.step and saved_state(p).get("run_id") == self.run_id), None)
        if kept is None:
            kept = self.save_checkpoint(wall_time(), "final")
        elapsed = wall_time()
        result = TrainingResult(self.output_dir, self.step, self.nimg, elapsed, metrics_path=metrics.jsonl_path,
                                ema=self.ema.averages, eval_seconds=self.evaluation.total_seconds())
        result.samples_path = self.validate(os.path.join(self.output_dir, "samples.png"))
        if acc.is_main_process:
            try:
                result.saved_class = self.save_folder()
                if self.model_card is not None:
                    result.model_card_path = self.write_card(result)
            except Exception as err:
                raise final_save_error(err, self.output_dir, kept) from err
            if saved_state(kept).get("reason") == "final":
                shutil.rmtree(kept)
            if config.push_to_hub:
                result.pushed_to = config.hub_model_id
            print_summary(result)
            self.run_folder.claim(os.path.join(self.output_dir, FINISHED_FILE))
            write_finished(self.output_dir, {"run_id": self.run_id, "fingerprint": self.fingerprint,
                                             **record_of_result(result)})
        acc.wait_for_everyone()
        acc.end_training()
        if config.push_to_hub and acc.is_main_process:  # last: other processes are not left waiting if it fails
            push_or_explain(self.output_dir, config.hub_model_id, config.hub_token, private=config.hub_private_repo,
                            commit_message=f"Training finished at step {self.step}",
                            ignore_patterns=(*DEFAULT_IGNORE, *self.hub_ignore_patterns))
        return result

    def report_finished(self, record: Dict) -> TrainingResult:
        """The result of the finished run ``record`` describes, printed with where everything is; nothing is
        written."""
        result = result_of_record(self.output_dir, record)
        if self.accelerator.is_main_process:
            print(f"The run in {os.path.abspath(self.output_dir)} already finished at step {result.step} with these "
                  "settings: nothing to do, nothing changed. To train it further, raise --max_train_steps (or "
                  "--num_epochs); to start over, pass --overwrite_output_dir.")
            print_summary(result)
        return result

    def save_folder(self) -> str:
        """``save_pretrained`` of the pipeline around the EMA weights (or of the EMA model alone) into ``output_dir``,
        atomically (see :func:`~diffusers_stf.training.run_folder.install_folder`); returns the saved class's
        name."""
        return install_folder(self.run_folder, self.write_folder)

    def write_folder(self, folder: str) -> str:
        if self.make_pipeline is not None:
            pipeline = self.make_pipeline(self.ema.model)
            pipeline.save_pretrained(folder)
            return type(pipeline).__name__
        model = self.ema.model
        save_weights(model, folder)
        if type(model).__module__.split(".")[0] == "diffusers_stf" and hasattr(model, "config"):
            # a model of this package saved alone: AutoModel.from_pretrained(..., trust_remote_code=True) loads it
            write_model_remote_code(model, folder)
        return type(model).__name__

    def write_card(self, result: TrainingResult) -> str:
        config, acc = self.config, self.accelerator
        repo = config.hub_model_id if config.push_to_hub else local_name(self.output_dir)
        model = self.ema.model
        parameters = model.num_parameters() if hasattr(model, "num_parameters") else \
            sum(p.numel() for p in model.parameters())
        facts = {"optimizer steps": self.step, "training images seen": self.nimg,
                 "wall time (s)": round(result.wall_time, 1), "processes": acc.num_processes,
                 "device": acc.device.type, "parameters": parameters}
        if "loss" in self.last_row:
            facts[f"training loss (last {config.logging_steps} steps)"] = round(self.last_row["loss"], 4)
        facts.update(self.evaluation.card_facts())
        table = {k: v for k, v in dataclasses.asdict(config).items()  # the device actually used is a fact above
                 if k not in ("hub_token", "default_num_epochs", "notes", "cpu")}
        table.update(self.fingerprint["script"])
        table = dict(sorted(table.items()))
        datasets = hub_dataset_ids(self.data.name if self.data.name not in (DIGITS_NAME, "imagefolder") else None)
        grid = os.path.relpath(result.samples_path, self.output_dir) if result.samples_path else None
        self.run_folder.claim(os.path.join(self.output_dir, "README.md"))
        return write_model_card(self.output_dir, self.model_card, repo, datasets, table, grid, facts,
                                weights="EMA" if result.ema else "trained")

