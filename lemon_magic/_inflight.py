"""Requests in flight on one model: the count, and the event set when it drops to zero.

Shared by a local model's :class:`~lemon_magic._slot.Slot` and a remote model's
:class:`~lemon_magic._remote_slot.RemoteSlot` (router's loop only).
"""

from __future__ import annotations

import time

import anyio

from lemon_magic.errors import IllegalTransition

__all__ = ("InFlight",)


class InFlight:
    """Counts a model's requests in flight; subclasses say how to tell the world (``notify``)."""

    name: str

    def __init__(self) -> None:
        self.busy = 0
        #: set (and replaced) when ``busy`` drops to zero
        self.idle = anyio.Event()
        self.last_used = 0.0  # monotonic: LRU and the idle timer
        self.last_used_wall: float | None = None

    def notify(self, detail: str) -> None:
        """An event without a transition: requests started (``generating``) or all ended."""
        raise NotImplementedError

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.last_used_wall = time.time()

    def admit(self) -> None:
        """Count a request in flight (with the decision to use the model: no await between)."""
        self.touch()
        self.busy += 1
        if self.busy == 1:
            self.notify("generating")

    def release(self, *, served: bool) -> None:
        """A request ended (``served``: it completed normally)."""
        self.busy -= 1
        if self.busy < 0:
            raise IllegalTransition(self.name, "busy 0", "busy -1 (a request released twice)")
        self.touch()  # the idle timer counts from the end of the last request
        if self.busy == 0:
            self.notify("idle")
            self.idle.set()
            self.idle = anyio.Event()

    async def drain(self, timeout: float) -> None:
        """Wait, at most ``timeout`` seconds, until no request is in flight."""
        with anyio.move_on_after(timeout):
            while self.busy:
                await self.idle.wait()
