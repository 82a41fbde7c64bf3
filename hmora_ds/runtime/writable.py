"""Is a directory writable? Asked before anything is loaded, so a read-only or misspelled
``output_dir`` fails in a second with one line instead of after model loading (or, worse, at the
first checkpoint).

Permission bits do not answer it (root ignores them; read-only mounts, ACLs and quotas do not
show in them), so the check creates and removes a probe file in the directory or, when it does
not exist yet, in its nearest existing parent (where it would be created).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists (possibly as a file)."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def check_writable_dir(path: str | Path, key: str = "output_dir") -> None:
    """Raise ``ValueError`` (one line naming ``key``, the directory and the problem) unless
    ``path`` is, or can be created as, a writable directory. Creates nothing but a probe file,
    removed at once."""
    target = Path(path).expanduser().absolute()
    existing = nearest_existing(target)
    if not existing.is_dir():
        if existing == target:
            raise ValueError(f"{key}: {target} exists and is not a directory")
        raise ValueError(f"{key}: {target} cannot be created: {existing} is not a directory")
    # Unique per process (every rank of every host may probe a shared directory at once).
    probe = existing / f".hmora-write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        if os.path.lexists(probe):  # left by a killed process with this pid
            os.unlink(probe)
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as err:
        where = "" if existing == target else f" (its nearest existing parent {existing})"
        reason = os.strerror(err.errno) if err.errno else str(err)
        raise ValueError(f"{key}: {target}{where} is not writable ({reason})") from None
    os.close(fd)
    os.unlink(probe)
