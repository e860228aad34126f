"""The router's task group as its owners see it: a task's unexpected error ends that task only.

Loads, stops, crash and idle watchers, remote polls, pulls and the HTTP server all
run in the router's one task group. In a bare anyio task group, one task's
exception cancels every other task and ends the group, so a bug in one model's
load (or a ``NaN`` that reached a deadline) would stop the router and the server
with it (issue 21). Each task started through :class:`Tasks` is contained: an
``Exception`` it raises is logged with its traceback and ends that task alone;
cancellation still passes through.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

__all__ = ("Tasks",)

log = logging.getLogger("lemon_magic.router")


class Tasks:
    """A task group whose tasks cannot end it (see the module docstring)."""

    def __init__(self, group: anyio.abc.TaskGroup) -> None:
        self.group = group

    @property
    def cancel_scope(self) -> anyio.CancelScope:
        return self.group.cancel_scope

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: object = None) -> None:
        self.group.start_soon(_contained, fn, args, name=name or _name(fn))


def _name(fn: Callable[..., Awaitable[Any]]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


async def _contained(fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
    try:
        await fn(*args)
    except Exception:
        model = next((a.name for a in args if isinstance(getattr(a, "name", None), str)), "router")
        log.exception("[%s] task %s failed unexpectedly (it alone ends; the router goes on)",
                      model, _name(fn))
