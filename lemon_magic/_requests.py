"""The one request path: admission leases, the response reader, and the error boundary.

A request is admitted on the router's loop (auto-load + busy count, decided
under the router's lock), then its HTTP exchange runs where the caller is: on
the loop for the async API and for non-streamed facade calls, in the caller's
own thread for a streamed facade call (tokens go straight from the backend's
socket to the reader). Both faces share everything but the socket calls:

* :class:`Lease`: what was admitted, where it goes (:class:`Endpoint`: a local
  backend or a remote server), and whether it ended (ending is idempotent);
* :class:`ResponseReader`: status check, SSE parsing, ``[DONE]``, accumulation;
* :func:`translate`: the one place where httpx, JSON and timeout errors become
  :class:`~lemon_magic.errors.LemonError` (``MAPPINGS`` lists them).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from lemon_magic._inference import DONE, Accumulator, check_payload, http_error, parse_sse_line
from lemon_magic._records import Chunk, Completion, LoadResult
from lemon_magic._remote import RemoteSpec
from lemon_magic._remote_client import remote_error
from lemon_magic.backends._process import BackendProcess
from lemon_magic.errors import BackendCrashed, InferenceError, LemonError, LoadCancelled, RequestTimeout
from lemon_magic.options import LoadOptions

if TYPE_CHECKING:
    from lemon_magic._remote_slot import RemoteSlot
    from lemon_magic._slot import Slot
    from lemon_magic.router import AsyncRouter

__all__ = ("MAPPINGS", "TRANSLATED", "Endpoint", "Event", "Lease", "ResponseReader", "StreamCut", "admit",
           "end_lease", "events", "failure", "failure_blocking", "request", "stream", "timeouts", "translate")


class StreamCut(Exception):
    """A streamed response ended without ``[DONE]``."""


#: the exceptions of the HTTP exchange that become LemonErrors (anything else is a bug)
TRANSLATED: tuple[type[BaseException], ...] = (httpx.HTTPError, httpx.StreamError, ValueError,
                                               TimeoutError, OSError, StreamCut)

#: what each kind of failure becomes (checked in order; the backend having exited wins)
MAPPINGS: tuple[tuple[str, str], ...] = (
    ("the router stopped the backend (unload, eviction, reload)", "InferenceError (stopped)"),
    ("the backend process has exited", "BackendCrashed"),
    ("httpx.TimeoutException, TimeoutError (deadline or idle gap)", "RequestTimeout"),
    ("a non-200 answer", "InferenceError (HTTP status and the backend's message)"),
    ("ValueError (invalid JSON, bad UTF-8, not OpenAI's shape)", "InferenceError (not valid JSON)"),
    ("StreamCut (no [DONE])", "InferenceError (stream ended early)"),
    ("httpx.HTTPError, httpx.StreamError, OSError", "InferenceError (request failed)"),
)


@dataclass(frozen=True)
class Endpoint:
    """Where an admitted request goes: a local backend process, or a remote server."""

    client: httpx.AsyncClient
    #: the OpenAI base URL (``http://127.0.0.1:PORT/v1``, a remote's ``.../api/v1`` or ``.../v1``)
    base: str
    #: the ``model`` the request sends (a remote's own name; ``None``: as the caller gave it)
    model: str | None = None
    process: BackendProcess | None = None
    remote: RemoteSpec | None = None

    @classmethod
    def local(cls, process: BackendProcess) -> Endpoint:
        return cls(process.client, process.url + "/v1", process=process)

    @classmethod
    def of_remote(cls, r: RemoteSlot) -> Endpoint:
        return cls(r.client.http, r.remote.base_url, r.remote.remote_model, remote=r.remote)

    @property
    def headers(self) -> Mapping[str, str]:
        """A remote's ``Authorization`` (its key read from its variable now, never kept here),
        or a local backend's (the key only the router holds, issue 21)."""
        if self.remote is not None:
            return self.remote.headers()
        return self.process.headers if self.process is not None else {}

    def check_status(self, reader: ResponseReader, response: httpx.Response, body: bytes) -> None:
        """:raises LemonError: a non-200 answer (a remote's through the remote boundary: 401/403
        name the key's variable, and messages name the remote)."""
        if response.status_code == 200:
            return
        if self.remote is not None:
            error = httpx.HTTPStatusError("", request=response.request,
                                          response=httpx.Response(response.status_code, content=body))
            raise _remote_inference_error(error, self.remote, reader.model)
        reader.check_status(response.status_code, body)

    def url(self, path: str) -> str:
        """The URL of an OpenAI ``path`` (``/v1/chat/completions``) on this endpoint, or of one
        of llama-server's own routes (``/tokenize``): at a local backend's root, under a
        Lemonade-style remote's prefix, at the root of an OpenAI-style remote's ``/v1``."""
        if path.startswith("/v1/"):
            return self.base + path.removeprefix("/v1")
        if self.process is not None:
            return self.process.url + path
        if self.remote is not None and self.remote.api == "openai":
            return self.base.removesuffix("/").removesuffix("/v1") + path
        return self.base + path

    def body(self, payload: dict[str, Any]) -> dict[str, Any]:
        return payload if self.model is None else {**payload, "model": self.model}


@dataclass(eq=False)
class Lease:
    """A request admitted for a caller, possibly on another thread.

    Loop-thread protocol (``AsyncRouter._admit`` / ``AsyncRouter._end_lease``):
    ``_admit`` fills ``load`` and ``endpoint`` once the model is ready and the
    request counted; ``_end_lease`` releases it exactly once, and if it runs
    before ``_admit`` finishes (Stop landed in between), ``_admit`` releases the
    model itself. Other threads only read ``load`` (for messages).
    """

    load: LoadResult | None = None
    endpoint: Endpoint | None = None
    #: the slot the request was counted on (released there, even if the name is re-registered)
    slot: Slot | RemoteSlot | None = None
    ended: bool = False
    #: the request completed normally (the model is not crash-looping)
    served: bool = False


def timeouts(seconds: float) -> httpx.Timeout:
    """httpx's per-operation timeouts for one request: ``seconds`` for each read and write."""
    return httpx.Timeout(seconds, connect=5.0)


#: the events that end a stream of the Responses API (``/v1/responses``), which has no ``[DONE]``
_RESPONSE_ENDS = frozenset({"response.completed", "response.failed", "response.incomplete"})


class ResponseReader:
    """Reads one backend response, whole or streamed; knows nothing of sockets or threads."""

    def __init__(self, model: str, path: str, *, stream: bool) -> None:
        self.model = model
        self.stream = stream
        self.done = False
        self.last: dict[str, Any] | None = None
        self._acc = Accumulator("chat" in path)

    def check_status(self, status: int, body: bytes) -> None:
        """:raises InferenceError: a non-200 answer, with the backend's own message."""
        if status != 200:
            raise http_error(self.model, status, body.decode("utf-8", "replace"))

    def feed_body(self, body: bytes) -> None:
        """Take a whole (non-streamed) JSON response."""
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        self._acc.add_body(data)
        self.done = True

    def feed_line(self, line: str) -> str | None:
        """Take one line of an event stream; returns its text, if any (``done`` after
        ``[DONE]``; ``last`` is the event the line carried, ``None`` for other lines)."""
        self.last = None
        event = parse_sse_line(line)
        if event is DONE:
            self.done = True
            return None
        if isinstance(event, dict):
            self.last = event
            if event.get("type") in _RESPONSE_ENDS:  # the Responses API sends no [DONE]
                self.done = True
            return self._acc.add_event(event)
        return None

    def finish(self) -> None:
        """:raises StreamCut: the stream ended without ``[DONE]``."""
        if not self.done:
            raise StreamCut("the stream ended without [DONE]")

    @property
    def finish_reason(self) -> str | None:
        return self._acc.finish

    def completion(self, load: LoadResult) -> Completion:
        """The whole response, once read."""
        acc = self._acc
        return Completion(self.model, acc.text, acc.finish, acc.usage, acc.last, load)


def translate(exc: BaseException, model: str, *, returncode: int | None = None,
              log_tail: tuple[str, ...] = (), timeout: str = "",
              stopped_on_purpose: bool = False) -> LemonError:
    """The error boundary: what a failure of the HTTP exchange becomes (see ``MAPPINGS``).

    :param returncode: the backend's exit code if it has exited (it then explains the failure).
    :param timeout: which limit a timeout ran into, e.g. ``"120 s (stream_idle_timeout)"``.
    """
    if isinstance(exc, LemonError):
        return exc
    if stopped_on_purpose and not isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return InferenceError(f"the backend of {model!r} was stopped (unloaded, evicted or "
                              "reloaded) while serving the request, after drain_timeout",
                              model=model)
    if returncode is not None:
        return BackendCrashed(model, returncode, log_tail)
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        return RequestTimeout(f"backend of {model!r} gave no answer within {timeout or 'the limit'}",
                              model=model)
    if isinstance(exc, StreamCut):
        return InferenceError(f"backend of {model!r} ended its stream early (no [DONE])",
                              model=model)
    if isinstance(exc, ValueError):
        return InferenceError(f"backend of {model!r} sent an answer that is not valid JSON or "
                              f"not OpenAI's shape: {exc}", model=model)
    return InferenceError(f"request to the backend of {model!r} failed: "
                          f"{type(exc).__name__}: {exc or 'no detail'}", model=model)


def _may_mean_exit(exc: BaseException) -> bool:
    return isinstance(exc, (httpx.TransportError, StreamCut, OSError)) and \
        not isinstance(exc, (httpx.TimeoutException, TimeoutError))  # a deadline is not an exit


async def failure(exc: BaseException, lease: Lease, timeout: str = "") -> LemonError:
    """:func:`translate`, after waiting (≤ 1 s, on the loop) to see whether a broken
    connection means the backend died (a remote's failures: :func:`_remote_failure`)."""
    assert lease.load is not None and lease.endpoint is not None
    process = lease.endpoint.process
    if process is None:
        return _remote_failure(exc, lease, timeout)
    if _may_mean_exit(exc):
        with anyio.move_on_after(1.0):
            await process.wait_exit()
    return _translated(exc, lease, process, timeout)


def failure_blocking(exc: BaseException, lease: Lease, timeout: str = "") -> LemonError:
    """:func:`failure` for a caller's own thread."""
    assert lease.load is not None and lease.endpoint is not None
    process = lease.endpoint.process
    if process is None:
        return _remote_failure(exc, lease, timeout)
    if _may_mean_exit(exc):
        deadline = time.monotonic() + 1.0
        while process.returncode is None and time.monotonic() < deadline:
            time.sleep(0.01)
    return _translated(exc, lease, process, timeout)


def _translated(exc: BaseException, lease: Lease, process: BackendProcess, timeout: str) -> LemonError:
    assert lease.load is not None
    code = process.returncode
    tail = tuple(process.log_tail()) if code is not None else ()
    return translate(exc, lease.load.model, returncode=code, log_tail=tail, timeout=timeout,
                     stopped_on_purpose=process.stopped_on_purpose)


def _remote_failure(exc: BaseException, lease: Lease, timeout: str) -> LemonError:
    """A remote's transport failures go through the remote boundary (unreachable, TLS, cut
    mid-way); what is about the answer itself (no ``[DONE]``, not JSON) through :func:`translate`."""
    assert lease.load is not None and lease.endpoint is not None and lease.endpoint.remote
    remote = lease.endpoint.remote
    retired = getattr(lease.slot, "retired", None)
    if retired and not isinstance(exc, LemonError):  # we let it go, not the remote
        return InferenceError(f"the request to {lease.load.model!r} was ended here: the model was "
                              f"{retired} while it ran (after drain_timeout)", model=lease.load.model)
    if isinstance(exc, (StreamCut, ValueError)) and not isinstance(exc, httpx.HTTPError):
        return translate(exc, lease.load.model, timeout=timeout)
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)) and \
            not isinstance(exc, httpx.ConnectTimeout):
        return RequestTimeout(f"remote {remote.url} gave no answer for {lease.load.model!r} within "
                              f"{timeout or 'the limit'}", model=lease.load.model)
    return _remote_inference_error(exc, remote, lease.load.model)


def _remote_inference_error(exc: BaseException, remote: RemoteSpec, model: str) -> LemonError:
    """The remote boundary's error, named as our callers know the model (not the remote's name),
    and marked as the remote's (an HTTP server answers it with a 502)."""
    error = remote_error(exc, remote, during="inference")
    error.model = model
    error.remote = remote.url  # type: ignore[attr-defined]
    return error


async def admit(router: AsyncRouter, model: str, load_options: LoadOptions | None,
            lease: Lease) -> LoadResult:
    """Auto-load ``model`` (never reloading it) and count a request in flight on it, under
    the router's lock; loop thread only. Pair it with :func:`end_lease`."""
    load = await router.ensure_loaded(model, load_options, explicit=False, _acquire=True)
    if load.remote is not None:
        r = router._remotes[load.model]
        lease.load, lease.endpoint, lease.slot = load, Endpoint.of_remote(r), r
        m: Slot | RemoteSlot = r
    else:
        m = router._models[load.model]
        assert m.process is not None
        lease.load, lease.endpoint, lease.slot = load, Endpoint.local(m.process), m
    if lease.ended:  # the caller gave up (Stop) while this was still loading
        m.release(served=False)
        raise LoadCancelled(f"the request for {model!r} was abandoned", model=model)
    return load


def end_lease(router: AsyncRouter, lease: Lease) -> None:
    """End a request admitted with :func:`admit`; loop thread only, idempotent, safe before
    the admission finished (it then releases the model itself)."""
    if lease.ended:
        return
    lease.ended = True
    if lease.slot is not None:
        lease.slot.release(served=lease.served)


@contextlib.asynccontextmanager
async def _leased(router: AsyncRouter, model: str, load_options: LoadOptions | None,
                  lease: Lease, limit_name: str) -> AsyncIterator[tuple[LoadResult, Endpoint, float]]:
    """Admit a request, hand the exchange its backend and time limit, translate its failures
    at the boundary, and end the lease whatever happens (served only if the body completed)."""
    try:
        load = await admit(router, model, load_options, lease)
        assert lease.endpoint is not None
        limit = float(getattr(router.config, limit_name))
        try:
            yield load, lease.endpoint, limit
        except TRANSLATED as exc:
            raise await failure(exc, lease, f"{limit:g} s ({limit_name})") from exc
        lease.served = True
    finally:
        end_lease(router, lease)


async def request(router: AsyncRouter, model: str, path: str, payload: dict[str, Any],
                  load_options: LoadOptions | None, lease: Lease | None) -> Completion:
    """The async face of a non-streamed request (on the router's loop), bounded as a whole."""
    check_payload(payload)
    async with _leased(router, model, load_options, lease or Lease(),
                       "request_timeout") as (load, endpoint, limit):
        reader = ResponseReader(load.model, path, stream=False)
        with anyio.fail_after(limit):
            response = await endpoint.client.post(endpoint.url(path),
                                                  json=endpoint.body({**payload, "stream": False}),
                                                  headers=endpoint.headers, timeout=timeouts(limit))
            endpoint.check_status(reader, response, response.content)
            reader.feed_body(response.content)
    return reader.completion(load)


@dataclass(frozen=True)
class Event:
    """One streamed event as the backend sent it, with the text it adds."""

    data: dict[str, Any]
    text: str | None
    finish_reason: str | None


async def events(router: AsyncRouter, model: str, path: str, payload: dict[str, Any],
                 load_options: LoadOptions | None,
                 lease: Lease | None = None) -> AsyncGenerator[Event, None]:
    """The async face of a streamed request (on the router's loop): every event of the
    backend's stream, in order, until ``[DONE]`` (an HTTP server passes them through as they
    are; :func:`stream` keeps the text). ``lease`` (if given) shows what was admitted."""
    check_payload(payload)
    async with _leased(router, model, load_options, lease or Lease(),
                       "stream_idle_timeout") as (load, endpoint, limit):
        reader = ResponseReader(load.model, path, stream=True)
        async with endpoint.client.stream("POST", endpoint.url(path),
                                          json=endpoint.body({**payload, "stream": True}),
                                          headers=endpoint.headers,
                                          timeout=timeouts(limit)) as response:
            if response.status_code != 200:
                endpoint.check_status(reader, response, await response.aread())
            async for line in response.aiter_lines():
                text = reader.feed_line(line)
                if reader.last is not None:
                    yield Event(reader.last, text, reader.finish_reason)
                if reader.done:
                    break
            reader.finish()


async def stream(router: AsyncRouter, model: str, path: str, payload: dict[str, Any],
                 load_options: LoadOptions | None) -> AsyncIterator[Chunk]:
    """Streamed text chunks (the events that carry text)."""
    async with contextlib.aclosing(events(router, model, path, payload, load_options)) as evs:
        async for event in evs:
            if event.text:
                yield Chunk(event.text, event.finish_reason)
