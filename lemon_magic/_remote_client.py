"""The HTTP side of remote models: :class:`RemoteClient` and the one error boundary,
:func:`remote_error` (the sans-IO side is :mod:`lemon_magic._remote`).

Every call is bounded in total, connecting by at most :data:`CONNECT_TIMEOUT`. The
API key is read from its environment variable for each call, never kept.
"""

from __future__ import annotations

import contextlib
import ssl
import time
from types import TracebackType
from typing import Any, Literal

import anyio
import httpx

from lemon_magic._remote import (
    RemoteEntry,
    RemoteLoad,
    RemoteSpec,
    check_remote_options,
    entry_from_health,
    entry_from_models,
    lemonade_load_body,
    remote_action,
)
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

__all__ = ("CONNECT_TIMEOUT", "MAPPINGS", "RemoteClient", "remote_error")

#: connect timeout of every call, in seconds
CONNECT_TIMEOUT = 5.0
#: what each failure of a remote call becomes in :func:`remote_error` (checked in order)
MAPPINGS: tuple[tuple[str, str], ...] = (
    ("HTTP 401/403", "RemoteAuthError (names the key's environment variable)"),
    ("HTTP 5xx during a load", "LoadError (the remote's message, first line)"),
    ("HTTP 4xx during a load", "InvalidOptions (the remote's message, first line)"),
    ("HTTP error status during inference", "InferenceError (status kept)"),
    ("HTTP error status, other calls", "RemoteError"),
    ("ssl.SSLError anywhere in the cause chain", "RemoteUnreachable (TLS failed)"),
    ("httpx.ConnectTimeout, httpx.ConnectError", "RemoteUnreachable (cannot connect)"),
    ("httpx.TimeoutException, TimeoutError", "RequestTimeout (inference), LoadError (load), "
                                             "RemoteUnreachable (other calls)"),
    ("httpx.RemoteProtocolError, httpx.ReadError during inference", "InferenceError (cut mid-way)"),
    ("any other httpx.TransportError", "RemoteUnreachable"),
    ("ValueError (not JSON), anything else", "RemoteError"),
)


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def _scrubbed(text: str, spec: RemoteSpec) -> str:
    """The first line of ``text``, with the API key's value taken out if it appears."""
    key = spec.api_key()
    line = _first_line(text)
    return line.replace(key, "***") if key else line


def _message(response: httpx.Response) -> str:
    """The remote's error message (OpenAI's ``{"error": {"message"}}`` or Lemonade's
    ``{"error": "..."}``), first line only."""
    try:
        data = response.json()
    except ValueError:
        text = response.text.strip()
        if text.startswith("<"):  # a proxy's HTML error page: its status says it
            return response.reason_phrase or "an HTML error page"
        return _first_line(text) or response.reason_phrase
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
        text = f"remote {url} answered HTTP {r.status_code}: {_scrubbed(_message(r), spec)}"
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
            hint = "; does it speak plain http://?" if reason == "WRONG_VERSION_NUMBER" else ""
            return RemoteUnreachable(url, f"TLS failed ({reason}{hint})", model=model)
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ConnectTimeout):
        return RemoteUnreachable(url, f"no connection within {CONNECT_TIMEOUT:g} s", model=model)
    if isinstance(exc, httpx.ConnectError):
        return RemoteUnreachable(url, f"cannot connect ({_scrubbed(str(exc), spec) or 'refused'})",
                                 model=model)
    if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
        if during == "inference":
            return RequestTimeout(f"remote {url} gave no answer in time", model=model)
        if during == "load":
            return LoadError(f"remote {url} did not finish loading {model!r} in time", model=model)
        return RemoteUnreachable(url, "no answer in time", model=model)
    if during == "inference" and isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError)):
        return InferenceError(f"remote {url} cut the response off mid-way ({type(exc).__name__}); "
                              "what arrived before is partial", model=model)
    if isinstance(exc, httpx.LocalProtocolError):  # what we would have sent: never echoed
        return RemoteError(f"a request to remote {url} could not be sent ({type(exc).__name__})",
                           url=url, model=model)
    if isinstance(exc, httpx.TransportError):
        return RemoteUnreachable(url, f"{type(exc).__name__}: {_scrubbed(str(exc), spec)}",
                                 model=model)
    if isinstance(exc, ValueError):
        return RemoteError(f"remote {url} sent an answer that is not valid JSON", url=url,
                           model=model)
    return RemoteError(f"remote {url} failed: {type(exc).__name__}: {_scrubbed(str(exc), spec)}",
                       url=url, model=model)


# ------------------------------------------------------------------ the client


class RemoteClient:
    """The HTTP calls to one remote model, each bounded in total: ``timeout`` seconds per
    control call, ``load_timeout`` for a load (which may download); connecting takes at
    most :data:`CONNECT_TIMEOUT` of that.

    Use it as an async context manager (or call :meth:`aclose`).
    """

    def __init__(self, spec: RemoteSpec, *, timeout: float = 10.0, load_timeout: float = 600.0,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.spec = spec
        self.timeout, self.load_timeout = timeout, load_timeout
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT)),
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
    def http(self) -> httpx.AsyncClient:
        """The connection pool, shared by inference requests to this remote (each sets its own
        timeouts)."""
        return self._http

    @property
    def base_url(self) -> str:
        """The OpenAI base URL for inference (send ``spec.remote_model`` as ``model``)."""
        return self.spec.base_url

    def headers(self) -> dict[str, str]:
        """Headers for inference requests (the key read from its variable now)."""
        return self.spec.headers()

    def _need_lemonade(self, call: str) -> None:
        if self.spec.api != "lemonade":
            raise RuntimeError(f"{call}() needs a lemonade remote; {self.spec.url} is an openai "
                               "remote (no load control: use check_loadable())")

    async def _call(self, method: str, url: str, *, during: str = "call", json: Any = None,
                    timeout: float | None = None, ok: tuple[int, ...] = ()) -> httpx.Response:
        """One request, bounded in total by ``timeout`` (a slow drip included; connecting by at
        most :data:`CONNECT_TIMEOUT` of it); an error status (other than ``ok``) and every
        transport or timeout failure leave as a LemonError."""
        seconds = timeout or self.timeout
        limit = httpx.Timeout(seconds, connect=min(seconds, CONNECT_TIMEOUT))
        try:
            with anyio.fail_after(seconds):
                r = await self._http.request(method, url, json=json, headers=self.headers(),
                                             timeout=limit)
            if r.status_code >= 400 and r.status_code not in ok:
                r.raise_for_status()
            return r
        except (httpx.HTTPError, TimeoutError) as exc:
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

    async def health(self, *, timeout: float | None = None) -> RemoteEntry:
        """What the remote says about the model now (lemonade: ``/health``; openai: ``/models``).

        :param timeout: this call's limit, if not the client's (a health poll wants a short one).
        :raises RemoteUnreachable: no answer within the bounded timeout.
        :raises RemoteAuthError: 401/403.
        """
        if self.spec.api == "lemonade":
            r = await self._call("GET", f"{self.spec.root}/api/v1/health", ok=(404,), timeout=timeout)
            if r.status_code == 404:
                raise RemoteError(f"remote {self.spec.url} has no /api/v1/health: not a Lemonade "
                                  "server? (register it with --api openai)", url=self.spec.url,
                                  model=self.spec.remote_model)
            return entry_from_health(await self._json(r), self.spec.remote_model)
        return entry_from_models(await self._listing(timeout), self.spec.remote_model)

    async def _listing(self, timeout: float | None = None) -> dict[str, dict[str, Any]]:
        r = await self._call("GET", f"{self.spec.base_url}/models", timeout=timeout)
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
        self._need_lemonade("load")
        spec = self.spec
        body = lemonade_load_body(spec.remote_model, options)
        if before is None:
            before = await self.health()
        start = time.monotonic()
        r = await self._call("POST", f"{spec.root}/api/v1/load", json=body, during="load",
                             timeout=self.load_timeout, ok=(404,))
        if r.status_code == 404:
            known: tuple[str, ...] = ()
            with contextlib.suppress(LemonError):
                known = await self.models()
            raise ModelNotFound(spec.remote_model, known, paths=False, what=f"a model {spec.url} knows")
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
        self._need_lemonade("unload")
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
        check_remote_options(self.spec, options)
        listing = await self._listing()
        entry = entry_from_models(listing, self.spec.remote_model)
        if not entry.listed:
            raise ModelNotFound(self.spec.remote_model, list(listing), paths=False,
                                what=f"a model {self.spec.url} lists")
        return entry
