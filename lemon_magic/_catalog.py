"""Registration through the router: the registry changes and the router's caches follow."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from lemon_magic import _remoting
from lemon_magic._policy import ModelState
from lemon_magic._records import UnloadResult
from lemon_magic._remote import parse_remote
from lemon_magic.errors import InvalidOptions, ModelNotFound, ModelNotLoaded
from lemon_magic.options import LoadOptions
from lemon_magic.registry import DEFAULT_MODEL, ModelSpec

if TYPE_CHECKING:
    from lemon_magic.router import AsyncRouter

__all__ = ("register", "register_pulled", "register_remote", "unregister")

#: states in which a name cannot change between a local file and a remote
_IN_USE = (ModelState.LOADING, ModelState.READY, ModelState.STOPPING, ModelState.UNREACHABLE)


async def register(router: AsyncRouter, name: str, path: str | os.PathLike[str], *, kind: str,
                   description: str, **defaults: Any) -> ModelSpec:
    """Validate and persist the registration (in a worker thread: it reads the GGUF header),
    then drop every cached resolution.

    :raises InvalidOptions: ``name`` is a remote model in use (unload or unregister it first).
    """
    return await _register_local(router, name, lambda: router.registry.register(
        name, path, kind=kind, description=description, **defaults))


async def register_pulled(router: AsyncRouter, name: str, path: str, checkpoint: str, *, kind: str,
                          description: str, defaults: LoadOptions, files: tuple[str, ...] = (),
                          downloaded: tuple[str, ...] = ()) -> ModelSpec:
    """Register a pulled file (see :meth:`Registry.register_pulled`: a name registered before
    keeps its saved options, kind and description; ``downloaded``: the pull's files it transferred,
    the only ones ``delete`` removes)."""
    return await _register_local(router, name, lambda: router.registry.register_pulled(
        name, path, checkpoint, kind=kind, description=description, defaults=defaults, files=files,
        downloaded=downloaded))


async def _register_local(router: AsyncRouter, name: str, write: Callable[[], ModelSpec]) -> ModelSpec:
    remote = router._remotes.get(name)
    if remote is not None and remote.state in _IN_USE:
        raise InvalidOptions(f"{name!r} is a remote model, {remote.state} on {remote.remote.url}: "
                             f"unload it (%lemon_unload {name}) or unregister it first")
    spec = await anyio.to_thread.run_sync(write)
    router._resolver.invalidate()
    if name in router._remotes:  # the name was a remote model's: let that go here
        _remoting.forget(router, router._remotes[name], "registered anew")
    return spec


async def register_remote(router: AsyncRouter, name: str, url: str, remote_model: str, *,
                          api: str, api_key_env: str | None, kind: str, description: str,
                          **defaults: Any) -> ModelSpec:
    """Validate and persist a remote registration.

    :raises InvalidOptions: ``name`` is loaded here (unload it first), or a bad field.
    """
    local = router._models.get(name)
    if local is not None and local.state in _IN_USE:
        pid = f" (pid {local.process.pid})" if local.process else ""
        raise InvalidOptions(f"{name!r} is {local.state} here{pid}: unload it first "
                             f"(%lemon_unload {name})")
    remote = parse_remote(url, remote_model, api, api_key_env)
    spec = await anyio.to_thread.run_sync(lambda: router.registry.register_remote(
        name, remote, kind=kind, description=description, **defaults))
    router._resolver.invalidate()
    old = router._remotes.get(name)
    if old is not None and old.spec != spec:  # another remote before: its slot (poll, belief)
        _remoting.forget(router, old, "registered anew")  # goes; the same one again keeps it
    local = router._models.get(name)
    if local is not None and local.state not in _IN_USE:  # its last run's row goes
        del router._models[name]
    return spec


async def unregister(router: AsyncRouter, name: str) -> UnloadResult | None:
    """Unload the model if it is loaded here, forget the registration and the router's row (a
    remote model stays loaded on its server)."""
    if name not in router.registry.user_names():
        if name == DEFAULT_MODEL:
            router.registry.unregister(name)  # raises: it is built in
        raise ModelNotFound(name, router.registry.user_names())
    unloaded: UnloadResult | None = None
    if name in router._models:  # a remote model is let go below, not unloaded on its server
        try:
            unloaded = await router.unload(name, reason="unregistered")
        except ModelNotLoaded:
            pass
    await anyio.to_thread.run_sync(router.registry.unregister, name)
    router._resolver.invalidate()
    if name in router._remotes:  # the remote keeps its model; only our slot goes
        _remoting.forget(router, router._remotes[name], "unregistered")
    slot = router._models.get(name)
    # a request still counted on the old slot is released there (its lease holds the slot)
    if slot is not None and slot.state in (ModelState.UNLOADED, ModelState.FAILED, ModelState.CRASHED):
        del router._models[name]
    return unloaded
