"""Pure load policy: the decision table, slot eviction and memory admission.

Nothing here does I/O, logs or awaits; the router calls these under its lock
and applies what they return. Tests drive them directly.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from lemon_magic.errors import NotEnoughMemory, SlotsFull
from lemon_magic.options import ResolvedOptions

__all__ = ("REMOTE_TRANSITIONS", "TRANSITIONS", "Decision", "ModelState", "SlotView", "admit_memory",
           "choose_evictions", "decide", "restart_backoff")


class ModelState(str, enum.Enum):
    """Where a model is in its lifecycle."""

    UNLOADED = "unloaded"  #: no process; nothing in flight
    LOADING = "loading"  #: a load (or reload) is in flight
    READY = "ready"  #: a healthy process serves it
    STOPPING = "stopping"  #: its process is being stopped (unload or eviction)
    CRASHED = "crashed"  #: its process died after it was ready; restarted on next use
    FAILED = "failed"  #: the last load failed; retried on next use
    UNREACHABLE = "unreachable"  #: a remote model whose server stopped answering (polled until back)

    def __str__(self) -> str:
        return self.value


#: every allowed transition; the router's ``_set_state`` is the only writer and checks it
TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    ModelState.UNLOADED: frozenset({ModelState.LOADING}),
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.FAILED, ModelState.UNLOADED}),
    ModelState.READY: frozenset({ModelState.LOADING, ModelState.STOPPING, ModelState.CRASHED}),
    ModelState.STOPPING: frozenset({ModelState.UNLOADED}),
    ModelState.CRASHED: frozenset({ModelState.LOADING, ModelState.UNLOADED}),
    ModelState.FAILED: frozenset({ModelState.LOADING, ModelState.UNLOADED}),
    ModelState.UNREACHABLE: frozenset(),  # remote models only (``REMOTE_TRANSITIONS``)
}

#: the transitions of a remote model (no process: it never crashes; its server may go away,
#: another client of that server may unload it: READY -> UNLOADED, and it may refuse an
#: unload: STOPPING -> READY)
REMOTE_TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    ModelState.UNLOADED: frozenset({ModelState.LOADING, ModelState.READY}),
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.FAILED, ModelState.UNLOADED}),
    ModelState.READY: frozenset({ModelState.LOADING, ModelState.STOPPING, ModelState.UNREACHABLE,
                                 ModelState.UNLOADED}),
    ModelState.UNREACHABLE: frozenset({ModelState.READY, ModelState.LOADING, ModelState.STOPPING,
                                       ModelState.UNLOADED}),
    ModelState.STOPPING: frozenset({ModelState.UNLOADED, ModelState.UNREACHABLE, ModelState.READY}),
    ModelState.CRASHED: frozenset(),
    ModelState.FAILED: frozenset({ModelState.LOADING, ModelState.READY, ModelState.UNLOADED}),
}


class Decision(str, enum.Enum):
    """What ``ensure_loaded`` does for one model state and request."""

    START = "start"  #: nothing usable runs: start a process
    USE = "use"  #: a ready process is used as it is (no-op)
    RELOAD = "reload"  #: explicit load with other options: evict and start, atomically
    WAIT_LOAD = "wait_load"  #: a load is in flight: wait for it, then decide again
    WAIT_STOP = "wait_stop"  #: the process is stopping: wait, then decide again


def decide(state: ModelState, loaded: ResolvedOptions | None, wanted: ResolvedOptions,
           *, explicit: bool) -> Decision:
    """The load contract of DESIGN.md as one function.

    An explicit load with different options reloads; a load triggered by
    inference (``explicit=False``) uses whatever is ready.
    """
    if state in (ModelState.UNLOADED, ModelState.FAILED, ModelState.CRASHED):
        return Decision.START
    if state is ModelState.LOADING:
        return Decision.WAIT_LOAD
    if state is ModelState.STOPPING:
        return Decision.WAIT_STOP
    if not explicit or loaded == wanted:
        return Decision.USE
    return Decision.RELOAD


@dataclass(frozen=True)
class SlotView:
    """What eviction needs to know about one model that holds a slot."""

    name: str
    state: ModelState
    pinned: bool
    last_used: float
    rss: int = 0


def choose_evictions(target: str, kind: str, holders: Sequence[SlotView], limit: int) -> list[str]:
    """Which models to evict so that ``target`` fits in ``limit`` slots of ``kind``.

    ``holders`` are the other models of that kind holding a slot (loading or
    ready). Least recently used unpinned ready models go first; in-flight loads
    only after them.

    :raises SlotsFull: the pinned models alone fill the slots.
    """
    others = [h for h in holders if h.name != target]
    excess = len(others) + 1 - limit
    if excess <= 0:
        return []
    candidates = sorted((h for h in others if not h.pinned),
                        key=lambda h: (h.state is ModelState.LOADING, h.last_used))
    if len(candidates) < excess:
        pinned = ", ".join(sorted(h.name for h in others if h.pinned))
        raise SlotsFull(f"cannot load {target!r}: all {limit} {kind} slot(s) are held by pinned "
                        f"models ({pinned}); unload one or raise max_loaded[{kind!r}]", model=target)
    return [h.name for h in candidates[:excess]]


def admit_memory(target: str, need: int, available: int, evictable: Sequence[SlotView]) -> list[str]:
    """Extra models to evict (least recently used first) so that ``need`` bytes fit.

    ``available`` already counts the memory that planned evictions free.

    :raises NotEnoughMemory: even evicting every candidate would not make room.
    """
    chosen: list[str] = []
    for view in sorted(evictable, key=lambda v: v.last_used):
        if need <= available:
            break
        chosen.append(view.name)
        available += view.rss
    if need > available:
        raise NotEnoughMemory(f"cannot load {target!r}: it needs about {_gib(need)} of memory but "
                              f"only {_gib(max(available, 0))} is available"
                              + (f" even after evicting {', '.join(chosen)}" if chosen else ""),
                              model=target)
    return chosen


def restart_backoff(failures: int, *, first: float = 0.5, cap: float = 30.0) -> float:
    """Seconds an auto-load waits before restarting a model that failed ``failures`` times in a
    row: after one failure it restarts at once, then waits 0.5 s, 1 s, 2 s, ... up to ``cap``
    (no tight crash loops)."""
    if failures <= 1:
        return 0.0
    return float(min(cap, first * 2 ** (failures - 2)))


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"
