"""Load options: what the user asked for (:class:`LoadOptions`) and what it resolves to.

Two requests ask for the same load exactly when their :class:`ResolvedOptions`
are equal: defaults are filled in, "auto" is made concrete and argv fragments
are normalised before anything is compared. Sampling parameters (temperature,
max_tokens, ...) are per request and are never load options.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from lemon_magic.errors import InvalidOptions

__all__ = ("DEFAULT_CTX_SIZE", "LoadOptions", "ResolvedOptions", "SAMPLING_PARAMETERS")

#: Context size used when neither the request nor the model's registration names one.
DEFAULT_CTX_SIZE = 4096
#: Request parameters that are refused as load options, with a pointer to where they belong.
SAMPLING_PARAMETERS = frozenset({"temperature", "max_tokens", "top_p", "top_k", "seed", "stop",
                                 "min_p", "repeat_penalty", "presence_penalty",
                                 "frequency_penalty", "stream"})
_SHELL_CHARS = frozenset(";|&$`<>\\\n\r\t\"'(){}*?!#~")


def _positive_int(name: str, value: object, limit: int | None = None) -> int | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        raise InvalidOptions(f"{name} must be a positive integer, got {value!r}")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or value <= 0:
        raise InvalidOptions(f"{name} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise InvalidOptions(f"{name} must be at most {limit}, got {value}")
    return value


#: the most threads a backend may be asked for: 4 per CPU here, at least 64 (more only
#: oversubscribes, and a huge count makes llama.cpp allocate per-thread buffers until it dies)
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))


def _split_args(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        if any(c in value for c in "\n\r"):
            raise InvalidOptions("extra_args must not contain line breaks")
        # quotes may group words; anything else a shell would act on is refused before
        # splitting (shlex would silently eat a backslash)
        bad = sorted(set(value) & (_SHELL_CHARS - {'"', "'"}))
        if bad:
            raise InvalidOptions(f"extra_args {value!r} contains shell syntax {''.join(bad)!r}; "
                                 "arguments are passed to the backend directly, never through a shell")
        try:
            parts: Sequence[object] = shlex.split(value)
        except ValueError as exc:
            raise InvalidOptions(f"extra_args cannot be parsed: {exc}") from None
    elif isinstance(value, Sequence):
        parts = value
    else:
        raise InvalidOptions(f"extra_args must be a string or a list of strings, got {value!r}")
    out = []
    for part in parts:
        if not isinstance(part, str) or not part:
            raise InvalidOptions(f"extra_args items must be non-empty strings, got {part!r}")
        bad = sorted(set(part) & _SHELL_CHARS)
        if bad:
            raise InvalidOptions(f"extra_args item {part!r} contains shell syntax {''.join(bad)!r}; "
                                 "arguments are passed to the backend directly, never through a shell")
        out.append(part)
    return tuple(out)


_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _check_template(value: object) -> None:
    from lemon_magic._templates import is_template_file

    if not isinstance(value, str) or not value.strip():
        raise InvalidOptions(f"chat_template must be a template name or a .jinja file, got {value!r}")
    if is_template_file(value):
        if set(value) & set("\n\r\0"):
            raise InvalidOptions(f"chat_template file name {value!r} contains a line break")
    elif not _TEMPLATE_NAME.fullmatch(value):
        raise InvalidOptions(f"chat_template must be a template name (letters, digits, '.', '-', "
                             f"'_'; e.g. gemma, chatml) or a .jinja file, got {value!r}")


@dataclass(frozen=True)
class LoadOptions:
    """Load options as requested; ``None`` means "use the default" (also spelled ``"auto"``).

    :param ctx_size: context size in tokens.
    :param threads: CPU threads for generation.
    :param backend: ``"llama-server"`` or ``"llama-cpp-python"``.
    :param extra_args: more backend flags, as a list or a shell-like string (never run by a shell).
    :param chat_template: the name of a chat template the backend has built in (llama.cpp's
        ``gemma``, ``chatml``, ...), or a Jinja template file (a path with a ``/`` or ending
        in ``.jinja``).
    """

    ctx_size: int | None = None
    threads: int | None = None
    backend: str | None = None
    extra_args: tuple[str, ...] | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "ctx_size", _positive_int("ctx_size", self.ctx_size))
        set_(self, "threads", _positive_int("threads", self.threads, MAX_THREADS))
        if self.backend in (None, "auto"):
            set_(self, "backend", None)
        elif not isinstance(self.backend, str) or not self.backend.strip():
            raise InvalidOptions(f"backend must be a backend name or 'auto', got {self.backend!r}")
        if self.extra_args is not None:
            set_(self, "extra_args", _split_args(self.extra_args))
        if self.chat_template is not None:
            _check_template(self.chat_template)

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any]) -> LoadOptions:
        """Build from keyword arguments, refusing unknown names with a clear message."""
        known = {f.name for f in fields(cls)}
        for key in options:
            if key in SAMPLING_PARAMETERS:
                raise InvalidOptions(f"{key!r} is a sampling parameter, not a load option; "
                                     "pass it to complete() or chat()")
            if key not in known:
                raise InvalidOptions(f"unknown load option {key!r} (known: {', '.join(sorted(known))})")
        return cls(**options)

    def merged_over(self, base: LoadOptions) -> LoadOptions:
        """These options, with the fields left unset taken from ``base``."""
        return LoadOptions(**{f.name: getattr(self, f.name) if getattr(self, f.name) is not None
                              else getattr(base, f.name) for f in fields(self)})


@dataclass(frozen=True)
class ResolvedOptions:
    """Concrete load options: what the backend is started with, and what loads compare."""

    backend: str
    ctx_size: int
    threads: int
    extra_args: tuple[str, ...] = ()
    chat_template: str | None = None
    #: the GGUF file served: a name registered anew to another file loads differently
    model_path: str = ""

    def diff(self, other: ResolvedOptions) -> dict[str, tuple[Any, Any]]:
        """``{field: (self's value, other's value)}`` for every field that differs."""
        return {f.name: (getattr(self, f.name), getattr(other, f.name))
                for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)}

    def as_dict(self) -> dict[str, Any]:
        """A plain dict, for display and JSON."""
        d = asdict(self)
        d["extra_args"] = list(self.extra_args)
        return d

    def describe_diff(self, other: ResolvedOptions) -> str:
        """``"ctx_size 4096 → 8192"``-style text of the differences to ``other``."""
        return ", ".join(f"{k} {_show(a)} → {_show(b)}" for k, (a, b) in self.diff(other).items())


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return shlex.join(value) or "(none)"
    return str(value)


def default_threads() -> int:
    """Threads used when none are requested: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
