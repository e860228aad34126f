"""The declarative router: ``ensure_loaded`` decided under one lock, on one event loop.

All state lives on the router's anyio event loop and is touched only there.
Decisions are made under ``_lock`` with no await in between, so "is it
loaded?", "evict" and "start" can never interleave with another caller's
(lemonade-sdk/lemonade#1603). Process starts, health polls and stops run
outside the lock, in the router's task group; other callers for the same
model wait on the in-flight load's event (single flight), and callers for
other models are not held up at all.

Who does what: the router decides; each model's :class:`~lemon_magic._slot.Slot`
owns its process, options and state; :class:`~lemon_magic._resolve.Resolver`
turns names and options into specs and resolved options; ``_requests`` holds
the one request path. Remote models (served by another server) have a
:class:`~lemon_magic._remote_slot.RemoteSlot` each, outside the lock, the slots
and the memory budget; ``_remoting`` decides for them against the remote's truth.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread

from lemon_magic import (
    _capacity,
    _catalog,
    _idle,
    _introspect,
    _loading,
    _pulling,
    _remoting,
    _requests,
    _unloading,
)
from lemon_magic._policy import Decision, ModelState, decide
from lemon_magic._records import (
    Chunk,
    Completion,
    DeleteResult,
    LoadResult,
    ModelEntry,
    ModelStatus,
    Plan,
    PullResult,
    RouterConfig,
    RouterEvent,
    UnloadResult,
)
from lemon_magic._resolve import Resolver
from lemon_magic._slot import Load, Ride, Slot
from lemon_magic._tasks import Tasks
from lemon_magic.backends import Backend, default_backends
from lemon_magic.backends._pidfile import reap_orphans
from lemon_magic.backends._process import kill_owned
from lemon_magic.errors import (
    InvalidOptions,
    LemonError,
    LoadError,
    LoadQueueFull,
    NotEnoughMemory,
    RouterClosed,
    WaitTimeout,
)
from lemon_magic.options import LoadOptions, ResolvedOptions
from lemon_magic.registry import ModelSpec, Registry

if TYPE_CHECKING:
    from lemon_magic._remote_slot import RemoteSlot
    from lemon_magic.server.serve import Serving, ServingInfo

__all__ = ("AsyncRouter",)

log = logging.getLogger("lemon_magic.router")
_S = ModelState


class AsyncRouter:
    """The router itself; use it inside ``async with``, on one event loop.

    Scripts and notebooks use the blocking :class:`lemon_magic.Router` from
    :func:`lemon_magic.get_router`, which runs this on its own thread.
    """

    def __init__(self, config: RouterConfig | None = None, *, registry: Registry | None = None,
                 backends: Mapping[str, Backend] | None = None) -> None:
        self.config = config or RouterConfig()
        self.registry = registry or Registry()
        self.backends: dict[str, Backend] = dict(backends or default_backends())
        self._resolver = Resolver(self.registry, self.backends)
        self._models: dict[str, Slot] = {}
        #: remote models (no process, no local slot: see ``_remoting``), and forgotten ones
        self._remotes: dict[str, RemoteSlot] = {}
        self._retiring: set[RemoteSlot] = set()
        self._lock = anyio.Lock()
        self._subscribers: list[Callable[[RouterEvent], None]] = []
        #: the router's task group, each task contained (``_tasks``); ``None`` until entered
        self._tg: Tasks | None = None
        self._closed = False
        self._settings_changed = anyio.Event()
        self.spawn_count = 0  # processes started by this router (tests and benchmarks read it)
        self._serving: Serving | None = None
        self._pulls = _pulling.Pulls(self)

    async def __aenter__(self) -> AsyncRouter:
        reap_orphans()
        group = anyio.create_task_group()
        await group.__aenter__()
        self._tg = Tasks(group)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.aclose()
        finally:
            assert self._tg is not None
            self._tg.cancel_scope.cancel()
            await self._tg.group.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Stop every backend and refuse further calls; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pulls.cancel_all()
        with anyio.CancelScope(shield=True):
            await self.stop_serving()
            await _unloading.unload_all(self, "the router is closing")
            await _remoting.close_all(self)

    def configure(self, changes: Mapping[str, Any]) -> RouterConfig:
        """Replace fields of the config; they apply to every later decision, wait and request.

        :raises InvalidOptions: an unknown field.
        """
        known = {f.name for f in dataclasses.fields(RouterConfig)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InvalidOptions(f"unknown router setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        self.config = dataclasses.replace(self.config, **changes)
        self._wake_idle_timers()
        return self.config

    def _kill_all_now(self) -> None:
        """Last resort for exit paths, from any thread: SIGKILL every backend this router
        started, through the supervisor's own thread-safe registry (no router state read)."""
        kill_owned(id(self))

    # ----------------------------------------------------------------- events

    def subscribe(self, callback: Callable[[RouterEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on every state change (on the router's thread; keep it quick).

        Returns a function that unsubscribes (call it on the router's thread).
        """
        self._subscribers.append(callback)
        return lambda: self.unsubscribe(callback)

    def unsubscribe(self, callback: Callable[[RouterEvent], None]) -> None:
        """Stop calling ``callback`` (idempotent)."""
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def _emit(self, event: RouterEvent) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # a broken subscriber must not break the router
                log.exception("[%s] event subscriber failed", event.model)

    def _slot(self, name: str, spec: ModelSpec) -> Slot:
        return Slot(name, spec, self._emit, on_spawn=self._count_spawn, owner=id(self))

    def _count_spawn(self) -> None:
        self.spawn_count += 1

    # ----------------------------------------------------------------- names and options

    async def _spec(self, model: str) -> ModelSpec:
        if self._closed:
            raise RouterClosed()
        return await self._resolver.spec(model)

    def resolve(self, spec: ModelSpec, requested: LoadOptions) -> ResolvedOptions:
        """``requested`` made concrete for ``spec`` (request > registration > router defaults).

        :raises InvalidOptions: a value the model or backend cannot take.
        """
        return self._resolver.resolve(spec, requested, self.config.default_options)

    def default_backend(self) -> str:
        """The first backend kind that is available here (chosen once per router)."""
        return self._resolver.default_backend()

    async def register(self, name: str, path: str | os.PathLike[str], *, kind: str = "llm",
                       description: str = "", **defaults: Any) -> ModelSpec:
        """Register ``name`` for a GGUF file with default load options (persisted). A loaded
        model keeps running; its next explicit load compares against the new registration.

        :raises LemonError: a bad name, kind, option or file (nothing changes).
        """
        return await _catalog.register(self, name, path, kind=kind, description=description,
                                       **defaults)

    async def register_remote(self, name: str, url: str, remote_model: str, *,
                              api: str = "lemonade", api_key_env: str | None = None,
                              kind: str = "llm", description: str = "", **defaults: Any) -> ModelSpec:
        """Register ``name`` for a model another server serves (see ``Router.register_remote``).

        :raises LemonError: a bad name, URL, api or default option (nothing changes).
        """
        return await _catalog.register_remote(self, name, url, remote_model, api=api,
                                              api_key_env=api_key_env, kind=kind,
                                              description=description, **defaults)

    async def unregister(self, name: str) -> UnloadResult | None:
        """Forget a registration; a model loaded here under that name is unloaded first.

        :raises ModelNotFound: ``name`` is not a user registration.
        """
        return await _catalog.unregister(self, name)

    def models(self, *, all: bool = False) -> list[ModelEntry]:
        """Every model loadable by name (built-in, registered, and paths the router has run),
        with its state, and with ``all`` the catalogue's models not pulled yet; reads the
        registrations file, never a model file."""
        known = {m.name: (m.spec, m.state) for m in self._models.values()}
        known.update((r.name, (r.spec, r.state)) for r in self._remotes.values())
        entries = self.registry.entries(known)
        return entries + _pulling.catalog_entries({e.name for e in entries}) if all else entries

    async def pull(self, model: str, *, name: str | None = None) -> PullResult:
        """Pull a catalogue model or a checkpoint (``org/repo[:VARIANT]``) from the Hugging Face
        Hub and register it as ``name`` (default: ``model``); concurrent pulls and loads of one
        name make one transfer (see :mod:`lemon_magic._pulling`).

        :raises PullError: the pull failed or was cancelled (nothing is registered).
        """
        return await _pulling.pull(self, model, name)

    async def delete(self, model: str) -> DeleteResult:
        """Unload, unregister and remove the pulled files of a registered model.

        :raises ModelNotFound: ``model`` is not a user registration.
        """
        return await self._pulls.delete(model)

    # ----------------------------------------------------------------- loading

    async def ensure_loaded(self, model: str, options: LoadOptions | None = None, *,
                            explicit: bool = True, pin: bool | None = None,
                            _acquire: bool = False) -> LoadResult:
        """Ensure ``model`` is loaded; the whole decision is made under the router's lock.

        * explicit (``load``): same resolved options → ``noop``; different →
          the old process is stopped and a new one started (``reloaded``).
        * not explicit (auto-load by inference): whatever is ready is used as
          it is; ``options_differ`` says how it differs from what was asked.
        * a load in flight is joined, never duplicated.

        :raises LemonError: bad model or options (nothing changes), or the load failed.
        """
        began = time.monotonic()
        requested = options or LoadOptions()
        spec = await _pulling.spec_or_pull(self, model)
        if spec.remote is not None:
            return await _remoting.ensure_loaded(self, spec, requested, explicit=explicit, pin=pin,
                                                 acquire=_acquire)
        name = spec.name
        deadline = began + self.config.load_wait_timeout
        seat: list[Slot] = []  # the slot whose queue of reloads this caller waits in, if any
        try:
            return await self._decide_until_done(name, spec, requested, explicit, pin, _acquire,
                                                 began, deadline, seat)
        finally:
            for m in seat:
                m.queued_loads -= 1

    async def _decide_until_done(self, name: str, spec: ModelSpec, requested: LoadOptions,
                                 explicit: bool, pin: bool | None, acquire: bool, began: float,
                                 deadline: float, seat: list[Slot]) -> LoadResult:
        """``ensure_loaded``'s loop: decide under the lock, wait outside it, decide again.

        Two rules keep one model's callers fair (issue 21). An inference request that finds a
        load in flight rides on it (:class:`~lemon_magic._slot.Ride`): it is admitted when that
        load makes the model ready, so it waits for at most the reload in progress, never for
        the reloads queued after it. An explicit load that would reload the model again after
        the one in flight takes a seat in the model's queue (``seat``); with
        ``max_queued_loads`` seats taken it is refused at once (:class:`LoadQueueFull`).
        """
        joined: Load | None = None
        started_here: Load | None = None
        while True:
            ride: Ride | None = None
            async with self._lock:
                if self._closed:
                    raise RouterClosed()
                m = self._models.get(name) or self._slot(name, spec)  # kept once it starts
                wanted = self.resolve(spec, requested if explicit else
                                      requested.merged_over(m.preferred))
                decision = decide(m.state, m.options, wanted, explicit=explicit)
                if decision is Decision.USE:
                    assert m.process is not None and m.options is not None
                    m.touch()
                    self._apply_caller(m, requested, pin, explicit)
                    if acquire:  # counted under the lock, with the decision: no eviction between
                        m.admit()
                    done = joined or started_here
                    return LoadResult(
                        name, done.action if done else "noop", m.options.backend, m.process.pid,
                        m.process.url, m.options, time.monotonic() - began, m.load_seconds or 0.0,
                        joined=joined is not None and started_here is None,
                        options_differ={} if explicit else m.options.diff(wanted),
                        previous_options=done.previous if done else None,
                        evicted=dict(done.evicted) if done else {})
                if decision in (Decision.START, Decision.RELOAD):
                    if not explicit and started_here is None and time.monotonic() < m.retry_at:
                        raise m.backoff_error()
                    started_here = self._start_load(m, spec, wanted, decision)  # raises first
                    self._models[name] = m
                    self._apply_caller(m, requested, pin, explicit)
                    for queued in seat:  # no longer queued: this caller's reload is the one now
                        queued.queued_loads -= 1
                    seat.clear()
                    load: Load | None = started_here
                    wait_for = started_here.done
                elif decision is Decision.WAIT_LOAD:
                    assert m.load is not None
                    load = joined = m.load
                    wait_for = load.done
                    if acquire and not explicit:
                        ride = Ride()
                        load.rides.append(ride)
                        wait_for = load.ridden
                    elif explicit and load.options != wanted and not seat:
                        if m.queued_loads >= self.config.max_queued_loads:
                            raise LoadQueueFull(name, m.queued_loads, max(1, math.ceil(
                                (m.load_seconds or 1.0) * (m.queued_loads + 1))))
                        m.queued_loads += 1
                        seat.append(m)
                else:  # WAIT_STOP
                    load = None
                    wait_for = m.changed
            try:
                with anyio.move_on_after(max(deadline - time.monotonic(), 0)) as waited:
                    await wait_for.wait()
            except BaseException:
                if ride is not None:
                    m.unride(ride)
                raise
            if waited.cancelled_caught:
                if ride is not None:
                    m.unride(ride)
                raise WaitTimeout(f"gave up waiting for {name!r} after "
                                  f"{self.config.load_wait_timeout:g} s (it is still {m.state})",
                                  model=name)
            if load is None:
                continue
            if ride is not None and ride.admitted:
                assert load.process is not None
                if m.process is load.process:  # admitted when it became ready: use it as it is
                    self._apply_caller(m, requested, pin, explicit)
                    return LoadResult(
                        name, load.action, load.options.backend, load.process.pid,
                        load.process.url, load.options, time.monotonic() - began, load.seconds,
                        joined=True, options_differ=load.options.diff(wanted),
                        previous_options=load.previous, evicted=dict(load.evicted))
                m.unride(ride)  # already stopped again (after drain_timeout): decide again
                continue
            if load.error is not None:
                if isinstance(load.error, LemonError):
                    raise load.error
                raise LoadError(f"load of {name!r} failed: {load.error!r}", model=name)
            if explicit:
                m.failures, m.retry_at = 0, 0.0  # the user asked and it worked
                if m.process is load.process:  # a joiner's pin and options apply too
                    self._apply_caller(m, requested, pin, explicit)
            if explicit and not acquire and load.options == wanted and load.process is not None:
                # the load we started or joined did what we asked: report it, even if a
                # later caller has already changed the model again (no ping-pong)
                return LoadResult(name, load.action, wanted.backend, load.process.pid,
                                  load.process.url, wanted, time.monotonic() - began,
                                  load.seconds, joined=load is not started_here,
                                  previous_options=load.previous, evicted=dict(load.evicted))

    def _apply_caller(self, m: Slot, requested: LoadOptions, pin: bool | None,
                      explicit: bool) -> None:
        if explicit:
            m.preferred = requested
        if pin is not None and pin != m.pinned:
            m.pinned = pin
            self._wake_idle_timers()

    def _start_load(self, m: Slot, spec: ModelSpec, options: ResolvedOptions,
                    decision: Decision) -> Load:
        """Under the lock: pick evictions, admit memory, mark states, launch the load task."""
        assert self._tg is not None
        self._resolver.backend(options.backend).command()  # a missing program fails here
        slot_victims = self._slot_victims(m, spec.kind)
        # Make before break: ready models that the slot limit evicts keep serving until the
        # new backend is healthy (so a load that fails changes nothing), as long as memory
        # admits both. Otherwise they are stopped first.
        deferred = [v for v in slot_victims if self._models[v].state is _S.READY]
        victims = [v for v in slot_victims if v not in deferred]
        try:
            extra = _capacity.memory_victims(self._models.values(), m, spec, options, victims,
                                             self.config)
        except NotEnoughMemory:
            extra = ["(needs the deferred ones)"]
        if extra:
            victims = slot_victims + _capacity.memory_victims(self._models.values(), m, spec,
                                                              options, slot_victims, self.config)
        reloading = decision is Decision.RELOAD
        load = Load(options, "reloaded" if reloading else "loaded", m.options if reloading else None)
        # all effects below happen together, with no await: nobody sees a half-made plan
        load.evicted.update((v, _pid(self._models[v])) for v in victims)
        evicted = [(self._models[v], self._begin_eviction(self._models[v],
                                                          f"evicted to make room for {m.name}"))
                   for v in victims]
        m.begin_load(spec, load, f"reload: {load.previous.describe_diff(options)}"
                     if load.previous else "")
        self._tg.start_soon(_loading.run_load, self, m, load, evicted)
        return load

    def _slot_victims(self, m: Slot, kind: str) -> list[str]:
        return _capacity.slot_victims(self._models.values(), m, kind, self.config)

    #: estimated bytes a backend needs (weights + KV cache + margin)
    memory_needed = staticmethod(_capacity.memory_needed)

    def _begin_eviction(self, v: Slot, reason: str) -> Load | None:
        """Start evicting ``v``; returns the load it cancelled, if ``v`` was loading.

        The stop runs in the router's own task group, so that cancelling the load
        that asked for it can never leave ``v`` half-stopped.
        """
        assert self._tg is not None
        if v.state is _S.LOADING:
            assert v.load is not None
            v.load.cancel_reason = reason
            v.load.scope.cancel()
            return v.load
        v.begin_stop(reason)
        self._tg.start_soon(self._finish_stop, v)
        return None

    # ----------------------------------------------------------------- watching a ready model

    def _watch(self, m: Slot) -> None:
        """Start the ready process's watchers: crash (pidfd) and idle timer."""
        assert self._tg is not None and m.process is not None
        crash, idle = anyio.CancelScope(), anyio.CancelScope()
        m.watchers += [crash, idle]
        self._tg.start_soon(m.watch_crash, m.process, crash)
        self._tg.start_soon(_idle.watch, self, m, idle)

    def _wake_idle_timers(self) -> None:
        self._settings_changed.set()
        self._settings_changed = anyio.Event()

    # ----------------------------------------------------------------- unloading

    async def _finish_stop(self, m: Slot) -> None:
        """Stop a model already marked STOPPING; ends in UNLOADED."""
        await m.stop(self.config.stop_grace, drain_timeout=self.config.drain_timeout)
        m.finish_stop()

    async def unload(self, model: str, *, reason: str = "unloaded",
                     _closing: bool = False) -> UnloadResult:
        """Stop ``model``'s backend (waiting, bounded, for requests in flight).

        A load in flight is cancelled: its half-started process is killed and its
        waiters get :class:`LoadCancelled`.

        :raises ModelNotLoaded: nothing is loaded or loading under that name.
        """
        return await _unloading.unload(self, model, reason, closing=_closing)

    async def unload_all(self) -> list[UnloadResult]:
        """Unload every model (remote ones on their servers); returns what was unloaded."""
        if self._closed:
            raise RouterClosed()
        return await _unloading.unload_all(self, "unloaded")

    # ----------------------------------------------------------------- introspection

    async def plan(self, model: str, options: LoadOptions | None = None) -> Plan:
        """What an explicit load with ``options`` would do, from the same decision function.

        :raises NotDownloaded: the load would pull the model first.
        """
        spec = await _pulling.spec_for_plan(self, model)
        if spec.remote is not None:
            return await _remoting.plan(self, spec, options or LoadOptions())
        return _introspect.plan(self, spec, self.resolve(spec, options or LoadOptions()))

    def status(self) -> list[ModelStatus]:
        """A snapshot of every model the router knows, loaded or not."""
        return _introspect.status(self)

    def log_tail(self, model: str, n: int = 50) -> list[str]:
        """The last ``n`` lines of the model's backend log (of its last process if stopped).

        :raises ModelNotLoaded: the router has never run this model.
        :raises ModelNotFound: no model has that name.
        """
        return _introspect.log_tail(self, model, n)

    def _try_noop(self, model: str, options: LoadOptions) -> LoadResult | None:
        """The no-op fast path; loop thread only (see :func:`_introspect.try_noop`)."""
        return _introspect.try_noop(self, model, options)

    # ----------------------------------------------------------------- serving over HTTP

    async def serve(self, host: str = "127.0.0.1", port: int = 13305, *,
                    api_key: str | None = None, allowed_origins: Sequence[str] = (),
                    allowed_hosts: Sequence[str] = (), allow_any_args: bool = False) -> str:
        """Serve the Lemonade- and OpenAI-compatible API from this router's loop; returns the
        base URL (see :func:`lemon_magic.server.serve.serve_router` for the options)."""
        from lemon_magic.server.serve import serve_router

        return await serve_router(self, host, port, api_key=api_key, allowed_origins=allowed_origins,
                                  allowed_hosts=allowed_hosts, allow_any_args=allow_any_args)

    async def stop_serving(self) -> bool:
        """Close the HTTP socket (bounded wait for requests in flight); the router and its
        backends stay as they are. Returns whether a server was running; idempotent."""
        serving, self._serving = self._serving, None
        if serving is None:
            return False
        with anyio.CancelScope(shield=True):
            await serving.stop()
        return True

    @property
    def serving(self) -> ServingInfo | None:
        """Where the API is served and how many requests it answered (``None``: not serving)."""
        return self._serving.info if self._serving is not None else None

    # ----------------------------------------------------------------- requests

    async def request(self, model: str, path: str, payload: dict[str, Any], *,
                      load_options: LoadOptions | None = None,
                      lease: _requests.Lease | None = None) -> Completion:
        """One non-streamed completion (``/v1/completions``) or chat (``/v1/chat/completions``);
        auto-loads ``model`` (never reloading it); bounded as a whole by ``request_timeout``."""
        return await _requests.request(self, model, path, payload, load_options, lease)

    def stream(self, model: str, path: str, payload: dict[str, Any], *,
               load_options: LoadOptions | None = None) -> AsyncIterator[Chunk]:
        """Stream a completion or chat; each silence is bounded by ``stream_idle_timeout``."""
        return _requests.stream(self, model, path, payload, load_options)


def _pid(v: Slot) -> int | None:
    """The pid of ``v``'s process (``None``: it has none yet)."""
    return v.process.pid if v.process is not None else None
