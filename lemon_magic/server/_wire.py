"""The wire side of the HTTP API: request bodies parsed into load options, and every
LemonError shaped as an OpenAI/Lemonade error answer in one place (``ERROR_STATUS``)."""

from __future__ import annotations

import array
import itertools
import json
import math
import re
import shlex
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from lemon_magic._pulling import pull_target
from lemon_magic._records import ModelStatus
from lemon_magic.errors import (
    BackendUnavailable,
    HubUnreachable,
    InferenceError,
    InvalidCheckpoint,
    InvalidModelFile,
    InvalidOptions,
    LemonError,
    LoadError,
    LoadQueueFull,
    ModelNotFound,
    ModelNotLoaded,
    PullError,
    RemoteAuthError,
    RemoteError,
    RemoteUnreachable,
    RepoAccessDenied,
    RepoNotFound,
    RequestTimeout,
    SlotsFull,
    VariantNotFound,
    WaitTimeout,
)
from lemon_magic.options import LoadOptions
from lemon_magic.registry import Registry

__all__ = ("ERROR_STATUS", "LOAD_KEYS", "MAX_BODY", "MAX_CONTAINERS", "MAX_DEPTH", "MAX_IN_FLIGHT",
           "MAX_VALUES", "SAVED_KEYS", "BadRequest", "BodyBudget", "NonFiniteNumber", "bad",
           "check_shape", "error_response", "invalid", "json_type", "lemonade_options",
           "read_body", "recipe_options", "served_name")

#: the largest request body accepted, in bytes (larger: 413)
MAX_BODY = 16 * 1024 * 1024
#: what each LemonError becomes (checked in order: the first matching class wins)
ERROR_STATUS: tuple[tuple[type[LemonError], int, str], ...] = (
    (ModelNotFound, 404, "model_not_found"),
    (InvalidCheckpoint, 400, "invalid_checkpoint"),
    (RepoNotFound, 400, "unknown_model"),
    (VariantNotFound, 400, "unknown_model"),
    (RepoAccessDenied, 403, "hub_access_denied"),
    (HubUnreachable, 503, "lemond_offline"),
    (PullError, 500, "pull_error"),
    (ModelNotLoaded, 404, "model_not_loaded"),
    (InvalidOptions, 400, "invalid_request_error"),
    (SlotsFull, 409, "slots_pinned_error"),
    (LoadQueueFull, 503, "load_queue_full"),  # with Retry-After
    (RequestTimeout, 504, "timeout"),
    (WaitTimeout, 504, "timeout"),
    (RemoteUnreachable, 502, "remote_unreachable"),  # a remote model's server: a bad gateway
    (RemoteAuthError, 502, "remote_auth_error"),
    (RemoteError, 502, "remote_error"),
    (InvalidModelFile, 500, "model_load_error"),
    (BackendUnavailable, 500, "model_load_error"),
    (LoadError, 500, "model_load_error"),
    (InferenceError, 500, "inference_error"),
    (LemonError, 500, "server_error"),
)

class BadRequest(Exception):
    """A request body the API cannot take (400, Lemonade's bare-string error shape)."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


def error_response(exc: LemonError) -> JSONResponse:
    """The one translation of router errors into HTTP answers (see ``ERROR_STATUS``)."""
    status, code = next((s, c) for cls, s, c in ERROR_STATUS if isinstance(exc, cls))
    if isinstance(exc, InferenceError) and exc.status is not None and 400 <= exc.status < 500:
        status = exc.status  # the backend refused the request itself: pass its status on
    if isinstance(exc, InferenceError) and getattr(exc, "remote", None) and \
            not isinstance(exc, RequestTimeout) and (exc.status in (None, 404) or exc.status >= 500):
        status, code = 502, "remote_error"  # a remote model's server failed: a bad gateway
    if isinstance(exc, ModelNotLoaded):  # Lemonade's /unload answers a bare string
        return JSONResponse({"error": f"Model not loaded: {exc.model}"}, status)
    message = exc.render()
    if code == "model_load_error":
        which = f" {exc.model!r}" if exc.model is not None else ""
        message = f"Failed to load model{which}: {exc.render()}"
    body: dict[str, Any] = {"message": message, "type": code, "param": None, "code": code}
    if exc.model is not None:
        body["requested_model"] = exc.model
    if code == "model_not_found":
        body["param"] = "model"
        body["message"] += "; GET /api/v1/models?show_all=true lists every model"
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, LoadQueueFull) else None
    return JSONResponse({"error": body}, status, headers=headers)


def bad(message: str, status: int = 400, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=headers)


def invalid(message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": f"Invalid request: {message}",
                                   "type": "invalid_request_error", "param": None,
                                   "code": "invalid_request"}}, 400)


async def read_body(request: Request, *, required: bool = True) -> dict[str, Any] | None:
    """The JSON object in the body (``None`` for an empty optional body), the one parser of
    every route: bounded in bytes (:data:`MAX_BODY`), in what parsing it would make
    (:func:`check_shape`: Python objects cost far more than their JSON), and in bytes held
    across requests (:class:`BodyBudget`); numbers must be finite.

    :raises BadRequest: too large (413), too much in flight (429), empty when required, not
        JSON, a non-finite number, or not an object.
    """
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise BadRequest(f"Request body is larger than {MAX_BODY} bytes", 413)
    held = request.scope.get(BodyBudget.KEY)
    raw = bytearray()
    async for chunk in request.stream():
        if len(raw) + len(chunk) > MAX_BODY:
            raise BadRequest(f"Request body is larger than {MAX_BODY} bytes", 413)
        if held is not None:
            held.take(len(chunk))
        raw += chunk
    if not raw.strip():
        if required:
            raise BadRequest("Request body is required but was empty")
        return None
    check_shape(raw)
    try:
        data = json.loads(raw, parse_constant=_non_finite, parse_float=_finite_float)
    except _NonFinite as exc:
        raise NonFiniteNumber(str(exc)) from None
    except RecursionError:
        raise BadRequest("Invalid JSON in request body: nested too deeply") from None
    except ValueError as exc:  # bad JSON or bad UTF-8
        why = "a number has too many digits" if "digits" in str(exc) else str(exc)
        raise BadRequest(f"Invalid JSON in request body: {why}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"Request body must be a JSON object, got {json_type(data)}")
    return data


#: arrays and objects one body may hold (each costs ~60 bytes parsed, and ``{}`` is 3 bytes)
MAX_CONTAINERS = 100_000
#: values one body may hold in all its arrays and objects (a prompt of token ids is one each)
MAX_VALUES = 1_000_000
#: how deep arrays and objects may nest
MAX_DEPTH = 64
#: bytes of request bodies held at once across requests (a request holds its body's until
#: it is answered); past it a new body is a 429
MAX_IN_FLIGHT = 64 * 1024 * 1024

#: a JSON string; one left open runs to the end of the body, so that every match attempt succeeds
#: (a pattern that must find the closing quote rescans the rest of the body from every ``"`` of an
#: unclosed string: minutes for a few hundred KB of ``"\\``, on the router's loop)
_STRING = re.compile(rb'"[^"\\]*(?:\\.?[^"\\]*)*(?:"|\Z)')
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKET = bytes(set(range(256)) - set(b"[]{}"))


def check_shape(raw: bytes | bytearray) -> None:
    """Refuse a body whose parsed form would be too large, before parsing it (issue 21: 15 MiB
    of ``[{},{},…]`` made 479 MiB of Python objects). Counts bytes outside strings; it costs one
    copy of the body only when a quick upper bound (counting inside strings too) is over.

    :raises BadRequest: 413, saying which bound.
    """
    opens = raw.count(b"{") + raw.count(b"[")
    if opens <= MAX_DEPTH and raw.count(b",") < MAX_VALUES:
        return
    outside = _STRING.sub(b'""', raw)
    opens = outside.count(b"{") + outside.count(b"[")
    why = None
    if opens > MAX_CONTAINERS:
        why = f"more than {MAX_CONTAINERS} arrays and objects"
    elif outside.count(b",") >= MAX_VALUES:
        why = f"more than {MAX_VALUES} values"
    elif opens > MAX_DEPTH:
        steps = array.array("b", outside.translate(None, _NOT_BRACKET).translate(_DEPTH_STEP))
        if max(itertools.accumulate(steps), default=0) > MAX_DEPTH:
            why = f"arrays and objects nested more than {MAX_DEPTH} deep"
    if why is not None:
        raise BadRequest(f"Request body is too large to parse: {why}", 413)


class BodyBudget:
    """The ASGI layer that bounds the bytes of request bodies held at once (see
    :data:`MAX_IN_FLIGHT`): :func:`read_body` takes from it as a body arrives, and the
    request gives it all back once it is answered (streams included)."""

    #: where :func:`read_body` finds the request's share (an ASGI scope key)
    KEY = "lemon_magic.body_budget"

    def __init__(self, app: ASGIApp, limit: int = MAX_IN_FLIGHT) -> None:
        self.app = app
        self.limit = limit
        self.used = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held = _Held(self)
        scope[self.KEY] = held
        try:
            await self.app(scope, receive, send)
        finally:
            self.used -= held.bytes
            held.bytes = 0


class _Held:
    """One request's share of a :class:`BodyBudget`."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.bytes = 0

    def take(self, n: int) -> None:
        """:raises BadRequest: 429, the budget would be exceeded."""
        if self.budget.used + n > self.budget.limit:
            raise BadRequest(f"Too many request bytes in flight (over {self.budget.limit} across "
                             "requests being answered); retry shortly", 429, {"Retry-After": "1"})
        self.budget.used += n
        self.bytes += n


class _NonFinite(ValueError):
    """A body's number that is not finite (``NaN``, ``Infinity``, or a literal such as
    ``1e999`` that only a float's infinity can hold): Python's ``json`` takes them, JSON does
    not, and a setting such as ``drain_timeout: NaN`` breaks every wait it bounds (issue 21)."""


class NonFiniteNumber(BadRequest):
    """A body that Python's ``json`` reads but JSON does not: a 400 on every route."""

    def __init__(self, literal: str) -> None:
        super().__init__(f"Invalid JSON in request body: {literal} is a non-finite number "
                         "(NaN and Infinity are not JSON)")


def _non_finite(literal: str) -> float:
    raise _NonFinite(literal)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise _NonFinite(literal if len(literal) <= 40 else f"{literal[:40]}…")
    return value


def json_type(value: object) -> str:
    """What a decoded JSON value is, in JSON's words (``"an array"``, ``"null"``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = ((dict, "an object"), (list, "an array"), (str, "a string"), ((int, float), "a number"))
    return next((name for kind, name in names if isinstance(value, kind)), type(value).__name__)


def lemonade_options(body: dict[str, Any], keys: tuple[str, ...], *,
                     remote: bool = False) -> LoadOptions:
    """Load options from a body's Lemonade keys (and ours); "empty" values (-1, "", "auto",
    null) mean unset, as in Lemonade. For a ``remote`` model, ``llamacpp_backend`` is the remote's
    device (its ``backend``); here only ``cpu`` exists.

    :raises InvalidOptions: a value the options cannot take.
    """
    def given(key: str, kind: type | tuple[type, ...]) -> Any:
        value = body.get(key)
        if value is None or value == -1 or (kind is str and value in ("", "auto")):
            return None
        if isinstance(value, bool) or not isinstance(value, kind):
            what = "an integer, or -1 for automatic" if kind is int else "a string"
            raise InvalidOptions(f"{key} must be {what}, got {json_type(value)} ({value!r})")
        return value

    wanted: dict[str, Any] = {}
    if "ctx_size" in keys:
        wanted["ctx_size"] = given("ctx_size", int)
    if "llamacpp_args" in keys:
        value = body.get("llamacpp_args")
        if isinstance(value, list) and all(isinstance(a, str) and a for a in value):
            wanted["extra_args"] = value or None
        else:
            wanted["extra_args"] = given("llamacpp_args", str)
    if "llamacpp_backend" in keys:
        device = given("llamacpp_backend", str)
        if remote and device is not None:
            wanted["backend"] = device  # checked against the remote's devices by its load
        elif device not in (None, "cpu"):
            raise InvalidOptions(f"llamacpp_backend {device!r} is not available here (only 'cpu')")
    for key, kind in (("backend", str), ("threads", int), ("chat_template", str)):  # ours
        if key in keys and (key in body or key not in wanted):
            wanted[key] = given(key, kind)
    return LoadOptions(**wanted)


LOAD_KEYS = ("ctx_size", "llamacpp_args", "llamacpp_backend", "backend", "threads", "chat_template")
#: what ``save_options`` saves: a load body's key → the ``LoadOptions`` field it sets
SAVED_KEYS = {"ctx_size": "ctx_size", "llamacpp_args": "extra_args", "backend": "backend",
              "threads": "threads", "chat_template": "chat_template"}


def recipe_options(s: ModelStatus) -> dict[str, Any]:
    """A loaded model's options as Lemonade reports them (a remote model: as its server does)."""
    if s.remote is not None:
        return dict(s.remote.options)
    if s.options is None:
        return {}
    o = s.options
    return {"ctx_size": o.ctx_size, "llamacpp_backend": "cpu", "llamacpp_args": shlex.join(o.extra_args),
            "backend": o.backend, "threads": o.threads, "chat_template": o.chat_template}


def served_name(registry: Registry, name: object) -> str:
    """A model name as the registry knows it (``user.X`` → ``X``, ``X:latest`` → ``X``); only
    registered names are served over HTTP (never a file path).

    A catalogue name or a Hub checkpoint (``org/repo[:VARIANT]``) is served too: loading it
    pulls it first, as ``POST pull`` does.

    :raises ModelNotFound: anything else.
    """
    if not isinstance(name, str) or not name:
        raise ModelNotFound(repr(name), registry.names(), paths=False)
    name = name.removesuffix(":latest")  # as Lemonade does (Ollama-style clients add it)
    if name.startswith("user.") and name[5:] in registry.user_names():
        return name[5:]
    if name not in registry.names() and pull_target(name) is None:
        raise ModelNotFound(name, registry.names(), paths=False)
    return name
