"""The router's public records: settings, results and snapshots, as frozen dataclasses.

Views (magics, widgets, tables) import these without pulling in anyio, httpx
or psutil.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lemon_magic._policy import ModelState
from lemon_magic.errors import InvalidOptions
from lemon_magic.options import LoadOptions, ResolvedOptions

__all__ = ("Chunk", "Completion", "DeleteResult", "LoadResult", "ModelEntry", "ModelStatus", "Plan",
           "PullResult", "RemoteView", "RouterConfig", "RouterEvent", "UnloadResult")


@dataclass(frozen=True)
class RouterConfig:
    """Limits and timeouts of a router; every wait is bounded by one of these.

    Changes made with ``configure`` apply to the next decision, wait or request.
    """

    #: models of each kind that may be loaded at once (Lemonade's default: 1 llm)
    max_loaded: Mapping[str, int] = field(
        default_factory=lambda: {"llm": 1, "embedding": 1, "reranking": 1})
    #: seconds a backend may take from spawn to healthy
    start_timeout: float = 120.0
    #: seconds a caller waits for an in-flight load (others' or its own)
    load_wait_timeout: float = 300.0
    #: seconds an unload or eviction waits for requests in flight before stopping anyway
    drain_timeout: float = 30.0
    #: seconds between SIGTERM and SIGKILL
    stop_grace: float = 5.0
    #: total deadline, in seconds, of one non-streamed request (from sending it to the last byte)
    request_timeout: float = 600.0
    #: longest silence, in seconds, between two pieces of a streamed response (the first
    #: piece included: it comes after the prompt is processed)
    stream_idle_timeout: float = 120.0
    #: seconds a ready model may sit with no request in flight before it is unloaded
    #: (``None``: never; pinned models never are)
    idle_timeout: float | None = None
    #: memory budget in bytes for all backends (``None``: what psutil says is available)
    memory_limit: int | None = None
    #: lines of each backend's log kept in memory
    log_lines: int = 400
    #: times a port clash is retried with a new port
    port_retries: int = 3
    #: load options used where neither the request nor the model's registration sets one
    default_options: LoadOptions = field(default_factory=LoadOptions)
    #: seconds between two health checks of a ready remote model (unreachable / back)
    remote_poll_interval: float = 1.0
    #: seconds one remote control call (health, unload, listing) may take
    remote_timeout: float = 10.0
    #: seconds a remote load may take (the remote may download the model first)
    remote_load_timeout: float = 600.0
    #: explicit loads that may wait to change one model's options (each is one more reload
    #: in a row); more are refused with ``LoadQueueFull`` (HTTP: 503 + Retry-After)
    max_queued_loads: int = 4

    def __post_init__(self) -> None:
        """Every field checked whenever a config is made (``configure`` makes a new one with
        ``dataclasses.replace``), so a bad value changes nothing: a NaN or infinite timeout
        would break every wait it bounds (issue 21).

        :raises InvalidOptions: the first field that is not valid, named.
        """
        for name in _SECONDS:
            value = getattr(self, name)
            if value is None and name in _MAY_BE_NONE:
                continue
            zero_ok = name in _MAY_BE_ZERO
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
                more = " or None (never)" if name in _MAY_BE_NONE else ""
                raise InvalidOptions(f"{name} must be a {'non-negative' if zero_ok else 'positive'} "
                                     f"finite number of seconds{more}, got {value!r}")
        for name in ("log_lines", "port_retries", "memory_limit", "max_queued_loads"):
            value = getattr(self, name)
            if value is None and name == "memory_limit":
                continue
            low = 0 if name in ("port_retries", "max_queued_loads") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidOptions(f"{name} must be an integer of at least {low}, got {value!r}")
        for kind, count in dict(self.max_loaded).items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise InvalidOptions(f"max_loaded[{kind!r}] must be a positive integer, got {count!r}")


#: RouterConfig's durations (positive, finite)
_SECONDS = ("start_timeout", "load_wait_timeout", "drain_timeout", "stop_grace", "request_timeout",
            "stream_idle_timeout", "idle_timeout", "remote_poll_interval", "remote_timeout",
            "remote_load_timeout")
_MAY_BE_ZERO = frozenset({"drain_timeout", "stop_grace"})
_MAY_BE_NONE = frozenset({"idle_timeout"})


@dataclass(frozen=True)
class LoadResult:
    """What ``load``/``ensure_loaded`` did."""

    model: str
    #: ``"loaded"`` (started), ``"noop"`` (already loaded as asked) or ``"reloaded"``
    action: Literal["loaded", "noop", "reloaded"]
    #: the backend kind (a remote model: ``"lemonade remote"`` or ``"openai remote"``)
    backend: str
    #: the backend's pid (a remote model: the remote's, ``None`` if it does not report one)
    pid: int | None
    url: str
    #: what the backend runs with (a remote model: what its server reports; 0 = not reported)
    options: ResolvedOptions
    #: wall time of this call (including any wait for another caller's load)
    seconds: float
    #: spawn-to-healthy time of the process now serving the model
    load_seconds: float
    #: this call joined a load that another caller started
    joined: bool = False
    #: auto-load (and a remote's explicit load): requested option → (loaded, requested) where
    #: what runs differs from what was asked
    options_differ: Mapping[str, tuple[Any, Any]] = field(default_factory=dict)
    #: for a reload: the options it replaced
    previous_options: ResolvedOptions | None = None
    #: a remote model: the server's URL as registered (``None``: a local backend)
    remote: str | None = None
    #: the models stopped to make room for this load: name → its pid (``None``: it was loading)
    evicted: Mapping[str, int | None] = field(default_factory=dict)


@dataclass(frozen=True)
class UnloadResult:
    """What ``unload`` did."""

    model: str
    pid: int | None
    seconds: float
    #: the model was still loading; its load was cancelled
    cancelled_load: bool = False
    #: what else to know (a remote model: what its server did)
    detail: str = ""


@dataclass(frozen=True)
class PullResult:
    """What ``pull`` did: the checkpoint is in the Hub's cache and registered as ``model``."""

    model: str
    #: ``org/repo:VARIANT``, with the variant that was chosen (``""``: a local model, not pulled)
    checkpoint: str
    #: the file a load starts (the first part of a split model)
    path: str
    #: bytes of all its files
    size: int
    #: bytes this pull transferred (0: all were in the cache already)
    downloaded: int
    seconds: float
    #: this call joined a pull that another caller started
    joined: bool = False


@dataclass(frozen=True)
class DeleteResult:
    """What ``delete`` did."""

    model: str
    #: the pid of the backend that was unloaded first (``None``: it was not loaded)
    unloaded_pid: int | None
    #: bytes removed from the Hub's cache (0: its files were not pulled, or are shared)
    freed: int
    #: the other registrations pulled from the same repo, whose files kept the model's files
    #: in the Hub's cache (removing a checkpoint's files touches every snapshot of its repo)
    kept_for: tuple[str, ...] = ()
    #: the model's files left in the Hub's cache (snapshot links): only files a pull of ours
    #: downloaded are removed
    kept: tuple[str, ...] = ()
    #: why ``kept`` stayed, one sentence ("" when nothing was kept)
    kept_why: str = ""


@dataclass(frozen=True)
class Plan:
    """What an explicit ``load`` with these options would do now (advisory: state may change)."""

    model: str
    action: Literal["noop", "load", "reload", "wait"]
    options: ResolvedOptions
    current: ResolvedOptions | None
    diff: Mapping[str, tuple[Any, Any]]
    #: spawn-to-healthy seconds of this model's last load (``None`` if never loaded)
    last_load_seconds: float | None = None
    #: for a reload: seconds its last stop took (``None`` if never stopped)
    last_stop_seconds: float | None = None
    #: the model's state when the plan was made
    state: ModelState = ModelState.UNLOADED

    @property
    def estimate_seconds(self) -> float | None:
        """A rough duration: the last load, plus for a reload the last stop (0.2 s if the model
        was never stopped yet)."""
        if self.last_load_seconds is None:
            return None
        if self.action != "reload":
            return self.last_load_seconds
        stop = self.last_stop_seconds if self.last_stop_seconds is not None else 0.2
        return self.last_load_seconds + stop

    def describe(self) -> str:
        """One line, e.g. ``will reload gemma3-270m: ctx_size 4096 → 8192 — about 1.3 s
        (last load 1.1 s + stop)``."""
        if self.action == "noop":
            return "no change (no-op)"
        if self.action == "wait":
            doing = "is stopping" if self.state is ModelState.STOPPING else "is loading"
            return f"{self.model} {doing}; the load will wait for it, then decide"
        estimate = ""
        if self.last_load_seconds is not None:
            stop = " + stop" if self.action == "reload" else ""
            parts = f"last load {self.last_load_seconds:.1f} s{stop}"
            assert self.estimate_seconds is not None
            estimate = f" — about {self.estimate_seconds:.1f} s ({parts})"
        if self.action == "load":
            return f"will load {self.model}{estimate}"
        assert self.current is not None
        return f"will reload {self.model}: {self.current.describe_diff(self.options)}{estimate}"


@dataclass(frozen=True)
class ModelStatus:
    """A snapshot of one model, as ``status()`` reports it."""

    name: str
    kind: str
    state: ModelState
    backend: str | None
    pid: int | None
    url: str | None
    options: ResolvedOptions | None
    rss: int | None
    pinned: bool
    load_seconds: float | None
    #: wall-clock time (``time.time()``) of the last load, request or no-op
    last_used: float | None
    requests_in_flight: int
    last_error: str | None
    log_tail: tuple[str, ...]
    #: wall-clock time the model entered its current state (uptime when ready, elapsed when loading)
    since: float | None = None
    #: wall-clock time the idle timer will unload this ready, idle model (``None``: no timer runs)
    idle_unload_at: float | None = None
    #: the backend's command line, executable first (``None``: no process)
    argv: tuple[str, ...] | None = None
    #: a pull of its file in progress, e.g. ``downloading 34 % (120/350 MB), 2.1 MB/s, 0:19 left``
    download: str | None = None
    #: a remote model: where it is served and what its server last reported
    remote: RemoteView | None = None


@dataclass(frozen=True)
class RemoteView:
    """A remote model as its server last reported it (never the API key)."""

    url: str
    #: ``"lemonade"`` or ``"openai"``
    api: str
    #: the model's name on the remote server
    remote_model: str
    #: the remote's own word for the model's state (``ready``, ``loaded``, ``unloaded``…)
    status: str | None
    #: the remote's pid for it (lemonade remotes that report one)
    pid: int | None
    #: its options as the remote reports them (``ctx_size``, ``llamacpp_args``…)
    options: Mapping[str, Any]
    #: wall-clock time of the last answer from the remote (``None``: none yet)
    checked_at: float | None


@dataclass(frozen=True)
class ModelEntry:
    """A model the router can load by name, as ``models()`` lists it."""

    name: str
    #: ``"builtin"``, ``"user"``, ``"path"`` (a .gguf path the router has seen) or ``"catalog"``
    #: (a model of the built-in catalogue, pulled on first load)
    source: str
    kind: str
    #: the GGUF file, or why it cannot be used (a registration gone bad)
    path: str
    #: whether the file is on disk now (the built-in model is assembled on first load)
    present: bool
    state: ModelState = ModelState.UNLOADED
    description: str = ""
    problem: str | None = None
    #: the Hub checkpoint it was (or, for the catalogue, would be) pulled from
    checkpoint: str | None = None
    #: bytes of its file(s) (for the catalogue: the approximate download)
    size: int | None = None


@dataclass(frozen=True)
class RouterEvent:
    """A state change, as subscribers receive it (on the router's thread)."""

    model: str
    old: ModelState
    new: ModelState
    #: wall-clock time of the change
    at: float
    #: seconds the model spent in ``old``
    seconds_in_old: float
    detail: str = ""
    pid: int | None = None


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed text."""

    text: str
    finish_reason: str | None = None


@dataclass(frozen=True)
class Completion:
    """A finished completion or chat response."""

    model: str
    text: str
    finish_reason: str | None
    usage: Mapping[str, Any]
    #: the backend's JSON response (the last chunk's, when streamed)
    response: Mapping[str, Any]
    load: LoadResult
