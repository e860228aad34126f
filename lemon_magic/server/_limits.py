"""Limits on connections and on how long a request may take to arrive: a thin layer over
uvicorn's HTTP protocol (issue 21).

uvicorn bounds neither: ``limit_concurrency`` answers 503 only once a request's
headers are complete, and ``timeout_keep_alive`` is reset by every byte, so a
client that trickles its headers holds a connection forever; a thousand of them
used up the process's files and kept every other client out. Here, on top of
uvicorn's own protocol class (httptools, else h11):

* **connections**: past ``max_connections`` open ones, a new connection is
  answered ``503`` with ``Retry-After`` and closed at once, before anything is
  parsed;
* **request deadline**: a request's line and headers must arrive within
  ``header_timeout`` seconds of the connection (or of the previous response on
  a kept-alive one), its body within ``body_timeout`` more; otherwise the
  connection is closed. Once a request has fully arrived the deadline is off,
  so a long answer (a stream) is never cut;
* **header bytes**: more than ``max_header_bytes`` before the headers end is a
  ``431`` and the connection is closed;
* **logging**: refusals are counted and logged at most once per
  ``log_interval`` seconds per kind, one line each, never one line per
  connection.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ("Limits", "protocol_class")

log = logging.getLogger("lemon_magic.server")


def _default_max_connections() -> int:
    """Half the process's file limit (the rest: backends, logs, the Hub), 64 to 1,024."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(64, min(1024, soft // 2))


@dataclass(frozen=True)
class Limits:
    """How many connections the server keeps open and how long a request may take to arrive."""

    #: seconds from a connection (or the previous response) to the end of a request's headers
    header_timeout: float = 10.0
    #: seconds from the end of the headers to the end of the body
    body_timeout: float = 60.0
    #: open connections at most; more are answered 503 and closed
    max_connections: int = field(default_factory=_default_max_connections)
    #: bytes of request line and headers at most (431 past it)
    max_header_bytes: int = 64 * 1024
    #: seconds between two log lines about refused or timed-out connections
    log_interval: float = 10.0


class _Tally:
    """Refusals counted by kind, logged at most once per interval (one line per kind)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.counts: Counter[str] = Counter()
        self._flush: asyncio.TimerHandle | None = None

    def note(self, kind: str) -> None:
        first = not self.counts and self._flush is None
        self.counts[kind] += 1
        if first:  # the first one is said at once; the rest in one line per interval
            self.flush()
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def _tick(self) -> None:
        self._flush = None
        if self.counts:
            self.flush()
            self._flush = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def flush(self) -> None:
        for kind, n in sorted(self.counts.items()):
            log.warning("[server] %s %d connection%s", kind, n, "" if n == 1 else "s")
        self.counts.clear()

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self.flush()


_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: 42\r\n\r\n"
            b'{"error": "too many connections; retry"}\r\n')
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
              b"Content-Length: 0\r\n\r\n")


class _Bounded:
    """The mixin over uvicorn's protocol class (see the module docstring). Reads uvicorn's
    ``connections``, ``cycle`` (``more_body``) and ``transport``; the deadline is a timer on
    the loop, re-armed at each step of a request and cancelled once it has arrived."""

    limits: Limits
    tally: _Tally
    # uvicorn's, set by its __init__ / connection_made
    connections: set[Any]
    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    _refused = False
    _timer: asyncio.TimerHandle | None = None
    _waiting_after: Any = None  # the cycle before the request being waited for
    _in_body: Any = None  # the cycle whose body is being waited for
    _draining: Any = None  # the cycle answered before its body was read, while the body ends
    _head_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        if len(self.connections) >= self.limits.max_connections:
            self._refused = True
            self.transport = transport
            transport.write(_REFUSED)
            transport.close()
            self.tally.note(f"refused (over {self.limits.max_connections} open)")
            return
        super().connection_made(transport)  # type: ignore[misc]
        self._wait_for_request()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        waiting = self.cycle is self._waiting_after
        if waiting:
            self._head_bytes += len(data)  # (with any body bytes that came along: checked below)
        super().data_received(data)  # type: ignore[misc]
        if waiting and self.cycle is self._waiting_after and \
                self._head_bytes > self.limits.max_header_bytes and not self.transport.is_closing():
            self._end(_TOO_LARGE, f"closed (headers over {self.limits.max_header_bytes} bytes)")
            return
        self._progress()

    def _progress(self) -> None:
        cycle = self.cycle
        if cycle is None or cycle is self._waiting_after or self.transport.is_closing():
            return  # still before the end of the headers
        if cycle.more_body:
            if self._in_body is not cycle:
                self._in_body = cycle
                self._arm(self.limits.body_timeout)
        elif self._timer is not None:
            self._disarm()  # the request has arrived: its answer may take as long as it takes

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        cycle = self.cycle
        if self.transport.is_closing() or (cycle is not None and not cycle.response_complete):
            return  # a pipelined request has arrived and runs: its answer is never cut
        if cycle is not None and cycle.more_body:
            self._draining = cycle  # answered before its body was read (401, 413): the rest
            return  # of the body is no header; the body deadline still holds
        self._wait_for_request()

    def on_message_complete(self) -> None:
        super().on_message_complete()  # type: ignore[misc]
        if self._draining is not None and self._draining is self.cycle:
            self._draining = None  # the early-answered body has ended: the next request's turn
            self._wait_for_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._refused:
            return
        super().connection_lost(exc)  # type: ignore[misc]

    def _wait_for_request(self) -> None:
        self._waiting_after = self.cycle
        self._head_bytes = 0
        self._arm(self.limits.header_timeout)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        phase = "body" if self.cycle is not self._waiting_after else "headers"
        timeout = self.limits.body_timeout if phase == "body" else self.limits.header_timeout
        self._end(b"", f"closed (request {phase} not received within {timeout:g} s)")

    def _end(self, answer: bytes, why: str) -> None:
        self._disarm()
        if answer:
            self.transport.write(answer)
        self.transport.close()
        self.tally.note(why)


def protocol_class(limits: Limits) -> tuple[type[asyncio.Protocol], _Tally]:
    """uvicorn's HTTP protocol class with :class:`Limits` on top (pass it as ``http=``), and
    the tally of refusals it logs (close it when the server stops)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:  # pragma: no cover  (httptools is a dependency)
        from uvicorn.protocols.http.h11_impl import H11Protocol as base  # type: ignore[assignment]
    tally = _Tally(limits.log_interval)
    cls = type("BoundedHTTPProtocol", (_Bounded, base), {"limits": limits, "tally": tally})
    return cls, tally
