"""The HTTP API (Lemonade- and OpenAI-compatible) and the ``lemon-magic`` command line.

* :mod:`~lemon_magic.server.app`: the Starlette app, a visible route table;
* :mod:`~lemon_magic.server.serve`: uvicorn on the router's own loop
  (``AsyncRouter.serve`` / ``Router.serve``);
* :mod:`~lemon_magic.server.cli`: ``lemon-magic serve``.
"""

from __future__ import annotations

__all__ = ()
