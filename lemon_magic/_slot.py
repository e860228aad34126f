"""One model's slot: the only owner of its process, its options and its state.

The router decides (under its lock); the slot carries the decision out. Every
write of ``process``, ``options``, ``load`` and ``state`` happens here, and
every process ends through :meth:`Slot.stop` (unload, eviction, reload, close,
a failed start) or, for a process that already died, the same final step
(:meth:`Slot.crashed`).

State table (``TRANSITIONS`` in ``_policy``) and the invariants checked after
every transition::

    state      process                 options              load
    unloaded   None                    None                 None
    loading    None, the old or new    what it loads        set
    ready      set                     set                  None
    stopping   set or None             set                  None
    crashed    None                    what it crashed with None
    failed     None                    None                 None
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.abc

from lemon_magic._inflight import InFlight
from lemon_magic._policy import TRANSITIONS, ModelState, restart_backoff
from lemon_magic._records import RouterConfig, RouterEvent
from lemon_magic.backends import Backend
from lemon_magic.backends._process import BackendProcess, free_port
from lemon_magic.errors import BackendExited, IllegalTransition, LemonError, LoadCancelled, LoadError
from lemon_magic.options import LoadOptions, ResolvedOptions
from lemon_magic.registry import ModelSpec

__all__ = ("Load", "Ride", "Slot")

log = logging.getLogger("lemon_magic.router")

_S = ModelState
#: what must hold in each state (checked after every transition)
_INVARIANTS: dict[ModelState, Callable[[Slot], bool]] = {
    _S.UNLOADED: lambda s: s.process is None and s.options is None and s.load is None,
    _S.LOADING: lambda s: s.load is not None and s.options is not None,
    _S.READY: lambda s: s.process is not None and s.options is not None and s.load is None,
    _S.STOPPING: lambda s: s.load is None and s.options is not None,
    _S.CRASHED: lambda s: s.process is None and s.load is None,
    _S.FAILED: lambda s: s.process is None and s.options is None and s.load is None,
}


@dataclass(eq=False)
class Ride:
    """An inference request waiting for a load in flight: admitted (counted in flight) the
    moment that load makes the model ready, so a reload that comes next drains it instead of
    making it wait again (issue 21: a queue of reloads starved inference)."""

    admitted: bool = False
    #: the caller stopped waiting (timeout, Stop): not to be admitted
    gone: bool = False


@dataclass(eq=False)
class Load:
    """A load in flight: its target, its waiters' event, its cancel scope and its outcome."""

    options: ResolvedOptions
    action: Literal["loaded", "reloaded"]
    previous: ResolvedOptions | None
    done: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    error: BaseException | None = None
    cancel_reason: str | None = None
    #: set on success: the process it started and its spawn-to-healthy seconds
    process: BackendProcess | None = None
    seconds: float = 0.0
    #: the models stopped to make room for it (name → pid, ``None``: it was still loading)
    evicted: dict[str, int | None] = field(default_factory=dict)
    #: inference requests riding on it (see :class:`Ride`), and the event that wakes them: set
    #: once the model is ready (before ``done``, which waits for deferred evictions) or failed
    rides: list[Ride] = field(default_factory=list)
    ridden: anyio.Event = field(default_factory=anyio.Event)


class Slot(InFlight):
    """The one owner of a model's process, options and state (used on the router's loop)."""

    def __init__(self, name: str, spec: ModelSpec, emit: Callable[[RouterEvent], None],
                 on_spawn: Callable[[], None] = lambda: None, owner: int = 0) -> None:
        super().__init__()
        self.name = name
        self.spec = spec
        self._emit = emit
        self._on_spawn = on_spawn
        self._owner = owner  # processes are recorded live for it (kill_owned at exit)
        self.state = ModelState.UNLOADED
        self.state_since = time.monotonic()
        #: set (and replaced) on every transition
        self.changed = anyio.Event()
        self.options: ResolvedOptions | None = None
        self.process: BackendProcess | None = None
        self.load: Load | None = None
        self.load_seconds: float | None = None
        self.stop_seconds: float | None = None
        #: failed starts and crashes since the last successful request or explicit load
        self.failures = 0
        #: monotonic time before which an auto-load does not restart it (crash-loop backoff)
        self.retry_at = 0.0
        self.pinned = False
        self.last_error: LemonError | None = None
        #: the options of the last explicit load: what an auto-load asks for
        self.preferred = LoadOptions()
        #: the last lines and the pid of the last process that ended
        self.dead_log: tuple[str, ...] = ()
        self.dead_pid: int | None = None
        #: cancel scopes of the tasks that watch the ready process (crash, idle)
        self.watchers: list[anyio.CancelScope] = []
        #: explicit loads waiting to reload it after the load in flight (``max_queued_loads``)
        self.queued_loads = 0

    # ----------------------------------------------------------------- state

    def set_state(self, new: ModelState, detail: str = "") -> None:
        """The only writer of ``state``: checks the table and the invariants, logs, notifies.

        :raises IllegalTransition: the table does not allow it, or an invariant broke.
        """
        old = self.state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(self.name, old, new)
        if not _INVARIANTS[new](self):
            raise IllegalTransition(self.name, old, f"{new} (process={self.process}, "
                                    f"options={self.options}, load={self.load})")
        now = time.monotonic()
        event = RouterEvent(self.name, old, new, time.time(), now - self.state_since, detail,
                            self.process.pid if self.process else None)
        self.state, self.state_since = new, now
        self.changed.set()
        self.changed = anyio.Event()
        log.info("[%s] %s -> %s%s", self.name, old, new, f" ({detail})" if detail else "")
        self._emit(event)

    def notify(self, detail: str) -> None:
        """An event without a transition (``old == new``): requests started or all finished."""
        self._emit(RouterEvent(self.name, self.state, self.state, time.time(), 0.0, detail,
                               self.process.pid if self.process else None))

    # ----------------------------------------------------------------- the lifecycle

    def begin_load(self, spec: ModelSpec, load: Load, detail: str) -> None:
        """Under the router's lock: this slot now loads ``load.options`` (the old process, for
        a reload, stays until the load task stops it)."""
        self.spec = spec
        self.load, self.options = load, load.options
        self.last_error = None
        self.set_state(ModelState.LOADING, detail)

    def become_ready(self, process: BackendProcess, load: Load) -> None:
        """The load succeeded: ``process`` serves the model now."""
        self.process, self.load = process, None
        self.load_seconds = load.seconds = time.monotonic() - process.started_at
        load.process = process
        self.touch()
        self.set_state(ModelState.READY, f"pid {process.pid}, {self.load_seconds:.2f} s")
        for ride in load.rides:  # with the transition, no await: nothing can reload in between
            if not ride.gone:
                self.admit()
                ride.admitted = True
        load.ridden.set()

    def end_load(self, error: LemonError) -> None:
        """The load failed or was cancelled (its processes are stopped already)."""
        cancelled = isinstance(error, LoadCancelled)
        self.options, self.load = None, None
        if not cancelled:
            self.last_error = error
            self.count_failure()
        self.set_state(ModelState.UNLOADED if cancelled else ModelState.FAILED,
                       str(error).splitlines()[0])

    def unride(self, ride: Ride) -> None:
        """A request riding on a load stopped waiting: not admitted later, or released now."""
        ride.gone = True
        if ride.admitted:
            ride.admitted = False
            self.release(served=False)

    def begin_stop(self, reason: str) -> None:
        """Under the router's lock: a ready model starts stopping (unload, eviction, idle)."""
        self.set_state(ModelState.STOPPING, reason)

    def finish_stop(self) -> None:
        """After :meth:`stop`: the model is unloaded."""
        pid = self.dead_pid
        self.options = None
        self.set_state(ModelState.UNLOADED, f"pid {pid} stopped" if pid else "")

    def forget(self, reason: str) -> None:
        """A crashed or failed model is unloaded: it has no process; its options go too."""
        self.options = None
        self.set_state(ModelState.UNLOADED, reason)

    # ----------------------------------------------------------------- processes

    async def spawn_healthy(self, backend: Backend, config: RouterConfig) -> BackendProcess:
        """Start the backend for ``self.options`` and wait until it is healthy; a port clash is
        retried on a new port. Every process that does not become the model's goes through
        :meth:`stop` before this returns or raises.

        :raises LoadError: it exited, timed out or could not be spawned.
        """
        assert self.options is not None and self.state is ModelState.LOADING
        for attempt in range(config.port_retries + 1):
            port = free_port()
            argv = [*backend.argv(self.spec.path, self.options, port),
                    *backend.kind_args(self.spec.kind, self.options)]
            key = secrets.token_urlsafe(32)  # fresh for each process, held by the router only
            env = {**(backend.environment() or os.environ), **backend.key_environment(key)}
            self.process = BackendProcess.spawn(self.name, argv, port, env=env,
                                                cwd=backend.workdir(), log_lines=config.log_lines,
                                                request_timeout=config.request_timeout,
                                                owner=self._owner, api_key=key)
            self._on_spawn()
            try:
                await self.process.wait_healthy(backend.health_path, config.start_timeout)
                return self.process
            except BackendExited:
                retry = (attempt < config.port_retries
                         and self.process.log_mentions(*backend.port_in_use_markers))
                await self.stop(0.5)
                if retry:
                    log.warning("[%s] port %d was taken; retrying on another", self.name, port)
                    continue
                raise
            except BaseException:
                await self.stop(0.5)
                raise
        raise AssertionError("unreachable")

    async def stop(self, grace: float, *, drain_timeout: float = 0.0) -> None:
        """End the model's process; the one way every path stops one. Idempotent, shielded:

        1. wait up to ``drain_timeout`` s for requests in flight;
        2. cancel the tasks watching the process (crash watcher, idle timer);
        3. stop the process: SIGTERM to its group, ``grace`` s, SIGKILL, reap; its HTTP
           client closed, its pid record dropped (``BackendProcess.stop``);
        4. detach it (``process = None``), keeping its last log lines and the stop's duration.
        """
        with anyio.CancelScope(shield=True):
            if drain_timeout > 0:
                await self.drain(drain_timeout)
            self.cancel_watchers()
            process = self.process
            if process is None:
                return
            began = time.monotonic()
            process.stopped_on_purpose = True
            await self._end(process, grace)
            self.stop_seconds = time.monotonic() - began
            if self.process is process:
                self.process = None

    async def watch_crash(self, process: BackendProcess, scope: anyio.CancelScope) -> None:
        """Mark the model crashed the moment its ready process exits on its own (pidfd)."""
        with scope:
            code = await process.wait_exit()
            if self.process is process and self.state is ModelState.READY:
                await self.crashed(process, code)

    async def crashed(self, process: BackendProcess, code: int) -> None:
        """The ready process exited on its own: mark the model crashed, then clean up after
        it (its group's leftovers, its client, its pid record)."""
        self.last_error = BackendExited(self.name, code, "after it was ready", process.log_tail())
        self.count_failure()
        self.cancel_watchers()
        self.process = None
        self.dead_log = tuple(process.log_tail(50))
        self.dead_pid = process.pid
        self.set_state(ModelState.CRASHED, self.last_error.message)
        await self._end(process, 0)

    async def _end(self, process: BackendProcess, grace: float) -> None:
        with anyio.CancelScope(shield=True):
            await process.stop(grace)
        self.dead_log = tuple(process.log_tail(50))
        self.dead_pid = process.pid

    def cancel_watchers(self) -> None:
        for scope in self.watchers:
            scope.cancel()
        self.watchers.clear()

    # ----------------------------------------------------------------- requests and failures

    def release(self, *, served: bool) -> None:
        """A request ended (``served``: it completed normally: the model is not crash-looping)."""
        if served:
            self.failures, self.retry_at = 0, 0.0
        super().release(served=served)

    def count_failure(self) -> None:
        self.failures += 1
        self.retry_at = time.monotonic() + restart_backoff(self.failures)

    def backoff_error(self) -> LoadError:
        """The error an auto-load gets while a crash-looping model waits out its backoff."""
        wait = self.retry_at - time.monotonic()
        last = self.last_error.message if self.last_error else "unknown error"
        return LoadError(f"{self.name!r} failed {self.failures} time(s) in a row (last: {last}); "
                         f"not restarting it for another {wait:.1f} s (an explicit load retries "
                         "at once)", model=self.name,
                         log_tail=self.last_error.log_tail if self.last_error else ())

    def log_tail(self, n: int) -> list[str]:
        """The last ``n`` lines of the running process's log, or of the last one."""
        if self.process is not None:
            return self.process.log_tail(n)
        if self.last_error is not None and self.last_error.log_tail:
            return list(self.last_error.log_tail)[-n:]
        return list(self.dead_log)[-n:]
