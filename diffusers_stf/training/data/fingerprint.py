"""A fingerprint of the files of a local image folder, so that a resume notices images that were replaced, added or
removed, even when their number stays the same."""

from __future__ import annotations

import hashlib
import os

from ...files import file_sha256

DATASET_FINGERPRINTS = ("stat", "bytes")


def folder_fingerprint(folder: str, mode: str = "stat") -> str:
    """``"<mode>:<SHA-256>"`` over the files under ``folder`` in path order, hidden ones aside (``datasets`` skips
    names starting with ``.`` or ``__``): each file's relative path with its size and modification time (``stat``:
    reads no file), or with the SHA-256 of its bytes (``bytes``: reads every file, and sees a replacement that keeps
    the size and the modification time)."""
    if mode not in DATASET_FINGERPRINTS:
        raise ValueError(f"--dataset_fingerprint must be one of {DATASET_FINGERPRINTS}, got {mode!r}")
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(f for f in files if not f.startswith((".", "__"))):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if mode == "stat":
                stat = os.stat(path)
                entry = f"{rel}\t{stat.st_size}\t{stat.st_mtime_ns}"
            else:
                entry = f"{rel}\t{file_sha256(path)}"
            digest.update(entry.encode() + b"\n")
    return f"{mode}:{digest.hexdigest()}"
