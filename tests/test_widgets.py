"""The panel, driven at the Python level: set traits, click, and compare with what the router did."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from lemon_magic import ModelState, Router, RouterConfig, get_router
from lemon_magic.backends import default_backends
from lemon_magic.widgets import LemonPanel, chip
from tests.conftest import _our_backends
from tests.fakes import FakeBackend

pytestmark = pytest.mark.real


@pytest.fixture
def panel_for(make_router: Callable[..., Router]) -> Iterator[Callable[..., tuple[Router, LemonPanel]]]:
    panels: list[LemonPanel] = []

    def make(config: RouterConfig | None = None, **kwargs: object) -> tuple[Router, LemonPanel]:
        router = make_router(config, **kwargs)
        panel = LemonPanel(router)
        panel.wait_idle()
        panels.append(panel)
        return router, panel

    yield make
    for p in panels:
        p.close()


def _state(panel: LemonPanel, model: str) -> str:
    row = panel._rows.get(model)
    return chip(row.status) if row else "unloaded"


def _pick(panel: LemonPanel, model: str) -> None:
    panel.wait_idle()  # let the panel list what the router knows first
    if model not in panel.model.options:
        panel.model.options = [*panel.model.options, model]
    panel.model.value = model
    panel.wait_idle()


EDITS = [  # (form edits, what Apply must do)
    ({"ctx_size": "256"}, "load"),
    ({"ctx_size": "256"}, "noop"),
    ({"ctx_size": "512"}, "reload"),
    ({"threads": "1"}, "reload"),
    ({"threads": "auto"}, "reload"),  # back to the default thread count
    ({"ctx_size": "512", "threads": "auto"}, "noop"),
    ({"extra_args": "--flash-attn off"}, "reload"),
    ({"extra_args": "--flash-attn  off"}, "noop"),  # the same argv once split
]


def test_the_warning_matches_what_the_router_then_does(panel_for: Callable[..., tuple[Router, LemonPanel]],
                                                        tiny_model: str) -> None:
    router, panel = panel_for()
    _pick(panel, tiny_model)
    panel.backend.value = "llama-server"
    expected_action = {"load": "loaded", "noop": "noop", "reload": "reloaded"}
    for edits, expected in EDITS:
        for field, value in edits.items():
            getattr(panel, field).value = value
        panel.wait_idle()
        assert panel.plan is not None and panel.plan.action == expected, (edits, repr(panel))
        banner = panel.banner.value
        assert {"load": "will load", "noop": "no change (no-op)", "reload": "will reload"}[expected] in banner
        spawns = router.spawn_count
        panel.apply.click()
        panel.wait_until(lambda p: not p._busy and p.last_result is not None)
        result = panel.last_result
        assert result.action == expected_action[expected], (edits, result)
        assert router.spawn_count == spawns + (0 if expected == "noop" else 1)
        panel.wait_until(lambda p: p.plan is not None and p.plan.action == "noop")


def test_reload_banner_names_the_diff_and_an_estimate(panel_for: Callable[..., tuple[Router, LemonPanel]],
                                                      tiny_model: str) -> None:
    router, panel = panel_for()
    router.load(tiny_model, ctx_size=256)
    _pick(panel, tiny_model)
    assert panel.ctx_size.value == "256"  # prefilled with what is loaded
    panel.ctx_size.value = "1024"
    panel.wait_idle()
    assert f"will reload {tiny_model}: ctx_size 256 → 1024 — about" in panel.banner.value
    assert "(last load" in panel.banner.value
    panel.revert.click()
    panel.wait_idle()
    assert panel.ctx_size.value == "256" and "no change (no-op)" in panel.banner.value


def test_rows_follow_router_events(panel_for: Callable[..., tuple[Router, LemonPanel]],
                                   tiny_model: str) -> None:
    router, panel = panel_for()
    r = router.load(tiny_model, ctx_size=256)  # not through the panel
    panel.wait_until(lambda p: _state(p, tiny_model) == "ready")
    row = panel._rows[tiny_model]
    assert f"pid {r.pid}:" in row.summary.value and "ctx 256" in row.summary.value
    os.kill(r.pid, signal.SIGKILL)
    panel.wait_until(lambda p: _state(p, tiny_model) == "crashed", timeout=5)
    assert row.error.layout.display == "" and "killed by SIGKILL" in row.details.value
    router.complete(tiny_model, "the", max_tokens=1)
    panel.wait_until(lambda p: _state(p, tiny_model) == "ready")
    assert row.error.layout.display == "none"


def test_generating_chip_while_a_request_streams(panel_for: Callable[..., tuple[Router, LemonPanel]],
                                                 tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TOKEN_DELAY", "0.3")
    router, panel = panel_for(backends={"fake": FakeBackend()})
    router.load(tiny_model, backend="fake")
    stream = router.complete(tiny_model, "hi", stream=True)
    stream.wait_loaded()  # a stream starts on first use
    panel.wait_until(lambda p: _state(p, tiny_model) == "generating", timeout=10)
    assert "".join(stream) == "fake text from the stand-in"
    panel.wait_until(lambda p: _state(p, tiny_model) == "ready", timeout=10)


def test_buttons_are_disabled_during_a_transition_and_a_double_click_loads_once(
        panel_for: Callable[..., tuple[Router, LemonPanel]], tiny_model: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    router, panel = panel_for(backends={**default_backends(), "fake": FakeBackend(gate=gate)})
    _pick(panel, tiny_model)
    panel.backend.value = "fake"
    panel.wait_idle()
    panel.apply.click()
    panel.apply.click()
    panel.wait_until(lambda p: _state(p, tiny_model) == "loading")
    assert panel.apply.disabled and panel.unload.disabled and panel.revert.disabled
    gate.touch()
    panel.wait_until(lambda p: _state(p, tiny_model) == "ready" and not p.apply.disabled)
    assert router.spawn_count == 1


def test_a_failed_load_shows_its_error_and_keeps_the_form(
        panel_for: Callable[..., tuple[Router, LemonPanel]], tiny_model: str) -> None:
    _, panel = panel_for(backends={**default_backends(), "fake": FakeBackend(exit_at_start=4)})
    _pick(panel, tiny_model)
    panel.backend.value = "fake"
    panel.ctx_size.value = "300"
    panel.wait_idle()
    panel.apply.click()
    panel.wait_until(lambda p: bool(p.error_text) and not p._busy)
    assert "exited during start (exit code 4)" in panel.error_text
    assert "refusing to start" in panel.error.value  # the log tail
    assert panel.ctx_size.value == "300" and panel.backend.value == "fake"
    assert _state(panel, tiny_model) == "error" and not _our_backends()


def test_unload_button(panel_for: Callable[..., tuple[Router, LemonPanel]], tiny_model: str) -> None:
    router, panel = panel_for()
    pid = router.load(tiny_model, ctx_size=256).pid
    _pick(panel, tiny_model)
    panel.unload.click()
    panel.wait_until(lambda p: _state(p, tiny_model) == "unloaded")
    assert panel.last_result.pid == pid and "will load" in panel.banner.value


def test_text_form_is_stable(panel_for: Callable[..., tuple[Router, LemonPanel]], tiny_model: str) -> None:
    router, panel = panel_for()
    router.load(tiny_model, ctx_size=256, backend="llama-server")
    _pick(panel, tiny_model)
    panel.ctx_size.value = "512"
    panel.wait_until(lambda p: p.plan is not None and p.plan.action == "reload")
    assert repr(panel) == (f"LemonPanel\n  {tiny_model}: ready (llama-server, ctx 256)\n"
                           f"  form: will reload {tiny_model}: ctx_size 256 → 512")


def test_a_state_change_from_another_thread_reaches_the_panel(
        panel_for: Callable[..., tuple[Router, LemonPanel]], tiny_model: str) -> None:
    router, panel = panel_for()
    t = threading.Thread(target=router.load, args=(tiny_model,), kwargs={"ctx_size": 256})
    t.start()
    panel.wait_until(lambda p: _state(p, tiny_model) == "ready")
    t.join()


def test_magic_panel_and_text_warnings(ip: InteractiveShell, tiny_model: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    panel = ip.run_line_magic("lemon_panel", "")
    assert isinstance(panel, LemonPanel) and ip.run_line_magic("lemon_panel", "") is panel
    ip.run_line_magic("lemon_load", f"{tiny_model} --ctx-size 256")
    capsys.readouterr()
    ip.run_line_magic("lemon_load", f"{tiny_model} --ctx-size 512")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"will reload {tiny_model}: ctx_size 256 → 512 — about ")
    assert out[1].startswith(f"reloaded {tiny_model}: ctx_size 256 → 512 (")
    ip.run_line_magic("lemon_load", tiny_model)  # back to the defaults (ctx 4096)
    capsys.readouterr()
    ip.run_line_magic("config", "LemonMagics.ctx_size = 2048")
    assert capsys.readouterr().out.strip() == (
        f"note: the next %lemon_load {tiny_model} will reload it: ctx_size 4096 → 2048")
    assert get_router().status()[0].options.ctx_size == 4096  # a warning, not a reload
    panel.wait_until(lambda p: _state(p, tiny_model) == "ready")
    panel.close()
    assert get_router().status()[0].state is ModelState.READY
