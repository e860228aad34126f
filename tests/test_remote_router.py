"""Remote models through the router, against real servers on 127.0.0.1 (``tests/remotes.py``):
``lemon-magic serve`` in another process as a ``lemonade`` remote, llama.cpp's router mode as an
``openai`` remote. The load contract across machines: decided against the remote's ``/health``,
single flight per model, auto-loads never reload; a remote that goes away is ``unreachable`` and
comes back on its own."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from lemon_magic import ModelState, Router, RouterConfig
from lemon_magic._records import RemoteView
from lemon_magic._remote_client import RemoteClient
from lemon_magic._render import StatusTable, describe_load
from lemon_magic.errors import (
    InferenceError,
    InvalidOptions,
    LoadCancelled,
    LoadError,
    ModelNotFound,
    ModelNotLoaded,
    RemoteAuthError,
    RemoteUnreachable,
)
from lemon_magic.registry import Registry
from tests.conftest import EventLog
from tests.fake_remote import FakeRemote
from tests.remotes import (
    KEY_ENV,
    SECRET,
    Proc,
    free_port,
    health,
    lemon,
    lemon_root,
    llama_router,
    models_dir,
    own_lemon,
    start_llama_router,
    unload_remote,
)
from tests.tinygguf import write_tiny_llama

__all__ = ("lemon", "lemon_root", "llama_router", "models_dir", "own_lemon")  # fixtures

pytestmark = pytest.mark.usefixtures("forget_registrations")

FAST = RouterConfig(start_timeout=60, drain_timeout=5, stop_grace=3, remote_poll_interval=0.3,
                    remote_timeout=3)


@pytest.fixture
def rr(make_router: Callable[..., Router]) -> Router:
    """A router that polls its remotes often (state changes within a second or two)."""
    return make_router(FAST)


@pytest.fixture
def remote_loads(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every ``POST /load`` our routers send to a remote (the moment it was sent)."""
    sent: list[float] = []
    original = RemoteClient.load

    async def counting(self: RemoteClient, *args: Any, **kwargs: Any) -> Any:
        sent.append(time.monotonic())
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(RemoteClient, "load", counting)
    return sent


# ------------------------------------------------------------------ the load contract


def test_load_noop_and_reload_follow_the_remote(lemon: Proc, rr: Router,
                                                remote_loads: list[float]) -> None:
    unload_remote(lemon)
    rr.register_remote("big", lemon.url, "tiny")
    first = rr.load("big", ctx_size=256)
    assert (first.action, first.options.ctx_size, first.remote) == ("loaded", 256, lemon.url)
    assert first.pid == health(lemon).pid is not None
    again = rr.load("big", ctx_size=256)
    assert (again.action, again.pid) == ("noop", first.pid)
    assert health(lemon).pid == first.pid  # the remote did nothing either
    bigger = rr.load("big", ctx_size=512)
    assert bigger.action == "reloaded" and bigger.pid != first.pid
    assert bigger.previous_options is not None and bigger.previous_options.ctx_size == 256
    assert describe_load(bigger).startswith(f"reloaded big on {lemon.url} in ")
    assert len(remote_loads) == 2  # the no-op sent no /load
    [row] = [s for s in rr.status() if s.name == "big"]
    assert row.state is ModelState.READY and row.remote is not None
    assert (row.remote.pid, row.remote.options["ctx_size"], row.backend) == (bigger.pid, 512,
                                                                             "lemonade remote")
    assert row.rss is None and row.options is None  # no local process, no local memory
    text = repr(StatusTable(rr.status()))
    assert "lemonade remote" in text and lemon.url in text and "ctx 512" in text


def test_concurrent_loads_make_one_remote_load(lemon: Proc, rr: Router,
                                               remote_loads: list[float]) -> None:
    """#1603 across machines: 16 threads asking for the same new options cause one remote
    /load (one reload, one new remote pid), and 16 asking for what is loaded cause none."""
    unload_remote(lemon)
    rr.register_remote("big", lemon.url, "tiny")
    before = rr.load("big", ctx_size=256).pid
    barrier = threading.Barrier(16)

    def load(ctx: int) -> Any:
        barrier.wait()
        return rr.load("big", ctx_size=ctx)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(load, [512] * 16))
    assert len(remote_loads) == 2  # the first load and one reload
    assert {r.pid for r in results} == {health(lemon).pid} != {before}
    assert {r.action for r in results} == {"reloaded"}
    assert sum(not r.joined for r in results) == 1
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        same = list(pool.map(load, [512] * 16))
    assert len(remote_loads) == 2 and {r.action for r in same} == {"noop"}
    assert {r.pid for r in same} == {health(lemon).pid}


def test_two_routers_on_one_remote_share_its_model(lemon: Proc,
                                                   make_router: Callable[..., Router]) -> None:
    """Two kernels (two routers) against one remote: each decides against the remote's truth,
    so the second one's load of the same options is a no-op, and its other options reload."""
    unload_remote(lemon)
    a, b = make_router(FAST), make_router(FAST)
    a.register_remote("big", lemon.url, "tiny")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ra, rb = pool.map(lambda r: r.load("big", ctx_size=384), [a, b])
    assert ra.pid == rb.pid == health(lemon).pid
    assert sorted([ra.action, rb.action]) in (["loaded", "noop"], ["loaded", "loaded"])
    assert b.load("big", ctx_size=384).action == "noop"
    moved = b.load("big", ctx_size=640)
    assert moved.action == "reloaded"
    # a's next explicit load sees b's reload (the remote's truth, not a's belief)
    back = a.load("big", ctx_size=384)
    assert back.action == "reloaded" and back.previous_options is not None
    assert back.previous_options.ctx_size == 640


def test_a_third_party_reload_and_unload_are_seen(lemon: Proc, rr: Router) -> None:
    unload_remote(lemon)
    rr.register_remote("big", lemon.url, "tiny")
    log = EventLog()
    rr.subscribe(log)
    mine = rr.load("big", ctx_size=256)
    httpx.post(f"{lemon.url}/api/v1/load", json={"model_name": "tiny", "ctx_size": 1024},
               timeout=60, trust_env=False).raise_for_status()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        [row] = [s for s in rr.status() if s.name == "big"]
        if row.remote and row.remote.options.get("ctx_size") == 1024:
            break
        time.sleep(0.1)
    assert row.remote is not None and row.remote.options["ctx_size"] == 1024  # the poll saw it
    # an auto-load uses it as it is, and says how it differs
    done = rr.complete("big", "once", max_tokens=2, load_options=None)
    assert done.load.action == "noop" and done.load.pid == health(lemon).pid != mine.pid
    assert rr.load("big", ctx_size=256).action == "reloaded"  # explicit: back to what we want
    unload_remote(lemon)
    log.wait_for(lambda e: e.model == "big" and e.new is ModelState.UNLOADED, timeout=15)
    again = rr.complete("big", "once", max_tokens=2)  # auto-loads with our last explicit options
    assert again.load.action == "loaded"
    assert health(lemon).ctx_size == 256


def test_auto_load_never_reloads_a_remote(lemon: Proc, rr: Router,
                                          remote_loads: list[float]) -> None:
    from lemon_magic.options import LoadOptions

    unload_remote(lemon)
    httpx.post(f"{lemon.url}/api/v1/load", json={"model_name": "tiny", "ctx_size": 1024},
               timeout=60, trust_env=False).raise_for_status()
    pid = health(lemon).pid
    rr.register_remote("big", lemon.url, "tiny")
    done = rr.complete("big", "once", max_tokens=2, load_options=LoadOptions(ctx_size=256))
    assert done.load.action == "noop" and done.load.pid == pid == health(lemon).pid
    assert dict(done.load.options_differ) == {"ctx_size": (1024, 256)}
    assert remote_loads == []


def test_remote_models_take_no_local_slot(lemon: Proc, make_router: Callable[..., Router],
                                          tiny_model: str, tiny_model_b: str) -> None:
    """max_loaded llm = 1: local loads evict each other, never the remote model."""
    r = make_router(FAST)
    unload_remote(lemon)
    r.register_remote("big", lemon.url, "tiny")
    r.load("big")
    r.load(tiny_model)
    r.load(tiny_model_b)
    states = {s.name: s.state for s in r.status()}
    assert states["big"] is ModelState.READY and states[tiny_model_b] is ModelState.READY
    assert states[tiny_model] is ModelState.UNLOADED
    assert health(lemon).loaded


# ------------------------------------------------------------------ unload, close


def test_unload_unload_all_and_close(lemon: Proc, make_router: Callable[..., Router]) -> None:
    r = make_router(FAST)
    unload_remote(lemon)
    r.register_remote("big", lemon.url, "tiny")
    pid = r.load("big").pid
    done = r.unload("big")
    assert done.pid == pid and done.detail == f"on {lemon.url}"
    assert not health(lemon).loaded
    with pytest.raises(ModelNotLoaded):
        r.unload("big")
    r.load("big")
    assert [u.model for u in r.unload_all()] == ["big"] and not health(lemon).loaded
    r.load("big")
    r.close()  # closing a router lets its remote models be: they are the server's
    assert health(lemon).loaded


def test_unload_during_a_remote_load_cancels_it(rr: Router) -> None:
    """A controllable remote whose /load takes 30 s: unload cancels our wait at once, sends the
    remote an /unload, and the loader gets LoadCancelled."""
    with FakeRemote(load_seconds=30) as fake:
        rr.register_remote("slow", fake.url, "m")
        future = rr.load_soon("slow", ctx_size=256)
        deadline = time.monotonic() + 10
        while not any(s.name == "slow" and s.state is ModelState.LOADING for s in rr.status()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        done = rr.unload("slow")
        assert done.cancelled_load
        with pytest.raises(LoadCancelled, match="unloaded while loading"):
            future.result(10)
        assert [s.state for s in rr.status() if s.name == "slow"] == [ModelState.UNLOADED]
        assert fake.count("POST", "/api/v1/unload") == 1


# ------------------------------------------------------------------ failures


def test_unreachable_remote_at_load_is_one_line_and_changes_nothing(rr: Router) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    rr.register_remote("gone", url, "m")
    start = time.monotonic()
    with pytest.raises(RemoteUnreachable, match=rf"remote {url} is unreachable: cannot connect") as info:
        rr.load("gone")
    assert time.monotonic() - start < 6 and "\n" not in info.value.message
    with pytest.raises(RemoteUnreachable):
        rr.complete("gone", "x", max_tokens=1)
    [row] = [s for s in rr.status() if s.name == "gone"]
    assert row.state is ModelState.UNLOADED and row.last_error and "unreachable" in row.last_error


def test_tls_and_5xx_during_a_remote_load(lemon: Proc, lemon_root: Path, rr: Router) -> None:
    rr.register_remote("tls", lemon.url.replace("http:", "https:"), "tiny")
    with pytest.raises(RemoteUnreachable, match="TLS failed"):
        rr.load("tls")
    bad = write_tiny_llama(lemon_root / "broken.gguf", seed=9)
    Registry(lemon_root / "config" / "models.json").register("broken", bad)
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    rr.register_remote("broken", lemon.url, "broken")
    with pytest.raises(LoadError, match=r"HTTP 500: Failed to load model") as info:
        rr.load("broken")
    assert "\n" not in info.value.message
    assert [s.state for s in rr.status() if s.name == "broken"] == [ModelState.FAILED]


def test_options_a_remote_cannot_apply_are_refused_before_any_call(
        lemon: Proc, rr: Router, remote_loads: list[float]) -> None:
    rr.register_remote("big", lemon.url, "tiny")
    with pytest.raises(InvalidOptions, match="cannot apply threads"):
        rr.load("big", threads=2)
    rr.register_remote("oa", f"{lemon.url}/api/v1", "tiny", api="openai")
    with pytest.raises(InvalidOptions, match="no load control: it cannot apply ctx_size"):
        rr.load("oa", ctx_size=512)
    with pytest.raises(InvalidOptions, match="cannot apply ctx_size"):
        rr.register_remote("oa2", f"{lemon.url}/v1", "tiny", api="openai", ctx_size=512)
    assert "oa2" not in rr.model_names() and remote_loads == []
    with pytest.raises(InvalidOptions, match="must not carry credentials"):
        rr.register_remote("cred", "http://user:pw@127.0.0.1:1", "m")


def test_killed_remote_is_unreachable_then_unloaded_and_stopped_one_recovers(
        own_lemon: Callable[..., Proc], rr: Router) -> None:
    proc = own_lemon()
    rr.register_remote("big", proc.url, "tiny")
    log = EventLog()
    rr.subscribe(log)
    rr.load("big", ctx_size=256)
    # stopped (SIGSTOP): no answer, then back with its model: ready again on its own
    os.kill(proc.popen.pid, signal.SIGSTOP)
    try:
        log.wait_for(lambda e: e.model == "big" and e.new is ModelState.UNREACHABLE, timeout=15)
        with pytest.raises(RemoteUnreachable, match="no answer in time"):
            rr.complete("big", "x", max_tokens=1)
    finally:
        os.kill(proc.popen.pid, signal.SIGCONT)
    log.wait_for(lambda e: e.model == "big" and e.old is ModelState.UNREACHABLE
                 and e.new is ModelState.READY, timeout=15)
    assert rr.complete("big", "once", max_tokens=2).load.action == "noop"
    # killed and restarted on the same port: it has nothing loaded, so an inference loads it
    proc.note_children()
    proc.stop(signal.SIGKILL)
    log.wait_for(lambda e: e.model == "big" and e.new is ModelState.UNREACHABLE
                 and e.seconds_in_old > 0.5, timeout=15)
    again = own_lemon(port=proc.port)
    log.wait_for(lambda e: e.model == "big" and e.new is ModelState.UNLOADED, timeout=15)
    done = rr.complete("big", "once", max_tokens=2)
    assert done.load.action == "loaded" and done.load.pid == health(again).pid
    assert health(again).ctx_size == 256  # our last explicit options


def test_api_key_from_the_named_variable_never_stored_or_shown(
        own_lemon: Callable[..., Proc], rr: Router, monkeypatch: pytest.MonkeyPatch) -> None:
    proc = own_lemon(api_key=SECRET)
    rr.register_remote("locked", proc.url, "tiny", api_key_env=KEY_ENV)
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(RemoteAuthError, match=KEY_ENV) as info:
        rr.load("locked")
    assert "\n" not in info.value.message
    monkeypatch.setenv(KEY_ENV, SECRET)
    assert rr.load("locked").action == "loaded"
    assert rr.complete("locked", "once", max_tokens=2).text is not None
    assert "".join(rr.complete("locked", "once", max_tokens=2, stream=True)) is not None
    shown = [Registry().path.read_text(), repr(rr.status()), repr(StatusTable(rr.status())),
             "\n".join(rr.logs("locked")), repr(rr.models())]
    assert all(SECRET not in text for text in shown)
    assert KEY_ENV in Registry().path.read_text()


# ------------------------------------------------------------------ openai remotes


def test_llama_router_mode_as_an_openai_remote(llama_router: Proc, rr: Router) -> None:
    rr.register_remote("oa", f"{llama_router.url}/v1", "tiny", api="openai")
    first = rr.load("oa")
    assert first.action == "loaded" and first.backend == "openai remote" and first.pid is None
    assert "listed there" in describe_load(first)
    assert rr.load("oa").action == "noop"
    done = rr.complete("oa", "once", max_tokens=4, temperature=0)
    assert done.usage.get("completion_tokens", 0) >= 1

    def reported() -> RemoteView | None:  # what the server's /v1/models says, as the poll read it
        return next(s.remote for s in rr.status() if s.name == "oa")

    deadline = time.monotonic() + 10  # router mode loads on demand: "unloaded" until the request
    while (view := reported()) is None or view.status != "loaded":
        assert time.monotonic() < deadline, view
        time.sleep(0.1)
    assert isinstance(view.options.get("ctx_size"), int) and view.options["ctx_size"] > 0
    chat = rr.chat("oa", [{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.finish_reason in ("length", "stop")
    chunks = list(rr.complete("oa", "once", max_tokens=4, temperature=0, stream=True))
    assert chunks and "".join(chunks)
    rr.register_remote("nobody", f"{llama_router.url}/v1", "not-there", api="openai")
    with pytest.raises(ModelNotFound, match="tiny"):
        rr.load("nobody")
    gone = rr.unload("oa")
    assert "keeps serving" in gone.detail
    assert [s.state for s in rr.status() if s.name == "oa"] == [ModelState.UNLOADED]


def test_openai_remote_killed_mid_stream(models_dir: Path, tmp_path: Path, rr: Router) -> None:
    d = tmp_path / "models"
    d.mkdir()
    (d / "tiny.gguf").write_bytes((models_dir / "tiny.gguf").read_bytes())
    proc = start_llama_router(d, tmp_path / "router.log")
    try:
        rr.register_remote("oa", f"{proc.url}/v1", "tiny", api="openai")
        log = EventLog()
        rr.subscribe(log)
        stream = rr.complete("oa", "once", max_tokens=3000, stream=True, ignore_eos=True)
        assert next(stream)
        proc.note_children()
        os.kill(proc.popen.pid, signal.SIGKILL)
        with pytest.raises(InferenceError, match=r"cut the response off mid-way|ended its stream"):
            for _ in stream:
                pass
        log.wait_for(lambda e: e.model == "oa" and e.new is ModelState.UNREACHABLE, timeout=15)
    finally:
        proc.stop(signal.SIGKILL)


# ------------------------------------------------------------------ magics


def test_magics_register_load_infer_status_unload(lemon: Proc, ip: Any,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    unload_remote(lemon)
    ip.run_line_magic("lemon_register", f"big --remote {lemon.url} --remote-model tiny")
    assert f"registered big → {lemon.url} (lemonade: tiny)" in capsys.readouterr().out
    models = repr(ip.run_line_magic("lemon_models", ""))
    assert "big" in models and "remote" in models and f"{lemon.url} (lemonade: tiny)" in models
    ip.run_line_magic("lemon_load", "big --ctx-size 256")
    out = capsys.readouterr().out
    assert f"loaded big on {lemon.url} in " in out and "lemonade remote" in out
    ip.run_line_magic("lemon_load", "big --ctx-size 256")
    assert f"already loaded with these options on {lemon.url} (no-op" in capsys.readouterr().out
    ip.run_cell_magic("lemon_infer", "-m big --max-tokens 3 --no-stream", "once")
    assert capsys.readouterr().out.strip()
    table = repr(ip.run_line_magic("lemon_status", ""))
    assert "lemonade remote" in table and f"ready ({lemon.url}" in table
    ip.run_line_magic("lemon_unload", "big")
    assert f"unloaded big on {lemon.url} (pid " in capsys.readouterr().out
    ip.run_line_magic("lemon_load", "big")
    capsys.readouterr()
    ip.run_line_magic("lemon_unregister", "big")
    assert f"unregistered big (it stays loaded on {lemon.url}" in capsys.readouterr().out
    assert health(lemon).loaded


@pytest.mark.parametrize(("line", "message"), [
    ("x", "give the .gguf file's path, or --remote URL --remote-model NAME"),
    ("x /a.gguf --remote http://h:1 --remote-model m", "give a path or --remote, not both"),
    ("x --remote http://h:1", "a remote model needs --remote-model"),
    ("x --remote ftp://h:1 --remote-model m", "must start with http:// or https://"),
    ("x --remote http://h:1 --remote-model m --api grpc", "api must be one of lemonade, openai"),
    ("x --remote http://h:1 --remote-model m --api-key-env 'A B'", "name of an environment variable"),
])
def test_bad_remote_registrations_are_one_line_and_change_nothing(
        ip: Any, line: str, message: str) -> None:
    before = Registry().user_names()
    result = ip.run_cell(f"%lemon_register {line}")
    err = result.error_in_exec or result.error_before_exec
    text = str(getattr(err, "message", err))
    assert message in text and "\n" not in text.strip()
    assert Registry().user_names() == before


# ------------------------------------------------------------------ the panel


def test_panel_row_and_warning_for_a_remote_model(lemon: Proc, rr: Router) -> None:
    from lemon_magic.widgets import LemonPanel, chip

    unload_remote(lemon)
    rr.register_remote("big", lemon.url, "tiny")
    rr.load("big", ctx_size=256)
    panel = LemonPanel(rr)
    try:
        panel.wait_until(lambda p: "big" in p._rows and chip(p._rows["big"].status) == "ready")
        summary = panel._rows["big"].summary.value
        assert f"on {lemon.url}, pid {health(lemon).pid}" in summary
        assert "lemonade remote" in summary and "ctx 256" in summary and "MiB" not in summary
        if "big" not in panel.model.options:
            panel.model.options = [*panel.model.options, "big"]
        panel.model.value = "big"
        panel.wait_idle()
        assert panel.ctx_size.value == "256"  # prefilled with what the remote reports
        assert "no change (no-op)" in panel.banner.value
        panel.ctx_size.value = "512"
        panel.wait_idle()
        assert "will reload big: ctx_size 256 → 512" in panel.banner.value
        panel.apply.click()
        panel.wait_until(lambda p: not p._busy and p.last_result is not None)
        assert panel.last_result.action == "reloaded" and health(lemon).ctx_size == 512
    finally:
        panel.close()
