"""The bad-input table: every case through the Python API and through the magics.

Each gets one line naming the problem; the router's other models, their
processes and the spawn count are unchanged afterwards, and nothing new runs.
"""

from __future__ import annotations

import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from lemon_magic import (
    BackendExited,
    BackendUnavailable,
    HealthCheckTimeout,
    InferenceError,
    InvalidModelFile,
    InvalidOptions,
    ModelNotFound,
    ModelNotLoaded,
    Router,
    get_router,
)
from tests.conftest import _our_backends
from tests.fakes import FakeBackend

pytestmark = pytest.mark.real


@dataclass(frozen=True)
class Case:
    name: str
    api: Callable[[Router, dict[str, str]], object]
    magic: str
    error: type[Exception]
    text: str
    magic_error: type[Exception] | None = None  # when the magic fails differently (UsageError:
    # an argument mistake, issue 20)
    magic_text: str | None = None
    starts_backend: bool = False  # a backend is started and fails: the case's own model records it


LONG = "word " * 3000
CASES = [
    Case("unknown model", lambda r, f: r.load("no-such-model"), "%lemon_load no-such-model",
         ModelNotFound, "unknown model 'no-such-model'"),
    Case("missing file", lambda r, f: r.load(f["missing"]), "%lemon_load {missing}",
         InvalidModelFile, "does not exist"),
    Case("empty file", lambda r, f: r.load(f["empty"]), "%lemon_load {empty}",
         InvalidModelFile, "is empty (0 bytes)"),
    Case("truncated header", lambda r, f: r.load(f["header_cut"]), "%lemon_load {header_cut}",
         InvalidModelFile, "is truncated"),
    Case("not GGUF", lambda r, f: r.load(f["text"]), "%lemon_load {text}",
         InvalidModelFile, "is not a GGUF file"),
    Case("truncated tensors", lambda r, f: r.load(f["tensor_cut"], backend="llama-server"),
         "%lemon_load {tensor_cut} --backend llama-server", BackendExited, "exited during start",
         starts_backend=True),
    Case("ctx 0", lambda r, f: r.load(f["tiny"], ctx_size=0), "%lemon_load {tiny} --ctx-size 0",
         InvalidOptions, "ctx_size must be a positive integer, got 0",
         magic_error=UsageError),
    Case("ctx -5", lambda r, f: r.load(f["tiny"], ctx_size=-5), "%lemon_load {tiny} --ctx-size=-5",
         InvalidOptions, "ctx_size must be a positive integer, got -5",
         magic_error=UsageError),
    Case("ctx abc", lambda r, f: r.load(f["tiny"], ctx_size="abc"), "%lemon_load {tiny} --ctx-size abc",
         InvalidOptions, "ctx_size must be a positive integer, got 'abc'",
         magic_error=UsageError),
    Case("ctx 10**12", lambda r, f: r.load(f["tiny"], ctx_size=10**12),
         "%lemon_load {tiny} --ctx-size 1000000000000", InvalidOptions, "exceeds the training context",
         magic_error=UsageError),
    Case("threads 0", lambda r, f: r.load(f["tiny"], threads=0), "%lemon_load {tiny} --threads 0",
         InvalidOptions, "threads must be a positive integer",
         magic_error=UsageError),
    Case("extra --port", lambda r, f: r.load(f["tiny"], extra_args="--port 1"),
         '%lemon_load {tiny} --extra-args="--port 1"', InvalidOptions, "may not set --port",
         magic_error=UsageError),
    Case("extra -m", lambda r, f: r.load(f["tiny"], extra_args=["-m", "x.gguf"]),
         '%lemon_load {tiny} --extra-args="-m x.gguf"', InvalidOptions, "may not set -m",
         magic_error=UsageError),
    Case("extra --ctx-size", lambda r, f: r.load(f["tiny"], extra_args="--ctx-size=9"),
         "%lemon_load {tiny} --extra-args=--ctx-size=9", InvalidOptions, "may not set --ctx-size",
         magic_error=UsageError),
    Case("extra ;", lambda r, f: r.load(f["tiny"], extra_args="--verbose; reboot"),
         '%lemon_load {tiny} --extra-args="--verbose; reboot"', InvalidOptions, "shell syntax",
         magic_error=UsageError),
    Case("extra $()", lambda r, f: r.load(f["tiny"], extra_args="$(reboot)"),
         '%lemon_load {tiny} --extra-args="$(reboot)"', InvalidOptions, "shell syntax",
         magic_error=UsageError),
    Case("extra newline", lambda r, f: r.load(f["tiny"], extra_args="--a\n--b"),
         '%lemon_load {tiny} --extra-args="--a\\n--b"', InvalidOptions,
         "extra_args must not contain line breaks",
         # a line magic cannot carry a line break: the typed backslash is refused instead
         magic_text="contains shell syntax '\\\\'",
         magic_error=UsageError),
    Case("binary missing", lambda r, f: r.load(f["tiny"], backend="llama-server"),
         "%lemon_load {tiny} --backend llama-server", BackendUnavailable, "llama-server not found"),
    Case("binary not executable", lambda r, f: r.load(f["tiny"], backend="llama-server"),
         "%lemon_load {tiny} --backend llama-server", BackendUnavailable, "is not executable"),
    Case("backend exits at once", lambda r, f: r.load(f["tiny"], backend="fake-exit"),
         "%lemon_load {tiny} --backend fake-exit", BackendExited,
         "exited during start (exit code 3)", starts_backend=True),
    Case("never healthy", lambda r, f: r.load(f["tiny"], backend="fake-hang"),
         "%lemon_load {tiny} --backend fake-hang", HealthCheckTimeout,
         "did not become healthy within 1 s", starts_backend=True),
    Case("unknown option", lambda r, f: r.load(f["tiny"], bogus=1), "%lemon_load {tiny} --bogus 1",
         InvalidOptions, "unknown load option 'bogus'", magic_error=UsageError,
         magic_text="unrecognized arguments: --bogus 1"),
    Case("sampling as load option", lambda r, f: r.load(f["tiny"], temperature=0),
         "%lemon_load {tiny} --temperature 0", InvalidOptions, "is a sampling parameter",
         magic_error=UsageError, magic_text="unrecognized arguments: --temperature 0"),
    Case("unknown backend", lambda r, f: r.load(f["tiny"], backend="vllm"),
         "%lemon_load {tiny} --backend vllm", InvalidOptions, "backend must be one of",
         magic_error=UsageError),
    Case("template with shell", lambda r, f: r.load(f["tiny"], chat_template="x;y"),
         "%lemon_load {tiny} --chat-template 'x;y'", InvalidOptions, "must be a template name",
         magic_error=UsageError),
    Case("empty prompt", lambda r, f: r.complete(f["loaded"], "   "), "%%lemon_infer -m {loaded}\n  \n",
         InvalidOptions, "the prompt is empty", magic_error=UsageError,
         magic_text="the cell is empty"),
    Case("prompt beyond the context", lambda r, f: r.complete(f["loaded"], LONG, max_tokens=4),
         "%%lemon_infer -m {loaded} --max-tokens 4\n" + LONG, InferenceError, "answered HTTP 400"),
    Case("invalid UTF-8 name", lambda r, f: r.load("bad\udcffname"), "%lemon_load bad\udcffname",
         ModelNotFound, "unknown model"),
    Case("unload not loaded", lambda r, f: r.unload(f["tiny"]), "%lemon_unload {tiny}",
         ModelNotLoaded, "is not loaded"),
]
assert len(CASES) >= 25


def test_every_case_expects_a_message() -> None:
    """An empty fragment is in every message: such a case could never fail."""
    for case in CASES:
        assert case.text.strip(), case.name
        assert case.magic_text is None or case.magic_text.strip(), case.name


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_model: str, tiny_model_b: str) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.gguf").write_bytes(b"")
    (d / "notes.gguf").write_text("not a model\n")
    data = Path(tiny_model).read_bytes()
    (d / "header-cut.gguf").write_bytes(data[:100])
    (d / "tensor-cut.gguf").write_bytes(data[: len(data) // 2])
    noexec = d / "llama-server"
    noexec.write_text("#!/bin/sh\n")
    noexec.chmod(stat.S_IRUSR | stat.S_IWUSR)
    return {"missing": str(d / "missing.gguf"), "empty": str(d / "empty.gguf"),
            "header_cut": str(d / "header-cut.gguf"), "tensor_cut": str(d / "tensor-cut.gguf"),
            "text": str(d / "notes.gguf"), "tiny": tiny_model, "loaded": tiny_model_b,
            "noexec": str(noexec), "never": str(d / "never")}


def _snapshot(router: Router, skip: str | None) -> list[tuple[str, str, int | None]]:
    return [(s.name, str(s.state), s.pid) for s in router.status() if s.name != skip]


@pytest.mark.parametrize("via", ["api", "magic"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(ip: InteractiveShell, files: dict[str, str], case: Case, via: str,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    ip.run_line_magic("config", "LemonMagics.start_timeout = 1.0")
    router = get_router()
    router.configure(stop_grace=0.5)
    router.async_router.backends["fake-exit"] = FakeBackend(exit_at_start=3)
    router.async_router.backends["fake-hang"] = FakeBackend(gate=Path(files["never"]), ignore_term=True)
    router.load(files["loaded"], ctx_size=256, backend="llama-server")
    if case.name == "binary missing":
        monkeypatch.setenv("LEMON_MAGIC_LLAMA_SERVER", files["missing"] + "-server")
    if case.name == "binary not executable":
        monkeypatch.setenv("LEMON_MAGIC_LLAMA_SERVER", files["noexec"])
    own = files["tiny"] if case.starts_backend else None
    own = files["tensor_cut"] if case.name == "truncated tensors" else own
    before = _snapshot(router, own)
    processes = {p.pid for p in _our_backends()}
    spawns = router.spawn_count

    if via == "api":
        with pytest.raises(case.error) as info:
            case.api(router, files)
        message = info.value.message  # type: ignore[attr-defined]
    else:
        result = ip.run_cell(case.magic.format(**files))
        err = result.error_in_exec or result.error_before_exec
        assert isinstance(err, case.magic_error or case.error), repr(err)
        message = str(getattr(err, "message", err))
    expected = case.magic_text if via == "magic" and case.magic_text else case.text
    assert expected in message, message
    assert "\n" not in message.strip(), "one line"
    assert _snapshot(router, own) == before
    assert {p.pid for p in _our_backends()} == processes, "a process was left behind or killed"
    assert router.spawn_count == spawns + (1 if case.starts_backend else 0)
