"""The HTTP API as a Starlette app: Lemonade's routes (and OpenAI's), over one router.

The route table at the bottom is the whole API. Every handler parses the
request, makes one router call and shapes the answer; the load contract lives
only in the router. Errors are translated in one place, :func:`error_response`
(``ERROR_STATUS`` lists the mappings).

Every route is served under ``/api/v0``, ``/api/v1``, ``/v0`` and ``/v1`` alike,
as Lemonade does; a GET or HEAD on a POST route answers 405, not 404.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shlex
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import psutil
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from lemon_magic import _requests
from lemon_magic._policy import ModelState
from lemon_magic._records import ModelEntry, ModelStatus
from lemon_magic.errors import (
    InvalidOptions,
    LemonError,
    ModelNotFound,
    ModelNotLoaded,
)
from lemon_magic.options import LoadOptions
from lemon_magic.server._args import check_http_args
from lemon_magic.server._guard import Guard, Security
from lemon_magic.server._wire import (
    ERROR_STATUS,
    LOAD_KEYS,
    MAX_BODY,
    SAVED_KEYS,
    BadRequest,
    bad,
    error_response,
    invalid,
    lemonade_options,
    read_body,
    recipe_options,
)

if TYPE_CHECKING:
    from lemon_magic.router import AsyncRouter

__all__ = ("ERROR_STATUS", "MAX_BODY", "PREFIXES", "create_app")

#: every route lives under each of these, as in Lemonade
PREFIXES = ("/api/v0", "/api/v1", "/v0", "/v1")
_CREATED = 1234567890  # Lemonade's constant `created` for model objects
#: the only load option an inference body may carry (Lemonade's allow-list)
_INFERENCE_LOAD_KEYS = ("ctx_size",)


@dataclass
class _Stats:
    """Lemonade's ``GET stats``: the last request's token counts and speed, and totals (from
    the backend's ``usage`` and llama-server's ``timings``; ``None`` where a backend gives none)."""

    last: dict[str, Any] = field(default_factory=lambda: dict.fromkeys(
        ("input_tokens", "output_tokens", "time_to_first_token", "tokens_per_second",
         "prompt_tokens", "cache_tokens")))
    totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("request_count_total", "input_tokens_total", "output_tokens_total",
         "prompt_tokens_total", "cache_tokens_total"), 0))

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


@dataclass
class _Api:
    """The handlers, bound to one router (each: parse, one router call, shape)."""

    router: AsyncRouter
    version: str
    security: Security
    stats: _Stats = field(default_factory=_Stats)
    #: model name → HTTP streams of it being sent now
    streams: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------- names

    def _name(self, name: object) -> str:
        """A model name as the registry knows it (``user.X`` → ``X``, ``X:latest`` → ``X``); only
        registered names are served over HTTP (never a file path).

        :raises ModelNotFound: anything else.
        """
        registry = self.router.registry
        if not isinstance(name, str) or not name:
            raise ModelNotFound(repr(name), registry.names())
        name = name.removesuffix(":latest")  # as Lemonade does (Ollama-style clients add it)
        if name.startswith("user.") and name[5:] in registry.user_names():
            return name[5:]
        if name not in registry.names():
            raise ModelNotFound(name, registry.names())
        return name

    def _loaded(self) -> list[ModelStatus]:
        ready = [s for s in self.router.status() if s.state is ModelState.READY]
        return sorted(ready, key=lambda s: s.last_used or 0.0, reverse=True)

    def _model_object(self, e: ModelEntry) -> dict[str, Any]:
        spec_defaults: dict[str, Any] = {}
        try:
            spec = self.router.registry.lookup(e.name)
            spec_defaults = {k: v for k, v in vars(spec.defaults).items() if v is not None}
            if "extra_args" in spec_defaults:
                spec_defaults["llamacpp_args"] = shlex.join(spec_defaults.pop("extra_args"))
        except LemonError:
            pass
        return {"id": e.name, "object": "model", "created": _CREATED, "owned_by": "lemon_magic",
                "checkpoint": e.path, "recipe": "llamacpp", "downloaded": e.present,
                "suggested": True, "labels": [e.kind if e.kind != "llm" else "chat"],
                "recipe_options": spec_defaults, "source": e.source, "state": str(e.state),
                **({"problem": e.problem} if e.problem else {})}

    # ------------------------------------------------------------- GET

    async def health(self, request: Request) -> Response:
        if request.method == "HEAD":
            return Response(status_code=200)
        loaded = self._loaded()
        max_models = dict(self.router.config.max_loaded)
        return JSONResponse({
            "status": "ok", "version": self.version,
            "model_loaded": loaded[0].name if loaded else None,
            "telemetry": {"enabled": False},  # nothing is captured or sent anywhere
            "all_models_loaded": [self._loaded_entry(s) for s in loaded],
            "max_models": max_models,
        })

    def _loaded_entry(self, s: ModelStatus) -> dict[str, Any]:
        return {
            "model_name": s.name, "checkpoint": s.options.model_path if s.options else None,
            "type": s.kind, "device": "cpu",
            "backend_url": f"{s.url}/v1" if s.url else None, "pid": s.pid,
            "status": "in_use" if s.requests_in_flight else "ready", "loaded": True,
            "pinned": s.pinned, "recipe": "llamacpp", "recipe_options": recipe_options(s),
            "is_busy": s.requests_in_flight > 0, "is_streaming": s.name in self.streams,
            "requests_in_flight": s.requests_in_flight,
            **({"launch_command": list(s.argv)} if s.argv else {}),
            "last_use": int((s.last_used or 0.0) * 1000), "load_seconds": s.load_seconds,
        }

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
        return JSONResponse({
            "OS Version": platform.platform(), "Processor": platform.processor() or platform.machine(),
            "Physical Memory": f"{psutil.virtual_memory().total / 2**30:.1f} GB",
            "devices": {"cpu": {"name": platform.processor() or platform.machine(), "available": True,
                                "cores": psutil.cpu_count(logical=False),
                                "threads": psutil.cpu_count()},
                        "amd_gpu": [], "nvidia_gpu": [], "amd_npu": {"available": False}},
            "recipes": {"llamacpp": {"default_backend": default, "backends": backends}},
        })

    async def models(self, request: Request) -> Response:
        if request.method == "HEAD":
            return Response(status_code=200)
        show_all = request.query_params.get("show_all") == "true"
        entries = [e for e in self.router.models() if e.source != "path" and (show_all or e.present)]
        return JSONResponse({"object": "list", "data": [self._model_object(e) for e in entries]})

    async def model(self, request: Request) -> Response:
        try:
            name = self._name(request.path_params["model_id"])
        except LemonError as exc:
            return error_response(exc)
        entry = next(e for e in self.router.models() if e.name == name)
        return JSONResponse(self._model_object(entry))

    # ------------------------------------------------------------- POST

    async def load(self, request: Request) -> Response:
        body = await read_body(request)
        assert body is not None
        model = body.get("model_name")
        if not isinstance(model, str) or not model:
            return invalid("'model_name' is required and must be a string")
        pinned = body.get("pinned")
        save = body.get("save_options", False)
        if not isinstance(save, bool):
            return invalid("'save_options' must be a boolean")
        try:
            name = self._name(model)
            options = lemonade_options(body, LOAD_KEYS)
            if options.extra_args and not self.security.allow_any_args:
                check_http_args(options.extra_args)
            if save:
                await self._save_options(name, body, options)
            result = await self.router.ensure_loaded(name, options, explicit=True,
                                                     pin=pinned if isinstance(pinned, bool) else None)
        except LemonError as exc:
            return error_response(exc)
        return JSONResponse({
            "status": "success", "model_name": model, "checkpoint": result.options.model_path,
            "recipe": "llamacpp",
            "action": result.action, "pid": result.pid, "seconds": round(result.seconds, 6),
            "load_seconds": round(result.load_seconds, 6),
            "backend_url": f"{result.url}/v1",
        })

    async def _save_options(self, name: str, body: dict[str, Any], options: LoadOptions) -> None:
        """``save_options``: the load options in ``body`` become the model's saved defaults
        (its registration's), which a later load without them uses. A key given with a value
        sets it, a key given "empty" (-1, "", "auto", null) forgets it, a key not given keeps
        what was saved.

        :raises InvalidOptions: the model is built in (it has no registration to save into).
        """
        spec = self.router.registry.lookup(name)
        if spec.source != "user":
            raise InvalidOptions(
                f"{name!r} is built in, so its options cannot be saved; register a name for its "
                "file (router.register) and save that one's options")
        saved = {k: v for k, v in vars(spec.defaults).items() if v is not None}
        for key, option in SAVED_KEYS.items():
            if key in body:
                value = getattr(options, option)
                if value is None:
                    saved.pop(option, None)
                else:
                    saved[option] = value
        await self.router.register(name, spec.path, kind=spec.kind,
                                   description=spec.description, **saved)

    async def unload(self, request: Request) -> Response:
        try:
            body = await read_body(request, required=False)
        except BadRequest as exc:
            if exc.status == 413:
                raise
            body = None  # as in Lemonade: a body that is not JSON means "unload all"
        body = body or {}
        model = body.get("model_name", body.get("model"))
        if "model_name" not in body and "model" not in body:
            await self.router.unload_all()
            return JSONResponse({"status": "success", "message": "All models unloaded successfully"})
        try:
            result = await self.router.unload(self._name(model))
        except ModelNotFound:
            return error_response(ModelNotLoaded(str(model)))
        except LemonError as exc:
            return error_response(exc)
        return JSONResponse({"status": "success", "message": "Model unloaded successfully",
                             "model_name": model, "pid": result.pid,
                             "seconds": round(result.seconds, 6)})

    def _auto_load_options(self, name: str, asked: LoadOptions) -> LoadOptions:
        """What an inference request auto-loads ``name`` with, as in Lemonade: the model's saved
        options (its registration's) and the body's ``ctx_size``. That is what ``POST load``
        without options asks for too, so a load after an auto-load is a no-op (#1603); the
        options of the model's last explicit load, which the Python API's auto-load keeps, are
        not used (as concrete values they override those; a saved ``chat_template`` of none
        cannot, it has no concrete value). A model that is ready is used as it is either way.
        """
        try:
            o = self.router.resolve(self.router.registry.lookup(name), asked)
        except LemonError:
            return asked  # the router reports the same problem when it loads
        return LoadOptions(ctx_size=o.ctx_size, threads=o.threads, backend=o.backend,
                           extra_args=o.extra_args, chat_template=o.chat_template)

    async def chat_completions(self, request: Request) -> Response:
        return await self._infer(request, "/v1/chat/completions")

    async def completions(self, request: Request) -> Response:
        return await self._infer(request, "/v1/completions")

    async def _infer(self, request: Request, path: str) -> Response:
        body = await read_body(request)
        assert body is not None
        model = body.get("model")
        if model is None:
            loaded = self._loaded()
            if not loaded:
                return bad("No model loaded and no model specified in request")
            model = loaded[0].name
        stream = body.pop("stream", False)
        if not isinstance(stream, bool):
            return invalid("'stream' must be a boolean")
        try:
            name = self._name(model)
            load_options = self._auto_load_options(name, lemonade_options(body,
                                                                          _INFERENCE_LOAD_KEYS))
            for key in _INFERENCE_LOAD_KEYS:
                body.pop(key, None)
            payload = {**body, "model": name}
            if not stream:
                completion = await _requests.request(self.router, name, path, payload,
                                                     load_options, None)
                self.stats.record(completion.response)
                return JSONResponse({**completion.response, "model": model})
            events = _requests.events(self.router, name, path, payload, load_options)
            try:  # the first event (or the error) before any header: errors keep their status
                first = await events.__anext__()
            except StopAsyncIteration:
                first = None
            except BaseException:
                await events.aclose()
                raise
        except LemonError as exc:
            return error_response(exc)
        return _SSE(_sse(events, first, str(model), self.stats, self.streams, name))


class _SSE(StreamingResponse):
    """An event stream whose generator is closed however the response ends (a client that
    goes away included), so the request's lease ends at once."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._content = content

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self._content, "aclose", None)
            if aclose is not None:  # even when cancelled (the client went away): bounded
                with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
                    await aclose()


async def _sse(events: Any, first: _requests.Event | None, model: str, stats: _Stats,
               streams: dict[str, int], name: str) -> AsyncIterator[bytes]:
    """The backend's events as they came (``model`` as the client named it), then ``[DONE]``;
    a failure mid-stream becomes one error event (OpenAI's SDK raises it) and no ``[DONE]``.
    ``streams[name]`` counts the streams of ``name`` being sent (health's ``is_streaming``)."""
    last = first
    streams[name] = streams.get(name, 0) + 1
    try:
        async with contextlib.aclosing(events):
            try:
                if first is not None:
                    yield _event({**first.data, "model": model})
                    async for last in events:
                        yield _event({**last.data, "model": model})
            except LemonError as exc:
                yield _event(json.loads(bytes(error_response(exc).body)))
                return
    finally:
        streams[name] -= 1
        if not streams[name]:
            del streams[name]
    if last is not None:
        stats.record(last.data)  # the last event carries the usage and timings
    yield b"data: [DONE]\n\n"


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def _live(request: Request) -> Response:
    """Lemonade's liveness probe (root only): the server answers, whatever its models do."""
    if request.method == "HEAD":
        return Response(status_code=200)
    return JSONResponse({"status": "ok"})


# ----------------------------------------------------------------- errors of the HTTP layer

async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": {"message": "The requested endpoint does not exist",
                                   "type": "not_found", "path": request.url.path}}, 404)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return JSONResponse({"error": "Method Not Allowed. Use POST for this endpoint"}, 405,
                            headers=exc.headers)
    if exc.status_code == 404:
        return await _not_found(request, exc)
    return JSONResponse({"error": {"message": exc.detail, "type": "bad_request"}}, exc.status_code)


async def _bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    return bad(str(exc), exc.status)


async def _disconnected(request: Request, exc: Exception) -> Response:
    return bad("the client went away before the request body was read")


class _Counter:
    """Counts the HTTP requests answered (``requests_served``); the outermost layer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.served = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            if scope["type"] == "http":
                self.served += 1


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def _routes(api: _Api) -> list[BaseRoute]:
    get: dict[str, Handler] = {"health": api.health, "models": api.models,
                               "models/{model_id:path}": api.model, "stats": api.stats_,
                               "system-info": api.system_info}
    post: dict[str, Handler] = {"load": api.load, "unload": api.unload,
                                "chat/completions": api.chat_completions,
                                "completions": api.completions}
    return [Route("/live", _live, methods=["GET"]),
            *(Route(f"{prefix}/{path}", handler, methods=["GET"])
              for prefix in PREFIXES for path, handler in get.items()),
            *(Route(f"{prefix}/{path}", handler, methods=["POST"])
              for prefix in PREFIXES for path, handler in post.items())]


@dataclass(frozen=True)
class App:
    """The ASGI app, its request counter and its guard (layers, outermost first:
    counter → guard → Starlette's exception handling → routes)."""

    asgi: ASGIApp
    counter: _Counter
    guard: Guard

    @property
    def requests_served(self) -> int:
        return self.counter.served


def create_app(router: AsyncRouter, *, version: str, security: Security | None = None,
               bound_host: str = "127.0.0.1") -> App:
    """The API over ``router`` (its handlers must run on the router's loop)."""
    security = security or Security()
    api = _Api(router, version, security)
    app = Starlette(routes=_routes(api), exception_handlers={
        404: _not_found, HTTPException: _http_error, BadRequest: _bad_request,
        ClientDisconnect: _disconnected})
    guard = Guard(app, security, bound_host)
    counter = _Counter(guard)
    return App(counter, counter, guard)
