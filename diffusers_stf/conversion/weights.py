"""Loading converted weights by name, refusing any difference (the message names the first ones)."""

from __future__ import annotations

from typing import Dict, List

import torch


def state_dict_mismatches(model: torch.nn.Module, state: Dict[str, torch.Tensor]) -> List[str]:
    """What keeps ``state`` from loading into ``model`` exactly: missing and unexpected keys, shape mismatches."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [f"{k} {tuple(v.shape)} in the file, {tuple(ours[k].shape)} in the model"
              for k, v in state.items() if k in ours and v.shape != ours[k].shape]
    return [f"{label} ({len(keys)}): {', '.join(keys[:5])}{', …' if len(keys) > 5 else ''}"
            for label, keys in (("missing in the file", missing), ("unexpected in the file", unexpected),
                                ("shape mismatches", shapes)) if keys]


def load_exactly(model: torch.nn.Module, state: Dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """Load ``state`` into ``model``, its values cast to the model's dtypes; a ValueError starting with ``what`` and
    naming the first mismatches if the names or shapes differ at all."""
    problems = state_dict_mismatches(model, state)
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
    ours = model.state_dict()
    model.load_state_dict({k: v.to(ours[k].dtype) for k, v in state.items()}, strict=True)
    return model
