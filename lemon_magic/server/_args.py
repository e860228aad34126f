"""Which backend flags an HTTP client may pass in ``llamacpp_args``.

A client of the HTTP API is less trusted than the notebook's user: llama-server
has flags that read or write files (``--log-file``, ``--slot-save-path``,
``--lora``, ``--chat-template-file``, ``--api-key-file``, ``--media-path``…),
reach the network (``--model-url``, ``-hf``, ``--rpc``) or even run commands
(``--tools``). A deny-list would miss the next such flag, so HTTP clients get an
allow-list of flags that only tune speed, memory and sampling; anything else is
refused with 400 unless the server was started with ``allow_any_args=True``
(``--allow-any-backend-args``). The reserved flags stay reserved either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psutil

from lemon_magic._templates import gemma3_template, is_template_file
from lemon_magic.errors import InvalidOptions
from lemon_magic.options import MAX_THREADS, LoadOptions

__all__ = ("FLAGS", "SAFE_FLAGS", "Choice", "Number", "Switch", "Text", "check_http_args",
           "check_http_options")


@dataclass(frozen=True)
class Switch:
    """A flag that takes no value."""


@dataclass(frozen=True)
class Number:
    """A flag that takes one number from ``low`` to ``high`` (a count, a size, a priority…)."""

    low: float
    high: float
    integer: bool = True
    #: said after the range when a value is refused
    why: str = ""

    def check(self, flag: str, value: str) -> None:
        try:
            number = int(value) if self.integer else float(value)
        except ValueError:
            number = math.nan
        if not (self.low <= number <= self.high):  # NaN fails too
            what = "an integer" if self.integer else "a number"
            why = f" ({self.why})" if self.why else ""
            raise InvalidOptions(f"llamacpp_args: {flag} must be {what} from {self.low:g} to "
                                 f"{self.high:g}{why}, got {value!r}")


@dataclass(frozen=True)
class Choice:
    """A flag that takes one of ``names`` (``optional``: or nothing, e.g. ``-fa``)."""

    names: tuple[str, ...]
    optional: bool = False

    def check(self, flag: str, value: str) -> None:
        if value.lower() not in self.names:
            raise InvalidOptions(f"llamacpp_args: {flag} must be one of {', '.join(self.names)}, "
                                 f"got {value!r}")


@dataclass(frozen=True)
class Text:
    """A flag that takes one word (a type or format name; the backend checks it)."""

    def check(self, flag: str, value: str) -> None:
        pass


_TOKENS = 1 << 20  # more tokens than any context here
_RAM_MIB = psutil.virtual_memory().total // 2**20
_THREADS = Number(1, MAX_THREADS, why="the cap of the threads option")
_BOOL = Choice(("1", "0", "on", "off", "t", "f", "true", "false", "y", "n", "yes", "no"))
_SWITCH = Switch()


def _spell(*entries: tuple[tuple[str, ...], Switch | Number | Choice | Text]) -> dict[
        str, Switch | Number | Choice | Text]:
    return {flag: value for flags, value in entries for flag in flags}


#: Every flag an HTTP client may pass in ``llamacpp_args`` (both backends' spellings), and the
#: value it takes: none of them touches files or the network, and every count, size and
#: priority is bounded (issue 21: ``--threads-http 3000`` made 3,006 threads, ``-tb 3000`` a
#: 20 s load, ``--prio 3`` real-time scheduling for a server run as root).
FLAGS: dict[str, Switch | Number | Choice | Text] = _spell(
    # llama-server: threads and scheduling
    (("-tb", "--threads-batch"), _THREADS),
    (("--threads-http",), Number(-1, MAX_THREADS, why="-1: llama-server's default")),
    (("--prio",), Number(-1, 0, why="no raised or real-time priority")),
    (("--poll",), Number(0, 50, why="50 is llama-server's default; more spins the CPU")),
    (("--numa",), Choice(("distribute", "isolate", "numactl"))),
    # llama-server: batching, slots, caches (memory)
    (("-b", "--batch-size"), Number(1, 16384)),
    (("-ub", "--ubatch-size"), Number(1, 8192)),
    (("-np", "--parallel"), Number(-1, 64, why="-1: automatic")),
    (("--cache-ram",), Number(0, _RAM_MIB, why="MiB, at most this machine's memory")),
    (("--ctx-checkpoints",), Number(0, 64)),
    (("--cache-reuse",), Number(0, _TOKENS)),
    (("--keep",), Number(-1, _TOKENS)),
    (("-ngl", "--n-gpu-layers", "--gpu-layers"), Number(-1, 1000)),
    (("-ctk", "--cache-type-k", "-ctv", "--cache-type-v"), Text()),
    (("-fa", "--flash-attn"), Choice(("on", "off", "auto"), optional=True)),
    (("-cb", "--cont-batching", "-nocb", "--no-cont-batching", "--mlock", "--no-mmap", "--mmap",
      "--swa-full", "--no-warmup", "--kv-unified", "--no-kv-offload", "-v", "--verbose",
      "--no-slots", "--slots", "--metrics", "--no-webui", "--no-ui"), _SWITCH),
    (("-to", "--timeout"), Number(1, 3600, why="seconds")),
    # llama-server: sampling defaults and RoPE
    (("--temp",), Number(0, 100, integer=False)),
    (("--top-k",), Number(0, 1 << 20)),
    (("--top-p", "--min-p"), Number(0, 1, integer=False)),
    (("--repeat-penalty",), Number(0, 100, integer=False)),
    (("--repeat-last-n",), Number(-1, _TOKENS)),
    (("--presence-penalty", "--frequency-penalty"), Number(-100, 100, integer=False)),
    (("-s", "--seed"), Number(-1, 2**32 - 1)),
    (("-n", "--n-predict"), Number(-2, _TOKENS)),
    (("--reasoning-budget",), Number(-1, _TOKENS)),
    (("--reasoning-format",), Text()),
    (("--rope-scaling",), Choice(("none", "linear", "yarn"))),
    (("--rope-scale", "--rope-freq-scale"), Number(0, 1024, integer=False)),
    (("--rope-freq-base",), Number(0, 1e9, integer=False)),
    # llama-cpp-python's server
    (("--n_threads_batch",), Number(-1, MAX_THREADS, why="-1: every CPU")),
    (("--n_batch",), Number(1, 16384)),
    (("--n_ubatch",), Number(1, 8192)),
    (("--n_gpu_layers",), Number(-1, 1000)),
    (("--rope_freq_base",), Number(0, 1e9, integer=False)),
    (("--rope_freq_scale",), Number(0, 1024, integer=False)),
    (("--type_k", "--type_v"), Number(0, 64)),
    (("--flash_attn", "--use_mlock", "--use_mmap", "--offload_kqv", "--logits_all"), _BOOL),
)
#: the flags an HTTP client may pass (the keys of :data:`FLAGS`)
SAFE_FLAGS = frozenset(FLAGS)


def _is_flag(arg: str) -> bool:
    if not arg.startswith("-") or arg == "-":
        return False
    try:
        float(arg)  # a negative number is a value, not a flag
    except ValueError:
        return True
    return False


def check_http_args(args: tuple[str, ...]) -> None:
    """Each flag is in :data:`FLAGS` and has the value it takes there (``--flag VALUE`` or
    ``--flag=VALUE``).

    :raises InvalidOptions: one line naming the first flag or value refused.
    """
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not _is_flag(arg):
            raise InvalidOptions(f"llamacpp_args: {arg} is not a flag (each value follows its flag)")
        flag, eq, value = arg.partition("=")
        kind = FLAGS.get(flag)
        if kind is None:
            raise InvalidOptions(
                f"llamacpp_args may not set {flag} over HTTP: only flags that tune speed, memory "
                "or sampling are allowed (flags that read or write files, reach the network or "
                "run commands need a server started with --allow-any-backend-args)")
        if isinstance(kind, Switch):
            if eq:
                raise InvalidOptions(f"llamacpp_args: {flag} takes no value, got {value!r}")
            continue
        if not eq:
            following = args[i] if i < len(args) else None
            if isinstance(kind, Choice) and kind.optional and \
                    (following is None or following.lower() not in kind.names):
                continue
            if following is None or _is_flag(following):
                raise InvalidOptions(f"llamacpp_args: {flag} needs a value")
            value = following
            i += 1
        kind.check(flag, value)


def check_http_options(options: LoadOptions) -> None:
    """:raises InvalidOptions: a flag :func:`check_http_args` refuses, or a ``chat_template``
    that is a file (llama-server would read any file the server can, and render it back), but the
    embedded model's own."""
    if options.extra_args:
        check_http_args(options.extra_args)
    if options.chat_template is not None and is_template_file(options.chat_template) and \
            options.chat_template != str(gemma3_template()):  # lemon_magic's own is no secret
        raise InvalidOptions(
            f"chat_template may not name a file over HTTP ({options.chat_template!r}): only a "
            "template name the backend has built in (e.g. gemma, chatml); a file needs a server "
            "started with --allow-any-backend-args")
