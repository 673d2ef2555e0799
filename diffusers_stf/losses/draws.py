"""Random draws of the losses, made on the generator's device (as diffusers' ``randn_tensor``) and then moved to the
device asked for, so a CPU generator gives the same numbers whatever the device of the images."""

from __future__ import annotations

from typing import Optional

import torch


def draw_device(generator: Optional[torch.Generator], device=None) -> torch.device:
    """Where a draw is made: the generator's device, else ``device`` (the CPU when None)."""
    return generator.device if generator is not None else torch.device(device if device is not None else "cpu")


def rand(shape, generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """U(0, 1) drawn on the generator's device, returned on ``device``."""
    return torch.rand(shape, generator=generator, device=draw_device(generator, device), dtype=dtype).to(device)


def randn(shape, generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """N(0, 1) drawn on the generator's device, returned on ``device``."""
    return torch.randn(shape, generator=generator, device=draw_device(generator, device), dtype=dtype).to(device)


def randint(high: int, shape, generator: Optional[torch.Generator] = None, device=None, low: int = 0) -> torch.Tensor:
    """Integers uniform in {low, …, high − 1}, drawn on the generator's device, returned on ``device``."""
    return torch.randint(low, high, shape, generator=generator, device=draw_device(generator, device)).to(device)
