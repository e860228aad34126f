"""Argument parsing and the Stop note, shared by the magics."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError

from lemon_magic import errors

__all__ = ("Interrupted", "_interrupted", "_no_abbrev", "_parse")


def _parse(magic: Callable[..., Any], line: str) -> Any:
    """Parse a magic's line like a shell would (``--extra-args="--flag value"`` stays one
    argument), then with the magic's argparse parser (whose errors are ``UsageError``)."""
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot parse the arguments: {exc}") from None
    return magic.parser.parse_args(argv)  # type: ignore[attr-defined]


def _no_abbrev(func: Callable[..., Any]) -> Callable[..., Any]:
    """Refuse argparse prefix matches (``--ctx`` for ``--ctx-size``): they hide typos."""
    func.parser.allow_abbrev = False  # type: ignore[attr-defined]
    return func


class Interrupted(KeyboardInterrupt):
    """Raised when Stop interrupts a magic; IPython shows only its one-line note."""

    def _render_traceback_(self) -> list[str]:
        return [f"interrupted: {self.args[0]}"]


def _interrupted(exc: errors.Interrupted) -> Interrupted:
    """The magic's one truthful line for a Stop, by what the call was waiting for."""
    if exc.phase == "load":
        return Interrupted(f"stopped waiting for {exc.model} to load; the load goes on in the "
                           f"background (%lemon_unload {exc.model} stops it)")
    return Interrupted(str(exc))
