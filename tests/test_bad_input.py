"""Bad input: one clear sentence naming the problem, and the router left exactly as it was."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from lemon_magic import (
    BackendExited,
    BackendUnavailable,
    HealthCheckTimeout,
    InvalidModelFile,
    InvalidOptions,
    LemonError,
    ModelNotFound,
    ModelNotLoaded,
    Router,
    RouterConfig,
)
from lemon_magic.backends import LlamaServer
from tests.conftest import _our_backends, alive
from tests.fakes import FakeBackend

pytestmark = pytest.mark.real


def _snapshot(router: Router) -> list[tuple[str, str, int | None]]:
    return [(s.name, str(s.state), s.pid) for s in router.status()]


def _check(router: Router, call: Callable[[], object], error: type[LemonError], match: str) -> str:
    """Run a bad call against a router that has a model loaded; nothing may change."""
    before = _snapshot(router)
    spawns = router.spawn_count
    with pytest.raises(error, match=match) as info:
        call()
    message = info.value.message
    assert "\n" not in message, "the message must be one line"
    assert _snapshot(router) == before
    assert router.spawn_count == spawns
    return message


@pytest.fixture
def loaded(router: Router, tiny_model: str) -> Router:
    router.load(tiny_model, ctx_size=256)
    return router


@pytest.fixture
def files(tmp_path: Path, tiny_model: str) -> dict[str, str]:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    text = tmp_path / "notes.gguf"
    text.write_text("this is not a model\n")
    data = Path(tiny_model).read_bytes()
    header_cut = tmp_path / "header-cut.gguf"
    header_cut.write_bytes(data[:100])
    tensor_cut = tmp_path / "tensor-cut.gguf"
    tensor_cut.write_bytes(data[: len(data) // 2])
    return {"empty": str(empty), "text": str(text), "header_cut": str(header_cut),
            "tensor_cut": str(tensor_cut), "missing": str(tmp_path / "missing.gguf")}


@pytest.mark.parametrize(("name", "error", "match"), [
    ("no-such-model", ModelNotFound, "unknown model 'no-such-model'"),
    ("", ModelNotFound, "unknown model"),
    ("bad\udcffname", ModelNotFound, "unknown model"),
])
def test_unknown_model(loaded: Router, name: str, error: type[LemonError], match: str) -> None:
    _check(loaded, lambda: loaded.load(name), error, match)


@pytest.mark.parametrize(("which", "match"), [
    ("missing", "does not exist"),
    ("empty", "is empty"),
    ("text", "is not a GGUF file"),
    ("header_cut", "truncated"),
])
def test_bad_model_files(loaded: Router, files: dict[str, str], which: str, match: str) -> None:
    _check(loaded, lambda: loaded.load(files[which]), InvalidModelFile, match)


def test_truncated_tensor_data_fails_with_the_backend_log(router: Router, files: dict[str, str]) -> None:
    with pytest.raises(BackendExited, match="exited during start") as info:
        router.load(files["tensor_cut"], backend="llama-server")
    assert info.value.log_tail, "the backend's log tail must come with the error"
    assert "last lines of the backend log" in info.value.render()
    assert not _our_backends()


@pytest.mark.parametrize(("options", "match"), [
    ({"ctx_size": 0}, "ctx_size must be a positive integer, got 0"),
    ({"ctx_size": -5}, "ctx_size must be a positive integer, got -5"),
    ({"ctx_size": "abc"}, "ctx_size must be a positive integer, got 'abc'"),
    ({"ctx_size": True}, "ctx_size must be a positive integer"),
    ({"ctx_size": 10**12}, "exceeds the training context"),
    ({"threads": 0}, "threads must be a positive integer"),
    ({"temperature": 0.5}, "sampling parameter, not a load option"),
    ({"ctx": 512}, "unknown load option 'ctx'"),
    ({"backend": "vllm"}, "backend must be one of"),
    ({"extra_args": "--port 9999"}, "may not set --port"),
    ({"extra_args": ["-m", "other.gguf"]}, "may not set -m"),
    ({"extra_args": "--ctx-size=99"}, "may not set --ctx-size"),
    ({"extra_args": "--verbose; rm -rf /"}, "shell syntax"),
    ({"extra_args": "$(reboot)"}, "shell syntax"),
    ({"extra_args": "--log-file `id`"}, "shell syntax"),
    ({"extra_args": "--a\n--b"}, "line breaks"),
    ({"extra_args": "'unclosed"}, "cannot be parsed"),
    ({"chat_template": "x; y"}, "chat_template must be a template name"),
])
def test_bad_options(loaded: Router, tiny_model: str, options: dict[str, object], match: str) -> None:
    _check(loaded, lambda: loaded.load(tiny_model, **options), InvalidOptions, match)


def test_missing_backend_binary(make_router: Callable[..., Router], tiny_model: str,
                                tmp_path: Path) -> None:
    router = make_router(backends={"llama-server": LlamaServer(tmp_path / "nope")})
    _check(router, lambda: router.load(tiny_model, backend="llama-server"), BackendUnavailable,
           "llama-server not found")


def test_backend_binary_not_executable(make_router: Callable[..., Router], tiny_model: str,
                                       tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(stat.S_IRUSR | stat.S_IWUSR)
    router = make_router(backends={"llama-server": LlamaServer(binary)})
    _check(router, lambda: router.load(tiny_model, backend="llama-server"), BackendUnavailable,
           "is not executable")


def test_backend_that_exits_at_start(make_router: Callable[..., Router], tiny_model: str) -> None:
    router = make_router(backends={"fake": FakeBackend(exit_at_start=3)})
    with pytest.raises(BackendExited, match=r"exited during start \(exit code 3\)") as info:
        router.load(tiny_model, backend="fake")
    assert any("refusing to start" in line for line in info.value.log_tail)
    [status] = router.status()
    assert str(status.state) == "failed" and status.pid is None
    assert status.last_error and "exit code 3" in status.last_error
    assert not _our_backends()


def test_backend_that_never_becomes_healthy(make_router: Callable[..., Router], tiny_model: str,
                                            tmp_path: Path) -> None:
    router = make_router(RouterConfig(start_timeout=1.0, stop_grace=0.5),
                         backends={"fake": FakeBackend(gate=tmp_path / "never", ignore_term=True)})
    with pytest.raises(HealthCheckTimeout, match="did not become healthy within 1 s"):
        router.load(tiny_model, backend="fake")
    assert not _our_backends(), "a hung backend must be killed, even if it ignores SIGTERM"


def test_unload_of_a_model_that_is_not_loaded(loaded: Router, tiny_model_b: str) -> None:
    _check(loaded, lambda: loaded.unload(tiny_model_b), ModelNotLoaded, "is not loaded")
    _check(loaded, lambda: loaded.unload("no-such-model"), ModelNotLoaded, "is not loaded")


def test_port_taken_is_retried(make_router: Callable[..., Router], tiny_model: str,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from lemon_magic.backends import _process

    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    ports = iter([taken])
    real = _process.free_port
    monkeypatch.setattr("lemon_magic._slot.free_port", lambda: next(ports, None) or real())
    router = make_router()
    try:
        r = router.load(tiny_model, ctx_size=256, backend="llama-server")
    finally:
        blocker.close()
    assert r.action == "loaded" and not r.url.endswith(f":{taken}")
    assert router.spawn_count == 2


def _pid_records() -> set[int]:
    """The pids that have a record in the state dir (what a later router would reap)."""
    return {int(p.stem) for p in (Path(os.environ["LEMON_MAGIC_STATE_DIR"]) / "backends").glob("*.json")}


# (id, load arguments, error, message fragment, processes the failed load starts)
FAILING_LOADS = [
    ("backend-exits", {"backend": "fake-exit"}, BackendExited, r"exited during start \(exit code 3\)", 1),
    ("never-healthy", {"backend": "fake-hang"}, HealthCheckTimeout,
     "did not become healthy within 1 s", 1),
    ("backend-refuses-its-arguments", {"backend": "llama-server", "extra_args": "--rope-scaling bogus"},
     BackendExited, "exited during start", 1),
    ("truncated-tensors", {"backend": "llama-server", "model": "tensor_cut"}, BackendExited,
     "exited during start", 1),
    ("binary-missing", {"backend": "missing"}, BackendUnavailable, "not found", 0),
    ("reserved-flag", {"extra_args": "--port 1"}, InvalidOptions, "may not set --port", 0),
    ("missing-file", {"model": "missing"}, InvalidModelFile, "does not exist", 0),
    ("unknown-model", {"model": "no-such-model"}, ModelNotFound, "unknown model 'no-such-model'", 0),
]


@pytest.mark.parametrize(("args", "error", "match", "spawns"), [case[1:] for case in FAILING_LOADS],
                         ids=[case[0] for case in FAILING_LOADS])
def test_errors_leave_no_process(make_router: Callable[..., Router], tiny_model: str, tiny_model_b: str,
                                 files: dict[str, str], tmp_path: Path, args: dict[str, str],
                                 error: type[LemonError], match: str, spawns: int) -> None:
    """A failed load of another model leaves no process, no pid record, and the loaded model as
    it was (the same process, still serving)."""
    from lemon_magic.backends import default_backends

    router = make_router(RouterConfig(start_timeout=60, stop_grace=0.5), backends={
        **default_backends(), "fake-exit": FakeBackend(exit_at_start=3),
        "fake-hang": FakeBackend(gate=tmp_path / "never", ignore_term=True),
        "missing": LlamaServer(tmp_path / "nope")})
    kept = router.load(tiny_model, ctx_size=256, backend="llama-server")
    router.configure(start_timeout=1.0)
    before = _snapshot(router)
    processes, records, spawned = {p.pid for p in _our_backends()}, _pid_records(), router.spawn_count
    assert kept.pid in processes and kept.pid in records  # what "unchanged" is measured against

    args = dict(args)
    name = args.pop("model", None)
    model = files.get(name, name) if name else tiny_model_b
    with pytest.raises(error, match=match) as info:
        router.load(model, **args)
    assert "\n" not in info.value.message

    assert router.spawn_count == spawned + spawns, "the error must come from the step it names"
    assert {p.pid for p in _our_backends()} == processes, "a process was left behind (or killed)"
    assert _pid_records() == records, "a pid record was left behind (or dropped)"
    assert [s for s in _snapshot(router) if s[0] != model] == before
    assert [s[1:] for s in _snapshot(router) if s[0] == model] in ([], [("failed", None)])
    assert alive(kept.pid)
    assert router.complete(tiny_model, "the", max_tokens=1).load.pid == kept.pid
