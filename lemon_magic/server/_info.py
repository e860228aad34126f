"""The server's own state over HTTP: ``GET stats``, ``GET system-info``, ``/live`` and the
runtime settings (``GET params`` and ``POST params``, Lemonade's ``RuntimeConfig``).

``POST params`` changes the router's settings for later decisions (never what
is loaded now; nothing is persisted), where Lemonade's keys map onto ours:
``ctx_size`` and ``llamacpp_args`` (or ``llamacpp.args``) are the default load
options, ``max_loaded_models`` the slots of every kind, plus our timeouts.
"""

from __future__ import annotations

import dataclasses
import platform
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lemon_magic.errors import InvalidOptions, LemonError
from lemon_magic.options import LoadOptions
from lemon_magic.server._args import check_http_args
from lemon_magic.server._wire import bad, read_body

if TYPE_CHECKING:
    from lemon_magic.router import AsyncRouter

__all__ = ("InfoApi", "Stats", "live")

#: router settings ``POST params`` may change, in seconds (``idle_timeout`` may be null: never)
_TIMEOUTS = ("idle_timeout", "request_timeout", "stream_idle_timeout", "load_wait_timeout",
             "drain_timeout", "start_timeout")


@dataclass
class Stats:
    """Lemonade's ``GET stats``: the last request's token counts and speed, and totals (from
    the backend's ``usage`` and llama-server's ``timings``; ``None`` where a backend gives none)."""

    last: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(
        ("input_tokens", "output_tokens", "time_to_first_token", "tokens_per_second",
         "prompt_tokens", "cache_tokens")))
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("request_count_total", "input_tokens_total", "output_tokens_total",
         "prompt_tokens_total", "cache_tokens_total"), 0))

    def record_event(self, event: Mapping[str, Any]) -> None:
        """A streamed event: the last one carries the usage and timings."""
        if "usage" in event or "timings" in event:
            self.record(event)

    def record(self, response: Mapping[str, Any]) -> None:
        usage, timings = response.get("usage") or {}, response.get("timings") or {}
        prompt_ms = timings.get("prompt_ms")
        self.last = {
            "input_tokens": usage.get("prompt_tokens"),
            "output_tokens": usage.get("completion_tokens", timings.get("predicted_n")),
            "time_to_first_token": prompt_ms / 1000 if isinstance(prompt_ms, (int, float)) else None,
            "tokens_per_second": timings.get("predicted_per_second"),
            "prompt_tokens": timings.get("prompt_n"), "cache_tokens": timings.get("cache_n")}
        self.totals["request_count_total"] += 1
        for key in ("input_tokens", "output_tokens", "prompt_tokens", "cache_tokens"):
            if isinstance(self.last[key], int):
                self.totals[f"{key}_total"] += self.last[key]


async def live(request: Request) -> Response:
    """Lemonade's liveness probe (root only): the server answers, whatever its models do."""
    if request.method == "HEAD":
        return Response(status_code=200)
    return JSONResponse({"status": "ok"})


def _settings(body: dict[str, Any]) -> dict[str, Any]:
    """``POST params``'s body flattened (``{"llamacpp": {"args": …}}`` → ``llamacpp_args``).

    :raises InvalidOptions: a nested value that is not an object.
    """
    flat = {k: v for k, v in body.items() if k != "llamacpp"}
    nested = body.get("llamacpp", {})
    if not isinstance(nested, dict):
        raise InvalidOptions("'llamacpp' must be an object, e.g. {\"args\": \"--no-mmap\"}")
    flat.update({f"llamacpp_{k}": v for k, v in nested.items()})
    return flat


def _seconds(key: str, value: object) -> float | None:
    if value is None and key == "idle_timeout":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InvalidOptions(f"{key} must be a positive number of seconds, got {value!r}")
    return float(value)


@dataclass
class InfoApi:
    """The handlers of the server's own state, bound to one router."""

    router: AsyncRouter
    allow_any_args: bool
    stats: Stats = field(default_factory=Stats)

    async def stats_(self, request: Request) -> Response:
        if request.method == "HEAD":
            return Response(status_code=200)
        return JSONResponse({**self.stats.last, **self.stats.totals})

    async def system_info(self, request: Request) -> Response:
        if request.method == "HEAD":
            return Response(status_code=200)
        backends = {name: {"devices": ["cpu"], "state": "installed" if b.available() else "unsupported"}
                    for name, b in self.router.backends.items()}
        default = next((name for name, b in backends.items() if b["state"] == "installed"), None)
        cpu = platform.processor() or platform.machine()
        return JSONResponse({
            "OS Version": platform.platform(), "Processor": cpu,
            "Physical Memory": f"{psutil.virtual_memory().total / 2**30:.1f} GB",
            "devices": {"cpu": {"name": cpu, "available": True,
                                "cores": psutil.cpu_count(logical=False), "threads": psutil.cpu_count()},
                        "amd_gpu": [], "nvidia_gpu": [], "amd_npu": {"available": False}},
            "recipes": {"llamacpp": {"default_backend": default, "backends": backends}},
        })

    def _snapshot(self) -> dict[str, Any]:
        config = self.router.config
        defaults = config.default_options
        serving = self.router.serving
        return {"ctx_size": defaults.ctx_size if defaults.ctx_size is not None else -1,
                "llamacpp": {"backend": "cpu", "args": shlex.join(defaults.extra_args or ())},
                "max_loaded_models": config.max_loaded.get("llm", 1),
                "max_loaded": dict(config.max_loaded),
                "host": serving.host if serving else None, "port": serving.port if serving else None,
                **{key: getattr(config, key) for key in _TIMEOUTS}}

    async def params(self, request: Request) -> Response:
        """GET: the settings in force; POST: change some of them (see the module docstring)."""
        if request.method == "GET":
            return JSONResponse(self._snapshot())
        body = await read_body(request)
        assert body is not None
        if not body:
            return bad("params needs at least one setting, e.g. {\"ctx_size\": 4096}")
        try:
            changes, updated = self._changes(_settings(body))
            self.router.configure(changes)
        except LemonError as exc:
            return bad(exc.render())
        return JSONResponse({"status": "success", "updated": updated})

    def _changes(self, settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The router config changes ``settings`` ask for, and what to report as updated.

        :raises InvalidOptions: an unknown key, a key that cannot change, or a bad value.
        """
        config = self.router.config
        defaults = config.default_options
        changes: dict[str, Any] = {}
        updated: dict[str, Any] = {}
        for key, value in settings.items():
            if key in ("host", "port"):
                raise InvalidOptions(f"{key} cannot change while serving: stop the server and "
                                     f"serve again with the new {key}")
            if key == "ctx_size":
                ctx = None if value in (-1, "auto", None) else value
                defaults = dataclasses.replace(defaults, ctx_size=LoadOptions(ctx_size=ctx).ctx_size)
            elif key == "llamacpp_args":
                args = LoadOptions(extra_args=value or ()).extra_args
                if args and not self.allow_any_args:
                    check_http_args(args)
                defaults = dataclasses.replace(defaults, extra_args=args or None)
            elif key == "llamacpp_backend":
                if value not in ("cpu", "auto", "", None):
                    raise InvalidOptions(f"llamacpp_backend {value!r} is not available here (only 'cpu')")
            elif key == "max_loaded_models":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise InvalidOptions(f"max_loaded_models must be a positive integer, got {value!r}")
                changes["max_loaded"] = dict.fromkeys(config.max_loaded, value)
            elif key in _TIMEOUTS:
                changes[key] = _seconds(key, value)
            else:
                known = ("ctx_size", "llamacpp_args", "llamacpp_backend", "max_loaded_models", *_TIMEOUTS)
                raise InvalidOptions(f"unknown setting {key!r} (settings: {', '.join(known)})")
            updated[key] = value
        if defaults != config.default_options:
            changes["default_options"] = defaults
        return changes, updated
