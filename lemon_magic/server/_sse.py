"""Streamed completions over HTTP: the backend's events passed through as server-sent events.

:class:`EventStream` is the ASGI response of a ``stream: true`` request. The
response's own task drives the request's event generator from admission to
``[DONE]`` and writes each event as it comes (no hand-off between tasks per event):

* **Status first.** Nothing is sent until the first event, or a failure, comes:
  a failure before it (unknown option, load failure, the backend's own 400)
  keeps its HTTP status. Once the model is admitted and the backend is silent
  for :data:`PING_EVERY` seconds (a long prompt), the 200 header goes out and a
  ``: ping`` comment follows every :data:`PING_EVERY` seconds until the first
  token, as Lemonade does; a failure after that is one error event.
* **Bounded.** A client that stops reading blocks the response's writes; when
  one write is blocked longer than the router's ``stream_idle_timeout``, the
  request is cancelled, its lease ends and the connection is closed. A client
  that goes away is noticed at once (the ASGI ``http.disconnect``).
* Whatever ends the response, the event generator is closed in the task that
  drove it, so the lease ends and ``requests_in_flight`` goes back down.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Callable
from typing import Any

import anyio
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from lemon_magic._requests import Event, Lease
from lemon_magic.errors import LemonError

__all__ = ("PING_EVERY", "EventStream")

#: seconds of backend silence (after admission, before the first token) between two pings
PING_EVERY = 1.0
_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]
log = logging.getLogger("lemon_magic.server")


class _ClientGone(Exception):
    """The client went away or stopped reading: the response ends without a last word."""


class EventStream:
    """The ASGI response of one streamed request (see the module docstring)."""

    def __init__(self, events: AsyncGenerator[Event, None], lease: Lease, *, model: str,
                 send_timeout: Callable[[], float], error_response: Callable[[LemonError], JSONResponse],
                 on_event: Callable[[dict[str, Any]], None], on_end: Callable[[], None]) -> None:
        """
        :param model: the name the client used (every event's ``model``).
        :param send_timeout: the longest a write to the client may block, read per write.
        :param error_response: the one translation of router errors into HTTP answers.
        :param on_event: called with every event passed on (the last one carries usage).
        :param on_end: called once when the response ends, however it ends.
        """
        self.events = events
        self.lease = lease
        self.model = model
        self.send_timeout = send_timeout
        self.error_response = error_response
        self.on_event = on_event
        self.on_end = on_end
        #: the response's header went out (its status can no longer change)
        self.started = False
        #: the first event (or failure) came: no more pings
        self.seen_first = False
        self._ticker = anyio.CancelScope()
        self._sending = anyio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._tick, send, tg.cancel_scope)
                tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
                try:
                    await self._forward(send)
                except _ClientGone:
                    pass
                tg.cancel_scope.cancel()
        finally:
            self.on_end()

    async def _tick(self, send: Send, response: anyio.CancelScope) -> None:
        """A ping every ``PING_EVERY`` s while an admitted request waits for its first event;
        a client that does not take one is let go (the whole response is cancelled)."""
        with self._ticker:
            while True:
                await anyio.sleep(PING_EVERY)
                async with self._sending:  # never while the first event (or failure) is sent
                    if self.lease.load is not None and not self.seen_first:
                        try:
                            await self._write(send, b": ping\n\n")
                        except _ClientGone:
                            response.cancel()
                            return

    async def _first_seen(self) -> None:
        """No more pings: wait for one being sent, then stop the ticker."""
        if not self.seen_first:
            async with self._sending:
                self.seen_first = True
                self._ticker.cancel()

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return

    async def _forward(self, send: Send) -> None:
        """Drive the event generator in this task (from admission to ``[DONE]``) and pass each
        event on; the generator is closed here however this ends."""
        async with contextlib.aclosing(self.events):
            try:
                async for event in self.events:
                    await self._first_seen()
                    data = self._named(event.data)
                    self.on_event(data)
                    kind = data.get("type")  # the Responses API names each event
                    head = f"event: {kind}\n".encode() if isinstance(kind, str) else b""
                    line = json.dumps(data, separators=(",", ":")).encode()
                    await self._write(send, head + b"data: " + line + b"\n\n")
            except LemonError as exc:
                await self._first_seen()
                await self._fail(exc, send)
                return
        await self._first_seen()
        await self._write(send, b"data: [DONE]\n\n", more=False)

    def _named(self, data: dict[str, Any]) -> dict[str, Any]:
        """The event with ``model`` as the client named it (a Responses API event carries it
        in its ``response``, if anywhere)."""
        inner = data.get("response")
        if isinstance(inner, dict):
            return {**data, "response": {**inner, "model": self.model}} if "model" in inner else data
        return {**data, "model": self.model}

    async def _fail(self, exc: LemonError, send: Send) -> None:
        answer = self.error_response(exc)
        if not self.started:  # nothing sent yet: the error keeps its HTTP status
            await self._send(send, {"type": "http.response.start", "status": answer.status_code,
                                    "headers": answer.raw_headers})
            await self._send(send, {"type": "http.response.body", "body": answer.body})
            return
        await self._write(send, b"data: " + bytes(answer.body) + b"\n\n", more=False)

    async def _write(self, send: Send, data: bytes, *, more: bool = True) -> None:
        if not self.started:
            self.started = True
            await self._send(send, {"type": "http.response.start", "status": 200, "headers": _HEADERS})
        await self._send(send, {"type": "http.response.body", "body": data, "more_body": more})

    async def _send(self, send: Send, message: dict[str, Any]) -> None:
        """One write to the client, bounded (a client that never reads is let go)."""
        limit = self.send_timeout()
        try:
            with anyio.fail_after(limit):
                await send(message)
        except TimeoutError:
            log.warning("[server] a client stopped reading a stream of %r for %g s: "
                        "the request is cancelled", self.model, limit)
            raise _ClientGone from None
        except OSError:
            raise _ClientGone from None
