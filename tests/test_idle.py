"""Idle unload: a ready model with no request in flight for ``idle_timeout`` seconds is unloaded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from lemon_magic import ModelState, Router, RouterConfig
from lemon_magic._render import StatusTable
from tests.conftest import EventLog, alive
from tests.fakes import FakeBackend

pytestmark = pytest.mark.real


def test_an_idle_model_is_unloaded_and_a_pinned_one_is_not(make_router: Callable[..., Router],
                                                           tiny_model: str, tiny_model_b: str,
                                                           events: EventLog) -> None:
    router = make_router(RouterConfig(max_loaded={"llm": 2}, start_timeout=60))
    router.subscribe(events)
    pinned = router.load(tiny_model, ctx_size=256, pin=True)
    idle = router.load(tiny_model_b, ctx_size=256)
    assert {s.name: s.idle_unload_at for s in router.status()} == {tiny_model: None, tiny_model_b: None}
    router.configure(idle_timeout=2.0)  # applies to models already loaded
    rows = {s.name: s for s in router.status()}
    assert rows[tiny_model].idle_unload_at is None  # pinned: exempt
    unload_at = rows[tiny_model_b].idle_unload_at
    assert unload_at is not None and unload_at <= time.time() + 2.0
    table = repr(StatusTable(router.status()))  # what %lemon_status shows
    assert "ready (pinned)  " in table and "(unloads if idle in " in table
    event = events.wait_for(lambda e: e.model == tiny_model_b and e.new is ModelState.UNLOADED)
    assert "idle for 2 s" in next(e.detail for e in events.events
                                    if e.model == tiny_model_b and e.new is ModelState.STOPPING)
    assert not alive(idle.pid) and event.model == tiny_model_b
    # the pinned model was idle for longer and is still there
    assert alive(pinned.pid) and {s.name: s.state for s in router.status()}[tiny_model] is ModelState.READY


def test_a_request_in_flight_is_never_cut_off(make_router: Callable[..., Router], tiny_model: str,
                                              monkeypatch: pytest.MonkeyPatch, events: EventLog) -> None:
    monkeypatch.setenv("FAKE_TOKEN_DELAY", "0.3")  # one stream: ~1.5 s, three idle timeouts
    router = make_router(RouterConfig(idle_timeout=0.5), backends={"fake": FakeBackend()})
    router.subscribe(events)
    loaded = router.load(tiny_model, backend="fake")
    text = router.complete(tiny_model, "hi", stream=True).text  # type: ignore[union-attr]
    assert text == "fake text from the stand-in"
    stopping = events.wait_for(lambda e: e.new is ModelState.STOPPING)
    finished = next(e for e in events.events if e.detail == "idle")
    assert stopping.at >= finished.at  # the unload came after the request ended
    assert not any(e.new is ModelState.STOPPING and e.at < finished.at for e in events.events)
    events.wait_for(lambda e: e.new is ModelState.UNLOADED)
    assert not alive(loaded.pid)


def test_requests_arriving_around_the_deadline_all_succeed(make_router: Callable[..., Router],
                                                           tiny_model: str) -> None:
    """Requests at the deadline either were admitted first (no unload) or reload the model."""
    router = make_router(RouterConfig(idle_timeout=0.05), backends={"fake": FakeBackend()})
    router.load(tiny_model, backend="fake")
    failures: list[BaseException] = []

    def hammer() -> None:
        for _ in range(40):
            try:
                router.complete(tiny_model, "hi", max_tokens=2)
            except BaseException as exc:
                failures.append(exc)
            time.sleep(0.02)

    workers = [threading.Thread(target=hammer) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert failures == []
