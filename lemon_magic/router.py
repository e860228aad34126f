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
the one request path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Literal

import anyio
import anyio.abc
import anyio.to_thread
import psutil

from lemon_magic import _requests
from lemon_magic._inference import check_payload
from lemon_magic._policy import Decision, ModelState, SlotView, admit_memory, choose_evictions, decide
from lemon_magic._records import (
    Chunk,
    Completion,
    LoadResult,
    ModelEntry,
    ModelStatus,
    Plan,
    RouterConfig,
    RouterEvent,
    UnloadResult,
)
from lemon_magic._resolve import Resolver
from lemon_magic._slot import Load, Slot
from lemon_magic.backends import Backend, default_backends
from lemon_magic.backends._pidfile import reap_orphans
from lemon_magic.backends._process import BackendProcess
from lemon_magic.errors import (
    InvalidOptions,
    LemonError,
    LoadCancelled,
    LoadError,
    ModelNotFound,
    ModelNotLoaded,
    NotEnoughMemory,
    RouterClosed,
    SlotsFull,
    WaitTimeout,
)
from lemon_magic.options import LoadOptions, ResolvedOptions
from lemon_magic.registry import ModelSpec, Registry

__all__ = ("AsyncRouter", "Chunk", "Completion", "LoadResult", "ModelEntry", "ModelStatus", "Plan",
           "RouterConfig", "RouterEvent", "UnloadResult")

log = logging.getLogger("lemon_magic.router")
_S = ModelState
_HOLDING = (_S.LOADING, _S.READY, _S.STOPPING)


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
        self._lock = anyio.Lock()
        self._subscribers: list[Callable[[RouterEvent], None]] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._closed = False
        self._settings_changed = anyio.Event()
        self.spawn_count = 0  # processes started by this router (tests and benchmarks read it)

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
        """Last resort for exit paths, from any thread: SIGKILL every backend without the loop."""
        for slot in list(self._models.values()):
            process = slot.process
            if process is not None:
                process.kill_now()

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
        return Slot(name, spec, self._emit, on_spawn=self._count_spawn)

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
        spec = await anyio.to_thread.run_sync(lambda: self.registry.register(
            name, path, kind=kind, description=description, **defaults))
        self._resolver.invalidate()
        return spec

    async def unregister(self, name: str) -> UnloadResult | None:
        """Forget a registration; a model loaded under that name is unloaded first.

        :raises ModelNotFound: ``name`` is not a user registration.
        """
        if name not in self.registry.names() or self.registry.lookup(name).source != "user":
            raise ModelNotFound(name, [n for n in self.registry.names()])
        try:
            unloaded: UnloadResult | None = await self.unload(name, reason="unregistered")
        except ModelNotLoaded:
            unloaded = None
        await anyio.to_thread.run_sync(self.registry.unregister, name)
        self._resolver.invalidate()
        slot = self._models.get(name)
        if slot is not None and slot.state in (_S.UNLOADED, _S.FAILED, _S.CRASHED):
            del self._models[name]
        return unloaded

    def models(self) -> list[ModelEntry]:
        """Every model loadable by name (built-in, registered, and paths the router has run),
        with its state; reads the registrations file, never a model file."""
        out = []
        for name in self.registry.names():
            state = self._models[name].state if name in self._models else _S.UNLOADED
            try:
                spec = self.registry.lookup(name)
            except LemonError as exc:
                out.append(ModelEntry(name, "user", "?", str(self.registry.path), False, state,
                                      problem=exc.message))
                continue
            out.append(ModelEntry(name, spec.source, spec.kind, str(spec.path), spec.path.is_file(),
                                  state, spec.description))
        known = {e.name for e in out}
        out += [ModelEntry(s.name, s.spec.source, s.spec.kind, str(s.spec.path),
                           s.spec.path.is_file(), s.state) for s in self._models.values()
                if s.name not in known]
        return out

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
        joined: Load | None = None
        started_here: Load | None = None
        deadline = began + self.config.load_wait_timeout
        while True:
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
                    if _acquire:  # counted under the lock, with the decision: no eviction between
                        m.admit()
                    done = joined or started_here
                    return LoadResult(
                        name, done.action if done else "noop", m.options.backend, m.process.pid,
                        m.process.url, m.options, time.monotonic() - began, m.load_seconds or 0.0,
                        joined=joined is not None and started_here is None,
                        options_differ={} if explicit else m.options.diff(wanted),
                        previous_options=done.previous if done else None)
                if decision in (Decision.START, Decision.RELOAD):
                    if not explicit and started_here is None and time.monotonic() < m.retry_at:
                        raise m.backoff_error()
                    started_here = self._start_load(m, spec, wanted, decision)  # raises first
                    self._models[name] = m
                    self._apply_caller(m, requested, pin, explicit)
                    load: Load | None = started_here
                    wait_for = started_here.done
                elif decision is Decision.WAIT_LOAD:
                    assert m.load is not None
                    load = joined = m.load
                    wait_for = load.done
                else:  # WAIT_STOP
                    load = None
                    wait_for = m.changed
            with anyio.move_on_after(max(deadline - time.monotonic(), 0)) as waited:
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
                    self._apply_caller(m, requested, pin, explicit)
            if explicit and not _acquire and load.options == wanted and load.process is not None:
                # the load we started or joined did what we asked: report it, even if a
                # later caller has already changed the model again (no ping-pong)
                return LoadResult(name, load.action, wanted.backend, load.process.pid,
                                  load.process.url, wanted, time.monotonic() - began,
                                  load.seconds, joined=load is not started_here,
                                  previous_options=load.previous)

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
            extra = self._admit_memory(m, spec, options, victims)
        except NotEnoughMemory:
            extra = ["(needs the deferred ones)"]
        if extra:
            victims = slot_victims + self._admit_memory(m, spec, options, slot_victims)
        reloading = decision is Decision.RELOAD
        load = Load(options, "reloaded" if reloading else "loaded", m.options if reloading else None)
        # all effects below happen together, with no await: nobody sees a half-made plan
        evicted = [(self._models[v], self._begin_eviction(self._models[v],
                                                          f"evicted to make room for {m.name}"))
                   for v in victims]
        m.begin_load(spec, load, f"reload: {load.previous.describe_diff(options)}"
                     if load.previous else "")
        self._tg.start_soon(self._run_load, m, load, evicted)
        return load

    def _slot_victims(self, m: Slot, kind: str) -> list[str]:
        """The models the slot limit of ``kind`` evicts to make room for ``m``."""
        holders = [self._slot_view(o) for o in self._models.values()
                   if o is not m and o.spec.kind == kind and o.state in (_S.LOADING, _S.READY)]
        return choose_evictions(m.name, kind, holders, self.config.max_loaded.get(kind, 1))

    async def _wait_evicted(self, evicted: Sequence[tuple[Slot, Load | None]]) -> None:
        for v, cancelled_load in evicted:
            if cancelled_load is not None:
                await cancelled_load.done.wait()
            while v.state is _S.STOPPING:
                await v.changed.wait()

    def _slot_view(self, m: Slot) -> SlotView:
        """What eviction and memory admission see of ``m``; a loading model counts at least at
        its estimate (early in a load its RSS is near zero, #issue-8 item 6)."""
        rss = _rss(m.process)
        if m.state is _S.LOADING and m.options is not None:
            rss = max(rss, self.memory_needed(m.spec, m.options))
        return SlotView(m.name, m.state, m.pinned, m.last_used, rss)

    @staticmethod
    def memory_needed(spec: ModelSpec, options: ResolvedOptions) -> int:
        """Estimated bytes a backend needs: weights + f16 KV cache, plus 10% and 64 MiB."""
        info = spec.info
        return int((info.size + info.kv_cache_bytes(options.ctx_size)) * 1.1) + 64 * 2**20

    def _admit_memory(self, m: Slot, spec: ModelSpec, options: ResolvedOptions,
                      victims: list[str]) -> list[str]:
        need = self.memory_needed(spec, options)
        views = {o.name: self._slot_view(o) for o in self._models.values()
                 if o.state in (_S.READY, _S.LOADING)}
        freed = sum(views[v].rss for v in victims if v in views)
        if m.name in views:  # a reload frees the old process
            freed += views[m.name].rss
        available = psutil.virtual_memory().available + freed
        if self.config.memory_limit is not None:
            in_use = sum(v.rss for n, v in views.items() if n not in victims and n != m.name)
            available = min(available, self.config.memory_limit - in_use)
        evictable = [v for n, v in views.items()
                     if n not in victims and n != m.name and not v.pinned and v.state is _S.READY]
        return admit_memory(m.name, need, available, evictable)

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

    async def _run_load(self, m: Slot, load: Load, evicted: Sequence[tuple[Slot, Load | None]]) -> None:
        """The load task: make room, (re)start, wait until healthy; never holds the lock."""
        config = self.config
        try:
            with load.scope:
                await self._wait_evicted(evicted)  # their memory was counted as freed
                await m.stop(config.stop_grace, drain_timeout=config.drain_timeout)  # a reload's old
                await m.spawn_healthy(self._resolver.backend(load.options.backend), config)
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
            load.done.set()
            if not isinstance(exc, Exception):
                raise
            return
        assert m.process is not None  # the scope was not cancelled, so the spawn finished
        m.become_ready(m.process, load)
        self._watch(m)
        try:  # now enforce the slot limit (the deferred evictions), then report
            try:
                late = [(self._models[v], self._begin_eviction(self._models[v],
                                                               f"evicted to make room for {m.name}"))
                        for v in self._slot_victims(m, m.spec.kind)]
            except SlotsFull:  # pinned meanwhile: keep them; the limit is exceeded until an unload
                late = []
            with anyio.move_on_after(config.drain_timeout + config.stop_grace + 10):
                await self._wait_evicted(late)
        finally:
            load.done.set()

    # ----------------------------------------------------------------- watching a ready model

    def _watch(self, m: Slot) -> None:
        """Start the ready process's watchers: crash (pidfd) and idle timer."""
        assert self._tg is not None and m.process is not None
        crash, idle = anyio.CancelScope(), anyio.CancelScope()
        m.watchers += [crash, idle]
        self._tg.start_soon(self._watch_crash, m, m.process, crash)
        self._tg.start_soon(self._watch_idle, m, idle)

    async def _watch_crash(self, m: Slot, process: BackendProcess, scope: anyio.CancelScope) -> None:
        """Mark the model crashed the moment its process exits on its own."""
        with scope:
            code = await process.wait_exit()
            if m.process is process and m.state is _S.READY:
                await m.crashed(process, code)

    def _wake_idle_timers(self) -> None:
        self._settings_changed.set()
        self._settings_changed = anyio.Event()

    def _idle_deadline(self, m: Slot) -> float | None:
        """Monotonic time at which ``m`` is unloaded for idleness (``None``: not now)."""
        timeout = self.config.idle_timeout
        if timeout is None or m.pinned or m.busy or m.state is not _S.READY:
            return None
        return m.last_used + timeout

    async def _watch_idle(self, m: Slot, scope: anyio.CancelScope) -> None:
        """Unload ``m`` once it has had no request in flight for ``idle_timeout`` seconds.

        The final check and the stop decision are made under the router's lock, where
        requests are admitted too: a request arriving at the deadline either was
        counted first (no unload) or finds the model stopping and reloads it.
        """
        with scope:
            while m.state is _S.READY:
                woken = self._settings_changed
                if m.busy:
                    await m.idle.wait()
                    continue
                deadline = self._idle_deadline(m)
                if deadline is None or deadline > time.monotonic():
                    with anyio.move_on_after(max(0.0, deadline - time.monotonic())
                                             if deadline is not None else float("inf")):
                        await woken.wait()
                    continue
                async with self._lock:
                    deadline = self._idle_deadline(m)
                    if deadline is not None and deadline <= time.monotonic():
                        m.cancel_watchers()  # this task included: it ends here
                        self._begin_eviction(m, f"idle for {self.config.idle_timeout:g} s")
                        return

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
        began = time.monotonic()
        if self._closed and not _closing:
            raise RouterClosed()
        name = model
        if name not in self._models:
            try:
                name = (await self._spec(model)).name
            except LemonError:
                raise ModelNotLoaded(model) from None
        load: Load | None = None
        while True:
            async with self._lock:
                m = self._models.get(name)
                if m is None or m.state in (_S.UNLOADED, _S.FAILED):
                    raise ModelNotLoaded(model)
                pid = m.process.pid if m.process else None
                if m.state is _S.CRASHED:
                    m.forget(reason)
                    return UnloadResult(name, None, time.monotonic() - began)
                if m.state is _S.LOADING:
                    assert m.load is not None
                    load = m.load
                    load.cancel_reason = f"{reason} while loading"
                    load.scope.cancel()
                    break
                if m.state is _S.STOPPING:
                    wait_for = m.changed
                else:
                    m.begin_stop(reason)
                    break
            await wait_for.wait()  # someone else is stopping it: wait, then look again
        with anyio.CancelScope(shield=True):
            if load is not None:
                await load.done.wait()
            else:
                await self._finish_stop(m)
        return UnloadResult(name, pid, time.monotonic() - began, cancelled_load=load is not None)

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
            if not any(m.state in _HOLDING for m in self._models.values()):
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
        state = m.state if m else _S.UNLOADED
        current = m.options if m and state is _S.READY else None
        decision = decide(state, current, wanted, explicit=True)
        action: Literal["noop", "load", "reload", "wait"] = {
            Decision.USE: "noop", Decision.START: "load", Decision.RELOAD: "reload",
            Decision.WAIT_LOAD: "wait", Decision.WAIT_STOP: "wait"}[decision]  # type: ignore[assignment]
        last_load = m.load_seconds if m is not None else None
        last_stop = m.stop_seconds if m is not None else None
        return Plan(spec.name, action, wanted, current, current.diff(wanted) if current else {},
                    last_load, last_stop if action == "reload" else None, state)

    def status(self) -> list[ModelStatus]:
        """A snapshot of every model the router knows, loaded or not."""
        out = []
        now_wall, now = time.time(), time.monotonic()
        for m in self._models.values():
            proc = m.process
            idle_at = self._idle_deadline(m)
            out.append(ModelStatus(
                m.name, m.spec.kind, m.state, m.options.backend if m.options else None,
                proc.pid if proc else None, proc.url if proc else None, m.options,
                _rss(proc) if proc else None, m.pinned, m.load_seconds,
                m.last_used_wall, m.busy, m.last_error.render() if m.last_error else None,
                tuple(m.log_tail(20)), now_wall - (now - m.state_since),
                None if idle_at is None else now_wall + (idle_at - now)))
        return out

    def log_tail(self, model: str, n: int = 50) -> list[str]:
        """The last ``n`` lines of the model's backend log (of its last process if stopped).

        :raises ModelNotLoaded: the router has never run this model.
        """
        m = self._models.get(model)
        if m is None:
            raise ModelNotLoaded(model)
        return m.log_tail(n)

    def _try_noop(self, model: str, options: LoadOptions) -> LoadResult | None:
        """The no-op fast path; loop thread only (the facade calls it with call_soon_threadsafe).

        A synchronous call on the loop cannot interleave with any task, so when
        the lock is free this is the same decision ``ensure_loaded`` would make.
        Returns ``None`` whenever the answer is not a plain no-op.
        """
        m = self._models.get(model)
        if m is None or m.state is not _S.READY or self._lock.locked() or self._closed:
            return None
        began = time.monotonic()
        spec = self._resolver.cached_spec(model)
        if spec is None:
            return None
        wanted = self.resolve(spec, options)
        if decide(m.state, m.options, wanted, explicit=True) is not Decision.USE:
            return None
        assert m.process is not None and m.options is not None
        m.touch()
        m.preferred = options
        return LoadResult(m.name, "noop", m.options.backend, m.process.pid, m.process.url,
                          m.options, time.monotonic() - began, m.load_seconds or 0.0)

    # ----------------------------------------------------------------- requests

    async def _admit(self, model: str, load_options: LoadOptions | None,
                     lease: _requests.Lease) -> LoadResult:
        """Auto-load ``model`` (never reloading it) and count a request in flight on it; loop
        thread only. Pair it with :meth:`_end_lease` (see :class:`_requests.Lease`)."""
        load = await self.ensure_loaded(model, load_options, explicit=False, _acquire=True)
        m = self._models[load.model]
        lease.load, lease.process = load, m.process
        if lease.ended:  # the caller gave up (Stop) while this was still loading
            m.release(served=False)
            raise LoadCancelled(f"the request for {model!r} was abandoned", model=model)
        return load

    def _end_lease(self, lease: _requests.Lease) -> None:
        """End a request admitted with :meth:`_admit`; loop thread only, idempotent, safe
        before the admission finished (it then releases the model itself)."""
        if lease.ended:
            return
        lease.ended = True
        if lease.load is not None:
            self._models[lease.load.model].release(served=lease.served)

    async def request(self, model: str, path: str, payload: dict[str, Any], *,
                      load_options: LoadOptions | None = None,
                      lease: _requests.Lease | None = None) -> Completion:
        """One non-streamed completion (``/v1/completions``) or chat (``/v1/chat/completions``),
        bounded as a whole by ``request_timeout``."""
        check_payload(payload)
        lease = lease or _requests.Lease()
        try:
            load = await self._admit(model, load_options, lease)
            assert lease.process is not None
            reader = _requests.ResponseReader(load.model, path, stream=False)
            limit = self.config.request_timeout
            try:
                with anyio.fail_after(limit):
                    response = await lease.process.client.post(
                        lease.process.url + path, json={**payload, "stream": False},
                        timeout=_requests.timeouts(limit))
                    reader.check_status(response.status_code, response.content)
                    reader.feed_body(response.content)
            except _requests.TRANSLATED as exc:
                raise await _requests.failure(exc, lease, f"{limit:g} s (request_timeout)") from exc
            lease.served = True
            return reader.completion(load)
        finally:
            self._end_lease(lease)

    async def stream(self, model: str, path: str, payload: dict[str, Any], *,
                     load_options: LoadOptions | None = None) -> AsyncIterator[Chunk]:
        """Stream a completion or chat; each silence is bounded by ``stream_idle_timeout``."""
        check_payload(payload)
        lease = _requests.Lease()
        try:
            load = await self._admit(model, load_options, lease)
            assert lease.process is not None
            reader = _requests.ResponseReader(load.model, path, stream=True)
            limit = self.config.stream_idle_timeout
            try:
                async with lease.process.client.stream(
                        "POST", lease.process.url + path, json={**payload, "stream": True},
                        timeout=_requests.timeouts(limit)) as response:
                    if response.status_code != 200:
                        reader.check_status(response.status_code, await response.aread())
                    async for line in response.aiter_lines():
                        text = reader.feed_line(line)
                        if reader.done:
                            break
                        if text:
                            yield Chunk(text, reader.finish_reason)
                    reader.finish()
            except _requests.TRANSLATED as exc:
                raise await _requests.failure(exc, lease, f"{limit:g} s (stream_idle_timeout)") \
                    from exc
            lease.served = True
        finally:
            self._end_lease(lease)


def _rss(process: BackendProcess | None) -> int:
    """Resident memory of a live backend process, in bytes (0 if it is gone)."""
    if process is None or process.returncode is not None:
        return 0
    try:
        return int(psutil.Process(process.pid).memory_info().rss)
    except psutil.Error:
        return 0
