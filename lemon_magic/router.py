"""The declarative router: ``ensure_loaded`` decided under one lock, on one event loop.

All state lives on the router's anyio event loop and is touched only there.
Decisions are made under ``_lock`` with no await in between, so "is it
loaded?", "evict" and "start" can never interleave with another caller's
(lemonade-sdk/lemonade#1603). Process starts, health polls and stops run
outside the lock, in the router's task group; other callers for the same
model wait on the in-flight load's event (single flight), and callers for
other models are not held up at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.abc
import httpx
import psutil

from lemon_magic._inference import DONE, Accumulator, check_payload, http_error, parse_sse_line
from lemon_magic._policy import (
    TRANSITIONS,
    Decision,
    ModelState,
    SlotView,
    admit_memory,
    choose_evictions,
    decide,
    restart_backoff,
)
from lemon_magic.backends import Backend, default_backends
from lemon_magic.backends._pidfile import reap_orphans
from lemon_magic.backends._process import BackendProcess, free_port
from lemon_magic.errors import (
    BackendExited,
    BackendUnavailable,
    InferenceError,
    InvalidOptions,
    LemonError,
    LoadCancelled,
    LoadError,
    ModelNotLoaded,
    NotEnoughMemory,
    RouterClosed,
    SlotsFull,
    WaitTimeout,
)
from lemon_magic.options import DEFAULT_CTX_SIZE, LoadOptions, ResolvedOptions, default_threads
from lemon_magic.registry import ModelSpec, Registry

__all__ = ("AsyncRouter", "Chunk", "Completion", "Lease", "LoadResult", "ModelStatus", "Plan",
           "RouterConfig", "RouterEvent", "UnloadResult")

log = logging.getLogger("lemon_magic.router")


# --------------------------------------------------------------------------- public records


@dataclass(frozen=True)
class RouterConfig:
    """Limits and timeouts of a router; every wait is bounded by one of these."""

    #: models of each kind that may be loaded at once (Lemonade's default: 1 llm)
    max_loaded: Mapping[str, int] = field(
        default_factory=lambda: {"llm": 1, "embedding": 1, "reranking": 1})
    #: seconds a backend may take from spawn to healthy
    start_timeout: float = 120.0
    #: seconds a caller waits for an in-flight load (others' or its own)
    load_wait_timeout: float = 300.0
    #: seconds an unload or eviction waits for requests in flight before stopping anyway
    drain_timeout: float = 30.0
    #: seconds between SIGTERM and SIGKILL
    stop_grace: float = 5.0
    #: seconds a single inference request may take
    request_timeout: float = 600.0
    #: memory budget in bytes for all backends (``None``: what psutil says is available)
    memory_limit: int | None = None
    #: lines of each backend's log kept in memory
    log_lines: int = 400
    #: times a port clash is retried with a new port
    port_retries: int = 3
    #: load options used where neither the request nor the model's registration sets one
    default_options: LoadOptions = field(default_factory=LoadOptions)


@dataclass(frozen=True)
class LoadResult:
    """What ``load``/``ensure_loaded`` did."""

    model: str
    #: ``"loaded"`` (started), ``"noop"`` (already loaded as asked) or ``"reloaded"``
    action: Literal["loaded", "noop", "reloaded"]
    backend: str
    pid: int
    url: str
    options: ResolvedOptions
    #: wall time of this call (including any wait for another caller's load)
    seconds: float
    #: spawn-to-healthy time of the process now serving the model
    load_seconds: float
    #: this call joined a load that another caller started
    joined: bool = False
    #: auto-load only: requested option → (loaded, requested) where the loaded process differs
    options_differ: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)
    #: for a reload: the options it replaced
    previous_options: ResolvedOptions | None = None


@dataclass(frozen=True)
class UnloadResult:
    """What ``unload`` did."""

    model: str
    pid: int | None
    seconds: float
    #: the model was still loading; its load was cancelled
    cancelled_load: bool = False


@dataclass(frozen=True)
class Plan:
    """What an explicit ``load`` with these options would do now (advisory: state may change)."""

    model: str
    action: Literal["noop", "load", "reload", "wait"]
    options: ResolvedOptions
    current: ResolvedOptions | None
    diff: Mapping[str, tuple[Any, Any]]
    #: spawn-to-healthy seconds of this model's last load (``None`` if never loaded)
    last_load_seconds: float | None = None
    #: for a reload: seconds its last stop took (``None`` if never stopped)
    last_stop_seconds: float | None = None

    @property
    def estimate_seconds(self) -> float | None:
        """A rough duration: the last load, plus for a reload the last stop (0.2 s if the model
        was never stopped yet)."""
        if self.last_load_seconds is None:
            return None
        if self.action != "reload":
            return self.last_load_seconds
        stop = self.last_stop_seconds if self.last_stop_seconds is not None else 0.2
        return self.last_load_seconds + stop

    def describe(self) -> str:
        """One line, e.g. ``will reload gemma3-270m: ctx_size 4096 → 8192 — about 1.3 s
        (last load 1.1 s + stop)``."""
        if self.action == "noop":
            return "no change (no-op)"
        if self.action == "wait":
            return f"{self.model} is loading; the load will wait for it, then decide"
        estimate = ""
        if self.last_load_seconds is not None:
            stop = " + stop" if self.action == "reload" else ""
            parts = f"last load {self.last_load_seconds:.1f} s{stop}"
            assert self.estimate_seconds is not None
            estimate = f" — about {self.estimate_seconds:.1f} s ({parts})"
        if self.action == "load":
            return f"will load {self.model}{estimate}"
        assert self.current is not None
        return f"will reload {self.model}: {self.current.describe_diff(self.options)}{estimate}"


@dataclass(frozen=True)
class ModelStatus:
    """A snapshot of one model, as ``status()`` reports it."""

    name: str
    kind: str
    state: ModelState
    backend: str | None
    pid: int | None
    url: str | None
    options: ResolvedOptions | None
    rss: int | None
    pinned: bool
    load_seconds: float | None
    #: wall-clock time (``time.time()``) of the last load, request or no-op
    last_used: float | None
    requests_in_flight: int
    last_error: str | None
    log_tail: tuple[str, ...]
    #: wall-clock time the model entered its current state (uptime when ready, elapsed when loading)
    since: float | None = None
    #: wall-clock time the idle timer will unload this ready, idle model (``None``: no timer runs)
    idle_unload_at: float | None = None


@dataclass(frozen=True)
class RouterEvent:
    """A state change, as subscribers receive it (on the router's thread)."""

    model: str
    old: ModelState
    new: ModelState
    #: wall-clock time of the change
    at: float
    #: seconds the model spent in ``old``
    seconds_in_old: float
    detail: str = ""
    pid: int | None = None


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed text."""

    text: str
    finish_reason: str | None = None


@dataclass(frozen=True)
class Completion:
    """A finished completion or chat response."""

    model: str
    text: str
    finish_reason: str | None
    usage: Mapping[str, Any]
    #: the backend's JSON response (the last chunk's, when streamed)
    response: Mapping[str, Any]
    load: LoadResult


# --------------------------------------------------------------------------- internal records


@dataclass(eq=False)
class _Load:
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


@dataclass(eq=False)
class Lease:
    """A request admitted from another thread: which model it holds, and whether it ended."""

    model: str | None = None
    ended: bool = False


@dataclass(eq=False)
class _Resolution:
    """A model name being resolved (in a worker thread) for concurrent callers."""

    done: anyio.Event = field(default_factory=anyio.Event)
    spec: ModelSpec | None = None  # None once done: it failed


@dataclass(eq=False)
class _Model:
    name: str
    spec: ModelSpec
    state: ModelState = ModelState.UNLOADED
    state_since: float = field(default_factory=time.monotonic)
    changed: anyio.Event = field(default_factory=anyio.Event)
    options: ResolvedOptions | None = None
    process: BackendProcess | None = None
    load: _Load | None = None
    load_seconds: float | None = None
    busy: int = 0
    stop_seconds: float | None = None
    #: failed starts and crashes since the last successful request or explicit load
    failures: int = 0
    #: monotonic time before which an auto-load does not restart it (crash-loop backoff)
    retry_at: float = 0.0
    idle: anyio.Event = field(default_factory=anyio.Event)
    pinned: bool = False
    last_used: float = 0.0  # monotonic, for LRU
    last_used_wall: float | None = None
    last_error: LemonError | None = None
    preferred: LoadOptions = field(default_factory=LoadOptions)
    watcher: anyio.CancelScope | None = None
    dead_log: tuple[str, ...] = ()

    def touch(self) -> None:
        self.last_used = time.monotonic()
        self.last_used_wall = time.time()


# --------------------------------------------------------------------------- the router


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
        self._models: dict[str, _Model] = {}
        self._lock = anyio.Lock()
        self._subscribers: list[Callable[[RouterEvent], None]] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed = False
        self.spawn_count = 0  # processes started by this router (tests and benchmarks read it)
        self._default_backend: str | None = None
        self._threads = default_threads()
        self._resolving: dict[str, _Resolution] = {}
        # resolution is pure given (spec, request): memoised, so a no-op load does no I/O
        self._resolved: dict[tuple[ModelSpec, LoadOptions, LoadOptions], ResolvedOptions] = {}

    async def __aenter__(self) -> AsyncRouter:
        reap_orphans()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.aclose()
        finally:
            assert self._tg is not None
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Stop every backend and refuse further calls; idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            await self._unload_all(reason="the router is closing")

    def configure(self, changes: Mapping[str, Any]) -> RouterConfig:
        """Replace fields of the config; they apply to every later decision and wait.

        :raises InvalidOptions: an unknown field.
        """
        known = {f.name for f in dataclasses.fields(RouterConfig)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise InvalidOptions(f"unknown router setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        self.config = dataclasses.replace(self.config, **changes)
        return self.config

    def kill_all_now(self) -> None:
        """Last resort for exit paths: SIGKILL every backend without using the loop."""
        for m in self._models.values():
            if m.process is not None:
                m.process.kill_now()

    # ----------------------------------------------------------------- events

    def subscribe(self, callback: Callable[[RouterEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on every state change (on the router's thread; keep it quick).

        Returns a function that unsubscribes.
        """
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback) if callback in self._subscribers else None

    def _notify(self, m: _Model, detail: str) -> None:
        """An event without a transition (``old == new``): requests started or all finished."""
        self._emit(RouterEvent(m.name, m.state, m.state, time.time(), 0.0, detail,
                               m.process.pid if m.process else None))

    def _emit(self, event: RouterEvent) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:  # a broken subscriber must not break the router
                log.exception("[%s] event subscriber failed", event.model)

    def _set_state(self, m: _Model, new: ModelState, detail: str = "") -> None:
        """The only writer of ``m.state``: checks the transition table, logs, notifies."""
        old = m.state
        if new not in TRANSITIONS[old]:
            raise AssertionError(f"illegal transition {old} -> {new} for {m.name}")
        now = time.monotonic()
        event = RouterEvent(m.name, old, new, time.time(), now - m.state_since, detail,
                            m.process.pid if m.process else None)
        m.state, m.state_since = new, now
        m.changed.set()
        m.changed = anyio.Event()
        log.info("[%s] %s -> %s%s", m.name, old, new, f" ({detail})" if detail else "")
        self._emit(event)

    # ----------------------------------------------------------------- resolution

    async def _spec(self, model: str) -> ModelSpec:
        if self._closed:
            raise RouterClosed()
        if model in self._models:
            return self._models[model].spec
        # The first use of the embedded model assembles 253 MB, so resolution runs in a
        # worker thread; concurrent callers for one name share that one resolution.
        flight = self._resolving.get(model)
        if flight is None:
            flight = self._resolving[model] = _Resolution()
            try:
                flight.spec = await anyio.to_thread.run_sync(self.registry.resolve, model)
            finally:
                del self._resolving[model]
                flight.done.set()
            return flight.spec
        await flight.done.wait()
        if flight.spec is None:  # the shared resolution failed: try on our own
            return await anyio.to_thread.run_sync(self.registry.resolve, model)
        return flight.spec

    def _backend(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            raise InvalidOptions(f"backend must be one of {', '.join(self.backends)} or 'auto', "
                                 f"got {name!r}") from None

    def default_backend(self) -> str:
        """The first backend kind that is available here (chosen once per router)."""
        if self._default_backend is not None:
            return self._default_backend
        for name, backend in self.backends.items():
            if backend.available():
                self._default_backend = name
                return name
        raise BackendUnavailable("no backend is available: build llama-server with 'python -m "
                                 "lemon_magic.build_llama_server' or pip install "
                                 "'llama-cpp-python[server]'")

    def resolve(self, spec: ModelSpec, requested: LoadOptions) -> ResolvedOptions:
        """Fill in defaults and make "auto" concrete, in this order: the request, the model's
        registration, ``config.default_options``, then the router's own defaults.

        :raises InvalidOptions: a value the model or backend cannot take.
        """
        key = (spec, requested, self.config.default_options)
        cached = self._resolved.get(key)
        if cached is not None:
            return cached
        if len(self._resolved) > 512:
            self._resolved.clear()
        opts = requested.merged_over(spec.defaults).merged_over(self.config.default_options)
        info = spec.info
        backend = opts.backend or self.default_backend()
        ctx = opts.ctx_size or min(DEFAULT_CTX_SIZE, info.context_length or DEFAULT_CTX_SIZE)
        if info.context_length and ctx > info.context_length:
            raise InvalidOptions(f"ctx_size {ctx} exceeds the training context of {spec.name!r} "
                                 f"({info.context_length} tokens)")
        extra = opts.extra_args or ()
        self._backend(backend).check_extra_args(extra)
        resolved = ResolvedOptions(backend=backend, ctx_size=ctx,
                                   threads=opts.threads or self._threads, extra_args=extra,
                                   chat_template=opts.chat_template)
        self._resolved[key] = resolved
        return resolved

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
        spec = await self._spec(model)
        name = spec.name
        wanted = self.resolve(spec, requested.merged_over(self._models[name].preferred)
                              if not explicit and name in self._models else requested)
        joined: _Load | None = None
        started_here: _Load | None = None
        deadline = began + self.config.load_wait_timeout
        while True:
            async with self._lock:
                if self._closed:
                    raise RouterClosed()
                m = self._models.get(name) or _Model(name, spec)  # registered once it starts
                decision = decide(m.state, m.options, wanted, explicit=explicit)
                if decision is Decision.USE:
                    assert m.process is not None and m.options is not None
                    m.touch()
                    if pin is not None:
                        m.pinned = pin
                    if explicit:
                        m.preferred = requested
                    if _acquire:  # counted under the lock, with the decision: no eviction between
                        m.busy += 1
                        if m.busy == 1:
                            self._notify(m, "generating")
                    done = joined or started_here
                    return LoadResult(
                        name, done.action if done else "noop", m.options.backend, m.process.pid,
                        m.process.url, m.options, time.monotonic() - began, m.load_seconds or 0.0,
                        joined=joined is not None and started_here is None,
                        options_differ={} if explicit else m.options.diff(wanted),
                        previous_options=done.previous if done else None)
                if decision in (Decision.START, Decision.RELOAD):
                    if not explicit and started_here is None and time.monotonic() < m.retry_at:
                        raise self._backoff_error(m)
                    started_here = self._start_load(m, wanted, decision)  # raises before any change
                    self._models[name] = m
                    if explicit:
                        m.preferred = requested
                    if pin is not None:
                        m.pinned = pin
                    wait_for: anyio.Event = started_here.done
                    load = started_here
                elif decision is Decision.WAIT_LOAD:
                    assert m.load is not None
                    load = m.load
                    joined = load
                    wait_for = load.done
                else:  # WAIT_STOP
                    load = None
                    wait_for = m.changed
            remaining = deadline - time.monotonic()
            with anyio.move_on_after(max(remaining, 0)) as waited:
                await wait_for.wait()
            if waited.cancelled_caught:
                raise WaitTimeout(f"gave up waiting for {name!r} after "
                                  f"{self.config.load_wait_timeout:g} s (it is still {m.state})",
                                  model=name)
            if load is None:
                continue
            if load.error is not None:
                if isinstance(load.error, LemonError):
                    raise load.error
                raise LoadError(f"load of {name!r} failed: {load.error!r}", model=name)
            if explicit:
                m.failures, m.retry_at = 0, 0.0  # the user asked and it worked
                if m.process is load.process:  # a joiner's pin and options apply too
                    m.preferred = requested
                    if pin is not None:
                        m.pinned = pin
            if explicit and not _acquire and load.options == wanted and load.process is not None:
                # the load we started or joined did what we asked: report it, even if a
                # later caller has already changed the model again (no ping-pong)
                return LoadResult(name, load.action, wanted.backend, load.process.pid,
                                  load.process.url, wanted, time.monotonic() - began,
                                  load.seconds, joined=load is not started_here,
                                  previous_options=load.previous)

    def _start_load(self, m: _Model, options: ResolvedOptions, decision: Decision) -> _Load:
        """Under the lock: pick evictions, admit memory, mark states, launch the load task."""
        assert self._tg is not None
        self._backend(options.backend).command()  # a missing program fails here, changing nothing
        slot_victims = self._slot_victims(m)
        # Make before break: ready models that the slot limit evicts keep serving until the
        # new backend is healthy (so a load that fails changes nothing), as long as memory
        # admits both. Otherwise they are stopped first.
        deferred = [v for v in slot_victims if self._models[v].state is ModelState.READY]
        victims = [v for v in slot_victims if v not in deferred]
        try:
            extra = self._admit_memory(m, options, victims)
        except NotEnoughMemory:
            extra = ["(needs the deferred ones)"]
        if extra:
            victims = slot_victims + self._admit_memory(m, options, slot_victims)
        reloading = decision is Decision.RELOAD
        load = _Load(options, "reloaded" if reloading else "loaded",
                     m.options if reloading else None)
        # all effects below happen together, with no await: nobody sees a half-made plan
        evicted = [(self._models[v], self._begin_eviction(self._models[v],
                                                          f"evicted to make room for {m.name}"))
                   for v in victims]
        old_process = m.process if reloading else None
        m.load, m.options = load, options
        m.last_error = None
        self._set_state(m, ModelState.LOADING,
                        f"reload: {load.previous.describe_diff(options)}" if load.previous else "")
        self._tg.start_soon(self._run_load, m, load, old_process, evicted)
        return load

    def _slot_victims(self, m: _Model) -> list[str]:
        """The models the slot limit of ``m``'s kind evicts to make room for ``m``."""
        kind = m.spec.kind
        holders = [self._slot_view(o) for o in self._models.values()
                   if o is not m and o.spec.kind == kind
                   and o.state in (ModelState.LOADING, ModelState.READY)]
        return choose_evictions(m.name, kind, holders, self.config.max_loaded.get(kind, 1))

    async def _wait_evicted(self, evicted: Sequence[tuple[_Model, _Load | None]]) -> None:
        for v, cancelled_load in evicted:
            if cancelled_load is not None:
                await cancelled_load.done.wait()
            while v.state is ModelState.STOPPING:
                await v.changed.wait()

    def _slot_view(self, m: _Model) -> SlotView:
        rss = 0
        if m.process is not None and m.process.returncode is None:
            try:
                rss = psutil.Process(m.process.pid).memory_info().rss
            except psutil.Error:
                pass
        return SlotView(m.name, m.state, m.pinned, m.last_used, rss)

    @staticmethod
    def memory_needed(spec: ModelSpec, options: ResolvedOptions) -> int:
        """Estimated bytes a backend needs: weights + f16 KV cache, plus 10% and 64 MiB."""
        info = spec.info
        return int((info.size + info.kv_cache_bytes(options.ctx_size)) * 1.1) + 64 * 2**20

    def _admit_memory(self, m: _Model, options: ResolvedOptions, victims: list[str]) -> list[str]:
        need = self.memory_needed(m.spec, options)
        views = {o.name: self._slot_view(o) for o in self._models.values()
                 if o.state in (ModelState.READY, ModelState.LOADING)}
        freed = sum(views[v].rss for v in victims if v in views)
        if m.name in views:  # a reload frees the old process
            freed += views[m.name].rss
        available = psutil.virtual_memory().available + freed
        if self.config.memory_limit is not None:
            in_use = sum(v.rss for n, v in views.items() if n not in victims and n != m.name)
            available = min(available, self.config.memory_limit - in_use)
        evictable = [v for n, v in views.items()
                     if n not in victims and n != m.name and not v.pinned
                     and v.state is ModelState.READY]
        return admit_memory(m.name, need, available, evictable)

    def _begin_eviction(self, v: _Model, reason: str) -> _Load | None:
        """Start evicting ``v``; returns the load it cancelled, if ``v`` was loading.

        The stop runs in the router's own task group, so that cancelling the load
        that asked for it can never leave ``v`` half-stopped.
        """
        assert self._tg is not None
        if v.state is ModelState.LOADING:
            assert v.load is not None
            v.load.cancel_reason = reason
            v.load.scope.cancel()
            return v.load
        self._set_state(v, ModelState.STOPPING, reason)
        self._tg.start_soon(self._finish_stop, v)
        return None

    async def _run_load(self, m: _Model, load: _Load, old: BackendProcess | None,
                        evicted: Sequence[tuple[_Model, _Load | None]]) -> None:
        """The load task: make room, (re)start, wait until healthy; never holds the lock."""
        process: BackendProcess | None = None
        try:
            with load.scope:
                await self._wait_evicted(evicted)  # their memory was counted as freed
                if old is not None:
                    await self._drain(m)
                    self._cancel_watcher(m)
                    began = time.monotonic()
                    await old.stop(self.config.stop_grace)
                    m.stop_seconds = time.monotonic() - began
                    m.process = None
                process = await self._spawn_healthy(m, load.options)
            if load.scope.cancel_called:  # even if the spawn finished just before the cancel
                raise LoadCancelled(f"load of {m.name!r} was cancelled: "
                                    f"{load.cancel_reason or 'cancelled'}", model=m.name)
        except BaseException as exc:
            # whatever runs for this model goes: the new process, a half-started one, and
            # the old one of a reload that was cancelled before it stopped it
            self._cancel_watcher(m)
            with anyio.CancelScope(shield=True):
                for leftover in {id(p): p for p in (process, m.process, old) if p is not None}.values():
                    if leftover.returncode is None:
                        await leftover.stop(0.5)
            m.process = None
            m.options = None
            m.load = None
            if isinstance(exc, LemonError):
                error: BaseException = exc
            elif not isinstance(exc, Exception):  # cancelled from outside (the router closing)
                error = LoadCancelled(f"load of {m.name!r} was cancelled: "
                                      f"{load.cancel_reason or 'the router is closing'}", model=m.name)
            else:
                log.exception("[%s] load failed unexpectedly", m.name)
                error = LoadError(f"load of {m.name!r} failed: {exc!r}", model=m.name)
            load.error = error
            if not isinstance(error, LoadCancelled):
                m.last_error = error if isinstance(error, LemonError) else None
                self._count_failure(m)
            self._set_state(m, ModelState.UNLOADED if isinstance(error, LoadCancelled)
                            else ModelState.FAILED, str(error).splitlines()[0])
            load.done.set()
            if not isinstance(exc, Exception):
                raise
            return
        assert process is not None  # the scope was not cancelled, so the spawn finished
        m.process, m.load = process, None
        m.load_seconds = load.seconds = time.monotonic() - process.started_at
        load.process = process
        m.touch()
        self._set_state(m, ModelState.READY, f"pid {process.pid}, {m.load_seconds:.2f} s")
        self._start_watcher(m, process)
        try:  # now enforce the slot limit (the deferred evictions), then report
            try:
                late = [(self._models[v], self._begin_eviction(self._models[v],
                                                               f"evicted to make room for {m.name}"))
                        for v in self._slot_victims(m)]
            except SlotsFull:  # pinned meanwhile: keep them; the limit is exceeded until an unload
                late = []
            with anyio.move_on_after(self.config.drain_timeout + self.config.stop_grace + 10):
                await self._wait_evicted(late)
        finally:
            load.done.set()

    async def _spawn_healthy(self, m: _Model, options: ResolvedOptions) -> BackendProcess:
        backend = self._backend(options.backend)
        for attempt in range(self.config.port_retries + 1):
            port = free_port()
            argv = backend.argv(m.spec.path, options, port)
            process = BackendProcess.spawn(m.name, argv, port, log_lines=self.config.log_lines,
                                           request_timeout=self.config.request_timeout)
            self.spawn_count += 1
            m.process = process
            try:
                await process.wait_healthy(backend.health_path, self.config.start_timeout)
                return process
            except BackendExited:
                if attempt < self.config.port_retries and \
                        process.log_mentions(*backend.port_in_use_markers):
                    log.warning("[%s] port %d was taken; retrying on another", m.name, port)
                    continue
                raise
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await process.stop(0.5)
                raise
        raise AssertionError("unreachable")

    # ----------------------------------------------------------------- watching

    def _start_watcher(self, m: _Model, process: BackendProcess) -> None:
        assert self._tg is not None
        scope = anyio.CancelScope()
        m.watcher = scope
        self._tg.start_soon(self._watch, m, process, scope)

    def _cancel_watcher(self, m: _Model) -> None:
        if m.watcher is not None:
            m.watcher.cancel()
            m.watcher = None

    async def _watch(self, m: _Model, process: BackendProcess, scope: anyio.CancelScope) -> None:
        """Mark the model crashed the moment its process exits on its own."""
        with scope:
            code = await process.wait_exit()
            if m.process is process and m.state is ModelState.READY:
                m.last_error = BackendExited(m.name, code, "after it was ready", process.log_tail())
                m.dead_log = tuple(process.log_tail(50))
                m.watcher = None
                self._count_failure(m)
                self._set_state(m, ModelState.CRASHED, m.last_error.message)
                m.process = None
                await process.stop(0)  # clears its client, the rest of its group, its pid record

    def _count_failure(self, m: _Model) -> None:
        m.failures += 1
        m.retry_at = time.monotonic() + restart_backoff(m.failures)

    def _backoff_error(self, m: _Model) -> LoadError:
        wait = m.retry_at - time.monotonic()
        last = m.last_error.message if m.last_error else "unknown error"
        return LoadError(f"{m.name!r} failed {m.failures} time(s) in a row (last: {last}); not "
                         f"restarting it for another {wait:.1f} s (an explicit load retries at once)",
                         model=m.name, log_tail=m.last_error.log_tail if m.last_error else ())

    # ----------------------------------------------------------------- unloading

    async def _drain(self, m: _Model) -> None:
        """Wait, bounded by ``drain_timeout``, until no request is in flight on ``m``."""
        with anyio.move_on_after(self.config.drain_timeout):
            while m.busy:
                await m.idle.wait()

    async def _finish_stop(self, m: _Model) -> None:
        """Stop a model already marked STOPPING; ends in UNLOADED."""
        await self._drain(m)
        self._cancel_watcher(m)
        process = m.process
        if process is not None:
            began = time.monotonic()
            await process.stop(self.config.stop_grace)
            m.stop_seconds = time.monotonic() - began
            m.dead_log = tuple(process.log_tail(50))
        m.process, m.options = None, None
        self._set_state(m, ModelState.UNLOADED, f"pid {process.pid} stopped" if process else "")

    async def unload(self, model: str, *, reason: str = "unloaded",
                     _closing: bool = False) -> UnloadResult:
        """Stop ``model``'s backend (waiting, bounded, for requests in flight).

        A load in flight is cancelled: its half-started process is killed and its
        waiters get :class:`LoadCancelled`.

        :raises ModelNotLoaded: nothing is loaded or loading under that name.
        """
        began = time.monotonic()
        if self._closed and not _closing:
            raise RouterClosed()
        name = model
        if name not in self._models:
            try:
                name = (await self._spec(model)).name
            except LemonError:
                raise ModelNotLoaded(model) from None
        load: _Load | None = None
        while True:
            async with self._lock:
                m = self._models.get(name)
                if m is None or m.state in (ModelState.UNLOADED, ModelState.FAILED):
                    raise ModelNotLoaded(model)
                pid = m.process.pid if m.process else None
                if m.state is ModelState.CRASHED:
                    self._set_state(m, ModelState.UNLOADED, reason)
                    return UnloadResult(name, None, time.monotonic() - began)
                if m.state is ModelState.LOADING:
                    assert m.load is not None
                    load = m.load
                    load.cancel_reason = f"{reason} while loading"
                    load.scope.cancel()
                    break
                if m.state is ModelState.STOPPING:
                    wait_for = m.changed
                else:
                    self._set_state(m, ModelState.STOPPING, reason)
                    break
            await wait_for.wait()  # someone else is stopping it: wait, then look again
        if load is not None:
            with anyio.CancelScope(shield=True):
                await load.done.wait()
            return UnloadResult(name, pid, time.monotonic() - began, cancelled_load=True)
        with anyio.CancelScope(shield=True):
            await self._finish_stop(m)
        return UnloadResult(name, pid, time.monotonic() - began)

    async def _unload_all(self, reason: str) -> list[UnloadResult]:
        results: list[UnloadResult] = []
        closing = self._closed

        async def one(name: str) -> None:
            try:
                results.append(await self.unload(name, reason=reason, _closing=closing))
            except ModelNotLoaded:
                pass

        # while closing, ensure_loaded refuses new loads, so this converges; repeat in case
        # a load was starting while the first pass ran
        for _ in range(3 if closing else 1):
            async with anyio.create_task_group() as tg:
                for name in list(self._models):
                    tg.start_soon(one, name)
            if not any(m.state in (ModelState.LOADING, ModelState.READY, ModelState.STOPPING)
                       for m in self._models.values()):
                break
        return results

    async def unload_all(self) -> list[UnloadResult]:
        """Unload every model; returns what was unloaded."""
        if self._closed:
            raise RouterClosed()
        return await self._unload_all("unloaded")

    # ----------------------------------------------------------------- introspection

    async def plan(self, model: str, options: LoadOptions | None = None) -> Plan:
        """What an explicit load with ``options`` would do, from the same decision function."""
        spec = await self._spec(model)
        wanted = self.resolve(spec, options or LoadOptions())
        m = self._models.get(spec.name)
        state = m.state if m else ModelState.UNLOADED
        current = m.options if m and state is ModelState.READY else None
        decision = decide(state, current, wanted, explicit=True)
        action: Literal["noop", "load", "reload", "wait"] = {
            Decision.USE: "noop", Decision.START: "load", Decision.RELOAD: "reload",
            Decision.WAIT_LOAD: "wait", Decision.WAIT_STOP: "wait"}[decision]  # type: ignore[assignment]
        last_load = m.load_seconds if m is not None else None
        last_stop = m.stop_seconds if m is not None else None
        return Plan(spec.name, action, wanted, current, current.diff(wanted) if current else {},
                    last_load, last_stop if action == "reload" else None)

    def status(self) -> list[ModelStatus]:
        """A snapshot of every model the router knows, loaded or not."""
        out = []
        for m in self._models.values():
            view = self._slot_view(m)
            proc = m.process
            out.append(ModelStatus(
                m.name, m.spec.kind, m.state, m.options.backend if m.options else None,
                proc.pid if proc else None, proc.url if proc else None, m.options,
                view.rss if proc else None, m.pinned, m.load_seconds, m.last_used_wall, m.busy,
                m.last_error.render() if m.last_error else None,
                tuple(proc.log_tail(20)) if proc else m.dead_log[-20:],
                time.time() - (time.monotonic() - m.state_since)))
        return out

    def log_tail(self, model: str, n: int = 50) -> list[str]:
        """The last ``n`` lines of the model's backend log (of its last process if stopped).

        :raises ModelNotLoaded: the router has never run this model.
        """
        m = self._models.get(model)
        if m is None:
            raise ModelNotLoaded(model)
        if m.process is not None:
            return m.process.log_tail(n)
        if m.last_error is not None and m.last_error.log_tail:
            return list(m.last_error.log_tail)[-n:]
        return list(m.dead_log)[-n:]

    def try_noop(self, model: str, options: LoadOptions) -> LoadResult | None:
        """The no-op fast path, run synchronously on the loop thread.

        A synchronous call on the loop cannot interleave with any task, so when
        the lock is free this is the same decision ``ensure_loaded`` would make.
        Returns ``None`` whenever the answer is not a plain no-op.
        """
        m = self._models.get(model)
        if m is None or m.state is not ModelState.READY or self._lock.locked() or self._closed:
            return None
        began = time.monotonic()
        wanted = self.resolve(m.spec, options)
        if decide(m.state, m.options, wanted, explicit=True) is not Decision.USE:
            return None
        assert m.process is not None and m.options is not None
        m.touch()
        m.preferred = options
        return LoadResult(m.name, "noop", m.options.backend, m.process.pid, m.process.url,
                          m.options, time.monotonic() - began, m.load_seconds or 0.0)

    # ----------------------------------------------------------------- inference

    async def acquire(self, model: str, load_options: LoadOptions | None = None, *,
                      lease: Lease | None = None) -> LoadResult:
        """Auto-load ``model`` (never reloading it) and count a request in flight on it.

        Every ``acquire`` must be paired with :meth:`release` (or, when a ``lease`` is
        given, with :meth:`end_lease`); the model is not evicted or unloaded (beyond
        ``drain_timeout``) while requests are in flight.
        """
        load = await self.ensure_loaded(model, load_options, explicit=False, _acquire=True)
        if lease is not None:
            if lease.ended:  # the caller gave up (Stop) while this was still loading
                self.release(load.model, served=False)
                raise LoadCancelled(f"the request for {model!r} was abandoned", model=model)
            lease.model = load.model
        return load

    def end_lease(self, lease: Lease, *, served: bool) -> None:
        """End a request admitted with ``acquire(..., lease=lease)``; safe at any point.

        Called from another thread's ``finally``: if the acquire has not finished yet,
        it releases the model itself as soon as it does, so no request stays counted.
        """
        if lease.ended:
            return
        lease.ended = True
        if lease.model is not None:
            self.release(lease.model, served=served)

    def release(self, model: str, *, served: bool) -> None:
        """End a request started with :meth:`acquire` (``served``: it completed normally)."""
        m = self._models[model]
        if served:
            m.failures, m.retry_at = 0, 0.0  # it served a request: not crash-looping
        m.busy -= 1
        if m.busy == 0:
            self._notify(m, "idle")
            m.idle.set()
            m.idle = anyio.Event()

    async def request_failed(self, model: str, pid: int, exc: BaseException) -> LemonError:
        """The error for a request whose connection failed: did the backend die, or not?"""
        m = self._models.get(model)
        process = m.process if m is not None and m.process is not None and m.process.pid == pid \
            else None
        if process is None and m is not None and m.state is ModelState.CRASHED:
            return BackendExited(model, getattr(m.last_error, "returncode", None),
                                 "while serving a request", m.dead_log[-20:])
        if process is not None:
            with anyio.move_on_after(1.0):
                await process.wait_exit()
            if process.returncode is not None:
                return BackendExited(model, process.returncode, "while serving a request",
                                     process.log_tail())
        return InferenceError(f"request to the backend of {model!r} failed: {exc!r}", model=model)

    async def _post(self, model: str, path: str, payload: dict[str, Any],
                    load_options: LoadOptions | None) -> AsyncGenerator[tuple[LoadResult, Any], None]:
        """Acquire, POST, and yield ``(load, event)`` per SSE event (or once, the whole body)."""
        check_payload(payload)
        load = await self.acquire(model, load_options)
        process = self._models[load.model].process
        assert process is not None
        served = False
        try:
            async with process.client.stream("POST", process.url + path, json=payload) as response:
                if response.status_code != 200:
                    raise http_error(load.model, response.status_code,
                                     (await response.aread()).decode("utf-8", "replace"))
                if not payload.get("stream"):
                    body = json.loads(await response.aread())
                    served = True
                    yield load, body
                    return
                async for line in response.aiter_lines():
                    event = parse_sse_line(line)
                    if event is DONE:
                        served = True
                        return
                    if event is not None:
                        yield load, event
                raise httpx.RemoteProtocolError("the stream ended without [DONE]")
        except httpx.HTTPError as exc:
            raise await self.request_failed(load.model, load.pid, exc) from exc
        finally:
            self.release(load.model, served=served)

    async def stream(self, model: str, path: str, payload: dict[str, Any], *,
                     load_options: LoadOptions | None = None) -> AsyncIterator[Chunk]:
        """Stream a completion (``/v1/completions``) or chat (``/v1/chat/completions``)."""
        acc = Accumulator("chat" in path)
        # aclosing: a consumer that stops early must still end the request (and release it)
        async with contextlib.aclosing(self._post(model, path, {**payload, "stream": True},
                                                  load_options)) as events:
            async for _load, event in events:
                text = acc.add_event(event)
                if text:
                    yield Chunk(text, acc.finish)

    async def request(self, model: str, path: str, payload: dict[str, Any], *,
                      load_options: LoadOptions | None = None) -> Completion:
        """One non-streamed completion or chat request."""
        acc = Accumulator("chat" in path)
        async with contextlib.aclosing(self._post(model, path, {**payload, "stream": False},
                                                  load_options)) as events:
            async for load, body in events:
                acc.add_body(body)
                return Completion(load.model, acc.text, acc.finish, acc.usage, acc.last, load)
        raise InferenceError(f"backend of {model!r} sent no response", model=model)
