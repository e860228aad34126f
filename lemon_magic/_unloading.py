"""Unloading: stop a model's backend (or cancel its load), and unload them all.

The decision is taken under the router's lock; the stop itself runs shielded,
through the slot's one ``stop()`` (``AsyncRouter._finish_stop``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from lemon_magic import _remoting
from lemon_magic._policy import ModelState
from lemon_magic._records import UnloadResult
from lemon_magic._slot import Load
from lemon_magic.errors import LemonError, ModelNotLoaded, RouterClosed

if TYPE_CHECKING:
    from lemon_magic.router import AsyncRouter

__all__ = ("unload", "unload_all")

_S = ModelState


async def unload(router: AsyncRouter, model: str, reason: str, *, closing: bool = False) -> UnloadResult:
    """``AsyncRouter.unload``: see there."""
    began = time.monotonic()
    if router._closed and not closing:
        raise RouterClosed()
    name = model
    local = router._models.get(name)
    if local is None or local.state in (_S.UNLOADED, _S.FAILED):  # nothing runs here under it
        if name in router._remotes:
            return await _remoting.unload(router, router._remotes[name], reason)
        if local is None:
            try:
                spec = await router._spec(model)
            except LemonError:
                raise ModelNotLoaded(model) from None
            name = spec.name
            if spec.remote is not None:  # asked on its server: it may have it from before
                return await _remoting.unload(router, _remoting.remote_slot(router, spec), reason)
    load: Load | None = None
    while True:
        async with router._lock:
            m = router._models.get(name)
            if m is None or m.state in (_S.UNLOADED, _S.FAILED):
                raise ModelNotLoaded(model)
            pid = m.process.pid if m.process else None
            if m.state is _S.CRASHED:
                m.forget(reason)
                return UnloadResult(name, None, time.monotonic() - began)
            if m.state is _S.LOADING:
                assert m.load is not None
                load = m.load
                load.cancel_reason = f"{reason} while loading"
                load.scope.cancel()
                break
            if m.state is _S.STOPPING:
                wait_for = m.changed
            else:
                m.begin_stop(reason)
                break
        await wait_for.wait()  # someone else is stopping it: wait, then look again
    with anyio.CancelScope(shield=True):
        if load is not None:
            await load.done.wait()
        else:
            await router._finish_stop(m)
    return UnloadResult(name, pid, time.monotonic() - began, cancelled_load=load is not None)


async def unload_all(router: AsyncRouter, reason: str) -> list[UnloadResult]:
    """Unload every model (in parallel); while the router closes, until none is left.

    :raises LemonError: the first unload that failed (a remote's), after all the others ran.
    """
    results: list[UnloadResult] = []
    failed: list[LemonError] = []
    closing = router._closed

    async def one(name: str) -> None:
        try:
            results.append(await unload(router, name, reason, closing=closing))
        except ModelNotLoaded:
            pass
        except LemonError as exc:  # a remote that refused or did not answer: the others go on
            failed.append(exc)

    # while closing, ensure_loaded refuses new loads, so this converges; repeat in case
    # a load was starting while the first pass ran. Remote models are unloaded on their
    # servers when asked to, never because this router closes (they are the server's).
    remotes = [] if closing else [
        n for n, r in router._remotes.items() if r.state is not _S.UNLOADED
        and (n not in router._models or router._models[n].state in (_S.UNLOADED, _S.FAILED))]
    for _ in range(3 if closing else 1):
        async with anyio.create_task_group() as tg:
            for name in [*router._models, *remotes]:
                tg.start_soon(one, name)
        remotes = []
        if not any(m.state in (_S.LOADING, _S.READY, _S.STOPPING) for m in router._models.values()):
            break
    if failed:  # every other model was unloaded all the same: the error carries them
        failed[0].unloaded = tuple(results)  # type: ignore[attr-defined]
        raise failed[0]
    return results

