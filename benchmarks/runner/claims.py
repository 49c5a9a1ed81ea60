"""Claims: which runner holds a job of a grid, so that runners sharing one results folder run each job once.

A claim is a file ``<result>.claim`` beside the job's result file, created with ``O_CREAT | O_EXCL`` (only
one process can create it) and holding the claimant's host and pid. It is removed when the job ends,
whether it finished or failed. A claim is stale, and is taken over, when its host is this one and its
process is gone (killed runner), or when it is unreadable and over a minute old (killed while writing
it). A claim from another host cannot be checked and is respected: remove it by hand if that host died.
Taking over a stale claim is itself guarded by an exclusive ``<result>.claim.takeover`` file, so two
runners that find the same stale claim do not both remove it and both claim the job.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

__all__ = ["claim", "claim_path", "release", "is_stale"]

#: an unreadable claim (or takeover guard) older than this many seconds is left over from a killed process
UNREADABLE_AFTER_S = 60.0


def claim_path(result: Path) -> Path:
    """The claim file of the job whose result goes to ``result``."""
    return result.with_name(result.name + ".claim")


def _owner(what: str) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(), "job": what})


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _old(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime > UNREADABLE_AFTER_S
    except OSError:
        return False


def is_stale(path: Path, text: str) -> bool:
    """Whether the claim ``path`` holding ``text`` was left by a process that is gone."""
    try:
        owner = json.loads(text)
        host, pid = owner["host"], int(owner["pid"])
    except (ValueError, KeyError, TypeError):
        return _old(path)
    if host != socket.gethostname() or pid == os.getpid():
        return False
    return not _alive(pid)


def _take_over(path: Path, seen: str) -> None:
    """Remove the stale claim ``path`` if it still holds ``seen``, one runner at a time."""
    guard = path.with_name(path.name + ".takeover")
    if _old(guard):  # left by a process killed between the two lines below: they take microseconds
        guard.unlink(missing_ok=True)
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return  # another runner is taking it over; the caller tries to claim again
    try:
        if _read(path) == seen:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)
        guard.unlink(missing_ok=True)


def claim(result: Path, what: str = "") -> str | None:
    """Claim the job whose result goes to ``result``: the claim's text (for :func:`release`), or ``None``
    when a live process holds it."""
    path = claim_path(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            seen = _read(path)
            if seen is not None and not is_stale(path, seen):
                return None
            if seen is not None:
                _take_over(path, seen)
            continue  # released or taken over meanwhile: try again
        text = _owner(what)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return text
    return None


def release(result: Path, text: str) -> None:
    """Remove the claim on ``result`` if it is still the one :func:`claim` returned as ``text``."""
    path = claim_path(result)
    if _read(path) == text:
        path.unlink(missing_ok=True)
