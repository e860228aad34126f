"""Request lifetimes at the seams: leases, deadlines, closes from other threads, purposeful stops
(each test reproduced a defect an independent review found in the first version of issue 8)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lemon_magic import BackendCrashed, LemonError, Router, RouterConfig
from lemon_magic.options import ResolvedOptions
from tests.conftest import alive
from tests.fakes import FakeBackend

pytestmark = pytest.mark.real

CFG = dict(start_timeout=30, drain_timeout=0.5, stop_grace=1)

# A stand-in backend whose streamed answer waits HEADER_DELAY s before its headers (a slow
# prefill, or a remote server) and logs on every piece whether the client is still there.
SLOW_SERVER = r'''
import argparse, json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
p = argparse.ArgumentParser(); p.add_argument("--port", type=int); p.add_argument("--log")
args, _ = p.parse_known_args()
print("slow backend", os.getpid(), flush=True)
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"{}")
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        time.sleep(float(os.environ.get("HEADER_DELAY", "0")))
        try:
            self.send_response(200); self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i in range(40):
                chunk = {"choices": [{"text": f"t{i} ", "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode()); self.wfile.flush()
                with open(args.log, "a") as f: f.write(f"sent {i}\n")
                time.sleep(0.1)
            self.wfile.write(b"data: [DONE]\n\n")
            with open(args.log, "a") as f: f.write("done\n")
        except (BrokenPipeError, ConnectionResetError):
            with open(args.log, "a") as f: f.write("gone\n")
ThreadingHTTPServer(("127.0.0.1", args.port), H).serve_forever()
'''


class SlowBackend(FakeBackend):
    name = "slow"

    def __init__(self, script: Path, log: Path) -> None:
        super().__init__()
        self.script, self.log = script, log

    def command(self) -> list[str]:
        return [sys.executable, str(self.script)]

    def argv(self, model_path: Path, options: ResolvedOptions, port: int) -> list[str]:
        return [*self.command(), "--port", str(port), "--log", str(self.log)]


def _busy(router: Router, name: str) -> int:
    return next((s.requests_in_flight for s in router.status() if s.name == name), -1)


def _wait(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# --------------------------------------------------------------------------- leases by name


def test_unregister_during_a_stream_gives_a_lemon_error(make_router: Callable[..., Router],
                                                        tiny_model: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream in flight when its model is unregistered must end with a LemonError.

    ``end_lease`` looks the slot up by name (``router._models[lease.load.model]``), but
    ``unregister`` deletes that row: the stream's next read (or its close()) raises KeyError.
    """
    monkeypatch.setenv("FAKE_TOKEN_DELAY", "0.5")
    router = make_router(RouterConfig(**CFG), backends={"fake": FakeBackend()})
    router.register("review-unreg", tiny_model)
    router.load("review-unreg")
    stream = router.complete("review-unreg", "hi", stream=True)
    assert next(stream) == "fake"
    router.unregister("review-unreg")  # drains 0.5 s, stops the backend, forgets the row
    with pytest.raises(LemonError):
        for _ in stream:
            pass


def test_a_stale_lease_does_not_release_a_new_slots_request(make_router: Callable[..., Router],
                                                            tiny_model: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Ending a lease admitted on an old slot must not decrement another request's count.

    The lease names its model, not its slot: after unregister + register + load under the same
    name, closing the old stream releases the *new* slot, which then reports busy 0 (idle timer,
    drain and eviction all believe nothing is in flight) while a request runs.
    """
    monkeypatch.setenv("FAKE_TOKEN_DELAY", "1.0")
    router = make_router(RouterConfig(**CFG), backends={"fake": FakeBackend()})
    router.register("review-stale", tiny_model)
    router.load("review-stale")
    old = router.complete("review-stale", "hi", stream=True)
    assert next(old)  # admitted on the first slot
    router.unregister("review-stale")
    router.register("review-stale", tiny_model)
    router.load("review-stale")
    new = router.complete("review-stale", "hi", stream=True)
    assert next(new)  # admitted on the new slot; still streaming
    assert _busy(router, "review-stale") == 1
    old.close()
    try:
        assert _busy(router, "review-stale") == 1, "the old lease released the new request"
    finally:
        new.close()


# --------------------------------------------------------------------------- request deadline


def test_request_timeout_is_a_total_deadline(make_router: Callable[..., Router], tiny_model: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``request_timeout`` bounds a non-streamed request (RouterConfig: "total deadline").

    ``anyio.fail_after`` raises the builtin TimeoutError, an OSError; ``_may_mean_exit``
    treats it as a broken connection and ``failure()`` waits 1 s more for a backend exit.
    """
    monkeypatch.setenv("FAKE_BODY_TRICKLE", "0.5")  # the answer takes ~4 s
    router = make_router(RouterConfig(**CFG), backends={"fake": FakeBackend()})
    router.load(tiny_model)
    router.configure(request_timeout=0.5)
    began = time.monotonic()
    with pytest.raises(LemonError, match="request_timeout"):
        router.complete(tiny_model, "hi")
    elapsed = time.monotonic() - began
    assert elapsed < 1.0, f"a 0.5 s deadline took {elapsed:.2f} s"


# --------------------------------------------------------------------------- Stream.close


def _slow(tmp_path: Path) -> tuple[SlowBackend, Path]:
    script = tmp_path / "slow_server.py"
    script.write_text(SLOW_SERVER)
    log = tmp_path / "slow.log"
    log.write_text("")
    return SlowBackend(script, log), log


def test_held_close_while_the_stream_opens_ends_the_request(make_router: Callable[..., Router],
                                                       tiny_model: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``close()`` from another thread while ``next()`` waits for the response headers.

    ``close`` empties ``_exit`` (still empty: ``enter_context`` has not returned) and sets it to
    None; the response then lands in the detached ExitStack and is never closed: the backend
    keeps generating for nobody (its lease already ended) until the Stream is collected.
    """
    monkeypatch.setenv("HEADER_DELAY", "1.0")
    backend, log = _slow(tmp_path)
    router = make_router(RouterConfig(**CFG), backends={"slow": backend})
    router.load(tiny_model)
    stream = router.complete(tiny_model, "hi", stream=True)
    got: list[object] = []
    opener = threading.Thread(target=lambda: got.append(next(stream, "<end>")))
    opener.start()
    _wait(lambda: _busy(router, tiny_model) == 1)  # admitted; now waiting for headers
    time.sleep(0.3)
    stream.close()
    opener.join(10)
    assert got == ["<end>"]
    time.sleep(2.0)  # a closed connection makes the server's writes fail within ~0.3 s
    lines = log.read_text().split()
    assert "gone" in lines, f"the backend still streams to a closed Stream: {lines[-3:]}"


def test_close_from_another_thread_ends_a_blocked_read_at_once(
        make_router: Callable[..., Router], tiny_model: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Stream's docstring: "close() (from any thread ...) ends the request at once".

    A reader blocked in ``next()`` is not woken: close() only marks the stream; the read
    returns when the backend sends its next piece (up to ``stream_idle_timeout`` later), and
    it returns that piece, after close() has returned.
    """
    monkeypatch.setenv("FAKE_TOKEN_DELAY", "3.0")
    router = make_router(RouterConfig(**CFG), backends={"fake": FakeBackend()})
    router.load(tiny_model)
    stream = router.complete(tiny_model, "hi", stream=True)
    assert next(stream) == "fake"
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(next(stream, "<end>")))
    reader.start()
    time.sleep(0.3)  # the reader is blocked in the socket read
    began = time.monotonic()
    stream.close()
    reader.join(10)
    waited = time.monotonic() - began
    assert waited < 1.0 and got == ["<end>"], f"reader got {got} {waited:.1f} s after close()"


# --------------------------------------------------------------------------- error mapping


def test_a_request_cut_by_an_unload_is_not_reported_as_a_crash(
        make_router: Callable[..., Router], tiny_model: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A request still running when an unload's drain_timeout runs out is ended by the router;
    translate() sees an exit code and reports BackendCrashed ("exited while serving the request
    (killed by SIGTERM)"), which says the backend crashed when the user (or an eviction) stopped
    it; the model's state is never CRASHED."""
    monkeypatch.setenv("FAKE_BODY_TRICKLE", "0.5")  # the answer takes ~4 s
    router = make_router(RouterConfig(**CFG), backends={"fake": FakeBackend()})
    router.load(tiny_model)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            router.complete(tiny_model, "hi")
        except BaseException as exc:
            outcome["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    _wait(lambda: _busy(router, tiny_model) == 1)
    router.unload(tiny_model)
    t.join(15)
    error = outcome["error"]
    assert isinstance(error, LemonError)
    assert not isinstance(error, BackendCrashed), f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------- checks that held up

PORT_CLASH = r'''
import sys
print("error: couldn't bind HTTP server socket: address already in use", flush=True)
sys.exit(1)
'''


class ClashBackend(FakeBackend):
    name = "clash"

    def __init__(self, script: Path) -> None:
        super().__init__()
        self.script = script

    def command(self) -> list[str]:
        return [sys.executable, str(self.script)]


def _records() -> set[str]:
    d = Path(os.environ["LEMON_MAGIC_STATE_DIR"]) / "backends"
    return {p.name for p in d.glob("*.json")} if d.is_dir() else set()


def test_held_failed_starts_leave_no_record(make_router: Callable[..., Router], tiny_model: str,
                                            tmp_path: Path) -> None:
    script = tmp_path / "clash.py"
    script.write_text(PORT_CLASH)
    before = _records()
    router = make_router(RouterConfig(**CFG, port_retries=2), backends={"clash": ClashBackend(script)})
    for _ in range(3):
        with pytest.raises(LemonError, match="exited"):
            router.load(tiny_model)
    assert router.spawn_count == 9  # 3 loads x (1 + 2 retries)
    assert _records() - before == set()
    (row,) = router.status()
    assert row.state == "failed" and row.pid is None and row.options is None and row.url is None
    router2 = make_router(RouterConfig(**CFG), backends={"fake": FakeBackend(exit_at_start=3)})
    for _ in range(3):
        with pytest.raises(LemonError):
            router2.load(tiny_model)
    assert _records() - before == set()


def test_held_external_edit_of_models_json_is_seen(make_router: Callable[..., Router],
                                                   tiny_model: str, tiny_model_b: str) -> None:
    from lemon_magic import ModelNotFound
    router = make_router(RouterConfig(**CFG), backends={"fake": FakeBackend()})
    router.register("review-ext", tiny_model, ctx_size=256)
    first = router.load("review-ext")
    assert router.load("review-ext").action == "noop"  # the fast path, spec cached
    path = Path(os.environ["LEMON_MAGIC_CONFIG_DIR"]) / "models.json"
    data = json.loads(path.read_text())
    data["review-ext"]["path"] = tiny_model_b  # another process re-registers the name
    path.write_text(json.dumps(data))
    assert router.plan("review-ext").action == "reload"
    auto = router.complete("review-ext", "hi", max_tokens=2)
    assert auto.load.action == "noop" and auto.load.pid == first.pid  # used as it is
    again = router.load("review-ext")
    assert again.action == "reloaded" and again.options.model_path == str(Path(tiny_model_b))
    del data["review-ext"]
    path.write_text(json.dumps(data))  # ... and then removes it
    with pytest.raises(ModelNotFound):
        router.load("review-ext")


def test_held_reload_restarts_the_idle_timer(make_router: Callable[..., Router], tiny_model: str) -> None:
    router = make_router(RouterConfig(**CFG, idle_timeout=1.5), backends={"fake": FakeBackend()})
    router.load(tiny_model, ctx_size=256)
    time.sleep(1.0)
    new = router.load(tiny_model, ctx_size=512)
    assert new.action == "reloaded"
    time.sleep(1.0)  # the first process's deadline has passed; the new one's has not
    assert [s.state for s in router.status()] == ["ready"] and alive(new.pid)
    _wait(lambda: [s.state for s in router.status()] == ["unloaded"], timeout=5)


def test_held_stop_during_stream_admission_releases(make_router: Callable[..., Router],
                                                    tiny_model: str, tmp_path: Path) -> None:
    from lemon_magic import Interrupted
    gate = tmp_path / "gate"
    router = make_router(RouterConfig(**CFG), backends={"fake": FakeBackend(gate=gate)})
    stream = router.complete(tiny_model, "hi", stream=True)
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    with pytest.raises(Interrupted) as info:
        next(stream)
    assert info.value.phase == "load"
    gate.touch()
    try:
        _wait(lambda: [s.state for s in router.status()] == ["ready"])
    except AssertionError:
        raise AssertionError(f"after Stop during the stream's auto-load: {router.status()}") from None
    time.sleep(0.2)
    assert _busy(router, tiny_model) == 0
    assert router.unload(tiny_model).seconds < 0.4  # nothing to drain


def test_held_an_abandoned_stream_releases_its_model(make_router: Callable[..., Router],
                                                     tiny_model: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TOKEN_DELAY", "0.5")
    router = make_router(RouterConfig(**CFG), backends={"fake": FakeBackend()})
    router.load(tiny_model)
    unstarted = router.complete(tiny_model, "hi", stream=True)  # as Out[n]: holds nothing
    assert _busy(router, tiny_model) == 0 and "not started" in repr(unstarted)
    started = router.complete(tiny_model, "hi", stream=True)
    assert next(started) == "fake" and _busy(router, tiny_model) == 1
    del started  # dropped half-read: __del__ ends its lease
    assert _busy(router, tiny_model) == 0
    exhausted = router.complete(tiny_model, "hi", stream=True)
    assert exhausted.text == "fake text from the stand-in"
    exhausted.close()
    exhausted.close()  # idempotent after exhaustion: released once only
    assert _busy(router, tiny_model) == 0
    assert router.unload(tiny_model).seconds < 0.4
