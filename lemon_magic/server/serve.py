"""Running the HTTP API on the router's own event loop, with uvicorn.

``uvicorn.Server(config).serve()`` runs as a task in the router's task group,
so HTTP callers, magics and the panel share one router, one load contract and
one set of backends. The socket is bound before the task starts (a port in
use fails the call at once) and handed to uvicorn; stopping asks uvicorn to
exit, waits (bounded) until the socket is closed, and leaves the router as it
was.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import uvicorn

from lemon_magic._tasks import Tasks
from lemon_magic.errors import RouterClosed
from lemon_magic.server._limits import Limits, protocol_class
from lemon_magic.server.app import App

if TYPE_CHECKING:
    from lemon_magic.router import AsyncRouter

__all__ = ("DEFAULT_PORT", "LIMITS", "Limits", "Serving", "ServingInfo", "serve_router", "start")

#: Lemonade's default port
DEFAULT_PORT = 13305
log = logging.getLogger("lemon_magic.server")
#: connections and request deadlines of every server started from now on (see ``_limits``)
LIMITS = Limits()


@dataclass(frozen=True)
class ServingInfo:
    """Where the router serves HTTP, and how much (a snapshot)."""

    host: str
    port: int
    #: the base URL of the API (also OpenAI's ``base_url``)
    base_url: str
    requests_served: int


class _Server(uvicorn.Server):
    """uvicorn's server, minus its signal handlers: whoever runs the router decides what a
    signal does (the CLI unloads every backend; a kernel keeps its own handlers)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _url_host(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


class Serving:
    """One running server: its socket, uvicorn, and the event that says it has ended."""

    def __init__(self, app: App, sock: socket.socket, host: str) -> None:
        self.app = app
        self.sock = sock
        self.host = host
        self.port: int = sock.getsockname()[1]
        self.stopped = anyio.Event()
        protocol, self._tally = protocol_class(LIMITS)
        config = uvicorn.Config(app.asgi, lifespan="off", log_config=None, access_log=False,
                                ws="none", timeout_graceful_shutdown=5, server_header=False,
                                http=protocol)
        self.server = _Server(config)

    @property
    def info(self) -> ServingInfo:
        base = f"http://{_url_host(self.host)}:{self.port}/api/v1"
        return ServingInfo(self.host, self.port, base, self.app.requests_served)

    async def run(self) -> None:
        """uvicorn's whole life; a failure ends the server, never the router's task group."""
        try:
            await self.server.serve(sockets=[self.sock])
        except Exception:
            log.exception("[server] the HTTP server on port %d failed", self.port)
        finally:
            self.sock.close()
            self._tally.close()
            self.stopped.set()
            log.info("[server] stopped serving on port %d", self.port)

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and wait until it has (bounded; then it is forced)."""
        self.server.should_exit = True
        with anyio.move_on_after(timeout):
            await self.stopped.wait()
            return
        self.server.force_exit = True
        with anyio.move_on_after(2.0):
            await self.stopped.wait()


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``port`` 0: any free port).

    :raises OSError: the address is in use or cannot be bound.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def start(app: App, host: str, port: int | socket.socket,
                tg: anyio.abc.TaskGroup | Tasks) -> Serving:
    """Bind ``host:port`` (or take ``port``, a socket already bound there) and serve ``app``
    from a task in ``tg``; returns once uvicorn accepts connections.

    :raises OSError: the address cannot be bound.
    """
    sock = port if isinstance(port, socket.socket) else _bind(host, port)
    serving = Serving(app, sock, host)
    app.guard.port = serving.port
    tg.start_soon(serving.run)
    while not serving.server.started and not serving.stopped.is_set():
        await anyio.sleep(0.005)
    if not serving.server.started:
        raise OSError(f"the HTTP server on {host}:{serving.port} did not start")
    log.info("[server] serving %s", serving.info.base_url)
    return serving


async def serve_router(router: AsyncRouter, host: str, port: int, *, api_key: str | None,
                       allowed_origins: Sequence[str], allowed_hosts: Sequence[str],
                       allow_any_args: bool) -> str:
    """Serve the API of ``router`` on ``host:port`` from the router's loop (``port`` 0: any
    free port); returns the base URL. Serving again moves the server: the new address is bound
    first, and the running server stops only once that succeeded (a failure leaves it serving).

    :param api_key: required from clients as ``Authorization: Bearer <key>``; binding a
        host that is not loopback requires one.
    :param allowed_origins: browser origins allowed besides the server's own.
    :param allowed_hosts: ``Host`` names allowed besides loopback and the bound address.
    :param allow_any_args: let HTTP clients pass backend flags that touch files, the
        network or run commands in ``llamacpp_args`` (refused by default).
    :raises InvalidOptions: a host that is not loopback, with no API key.
    :raises OSError: the address cannot be bound.
    """
    from lemon_magic import __version__
    from lemon_magic.server._guard import Security, check_binding
    from lemon_magic.server.app import create_app

    if router._closed:
        raise RouterClosed()
    assert router._tg is not None
    security = Security.of(api_key, allowed_origins, allowed_hosts, allow_any_args)
    check_binding(host, security)
    running = router._serving
    try:
        sock = _bind(host, port)
    except OSError:
        if running is None or running.port != port:
            raise  # the running server (if any) keeps serving
        await router.stop_serving()  # the same port: it has to let go of it first
        sock = _bind(host, port)
    try:
        app = create_app(router, version=__version__, security=security, bound_host=host)
        await router.stop_serving()
    except BaseException:
        sock.close()
        raise
    router._serving = await start(app, host, sock, router._tg)
    return router._serving.info.base_url
