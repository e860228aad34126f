"""Records of the backends we spawned, so that a later router can reap orphans.

One JSON file per backend in ``<cache_dir>/run/backends/``, naming the
backend's pid and start time and its owner's. A record whose owner is gone
(or whose owner is a different process under a reused pid) is stale: its
backend, if still alive under the same start time, is killed with its group.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path

import psutil

from lemon_magic._paths import state_dir

__all__ = ("reap_orphans", "record", "remove")

log = logging.getLogger("lemon_magic.backends")


def _dir() -> Path:
    return state_dir() / "backends"


def _create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def record(pid: int, argv: Sequence[str]) -> Path | None:
    """Write the record of a backend we just spawned; returns its path (``None`` if unwritable)."""
    owner = os.getpid()
    data = {"pid": pid, "create_time": _create_time(pid), "owner": owner,
            "owner_create_time": _create_time(owner), "argv": list(argv)}
    path = _dir() / f"{pid}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    except OSError as exc:  # a read-only cache must not stop a load
        log.warning("cannot write pid record %s: %s", path, exc)
        return None
    return path


def remove(path: Path | None) -> None:
    """Drop a record (idempotent)."""
    if path is not None:
        path.unlink(missing_ok=True)


def _alive_as(pid: int, create_time: float | None) -> bool:
    return create_time is not None and _create_time(pid) == create_time


def reap_orphans() -> list[int]:
    """Kill backends whose owner process is gone; return their pids. Live owners are left alone."""
    reaped = []
    for path in sorted(_dir().glob("*.json")):
        try:
            data = json.loads(path.read_text())
            pid, owner = int(data["pid"]), int(data["owner"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if _alive_as(owner, data.get("owner_create_time")):
            continue  # a live router (maybe another kernel's) owns it
        if _alive_as(pid, data.get("create_time")):
            try:
                os.killpg(pid, signal.SIGKILL)
                reaped.append(pid)
                log.warning("reaped orphan backend pid %d (owner %d is gone)", pid, owner)
            except (ProcessLookupError, PermissionError):
                pass
        path.unlink(missing_ok=True)
    return reaped
