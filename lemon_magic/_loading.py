"""The load task: make room, (re)start the backend, wait until healthy, then enforce the slots.

The router decides under its lock and launches :func:`run_load` in its task
group; this never takes the lock. Every process it ends goes through the
slot's one ``stop()``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from lemon_magic._policy import ModelState
from lemon_magic._slot import Load, Slot
from lemon_magic.errors import LemonError, LoadCancelled, LoadError, SlotsFull

if TYPE_CHECKING:
    from lemon_magic.router import AsyncRouter

__all__ = ("run_load", "wait_evicted")

log = logging.getLogger("lemon_magic.router")
_S = ModelState


async def wait_evicted(evicted: Sequence[tuple[Slot, Load | None]]) -> None:
    for v, cancelled_load in evicted:
        if cancelled_load is not None:
            await cancelled_load.done.wait()
        while v.state is _S.STOPPING:
            await v.changed.wait()


async def run_load(router: AsyncRouter, m: Slot, load: Load,
                   evicted: Sequence[tuple[Slot, Load | None]]) -> None:
    """The load task: make room, (re)start, wait until healthy; never holds the lock."""
    config = router.config
    try:
        with load.scope:
            await wait_evicted(evicted)  # their memory was counted as freed
            await m.stop(config.stop_grace, drain_timeout=config.drain_timeout)  # a reload's old
            await m.spawn_healthy(router._resolver.backend(load.options.backend), config)
        if load.scope.cancel_called:  # even if the spawn finished just before the cancel
            raise LoadCancelled(f"load of {m.name!r} was cancelled: "
                                f"{load.cancel_reason or 'cancelled'}", model=m.name)
    except BaseException as exc:
        await m.stop(0.5)  # whatever runs for this model goes (idempotent)
        if isinstance(exc, LemonError):
            error: LemonError = exc
        elif not isinstance(exc, Exception):  # cancelled from outside (the router closing)
            error = LoadCancelled(f"load of {m.name!r} was cancelled: "
                                  f"{load.cancel_reason or 'the router is closing'}", model=m.name)
        else:
            log.exception("[%s] load failed unexpectedly", m.name)
            error = LoadError(f"load of {m.name!r} failed: {exc!r}", model=m.name)
        load.error = error
        m.end_load(error)
        load.ridden.set()
        load.done.set()
        if not isinstance(exc, Exception):
            raise
        return
    assert m.process is not None  # the scope was not cancelled, so the spawn finished
    m.become_ready(m.process, load)
    router._watch(m)
    try:  # now enforce the slot limit (the deferred evictions), then report
        try:
            late = [(router._models[v], router._begin_eviction(router._models[v],
                                                           f"evicted to make room for {m.name}"))
                    for v in router._slot_victims(m, m.spec.kind)]
        except SlotsFull:  # pinned meanwhile: keep them; the limit is exceeded until an unload
            late = []
        load.evicted.update((v.name, v.process.pid if v.process else None) for v, _ in late)
        with anyio.move_on_after(config.drain_timeout + config.stop_grace + 10):
            await wait_evicted(late)
    finally:
        load.done.set()
