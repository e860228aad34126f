"""The panel's lifetime (threads, subscriptions, closing), edits during a prefill and the idle
countdown, mostly on a stand-in router that starts no process."""

from __future__ import annotations

import gc
import sys
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any, cast

import comm
import ipywidgets as w
import ipywidgets.widgets.widget as widget_module
import pytest

import lemon_magic.widgets as widgets_module
from lemon_magic import ModelState, ModelStatus, Plan, Router, RouterEvent
from lemon_magic.options import ResolvedOptions
from lemon_magic.widgets import LemonPanel, _Row, chip

pytestmark = pytest.mark.real


# ---------------------------------------------------------------- a stand-in router (no processes)

STUB = "stub-model"


def _status(state: ModelState = ModelState.READY, ctx: int = 256, threads: int = 2,
            **fields: Any) -> ModelStatus:
    loaded = state is ModelState.READY
    base: dict[str, Any] = dict(
        name=STUB, kind="llm", state=state, backend="llama-server" if loaded else None,
        pid=4242 if loaded else None, url="http://127.0.0.1:5555" if loaded else None,
        options=ResolvedOptions("llama-server", ctx, threads) if loaded else None, rss=None,
        pinned=False, load_seconds=None, last_used=None, requests_in_flight=0, last_error=None,
        log_tail=(), since=time.time() if loaded else None)
    return ModelStatus(**{**base, **fields})


class StubRouter:
    """The part of ``Router`` the panel uses, with events sent by hand and calls counted."""

    closed = False

    def __init__(self, *statuses: ModelStatus) -> None:
        self.statuses = list(statuses)
        self.subscribers: list[Callable[[RouterEvent], None]] = []
        self.subscribes = self.unsubscribes = self.status_calls = 0
        self._lock = threading.Lock()

    def status(self) -> list[ModelStatus]:
        with self._lock:
            self.status_calls += 1
        return list(self.statuses)

    def plan(self, model: str, **options: Any) -> Plan:
        wanted = ResolvedOptions("llama-server", int(options.get("ctx_size", 4096)),
                                 int(options.get("threads", 2)))
        current = next((s.options for s in self.statuses if s.name == model and s.options), None)
        if current is None:
            return Plan(model, "load", wanted, None, {})
        return Plan(model, "noop" if current == wanted else "reload", wanted, current, current.diff(wanted))

    def model_names(self) -> list[str]:
        return [STUB]

    def backend_names(self) -> list[str]:
        return ["llama-server"]

    def load_soon(self, model: str, **options: Any) -> Future[Any]:
        raise NotImplementedError

    def unload_soon(self, model: str) -> Future[Any]:
        raise NotImplementedError

    def subscribe(self, callback: Callable[[RouterEvent], None]) -> Callable[[], None]:
        with self._lock:
            self.subscribes += 1
            self.subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                self.unsubscribes += 1
                if callback in self.subscribers:
                    self.subscribers.remove(callback)
        return unsubscribe

    def emit(self, old: ModelState, new: ModelState) -> None:
        for callback in list(self.subscribers):
            callback(RouterEvent(STUB, old, new, time.time(), 0.0))


def _stub_panel(router: StubRouter) -> LemonPanel:
    panel = LemonPanel(cast(Router, router))
    panel.wait_idle()
    return panel


def _panel_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("lemon-panel"))


def _eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _in_another_thread(action: Callable[[], object]) -> None:
    t = threading.Thread(target=action)
    t.start()
    t.join()


def _edit_from_the_user(field: w.Widget, value: str) -> None:
    """Set ``field`` from another thread, as the kernel's main thread would, and wait for it."""
    _in_another_thread(lambda: setattr(field, "value", value))


def _inside_panel_write(written: w.Widget, action: Callable[[], None], names: str = "value") -> list[bool]:
    """Run ``action`` once, inside the panel's own write of ``written``'s trait (on its updater
    thread), to put a user's action at an exact point of an update; no sleeps."""
    done: list[bool] = []

    def hook(_change: object) -> None:
        if threading.current_thread().name == "lemon-panels" and not done:
            done.append(True)
            action()

    written.observe(hook, names=names)
    return done


@pytest.fixture
def weak_registries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let widgets be garbage: ipywidgets and comm keep every open widget otherwise."""

    class WeakComms(weakref.WeakValueDictionary[str, Any]):
        def pop(self, key: str, *default: Any) -> Any:  # a collected comm is already gone
            return super().pop(key, None)

    monkeypatch.setattr(widget_module, "_instances", weakref.WeakValueDictionary(widget_module._instances))
    manager = comm.get_comm_manager()
    monkeypatch.setattr(manager, "comms", WeakComms(manager.comms))


# ---------------------------------------------------------------- lifetime: threads, subscriptions

def test_closed_panels_leave_no_thread_and_no_subscription() -> None:
    baseline = _panel_threads()  # 1 if a panel of another test is still open
    router = StubRouter(_status())
    panels = [_stub_panel(router) for _ in range(20)]
    assert router.subscribes == 20 and len(router.subscribers) == 20
    assert _panel_threads() <= 1, "one updater thread for all panels"
    for panel in panels:
        panel.close()
    assert _eventually(lambda: router.unsubscribes == 20 and not router.subscribers)
    assert _eventually(lambda: _panel_threads() <= baseline), "the updater stops once no panel listens"
    router.emit(ModelState.READY, ModelState.UNLOADED)  # reaches nobody: nothing to do
    assert _panel_threads() <= baseline


def test_dropped_panels_are_collected_and_unsubscribed(weak_registries: None) -> None:
    baseline = _panel_threads()
    router = StubRouter(_status())
    unraisable: list[Any] = []
    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        refs = [weakref.ref(_stub_panel(router)) for _ in range(20)]  # a cell re-run 20 times
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert [r for r in refs if r() is not None] == [], "nothing of the panel machinery keeps a panel"
    assert not unraisable, unraisable
    assert _eventually(lambda: router.unsubscribes == 20 and not router.subscribers)
    assert _eventually(lambda: _panel_threads() <= baseline)


def test_open_panels_share_one_poll_and_idle_ones_do_not_poll() -> None:
    router = StubRouter(_status())  # ready: its uptime moves, so rows are refreshed
    panels = [_stub_panel(router) for _ in range(20)]
    try:
        before = router.status_calls
        time.sleep(2.5)  # a rate is measured here; nothing is ordered by it
        assert router.status_calls - before <= 4, "one status() per second for all panels"
        router.statuses = [_status(ModelState.UNLOADED)]
        router.emit(ModelState.READY, ModelState.UNLOADED)
        for panel in panels:
            panel.wait_idle()
        before = router.status_calls
        time.sleep(1.5)
        assert router.status_calls == before, "nothing moves: no polling"
    finally:
        for panel in panels:
            panel.close()


def test_events_reach_open_panels_only() -> None:
    router = StubRouter(_status(ModelState.UNLOADED))
    kept, closed = _stub_panel(router), _stub_panel(router)
    closed.close()
    router.statuses = [_status()]
    router.emit(ModelState.LOADING, ModelState.READY)
    kept.wait_until(lambda p: chip(p._rows[STUB].status) == "ready")
    assert chip(closed._rows[STUB].status) == "unloaded"
    kept.close()


def test_a_real_router_is_unsubscribed_by_closed_and_dropped_panels(
        make_router: Callable[..., Router], weak_registries: None) -> None:
    baseline = _panel_threads()
    router = make_router()
    calls = {"subscribe": 0, "unsubscribe": 0}
    real_subscribe = router.subscribe

    def counting(callback: Callable[[RouterEvent], None]) -> Callable[[], None]:
        calls["subscribe"] += 1
        unsubscribe = real_subscribe(callback)

        def counted() -> None:
            calls["unsubscribe"] += 1
            unsubscribe()
        return counted

    router.subscribe = counting  # type: ignore[method-assign]
    for _ in range(5):
        LemonPanel(router).close()
    for _ in range(5):
        LemonPanel(router).wait_idle()  # then dropped
    gc.collect()
    assert calls["subscribe"] == 10
    assert _eventually(lambda: calls["unsubscribe"] == 10)
    assert _eventually(lambda: _panel_threads() <= baseline)


# ---------------------------------------------------------------- close() closes every widget

def test_close_closes_every_widget_of_the_panel() -> None:
    before = set(widget_module._instances)
    router = StubRouter(_status(last_error="boom", log_tail=("a line",)))
    panel = _stub_panel(router)
    tree = [x for x in widget_module._instances.values() if x.model_id not in before]
    kinds = {type(x).__name__ for x in tree}
    assert {"Accordion", "Button", "Text", "Dropdown", "FloatProgress", "Layout", "HTML"} <= kinds
    panel.close()
    assert set(widget_module._instances) - before == set(), "widgets left open"
    assert all(x.comm is None for x in tree)
    router.emit(ModelState.READY, ModelState.UNLOADED)  # a late event makes no new widget
    assert set(widget_module._instances) - before == set()


def test_a_close_during_an_update_leaves_no_widget() -> None:
    before = set(widget_module._instances)
    router = StubRouter()
    panel = _stub_panel(router)
    # the update that makes two rows is interrupted by a close() (from another thread) after the first
    _during_update = _inside_panel_write(panel.rows_box, lambda: _in_another_thread(panel.close),
                                     names="children")
    router.statuses = [_status(), _status(name="other-model")]
    router.emit(ModelState.LOADING, ModelState.READY)
    assert _eventually(lambda: bool(_during_update) and panel._pending == 0)
    assert _eventually(lambda: set(widget_module._instances) - before == set()), "widgets left open"


# ---------------------------------------------------------------- an edit made during a prefill

def test_an_edit_made_during_a_prefill_is_not_overwritten_by_it() -> None:
    router = StubRouter(_status(ctx=256, threads=2))
    panel = _stub_panel(router)
    assert (panel.ctx_size.value, panel.threads.value) == ("256", "2")
    panel.ctx_size.value = "999"
    panel.wait_idle()
    # the prefill writes ctx_size first; the user types in threads meanwhile
    done = _inside_panel_write(panel.ctx_size, lambda: _edit_from_the_user(panel.threads, "1"))
    panel.revert.click()
    panel.wait_idle()
    assert done, "the hook ran inside the prefill"
    assert (panel.ctx_size.value, panel.threads.value) == ("256", "1")
    assert panel.plan is not None and panel.plan.action == "reload"
    panel.close()


def test_an_edit_landing_just_before_the_prefill_writes_that_field_is_put_back() -> None:
    router = StubRouter(_status(ctx=256, threads=2))
    panel = _stub_panel(router)
    panel.ctx_size.value, panel.threads.value = "999", "7"
    panel.wait_idle()

    class ReleaseHook:
        """The panel's edit lock; the first release on the updater thread after ``armed`` runs
        ``action``: here, between the prefill's look at the threads field and its write to it."""

        def __init__(self, lock: Any, action: Callable[[], None]) -> None:
            self.lock, self.action, self.armed = lock, action, False

        def __enter__(self) -> None:
            self.lock.acquire()

        def __exit__(self, *exc: object) -> None:
            self.lock.release()
            if self.armed and threading.current_thread().name == "lemon-panels":
                self.armed = False
                self.action()

    hook = ReleaseHook(panel._edit_lock, lambda: _edit_from_the_user(panel.threads, "1"))
    panel._edit_lock = hook  # type: ignore[assignment]
    _inside_panel_write(panel.ctx_size, lambda: setattr(hook, "armed", True))  # ctx_size is written first
    panel.revert.click()
    panel.wait_idle()
    assert (panel.ctx_size.value, panel.threads.value) == ("256", "1")
    assert panel.plan is not None and panel.plan.current is not None and panel.plan.options.threads == 1
    panel.close()


def test_an_edit_made_during_a_prefill_survives_the_next_load() -> None:
    router = StubRouter(_status(ctx=256, threads=2))
    panel = _stub_panel(router)
    panel.threads.value = "7"
    panel.wait_idle()
    # Revert's prefill writes threads back to 2; the user types in ctx_size (already written) meanwhile
    done = _inside_panel_write(panel.threads, lambda: _edit_from_the_user(panel.ctx_size, "512"))
    panel.revert.click()
    panel.wait_idle()
    assert done and (panel.ctx_size.value, panel.threads.value) == ("512", "2")
    # the model is then reloaded by someone else: its READY event must not prefill over the edit
    router.statuses = [_status(ctx=1024, threads=4)]
    router.emit(ModelState.LOADING, ModelState.READY)
    panel.wait_idle()
    assert (panel.ctx_size.value, panel.threads.value) == ("512", "2")
    assert panel.plan is not None and panel.plan.action == "reload"
    panel.close()


# ---------------------------------------------------------------- idle unload (section 4)

def test_a_row_shows_when_an_idle_model_unloads() -> None:
    row = _Row(STUB)
    now = 1_000_000.0
    row.show(_status(idle_unload_at=now + 250.4), now)
    assert "unloads if idle in 4 min 10 s" in row.summary.value
    row.show(_status(idle_unload_at=now + 9.4), now)
    assert "unloads if idle in 9 s" in row.summary.value
    row.show(_status(idle_unload_at=now + 3600 + 120), now)
    assert "unloads if idle in 62 min 0 s" in row.summary.value
    row.show(_status(idle_unload_at=now - 3), now)
    assert "unloads if idle in 0 s" in row.summary.value
    row.show(_status(idle_unload_at=None), now)
    assert "unloads" not in row.summary.value
    for widget in (row.box, row.summary, row.progress, row.details, row.error):
        widget.close()


def test_the_panel_shows_the_idle_countdown_and_keeps_its_text_form_stable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = time.time()
    monkeypatch.setattr(widgets_module, "time", SimpleNamespace(time=lambda: now, monotonic=time.monotonic))
    router = StubRouter(_status(ctx=256, idle_unload_at=now + 250.4))
    panel = _stub_panel(router)
    assert "unloads if idle in 4 min 10 s" in panel._rows[STUB].summary.value
    text = repr(panel)
    assert text == f"LemonPanel\n  {STUB}: ready (llama-server, ctx 256)\n  form: no change (no-op)"
    router.statuses = [_status(ctx=256, idle_unload_at=now + 30.4)]
    router.emit(ModelState.READY, ModelState.READY)
    panel.wait_idle()
    assert "unloads if idle in 30 s" in panel._rows[STUB].summary.value
    assert repr(panel) == text
    panel.close()
