"""Idle unload: a ready model with no request in flight for ``idle_timeout`` s is unloaded.

Off by default (``RouterConfig.idle_timeout = None``); pinned models are exempt. Each
ready model has one watcher task (started with its crash watcher, cancelled by its
``stop()``) that sleeps until the deadline, and wakes early when the settings change.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from lemon_magic._policy import ModelState
from lemon_magic._records import RouterConfig
from lemon_magic._slot import Slot

if TYPE_CHECKING:
    from lemon_magic.router import AsyncRouter

__all__ = ("deadline", "watch")


def deadline(m: Slot, config: RouterConfig) -> float | None:
    """Monotonic time at which ``m`` is unloaded for idleness (``None``: no timer runs now)."""
    timeout = config.idle_timeout
    if timeout is None or m.pinned or m.busy or m.state is not ModelState.READY:
        return None
    return m.last_used + timeout


async def watch(router: AsyncRouter, m: Slot, scope: anyio.CancelScope) -> None:
    """Unload ``m`` once it has had no request in flight for ``idle_timeout`` seconds.

    The final check and the stop decision are made under the router's lock, where
    requests are admitted too: a request arriving at the deadline either was
    counted first (no unload) or finds the model stopping and reloads it; a
    request in flight is never cut off.
    """
    with scope:
        while m.state is ModelState.READY:
            woken = router._settings_changed
            if m.busy:
                await m.idle.wait()
                continue
            when = deadline(m, router.config)
            if when is None or when > time.monotonic():
                wait = float("inf") if when is None else max(0.0, when - time.monotonic())
                with anyio.move_on_after(wait):
                    await woken.wait()
                continue
            async with router._lock:
                when = deadline(m, router.config)
                if when is not None and when <= time.monotonic():
                    m.cancel_watchers()  # this task included: it ends here
                    router._begin_eviction(m, f"idle for {router.config.idle_timeout:g} s")
                    return
