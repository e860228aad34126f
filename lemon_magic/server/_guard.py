"""Who may talk to the server: Host header, browser origins, API key (an ASGI layer).

A kernel that serves HTTP can start processes, and a web page the user visits
can send requests to localhost. So, in this order:

1. **Host** (DNS rebinding): a request whose ``Host`` is not a loopback name,
   the bound address, or an allowed host is refused with 403. Binding a wildcard
   address (``0.0.0.0``, ``::``) turns this check off; the API key protects it.
2. **Origin** (cross-origin requests): a request with an ``Origin`` header that
   is neither the server's own origin nor explicitly allowed is refused with 403,
   as Lemonade does; so is a browser's request marked ``Sec-Fetch-Site:
   cross-site`` that carries no ``Origin`` (an ``<img>`` or a link on
   another site sends none, and a GET of ``pull/variants`` fetches from the Hub).
   ``OPTIONS`` preflights are answered 204. Every answer carries Lemonade's CORS
   headers and ``Vary: Origin``.
3. **API key**: when one is set, every request but ``OPTIONS`` needs
   ``Authorization: Bearer <key>`` (401 otherwise). Binding anything but a
   loopback address requires a key (:func:`check_binding`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lemon_magic.errors import InvalidOptions

__all__ = ("Guard", "Security", "check_binding", "is_loopback")

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_CORS = [(b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS"),
         (b"access-control-allow-headers", b"Content-Type, Authorization, X-Client-Session-Id"),
         (b"vary", b"Origin")]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host.lower() in _LOOPBACK_NAMES or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


@dataclass(frozen=True)
class Security:
    """What the server accepts (see the module docstring)."""

    #: required as ``Authorization: Bearer <key>`` when set
    api_key: str | None = None
    #: browser origins allowed besides the server's own, e.g. ``"http://localhost:8888"``
    allowed_origins: frozenset[str] = field(default_factory=frozenset)
    #: ``Host`` names allowed besides loopback names and the bound address
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    #: let HTTP clients pass any backend flag in ``llamacpp_args`` (see ``_args``)
    allow_any_args: bool = False

    @classmethod
    def of(cls, api_key: str | None = None, allowed_origins: Iterable[str] = (),
           allowed_hosts: Iterable[str] = (), allow_any_args: bool = False) -> Security:
        return cls(api_key or None, frozenset(o.rstrip("/") for o in allowed_origins),
                   frozenset(h.lower() for h in allowed_hosts), allow_any_args)


def check_binding(host: str, security: Security) -> None:
    """:raises InvalidOptions: ``host`` is not loopback and no API key is set."""
    if not is_loopback(host) and not security.api_key:
        raise InvalidOptions(
            f"serving on {host!r} makes the router reachable from other machines, and it can "
            "start processes: set an API key (api_key=..., --api-key or LEMON_MAGIC_API_KEY), "
            "or bind 127.0.0.1")


def _host_name(value: str) -> str:
    """The name part of a ``Host`` header (``[::1]:80`` → ``::1``)."""
    if value.startswith("["):
        return value[1:].partition("]")[0].lower()
    return value.rpartition(":")[0].lower() if value.count(":") == 1 else value.lower()


class Guard:
    """The ASGI layer that applies :class:`Security` before the app sees a request."""

    def __init__(self, app: ASGIApp, security: Security, bound_host: str) -> None:
        self.app = app
        self.security = security
        self.bound_host = bound_host.strip("[]").lower()
        self.port: int | None = None  # set once the socket is bound (the server's own origin)

    def _host_ok(self, host: str) -> bool:
        if _is_wildcard(self.bound_host):
            return True
        name = _host_name(host)
        return is_loopback(name) or name == self.bound_host or name in self.security.allowed_hosts

    def _origin_ok(self, origin: str) -> bool:
        if origin.rstrip("/") in self.security.allowed_origins:
            return True
        scheme, _, rest = origin.partition("://")
        if scheme != "http" or self.port is None:
            return False
        name = _host_name(rest)
        port = rest.rpartition(":")[2]
        return port == str(self.port) and (is_loopback(name) or name == self.bound_host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        extra = list(_CORS)
        if origin is not None and self._origin_ok(origin):
            extra.append((b"access-control-allow-origin", origin.encode("latin-1")))
        if not self._host_ok(headers.get("host", "")):
            await _answer(send, 403, {"error": f"Host {headers.get('host', '')!r} is not allowed "
                                      "(DNS rebinding protection)"}, extra)
            return
        if origin is not None and not self._origin_ok(origin):
            await _answer(send, 403, {"error": "Origin not allowed"}, extra)
            return
        if headers.get("sec-fetch-site") == "cross-site" and origin is None:
            # a browser's request from another site that carries no Origin (an <img>, a link):
            # it could still make the machine fetch from the Hub (issue 21)
            await _answer(send, 403, {"error": "Cross-site request refused (Sec-Fetch-Site: "
                                      "cross-site)"}, extra)
            return
        if scope["method"] == "OPTIONS":
            await _answer(send, 204, None, extra)
            return
        key = self.security.api_key
        if key is not None:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                await _answer(send, 401, {"error": "Invalid or missing API key"}, extra)
                return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cors)


async def _answer(send: Send, status: int, body: object, extra: list[tuple[bytes, bytes]]) -> None:
    data = b"" if body is None else json.dumps(body).encode()
    headers = [*extra, (b"content-length", str(len(data)).encode())]
    if body is not None:
        headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
