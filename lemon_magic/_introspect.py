"""What the router shows without changing anything: plans, status rows, the no-op fast path.

Each reads the router's state on its loop thread; none takes the lock or awaits.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

from lemon_magic import _capacity, _idle
from lemon_magic._policy import Decision, ModelState, decide
from lemon_magic._records import LoadResult, ModelStatus, Plan
from lemon_magic.errors import LemonError, ModelNotFound, ModelNotLoaded
from lemon_magic.options import LoadOptions, ResolvedOptions
from lemon_magic.registry import ModelSpec

if TYPE_CHECKING:
    from lemon_magic.router import AsyncRouter

__all__ = ("log_tail", "plan", "status", "try_noop")

_ACTIONS: dict[Decision, Literal["noop", "load", "reload", "wait"]] = {
    Decision.USE: "noop", Decision.START: "load", Decision.RELOAD: "reload",
    Decision.WAIT_LOAD: "wait", Decision.WAIT_STOP: "wait"}


def plan(router: AsyncRouter, spec: ModelSpec, wanted: ResolvedOptions) -> Plan:
    """What an explicit load of ``spec`` with ``wanted`` would do now (``decide`` itself says)."""
    m = router._models.get(spec.name)
    state = m.state if m else ModelState.UNLOADED
    current = m.options if m and state is ModelState.READY else None
    action = _ACTIONS[decide(state, current, wanted, explicit=True)]
    last_load = m.load_seconds if m is not None else None
    last_stop = m.stop_seconds if m is not None else None
    return Plan(spec.name, action, wanted, current, current.diff(wanted) if current else {},
                last_load, last_stop if action == "reload" else None, state)


def status(router: AsyncRouter) -> list[ModelStatus]:
    """A snapshot of every model the router knows, loaded or not."""
    out = []
    now_wall, now = time.time(), time.monotonic()
    for m in router._models.values():
        proc = m.process
        idle_at = _idle.deadline(m, router.config)
        out.append(ModelStatus(
            m.name, m.spec.kind, m.state, m.options.backend if m.options else None,
            proc.pid if proc else None, proc.url if proc else None, m.options,
            _capacity.rss(proc) if proc else None, m.pinned, m.load_seconds,
            m.last_used_wall, m.busy, m.last_error.render() if m.last_error else None,
            tuple(m.log_tail(20)), now_wall - (now - m.state_since),
            None if idle_at is None else now_wall + (idle_at - now), proc.argv if proc else None,
            router._pulls.download(m.name)))
    out += [r.status() for r in router._remotes.values()]
    return out + router._pulls.statuses({s.name for s in out})


def log_tail(router: AsyncRouter, model: str, n: int) -> list[str]:
    """``AsyncRouter.log_tail``: a backend's log, or for a remote model what happened to it here.

    :raises ModelNotLoaded: the router has never run this model.
    :raises ModelNotFound: no model has that name (neither registered, a file, nor pullable).
    """
    m = router._models.get(model)
    if m is not None:
        return m.log_tail(n)
    if model in router._remotes:
        return list(router._remotes[model].notes)[-n:]
    try:
        router.registry.lookup(model)
    except ModelNotFound:
        from lemon_magic._pulling import pull_target

        if pull_target(model) is None:
            raise
    except LemonError:
        pass  # a registration or file with a problem: it exists, it just never ran
    raise ModelNotLoaded(model)


def try_noop(router: AsyncRouter, model: str, options: LoadOptions) -> LoadResult | None:
    """The no-op fast path, run synchronously on the loop thread (no task, no await).

    A synchronous call on the loop cannot interleave with any task, so when the
    lock is free this is the same decision ``ensure_loaded`` would make. Returns
    ``None`` whenever the answer is not a plain no-op (then the caller takes the
    full path).
    """
    m = router._models.get(model)
    if m is None or m.state is not ModelState.READY or router._lock.locked() or router._closed:
        return None
    began = time.monotonic()
    spec = router._resolver.cached_spec(model)
    if spec is None:
        return None
    wanted = router.resolve(spec, options)
    if decide(m.state, m.options, wanted, explicit=True) is not Decision.USE:
        return None
    assert m.process is not None and m.options is not None
    m.touch()
    m.preferred = options
    return LoadResult(m.name, "noop", m.options.backend, m.process.pid, m.process.url,
                      m.options, time.monotonic() - began, m.load_seconds or 0.0)
