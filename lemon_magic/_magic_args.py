"""Argument parsing shared by the magics."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError

__all__ = ("_no_abbrev", "_parse")


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
