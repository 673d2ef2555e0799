"""Resumable checkpoints: ``output_dir/checkpoint-<step>/`` written with ``accelerator.save_state``.

Layout of a checkpoint folder::

    model/               the trained network (save_pretrained: config.json + safetensors)
    ema/                 its EMA copy (same format)
    optimizer.bin        accelerate (loaded with weights_only=True)
    random_states_<i>.pkl
    trainer_state.json   step, images seen, lr-scheduler state, the run's config fingerprint

A checkpoint is written into ``checkpoint-<step>.partial`` and renamed when complete, so an interrupted save never
looks like a checkpoint. Resuming compares the fingerprint (model class and config, and the script's own
resume-critical options) and refuses a checkpoint of another configuration.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, List, Optional, Tuple

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"  # for plain nn.Modules; ModelMixins use their own save_pretrained names


def jsonable(value):
    """``value`` as plain JSON types (tuples become lists), so fingerprints compare equal after a round trip."""
    return json.loads(json.dumps(value, default=str))


def model_fingerprint(model) -> Dict:
    """Class name and public config of a (diffusers) model."""
    config = getattr(model, "config", None)
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")} if config is not None else {}
    return jsonable({"model_class": type(model).__name__, "model_config": config})


def fingerprint_differences(saved: Dict, current: Dict, prefix: str = "") -> List[str]:
    """Human-readable differences between two fingerprints."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return out


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as (step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_checkpoint(output_dir: str, resume_from: Optional[str]) -> Optional[str]:
    """The folder to resume from: ``latest`` (None when there is none yet) or an explicit checkpoint folder."""
    if not resume_from:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = resume_from if os.path.isdir(resume_from) else os.path.join(output_dir, resume_from)
    if not os.path.isdir(path):
        raise ValueError(f"--resume_from_checkpoint {resume_from!r}: no such checkpoint folder")
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ValueError(f"--resume_from_checkpoint {resume_from!r} is not a complete checkpoint (no {STATE_FILE})")
    return path


def prune_checkpoints(output_dir: str, total_limit: Optional[int], incoming: int = 1) -> List[str]:
    """Delete the oldest checkpoints (and stale ``.partial`` folders) so that ``incoming`` new ones fit in the limit."""
    removed = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith("checkpoint-") and name.endswith(".partial"):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    if not total_limit:
        return removed
    found = list_checkpoints(output_dir)
    excess = len(found) + incoming - total_limit
    for _, path in found[:max(excess, 0)]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def save_weights(model, folder: str):
    """``save_pretrained`` (safetensors) for diffusers models, a bare safetensors file for other modules."""
    os.makedirs(folder, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder, safe_serialization=True)
    else:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                  os.path.join(folder, WEIGHTS_FILE))


def load_weights(model, folder: str):
    """Load weights written by :func:`save_weights` into ``model`` (strict)."""
    from safetensors.torch import load_file

    candidates = [f for f in os.listdir(folder) if f.endswith(".safetensors")] if os.path.isdir(folder) else []
    if not candidates:
        raise ValueError(f"no safetensors weights in checkpoint folder {folder!r}")
    state = {}
    for name in sorted(candidates):
        state.update(load_file(os.path.join(folder, name)))
    device = next(iter(model.state_dict().values())).device if len(model.state_dict()) else "cpu"
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)


def read_state(path: str) -> Dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def check_fingerprint(path: str, current: Dict):
    """Raise ``ValueError`` when the checkpoint at ``path`` was written by a run of another configuration."""
    saved = read_state(path).get("fingerprint", {})
    diffs = fingerprint_differences(saved, jsonable(current))
    if diffs:
        raise ValueError(
            f"checkpoint {path!r} was written by a run with another configuration and cannot be resumed here:\n  "
            + "\n  ".join(diffs)
            + "\nUse a fresh --output_dir, or the options of that run."
        )


def save_checkpoint(accelerator, output_dir: str, step: int, ema, state: Dict,
                    total_limit: Optional[int] = None) -> str:
    """Write ``checkpoint-<step>`` (call on every process). Returns its path."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = final + ".partial"
    if accelerator.is_main_process:
        prune_checkpoints(output_dir, total_limit, incoming=1)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.makedirs(partial, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    if accelerator.is_main_process:
        if ema is not None:
            save_weights(ema.model, os.path.join(partial, "ema"))
        with open(os.path.join(partial, STATE_FILE), "w") as f:
            json.dump(jsonable(state), f, indent=2, sort_keys=True)
        os.replace(partial, final)
    accelerator.wait_for_everyone()
    return final


def register_model_hooks(accelerator, subfolder: str = "model"):
    """Make ``accelerator.save_state``/``load_state`` store prepared models as ``<subfolder>/`` (safetensors via
    ``save_pretrained``) instead of accelerate's own file, so a checkpoint's model loads with ``from_pretrained``."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                name = subfolder if i == 0 else f"{subfolder}_{i}"
                save_weights(accelerator.unwrap_model(model), os.path.join(output_dir, name))
        weights.clear()

    def load_hook(models, input_dir):
        for i in range(len(models)):
            model = models.pop(0)
            name = subfolder if i == 0 else f"{subfolder}_{i}"
            load_weights(accelerator.unwrap_model(model), os.path.join(input_dir, name))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_checkpoint(accelerator, path: str, ema, fingerprint: Dict) -> Dict:
    """Check the fingerprint, then restore model, optimizer and RNG states (accelerate) and the EMA; returns the
    trainer state (step, images seen, lr-scheduler state...)."""
    check_fingerprint(path, fingerprint)
    accelerator.load_state(path)
    if ema is not None:
        load_weights(ema.model, os.path.join(path, "ema"))
    return read_state(path)
