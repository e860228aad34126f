"""The HTTP API as a Starlette app: Lemonade's routes (and OpenAI's), over one router.

The route table at the bottom is the whole API. Every handler parses the
request, makes one router call and shapes the answer; the load contract lives
only in the router. Errors are translated in one place, :func:`error_response`
(``ERROR_STATUS`` lists the mappings).

Every route is served under ``/api/v0``, ``/api/v1``, ``/v0`` and ``/v1`` alike,
as Lemonade does; a GET or HEAD on a POST route answers 405, not 404.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from lemon_magic import _requests
from lemon_magic._policy import ModelState
from lemon_magic._pulling import PullTarget, pull_target
from lemon_magic._records import ModelStatus
from lemon_magic.errors import InvalidModelFile, LemonError, ModelNotFound, ModelNotLoaded
from lemon_magic.options import LoadOptions
from lemon_magic.registry import ModelSpec
from lemon_magic.server._args import check_http_options
from lemon_magic.server._guard import Guard, Security
from lemon_magic.server._info import InfoApi, live
from lemon_magic.server._models import ModelsApi, save_options
from lemon_magic.server._sse import EventStream
from lemon_magic.server._wire import (
    ERROR_STATUS,
    LOAD_KEYS,
    MAX_BODY,
    BadRequest,
    BodyBudget,
    NonFiniteNumber,
    bad,
    error_response,
    invalid,
    lemonade_options,
    read_body,
    recipe_options,
    served_name,
)

if TYPE_CHECKING:
    from lemon_magic.router import AsyncRouter

T = TypeVar("T")

__all__ = ("ERROR_STATUS", "MAX_BODY", "PREFIXES", "create_app")

#: every route lives under each of these, as in Lemonade
PREFIXES = ("/api/v0", "/api/v1", "/v0", "/v1")
#: the only load option an inference body may carry (Lemonade's allow-list)
_INFERENCE_LOAD_KEYS = ("ctx_size",)
#: how a wrong-kind refusal names a model's kind
_KIND_NAMES = {"llm": "an LLM", "embedding": "an embedding model", "reranking": "a reranking model"}


@dataclass
class _Api:
    """The handlers, bound to one router (each: parse, one router call, shape)."""

    router: AsyncRouter
    version: str
    security: Security
    info: InfoApi
    models: ModelsApi
    #: model name → HTTP streams of it being sent now
    streams: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------- names

    def _loaded(self) -> list[ModelStatus]:
        ready = [s for s in self.router.status() if s.state is ModelState.READY]
        return sorted(ready, key=lambda s: s.last_used or 0.0, reverse=True)

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
            "type": s.kind, "device": (s.remote.options.get("llamacpp_backend") if s.remote else None)
            or "cpu", "backend_url": s.url if s.remote else f"{s.url}/v1" if s.url else None,
            "pid": s.pid,
            "status": "in_use" if s.requests_in_flight else "ready", "loaded": True,
            "pinned": s.pinned, "recipe": "llamacpp", "recipe_options": recipe_options(s),
            "is_busy": s.requests_in_flight > 0, "is_streaming": s.name in self.streams,
            "requests_in_flight": s.requests_in_flight,
            **({"launch_command": list(s.argv)} if s.argv else {}),
            "last_use": int((s.last_used or 0.0) * 1000), "load_seconds": s.load_seconds,
        }

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
        if pinned is not None and not isinstance(pinned, bool):
            return invalid("'pinned' must be a boolean")
        try:
            name = served_name(self.router.registry, model)
            options = lemonade_options(body, LOAD_KEYS, remote="llamacpp_backend" in body
                                       and self._is_remote(name))  # no file read on a no-op
            if not self.security.allow_any_args:
                check_http_options(options)
            if save:
                await save_options(self.router, name, body, options)
            result = (self.router._try_noop(name, options) if pinned is None else None) or \
                await self.router.ensure_loaded(name, options, explicit=True, pin=pinned)
        except LemonError as exc:
            return error_response(exc)
        return JSONResponse({
            "status": "success", "model_name": model, "checkpoint": result.options.model_path,
            "recipe": "llamacpp",
            "action": result.action, "pid": result.pid, "seconds": round(result.seconds, 6),
            "load_seconds": round(result.load_seconds, 6),
            "backend_url": result.url if result.remote else f"{result.url}/v1",
        })

    async def unload(self, request: Request) -> Response:
        try:
            body = await read_body(request, required=False)
        except BadRequest as exc:
            if exc.status != 400 or isinstance(exc, NonFiniteNumber):
                raise  # too large, too much in flight, or a body Python reads but JSON does not:
                # its own answer, never "unload all"
            body = None  # as in Lemonade: a body that is not JSON means "unload all"
        body = body or {}
        model = body.get("model_name", body.get("model"))
        if "model_name" not in body and "model" not in body:
            try:
                await self.router.unload_all()
            except LemonError as exc:  # a remote that refused or did not answer (the rest went)
                return error_response(exc)
            return JSONResponse({"status": "success", "message": "All models unloaded successfully"})
        try:
            result = await self.router.unload(served_name(self.router.registry, model))
        except ModelNotFound:
            return error_response(ModelNotLoaded(str(model)))
        except LemonError as exc:
            return error_response(exc)
        return JSONResponse({"status": "success", "message": "Model unloaded successfully",
                             "model_name": model, "pid": result.pid,
                             "seconds": round(result.seconds, 6),
                             **({"detail": result.detail} if result.detail else {})})

    def _auto_load_options(self, spec: ModelSpec, asked: LoadOptions) -> LoadOptions:
        """What an inference request auto-loads ``spec`` with, as in Lemonade: the model's saved
        options (its registration's) and the body's ``ctx_size``. That is what ``POST load``
        without options asks for too, so a load after an auto-load is a no-op (#1603); the
        options of the model's last explicit load, which the Python API's auto-load keeps, are
        not used (as concrete values they override those; a saved ``chat_template`` of none
        cannot, it has no concrete value). A model that is ready is used as it is either way.
        """
        try:
            o = self.router.resolve(spec, asked)
        except LemonError:
            return asked  # the router reports the same problem when it loads
        return LoadOptions(ctx_size=o.ctx_size, threads=o.threads, backend=o.backend,
                           extra_args=o.extra_args, chat_template=o.chat_template)

    def _is_remote(self, name: str) -> bool:
        try:
            return self.router.registry.lookup(name).remote is not None
        except LemonError:
            return False

    def _spec_or_target(self, name: str) -> ModelSpec | PullTarget:
        """The model's registration, or for a model not pulled yet what pulling it means."""
        try:
            return self.router.registry.lookup(name)
        except (ModelNotFound, InvalidModelFile):
            target = pull_target(name)
            if target is None:
                raise
            return target

    async def chat_completions(self, request: Request) -> Response | EventStream:
        return await self._infer(request, "/v1/chat/completions", "llm")

    async def completions(self, request: Request) -> Response | EventStream:
        return await self._infer(request, "/v1/completions", "llm")

    async def embeddings(self, request: Request) -> Response | EventStream:
        return await self._infer(request, "/v1/embeddings", "embedding")

    async def responses(self, request: Request) -> Response | EventStream:
        return await self._infer(request, "/v1/responses", "llm")

    # llama-server's own routes (at its root), for the model the body names
    async def tokenize(self, request: Request) -> Response | EventStream:
        return await self._infer(request, "/tokenize", None)

    async def detokenize(self, request: Request) -> Response | EventStream:
        return await self._infer(request, "/detokenize", None)

    async def apply_template(self, request: Request) -> Response | EventStream:
        return await self._infer(request, "/apply-template", "llm")

    async def _infer(self, request: Request, path: str, kind: str | None) -> Response | EventStream:
        """One inference request: auto-load (never a reload), then the backend's answer as it
        is (``model`` as the client named it), whole or streamed. ``kind`` ``None``: a route
        every kind of model serves, never streamed."""
        body = await read_body(request)
        assert body is not None
        model = body.get("model")
        if model is None:
            loaded = [s for s in self._loaded() if kind is None or s.kind == kind]
            if not loaded:
                return bad("No model loaded and no model specified in request")
            model = loaded[0].name
        if not isinstance(model, str):
            return invalid("'model' must be a string (a model name)")
        streams = kind == "llm" and path.startswith("/v1/")
        stream = body.pop("stream", False)
        if not isinstance(stream, bool) or (stream and not streams):
            return invalid("'stream' must be a boolean" if not isinstance(stream, bool) else
                           f"{path.rpartition('/')[2]} cannot be streamed")
        try:
            name = served_name(self.router.registry, model)
            spec = self._spec_or_target(name)
            if kind is not None and spec.kind != kind:
                return invalid(f"model {model!r} is {_KIND_NAMES.get(spec.kind, spec.kind)}: it "
                               f"does not serve {path.removeprefix('/v1/').removeprefix('/')}")
            asked = lemonade_options(body, _INFERENCE_LOAD_KEYS,
                                     remote=isinstance(spec, ModelSpec) and spec.remote is not None)
            load_options = self._auto_load_options(spec, asked) if isinstance(spec, ModelSpec) else asked
            for key in _INFERENCE_LOAD_KEYS:
                body.pop(key, None)
            if "max_completion_tokens" in body and "max_tokens" not in body:
                # OpenAI's newer name (LangChain sends it); llama-cpp-python knows only the old
                # one and would otherwise generate until the context is full
                body["max_tokens"] = body["max_completion_tokens"]
            payload = {**body, "model": name}
            if not stream:
                completion = await _unless_gone(request, functools.partial(
                    _requests.request, self.router, name, path, payload, load_options, None))
                if completion is None:  # the client went away: the request was ended with it
                    return Response(status_code=499)
                if not path.startswith("/v1/"):  # llama-server's own: its answer as it is
                    return JSONResponse(dict(completion.response))
                if kind == "llm":
                    self.info.stats.record(completion.response)
                return JSONResponse({**completion.response, "model": model})
        except LemonError as exc:
            return error_response(exc)
        lease = _requests.Lease()
        self.streams[name] = self.streams.get(name, 0) + 1
        return EventStream(_requests.events(self.router, name, path, payload, load_options, lease),
                           lease, model=str(model), error_response=error_response,
                           send_timeout=lambda: self.router.config.stream_idle_timeout,
                           on_event=self.info.stats.record_event,
                           on_end=functools.partial(self._stream_ended, name))

    def _stream_ended(self, name: str) -> None:
        self.streams[name] -= 1
        if not self.streams[name]:
            del self.streams[name]


async def _unless_gone(request: Request, work: Callable[[], Awaitable[T]]) -> T | None:
    """``work()``'s result, or ``None`` if the client disconnects first (``work`` is then
    cancelled: a backend or remote stops generating for nobody, and its lease ends)."""
    outcome: list[T | LemonError] = []
    async with anyio.create_task_group() as tg:
        async def run() -> None:
            try:
                outcome.append(await work())
            except LemonError as exc:
                outcome.append(exc)
            finally:
                tg.cancel_scope.cancel()

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        tg.start_soon(watch)
    if not outcome:
        return None
    result = outcome[0]
    if isinstance(result, LemonError):
        raise result
    return result


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
    return bad(str(exc), exc.status, exc.headers)


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


Handler = Callable[[Request], Coroutine[Any, Any, Response | EventStream]]


def _routes(api: _Api) -> list[BaseRoute]:
    """One table of routes, mounted under each prefix (hot routes first: a request is matched
    against the routes in order)."""
    models, info = api.models, api.info
    post, get = ["POST"], ["GET"]
    table: dict[str, tuple[Handler, list[str]]] = {
        "chat/completions": (api.chat_completions, post), "completions": (api.completions, post),
        "responses": (api.responses, post), "tokenize": (api.tokenize, post),
        "detokenize": (api.detokenize, post), "apply-template": (api.apply_template, post),
        "load": (api.load, post), "health": (api.health, get), "embeddings": (api.embeddings, post),
        "unload": (api.unload, post), "models": (models.models, get),
        "models/{model_id:path}/options": (models.options, ["GET", "POST", "DELETE"]),
        "models/{model_id:path}": (models.model, get), "stats": (info.stats_, get),
        "system-info": (info.system_info, get), "params": (info.params, ["GET", "POST"]),
        "pull/variants": (models.variants, get), "pull": (models.pull, post),
        "delete": (models.delete, post)}
    inner = [Route(f"/{path}", handler, methods=methods) for path, (handler, methods) in table.items()]
    return [Route("/live", live, methods=get), *(Mount(prefix, routes=inner) for prefix in PREFIXES)]


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
    api = _Api(router, version, security, InfoApi(router, security.allow_any_args),
               ModelsApi(router, security.allow_any_args))
    app = Starlette(routes=_routes(api), exception_handlers={
        404: _not_found, HTTPException: _http_error, BadRequest: _bad_request,
        ClientDisconnect: _disconnected})
    guard = Guard(BodyBudget(app), security, bound_host)  # bodies held at once: bounded
    counter = _Counter(guard)
    return App(counter, counter, guard)
