"""The one thread that writes every panel's widgets, shared by all panels of the process.

Panels are held by weak reference only; a closed or collected panel's router
subscription is removed by this thread (a finalizer only queues the job, it
never blocks); the thread exits once no panel is subscribed, and polls
``status()`` once per router per second only while an open panel shows a
loading or ready model.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lemon_magic._records import RouterEvent
from lemon_magic.errors import RouterClosed

if TYPE_CHECKING:
    from lemon_magic.widgets import LemonPanel

__all__ = ("UPDATER", "WRITER")

log = logging.getLogger("lemon_magic.widgets")

#: seconds between two refreshes of rows whose figures move (elapsed, uptime, RSS, countdown)
_POLL_SECONDS = 1.0


class _WriterFlag(threading.local):
    active = False  # True on the updater thread only


WRITER = _WriterFlag()


class _Subscription:
    """A panel's router subscription. It holds the panel by weak reference only."""

    def __init__(self, panel: LemonPanel) -> None:
        self.panel = weakref.ref(panel)
        self.unsubscribe: Callable[[], None] | None = None

    def __call__(self, event: RouterEvent) -> None:  # on the router's thread: keep it quick
        panel = self.panel()
        if panel is not None and not panel.closed:
            UPDATER.post(panel, type(panel)._on_event, (event,))

    def cancel(self) -> None:
        """Unsubscribe (idempotent; on the updater thread only)."""
        unsubscribe, self.unsubscribe = self.unsubscribe, None
        if unsubscribe is not None:
            try:
                unsubscribe()
            except RouterClosed:  # a closed router has no subscribers left
                pass


_Job = tuple["LemonPanel | None", Callable[..., None], tuple[Any, ...]]


class _Updater:
    """The one thread that writes every panel's widgets; it runs while some panel is subscribed.

    Jobs go through a ``SimpleQueue``, whose ``put`` is safe in finalizers: closing or
    collecting a panel only queues its unsubscribe, which this thread then runs.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the three fields below
        self._panels: weakref.WeakSet[LemonPanel] = weakref.WeakSet()
        self._subscriptions: set[_Subscription] = set()
        self._thread: threading.Thread | None = None
        #: guards each panel's count of queued updates; notified after every update
        self._updated = threading.Condition()

    def attach(self, panel: LemonPanel) -> _Subscription:
        """Subscribe ``panel`` to its router (events reach it through this thread)."""
        subscription = _Subscription(panel)
        subscription.unsubscribe = panel.router.subscribe(subscription)
        with self._lock:
            self._panels.add(panel)
            self._subscriptions.add(subscription)
            self._start_locked()
        return subscription

    def detach(self, subscription: _Subscription) -> None:
        """Have this thread unsubscribe (safe from a finalizer on any thread: never blocks)."""
        self._jobs.put((None, self._cancel, (subscription,)))

    def post(self, panel: LemonPanel, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        """Queue ``fn(panel, *args)`` as one update of ``panel``."""
        with self._updated:
            panel._pending += 1
        self._jobs.put((panel, fn, args))
        with self._lock:
            self._start_locked()

    def wait_idle(self, panel: LemonPanel, timeout: float) -> bool:
        """Whether every update queued for ``panel`` ran within ``timeout`` seconds."""
        with self._updated:
            return self._updated.wait_for(lambda: panel._pending == 0, timeout)

    def wait_update(self, timeout: float) -> None:
        """Wait until some panel's update ran, or ``timeout``."""
        with self._updated:
            self._updated.wait(timeout)

    def _start_locked(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="lemon-panels", daemon=True)
            self._thread.start()

    def _cancel(self, subscription: _Subscription) -> None:
        subscription.cancel()
        with self._lock:
            self._subscriptions.discard(subscription)

    def _run(self) -> None:
        WRITER.active = True
        next_poll: float | None = None
        while True:
            timeout = None  # nothing moves on screen: sleep until a job comes
            if self._to_poll():
                next_poll = next_poll or time.monotonic() + _POLL_SECONDS
                timeout = max(0.0, next_poll - time.monotonic())
            else:
                next_poll = None
            try:
                self._do(*self._jobs.get(timeout=timeout))
            except queue.Empty:
                pass
            if next_poll is not None and time.monotonic() >= next_poll:
                next_poll = None
                self._poll()
            with self._lock:
                if not self._subscriptions and self._jobs.empty():
                    self._thread = None  # a later post() starts a new thread
                    return

    def _do(self, panel: LemonPanel | None, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        if panel is None:
            try:
                fn(*args)
            except Exception:  # a failed unsubscribe must not stop the writer of every panel
                log.exception("panel clean-up failed")
            return
        try:
            self._update(panel, fn, args)
        finally:
            with self._updated:
                panel._pending -= 1
                self._updated.notify_all()

    @staticmethod
    def _update(panel: LemonPanel, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        if panel.closed:
            return
        panel._update(fn, *args)
        if panel.closed:
            panel._close_widgets()  # closed while the update ran: close what the update made

    def _to_poll(self) -> list[LemonPanel]:
        with self._lock:
            panels = list(self._panels)
        return [p for p in panels if p._moving and not p.closed and not p.router.closed]

    def _poll(self) -> None:
        """Refresh moving rows: one ``status()`` per router, shared by its panels."""
        by_router: dict[int, list[LemonPanel]] = {}
        for panel in self._to_poll():
            by_router.setdefault(id(panel.router), []).append(panel)
        for panels in by_router.values():
            try:
                statuses = panels[0].router.status()
            except RouterClosed:  # closed meanwhile: its last events already said so
                continue
            for panel in panels:
                self._update(panel, type(panel)._show_rows, (statuses,))
        with self._updated:
            self._updated.notify_all()


UPDATER = _Updater()
