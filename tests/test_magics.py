"""The magics, driven through a real IPython shell, on real backends."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

from lemon_magic import LemonError, ModelState, Router, get_router
from lemon_magic.magics import InferenceText, Interrupted, LemonMagics
from tests.conftest import EventLog, alive
from tests.fakes import FakeBackend

pytestmark = pytest.mark.real


@pytest.fixture
def router(ip: InteractiveShell) -> Router:
    return get_router()


def run(ip: InteractiveShell, code: str) -> object:
    result = ip.run_cell(code)
    return result.error_in_exec or result.error_before_exec


def test_load_noop_reload_messages(ip: InteractiveShell, router: Router, tiny_model: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert run(ip, f"%lemon_load {tiny_model} --ctx-size 256") is None
    first = capsys.readouterr().out
    [status] = router.status()
    assert first.startswith(f"loaded {tiny_model} in ") and f"pid {status.pid}, ctx 256" in first
    run(ip, f"%lemon_load {tiny_model} --ctx-size 256")
    assert capsys.readouterr().out.startswith("already loaded with these options (no-op, ")
    run(ip, f"%lemon_load {tiny_model} --ctx-size 512")
    warning, done = capsys.readouterr().out.splitlines()
    assert warning.startswith(f"will reload {tiny_model}: ctx_size 256 → 512 — about ")
    assert done.startswith(f"reloaded {tiny_model}: ctx_size 256 → 512 (")
    [after] = router.status()
    assert after.pid != status.pid and after.options is not None and after.options.ctx_size == 512


def test_infer_streams_in_order_and_stores_the_text(ip: InteractiveShell, router: Router,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "%lemon_load gemma3-270m --ctx-size 1024")
    capsys.readouterr()
    assert run(ip, "%%lemon_infer --max-tokens 16 --temperature 0 --seed 1 -o story\n"
                   "Once upon a time") is None
    streamed = capsys.readouterr().out
    story = ip.user_ns["story"]
    assert isinstance(story, InferenceText) and story.completion is not None
    assert streamed == story + "\n" and len(story) > 10
    plain = router.complete("gemma3-270m", "Once upon a time", max_tokens=16, temperature=0, seed=1)
    assert plain.text == story
    run(ip, "%%lemon_infer --max-tokens 16 --temperature 0 --seed 1 --no-stream\nOnce upon a time")
    assert capsys.readouterr().out == streamed


def test_infer_auto_loads_and_never_reloads(ip: InteractiveShell, router: Router, tiny_model: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, f"%%lemon_infer -m {tiny_model} --max-tokens 2\nthe")
    out = capsys.readouterr().out
    assert out.startswith(f"auto-loaded {tiny_model} in ")
    pid = router.status()[0].pid
    run(ip, "%config LemonMagics.ctx_size = 512")
    assert capsys.readouterr().out.startswith(f"note: the next %lemon_load {tiny_model} will reload it")
    run(ip, f"%%lemon_infer -m {tiny_model} --max-tokens 2\nthe")
    out = capsys.readouterr().out
    assert out.startswith(f"note: {tiny_model} is loaded with ctx_size 4096 (asked 512); using it as it is")
    assert router.status()[0].pid == pid and router.spawn_count == 1


def test_chat_with_system_message(ip: InteractiveShell, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The chat sees the cell and the system message (issue 17: every chat of the embedded
    model was rendered as the word "gemma", 3 prompt tokens, whatever the cell said)."""
    router = get_router()
    seen: list[Any] = []
    real = router.chat
    monkeypatch.setattr(router, "chat", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    answers = []
    for cell in ("What is the capital of France?", "Write the word banana three times, separated by commas."):
        assert run(ip, f"%%lemon_infer --chat --max-tokens 8 --temperature 0 -o answer\n{cell}") is None
        answers.append(ip.user_ns["answer"])
    assert run(ip, "%%lemon_infer --chat --system 'You are a pirate.' --max-tokens 8 "
                   "--temperature 0 -o answer\nWhat is the capital of France?") is None
    assert capsys.readouterr().out.strip() and answers[0] != answers[1]
    # the magic streams: llama-server's last event times the prompt (cached + evaluated tokens)
    tokens = [s.completion.response["timings"]["prompt_n"] + s.completion.response["timings"]["cache_n"]
              for s in seen]
    assert tokens[0] == 16 and tokens[1] > tokens[0] and tokens[2] > tokens[0]  # was 3, 3, 3


def test_interpolation_is_opt_in_and_leaves_other_braces(ip: InteractiveShell, router: Router,
                                                         tiny_model: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    ip.user_ns["topic"] = "dragons"
    seen: list[str] = []
    real = router.complete
    monkeypatch.setattr(router, "complete", lambda model, prompt, **kw: seen.append(prompt) or real(
        model, prompt, **kw))
    run(ip, f"%%lemon_infer -m {tiny_model} --max-tokens 1 -i\nA story about {{{{topic}}}} {{a: 1}}")
    run(ip, f"%%lemon_infer -m {tiny_model} --max-tokens 1\nA story about {{{{topic}}}}")
    assert seen == ["A story about dragons {a: 1}", "A story about {{topic}}"]
    err = run(ip, f"%%lemon_infer -m {tiny_model} -i\nabout {{{{nothing}}}}")
    assert "no variable 'nothing'" in str(err) and len(seen) == 2


@pytest.mark.parametrize(("cell", "message"), [
    ("%lemon_load gemma3-270m --ctx 4096", "unrecognized arguments: --ctx 4096"),
    ("%lemon_load gemma3-270m --ctx-size abc", "ctx_size must be a positive integer, got 'abc'"),
    ("%lemon_load gemma3-270m --ctx-size 0", "ctx_size must be a positive integer, got 0"),
    ("%lemon_load gemma3-270m --extra-args=--port=1", "may not set --port"),
    ("%lemon_load gemma3-270m --pin --unpin", "contradict"),
    ("%lemon_load no-such-model", "unknown model 'no-such-model'"),
    ("%lemon_unload gemma3-270m", "is not loaded"),
    ("%lemon_unload gemma3-270m --all", "not both"),
    ("%lemon_logs -n 0", "positive number of lines"),
    ("%lemon_status extra", "takes no arguments"),
    ("%%lemon_infer\n   \n", "the cell is empty"),
    ("%%lemon_infer -o 2x\nhi", "-o needs a variable name"),
    ("%%lemon_infer --system hi\nhello", "--system needs --chat"),
    ("%%lemon_infer --max-tokens many\nhello", "argument --max-tokens: invalid int value"),
    ("%%lemon_infer --temp 0\nhello", "unrecognized arguments: --temp 0"),
])
def test_bad_arguments_fail_with_one_line_and_change_nothing(ip: InteractiveShell, router: Router,
                                                             tiny_model: str, cell: str,
                                                             message: str) -> None:
    run(ip, f"%lemon_load {tiny_model} --ctx-size 256")
    before = [(s.name, s.state, s.pid) for s in router.status()]
    err = run(ip, cell)
    assert err is not None and message in str(err)
    assert "\n" not in str(err).strip()
    assert [(s.name, s.state, s.pid) for s in router.status()] == before


def test_lemon_errors_render_short_and_fail_the_cell(ip: InteractiveShell,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    result = ip.run_cell("%lemon_load no-such-model")
    assert not result.success and isinstance(result.error_in_exec, LemonError)
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert "ModelNotFound: unknown model 'no-such-model'" in text and "Traceback" not in text


def test_status_models_logs(ip: InteractiveShell, router: Router, tiny_model: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    assert repr(ip.run_line_magic("lemon_status", "")) == "no models loaded yet"
    run(ip, f"%lemon_load {tiny_model} --ctx-size 256")
    table = repr(ip.run_line_magic("lemon_status", ""))
    pid = router.status()[0].pid
    assert table.splitlines()[0].split() == ["model", "state", "backend", "pid", "options", "memory",
                                             "last", "load", "last", "error"]
    assert table.splitlines()[1].split()[:4] == [tiny_model, "ready", "llama-server", str(pid)]
    assert "ctx 256" in table
    assert "<table>" in ip.run_line_magic("lemon_status", "")._repr_html_()
    models = repr(ip.run_line_magic("lemon_models", ""))
    rows = {line.split()[0]: line.split()[1:4] for line in models.splitlines()[1:]}
    assert rows["gemma3-270m"] == ["builtin", "llm", "unloaded"]
    assert rows[tiny_model] == ["path", "llm", "ready"]
    capsys.readouterr()
    ip.run_line_magic("lemon_logs", f"{tiny_model} -n 3")
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_register_then_load_by_name(ip: InteractiveShell, router: Router, tiny_model: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, f"%lemon_register tiny-magic {tiny_model} --ctx-size 384")
    assert "registered tiny-magic →" in capsys.readouterr().out
    run(ip, "%lemon_load tiny-magic")
    [s] = router.status()
    assert s.name == "tiny-magic" and s.options is not None and s.options.ctx_size == 384


def test_reload_ext_keeps_backends_and_unload_ext_detaches(ip: InteractiveShell, router: Router,
                                                          tiny_model: str) -> None:
    run(ip, f"%lemon_load {tiny_model} --ctx-size 256")
    pid = router.status()[0].pid
    run(ip, "%reload_ext lemon_magic")
    assert get_router() is router and router.status()[0].pid == pid and alive(pid)
    assert run(ip, f"%lemon_load {tiny_model} --ctx-size 256") is None
    run(ip, "%unload_ext lemon_magic")
    assert "lemon_load" not in ip.magics_manager.magics["line"]
    assert alive(pid)
    run(ip, "%load_ext lemon_magic")


def test_config_and_pyproject(ip: InteractiveShell, router: Router, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run(ip, "%config LemonMagics.start_timeout = 33.0")
    assert router.async_router.config.start_timeout == 33.0
    (tmp_path / "pyproject.toml").write_text("[tool.lemon_magic]\nctx-size = 1024\nmax_tokens = 7\n")
    monkeypatch.chdir(tmp_path)
    run(ip, "%reload_ext lemon_magic")
    assert "settings from pyproject.toml: ctx_size=1024, max_tokens=7" in capsys.readouterr().out
    magics = ip.magics_manager.registry["LemonMagics"]
    assert isinstance(magics, LemonMagics) and magics.ctx_size == 1024 and magics.max_tokens == 7
    (tmp_path / "pyproject.toml").write_text("[tool.lemon_magic]\nctxsize = 1\n")
    err = run(ip, "%reload_ext lemon_magic")
    assert "has no setting 'ctxsize'" in str(err)
    (tmp_path / "pyproject.toml").unlink()
    run(ip, "%load_ext lemon_magic")


def test_tab_completion_of_model_names(ip: InteractiveShell, tiny_model: str) -> None:
    run(ip, f"%lemon_load {tiny_model} --ctx-size 256")
    magics = ip.magics_manager.registry["LemonMagics"]
    assert magics.complete_model_names("gem") == ["gemma3-270m"]
    assert tiny_model in magics.complete_model_names("/")


def _press_stop_when(events: EventLog, predicate: object, delay: float = 0.0) -> None:
    main = threading.get_ident()

    def press() -> None:
        events.wait_for(predicate)  # type: ignore[arg-type]
        time.sleep(delay)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=press, daemon=True).start()


def test_stop_during_a_load(ip: InteractiveShell, router: Router, tiny_model: str, tmp_path: Path,
                            events: EventLog, capsys: pytest.CaptureFixture[str]) -> None:
    gate = tmp_path / "gate"
    router.async_router.backends["fake"] = FakeBackend(gate=gate)
    router.subscribe(events)
    _press_stop_when(events, lambda e: e.new is ModelState.LOADING)
    err = run(ip, f"%lemon_load {tiny_model} --backend fake")
    assert isinstance(err, Interrupted)
    shown = capsys.readouterr().err + str(err._render_traceback_())
    assert f"interrupted: stopped waiting for {tiny_model} to load; the load goes on" in shown
    gate.touch()  # the lock is free, the load went on: the next cell joins or no-ops
    assert run(ip, f"%lemon_load {tiny_model} --backend fake") is None
    assert router.spawn_count == 1


def test_stop_during_a_stream(ip: InteractiveShell, router: Router, tiny_model: str,
                              events: EventLog, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FAKE_TOKEN_DELAY", "1.0")
    router.async_router.backends["fake"] = FakeBackend()
    run(ip, f"%lemon_load {tiny_model} --backend fake")
    capsys.readouterr()
    router.subscribe(events)
    main = threading.get_ident()
    threading.Timer(1.5, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
    began = time.monotonic()
    err = run(ip, f"%%lemon_infer -m {tiny_model} -o story\nhello")
    assert isinstance(err, Interrupted) and time.monotonic() - began < 4
    out = capsys.readouterr().out
    assert out.startswith("fake text\n(the partial text is in story)\n")  # the partial text stays
    assert "interrupted: generation stopped" in out
    assert ip.user_ns["story"] == "fake text" and ip.user_ns["story"].completion is None
    # the interrupted stream gave its request back (the router says so), the model still serves
    events.wait_for(lambda e: e.model == tiny_model and e.detail == "idle", timeout=10)
    [s] = router.status()
    assert s.requests_in_flight == 0 and s.state is ModelState.READY and alive(s.pid)
    # and nothing holds the unload: it stops that very process
    assert run(ip, f"%lemon_unload {tiny_model}") is None
    assert f"unloaded {tiny_model} (pid {s.pid})" in capsys.readouterr().out
    assert not alive(s.pid)
    [after] = router.status()
    assert after.state is ModelState.UNLOADED and after.pid is None and after.requests_in_flight == 0


def test_every_magic_has_help_with_usage(ip: InteractiveShell) -> None:
    from lemon_magic.magics import MAGIC_NAMES

    for name in MAGIC_NAMES:
        kind = "cell" if name == "lemon_infer" else "line"
        doc = ip.magics_manager.magics[kind][name].__doc__
        assert doc and "In [1]:" in doc, name
        if name not in {"lemon_status", "lemon_models", "lemon_panel"}:
            usage = doc.split("\n\n", 2)[1]  # magic_arguments puts the argparse usage first
            assert usage.strip().startswith(f"%{name} "), (name, usage)
            assert ip.magics_manager.magics[kind][name].__func__.parser.allow_abbrev is False
