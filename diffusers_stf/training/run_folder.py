"""The run folder: one training at a time, and a run only ever deletes or rewrites what it created itself.

- **The record.** ``output_dir/run.json`` holds the run id and ``created``: the files and folders the run created,
  relative to ``output_dir`` (absolute for its logging folder outside it). An entry is recorded before it is created,
  so a kill never leaves an unrecorded one, and everything inside a recorded folder is the run's. Checkpoints carry
  the run id in their ``trainer_state.json``. A path the run would rewrite but did not create is refused, naming it;
  ``--overwrite_output_dir`` deletes the earlier run's recorded entries and checkpoints and nothing else, and refuses
  when the folder holds checkpoints or logs it cannot attribute to that run.
- **The logging folder** is the run's own: ``output_dir/<logging_dir>``, created by the run, or, for a
  ``--logging_dir`` outside ``output_dir`` (a shared TensorBoard folder), the subfolder
  ``<output_dir name>-<run id>`` that the run creates there; nothing else in the shared folder is read or written.
- **The lock** (:mod:`~diffusers_stf.training.run_lock`) keeps a second run or a resume out while one trains.
- **The final folder** is written into ``final.partial`` and moved into ``output_dir`` entry by entry, with the entry
  that makes it loadable (``model_index.json``, or a lone model's ``config.json``) taken away first and moved in last:
  the folder never looks complete while it is not.
- A folder that cannot be written (read-only file system, no permission) is refused at the start, naming the flag.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
import uuid
import weakref
from typing import Callable, Dict, List, Optional, Tuple

from .checkpoints import (
    disk_limit, disk_limit_error, folder_size, fsync_dir, fsync_tree, kill_point, list_checkpoints, saved_state,
)
from .run_lock import RunLock, probe_writable

RUN_FILE = "run.json"
FINAL_PARTIAL, FINAL_OLD = "final.partial", "final.old"
# the entry whose arrival makes a saved folder loadable: moved in last
FINAL_MARKERS = ("model_index.json", "config.json")
# what the final save writes whatever the pipeline: checked at the start, so that a refusal comes before training
FINAL_FILES = ("model_index.json", "README.md", "samples.png")
# reserved names of writes in progress, removed by the next write of the same kind
IN_PROGRESS = ("checkpoint-*.partial", "checkpoint-*.old", FINAL_PARTIAL, FINAL_OLD, RUN_FILE + ".tmp")


# ---------------------------------------------------------------------------------------------------------------------
# The record


def read_run(output_dir: str) -> Optional[Dict]:
    path = os.path.join(output_dir, RUN_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_run(output_dir: str, run: Dict):
    tmp = os.path.join(output_dir, RUN_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(run, f, indent=2)
    os.replace(tmp, os.path.join(output_dir, RUN_FILE))


def new_run() -> Dict:
    return {"run_id": uuid.uuid4().hex, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "created": []}


def legacy_entries(output_dir: str, logging_dir: str) -> List[str]:
    """What a run recorded in a ``run.json`` without ``created`` wrote by the layout of that time: its logs, grids,
    model card and final folder."""
    names = [logging_dir, "samples", "samples.png", "README.md", "model_index.json", "config.json"]
    configs = ""  # the saved folder's configs name its components and its remote-code files
    for name in ("model_index.json", "config.json"):
        try:
            with open(os.path.join(output_dir, name)) as f:
                configs += f.read()
            if name == "model_index.json":
                names += [k for k in json.loads(configs) if not k.startswith("_")]
        except (OSError, ValueError):
            pass
    top = os.listdir(output_dir)
    names += [n for n in top if n.endswith(".safetensors") or (n.endswith(".py") and n[:-3] in configs)]
    inside = [os.path.normpath(n) for n in names if not os.path.isabs(n) and not n.startswith("..")]
    return sorted({n for n in inside if n != "." and os.path.lexists(os.path.join(output_dir, n))})


def run_markers(output_dir: str, logging_dir: str = "logs") -> List[str]:
    """What in ``output_dir`` shows that a training run used it (checkpoints, the run file, metrics)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in sorted(os.listdir(output_dir)):
        if name == RUN_FILE or (name.startswith("checkpoint-") and os.path.isdir(os.path.join(output_dir, name))):
            found.append(name)
    metrics = os.path.normpath(os.path.join(logging_dir, "metrics.jsonl"))
    inside = not os.path.isabs(metrics) and not metrics.startswith("..")  # a folder outside is not this run's
    if inside and os.path.isfile(os.path.join(output_dir, metrics)):
        found.append(metrics)
    return found


class RunFolder:
    """The output folder of one run: its record (run id, created entries), its logging folder and its lock.

    Args:
        output_dir: the run's folder.
        run: the contents of ``run.json``.
        log_dir: the run's own logging folder.
        main: whether this is the main process (the only one that writes the record).
        from_disk: whether ``run`` was read from an earlier segment of the run.
        lock: the held :class:`RunLock` (main process).
    """

    def __init__(self, output_dir: str, run: Dict, log_dir: str, main: bool = True, from_disk: bool = False,
                 lock: Optional[RunLock] = None):
        self.output_dir = os.path.abspath(output_dir)
        self.run, self.log_dir, self.main, self.from_disk, self.lock = run, log_dir, main, from_disk, lock
        self.released = False

    @property
    def run_id(self) -> str:
        return self.run["run_id"]

    def key(self, path: str) -> str:
        """``path`` as the record writes it: relative to ``output_dir`` inside it, absolute outside."""
        path = os.path.abspath(path)
        rel = os.path.relpath(path, self.output_dir)
        return path if rel == ".." or rel.startswith(".." + os.sep) else rel

    def owns(self, path: str) -> bool:
        """Whether the run created ``path`` (or a folder holding it)."""
        key = self.key(path)
        return any(key == entry or key.startswith(entry.rstrip(os.sep) + os.sep) for entry in self.run["created"])

    def record(self, *paths: str):
        """Add ``paths`` to the record and write ``run.json`` (main process; before the paths are created)."""
        new = [key for key in map(self.key, paths) if key not in self.run["created"]]
        if new and self.main:
            self.run["created"] = sorted(self.run["created"] + new)
            write_run(self.output_dir, self.run)

    def claim(self, path: str, flag: Optional[str] = None) -> str:
        """Let the run write ``path``: refuse it (a ``ValueError`` naming ``flag`` when given) when it exists and the
        run did not create it; otherwise record the outermost part of it the run is about to create. Returns
        ``path``."""
        path = os.path.abspath(path)
        if self.owns(path):
            return path
        if os.path.lexists(path):
            raise ValueError(self.not_created(path, flag))
        top, parent = path, os.path.dirname(path)
        while parent.startswith(self.output_dir + os.sep) and not os.path.lexists(parent):
            top, parent = parent, os.path.dirname(parent)
        self.record(top)
        return path

    def not_created(self, path: str, flag: Optional[str] = None) -> str:
        named = f"{flag} {path!r}" if flag else repr(path)
        return (f"{named} exists and was not created by this training run, which only rewrites or deletes what it "
                f"created itself (recorded in {os.path.join(self.output_dir, RUN_FILE)}). Move it away, or choose "
                "another --output_dir" + (f" or {flag}." if flag and flag != "--output_dir" else "."))

    def start(self):
        """Write the record and create the logging folder (main process), when training starts."""
        if self.main:
            self.claim(self.log_dir, "--logging_dir")
            write_run(self.output_dir, self.run)
            os.makedirs(self.log_dir, exist_ok=True)

    def release(self):
        """Release the lock (main process) when the training ends; every process marks the folder closed."""
        self.released = True
        if self.lock is not None:
            self.lock.release()


def run_log_dir(output_dir: str, logging_dir: str, run_id: str) -> Tuple[str, bool]:
    """The run's logging folder and whether it lies outside ``output_dir``: ``output_dir/logging_dir``, or, for a
    folder outside ``output_dir``, its subfolder ``<output_dir name>-<run id>``."""
    out = os.path.abspath(output_dir)
    path = os.path.normpath(os.path.join(out, logging_dir))
    if path == out:
        raise ValueError(f"--logging_dir {logging_dir!r} is --output_dir itself: give a subfolder of it (default "
                         "logs) or a folder outside it, where the run writes into a subfolder of its own")
    if path.startswith(out + os.sep):
        return path, False
    return os.path.join(path, f"{os.path.basename(out)}-{run_id[:8]}"), True


def remove_run(output_dir: str, run: Optional[Dict], logging_dir: str, say=print):
    """``--overwrite_output_dir``: delete what the run of ``run`` recorded as created and its checkpoints. Refuses,
    deleting nothing, when ``output_dir`` holds checkpoints or logs that cannot be attributed to that run."""
    run_id = (run or {}).get("run_id")
    entries = (run or {}).get("created")
    if entries is None:
        entries = legacy_entries(output_dir, logging_dir) if run else []
    recorded = RunFolder(output_dir, {"run_id": run_id or "", "created": entries}, "")
    ours, foreign = [], []
    for _, path in list_checkpoints(output_dir):
        owner = saved_state(path).get("run_id")
        (ours if run_id is not None and owner == run_id else foreign).append(path)
    for marker in run_markers(output_dir, logging_dir):
        path = os.path.join(output_dir, marker)
        if marker != RUN_FILE and not marker.startswith("checkpoint-") and not recorded.owns(path):
            foreign.append(path)
    if foreign:
        raise ValueError(
            f"--overwrite_output_dir deletes only what the earlier run in {output_dir!r} recorded as its own, and "
            "these are not: " + ", ".join(foreign) + ". Move or delete them yourself, or choose another --output_dir.")
    out = os.path.abspath(output_dir)
    for entry in entries:
        path = os.path.normpath(os.path.join(out, entry))
        if path == out or out.startswith(path.rstrip(os.sep) + os.sep) or path == os.sep:
            continue  # never the folder itself or one above it
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
    for path in ours:
        shutil.rmtree(path)
    remove_in_progress(output_dir)
    if os.path.isfile(os.path.join(output_dir, RUN_FILE)):
        os.remove(os.path.join(output_dir, RUN_FILE))
    say(f"--overwrite_output_dir: removed the earlier run's checkpoints, logs and files from {output_dir}")


def remove_in_progress(output_dir: str, patterns=IN_PROGRESS):
    """Remove the leftovers of interrupted writes (the reserved names of :data:`IN_PROGRESS`)."""
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else ():
        if any(fnmatch.fnmatch(name, pattern) for pattern in patterns):
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def open_on_main(config, say=print) -> RunFolder:
    """The main process's part of :func:`open_run_folder`."""
    output_dir = config.output_dir
    probe_writable(output_dir, "--output_dir")
    lock = RunLock.acquire(output_dir, say)
    try:
        resume = bool(config.resume_from_checkpoint)
        markers = run_markers(output_dir, config.logging_dir)
        run = read_run(output_dir)
        if markers and not resume:
            if not config.overwrite_output_dir:
                shown = ", ".join(markers[:4]) + (", ..." if len(markers) > 4 else "")
                raise ValueError(
                    f"--output_dir {output_dir!r} already holds a training run ({shown}). Pass --overwrite_output_dir "
                    "to replace it with a new run, --resume_from_checkpoint latest to continue it, or choose another "
                    "--output_dir.")
            remove_run(output_dir, run, config.logging_dir, say)
            run = None
        from_disk = run is not None and resume
        if not from_disk:
            run = new_run()
        elif "created" not in run:
            run["created"] = legacy_entries(output_dir, config.logging_dir)
        log_dir, outside = run_log_dir(output_dir, config.logging_dir, run["run_id"])
        folder = RunFolder(output_dir, run, log_dir, main=True, from_disk=from_disk, lock=lock)
        if outside:
            probe_writable(os.path.dirname(log_dir), "--logging_dir")
        if os.path.lexists(log_dir) and not folder.owns(log_dir):
            raise ValueError(folder.not_created(log_dir, "--logging_dir"))
        for name in FINAL_FILES:
            path = os.path.join(folder.output_dir, name)
            if os.path.lexists(path) and not folder.owns(path):
                raise ValueError(folder.not_created(path) + f" (the final save writes {name})")
        return folder
    except BaseException:
        lock.release()
        raise


_OPENED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def open_run_folder(accelerator, config) -> RunFolder:
    """Open ``config.output_dir`` for a run (every process; once per accelerator): check that it and the logging folder
    can be written, take the lock, refuse a folder used by another run unless ``overwrite_output_dir`` (then delete
    that run's own files), and decide the run id and its logging folder. Nothing is written until
    :meth:`RunFolder.start`. A refusal raises the same ``ValueError`` on every process."""
    opened = _OPENED.get(accelerator)
    if opened is not None and not opened.released and opened.output_dir == os.path.abspath(config.output_dir):
        return opened
    error, payload, folder = None, None, None
    if accelerator.is_main_process:
        try:
            folder = open_on_main(config, accelerator.print)
            payload = (folder.run, folder.log_dir, folder.from_disk)
        except Exception as err:  # every process must learn of the refusal, or the others wait forever
            error = err
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message, payload = broadcast_object_list([None if error is None else str(error), payload])
        if error is None and message is not None:
            error = ValueError(message)
    if error is not None:
        raise error
    if folder is None:
        run, log_dir, from_disk = payload
        folder = RunFolder(config.output_dir, run, log_dir, main=False, from_disk=from_disk)
    _OPENED[accelerator] = folder
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# The final folder


def install_folder(folder: RunFolder, write: Callable[[str], object]):
    """Write a folder's files with ``write(partial)`` into ``output_dir/final.partial``, fsync them, and move its
    entries into ``output_dir`` (main process): the loadable marker (:data:`FINAL_MARKERS`) is taken away first and
    moved in last, replaced entries wait in ``final.old`` until the end. An entry that exists and was not created by
    the run is refused before anything moves. Returns what ``write`` returns."""
    out = folder.output_dir
    partial, old = os.path.join(out, FINAL_PARTIAL), os.path.join(out, FINAL_OLD)
    folder.claim(partial)
    folder.claim(old)
    remove_in_progress(out, (FINAL_PARTIAL, FINAL_OLD))
    os.makedirs(partial)
    try:
        result = write(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    kill_point("final_files_written")
    entries = sorted(os.listdir(partial), key=lambda name: (name in FINAL_MARKERS, name))
    for name in entries:
        folder.claim(os.path.join(out, name))
    fsync_tree(partial)
    os.makedirs(old)
    for name in FINAL_MARKERS:  # from here until the last move the folder does not look complete
        if name in entries and os.path.lexists(os.path.join(out, name)):
            os.replace(os.path.join(out, name), os.path.join(old, name))
    for i, name in enumerate(entries):
        target = os.path.join(out, name)
        if os.path.lexists(target):
            os.replace(target, os.path.join(old, name))
        os.replace(os.path.join(partial, name), target)
        if i == 0:
            kill_point("final_entry_moved")
    fsync_dir(out)
    shutil.rmtree(old)
    os.rmdir(partial)
    return result


def final_save_error(err: Exception, output_dir: str, kept: Optional[str]) -> Exception:
    """The error of a failed final save: what stopped it, and where the final state waits (the checkpoint ``kept``)."""
    where = (f"The final state is kept in {kept}: " if kept else "The checkpoints are intact: ") + \
        "rerun with --resume_from_checkpoint latest to write the final folder."
    needed = folder_size(kept) if kept else 0
    limit = disk_limit(err, output_dir, needed)
    if limit is not None:
        return disk_limit_error(limit, "the final folder", output_dir, needed, "Free some space. " + where)
    if isinstance(err, ValueError):  # a refusal: an entry the run did not create is in the way
        return ValueError(f"{err} The final folder was not written. {where}")
    return RuntimeError(f"the final save failed ({type(err).__name__}: {err}). {where}")
