"""The router's thread: one anyio event loop per router, and the blocking facade over it.

Scripts, magics and widgets call :class:`Router` from any thread. Each call
starts a task on the router's loop and waits for it; a ``KeyboardInterrupt``
(the notebook's Stop button) cancels that task and is re-raised as
:class:`~lemon_magic.errors.Interrupted`, which says what goes on. Loads
themselves run in the router's own task group: an interrupted ``load`` stops
waiting, while the load goes on and leaves the model ready (unload it if you
do not want it).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from anyio.from_thread import start_blocking_portal

from lemon_magic import _requests
from lemon_magic._hub import PullProgress
from lemon_magic._inference import check_payload
from lemon_magic._pulling import PROGRESS_EVERY, canonical_name
from lemon_magic._records import (
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
from lemon_magic._sampling import check_sampling
from lemon_magic._stream import Stream

if TYPE_CHECKING:
    from lemon_magic.server.serve import ServingInfo
from lemon_magic.errors import Interrupted, InvalidOptions, RouterClosed
from lemon_magic.options import LoadOptions
from lemon_magic.registry import ModelSpec
from lemon_magic.router import AsyncRouter

__all__ = ("Router", "Stream", "get_router")


T = TypeVar("T")


def _sampling(max_tokens: int | None, temperature: float | None, top_p: float | None,
              seed: int | None, stop: str | Sequence[str] | None,
              extra: Mapping[str, Any]) -> dict[str, Any]:
    for key in extra:
        if key in {"ctx_size", "threads", "backend", "extra_args", "chat_template"}:
            raise InvalidOptions(f"{key!r} is a load option; pass it as "
                                 "load_options=LoadOptions(...) or use load()")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens <= 0):
        raise InvalidOptions(f"max_tokens must be a positive integer, got {max_tokens!r}")
    check_sampling(temperature, top_p)
    payload = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
               "seed": seed, "stop": [stop] if isinstance(stop, str) else stop, **extra}
    return {k: v for k, v in payload.items() if v is not None}


class Router:
    """The blocking router used by scripts, magics and widgets.

    It owns an :class:`~lemon_magic.router.AsyncRouter` running on a daemon
    thread's event loop; every method is safe to call from any thread except
    that loop's own.
    """

    def __init__(self, config: RouterConfig | None = None, *,
                 impl: type[AsyncRouter] = AsyncRouter, **kwargs: Any) -> None:
        self._stack = contextlib.ExitStack()
        self._portal = self._stack.enter_context(start_blocking_portal("asyncio"))
        self._async = impl(config, **kwargs)
        try:
            self._stack.enter_context(self._portal.wrap_async_context_manager(self._async))
        except BaseException:
            self._stack.close()
            raise
        self._loop: asyncio.AbstractEventLoop = self._portal.call(asyncio.get_running_loop)
        self._loop_thread: int = self._portal.call(threading.get_ident)
        self._close_lock = threading.Lock()
        self._http_lock = threading.Lock()
        self._http: httpx.Client | None = None
        self._finalizer = weakref.finalize(self, Router._shutdown, self._stack, self._async)
        _ALL.add(self)

    # ---------------------------------------------------------------- plumbing

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return not self._finalizer.alive

    @property
    def async_router(self) -> AsyncRouter:
        """The router on the loop (for code that runs on that loop)."""
        return self._async

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        if self.closed:
            raise RouterClosed()
        future = self._portal.start_task_soon(functools.partial(fn, *args, **kwargs))
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    def _call_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a plain function on the loop thread (no task): the cheapest way in."""
        if self.closed:
            raise RouterClosed()
        if threading.get_ident() == self._loop_thread:  # e.g. a finalizer run by the loop's GC
            return fn(*args, **kwargs)
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return future.result()

    def _http_client(self) -> httpx.Client:
        """The client that streamed requests use from callers' threads (made once, under a lock;
        each request sets its own timeouts from the config of the moment)."""
        with self._http_lock:
            if self._http is None:
                self._http = httpx.Client(trust_env=False,
                                          limits=httpx.Limits(max_keepalive_connections=0))
            return self._http

    # ---------------------------------------------------------------- loading

    def load(self, model: str, *, pin: bool | None = None,
             progress: Callable[[PullProgress], None] | None = None, **options: Any) -> LoadResult:
        """Ensure ``model`` is loaded with these options (``ctx_size``, ``threads``, ``backend``,
        ``extra_args``, ``chat_template``): ``"noop"``, ``"loaded"`` or ``"reloaded"``. A model
        that is not downloaded yet is pulled first (``progress`` as for :meth:`pull`).

        :raises LemonError: bad model or options (nothing changes), or the load failed.
        """
        requested = LoadOptions.from_kwargs(options)
        if pin is None and model not in self._async._remotes:  # a remote's no-op asks the remote
            fast = self._call_sync(self._async._try_noop, model, requested)
            if fast is not None:
                return fast
        if progress is None:
            return self._call(self._async.ensure_loaded, model, requested, explicit=True, pin=pin)
        if self.closed:
            raise RouterClosed()
        future = self._portal.start_task_soon(functools.partial(
            self._async.ensure_loaded, model, requested, explicit=True, pin=pin))
        return self._wait(future, model, progress, phase="load")

    def load_soon(self, model: str, *, pin: bool | None = None,
                  **options: Any) -> concurrent.futures.Future[LoadResult]:
        """Start :meth:`load` without waiting: a future of its result (for UIs)."""
        requested = LoadOptions.from_kwargs(options)
        if self.closed:
            raise RouterClosed()
        return self._portal.start_task_soon(functools.partial(
            self._async.ensure_loaded, model, requested, explicit=True, pin=pin))

    def unload_soon(self, model: str) -> concurrent.futures.Future[UnloadResult]:
        """Start :meth:`unload` without waiting: a future of its result (for UIs)."""
        if self.closed:
            raise RouterClosed()
        return self._portal.start_task_soon(self._async.unload, model)

    def plan(self, model: str, **options: Any) -> Plan:
        """What ``load(model, **options)`` would do now, with the option diff."""
        return self._call(self._async.plan, model, LoadOptions.from_kwargs(options))

    def unload(self, model: str) -> UnloadResult:
        """Stop ``model``'s backend (cancelling a load in flight).

        :raises ModelNotLoaded: it is not loaded.
        """
        return self._call(self._async.unload, model)

    def unload_all(self) -> list[UnloadResult]:
        """Unload every model."""
        return self._call(self._async.unload_all)

    # ---------------------------------------------------------------- models and state

    def register(self, name: str, path: str | os.PathLike[str], *, kind: str = "llm",
                 description: str = "", **defaults: Any) -> ModelSpec:
        """Give a GGUF file a name with default load options (kept across sessions).

        :raises LemonError: a bad name, kind, option or file (nothing changes).
        """
        return self._call(self._async.register, name, path, kind=kind, description=description,
                          **defaults)

    def register_remote(self, name: str, url: str, remote_model: str, *, api: str = "lemonade",
                        api_key_env: str | None = None, kind: str = "llm", description: str = "",
                        **defaults: Any) -> ModelSpec:
        """Give a model served by another server a name (kept across sessions): ``api`` is
        ``"lemonade"`` (Lemonade Server or ``lemon-magic serve``: loads are declarative, against
        the remote's own ``/health``) or ``"openai"`` (any OpenAI-compatible server: no load
        control). The API key is read from ``$api_key_env`` at each call, never stored.

        :raises LemonError: a bad name, URL, api or default option (nothing changes).
        """
        return self._call(self._async.register_remote, name, url, remote_model, api=api,
                          api_key_env=api_key_env, kind=kind, description=description, **defaults)

    def unregister(self, name: str) -> UnloadResult | None:
        """Forget a registration (unloading the model first if it is loaded here; a remote
        model stays loaded on its server)."""
        return self._call(self._async.unregister, name)

    def models(self, *, all: bool = False) -> list[ModelEntry]:
        """Every model loadable by name, with where its file is and its state (``all``: and the
        catalogue's models not pulled yet, with their download sizes)."""
        return self._call_sync(functools.partial(self._async.models, all=all))

    def pull(self, model: str, *, name: str | None = None,
             progress: Callable[[PullProgress], None] | None = None) -> PullResult:
        """Pull a catalogue model (``Qwen3-0.6B-GGUF``) or a checkpoint (``org/repo:VARIANT``)
        from the Hugging Face Hub and register it as ``name`` (default: ``model``). ``progress``
        is called from this thread while bytes arrive; Stop cancels the download (unless
        another caller waits for it) and registers nothing.

        :raises PullError: the pull failed (one line: offline, unknown repo, no such variant, …).
        """
        if self.closed:
            raise RouterClosed()
        future = self._portal.start_task_soon(functools.partial(self._async.pull, model, name=name))
        return self._wait(future, name or model, progress, phase="pull")

    def delete(self, model: str) -> DeleteResult:
        """Unload a registered model if it is loaded, forget it, and remove its pulled files."""
        return self._call(self._async.delete, model)

    def _wait(self, future: concurrent.futures.Future[T], model: str,
              progress: Callable[[PullProgress], None] | None, phase: str) -> T:
        """``future``'s result, reporting ``model``'s download to ``progress`` meanwhile (from
        this thread); Stop cancels the call and says what goes on."""
        last = None
        flight = canonical_name(self._async.registry, model)  # what the pull is known by
        try:
            while True:
                try:
                    return future.result(timeout=None if progress is None else PROGRESS_EVERY)
                except concurrent.futures.TimeoutError:
                    report = self._call_sync(self._async._pulls.progress, flight)
                    if report is not None and report is not last:
                        last = report
                        progress(report)  # type: ignore[misc]
        except KeyboardInterrupt:
            downloading = self._call_sync(self._async._pulls.download, flight) is not None
            future.cancel()
            raise Interrupted(model, "pull" if downloading else phase) from None
        except BaseException:  # a progress callback failed (or worse): stop waiting, let go
            future.cancel()
            raise

    def model_names(self) -> list[str]:
        """Built-in and registered model names, sorted."""
        return self._async.registry.names()

    def backend_names(self) -> list[str]:
        """The backend kinds this router knows, in order of preference."""
        return list(self._async.backends)

    def status(self) -> list[ModelStatus]:
        """Every model the router knows: state, backend, pid, url, options, RSS, timings, errors."""
        return self._call_sync(self._async.status)

    def logs(self, model: str, n: int = 50) -> list[str]:
        """The last ``n`` lines of ``model``'s backend log."""
        return self._call_sync(self._async.log_tail, model, n)

    def configure(self, **changes: Any) -> RouterConfig:
        """Change ``RouterConfig`` fields (timeouts, slots, memory limit, idle timeout) of the
        running router; they apply to the next decision, wait or request."""
        return self._call_sync(self._async.configure, changes)

    @property
    def config(self) -> RouterConfig:
        """The settings in force."""
        return self._async.config

    def subscribe(self, callback: Callable[[RouterEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on every state change (on the router's thread).

        Returns a function that unsubscribes; it is safe from any thread and idempotent.
        """
        self._call_sync(self._async.subscribe, callback)

        def unsubscribe() -> None:
            if not self.closed:
                self._call_sync(self._async.unsubscribe, callback)

        return unsubscribe

    @property
    def spawn_count(self) -> int:
        """How many backend processes this router has started."""
        return self._async.spawn_count

    # ---------------------------------------------------------------- serving over HTTP

    def serve(self, host: str = "127.0.0.1", port: int = 13305, *, api_key: str | None = None,
              allowed_origins: Sequence[str] = (), allowed_hosts: Sequence[str] = (),
              allow_any_args: bool = False) -> str:
        """Serve the Lemonade- and OpenAI-compatible API from this router's loop (``port`` 0:
        any free port); returns the base URL (OpenAI's ``base_url``). See
        :meth:`AsyncRouter.serve` for the security options.

        :raises InvalidOptions: a host that is not loopback, with no API key.
        :raises OSError: the address cannot be bound.
        """
        return self._call(self._async.serve, host, port, api_key=api_key,
                          allowed_origins=allowed_origins, allowed_hosts=allowed_hosts,
                          allow_any_args=allow_any_args)

    def stop_serving(self) -> bool:
        """Close the HTTP socket; the router and its backends stay as they are. Returns whether
        a server was running; idempotent."""
        if self.closed:
            return False
        return self._call(self._async.stop_serving)

    @property
    def base_url(self) -> str | None:
        """The served API's base URL (``None`` when not serving)."""
        info = self._async.serving
        return info.base_url if info is not None else None

    @property
    def serving(self) -> ServingInfo | None:
        """Where the API is served and how many requests it answered (``None``: not serving)."""
        return self._async.serving

    # ---------------------------------------------------------------- inference

    def complete(self, model: str, prompt: str, *, max_tokens: int | None = 256,
                 temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 stream: bool = False, load_options: LoadOptions | None = None,
                 **extra: Any) -> Completion | Stream:
        """Complete ``prompt`` (``/v1/completions``); auto-loads ``model``, never reloads it.

        With ``stream=True`` returns a :class:`Stream` of text chunks (started on first use).

        :raises Interrupted: Stop while waiting (``phase`` says for what).
        """
        payload = {"prompt": prompt, **_sampling(max_tokens, temperature, top_p, seed, stop, extra)}
        return self._infer(model, "/v1/completions", payload, stream, load_options)

    def chat(self, model: str, messages: Sequence[Mapping[str, Any]], *,
             max_tokens: int | None = 256, temperature: float | None = None,
             top_p: float | None = None, seed: int | None = None,
             stop: str | Sequence[str] | None = None, stream: bool = False,
             load_options: LoadOptions | None = None, **extra: Any) -> Completion | Stream:
        """Chat (``/v1/chat/completions``); auto-loads ``model``, never reloads it."""
        payload = {"messages": list(messages),
                   **_sampling(max_tokens, temperature, top_p, seed, stop, extra)}
        return self._infer(model, "/v1/chat/completions", payload, stream, load_options)

    def _infer(self, model: str, path: str, payload: dict[str, Any], stream: bool,
               load_options: LoadOptions | None) -> Completion | Stream:
        if self.closed:
            raise RouterClosed()
        check_payload(payload)
        if stream:
            return Stream(self, model, path, {**payload, "stream": True}, load_options)
        lease = _requests.Lease()  # read here only to tell Stop's phase
        try:
            return self._call(self._async.request, model, path, payload,
                              load_options=load_options, lease=lease)
        except KeyboardInterrupt:
            raise Interrupted(model, "load" if lease.load is None else "request") from None

    # ---------------------------------------------------------------- shutdown

    def close(self) -> None:
        """Stop every backend and the loop thread; idempotent."""
        with self._close_lock:
            if self._finalizer.alive:
                self._finalizer()
            with self._http_lock:
                if self._http is not None:
                    self._http.close()

    @staticmethod
    def _shutdown(stack: contextlib.ExitStack, router: AsyncRouter) -> None:
        try:
            stack.close()  # runs AsyncRouter.__aexit__ (unload all), then stops the portal
        except BaseException:
            router._kill_all_now()
            raise

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        states = ", ".join(f"{s.name}={s.state}" for s in self.status()) if not self.closed else "closed"
        return f"<lemon_magic.Router {states or 'empty'}>"


_ALL: weakref.WeakSet[Router] = weakref.WeakSet()
_default: Router | None = None
_default_lock = threading.Lock()


def get_router() -> Router:
    """The process's router, started on first use (a new one if the last was closed)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = Router()
        return _default


@atexit.register
def _close_all() -> None:
    for router in list(_ALL):
        try:
            router.close()
        except BaseException:
            pass
