"""A streamed completion for callers on any thread: started on first use, read straight from
the backend's socket in the iterating thread, closable from any thread."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx

from lemon_magic import _requests
from lemon_magic._records import Completion, LoadResult
from lemon_magic.errors import Interrupted
from lemon_magic.options import LoadOptions

if TYPE_CHECKING:
    from lemon_magic.runtime import Router

__all__ = ("Stream",)


class Stream(Iterator[str]):
    """Text chunks of a streamed response, as they arrive; ``completion`` is set at the end.

    Nothing starts until the first ``next()`` (or :meth:`wait_loaded`): a
    stream nobody iterates holds no model. The first ``next()`` auto-loads the
    model (a failed load raises there) and opens the request; the HTTP stream
    is then read in the iterating thread itself, straight from the backend's
    socket, so tokens reach the caller as fast as a plain httpx client would get
    them. ``close()`` (from any thread; or leaving a ``with`` block, or a
    ``KeyboardInterrupt``) ends the request at once; the backend stops generating.
    """

    def __init__(self, router: Router, model: str, path: str, payload: dict[str, Any],
                 load_options: LoadOptions | None) -> None:
        self._router, self._model, self._path = router, model, path
        self._payload, self._load_options = payload, load_options
        self._lock = threading.Lock()
        self._lease: _requests.Lease | None = None
        self._response: httpx.Response | None = None
        self._exit: contextlib.ExitStack | None = None
        self._lines: Iterator[str] | None = None
        self._reader: _requests.ResponseReader | None = None
        self._closed = False
        self._reading = False
        #: the whole response, once the stream is exhausted
        self.completion: Completion | None = None

    @property
    def load(self) -> LoadResult | None:
        """How the model was loaded for this request (``None`` until it starts)."""
        return self._lease.load if self._lease is not None else None

    def wait_loaded(self) -> LoadResult | None:
        """Start the request if needed and block until the backend answers; returns how the
        model was loaded (``None`` if the stream was closed first).

        :raises Interrupted: Stop while the model was loading (the load goes on).
        """
        self._open()
        return self.load

    def _open(self) -> None:
        with self._lock:
            if self._closed or self._lease is not None:
                return
            lease = self._lease = _requests.Lease()
        router = self._router
        try:
            load = router._call(_requests.admit, router._async, self._model, self._load_options,
                                lease)
            config = router._async.config
            self._exit = contextlib.ExitStack()
            self._reader = _requests.ResponseReader(load.model, self._path, stream=True)
            try:
                endpoint = lease.endpoint
                assert endpoint is not None
                self._response = self._exit.enter_context(router._http_client().stream(
                    "POST", endpoint.url(self._path), json=endpoint.body(self._payload),
                    headers=endpoint.headers, timeout=_requests.timeouts(config.stream_idle_timeout)))
                if self._response.status_code != 200:
                    endpoint.check_status(self._reader, self._response, self._response.read())
            except _requests.TRANSLATED as exc:
                raise self._failure(exc) from exc
            self._lines = self._response.iter_lines()
        except KeyboardInterrupt:
            self.close()
            raise Interrupted(self._model, "load" if lease.load is None else "request") from None
        except BaseException:
            if self._closed:  # closed from another thread while this one started it: just end
                self._close_response()
                return
            self.close()
            raise

    def _failure(self, exc: BaseException) -> BaseException:
        assert self._lease is not None
        limit = self._router._async.config.stream_idle_timeout
        return _requests.failure_blocking(exc, self._lease, f"{limit:g} s (stream_idle_timeout)")

    def __next__(self) -> str:
        self._open()
        with self._lock:
            if self._closed or self._lines is None:
                raise StopIteration
            self._reading = True
        reader = self._reader
        assert reader is not None and self._lease is not None
        try:
            for line in self._lines:
                text = reader.feed_line(line)
                if reader.done:
                    assert self._lease.load is not None
                    self.completion = reader.completion(self._lease.load)
                    self._lease.served = True
                    break
                if text:
                    if self._closed:  # closed from another thread during this read
                        raise StopIteration
                    return text
            else:
                reader.finish()
        except KeyboardInterrupt:
            self._reading = False
            self.close()
            raise Interrupted(self._model, "stream") from None
        except _requests.TRANSLATED as exc:
            if self._closed:  # closed from another thread while this one read
                raise StopIteration from None
            error = self._failure(exc)
            self._reading = False
            self.close()
            raise error from exc
        finally:
            with self._lock:
                self._reading = False
                closed_meanwhile = self._closed
            if closed_meanwhile:
                self._close_response()
        self.close()
        raise StopIteration

    def close(self) -> None:
        """End the request if it is still running; safe from any thread, idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            reading = self._reading
        if reading:  # wake the reading thread now: shut its socket down (it closes the rest)
            self._shutdown_socket()
        else:
            self._close_response()
        lease, router = self._lease, self._router
        if lease is not None and not router.closed:  # a closed router has stopped its backends
            router._call_sync(_requests.end_lease, router._async, lease)

    def _shutdown_socket(self) -> None:
        response = self._response
        stream = response.extensions.get("network_stream") if response is not None else None
        sock = stream.get_extra_info("socket") if stream is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _close_response(self) -> None:
        exit_stack, self._exit = self._exit, None
        if exit_stack is not None:
            with contextlib.suppress(Exception):
                exit_stack.close()

    def __del__(self) -> None:
        if getattr(self, "_lease", None) is not None:
            with contextlib.suppress(Exception):
                self.close()

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

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("open" if self._lease else "not started")
        return f"<lemon_magic.Stream {self._model} {state}>"
