"""The SHA-256 digest of a file on disk, read in 1 MiB blocks (checkpoint manifests, dataset fingerprints, the
sources named in a converted model's card)."""

from __future__ import annotations

import hashlib


def file_sha256(path: str) -> str:
    """The hex SHA-256 of the bytes of ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
