"""Registration through the router: the registry changes and the router's caches follow."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from lemon_magic._policy import ModelState
from lemon_magic._records import UnloadResult
from lemon_magic.errors import ModelNotFound, ModelNotLoaded
from lemon_magic.registry import ModelSpec

if TYPE_CHECKING:
    from lemon_magic.router import AsyncRouter

__all__ = ("register", "unregister")


async def register(router: AsyncRouter, name: str, path: str | os.PathLike[str], *, kind: str,
                   description: str, **defaults: Any) -> ModelSpec:
    """Validate and persist the registration (in a worker thread: it reads the GGUF header),
    then drop every cached resolution."""
    spec = await anyio.to_thread.run_sync(lambda: router.registry.register(
        name, path, kind=kind, description=description, **defaults))
    router._resolver.invalidate()
    return spec


async def unregister(router: AsyncRouter, name: str) -> UnloadResult | None:
    """Unload the model if it is loaded, forget the registration and the router's row."""
    if name not in router.registry.user_names():
        raise ModelNotFound(name, router.registry.user_names())
    try:
        unloaded: UnloadResult | None = await router.unload(name, reason="unregistered")
    except ModelNotLoaded:
        unloaded = None
    await anyio.to_thread.run_sync(router.registry.unregister, name)
    router._resolver.invalidate()
    slot = router._models.get(name)
    # a request still counted on the old slot is released there (its lease holds the slot)
    if slot is not None and slot.state in (ModelState.UNLOADED, ModelState.FAILED, ModelState.CRASHED):
        del router._models[name]
    return unloaded
