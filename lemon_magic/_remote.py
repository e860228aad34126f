"""Remote models: a model served by another machine's server, driven over HTTP.

Two protocols (``api``):

* ``"lemonade"``: Lemonade Server, or another ``lemon-magic serve``. Load
  control through its declarative ``POST /api/v1/load``, truth from its
  ``GET /api/v1/health``, ``POST /api/v1/unload``.
* ``"openai"``: any OpenAI-compatible server (vLLM, llama-server and its router
  mode, Ollama's ``/v1``, LM Studio). No load control: "load" checks that the
  server lists the model, and refuses load options it cannot apply.

The pieces, each usable on its own:

* :class:`RemoteSpec` and :func:`parse_remote`: what a registration says (the
  API key is read from the named environment variable at call time only: never
  stored, printed or shown in a repr);
* :func:`remote_action`: sans-IO, what the remote's own report means for a
  wanted load (the #1603 lesson across machines: decide against the remote's
  truth, never a cached belief);
* :class:`RemoteClient`: the HTTP calls, every one bounded in time, with errors
  translated in one place (:func:`remote_error`).
"""

from __future__ import annotations

import os
import re
import shlex
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from lemon_magic.errors import (
    InferenceError,
    InvalidOptions,
    LemonError,
    LoadError,
    ModelNotFound,
    RemoteAuthError,
    RemoteError,
    RemoteUnreachable,
    RequestTimeout,
)
from lemon_magic.options import LoadOptions

__all__ = ("APIS", "LLAMACPP_BACKENDS", "RemoteClient", "RemoteEntry", "RemoteLoad", "RemoteSpec",
           "lemonade_load_body", "parse_remote", "remote_action", "remote_error")

Api = Literal["lemonade", "openai"]
#: the protocols a remote may speak
APIS: tuple[Api, ...] = ("lemonade", "openai")
#: what ``backend`` may be for a lemonade remote (sent as ``llamacpp_backend``)
LLAMACPP_BACKENDS = frozenset({"cpu", "vulkan", "rocm", "metal", "cuda", "system"})
#: the path suffixes a lemonade URL may carry; control calls go to ``<root>/api/v1``
_LEMONADE_PREFIXES = ("/api/v1", "/api/v0", "/v1", "/v0")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: connect timeout of every call, in seconds
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class RemoteSpec:
    """Where a remote model lives and how to talk to it (build it with :func:`parse_remote`).

    :param url: the base URL as registered (``http://host:13305``, ``http://host:13305/api/v1``,
        ``http://host:8000/v1``).
    :param remote_model: the model's name on the remote (what requests send as ``model``).
    :param api: ``"lemonade"`` or ``"openai"``.
    :param api_key_env: the environment variable holding the API key (the key is read at call
        time and never stored).
    """

    url: str
    remote_model: str
    api: Api = "lemonade"
    api_key_env: str | None = None

    @property
    def root(self) -> str:
        """The URL without a trailing slash (and, for lemonade, without its API prefix)."""
        url = self.url.rstrip("/")
        if self.api == "lemonade":
            for prefix in _LEMONADE_PREFIXES:
                if url.endswith(prefix):
                    return url[:-len(prefix)]
        return url

    @property
    def base_url(self) -> str:
        """The OpenAI base URL inference goes to (``{base_url}/chat/completions``)."""
        return f"{self.root}/api/v1" if self.api == "lemonade" else self.root

    def api_key(self) -> str | None:
        """The key, read from ``$api_key_env`` now (``None``: no variable named, or it is unset)."""
        return (os.environ.get(self.api_key_env) or None) if self.api_key_env else None

    def headers(self) -> dict[str, str]:
        """The headers every call sends (``Authorization: Bearer`` when the key is set)."""
        key = self.api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}


def parse_remote(url: object, remote_model: object, api: object = "lemonade",
                 api_key_env: object = None) -> RemoteSpec:
    """Validate a registration's remote fields.

    :raises InvalidOptions: one line naming the bad field: a URL that is not ``http(s)://host``
        (or carries a user, a query or a fragment), an unknown api, a missing remote model, an
        environment variable name that is not one.
    """
    if api not in APIS:
        raise InvalidOptions(f"api must be one of {', '.join(APIS)}, got {api!r}")
    if not isinstance(url, str) or not url.strip():
        raise InvalidOptions(f"remote URL must be a string like http://host:13305, got {url!r}")
    url = url.strip()
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number raises here
    except ValueError as exc:
        raise InvalidOptions(f"remote URL {url!r} is not valid: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidOptions(f"remote URL {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise InvalidOptions(f"remote URL {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidOptions("remote URL must not carry credentials; name an environment "
                             "variable holding the key with --api-key-env")
    if parts.query or parts.fragment:
        raise InvalidOptions(f"remote URL {url!r} must not have a query or a fragment")
    if not isinstance(remote_model, str) or not remote_model.strip():
        raise InvalidOptions("a remote model needs --remote-model: its name on the remote server")
    if api_key_env is not None and (not isinstance(api_key_env, str)
                                    or not _ENV_NAME.match(api_key_env)):
        raise InvalidOptions(f"api_key_env must be an environment variable name, got {api_key_env!r}")
    return RemoteSpec(url.rstrip("/"), remote_model.strip(), api, api_key_env)


# ------------------------------------------------------------------ the remote's truth


@dataclass(frozen=True)
class RemoteEntry:
    """What the remote reports about the model now (a snapshot).

    For a lemonade remote this is its ``/health`` entry; for an openai remote, its
    ``/models`` entry (``loaded`` means listed and not reported unloaded).
    """

    #: the remote serves the model right now
    loaded: bool
    #: the remote lists the model at all (always ``True`` when loaded)
    listed: bool = False
    pid: int | None = None
    ctx_size: int | None = None
    #: its backend arguments as the remote reports them (``None``: not reported)
    llamacpp_args: tuple[str, ...] | None = None
    llamacpp_backend: str | None = None
    checkpoint: str | None = None
    #: the remote's own word for its state (``ready``, ``in_use``, ``loaded``, ``unloaded``…)
    status: str | None = None
    #: everything the remote reported about the model's options, for display
    recipe_options: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class RemoteLoad:
    """What a remote load did: ``action`` as the remote's pids (or its own answer) tell it."""

    action: Literal["loaded", "noop", "reloaded"]
    pid: int | None
    seconds: float
    #: the remote's answer to ``POST load``
    response: Mapping[str, Any] = field(default_factory=dict, compare=False)


def lemonade_load_body(model: str, options: LoadOptions) -> dict[str, Any]:
    """The body of ``POST /api/v1/load`` for ``options`` (unset options are left out, so the
    remote applies its own defaults and saved options).

    :raises InvalidOptions: an option Lemonade's load cannot take (``threads``, ``chat_template``,
        a ``backend`` that is not a llama.cpp device), never silently dropped.
    """
    body: dict[str, Any] = {"model_name": model}
    refused = [name for name in ("threads", "chat_template") if getattr(options, name) is not None]
    if refused:
        raise InvalidOptions(f"a lemonade remote cannot apply {', '.join(refused)} (its load takes "
                             "ctx_size, extra_args and backend)")
    if options.ctx_size is not None:
        body["ctx_size"] = options.ctx_size
    if options.extra_args is not None:
        body["llamacpp_args"] = shlex.join(options.extra_args)
    if options.backend is not None:
        if options.backend not in LLAMACPP_BACKENDS:
            raise InvalidOptions(f"backend of a lemonade remote is its llama.cpp device "
                                 f"({', '.join(sorted(LLAMACPP_BACKENDS))}), got {options.backend!r}")
        body["llamacpp_backend"] = options.backend
    return body


def remote_action(entry: RemoteEntry | None, wanted: LoadOptions) -> Literal["noop", "load", "reload"]:
    """What a wanted explicit load means against the remote's own report (pure: no I/O).

    ``"load"``: the remote does not have the model loaded. ``"noop"``: every option
    ``wanted`` sets is what the remote reports. ``"reload"``: an option differs, or the
    remote does not report it (the remote's declarative ``/load`` then decides; compare
    pids to see what it did). Options ``wanted`` leaves unset are the remote's to choose,
    so they never cause a reload: we cannot know its defaults, and guessing would reload
    a big model for nothing (#1603).
    """
    if entry is None or not entry.loaded:
        return "load"
    if wanted.ctx_size is not None and wanted.ctx_size != entry.ctx_size:
        return "reload"
    if wanted.extra_args is not None and wanted.extra_args != entry.llamacpp_args:
        return "reload"
    if wanted.backend is not None and wanted.backend != entry.llamacpp_backend:
        return "reload"
    return "noop"


def _bare(name: object) -> str:
    """A Lemonade name without its ``user.`` prefix or ``:latest`` suffix (both spellings mean it)."""
    return str(name).removeprefix("user.").removesuffix(":latest")


def _entry_from_health(raw: Mapping[str, Any], model: str) -> RemoteEntry:
    for item in raw.get("all_models_loaded") or ():
        if not isinstance(item, dict) or _bare(item.get("model_name")) != _bare(model):
            continue
        opts = item.get("recipe_options") or {}
        args = opts.get("llamacpp_args")
        try:
            split = tuple(shlex.split(args)) if isinstance(args, str) else \
                tuple(args) if isinstance(args, list) else None
        except ValueError:
            split = None
        ctx, pid = opts.get("ctx_size"), item.get("pid")
        return RemoteEntry(
            loaded=True, listed=True, pid=pid if isinstance(pid, int) else None,
            ctx_size=ctx if isinstance(ctx, int) and not isinstance(ctx, bool) else None,
            llamacpp_args=split, llamacpp_backend=opts.get("llamacpp_backend") or None,
            checkpoint=item.get("checkpoint"), status=item.get("status"), recipe_options=dict(opts))
    return RemoteEntry(loaded=False)


def _entry_from_models(ids: Mapping[str, Mapping[str, Any]], model: str) -> RemoteEntry:
    item = ids.get(model)
    if item is None:
        return RemoteEntry(loaded=False)
    status = item.get("status")
    value = status.get("value") if isinstance(status, dict) else None  # llama-server's router
    return RemoteEntry(loaded=value in (None, "loaded"), listed=True,
                       status=value if isinstance(value, str) else None)


# ------------------------------------------------------------------ the error boundary


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def _message(response: httpx.Response) -> str:
    """The remote's error message (OpenAI's ``{"error": {"message"}}`` or Lemonade's
    ``{"error": "..."}``), first line only."""
    try:
        data = response.json()
    except ValueError:
        return _first_line(response.text) or response.reason_phrase
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        err = err.get("message", err)
    return _first_line(str(err))


def remote_error(exc: BaseException, spec: RemoteSpec, *, during: str = "call") -> LemonError:
    """The one translation of a failed remote call into a LemonError (``from exc`` by callers).

    ``during`` is ``"call"`` (control), ``"load"`` or ``"inference"``: a 5xx during a load
    is a :class:`LoadError`, a failure during inference an :class:`InferenceError`.
    """
    model, url = spec.remote_model, spec.url
    if isinstance(exc, LemonError):
        return exc
    if isinstance(exc, httpx.HTTPStatusError):
        r = exc.response
        if r.status_code in (401, 403):
            return RemoteAuthError(url, r.status_code, spec.api_key_env,
                                   key_set=spec.api_key() is not None, model=model)
        text = f"remote {url} answered HTTP {r.status_code}: {_message(r)}"
        if during == "load":
            return LoadError(text, model=model) if r.status_code >= 500 else \
                InvalidOptions(text, model=model)
        if during == "inference":
            return InferenceError(text, model=model, status=r.status_code)
        return RemoteError(text, url=url, model=model)
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLError):
            reason = getattr(cause, "reason", None) or type(cause).__name__
            return RemoteUnreachable(url, f"TLS failed ({reason})", model=model)
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ConnectTimeout):
        return RemoteUnreachable(url, f"no connection within {CONNECT_TIMEOUT:g} s", model=model)
    if isinstance(exc, httpx.ConnectError):
        return RemoteUnreachable(url, f"cannot connect ({_first_line(str(exc)) or 'refused'})",
                                 model=model)
    if isinstance(exc, httpx.TimeoutException):
        if during == "inference":
            return RequestTimeout(f"remote {url} gave no answer in time", model=model)
        if during == "load":
            return LoadError(f"remote {url} did not finish loading {model!r} in time", model=model)
        return RemoteUnreachable(url, "no answer in time", model=model)
    if during == "inference" and isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return InferenceError(f"remote {url} cut the response off mid-way "
                              f"({_first_line(str(exc)) or type(exc).__name__})", model=model)
    if isinstance(exc, httpx.TransportError):
        return RemoteUnreachable(url, f"{type(exc).__name__}: {_first_line(str(exc))}", model=model)
    if isinstance(exc, ValueError):
        return RemoteError(f"remote {url} sent an answer that is not valid JSON", url=url,
                           model=model)
    return RemoteError(f"remote {url} failed: {type(exc).__name__}: {exc}", url=url, model=model)


# ------------------------------------------------------------------ the client


class RemoteClient:
    """The HTTP calls to one remote model, each bounded: connect ≤ 5 s, then ``timeout``
    seconds per control call and ``load_timeout`` for a load (which may download).

    Use it as an async context manager (or call :meth:`aclose`).
    """

    def __init__(self, spec: RemoteSpec, *, timeout: float = 10.0, load_timeout: float = 600.0,
                 verify: ssl.SSLContext | str | bool = True) -> None:
        self.spec = spec
        self.timeout, self.load_timeout = timeout, load_timeout
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
                                       trust_env=False, verify=verify)

    def __repr__(self) -> str:
        return f"RemoteClient({self.spec!r})"

    async def __aenter__(self) -> RemoteClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def base_url(self) -> str:
        """The OpenAI base URL for inference (send ``spec.remote_model`` as ``model``)."""
        return self.spec.base_url

    def headers(self) -> dict[str, str]:
        """Headers for inference requests (the key read from its variable now)."""
        return self.spec.headers()

    async def _call(self, method: str, url: str, *, during: str = "call", json: Any = None,
                    timeout: float | None = None, ok: tuple[int, ...] = ()) -> httpx.Response:
        """One bounded request; an error status (other than ``ok``) and every transport or
        timeout failure leave as a LemonError."""
        limit = httpx.Timeout(timeout or self.timeout, connect=CONNECT_TIMEOUT)
        try:
            r = await self._http.request(method, url, json=json, headers=self.headers(),
                                         timeout=limit)
            if r.status_code >= 400 and r.status_code not in ok:
                r.raise_for_status()
            return r
        except httpx.HTTPError as exc:
            raise remote_error(exc, self.spec, during=during) from exc

    async def _json(self, r: httpx.Response) -> dict[str, Any]:
        try:
            data = r.json()
        except ValueError as exc:
            raise remote_error(exc, self.spec) from exc
        if not isinstance(data, dict):
            raise RemoteError(f"remote {self.spec.url} answered {str(r.url)!r} with no JSON object",
                              url=self.spec.url, model=self.spec.remote_model)
        return data

    # ---------------------------------------------------------- both protocols

    async def health(self) -> RemoteEntry:
        """What the remote says about the model now (lemonade: ``/health``; openai: ``/models``).

        :raises RemoteUnreachable: no answer within the bounded timeout.
        :raises RemoteAuthError: 401/403.
        """
        if self.spec.api == "lemonade":
            r = await self._call("GET", f"{self.spec.root}/api/v1/health")
            return _entry_from_health(await self._json(r), self.spec.remote_model)
        return _entry_from_models(await self._listing(), self.spec.remote_model)

    async def _listing(self) -> dict[str, dict[str, Any]]:
        r = await self._call("GET", f"{self.spec.base_url}/models")
        data = (await self._json(r)).get("data")
        return {m["id"]: m for m in data or () if isinstance(m, dict) and isinstance(m.get("id"), str)}

    async def models(self) -> tuple[str, ...]:
        """The model ids the remote lists (``GET {base_url}/models``), in its order."""
        return tuple(await self._listing())

    # ---------------------------------------------------------- lemonade

    async def load(self, options: LoadOptions, *, before: RemoteEntry | None = None) -> RemoteLoad:
        """``POST /api/v1/load`` with ``options``; bounded by ``load_timeout``.

        What happened comes from the remote's answer when it says (``lemon-magic serve``
        answers ``action`` and ``pid``), else from its ``/health`` pid before (``before``, or
        read now) and after.

        :raises InvalidOptions: an option Lemonade cannot take, or one the remote refused (4xx).
        :raises ModelNotFound: the remote does not know the model (404).
        :raises LoadError: the remote failed to load it (5xx: its message's first line), or
            did not finish within ``load_timeout``.
        """
        spec = self.spec
        body = lemonade_load_body(spec.remote_model, options)
        if before is None:
            before = await self.health()
        start = time.monotonic()
        r = await self._call("POST", f"{spec.root}/api/v1/load", json=body, during="load",
                             timeout=self.load_timeout, ok=(404,))
        if r.status_code == 404:
            raise ModelNotFound(spec.remote_model, paths=False, what=f"a model {spec.url} knows")
        answer = await self._json(r)
        seconds = time.monotonic() - start
        action, pid = answer.get("action"), answer.get("pid")
        if action in ("loaded", "noop", "reloaded") and isinstance(pid, int):
            return RemoteLoad(action, pid, seconds, answer)
        after = await self.health()
        if not before.loaded:
            done: Literal["loaded", "noop", "reloaded"] = "loaded"
        elif before.pid is not None and before.pid == after.pid:
            done = "noop"
        elif before.pid is None and remote_action(before, options) == "noop":
            done = "noop"  # a remote that reports no pid: the best we can tell
        else:
            done = "reloaded"
        return RemoteLoad(done, after.pid, seconds, answer)

    async def unload(self) -> bool:
        """``POST /api/v1/unload`` for the model; ``False`` if the remote had it not loaded."""
        r = await self._call("POST", f"{self.spec.root}/api/v1/unload",
                             json={"model_name": self.spec.remote_model}, ok=(404,))
        return r.status_code != 404

    # ---------------------------------------------------------- openai

    async def props(self) -> dict[str, Any] | None:
        """llama-server's ``GET /props`` (``None`` where the server has none)."""
        root = self.spec.root.removesuffix("/v1")
        r = await self._call("GET", f"{root}/props", ok=(404, 405))
        return None if r.status_code in (404, 405) else await self._json(r)

    async def check_loadable(self, options: LoadOptions) -> RemoteEntry:
        """An openai remote's "load": the server lists the model, and no load option is given
        (it has no load control; an option would be silently ignored, so it is refused).

        :raises InvalidOptions: one line naming the options the remote cannot apply.
        :raises ModelNotFound: the server does not list the model (the message lists what it does).
        """
        given = [name for name in ("ctx_size", "threads", "extra_args", "chat_template", "backend")
                 if getattr(options, name) is not None]
        if given:
            raise InvalidOptions(f"{self.spec.url} is an openai remote with no load control: it "
                                 f"cannot apply {', '.join(given)} (set them on the server itself)",
                                 model=self.spec.remote_model)
        listing = await self._listing()
        entry = _entry_from_models(listing, self.spec.remote_model)
        if not entry.listed:
            raise ModelNotFound(self.spec.remote_model, list(listing), paths=False,
                                what=f"a model {self.spec.url} lists")
        return entry
