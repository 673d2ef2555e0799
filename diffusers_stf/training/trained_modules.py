"""Modules a run trains besides its network, e.g. the learned log-variance head u(σ) of EDM2's loss
(:class:`~diffusers_stf.losses.edm2.EDM2Loss`): their parameters are optimised with the network's, they live on the
run's device in training mode, their gradients are averaged over the processes (as DDP averages the network's), and
each checkpoint holds their weights as ``trained_modules.safetensors``, restored bit for bit on a resume.

The loss keeps calling its own module (no DDP wrapper), so the gradients are averaged here, once per optimizer step,
after the last micro-batch's backward pass.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, Mapping, Optional

import torch
from torch import nn

FILE = "trained_modules.safetensors"


class TrainedModules:
    """``{name: module}`` trained with the network (see the module docstring).

    Args:
        modules: the modules by name (a name is the prefix of its weights in the checkpoint file).
    """

    def __init__(self, modules: Optional[Mapping[str, nn.Module]] = None):
        self.modules: Dict[str, nn.Module] = dict(modules or {})
        for name, module in self.modules.items():
            if not isinstance(module, nn.Module):
                raise ValueError(f"trained_modules[{name!r}] must be an nn.Module, got {type(module).__name__}")

    def __bool__(self) -> bool:
        return bool(self.modules)

    def parameters(self) -> Iterator[nn.Parameter]:
        for module in self.modules.values():
            yield from module.parameters()

    def prepare(self, device) -> "TrainedModules":
        """Move to ``device`` in training mode (the parameters stay the optimizer's objects)."""
        for module in self.modules.values():
            module.to(device).train()
        return self

    @torch.no_grad()
    def average_gradients(self, accelerator):
        """Replace each gradient by its mean over the processes (nothing to do with one process)."""
        if accelerator.num_processes == 1:
            return
        for p in self.parameters():
            if p.grad is not None:
                p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {f"{name}.{key}": value for name, module in self.modules.items()
                for key, value in module.state_dict().items()}

    # -- a checkpoint part (see checkpoints.save_checkpoint) ---------------------------------------------------------
    def save(self, folder: str):
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  os.path.join(folder, FILE))

    def load(self, folder: str):
        from safetensors.torch import load_file

        path = os.path.join(folder, FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: the checkpoint holds no weights of {sorted(self.modules)} (written "
                             "by a run with another loss?)")
        state = load_file(path)
        for name, module in self.modules.items():
            prefix = f"{name}."
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            device = next(iter(module.state_dict().values())).device
            module.load_state_dict({k: v.to(device) for k, v in own.items()}, strict=True)
