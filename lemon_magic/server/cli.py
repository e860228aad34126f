"""``lemon-magic serve``: the HTTP API as a standalone process.

One router on this process's event loop serves on ``--host``/``--port``
(127.0.0.1:13305 by default, Lemonade's port). SIGTERM or SIGINT closes the
socket, unloads every backend and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

import anyio

from lemon_magic.errors import InvalidOptions
from lemon_magic.server.serve import DEFAULT_PORT

__all__ = ("main",)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lemon-magic",
                                     description="Declarative, race-free local LLM loading.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the Lemonade- and OpenAI-compatible HTTP API",
                                description="Serve the Lemonade- and OpenAI-compatible HTTP API "
                                "until SIGTERM or SIGINT, which unload every backend.")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"port to bind (default: {DEFAULT_PORT}; 0: any free port)")
    keys = serve.add_mutually_exclusive_group()
    keys.add_argument("--api-key-file", default=None, metavar="FILE",
                      help="a file whose first line is the key clients must send as "
                      "'Authorization: Bearer KEY' (default: $LEMON_MAGIC_API_KEY, then "
                      "$LEMONADE_API_KEY); needed for a host that is not loopback")
    keys.add_argument("--api-key", default=None,
                      help="the key itself (other local users can read it in the process list: "
                      "prefer --api-key-file or $LEMON_MAGIC_API_KEY)")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                       help="a browser origin allowed to call the API (repeatable)")
    serve.add_argument("--allow-any-backend-args", action="store_true",
                       help="let clients pass llamacpp_args flags that touch files, the network "
                       "or run commands (refused by default)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


async def _serve(host: str, port: int, api_key: str | None, origins: list[str],
                 any_args: bool) -> None:
    from lemon_magic.router import AsyncRouter

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with AsyncRouter() as router:
            url = await router.serve(host, port, api_key=api_key, allowed_origins=origins,
                                     allow_any_args=any_args)
            print(f"serving {url} (OpenAI base URL: {url})", flush=True)
            async for signum in signals:
                logging.getLogger("lemon_magic.server").info(
                    "[server] %s: unloading every backend", signal.Signals(signum).name)
                break
        # leaving the router's block stopped the server and unloaded every backend


def _read_key_file(path: str) -> str:
    """The first non-blank line of ``path``, stripped.

    :raises InvalidOptions: the file cannot be read, or holds no key.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(64 * 1024)
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidOptions(f"cannot read the API key file {path}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    key = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not key:
        raise InvalidOptions(f"the API key file {path} is empty")
    return key


def _api_key(args: argparse.Namespace) -> str | None:
    """The key from ``--api-key-file``, ``--api-key`` (which warns once: every local user can
    read a command line in ``/proc``), or the environment, in that order (issue 21)."""
    if args.api_key_file is not None:
        return _read_key_file(args.api_key_file)
    if args.api_key is not None:
        print("lemon-magic: warning: --api-key puts the key in the process list, where other "
              "local users can read it; use --api-key-file or $LEMON_MAGIC_API_KEY",
              file=sys.stderr, flush=True)
        return str(args.api_key) or None
    return os.environ.get("LEMON_MAGIC_API_KEY") or os.environ.get("LEMONADE_API_KEY") or None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        api_key = _api_key(args)
    except InvalidOptions as exc:
        print(f"lemon-magic: {exc}", file=sys.stderr)
        return 1
    try:
        anyio.run(_serve, args.host, args.port, api_key, args.allow_origin,
                  args.allow_any_backend_args, backend="asyncio")
    except (OSError, InvalidOptions) as exc:
        print(f"lemon-magic: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0
