"""One remote model's slot: the only owner of its client, its state and the remote's last report.

A remote model has no process, port or memory here: it takes no local slot and
is never evicted by local loads. What it has is a :class:`RemoteClient` (every
call bounded), the remote's last report (:class:`RemoteEntry`), the options of
the last explicit load (what an auto-load asks for), a count of requests in
flight, and at most one :class:`RemoteFlight` (a load or check in progress,
shared by every caller that joins it: N callers, one remote ``/load``).

States follow ``REMOTE_TRANSITIONS`` (``_policy``)::

    unloaded     we have not loaded it, or its server no longer has it loaded
    loading      a remote load (or an openai remote's listing check) is in flight
    ready        its server reported it loaded at the last check
    unreachable  its server stopped answering the health poll (back to ready on its own)
    stopping     a remote unload is in flight
    failed       the last load failed (the error says why)
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio

from lemon_magic._inflight import InFlight
from lemon_magic._policy import REMOTE_TRANSITIONS, ModelState
from lemon_magic._records import LoadResult, ModelStatus, RemoteView, RouterConfig, RouterEvent
from lemon_magic._remote import RemoteEntry, options_differ, reported_options
from lemon_magic._remote_client import RemoteClient
from lemon_magic.errors import IllegalTransition, LemonError
from lemon_magic.options import LoadOptions, ResolvedOptions
from lemon_magic.registry import ModelSpec

__all__ = ("RemoteFlight", "RemoteSlot")

_S = ModelState


@dataclass(eq=False)
class RemoteFlight:
    """A load (or, for an explicit load, first a check against the remote's ``/health``) in
    flight; its outcome is every joiner's."""

    wanted: LoadOptions
    explicit: bool
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    action: Literal["loaded", "noop", "reloaded"] = "noop"
    #: for a reload: the options the remote reported before it
    previous: ResolvedOptions | None = None
    error: LemonError | None = None
    cancel_reason: str | None = None


class RemoteSlot(InFlight):
    """The one owner of a remote model's client, state and last report (router's loop only)."""

    def __init__(self, spec: ModelSpec, config: RouterConfig,
                 emit: Callable[[RouterEvent], None]) -> None:
        assert spec.remote is not None
        super().__init__()
        self.name = spec.name
        self.spec = spec
        self.remote = spec.remote
        self._emit = emit
        self.client = RemoteClient(spec.remote, timeout=config.remote_timeout,
                                   load_timeout=config.remote_load_timeout)
        self.state = _S.UNLOADED
        self.state_since = time.monotonic()
        self.changed = anyio.Event()
        #: the remote's last report, and when it came (wall clock)
        self.entry: RemoteEntry | None = None
        self.checked_at: float | None = None
        self.flight: RemoteFlight | None = None
        #: options of the last explicit load: what an auto-load asks for
        self.preferred = LoadOptions()
        self.load_seconds: float | None = None
        self.last_error: LemonError | None = None
        #: what happened to it, newest last (``log_tail``: a remote model has no local log)
        self.notes: collections.deque[str] = collections.deque(maxlen=50)
        #: the health poll's cancel scope while it runs
        self.poller: anyio.CancelScope | None = None
        #: we loaded it and did not unload it: the poll follows it even while its server
        #: reports it unloaded (a third party's reload or unload)
        self.following = False
        #: why this slot was let go (unregistered, registered anew), if it was
        self.retired: str | None = None

    # ----------------------------------------------------------------- state

    def set_state(self, new: ModelState, detail: str = "") -> None:
        """The only writer of ``state``: checks ``REMOTE_TRANSITIONS``, notes, notifies."""
        old = self.state
        if new is old:
            return
        if new not in REMOTE_TRANSITIONS[old]:
            raise IllegalTransition(self.name, old, new)
        now = time.monotonic()
        event = RouterEvent(self.name, old, new, time.time(), now - self.state_since, detail,
                            self.entry.pid if self.entry else None)
        self.state, self.state_since = new, now
        self.changed.set()
        self.changed = anyio.Event()
        self.note(f"{old} -> {new}" + (f" ({detail})" if detail else ""))
        self._emit(event)

    def note(self, text: str) -> None:
        self.notes.append(f"{time.strftime('%H:%M:%S')} {text}")

    def saw(self, entry: RemoteEntry) -> None:
        """Keep the remote's latest report (an ``in_use`` said while our own requests ran is
        about them: kept as ``ready``, so the row does not say busy after they end)."""
        if entry.status == "in_use" and self.busy:
            entry = dataclasses.replace(entry, status="ready")
        self.entry, self.checked_at = entry, time.time()

    def notify(self, detail: str) -> None:
        self._emit(RouterEvent(self.name, self.state, self.state, time.time(), 0.0, detail,
                               self.entry.pid if self.entry else None))

    # ----------------------------------------------------------------- views

    def result(self, action: Literal["loaded", "noop", "reloaded"], began: float, *,
               joined: bool = False, wanted: LoadOptions | None = None,
               previous: ResolvedOptions | None = None) -> LoadResult:
        """A :class:`LoadResult` from the remote's last report (``wanted``: an auto-load's ask,
        to say which options the remote runs otherwise)."""
        entry = self.entry
        return LoadResult(self.name, action, f"{self.remote.api} remote",
                          entry.pid if entry else None, self.remote.base_url,
                          reported_options(self.remote, entry), time.monotonic() - began,
                          self.load_seconds or 0.0, joined=joined,
                          options_differ=options_differ(entry, wanted) if wanted else {},
                          previous_options=previous, remote=self.remote.url)

    def status(self) -> ModelStatus:
        # the remote's pid and options only while it serves the model for us
        entry = self.entry if self.state in (_S.READY, _S.LOADING, _S.STOPPING) else None
        view = RemoteView(self.remote.url, self.remote.api, self.remote.remote_model,
                          entry.status if entry else None, entry.pid if entry else None,
                          dict(entry.recipe_options) if entry else {}, self.checked_at)
        now_wall, now = time.time(), time.monotonic()
        return ModelStatus(
            self.name, self.spec.kind, self.state, f"{self.remote.api} remote",
            view.pid, self.remote.base_url, None, None, False, self.load_seconds,
            self.last_used_wall, self.busy, self.last_error.render() if self.last_error else None,
            tuple(self.notes)[-20:], now_wall - (now - self.state_since), remote=view)

    async def aclose(self) -> None:
        """Stop the health poll and close the client (the remote's model is left as it is)."""
        if self.poller is not None:
            self.poller.cancel()
        with anyio.CancelScope(shield=True):
            await self.client.aclose()
