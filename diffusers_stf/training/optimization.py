"""What a run optimises with, from its :class:`~diffusers_stf.training.config.TrainingConfig`: the optimizer, the
learning-rate schedule and the moving average of the weights."""

from __future__ import annotations

from typing import Dict, Iterable, Union

import torch

from .config import TrainingConfig
from .ema import HalfLifeEMA, MovingAverage, WarmupEMA
from .lr_schedules import get_inverse_sqrt_schedule


def make_optimizer(config: TrainingConfig, parameters: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with the ``adam_*`` settings and ``learning_rate`` of ``config``."""
    return torch.optim.AdamW(parameters, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                             weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)


def optimizer_settings(optimizer: torch.optim.Optimizer) -> Dict:
    """The optimizer's class and defaults (learning rate, betas, …), for the run's fingerprint."""
    return {"class": type(optimizer).__name__, **{k: v for k, v in optimizer.defaults.items() if k != "params"}}


def warmup_steps(config: TrainingConfig, global_batch: int) -> Union[int, float]:
    """The learning-rate warm-up in optimizer steps: ``lr_warmup_steps``, else ``lr_rampup_kimg`` thousand images of
    ``global_batch`` each, rounded (``inverse_sqrt``: not rounded, EDM2 ramps up over images)."""
    if config.lr_warmup_steps is not None:
        return config.lr_warmup_steps
    steps = config.lr_rampup_kimg * 1000 / global_batch
    return steps if config.lr_scheduler == "inverse_sqrt" else round(steps)


def make_lr_scheduler(config: TrainingConfig, optimizer: torch.optim.Optimizer, global_batch: int, max_steps: int):
    """The schedule ``config.lr_scheduler`` with the warm-up of :func:`warmup_steps`, stepped once per optimizer
    step: EDM2's :func:`~diffusers_stf.training.lr_schedules.get_inverse_sqrt_schedule` with t_ref =
    ``lr_ref_steps`` for ``inverse_sqrt``, else diffusers' ``get_scheduler``."""
    warmup = warmup_steps(config, global_batch)
    if config.lr_scheduler == "inverse_sqrt":
        return get_inverse_sqrt_schedule(optimizer, config.lr_ref_steps, warmup)
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)


def finish_gradients(accelerator, model: torch.nn.Module, trained_modules, max_grad_norm: float):
    """The gradients of an optimizer step, after its last backward pass: the ``trained_modules``' (see
    :class:`~diffusers_stf.training.trained_modules.TrainedModules`) averaged over the processes, NaN → 0 and ±inf →
    ±1e5 as EDM does, then clipped to ``max_grad_norm`` together (0: no clipping)."""
    trained_modules.average_gradients(accelerator)
    parameters = [*model.parameters(), *trained_modules.parameters()]
    for p in parameters:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
    if max_grad_norm:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)


def make_ema(config: TrainingConfig, model: torch.nn.Module) -> MovingAverage:
    """diffusers' warm-up EMA with ``use_ema``, else EDM's half-life EMA (see :mod:`~diffusers_stf.training.ema`)."""
    if config.use_ema:
        return WarmupEMA(model, config.ema_inv_gamma, config.ema_power, config.ema_max_decay)
    return HalfLifeEMA(model, config.ema_halflife_kimg, config.ema_rampup_ratio)
