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
import json
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lemon_magic._pulling import PROGRESS_EVERY, canonical_name
from lemon_magic._records import ModelEntry, PullResult
from lemon_magic.errors import InvalidOptions, LemonError, ModelNotFound, PullError, RepoNotFound
from lemon_magic.options import LoadOptions, ResolvedOptions
from lemon_magic.registry import ModelSpec
from lemon_magic.server._args import check_http_options
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


def _not_remote(spec: ModelSpec) -> None:
    """:raises InvalidOptions: a remote model (its options are its server's; register it again
    with defaults to change what its loads ask for)."""
    if spec.remote is not None:
        raise InvalidOptions(f"{spec.name!r} is a remote model ({spec.remote.url}): its options "
                             "are saved on that server, not here")


def _user_spec(router: AsyncRouter, name: str) -> ModelSpec:
    """:raises InvalidOptions: ``name`` is built in (it has no registration to save into)."""
    spec = router.registry.lookup(name)
    _not_remote(spec)
    if spec.source != "user":
        raise InvalidOptions(
            f"{name!r} is built in, so its options cannot be saved; register a name for its "
            "file (router.register) and save that one's options")
    return spec


async def _save(router: AsyncRouter, spec: ModelSpec, saved: LoadOptions) -> None:
    """Only the saved options change: the entry's file, checkpoint, kind and description stay
    as the registrations file has them (issue 20; the router's caches see the file change)."""
    router.resolve(dataclasses.replace(spec, defaults=saved), LoadOptions())  # refuse bad values
    await anyio.to_thread.run_sync(router.registry.save_options, spec.name, saved)


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

    def _loaded_ctx(self) -> dict[str, int]:
        """Model name → the context size of its running process (one status snapshot)."""
        out = {}
        for s in self.router.status():
            ctx = s.options.ctx_size if s.options is not None else \
                s.remote.options.get("ctx_size") if s.remote is not None else None
            if isinstance(ctx, int):
                out[s.name] = ctx
        return out

    def _context_length(self, spec: ModelSpec, loaded_ctx: dict[str, int]) -> int | None:
        """The loaded process's context size, else what a load would use now."""
        if spec.name in loaded_ctx:
            return loaded_ctx[spec.name]
        try:
            return self.router.resolve(spec, LoadOptions()).ctx_size
        except LemonError:
            return None

    def model_object(self, e: ModelEntry, loaded_ctx: dict[str, int]) -> dict[str, Any]:
        saved: dict[str, Any] = {}
        context_length = None
        try:
            spec = self.router.registry.lookup(e.name)
            saved = shown(spec.defaults)
            context_length = self._context_length(spec, loaded_ctx) if e.present else None
        except LemonError:
            pass
        return {"id": e.name, "object": "model", "created": _CREATED, "owned_by": "lemon_magic",
                "context_length": context_length, "checkpoint": e.path, "recipe": "llamacpp",
                "downloaded": e.present,
                "suggested": True, "labels": [e.kind if e.kind != "llm" else "chat"],
                "recipe_options": saved, "source": e.source, "state": str(e.state),
                **({"size": round(e.size / 1e9, 3)} if e.size else {}),
                **({"problem": e.problem} if e.problem else {})}

    async def models(self, request: Request) -> Response:
        if request.method == "HEAD":
            return Response(status_code=200)
        show_all = request.query_params.get("show_all") == "true"
        entries = [e for e in self.router.models(all=show_all) if e.source != "path"
                   and (show_all or e.present)]
        loaded = self._loaded_ctx()
        return JSONResponse({"object": "list", "data": [self.model_object(e, loaded) for e in entries]})

    async def model(self, request: Request) -> Response:
        try:
            name = served_name(self.router.registry, request.path_params["model_id"])
        except LemonError as exc:
            return error_response(exc)
        entry = next((e for e in self.router.models(all=True) if e.name == name), None)
        if entry is None:  # a checkpoint not pulled yet
            return error_response(ModelNotFound(name, self.router.registry.names(), paths=False))
        return JSONResponse(self.model_object(entry, self._loaded_ctx()))

    # ------------------------------------------------------------- pull, delete

    async def pull(self, request: Request) -> Response:
        """Lemonade's ``POST pull``: a catalogue model or a registered pulled one by
        ``model_name``, or a new ``user.NAME`` with a ``checkpoint``; ``stream: true`` sends
        ``progress`` events, then ``complete`` (or ``error``)."""
        body = await read_body(request)
        assert body is not None
        model = body.get("model_name", body.get("model"))
        checkpoint = body.get("checkpoint")
        stream = body.get("stream", False)
        if not isinstance(model, str) or not model:
            return invalid("'model_name' is required and must be a string")
        if checkpoint is not None and not isinstance(checkpoint, str):
            return invalid("'checkpoint' must be a string like org/repo:VARIANT")
        if not isinstance(stream, bool):
            return invalid("'stream' must be a boolean")
        if checkpoint:  # a new registration: user.NAME for this checkpoint
            source, name = checkpoint, model.removeprefix("user.")
        else:  # a catalogue model, a checkpoint, or a model pulled before
            source, name = model.removeprefix("user."), None
        if not stream:
            try:
                result = await self.router.pull(source, name=name)
            except LemonError as exc:
                return error_response(exc)
            return JSONResponse({"status": "success", "model_name": model, **_pulled(result)})
        return StreamingResponse(self._pull_events(source, name, model), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _pull_events(self, source: str, name: str | None, model: str) -> AsyncIterator[bytes]:
        """The pull runs in the router's task group (a client that leaves does not cancel it);
        this reports its progress every ``PROGRESS_EVERY`` seconds."""
        outcome: dict[str, Any] = {}
        done = anyio.Event()

        async def run() -> None:
            try:
                outcome["result"] = await self.router.pull(source, name=name)
            except LemonError as exc:
                outcome["error"] = exc
            except Exception as exc:  # never into the router's task group
                outcome["error"] = PullError(f"the pull of {source} failed: {type(exc).__name__}: {exc}")
            finally:
                done.set()

        assert self.router._tg is not None
        self.router._tg.start_soon(run)
        last = None
        while not done.is_set():
            with anyio.move_on_after(PROGRESS_EVERY):
                await done.wait()
            p = self.router._pulls.progress(name or canonical_name(self.router.registry, source))
            if p is not None and p is not last:
                last = p
                yield _pull_event("progress", {
                    "file": p.file, "bytes_downloaded": p.done, "bytes_total": p.total,
                    "percent": round(p.fraction * 100, 1), "rate": p.rate, "eta": p.eta})
        if "result" in outcome:
            yield _pull_event("complete", {"status": "success", "model_name": model,
                                    **_pulled(outcome["result"])})
        else:  # an error, or the router closed under the pull
            error = outcome.get("error")
            yield _pull_event("error", {"error": error.render() if error else "the server stopped the pull"})

    async def variants(self, request: Request) -> Response:
        """Lemonade's ``GET pull/variants?checkpoint=org/repo``: the variants the repo offers."""
        from lemon_magic import _hub

        checkpoint = request.query_params.get("checkpoint", "")
        if not checkpoint:
            return invalid("'checkpoint' is required, e.g. ?checkpoint=unsloth/Qwen3-0.6B-GGUF")
        try:
            found = await anyio.to_thread.run_sync(_hub.remote_variants, checkpoint)
        except RepoNotFound as exc:
            return JSONResponse({"error": exc.render()}, 404)
        except LemonError as exc:
            return error_response(exc)
        repo = checkpoint.partition(":")[0]
        return JSONResponse({"checkpoint": repo, "recipe": "llamacpp", "suggested_name": repo.split("/")[1],
                             "variants": list(found)})

    async def delete(self, request: Request) -> Response:
        """Lemonade's ``POST delete``: unload, forget, and remove the pulled files."""
        body = await read_body(request)
        assert body is not None
        model = body.get("model_name", body.get("model"))
        if not isinstance(model, str) or not model:
            return invalid("'model_name' is required and must be a string")
        try:
            result = await self.router.delete(model.removeprefix("user."))
        except ModelNotFound as exc:
            return JSONResponse({"error": exc.render()}, 422)
        except LemonError as exc:
            return error_response(exc)
        return JSONResponse({"status": "success", "message": f"Deleted model: {model}",
                             "unloaded_pid": result.unloaded_pid, "freed_bytes": result.freed,
                             "kept": list(result.kept), "kept_for": list(result.kept_for),
                             "kept_reason": result.kept_why})

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
            _not_remote(spec)
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
            if not self.allow_any_args:
                check_http_options(options)
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


def _pulled(r: PullResult) -> dict[str, Any]:
    return {"checkpoint": r.checkpoint, "registered_as": r.model, "size": r.size,
            "downloaded": r.downloaded, "seconds": round(r.seconds, 3), "joined": r.joined}


def _pull_event(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()
