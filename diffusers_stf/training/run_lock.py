"""``output_dir/run.lock``: one training at a time in an output folder.

The training's main process holds the file with ``flock`` and writes its PID and host into it, so that a second run or
a resume is refused naming them. The kernel drops the lock when its holder dies, however it dies, so the next run
takes a stale lock over, and says so; the file is removed when the training ends. (Systems without ``fcntl``, and
file systems without ``flock``, train without the lock, and say so.) Before it, :func:`probe_writable` refuses a
read-only or forbidden folder, naming its flag, before any work.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import time
import uuid
from typing import Dict, Optional

LOCK_FILE = "run.lock"
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def not_writable(flag: str, path: str, err: OSError) -> ValueError:
    """The message of a folder that cannot be written: read-only file system or no permission."""
    return ValueError(f"{flag} {path!r} cannot be written: {os.strerror(err.errno)} ({err.filename or path}). "
                      f"Choose a folder you can write to, or make this one writable.")


def probe_writable(folder: str, flag: str):
    """Create ``folder`` if needed and create and delete a file in it; a read-only or forbidden folder raises a
    ``ValueError`` naming ``flag``."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.remove(probe)
    except OSError as err:
        if err.errno in NOT_WRITABLE:
            raise not_writable(flag, folder, err) from err
        raise


_HELD: Dict[str, "RunLock"] = {}


class RunLock:
    """``output_dir/run.lock`` held with ``flock`` by this process (re-entrant within it)."""

    def __init__(self, path: str, fd: Optional[int]):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, output_dir: str, say=print) -> "RunLock":
        """Take the lock, or raise a ``ValueError`` naming the PID and host of the training that holds it. A lock left
        by a process that died is taken over, and ``say`` says so."""
        path = os.path.join(os.path.realpath(output_dir), LOCK_FILE)
        if path in _HELD:
            return _HELD[path]
        try:
            import fcntl
        except ImportError:  # Windows: no lock
            return cls(path, None)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                if err.errno in NOT_WRITABLE:
                    raise not_writable("--output_dir", output_dir, err) from err
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    os.remove(path)
                    say(f"WARNING: the file system of {output_dir} has no flock ({os.strerror(err.errno)}): nothing "
                        "keeps a second training out of this folder while this one trains.")
                    return cls(path, None)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                holder = read_holder(path, wait=1.0)
                who = f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}" if holder else "another process"
                raise ValueError(
                    f"--output_dir {output_dir!r} is in use: a training ({who}, started {holder.get('started', '?')}) "
                    f"holds {path}. A second run or a resume would write the same files; wait for that training to "
                    "end, or stop it (docs/training.md, 'Stopping a run').") from None
            try:  # the holder may have released (unlinked) the file between our open and our flock: retry
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        stale = read_holder(path)
        if stale:
            say(f"Taking over the stale lock of PID {stale.get('pid')} on host {stale.get('host')} ({path}): that "
                "training ended without releasing it.")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        lock = _HELD[path] = cls(path, fd)
        return lock

    @property
    def held(self) -> bool:
        return _HELD.get(self.path) is self

    def release(self):
        """Remove the lock file and drop the lock (idempotent)."""
        if not self.held:
            return
        del _HELD[self.path]
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)


@atexit.register
def _release_all():
    for lock in list(_HELD.values()):
        lock.release()


def read_holder(path: str, wait: float = 0.0) -> Dict:
    """The holder recorded in a lock file (``{}`` when empty or unreadable), waiting up to ``wait`` seconds for a
    holder that has just taken it to write its PID."""
    deadline = time.time() + wait
    while True:
        try:
            with open(path) as f:
                holder = json.load(f)
            if isinstance(holder, dict):
                return holder
        except (OSError, ValueError):
            pass
        if time.time() >= deadline:
            return {}
        time.sleep(0.05)
