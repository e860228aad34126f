"""The model catalogue over HTTP: ``GET models``, ``GET models/{id}`` and the per-model
saved options (``models/{id}/options`` GET/POST/DELETE, and ``save_options`` of ``POST load``).

A model's saved options are its registration's default load options, so a
load without options (an HTTP ``/load`` or an auto-load) uses them; saving
never loads or reloads anything. Options are shown with Lemonade's names
(``ctx_size``, ``llamacpp_args``, ``llamacpp_backend``) plus ours (``backend``,
``threads``, ``chat_template``).
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lemon_magic._records import ModelEntry
from lemon_magic.errors import InvalidOptions, LemonError
from lemon_magic.options import LoadOptions, ResolvedOptions
from lemon_magic.registry import ModelSpec
from lemon_magic.server._args import check_http_args
from lemon_magic.server._wire import (
    LOAD_KEYS,
    SAVED_KEYS,
    error_response,
    invalid,
    lemonade_options,
    read_body,
    served_name,
)

if TYPE_CHECKING:
    from lemon_magic.router import AsyncRouter

__all__ = ("ModelsApi", "save_options")

_CREATED = 1234567890  # Lemonade's constant `created` for model objects
#: keys of an options body that are not options (``model_name`` is ignored, as in Lemonade)
_CONTROL_KEYS = frozenset({"model_name", "dry_run"})


def shown(options: LoadOptions | ResolvedOptions) -> dict[str, Any]:
    """The options that are set, under their HTTP names (``extra_args`` → ``llamacpp_args``)."""
    out: dict[str, Any] = {}
    for key, field in SAVED_KEYS.items():
        value = getattr(options, field)
        if value is not None:
            out[key] = shlex.join(value) if field == "extra_args" else value
    return out


def _merged(spec: ModelSpec, body: dict[str, Any], options: LoadOptions) -> LoadOptions:
    """``spec``'s saved options with the keys of ``body`` applied: a key with a value sets it,
    a key given "empty" (null, -1, "", "auto") forgets it, a key not given stays."""
    saved = {k: v for k, v in vars(spec.defaults).items() if v is not None}
    for key, field in SAVED_KEYS.items():
        if key in body:
            value = getattr(options, field)
            if value is None:
                saved.pop(field, None)
            else:
                saved[field] = value
    return LoadOptions(**saved)


def _user_spec(router: AsyncRouter, name: str) -> ModelSpec:
    """:raises InvalidOptions: ``name`` is built in (it has no registration to save into)."""
    spec = router.registry.lookup(name)
    if spec.source != "user":
        raise InvalidOptions(
            f"{name!r} is built in, so its options cannot be saved; register a name for its "
            "file (router.register) and save that one's options")
    return spec


async def _save(router: AsyncRouter, spec: ModelSpec, saved: LoadOptions) -> None:
    router.resolve(dataclasses.replace(spec, defaults=saved), LoadOptions())  # refuse bad values
    await router.register(spec.name, spec.path, kind=spec.kind, description=spec.description,
                          **{k: v for k, v in vars(saved).items() if v is not None})


async def save_options(router: AsyncRouter, name: str, body: dict[str, Any],
                       options: LoadOptions) -> None:
    """``save_options`` of ``POST load``: the body's options become ``name``'s saved ones.

    :raises InvalidOptions: the model is built in, or a value it cannot take.
    """
    spec = _user_spec(router, name)
    await _save(router, spec, _merged(spec, body, options))


@dataclass
class ModelsApi:
    """The catalogue handlers, bound to one router."""

    router: AsyncRouter
    allow_any_args: bool

    def _context_length(self, spec: ModelSpec) -> int | None:
        """The loaded process's context size, else what a load would use now."""
        loaded = next((s.options for s in self.router.status()
                       if s.name == spec.name and s.options is not None), None)
        if loaded is not None:
            return loaded.ctx_size
        try:
            return self.router.resolve(spec, LoadOptions()).ctx_size
        except LemonError:
            return None

    def model_object(self, e: ModelEntry) -> dict[str, Any]:
        saved: dict[str, Any] = {}
        context_length = None
        try:
            spec = self.router.registry.lookup(e.name)
            saved = shown(spec.defaults)
            context_length = self._context_length(spec) if e.present else None
        except LemonError:
            pass
        return {"id": e.name, "object": "model", "created": _CREATED, "owned_by": "lemon_magic",
                "context_length": context_length, "checkpoint": e.path, "recipe": "llamacpp",
                "downloaded": e.present,
                "suggested": True, "labels": [e.kind if e.kind != "llm" else "chat"],
                "recipe_options": saved, "source": e.source, "state": str(e.state),
                **({"problem": e.problem} if e.problem else {})}

    async def models(self, request: Request) -> Response:
        if request.method == "HEAD":
            return Response(status_code=200)
        show_all = request.query_params.get("show_all") == "true"
        entries = [e for e in self.router.models() if e.source != "path" and (show_all or e.present)]
        return JSONResponse({"object": "list", "data": [self.model_object(e) for e in entries]})

    async def model(self, request: Request) -> Response:
        try:
            name = served_name(self.router.registry, request.path_params["model_id"])
        except LemonError as exc:
            return error_response(exc)
        entry = next(e for e in self.router.models() if e.name == name)
        return JSONResponse(self.model_object(entry))

    # ------------------------------------------------------------- models/{id}/options

    def _options_view(self, spec: ModelSpec, saved: LoadOptions) -> dict[str, Any]:
        """``saved``: what is saved now; ``effective``: what a load without options would
        use if ``saved`` were saved (a preview when they differ); ``defaults``: what it would
        use with nothing saved. ``effective`` replays as a ``POST load`` body."""
        effective = self.router.resolve(dataclasses.replace(spec, defaults=saved), LoadOptions())
        defaults = self.router.resolve(dataclasses.replace(spec, defaults=LoadOptions()), LoadOptions())
        common = {"llamacpp_backend": "cpu", "model_name": spec.name}
        return {"model_name": spec.name, "recipe": "llamacpp", "saved": shown(spec.defaults),
                "effective": {**shown(effective), **common}, "defaults": {**shown(defaults), **common},
                "resolved_ctx_size": effective.ctx_size}

    async def options(self, request: Request) -> Response:
        """GET: the saved, effective and default options; POST: merge into the saved ones
        (``null`` forgets a key, ``dry_run`` previews); DELETE: forget them all."""
        try:
            name = served_name(self.router.registry, request.path_params["model_id"])
            spec = self.router.registry.lookup(name)
            if request.method == "GET":
                return JSONResponse(self._options_view(spec, spec.defaults))
            if request.method == "DELETE":
                spec = _user_spec(self.router, name)
                await _save(self.router, spec, LoadOptions())
                spec = self.router.registry.lookup(name)
                return JSONResponse({"status": "success", **self._options_view(spec, spec.defaults)})
            body = await read_body(request)
            assert body is not None
            refused = self._check_keys(body)
            if refused is not None:
                return refused
            options = lemonade_options(body, LOAD_KEYS)
            if options.extra_args and not self.allow_any_args:
                check_http_args(options.extra_args)
            spec = _user_spec(self.router, name)
            merged = _merged(spec, body, options)
            view = self._options_view(spec, merged)  # refuses values the model cannot take
            if body.get("dry_run") is True:
                return JSONResponse({"status": "success", "dry_run": True, **view})
            await _save(self.router, spec, merged)
            spec = self.router.registry.lookup(name)
        except LemonError as exc:
            return error_response(exc)
        return JSONResponse({"status": "success", **self._options_view(spec, spec.defaults)})

    def _check_keys(self, body: dict[str, Any]) -> JSONResponse | None:
        if "pinned" in body:
            return invalid("'pinned' is not a saved option (pin with POST load)")
        unknown = sorted(set(body) - set(LOAD_KEYS) - _CONTROL_KEYS)
        if unknown:
            return invalid(f"unknown option {unknown[0]!r} (options: {', '.join(LOAD_KEYS)})")
        if not isinstance(body.get("dry_run", False), bool):
            return invalid("'dry_run' must be a boolean")
        return None
