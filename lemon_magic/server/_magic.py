"""What ``%lemon_serve`` does and says (the magic itself stays a parse and one call)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lemon_magic.server._guard import Security

if TYPE_CHECKING:
    from lemon_magic.runtime import Router

__all__ = ("DEFAULT_PORT", "serve_line")

#: Lemonade's port, where ``%lemon_serve`` serves unless told otherwise
DEFAULT_PORT = 13305


def serve_line(router: Router, port: int | None, stop: bool) -> str:
    """Ensure the router serves on 127.0.0.1 (declarative, like loads), or with ``stop`` stop
    serving; returns the line to print.

    Already serving at that address (``port`` ``None`` or 0: wherever it serves now): a no-op.
    At another address: the server moves there with its security settings (API key, allowed
    origins and hosts), and the line says that the old URL stops answering; if the new port
    cannot be bound, the old server keeps serving. Not serving: it starts (``port`` ``None``:
    13305).

    :raises UsageError: the port cannot be bound (one line; a running server keeps serving).
    """
    from IPython.core.error import UsageError

    if stop:
        url = router.base_url
        if not router.stop_serving():
            return "not serving"
        return f"stopped serving {url}; the models stay loaded"
    info = router.serving
    if info is not None and info.host == "127.0.0.1" and port in (None, 0, info.port):
        return f"already serving {info.base_url} (no change; OpenAI base URL: {info.base_url})"
    running = router.async_router._serving
    security = running.app.guard.security if running is not None else Security()
    port = DEFAULT_PORT if port is None else port
    try:
        url = router.serve("127.0.0.1", port, api_key=security.api_key,
                           allowed_origins=tuple(security.allowed_origins),
                           allowed_hosts=tuple(security.allowed_hosts),
                           allow_any_args=security.allow_any_args)
    except OSError as exc:
        still = f"; still serving {router.base_url}" if router.base_url else ""
        raise UsageError(f"cannot serve on 127.0.0.1:{port}: {exc.strerror or exc}{still}") from None
    if info is not None and info.base_url != url:
        return (f"moved serving from {info.base_url} to {url}: the old URL no longer answers "
                f"(OpenAI base URL: {url})")
    return f"serving {url} (OpenAI base URL: {url})"
