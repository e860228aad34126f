"""The process supervisor on its own: PDEATHSIG, the log ring's bounds, the registry, stop()."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from lemon_magic.backends import _process
from lemon_magic.backends._process import MAX_LOG_LINE, BackendProcess, kill_owned
from lemon_magic.errors import BackendExited, BackendStartError
from tests.conftest import alive

SLEEPER = [sys.executable, "-c", "import time; time.sleep(1000)"]


def _record(pid: int) -> Path:
    """Where the pid record of ``pid`` is (other tests may leave records of dead owners)."""
    return Path(os.environ["LEMON_MAGIC_STATE_DIR"]) / "backends" / f"{pid}.json"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def spawned() -> Iterator[list[BackendProcess]]:
    """Processes a test spawned; whatever is left of them is killed and forgotten at the end."""
    made: list[BackendProcess] = []
    yield made
    for p in made:
        p.kill_now()


def _spawn(made: list[BackendProcess], argv: list[str], **kwargs: Any) -> BackendProcess:
    p = BackendProcess.spawn("test", argv, 0, **kwargs)
    made.append(p)
    return p


# --------------------------------------------------------------------------- PDEATHSIG


def test_spawn_runs_no_python_in_the_child(monkeypatch: pytest.MonkeyPatch,
                                           spawned: list[BackendProcess]) -> None:
    """PDEATHSIG through setpriv: no preexec_fn, so no Python between fork and exec (issue 8, 11)."""
    if _process._find_setpriv() is None:
        pytest.skip("util-linux's setpriv with --pdeathsig is not installed")
    seen: list[tuple[list[str], dict[str, Any]]] = []
    real = subprocess.Popen

    def spy(args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        seen.append((args, kwargs))
        return real(args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    p = _spawn(spawned, ["sleep", "1000"])
    [(args, kwargs)] = seen
    assert kwargs["preexec_fn"] is None and kwargs["start_new_session"] is True
    assert args[1:4] == ["--pdeathsig", "KILL", "--"] and Path(args[4]).name == "sleep"
    assert os.getsid(p.pid) == p.pid
    deadline = time.monotonic() + 5
    while Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[0] != args[4].encode():
        assert time.monotonic() < deadline, "setpriv did not exec the backend"
        time.sleep(0.005)
    assert p.argv == ("sleep", "1000")  # the record and the logs show the backend's own argv


SPAWNER = textwrap.dedent("""
    import sys, time
    import lemon_magic.backends._process as proc
    via = sys.argv[1]
    if via == "preexec_fn":
        proc._find_setpriv = lambda: None  # a machine without setpriv
    elif via == "none":
        proc._libc = None  # a platform without PR_SET_PDEATHSIG
    assert proc._pdeathsig_via() == via
    p = proc.BackendProcess.spawn("child", sys.argv[2:], 0)
    print(p.pid, flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("via", ["setpriv", "preexec_fn", "none"])
def test_sigkill_of_the_spawning_process_kills_the_backend(via: str) -> None:
    """The spawner is killed outright; its backend (a grandchild of ours) must die with it.

    ``none`` is the control: without PDEATHSIG the backend outlives its spawner.
    """
    if via == "setpriv" and _process._find_setpriv() is None:
        pytest.skip("util-linux's setpriv with --pdeathsig is not installed")
    spawner = subprocess.Popen([sys.executable, "-c", SPAWNER, via, *SLEEPER], stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    assert spawner.stdout is not None
    backend = int(spawner.stdout.readline())
    try:
        assert alive(backend)
        spawner.kill()
        spawner.wait(10)
        if via == "none":
            time.sleep(0.5)
            assert alive(backend), "the control: without PDEATHSIG the backend survives"
        else:
            assert _gone_within(backend, 2.0), f"the backend outlived its spawner (via {via})"
    finally:
        if alive(backend):
            os.killpg(backend, signal.SIGKILL)
        _record(backend).unlink(missing_ok=True)


def test_a_program_that_cannot_run_is_a_start_error(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    not_executable = tmp_path / "backend"
    not_executable.write_text("#!/bin/sh\n")
    cases = [([str(tmp_path / "missing")], "No such file"), (["no-such-backend-x"], "No such file"),
             ([str(not_executable)], "Permission denied"), ([str(tmp_path)], "Permission denied")]
    recorded: list[int] = []
    monkeypatch.setattr(_process._pidfile, "record", lambda pid, argv: recorded.append(pid))
    for argv, reason in cases:
        with pytest.raises(BackendStartError, match=reason):
            BackendProcess.spawn("test", argv, 0)
    assert recorded == []


# --------------------------------------------------------------------------- the log ring


def test_a_log_line_without_a_newline_is_bounded(spawned: list[BackendProcess]) -> None:
    """32 MB printed without a newline, then two lines: the ring holds three short lines."""
    code = ("import sys; w = sys.stdout.buffer.write\n"
            "for _ in range(32): w(b'x' * 1_000_000)\n"
            "w(b'\\nafter\\n'); w('é'.encode() * 4000); w(b'\\n'); w(b'last without newline')")
    p = _spawn(spawned, [sys.executable, "-c", code])
    assert anyio.run(p.wait_exit) == 0
    lines = p.log_tail(10)
    assert [len(line) for line in lines] == [MAX_LOG_LINE + len(" [... line truncated at 8192 bytes]"),
                                             5, 4000, 20]
    assert lines[0].startswith("xxxx") and lines[0].endswith(" [... line truncated at 8192 bytes]")
    assert lines[1:] == ["after", "é" * 4000, "last without newline"]
    assert p._log.total == 4


def test_the_log_ring_keeps_the_last_lines_only(spawned: list[BackendProcess]) -> None:
    code = "import sys\nfor i in range(5000): print('y' * 20000, i)"
    p = _spawn(spawned, [sys.executable, "-c", code], log_lines=50)
    assert anyio.run(p.wait_exit) == 0
    lines = p.log_tail(100)
    assert len(lines) == 50 and lines[-1].endswith(" [... line truncated at 8192 bytes]")
    assert sum(map(len, lines)) < 50 * (MAX_LOG_LINE + 64)


# --------------------------------------------------------------------------- registry, kill_owned


def _group_with_a_child() -> list[str]:
    """A backend-like process that starts a child of its own (in its group) and prints its pid."""
    code = ("import subprocess, sys, time\n"
            "c = subprocess.Popen(['sleep', '1000'])\n"
            "print(c.pid, flush=True)\n"
            "time.sleep(1000)")
    return [sys.executable, "-c", code]


def _first_line(p: BackendProcess) -> str:
    deadline = time.monotonic() + 10
    while not p.log_tail(1):
        assert time.monotonic() < deadline, "no output"
        time.sleep(0.01)
    return p.log_tail(1)[0]


def test_kill_owned_kills_the_groups_of_one_owner_from_any_thread(spawned: list[BackendProcess]) -> None:
    a1, a2 = (_spawn(spawned, _group_with_a_child(), owner=1) for _ in range(2))
    b = _spawn(spawned, SLEEPER, owner=2)
    children = [int(_first_line(p)) for p in (a1, a2)]
    result: list[int] = []
    t = threading.Thread(target=lambda: result.extend(kill_owned(1)))  # a thread with no event loop
    t.start()
    t.join(10)
    assert sorted(result) == sorted([a1.pid, a2.pid])
    assert a1.returncode == -signal.SIGKILL and a2.returncode == -signal.SIGKILL
    assert all(_gone_within(c, 2.0) for c in children), "the backends' own children survived"
    assert not _record(a1.pid).exists() and not _record(a2.pid).exists()
    assert alive(b.pid) and _record(b.pid).exists()
    assert kill_owned(1) == []
    assert anyio.run(a1.stop) == -signal.SIGKILL  # a stop after kill_owned is harmless
    anyio.run(b.stop, 1.0)
    assert kill_owned(2) == [] and not _record(b.pid).exists()


def test_kill_now_forgets_the_process(spawned: list[BackendProcess]) -> None:
    p = _spawn(spawned, SLEEPER, owner=3)
    assert _record(p.pid).exists()
    p.kill_now()
    assert p.returncode == -signal.SIGKILL and kill_owned(3) == [] and not _record(p.pid).exists()


# --------------------------------------------------------------------------- stop()


def test_stop_of_a_backend_that_exited_during_start_leaves_nothing(tmp_path: Path,
                                                                   spawned: list[BackendProcess]) -> None:
    """Its client is closed, the children it left in its group are killed, its record goes."""
    script = tmp_path / "backend.sh"
    script.write_text(f"#!/bin/sh\nsleep 1000 &\necho $! > {tmp_path / 'child'}\necho bad option\nexit 3\n")
    script.chmod(0o755)
    p = _spawn(spawned, [str(script)], owner=4)
    assert _record(p.pid).exists()

    async def start_then_stop() -> None:
        with pytest.raises(BackendExited, match=r"exited during start \(exit code 3\)|code 3"):
            await p.wait_healthy("/health", 10)
        assert await p.stop(grace=1.0) == 3

    anyio.run(start_then_stop)
    child = int((tmp_path / "child").read_text())
    assert not alive(child), "stop() returned while the backend's child still ran"
    assert p.client.is_closed
    assert not _record(p.pid).exists() and kill_owned(4) == []
    assert "bad option" in p.log_tail()
