"""Backends never outlive their owner; Stop (SIGINT) neither kills them nor wedges the router."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lemon_magic import ModelState, NotEnoughMemory, Router, RouterConfig
from lemon_magic.router import AsyncRouter
from tests.conftest import EventLog, alive
from tests.fakes import FakeBackend

pytestmark = pytest.mark.real

CHILD = textwrap.dedent("""
    import json, os, signal, sys, time
    import lemon_magic.backends._process as proc
    if "--no-pdeathsig" in sys.argv:
        proc._libc = None  # a platform without PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from lemon_magic import Router
    r = Router()
    res = r.load(sys.argv[1], ctx_size=256, backend="llama-server")
    print(json.dumps({"pid": res.pid}), flush=True)
    if "--exit" in sys.argv:
        os._exit(0)
    time.sleep(600)
""")


def _start_child(model: str, *flags: str) -> tuple[subprocess.Popen[str], int]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, model, *flags], stdout=subprocess.PIPE,
                             text=True, start_new_session=True, env=os.environ.copy())
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, "the child process did not load the model"
    return child, json.loads(line)["pid"]


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_os_exit_of_the_owner_kills_the_backend(tiny_model: str) -> None:
    child, pid = _start_child(tiny_model, "--exit")
    child.wait(10)
    assert _gone_within(pid, 2.0)


def test_sigkill_of_the_owner_kills_the_backend(tiny_model: str) -> None:
    child, pid = _start_child(tiny_model)
    child.kill()
    child.wait(10)
    assert _gone_within(pid, 2.0)


def test_sigint_to_the_owners_process_group_spares_the_backend(tiny_model: str) -> None:
    child, pid = _start_child(tiny_model)
    try:
        os.killpg(child.pid, signal.SIGINT)  # what the notebook's Stop button does to a kernel
        time.sleep(0.5)
        assert alive(pid)
    finally:
        child.kill()
        child.wait(10)
    assert _gone_within(pid, 2.0)


def test_a_new_router_reaps_backends_of_a_dead_owner(tiny_model: str,
                                                      make_router: Callable[..., Router]) -> None:
    child, pid = _start_child(tiny_model, "--no-pdeathsig", "--exit")
    child.wait(10)
    time.sleep(0.5)
    try:
        assert alive(pid), "without PDEATHSIG the backend outlives its owner"
        make_router()  # starting a router reaps the orphans recorded by dead owners
        assert _gone_within(pid, 2.0)
    finally:
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)
    assert not list((Path(os.environ["LEMON_MAGIC_STATE_DIR"]) / "backends").glob(f"{pid}.json"))


def test_memory_admission_refuses_and_changes_nothing(make_router: Callable[..., Router],
                                                      tiny_model: str, tiny_model_b: str) -> None:
    router = make_router(RouterConfig(max_loaded={"llm": 3}, memory_limit=32 * 2**20))
    with pytest.raises(NotEnoughMemory, match=r"needs about .* but only"):
        router.load(tiny_model, ctx_size=256)
    assert router.status() == [] and router.spawn_count == 0


def test_memory_admission_evicts_the_least_recently_used(make_router: Callable[..., Router],
                                                         tiny_model: str, tiny_model_b: str,
                                                         tiny_model_c: str) -> None:
    probe = make_router(RouterConfig(max_loaded={"llm": 3}))
    probed = probe.load(tiny_model, ctx_size=256)
    probe.load(tiny_model_b, ctx_size=256)
    rss = {s.name: s.rss or 0 for s in probe.status()}
    spec_c = probe.async_router.registry.resolve(tiny_model_c)
    need_c = AsyncRouter.memory_needed(spec_c, probed.options)
    probe.close()

    # room for two backends and c's estimate, less half of b: c fits only if b goes
    limit = rss[tiny_model] + rss[tiny_model_b] + need_c - rss[tiny_model_b] // 2
    router = make_router(RouterConfig(max_loaded={"llm": 3}, memory_limit=limit))
    a = router.load(tiny_model, ctx_size=256)
    b = router.load(tiny_model_b, ctx_size=256)
    assert alive(a.pid) and alive(b.pid) and a.pid != b.pid  # both run now, in this router
    router.complete(tiny_model, "the", max_tokens=1)  # b becomes the least recently used
    c = router.load(tiny_model_c, ctx_size=256)
    status = {s.name: (s.state, s.pid) for s in router.status()}
    assert status[tiny_model_b] == (ModelState.UNLOADED, None)
    assert not alive(b.pid), "the evicted model's process must be gone, not just marked"
    # a was kept, as the same process (not restarted); c runs as a new one
    assert status[tiny_model] == (ModelState.READY, a.pid) and alive(a.pid)
    assert status[tiny_model_c] == (ModelState.READY, c.pid) and alive(c.pid)
    assert c.pid not in (a.pid, b.pid)


def test_interrupted_load_stops_waiting_and_the_load_goes_on(make_router: Callable[..., Router],
                                                             tiny_model: str, tmp_path: Path,
                                                             events: EventLog) -> None:
    gate = tmp_path / "gate"
    router = make_router(backends={"fake": FakeBackend(gate=gate)})
    router.subscribe(events)
    main = threading.get_ident()

    def press_stop() -> None:
        events.wait_for(lambda e: e.new is ModelState.LOADING)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=press_stop).start()
    began = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        router.load(tiny_model, backend="fake")
    assert time.monotonic() - began < 10
    # the lock is free and the load is still in flight: status answers, a new call joins it
    assert [s.state for s in router.status()] == [ModelState.LOADING]
    gate.touch()
    again = router.load(tiny_model, backend="fake")
    assert again.joined and again.action == "loaded" and router.spawn_count == 1
