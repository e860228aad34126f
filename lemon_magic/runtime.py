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
import queue
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from lemon_magic.errors import LemonError, RouterClosed
from lemon_magic.options import LoadOptions
from lemon_magic.router import (
    AsyncRouter,
    Chunk,
    Completion,
    LoadResult,
    ModelStatus,
    Plan,
    RouterConfig,
    RouterEvent,
    UnloadResult,
)

__all__ = ("Router", "Stream", "get_router")

T = TypeVar("T")
_END = object()


def _sampling(max_tokens: int | None, temperature: float | None, top_p: float | None,
              seed: int | None, stop: str | Sequence[str] | None,
              extra: Mapping[str, Any]) -> dict[str, Any]:
    for key in extra:
        if key in {"ctx_size", "threads", "backend", "extra_args", "chat_template"}:
            raise LemonError(f"{key!r} is a load option; pass it as load_options=LoadOptions(...) "
                             "or use load()")
    payload = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
               "seed": seed, "stop": [stop] if isinstance(stop, str) else stop, **extra}
    return {k: v for k, v in payload.items() if v is not None}


class Stream(Iterator[str]):
    """Text chunks of a streamed response, as they arrive; ``completion`` is set at the end.

    Iterate it from one thread. ``close()`` (or leaving a ``with`` block, or a
    ``KeyboardInterrupt`` while waiting) cancels the request.
    """

    def __init__(self, portal: BlockingPortal, start: Callable[..., Any]) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pending: list[object] = []
        #: how the model was loaded for this request (set when the backend starts answering)
        self.load: LoadResult | None = None
        #: the whole response, once the stream is exhausted
        self.completion: Completion | None = None
        self._future = portal.start_task_soon(self._pump, start)

    async def _pump(self, start: Callable[..., Any]) -> None:
        try:
            async for chunk in start(on_load=self._queue.put, on_done=self._done):
                self._queue.put(chunk)
        except Exception as exc:
            self._queue.put(exc)
        finally:
            self._queue.put(_END)

    def _done(self, completion: Completion) -> None:
        self.completion = completion

    def _get(self) -> object:
        """The next queued item; waits in short slices so that Ctrl-C / Stop gets through."""
        if self._pending:
            return self._pending.pop(0)
        try:
            while True:
                try:
                    return self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
        except KeyboardInterrupt:
            self.close()
            raise

    def wait_loaded(self) -> LoadResult | None:
        """Block until the backend answers; ``None`` if the stream failed or ended first."""
        while self.load is None:
            item = self._get()
            if isinstance(item, LoadResult):
                self.load = item
                continue
            self._pending.append(item)
            if item is _END or isinstance(item, BaseException):
                break
        return self.load

    def __next__(self) -> str:
        while True:
            item = self._get()
            if isinstance(item, LoadResult):
                self.load = item
                continue
            if item is _END:
                self._pending.append(_END)  # stay exhausted
                raise StopIteration
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Chunk)
            return item.text

    def close(self) -> None:
        """Cancel the request if it is still running."""
        self._future.cancel()

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
        self._close_lock = threading.Lock()
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

    def _call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a plain function on the loop thread (no task): the cheapest way in."""
        if self.closed:
            raise RouterClosed()
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(*args))
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
        if stream:
            if self.closed:
                raise RouterClosed()
            return Stream(self._portal, functools.partial(self._async.stream, model, path, payload,
                                                          load_options=load_options))
        return self._call(self._async.request, model, path, payload, load_options=load_options)

    # ---------------------------------------------------------------- shutdown

    def close(self, timeout: float = 30.0) -> None:
        """Stop every backend and the loop thread; idempotent."""
        with self._close_lock:
            if self._finalizer.alive:
                self._finalizer()

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
