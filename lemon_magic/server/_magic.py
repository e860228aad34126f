"""What ``%lemon_serve`` does and says (the magic itself stays a parse and one call)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lemon_magic.runtime import Router

__all__ = ("serve_line",)


def serve_line(router: Router, port: int, stop: bool) -> str:
    """Start (or, with ``stop``, stop) serving on 127.0.0.1; returns the line to print.

    :raises OSError: the port cannot be bound.
    """
    if stop:
        url = router.base_url
        if not router.stop_serving():
            return "not serving"
        return f"stopped serving {url}; the models stay loaded"
    url = router.serve("127.0.0.1", port)
    return f"serving {url} (OpenAI base URL: {url})"
