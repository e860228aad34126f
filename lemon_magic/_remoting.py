"""Remote models under the load contract: ensure_loaded, unload, plan, and the health poll.

Declarative against the remote's truth (lemonade-sdk/lemonade#1603, across
machines): an explicit load of a lemonade remote first asks the remote's
``/health`` what it has loaded *now* (another client may have reloaded or
unloaded it), then does nothing, loads or reloads through the remote's own
declarative ``/load``; never from a belief cached here. An auto-load (by
inference) uses a ready model as it is and only loads one that the remote does
not have loaded. An openai remote has no load control: its "load" checks that
the server lists the model and refuses load options (never a silent ignore).

Single flight per model: one :class:`~lemon_magic._remote_slot.RemoteFlight` at
a time; callers that want the same thing join it (N cells or threads, one
remote ``/load``); an explicit load that wants other options waits for it, then
decides again. Flights run in the router's task group, so a caller's Stop only
ends its own wait. All of this runs on the router's loop; decisions between two
awaits are atomic there, and remote models never touch the router's lock, its
slots or its memory budget: local loads never wait for a remote, nor evict one.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

import anyio

from lemon_magic._policy import ModelState
from lemon_magic._records import LoadResult, Plan, UnloadResult
from lemon_magic._remote import RemoteEntry, check_remote_options, remote_action, reported_options
from lemon_magic._remote_slot import RemoteFlight, RemoteSlot
from lemon_magic.errors import (
    InvalidOptions,
    LemonError,
    LoadCancelled,
    LoadError,
    ModelNotFound,
    ModelNotLoaded,
    RemoteError,
    RemoteUnreachable,
    RouterClosed,
    WaitTimeout,
)
from lemon_magic.options import LoadOptions, ResolvedOptions
from lemon_magic.registry import ModelSpec

if TYPE_CHECKING:
    from lemon_magic.router import AsyncRouter

__all__ = ("close_all", "ensure_loaded", "forget", "plan", "remote_slot", "unload")

_S = ModelState


def remote_slot(router: AsyncRouter, spec: ModelSpec) -> RemoteSlot:
    """The slot of a remote model (made on first use, and anew when its registration changed),
    its client's limits set from the router's settings of the moment."""
    r = router._remotes.get(spec.name)
    if r is not None and r.spec == spec:
        r.client.timeout = router.config.remote_timeout  # settings changed since: they apply
        r.client.load_timeout = router.config.remote_load_timeout
        return r
    if r is not None:
        forget(router, r, "registered anew")
    r = router._remotes[spec.name] = RemoteSlot(spec, router.config, router._emit)
    return r


def forget(router: AsyncRouter, r: RemoteSlot, reason: str) -> None:
    """Drop a remote model's slot (its registration went or changed): its flight is cancelled
    (waiters get :class:`LoadCancelled`), its poll stops, and its client closes once that flight,
    an unload in progress and our requests on it have ended (each bounded). The remote's model
    is left as it is."""
    if router._remotes.get(r.name) is r:
        del router._remotes[r.name]
    r.retired = reason
    r.following = False
    if r.poller is not None:
        r.poller.cancel()
    if r.flight is not None:
        r.flight.cancel_reason = reason
        r.flight.scope.cancel()
    router._retiring.add(r)
    assert router._tg is not None
    router._tg.start_soon(_retire, router, r)


async def _retire(router: AsyncRouter, r: RemoteSlot) -> None:
    try:
        with anyio.move_on_after(router.config.drain_timeout + router.config.remote_timeout):
            while r.flight is not None or r.state is _S.STOPPING:
                await r.changed.wait() if r.flight is None else await r.flight.done.wait()
            await r.drain(router.config.drain_timeout)
    finally:
        router._retiring.discard(r)
        await r.aclose()  # shielded


async def close_all(router: AsyncRouter) -> None:
    """The router closes: stop every poll and client, the retiring ones' too (remote models
    stay as they are on their servers)."""
    with anyio.CancelScope(shield=True):
        for r in [*router._remotes.values(), *router._retiring]:
            if r.flight is not None:
                r.flight.cancel_reason = "the router is closing"
                r.flight.scope.cancel()
                await r.flight.done.wait()
            with anyio.move_on_after(router.config.remote_timeout):  # an unload in progress ends
                while r.state is _S.STOPPING:
                    await r.changed.wait()
            await r.aclose()
        router._retiring.clear()


def _wanted(r: RemoteSlot, requested: LoadOptions, explicit: bool) -> LoadOptions:
    asked = requested if explicit else requested.merged_over(r.preferred)
    return asked.merged_over(r.spec.defaults)


async def _wait(router: AsyncRouter, r: RemoteSlot, event: anyio.Event, deadline: float) -> None:
    with anyio.move_on_after(max(deadline - time.monotonic(), 0)) as waited:
        await event.wait()
    if waited.cancelled_caught:
        raise WaitTimeout(f"gave up waiting for {r.name!r} after "
                          f"{router.config.load_wait_timeout:g} s (it is still {r.state})",
                          model=r.name)


async def ensure_loaded(router: AsyncRouter, spec: ModelSpec, requested: LoadOptions, *,
                        explicit: bool, pin: bool | None, acquire: bool) -> LoadResult:
    """``AsyncRouter.ensure_loaded`` for a remote model (see the module's docstring).

    :raises InvalidOptions: an option the remote cannot apply (nothing is sent).
    :raises LemonError: the remote's error (unreachable, 401, load failed…), one line.
    """
    if pin is not None:
        raise InvalidOptions(f"{spec.name!r} is a remote model: it is never evicted here, so "
                             "there is nothing to pin")
    began = time.monotonic()
    deadline = began + router.config.load_wait_timeout
    r = remote_slot(router, spec)
    while True:
        if router._closed:
            raise RouterClosed()
        if router._remotes.get(spec.name) is not r:  # unregistered or registered anew while we
            # waited: decide from the registration as it is now (never bring the old one back)
            return await router.ensure_loaded(spec.name, requested, explicit=explicit, pin=pin,
                                              _acquire=acquire)
        wanted = _wanted(r, requested, explicit)
        f = r.flight
        started: RemoteFlight | None = None
        if f is None and not explicit and r.state is _S.READY:  # an auto-load uses it as it is
            r.touch()
            _apply_caller(r, requested, explicit)
            if acquire:
                r.admit()
            return r.result("noop", began, wanted=wanted)
        check_remote_options(r.remote, wanted)
        if f is None and r.state is _S.STOPPING:  # being unloaded: wait, then decide again
            await _wait(router, r, r.changed, deadline)
            continue
        if f is None:
            assert router._tg is not None
            f = started = r.flight = RemoteFlight(wanted, explicit)
            router._tg.start_soon(_fly, router, r, f)
        elif explicit and not (f.explicit and f.wanted == wanted):
            await _wait(router, r, f.done, deadline)  # another load in flight: then decide again
            continue
        await _wait(router, r, f.done, deadline)
        if f.error is not None:
            raise f.error
        if router._remotes.get(r.name) is not r:  # registered anew meanwhile: decide again
            continue
        _apply_caller(r, requested, explicit)
        if acquire:
            if r.state is not _S.READY:  # unloaded again meanwhile: decide again
                continue
            r.admit()
        return r.result(f.action, began, joined=f is not started, wanted=wanted,
                        previous=f.previous)


def _apply_caller(r: RemoteSlot, requested: LoadOptions, explicit: bool) -> None:
    if explicit:
        r.preferred = requested


async def _fly(router: AsyncRouter, r: RemoteSlot, f: RemoteFlight) -> None:
    """The flight task: check and (if needed) load; its outcome is every joiner's."""
    try:
        try:
            with f.scope:
                await _carry_out(router, r, f)
        except anyio.get_cancelled_exc_class():
            raise
        except LemonError:
            raise
        except Exception as exc:  # the remote's answer broke an assumption: one clear error
            raise LoadError(f"load of {r.name!r} on {r.remote.url} failed: "
                            f"{type(exc).__name__}: {exc}", model=r.name) from exc
        if f.cancel_reason is not None:  # an unload (or a new registration) came first
            raise LoadCancelled(f"load of {r.name!r} was cancelled: {f.cancel_reason}",
                                model=r.name)
    except LemonError as exc:
        exc.model = r.name  # the name our callers know it by (not the remote's)
        f.error = exc
        r.last_error = exc
        r.note(f"load failed: {exc.message.splitlines()[0]}")
        if r.state is _S.LOADING:
            cancelled = isinstance(exc, LoadCancelled)
            r.set_state(_S.UNLOADED if cancelled else _S.FAILED, exc.message.splitlines()[0])
        elif isinstance(exc, RemoteUnreachable) and r.state is _S.READY and r.following:
            r.set_state(_S.UNREACHABLE, exc.message)
    except BaseException:  # cancelled from outside: the router is closing
        f.error = LoadCancelled(f"load of {r.name!r} was cancelled: the router is closing",
                                model=r.name)
        if r.state is _S.LOADING:
            r.set_state(_S.UNLOADED, "the router is closing")
        raise
    finally:
        r.flight = None
        f.done.set()


async def _carry_out(router: AsyncRouter, r: RemoteSlot, f: RemoteFlight) -> None:
    client, remote = r.client, r.remote
    if remote.api == "openai":
        entry = await client.check_loadable(f.wanted)
        f.action = "noop" if r.state is _S.READY else "loaded"
        detail = f"listed by {remote.url}"
    else:
        entry = await client.health()
        r.saw(entry)
        todo = remote_action(entry, f.wanted) if f.explicit else ("noop" if entry.loaded else "load")
        detail = f"loaded on {remote.url}" + (f", pid {entry.pid}" if entry.pid else "")
        if todo != "noop":
            r.set_state(_S.LOADING, f"{todo} on {remote.url}")
            try:
                done = await client.load(f.wanted, before=entry)
            except (InvalidOptions, ModelNotFound):  # refused: nothing changed on the remote
                r.saw(entry)
                r.set_state(_S.READY if entry.loaded else _S.UNLOADED,
                            f"{remote.url} refused the {todo}; it has what it had")
                if entry.loaded:
                    r.following = True
                    _follow(router, r)
                raise
            f.action = done.action
            if done.action == "reloaded":
                f.previous = reported_options(remote, entry)
            r.load_seconds = done.seconds
            entry = await client.health()  # its options as the remote reports them now
            if not entry.loaded:
                raise LoadError(f"remote {remote.url} answered the load of {remote.remote_model!r} "
                                "but does not report it loaded", model=r.name)
            detail = f"{done.action} on {remote.url}" + (f", pid {entry.pid}" if entry.pid else "")
    r.saw(entry)
    r.touch()
    r.last_error = None
    r.following = True
    r.set_state(_S.READY, detail)
    _follow(router, r)


def _follow(router: AsyncRouter, r: RemoteSlot) -> None:
    """Start the health poll of a model we follow, unless it runs."""
    if r.following and r.poller is None and r.retired is None:
        assert router._tg is not None
        r.poller = anyio.CancelScope()
        router._tg.start_soon(_poll, router, r, r.poller)


def _present(r: RemoteSlot, entry: RemoteEntry) -> bool:
    """Whether the remote still serves the model (a lemonade remote: loaded; an openai remote:
    listed, since it loads on demand)."""
    return entry.loaded if r.remote.api == "lemonade" else entry.listed


async def _poll(router: AsyncRouter, r: RemoteSlot, scope: anyio.CancelScope) -> None:
    """While we follow the model (from our load to our unload), ask its server every
    ``remote_poll_interval`` s: no answer → ``unreachable``; an answer again → ``ready``; not
    loaded there → ``unloaded`` (a third party unloaded it, or is reloading it), and ``ready``
    again once it is back. The remote's report (pid, options) is kept fresh for ``status()``."""
    watched = (_S.READY, _S.UNREACHABLE, _S.UNLOADED)
    try:
        with scope:
            while r.following:
                interval = max(router.config.remote_poll_interval, 0.05)
                await anyio.sleep(interval)
                if r.flight is not None or r.state not in watched:
                    continue  # a load or an unload speaks for the remote now
                asked_after = r.checked_at
                try:
                    entry = await r.client.health(timeout=max(2.0, 2 * interval))
                except RemoteUnreachable as exc:
                    if r.flight is None and r.state is _S.READY and r.following:
                        r.last_error = exc
                        r.set_state(_S.UNREACHABLE, exc.message.splitlines()[0])
                    continue
                except Exception as exc:  # 401, 5xx, an odd answer: said, the state kept
                    error = exc if isinstance(exc, LemonError) else LoadError(
                        f"remote {r.remote.url} sent an answer that cannot be read: {exc!r}")
                    r.last_error = error
                    r.note(f"health check failed: {error.message.splitlines()[0]}")
                    continue
                if (r.flight is not None or r.state not in watched or not r.following
                        or r.checked_at != asked_after):
                    continue  # a decision came while we asked: it has the fresher word
                r.saw(entry)
                if isinstance(r.last_error, RemoteUnreachable):
                    r.last_error = None  # it answers: that error is over
                if not _present(r, entry):
                    r.set_state(_S.UNLOADED, f"{r.remote.url} does not have "
                                             f"{r.remote.remote_model!r} loaded now")
                elif r.state is not _S.READY:
                    r.last_error = None
                    r.set_state(_S.READY, f"{r.remote.url} answers again"
                                if r.state is _S.UNREACHABLE else f"loaded again on {r.remote.url}")
    finally:
        if r.poller is scope:
            r.poller = None


async def unload(router: AsyncRouter, r: RemoteSlot, reason: str) -> UnloadResult:
    """Unload a remote model: a lemonade remote's ``/unload`` (after our requests on it end,
    bounded by ``drain_timeout``); an openai remote is only let go here (it has no unload).
    A load in flight is cancelled first (its waiters get :class:`LoadCancelled`).

    :raises ModelNotLoaded: it is not loaded, loading or unreachable.
    :raises RemoteError: the remote's unload failed (the state says what it believes now).
    """
    began = time.monotonic()
    cancelled = sent_load = False
    while True:
        f = r.flight
        if f is not None:
            sent_load = sent_load or r.state is _S.LOADING  # its /load may go on over there
            f.cancel_reason = f"{reason} while loading"
            f.scope.cancel()
            with anyio.CancelScope(shield=True):
                await f.done.wait()
            cancelled = True
            continue
        if r.state is _S.STOPPING:  # another unload of it runs: wait for it (bounded)
            with anyio.move_on_after(router.config.drain_timeout + router.config.remote_timeout):
                await r.changed.wait()
            if r.state is _S.STOPPING:
                raise WaitTimeout(f"gave up waiting for the unload of {r.name!r} in progress",
                                  model=r.name)
            continue
        break
    pid = r.entry.pid if r.entry else None
    ours = r.state not in (_S.UNLOADED, _S.FAILED) or cancelled
    if r.remote.api == "openai":
        if not ours:
            raise ModelNotLoaded(r.name)
        r.following = False
        if r.state is not _S.UNLOADED and r.state is not _S.FAILED:
            r.set_state(_S.UNLOADED, f"{reason}; {r.remote.url} keeps serving it")
        return UnloadResult(r.name, None, time.monotonic() - began, cancelled_load=cancelled,
                            detail=f"{r.remote.url} keeps serving it (an openai remote has no "
                                   "unload)")
    # a lemonade remote: its /unload is declarative, so even a model we do not follow (loaded
    # by another kernel, or before a restart) is asked for; its 404 means "not loaded"
    following, r.following = r.following, False  # what the remote does with it is not ours now
    stopping = r.state in (_S.READY, _S.UNREACHABLE)
    if stopping:
        r.set_state(_S.STOPPING, reason)
    with anyio.CancelScope(shield=True):
        await r.drain(router.config.drain_timeout)
        try:
            had = await r.client.unload()
        except BaseException as exc:
            error = exc if isinstance(exc, LemonError) else RemoteError(
                f"unload of {r.name!r} on {r.remote.url} failed: {type(exc).__name__}",
                url=r.remote.url, model=r.name)
            r.last_error = error
            r.following = following
            if stopping:
                r.set_state(_S.UNREACHABLE if isinstance(exc, RemoteUnreachable) else _S.READY,
                            f"the unload failed: {error.message.splitlines()[0]}")
            _follow(router, r)
            if error is exc or not isinstance(exc, Exception):
                raise
            raise error from exc
    r.saw(RemoteEntry(loaded=False))
    r.last_error = None
    if stopping:
        r.set_state(_S.UNLOADED, f"{reason} on {r.remote.url}")
    if sent_load:
        assert router._tg is not None
        router._tg.start_soon(_unload_if_it_appears, router, r)
    if not had and not ours:
        raise ModelNotLoaded(r.name)
    detail = f"on {r.remote.url}" if had else f"{r.remote.url} did not have it loaded"
    return UnloadResult(r.name, pid, time.monotonic() - began, cancelled_load=cancelled,
                        detail=detail)


async def _unload_if_it_appears(router: AsyncRouter, r: RemoteSlot) -> None:
    """A load we cancelled may still finish on a remote that does not stop a load when its client
    goes away: until ``remote_load_timeout`` (or our next load of it), unload it there if it shows
    up loaded."""
    deadline = time.monotonic() + router.config.remote_load_timeout
    while time.monotonic() < deadline:
        await anyio.sleep(max(router.config.remote_poll_interval, 0.05))
        if r.flight is not None or r.following or r.retired or r.state is not _S.UNLOADED:
            return  # someone wants it again: not ours to undo
        try:
            if (await r.client.health()).loaded and r.flight is None and not r.following:
                await r.client.unload()
                r.note(f"its cancelled load finished on {r.remote.url} anyway: unloaded it there")
                return
        except Exception:  # best effort (the remote may be gone, the slot retired meanwhile)
            continue


async def plan(router: AsyncRouter, spec: ModelSpec, requested: LoadOptions) -> Plan:
    """What an explicit load would do now, from the remote's own report (one ``/health``)."""
    r = remote_slot(router, spec)
    wanted = _wanted(r, requested, True)
    check_remote_options(r.remote, wanted)
    action: Literal["noop", "load", "reload"]
    if r.remote.api == "openai":
        entry = await r.client.check_loadable(wanted)
        action = "noop" if r.state is _S.READY else "load"
    else:
        entry = await r.client.health()
        r.saw(entry)
        action = remote_action(entry, wanted)
    current = reported_options(r.remote, entry) if _present(r, entry) else None
    base = current or reported_options(r.remote, None)
    target = ResolvedOptions(
        backend=wanted.backend or base.backend, ctx_size=wanted.ctx_size or base.ctx_size, threads=0,
        extra_args=wanted.extra_args if wanted.extra_args is not None else base.extra_args,
        model_path=base.model_path)
    return Plan(r.name, "wait" if r.flight is not None else action, target, current,
                current.diff(target) if current else {}, r.load_seconds, None, r.state)
