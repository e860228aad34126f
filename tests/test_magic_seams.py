"""Magic-level defects of issue 8: truthful Stops during auto-load, completers, --max-tokens."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from lemon_magic import ModelState, Router, get_router
from lemon_magic.magics import Interrupted
from tests.conftest import EventLog
from tests.fakes import FakeBackend

pytestmark = pytest.mark.real


def run(ip: InteractiveShell, code: str) -> object:
    result = ip.run_cell(code)
    return result.error_in_exec or result.error_before_exec


@pytest.fixture
def router(ip: InteractiveShell) -> Router:
    return get_router()


def _stop_when_loading(events: EventLog) -> None:
    main = threading.get_ident()

    def press() -> None:
        events.wait_for(lambda e: e.new is ModelState.LOADING)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=press, daemon=True).start()


@pytest.mark.parametrize("flags", ["", "--no-stream"])
def test_stop_during_an_inference_auto_load_says_the_load_goes_on(
        ip: InteractiveShell, router: Router, tiny_model: str, tmp_path: Path, events: EventLog,
        capsys: pytest.CaptureFixture[str], flags: str) -> None:
    gate = tmp_path / "gate"
    router.async_router.backends["fake"] = FakeBackend(gate=gate)
    ip.run_line_magic("config", "LemonMagics.backend = 'fake'")
    router.subscribe(events)
    _stop_when_loading(events)
    err = run(ip, f"%%lemon_infer -m {tiny_model} {flags}\nhello")
    assert isinstance(err, Interrupted)
    [line] = err._render_traceback_()
    assert line == (f"interrupted: stopped waiting for {tiny_model} to load; the load goes on in "
                    f"the background (%lemon_unload {tiny_model} stops it)")
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    [status] = router.status()
    assert status.state is ModelState.LOADING and status.requests_in_flight == 0
    gate.touch()
    assert run(ip, f"%%lemon_infer -m {tiny_model} {flags}\nhello") is None
    assert "fake text from the stand-in" in capsys.readouterr().out
    assert router.spawn_count == 1 and router.status()[0].requests_in_flight == 0


def test_max_tokens_zero_is_refused(ip: InteractiveShell, router: Router, tiny_model: str) -> None:
    err = run(ip, f"%%lemon_infer -m {tiny_model} --max-tokens 0\nhello")
    assert isinstance(err, UsageError) and "--max-tokens must be a positive number" in str(err)
    assert router.status() == []


def _completers(ip: InteractiveShell, key: str) -> int:
    chain = ip.strdispatchers["complete_command"].strs.get(key)
    return sum(1 for _, f in (chain.chain if chain else [])
               if getattr(getattr(f, "__func__", f), "__module__", "").startswith("lemon_magic"))


def test_completers_do_not_pile_up_or_outlive_the_extension(ip: InteractiveShell) -> None:
    assert _completers(ip, "%lemon_load") == 1
    ip.run_line_magic("reload_ext", "lemon_magic")
    ip.run_line_magic("reload_ext", "lemon_magic")
    assert _completers(ip, "%lemon_load") == 1 and _completers(ip, "%%lemon_infer") == 1
    ip.run_line_magic("unload_ext", "lemon_magic")
    assert _completers(ip, "%lemon_load") == 0 and _completers(ip, "%lemon_unload") == 0
    ip.run_line_magic("load_ext", "lemon_magic")
    assert _completers(ip, "%lemon_load") == 1
