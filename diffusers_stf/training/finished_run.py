"""The record of a finished run, ``output_dir/training_finished.json``, so that rerunning a finished run (``make
demo`` again, or any ``--resume_from_checkpoint latest`` of the same settings) changes nothing and says where the
results are.

The record is written last, after the final folder and its model card, and names the run (``run_id`` of
``run.json``), its step and its settings' fingerprint. A rerun is a no-op only when all three match: another run in
the folder, a longer ``--max_train_steps``, or other settings go through the normal resume.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

from .checkpoints import jsonable
from .run_folder import RUN_FILE

FINISHED_FILE = "training_finished.json"
# fingerprint parts that do not change the trained weights (e.g. the thread count of the process)
NOT_COMPARED = ("environment",)


def _read_json(path: str) -> Optional[Dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _comparable(fingerprint: Dict) -> Dict:
    return {k: v for k, v in fingerprint.items() if k not in NOT_COMPARED}


def write_finished(output_dir: str, record: Dict) -> str:
    """Write the record of the run that just finished (main process), atomically; returns its path.

    Args:
        output_dir: the run's folder.
        record: ``run_id``, ``step``, ``fingerprint`` and what the summary prints (``nimg``, ``wall_time``, the paths
            of the samples, model card and metrics relative to ``output_dir``, ``saved_class``, ``ema``).
    """
    path = os.path.join(output_dir, FINISHED_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(jsonable(record), f, indent=2)
    os.replace(tmp, path)
    return path


def finished_record(output_dir: str, resume_from_checkpoint: Optional[str], fingerprint: Dict,
                    max_steps: int) -> Optional[Dict]:
    """The record of the run in ``output_dir`` when a ``--resume_from_checkpoint latest`` with ``fingerprint`` and
    ``max_steps`` would only repeat it: the same run (``run.json``'s id), finished at exactly ``max_steps`` with the
    same settings. None otherwise."""
    if resume_from_checkpoint != "latest":
        return None
    record = _read_json(os.path.join(output_dir, FINISHED_FILE))
    run = _read_json(os.path.join(output_dir, RUN_FILE))
    if not record or not run or record.get("run_id") != run.get("run_id"):
        return None
    if record.get("step") != max_steps:
        return None
    if _comparable(record.get("fingerprint", {})) != _comparable(jsonable(fingerprint)):
        return None
    return record
