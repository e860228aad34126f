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
* :class:`~lemon_magic._remote_client.RemoteClient` (in ``_remote_client``): the HTTP
  calls, every one bounded in time, with errors translated in one place
  (:func:`~lemon_magic._remote_client.remote_error`).

Everything here is sans-IO: no sockets, no logging.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from lemon_magic.errors import InvalidOptions
from lemon_magic.options import LoadOptions, ResolvedOptions

__all__ = ("APIS", "LLAMACPP_BACKENDS", "REMOTE_RESERVED_FLAGS", "RemoteEntry", "RemoteLoad",
           "RemoteSpec", "SERVER_KEY_ENVS", "check_remote_options", "entry_from_health",
           "entry_from_models", "lemonade_load_body", "options_differ", "parse_remote",
           "remote_action", "reported_options")

Api = Literal["lemonade", "openai"]
#: the protocols a remote may speak
APIS: tuple[Api, ...] = ("lemonade", "openai")
#: what ``backend`` may be for a lemonade remote (sent as ``llamacpp_backend``)
LLAMACPP_BACKENDS = frozenset({"cpu", "vulkan", "rocm", "metal", "cuda", "system"})
#: llama-server flags a lemonade remote sets itself (refused here, before anything is sent)
REMOTE_RESERVED_FLAGS = frozenset({"-m", "--model", "--port", "--host", "-c", "--ctx-size",
                                   "-mu", "--model-url", "-hf", "--hf-repo", "--api-key"})
#: the path suffixes a lemonade URL may carry; control calls go to ``<root>/api/v1``
_LEMONADE_PREFIXES = ("/api/v1", "/api/v0", "/v1", "/v0")
#: the variables ``lemon-magic serve`` takes its own key from: never a remote's key
SERVER_KEY_ENVS = frozenset({"LEMON_MAGIC_API_KEY", "LEMONADE_API_KEY"})
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
        """The key, read from ``$api_key_env`` now, without surrounding whitespace (``None``: no
        variable named, or it is unset or blank)."""
        return (os.environ.get(self.api_key_env, "").strip() or None) if self.api_key_env else None

    def headers(self) -> dict[str, str]:
        """The headers every call sends (``Authorization: Bearer`` when the key is set).

        :raises InvalidOptions: the key cannot go in an HTTP header (its value is never shown).
        """
        key = self.api_key()
        if key is not None and not (key.isascii() and key.isprintable()):
            raise InvalidOptions(f"${self.api_key_env} holds a value that cannot be sent as an "
                                 "API key (not printable ASCII; the value is not shown)")
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
    if api == "openai" and parts.path.strip("/") == "":
        raise InvalidOptions(f"an openai remote's URL is its OpenAI base URL, with its path: did "
                             f"you mean {url.rstrip('/')}/v1?")
    if not isinstance(remote_model, str) or not remote_model.strip():
        raise InvalidOptions("a remote model needs --remote-model: its name on the remote server")
    if api_key_env is not None and (not isinstance(api_key_env, str)
                                    or not _ENV_NAME.match(api_key_env)):
        raise InvalidOptions("api_key_env must be the name of an environment variable that holds "
                             "the key, not the key itself (the value given is not shown)")
    if api_key_env in SERVER_KEY_ENVS:
        raise InvalidOptions(f"${api_key_env} is the key of this machine's own server (lemon-magic "
                             "serve reads it); put the remote's key in another variable")
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
        for arg in options.extra_args:
            flag = arg.split("=", 1)[0]
            if flag in REMOTE_RESERVED_FLAGS:
                raise InvalidOptions(f"extra_args may not set {flag}: the remote's server sets it"
                                     + (" (use ctx_size)" if flag in ("-c", "--ctx-size") else ""))
        body["llamacpp_args"] = shlex.join(options.extra_args)
    if options.backend is not None:
        if options.backend not in LLAMACPP_BACKENDS:
            raise InvalidOptions(f"backend of a lemonade remote is its llama.cpp device "
                                 f"({', '.join(sorted(LLAMACPP_BACKENDS))}), got {options.backend!r}")
        body["llamacpp_backend"] = options.backend
    return body


def check_remote_options(spec: RemoteSpec, options: LoadOptions) -> None:
    """Refuse, in one line, load options the remote cannot apply (never silently dropped): an
    openai remote has no load control at all; a lemonade remote takes ``ctx_size``,
    ``extra_args`` and ``backend`` (see :func:`lemonade_load_body`).

    :raises InvalidOptions: naming the options and the remote.
    """
    if spec.api == "lemonade":
        lemonade_load_body(spec.remote_model, options)
        return
    given = [name for name in ("ctx_size", "threads", "extra_args", "chat_template", "backend")
             if getattr(options, name) is not None]
    if given:
        raise InvalidOptions(f"{spec.url} is an openai remote with no load control: it cannot "
                             f"apply {', '.join(given)} (set {'it' if len(given) == 1 else 'them'} "
                             "on the server itself)", model=spec.remote_model)


def reported_options(spec: RemoteSpec, entry: RemoteEntry | None) -> ResolvedOptions:
    """The remote's report as :class:`ResolvedOptions` (what load results carry): ``ctx_size``
    0 and no args where the remote does not say; ``threads`` is always the remote's (0)."""
    entry = entry or RemoteEntry(loaded=False)
    return ResolvedOptions(backend=entry.llamacpp_backend or f"{spec.api} remote",
                           ctx_size=entry.ctx_size or 0, threads=0,
                           extra_args=entry.llamacpp_args or (),
                           model_path=f"{spec.url} ({spec.remote_model})")


def options_differ(entry: RemoteEntry | None, wanted: LoadOptions) -> dict[str, tuple[Any, Any]]:
    """``{option: (reported, wanted)}`` for each option ``wanted`` sets that the remote reports
    otherwise (what an auto-load that uses the model as it is tells the caller, and an explicit
    load after which the remote does not report what was asked)."""
    if entry is None or not entry.loaded:
        return {}
    reported = {"ctx_size": entry.ctx_size, "extra_args": entry.llamacpp_args,
                "backend": entry.llamacpp_backend}
    return {k: (v, getattr(wanted, k)) for k, v in reported.items()
            if v is not None and getattr(wanted, k) is not None and getattr(wanted, k) != v}


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


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def entry_from_health(raw: Mapping[str, Any], model: str) -> RemoteEntry:
    """``model``'s entry in a Lemonade ``/health`` answer (``loaded=False`` if it is not there)."""
    listed = raw.get("all_models_loaded")
    for item in listed if isinstance(listed, list) else ():
        if not isinstance(item, dict) or _bare(item.get("model_name")) != _bare(model):
            continue
        opts = item.get("recipe_options")
        opts = opts if isinstance(opts, dict) else {}
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
            llamacpp_args=split, llamacpp_backend=_text(opts.get("llamacpp_backend")),
            checkpoint=_text(item.get("checkpoint")), status=_text(item.get("status")),
            recipe_options=dict(opts))
    return RemoteEntry(loaded=False)


def entry_from_models(ids: Mapping[str, Mapping[str, Any]], model: str) -> RemoteEntry:
    """``model``'s entry in an OpenAI ``/models`` listing (by id); llama-server's router mode
    adds ``status.value`` (``loaded``, ``loading``, ``unloaded``…), llama-server ``meta.n_ctx``,
    vLLM ``max_model_len`` and Lemonade's (and ``lemon-magic serve``'s) ``context_length``
    (each kept as ``ctx_size``)."""
    item = ids.get(model)
    if item is None:
        return RemoteEntry(loaded=False)
    status = item.get("status")
    value = status.get("value") if isinstance(status, dict) else None  # llama-server's router
    meta = item.get("meta")
    ctx = meta.get("n_ctx") if isinstance(meta, dict) else \
        item.get("max_model_len", item.get("context_length"))
    ctx = ctx if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0 else None
    reported = {k: v for k, v in (("ctx_size", ctx), ("status", _text(value))) if v is not None}
    return RemoteEntry(loaded=value in (None, "loaded"), listed=True, ctx_size=ctx,
                       status=_text(value), recipe_options=reported)
