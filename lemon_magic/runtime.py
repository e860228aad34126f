"""The router's thread: one anyio event loop per router, and the blocking facade over it.

Scripts, magics and widgets call :class:`Router` from any thread. Each call
starts a task on the router's loop and waits for it; a ``KeyboardInterrupt``
(the notebook's Stop button) cancels that task, so nothing keeps running on
behalf of a call the user abandoned. Loads themselves run in the router's own
task group: an interrupted ``load`` stops waiting, while the load goes on and
leaves the model ready (unload it if you do not want it).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import threading
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import httpx
from anyio.from_thread import start_blocking_portal

from lemon_magic._inference import DONE, Accumulator, check_payload, http_error, parse_sse_line
from lemon_magic.errors import InvalidOptions, RouterClosed
from lemon_magic.options import LoadOptions
from lemon_magic.router import (
    AsyncRouter,
    Completion,
    Lease,
    LoadResult,
    ModelStatus,
    Plan,
    RouterConfig,
    RouterEvent,
    UnloadResult,
)

__all__ = ("Router", "Stream", "get_router")


class _StreamState:
    """What a streaming request has learnt so far (shared by a Stream and its generator)."""

    def __init__(self) -> None:
        self.load: LoadResult | None = None
        self.completion: Completion | None = None


class _Http:
    """A request's HTTP client, and whether the request was served to the end."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.served = False

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.client.post(url, **kwargs)

    def stream(self, method: str, url: str, **kwargs: Any) -> contextlib.AbstractContextManager[
            httpx.Response]:
        return self.client.stream(method, url, **kwargs)

T = TypeVar("T")
_LOADED = object()


def _sampling(max_tokens: int | None, temperature: float | None, top_p: float | None,
              seed: int | None, stop: str | Sequence[str] | None,
              extra: Mapping[str, Any]) -> dict[str, Any]:
    for key in extra:
        if key in {"ctx_size", "threads", "backend", "extra_args", "chat_template"}:
            raise InvalidOptions(f"{key!r} is a load option; pass it as "
                                 "load_options=LoadOptions(...) or use load()")
    payload = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
               "seed": seed, "stop": [stop] if isinstance(stop, str) else stop, **extra}
    return {k: v for k, v in payload.items() if v is not None}


class Stream(Iterator[str]):
    """Text chunks of a streamed response, as they arrive; ``completion`` is set at the end.

    Creating it (``complete(..., stream=True)``) returns once the backend has
    started answering: a failed auto-load raises there.

    The HTTP stream is read in the iterating thread itself, straight from the
    backend's socket (the router's loop only admits and releases the request),
    so tokens reach the caller as fast as a plain httpx client would get them.
    ``close()`` (or leaving a ``with`` block, or a ``KeyboardInterrupt``)
    closes the request; the backend stops generating.
    """

    def __init__(self, router: Router, model: str, path: str, payload: dict[str, Any],
                 load_options: LoadOptions | None) -> None:
        # the generator gets a plain holder, not this object: no reference cycle, so a
        # Stream dropped half-way is closed (and its request released) at once
        self._state = _StreamState()
        self._chunks = router._stream_chunks(self._state, model, path, payload, load_options)
        self.wait_loaded()  # load errors raise here, and the request runs from now on

    @property
    def load(self) -> LoadResult | None:
        """How the model was loaded for this request (set when the backend starts answering)."""
        return self._state.load

    @property
    def completion(self) -> Completion | None:
        """The whole response, once the stream is exhausted."""
        return self._state.completion

    def __del__(self) -> None:
        chunks = getattr(self, "_chunks", None)
        if chunks is not None:
            chunks.close()

    def wait_loaded(self) -> LoadResult | None:
        """Block until the backend starts answering; returns how the model was loaded."""
        if self.load is None:
            try:
                first = next(self._chunks)
            except StopIteration:
                return self.load
            if first is not _LOADED:  # pragma: no cover - the generator yields _LOADED first
                raise AssertionError("stream protocol")
        return self.load

    def __next__(self) -> str:
        while True:
            item = next(self._chunks)
            if item is not _LOADED:
                assert isinstance(item, str)
                return item

    def close(self) -> None:
        """Close the request if it is still running (idempotent)."""
        self._chunks.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def text(self) -> str:
        """The whole text; consumes what is left of the stream."""
        for _ in self:
            pass
        return self.completion.text if self.completion else ""


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

    # ---------------------------------------------------------------- the API

    def load(self, model: str, *, pin: bool | None = None, **options: Any) -> LoadResult:
        """Ensure ``model`` is loaded with these options (``ctx_size``, ``threads``, ``backend``,
        ``extra_args``, ``chat_template``): ``"noop"``, ``"loaded"`` or ``"reloaded"``.

        :raises LemonError: bad model or options (nothing changes), or the load failed.
        """
        requested = LoadOptions.from_kwargs(options)
        if pin is None:
            fast = self._call_sync(self._async.try_noop, model, requested)
            if fast is not None:
                return fast
        return self._call(self._async.ensure_loaded, model, requested, explicit=True, pin=pin)

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

    def status(self) -> list[ModelStatus]:
        """Every model the router knows: state, backend, pid, url, options, RSS, timings, errors."""
        return self._call_sync(self._async.status)

    def model_names(self) -> list[str]:
        """Built-in and registered model names, sorted."""
        return self._async.registry.names()

    def backend_names(self) -> list[str]:
        """The backend kinds this router knows, in order of preference."""
        return list(self._async.backends)

    def logs(self, model: str, n: int = 50) -> list[str]:
        """The last ``n`` lines of ``model``'s backend log."""
        return self._call_sync(self._async.log_tail, model, n)

    def configure(self, **changes: Any) -> RouterConfig:
        """Change ``RouterConfig`` fields (timeouts, slots, memory limit) of the running router."""
        return self._call_sync(self._async.configure, changes)

    def subscribe(self, callback: Callable[[RouterEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on every state change (on the router's thread)."""
        return self._call_sync(self._async.subscribe, callback)

    @property
    def spawn_count(self) -> int:
        """How many backend processes this router has started."""
        return self._async.spawn_count

    def complete(self, model: str, prompt: str, *, max_tokens: int | None = 256,
                 temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None, stop: str | Sequence[str] | None = None,
                 stream: bool = False, load_options: LoadOptions | None = None,
                 **extra: Any) -> Completion | Stream:
        """Complete ``prompt`` (``/v1/completions``); auto-loads ``model``, never reloads it.

        With ``stream=True`` returns a :class:`Stream` of text chunks.
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
        acc = Accumulator("chat" in path)
        with self._lease(model, load_options) as (load, http):
            response = http.post(load.url + path, json={**payload, "stream": False})
            if response.status_code != 200:
                raise http_error(load.model, response.status_code, response.text)
            acc.add_body(response.json())
            http.served = True
        return Completion(load.model, acc.text, acc.finish, acc.usage, acc.last, load)

    def _stream_chunks(self, stream: _StreamState, model: str, path: str, payload: dict[str, Any],
                       load_options: LoadOptions | None) -> Generator[object, None, None]:
        acc = Accumulator("chat" in path)
        with self._lease(model, load_options) as (load, http), \
                http.stream("POST", load.url + path, json=payload) as response:
            if response.status_code != 200:
                raise http_error(load.model, response.status_code,
                                 response.read().decode("utf-8", "replace"))
            stream.load = load
            yield _LOADED
            for line in response.iter_lines():
                event = parse_sse_line(line)
                if event is DONE:
                    http.served = True
                    stream.completion = Completion(load.model, acc.text, acc.finish, acc.usage,
                                                   acc.last, load)
                    return
                if event is not None:
                    assert isinstance(event, dict)
                    text = acc.add_event(event)
                    if text:
                        yield text
            raise httpx.RemoteProtocolError("the stream ended without [DONE]")

    @contextlib.contextmanager
    def _lease(self, model: str,
               load_options: LoadOptions | None) -> Iterator[tuple[LoadResult, _Http]]:
        """Admit a request on the router's loop, run it in this thread, release it there.

        The lease is ended in ``finally`` even if Stop lands between the loop admitting
        the request and this thread learning of it: nothing stays counted in flight.
        """
        lease = Lease()
        http = _Http(self._http_client())
        try:
            load = self._call(self._async.acquire, model, load_options, lease=lease)
            try:
                yield load, http
            except httpx.HTTPError as exc:
                raise self._call(self._async.request_failed, load.model, load.pid, exc) from exc
        finally:
            if not self.closed:  # a closed router has stopped its backends already
                self._call_sync(self._async.end_lease, lease, served=http.served)

    def _http_client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(
                timeout=httpx.Timeout(self._async.config.request_timeout, connect=5.0),
                trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))
        return self._http

    # ---------------------------------------------------------------- shutdown

    def close(self) -> None:
        """Stop every backend and the loop thread; idempotent."""
        with self._close_lock:
            if self._finalizer.alive:
                self._finalizer()
            if self._http is not None:
                self._http.close()

    @staticmethod
    def _shutdown(stack: contextlib.ExitStack, router: AsyncRouter) -> None:
        try:
            stack.close()  # runs AsyncRouter.__aexit__ (unload all), then stops the portal
        except BaseException:
            router.kill_all_now()
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
