"""The run folder and its resumable checkpoints ``output_dir/checkpoint-<step>/``.

Layout of a checkpoint folder::

    model/               the trained network (save_pretrained: config.json + safetensors)
    ema/                 its EMA copy (same format)
    optimizer.bin        accelerate's optimizer state
    random_states_<i>.pkl  the RNG states of process i
    *.safetensors        the run's other parts, when it has them: power-function EMAs, modules of the loss
    trainer_state.json   step, images seen, wall time, lr-scheduler state, the run's id and fingerprint, and the size
                         and SHA-256 of every other file (written last)

Robustness:

- A checkpoint is written into ``checkpoint-<step>.partial``, every file and folder is fsynced, and the folder is
  renamed when complete, so an interrupted save never looks like a checkpoint. Old checkpoints are pruned only after
  the new one is in place.
- ``latest`` takes the newest *intact* checkpoint of this run: a checkpoint whose files do not match their recorded
  size and hash, or whose pickles do not load, is skipped with a warning naming the bad file. An explicit damaged
  checkpoint is refused, so a resume is exact or does not happen.
- ``optimizer.bin`` and ``random_states_<i>.pkl`` are only ever unpickled with ``torch.load(weights_only=True)`` (which
  accepts tensors, numbers and the NumPy arrays of RNG states, never arbitrary objects): this module checks them that
  way before accelerate loads them, and restores the RNG states itself, so a state accelerate could not read cannot
  be skipped silently.
- A save that fails because the disk is full, the disk quota is exceeded or a file reaches the file-size limit
  (ENOSPC, EDQUOT, EFBIG) says so, and where.

Why not accelerate's ``ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=...)``: its ``save_state``
deletes the oldest checkpoints *before* writing the new one (a kill mid-write with ``total_limit=1`` leaves none),
writes in place without an atomic rename, and numbers checkpoints by save count rather than by optimizer step.

A new run refuses an ``output_dir`` that holds another run unless ``--overwrite_output_dir`` (see
:mod:`~diffusers_stf.training.run_folder`), so ``latest`` only ever finds checkpoints of the run being resumed; pruning
and replacing touch only checkpoints of the run that writes.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from typing import Dict, List, Optional, Tuple

from ..files import file_sha256

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"  # for plain nn.Modules; ModelMixins use their own save_pretrained names
KILL_ENV = "DIFFUSERS_STF_TEST_KILL_AT"  # test hook: SIGKILL this process at a named point, e.g. "checkpoint_renamed@6"
FAULT_ENV = "DIFFUSERS_STF_TEST_FAULT"  # test hook: "disk_full" makes checkpoint writes fail with ENOSPC
# a checkpoint's reason: "steps" (--checkpointing_steps) checkpoints count against --checkpoints_total_limit; "time"
# (--checkpointing_minutes) and "final" (the final state, kept while the final folder is written) ones stand in for the
# newest state only, and go when a newer checkpoint is written
REASONS = ("steps", "time", "final")


def kill_point(point: str, step: Optional[int] = None):
    """Kill the process (SIGKILL, as a crash would) when ``DIFFUSERS_STF_TEST_KILL_AT`` names ``point`` (or
    ``point@step``). Only tests set it."""
    target = os.environ.get(KILL_ENV)
    if target and target in (point, f"{point}@{step}"):
        os.kill(os.getpid(), signal.SIGKILL)


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


# ---------------------------------------------------------------------------------------------------------------------
# Listing, checking and choosing checkpoints


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


def file_manifest(folder: str) -> Dict[str, List]:
    """``{relative path: [size, sha256]}`` of every file under ``folder`` except the state file."""
    manifest = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != STATE_FILE:
                manifest[rel] = [os.path.getsize(path), file_sha256(path)]
    return manifest


def load_pickle_weights_only(path: str):
    """``torch.load(path, weights_only=True)`` with accelerate's allow-list for NumPy RNG states."""
    import torch
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state(path: str) -> Dict:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def saved_state(path: str) -> Dict:
    """The trainer state of the checkpoint at ``path``; ``{}`` when it cannot be read."""
    try:
        state = read_state(path)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def checkpoint_problem(path: str) -> Optional[str]:
    """None when the checkpoint at ``path`` is intact; otherwise what is wrong, naming the bad file."""
    state_path = os.path.join(path, STATE_FILE)
    try:
        state = read_state(path)
    except (OSError, ValueError) as err:
        return f"{state_path} cannot be read ({err})"
    if not isinstance(state, dict) or "step" not in state:
        return f"{state_path} has no step"
    manifest = state.get("files")
    if manifest is None:  # written before checkpoints carried a manifest: check what can be checked
        manifest = {}
        for p in range(int(state.get("num_processes", 1))):
            manifest[f"random_states_{p}.pkl"] = None
    for rel, expected in sorted(manifest.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"{file} is missing"
        if expected is not None:
            size, digest = expected
            if os.path.getsize(file) != size:
                return f"{file} has {os.path.getsize(file)} bytes, {size} were written"
            if file_sha256(file) != digest:
                return f"{file} does not match its recorded SHA-256"
    for rel in sorted(manifest):
        if rel.endswith((".pkl", ".bin")):
            file = os.path.join(path, rel)
            try:
                load_pickle_weights_only(file)
            except Exception as err:  # torch raises several types for unreadable or unsafe pickles
                return f"{file} cannot be loaded with weights_only=True ({type(err).__name__}: {err})"
    return None


def resolve_checkpoint(output_dir: str, resume_from: Optional[str], run_id: Optional[str] = None,
                       warn=print) -> Optional[str]:
    """The checkpoint to resume from, or None for a fresh start.

    ``latest``: the newest intact checkpoint in ``output_dir`` written by run ``run_id`` (any run when None); damaged
    ones are skipped with a ``warn`` naming the bad file, and when every checkpoint is damaged a ``ValueError`` lists
    them. A folder: that checkpoint, which must be intact.
    """
    if not resume_from:
        return None
    if resume_from == "latest":
        problems = []
        for step, path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None and run_id is not None:
                saved_run = read_state(path).get("run_id")
                if saved_run not in (None, run_id):
                    warn(f"Skipping {path}: it belongs to another run (run id {saved_run}, this run {run_id}).")
                    continue
            if problem is None:
                return path
            warn(f"WARNING: checkpoint {path} is damaged and is skipped: {problem}")
            problems.append(problem)
        if problems:
            raise ValueError("--resume_from_checkpoint latest: every checkpoint in "
                             f"{output_dir!r} is damaged:\n  " + "\n  ".join(problems))
        return None
    path = resume_from if os.path.isdir(resume_from) else os.path.join(output_dir, resume_from)
    if not os.path.isdir(path):
        raise ValueError(f"--resume_from_checkpoint {resume_from!r}: no such checkpoint folder")
    if not os.path.isfile(os.path.join(path, STATE_FILE)):
        raise ValueError(f"--resume_from_checkpoint {resume_from!r} is not a complete checkpoint (no {STATE_FILE})")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise ValueError(f"--resume_from_checkpoint {resume_from!r} is damaged, so the resume would not be exact: "
                         f"{problem}")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Writing


def prune_checkpoints(output_dir: str, total_limit: Optional[int], keep: Optional[str] = None,
                      run_id: Optional[str] = None) -> List[str]:
    """Delete checkpoints of run ``run_id`` (any run when None), never ``keep``: checkpoints by wall time and of the
    final state older than the newest checkpoint, and the oldest checkpoints by step beyond ``total_limit``. Returns
    the deleted paths."""
    found = []
    for _, path in list_checkpoints(output_dir):
        state = saved_state(path)
        if state and (run_id is None or state.get("run_id") == run_id):
            found.append((path, state.get("reason", "steps")))
    if not found:
        return []
    newest = found[-1][0]
    doomed = [path for path, reason in found if reason != "steps" and path != newest]
    by_step = [path for path, reason in found if reason == "steps"]
    if total_limit:
        doomed += by_step[:max(len(by_step) - total_limit, 0)]
    removed = []
    for path in doomed:
        if keep is None or os.path.abspath(path) != os.path.abspath(keep):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_partial_checkpoints(output_dir: str):
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if name.startswith("checkpoint-") and name.endswith((".partial", ".old")):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)


def fsync_tree(folder: str):
    """fsync every file and folder under ``folder`` (and ``folder`` itself)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def fsync_dir(folder: str):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def folder_size(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


DISK_LIMITS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded (EDQUOT)",
               errno.EFBIG: "a file reached the file-size limit (EFBIG; see `ulimit -f`)"}


def disk_limit(err: BaseException, folder: str, needed: int) -> Optional[str]:
    """What stopped a write, when ``err`` (or its cause) is ENOSPC, EDQUOT or EFBIG, or the disk holding ``folder``
    has less than ``needed`` bytes free (torch's zip writer reports a full disk as ``unexpected pos ...``); None
    otherwise."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_LIMITS:
            return DISK_LIMITS[seen.errno]
        seen = seen.__cause__ or seen.__context__
    try:
        return DISK_LIMITS[errno.ENOSPC] if shutil.disk_usage(folder).free < max(needed, 1 << 20) else None
    except OSError:
        return None


def is_disk_full(err: BaseException, folder: str, needed: int) -> bool:
    """Whether :func:`disk_limit` names what stopped a write."""
    return disk_limit(err, folder, needed) is not None


def disk_limit_error(limit: str, what: str, folder: str, needed: int, advice: str) -> RuntimeError:
    """The message of a write stopped by a disk limit: what, where, the space left and needed, and what to do."""
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    return RuntimeError(f"{limit}: {what} could not be written to {os.path.abspath(folder)} ({free / 2**20:.1f} MiB "
                        f"free there; it takes about {needed / 2**20:.1f} MiB). {advice}")


def save_checkpoint(accelerator, output_dir: str, step: int, ema, state: Dict,
                    total_limit: Optional[int] = None, run_id: Optional[str] = None, parts=()) -> str:
    """Write ``checkpoint-<step>`` (call on every process), with each of ``parts`` (objects with ``save(folder)``
    and ``load(folder)``) saving its files into it on the main process. Returns its path.

    Written into ``checkpoint-<step>.partial``, fsynced, renamed; only then are checkpoints of run ``run_id`` pruned
    (see :func:`prune_checkpoints`; ``state["reason"]`` is the checkpoint's reason). A checkpoint of the same step
    is replaced only when it belongs to ``run_id``. A failure removes the partial folder and raises; a full disk, an
    exceeded quota or the file-size limit raises a ``RuntimeError`` that says so.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    partial = final + ".partial"
    if accelerator.is_main_process:
        owner = saved_state(final).get("run_id") if os.path.isdir(final) else None
        if run_id is not None and owner not in (None, run_id):
            raise ValueError(f"{final} belongs to another run (run id {owner}); this run ({run_id}) does not replace "
                             "it")
        remove_partial_checkpoints(output_dir)
        os.makedirs(partial)
    accelerator.wait_for_everyone()
    try:
        if os.environ.get(FAULT_ENV) == "disk_full":
            raise OSError(errno.ENOSPC, "No space left on device", partial)
        accelerator.save_state(partial)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if ema is not None:
                save_weights(ema.model, os.path.join(partial, "ema"))
            for part in parts:
                part.save(partial)
            kill_point("checkpoint_files_written", step)
            state = {**jsonable(state), "files": file_manifest(partial)}
            with open(os.path.join(partial, STATE_FILE), "w") as f:
                json.dump(state, f, indent=2, sort_keys=True)
            fsync_tree(partial)
            kill_point("checkpoint_before_rename", step)
            if os.path.isdir(final):  # a checkpoint of the same step from an earlier segment of this run
                os.replace(final, final + ".old")
            os.replace(partial, final)
            fsync_dir(output_dir)
            shutil.rmtree(final + ".old", ignore_errors=True)
            kill_point("checkpoint_renamed", step)
            prune_checkpoints(output_dir, total_limit, keep=final, run_id=run_id)
    except Exception as err:
        needed = max((folder_size(p) for _, p in list_checkpoints(output_dir)), default=0)
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        limit = disk_limit(err, output_dir, needed)
        if limit is not None:
            raise disk_limit_error(
                limit, f"checkpoint-{step}", output_dir, needed, "The earlier checkpoints are intact: free some space "
                "(or lower --checkpoints_total_limit) and resume with --resume_from_checkpoint latest.") from err
        raise
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


def restore_random_states(path: str, process_index: int):
    """Set Python's, NumPy's and torch's RNGs (CUDA's too when present) from ``random_states_<i>.pkl``, read with
    ``weights_only=True``; raises when the file cannot be read, so an inexact resume never passes silently."""
    import random

    import numpy as np
    import torch

    file = os.path.join(path, f"random_states_{process_index}.pkl")
    if not os.path.isfile(file):
        raise ValueError(f"{file} is missing: the resume would not be exact (its process count may differ; "
                         "pass --allow_changed_settings to resume anyway)")
    states = load_pickle_weights_only(file)
    random.setstate(states["random_state"])
    np.random.set_state(states["numpy_random_seed"])
    torch.set_rng_state(states["torch_manual_seed"])
    if torch.cuda.is_available() and "torch_cuda_manual_seed" in states:
        torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])


def load_checkpoint(accelerator, path: str, ema, exact: bool = True, parts=()) -> Dict:
    """Restore model, optimizer and RNG states (accelerate; the RNGs again here, see :func:`restore_random_states`),
    the EMA and ``parts`` from an intact checkpoint; returns the trainer state (step, images seen, lr-scheduler
    state...).
    With ``exact=False`` (another process count) a missing RNG state of this process is only reported."""
    accelerator.load_state(path)
    try:
        restore_random_states(path, accelerator.process_index)
    except ValueError as err:
        if exact:
            raise
        accelerator.print(f"WARNING: {err}")
    if ema is not None:
        load_weights(ema.model, os.path.join(path, "ema"))
    for part in parts:
        part.load(path)
    return read_state(path)
