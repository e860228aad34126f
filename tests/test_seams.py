"""Defects found where responsibilities meet (issue 8, section 2); each test failed on the old code."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from lemon_magic import (
    AsyncRouter,
    InferenceError,
    InvalidModelFile,
    InvalidOptions,
    LemonError,
    LoadOptions,
    ModelNotFound,
    ModelState,
    NotEnoughMemory,
    Plan,
    RequestTimeout,
    Router,
    RouterConfig,
    Stream,
)
from tests.conftest import EventLog, alive
from tests.fakes import FakeBackend

pytestmark = pytest.mark.real


def _argv(pid: int | None) -> str:
    assert pid is not None
    return " ".join(psutil.Process(pid).cmdline())


def test_a_name_registered_anew_loads_the_new_file_and_defaults(make_router: Callable[..., Router],
                                                                 tiny_model: str, tiny_model_b: str) -> None:
    router = make_router()
    router.register("mine", tiny_model, ctx_size=256)
    first = router.load("mine")
    assert tiny_model in _argv(first.pid) and first.options.ctx_size == 256
    router.unload("mine")
    router.register("mine", tiny_model_b, ctx_size=128)
    second = router.load("mine")
    assert second.action == "loaded" and second.options.ctx_size == 128
    assert tiny_model_b in _argv(second.pid) and tiny_model not in _argv(second.pid)
    # re-registered while loaded: the next explicit load is a reload onto the new file
    router.register("mine", tiny_model, ctx_size=128)
    third = router.load("mine")
    assert third.action == "reloaded" and tiny_model in _argv(third.pid)
    assert third.previous_options is not None and third.previous_options.model_path.endswith("tiny-b.gguf")
    unloaded = router.unregister("mine")
    assert unloaded is not None and unloaded.pid == third.pid and not alive(third.pid)
    with pytest.raises(ModelNotFound):
        router.load("mine")
    assert "mine" not in {s.name for s in router.status()} | set(router.model_names())


def test_config_changes_apply_to_the_next_request_and_bound_it_as_a_whole(
        make_router: Callable[..., Router], tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_BODY_TRICKLE", "0.3")  # 8 pieces, 0.3 s apart: ~2.4 s in all
    router = make_router(backends={"fake": FakeBackend()})
    router.load(tiny_model, backend="fake")
    assert router.complete(tiny_model, "hi").text == "fake text from the stand-in"  # type: ignore[union-attr]
    router.configure(request_timeout=1.0)  # each read is quick: only a total deadline stops it
    with pytest.raises(RequestTimeout, match=r"within 1 s \(request_timeout\)"):
        router.complete(tiny_model, "hi")
    assert router.status()[0].requests_in_flight == 0


def test_a_silent_stream_ends_at_the_idle_gap(make_router: Callable[..., Router], tiny_model: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TOKEN_DELAY", "1.0")
    router = make_router(backends={"fake": FakeBackend()})
    router.load(tiny_model, backend="fake")
    router.configure(stream_idle_timeout=0.3, request_timeout=0.1)  # the total deadline is not used
    stream = router.complete(tiny_model, "hi", stream=True)
    assert isinstance(stream, Stream)
    with pytest.raises(RequestTimeout, match=r"0.3 s \(stream_idle_timeout\)"):
        list(stream)
    assert router.status()[0].requests_in_flight == 0


def test_a_loading_model_counts_at_its_estimate_in_memory_admission(
        make_router: Callable[..., Router], tiny_model: str, tiny_model_b: str, tmp_path: Path,
        events: EventLog) -> None:
    gate = tmp_path / "gate"
    router = make_router(RouterConfig(max_loaded={"llm": 2}, start_timeout=60),
                         backends={"fake": FakeBackend(gate=gate)})
    need = sum(AsyncRouter.memory_needed(router.async_router.registry.resolve(m),
                                         router.plan(m, backend="fake").options)
               for m in (tiny_model, tiny_model_b))
    router.configure(memory_limit=need - 1)  # each fits alone, both do not
    router.subscribe(events)
    pending = router.load_soon(tiny_model, backend="fake")
    events.wait_for(lambda e: e.new is ModelState.LOADING and e.model == tiny_model)
    with pytest.raises(NotEnoughMemory, match="cannot load"):
        router.load(tiny_model_b, backend="fake")
    gate.touch()
    assert pending.result(30).action == "loaded"


def _pid_records() -> list[Path]:
    return sorted((Path(os.environ["LEMON_MAGIC_STATE_DIR"]) / "backends").glob("*.json"))


def test_a_backend_that_exits_during_start_leaves_nothing_behind(make_router: Callable[..., Router],
                                                                 tiny_model: str) -> None:
    router = make_router()
    before = _pid_records()
    for _ in range(3):
        with pytest.raises(LemonError) as info:
            router.load(tiny_model, ctx_size=256, extra_args="--rope-scaling bogus")
        assert "exited during start" in str(info.value)
    assert _pid_records() == before
    [status] = router.status()
    assert status.state is ModelState.FAILED and status.pid is None and status.options is None


def test_a_stream_nobody_iterates_holds_no_request(make_router: Callable[..., Router],
                                                   tiny_model: str) -> None:
    # a drain that outlasts the test's own timeout: an unload that waits for the stream hangs
    router = make_router(RouterConfig(drain_timeout=3600))
    router.load(tiny_model, ctx_size=256)
    stream = router.complete(tiny_model, "once", max_tokens=4, stream=True)  # e.g. left in Out[n]
    assert router.status()[0].requests_in_flight == 0
    assert router.unload(tiny_model).pid is not None
    assert repr(stream).endswith("not started>")


def test_a_stream_closed_from_another_thread_ends_cleanly(make_router: Callable[..., Router],
                                                          tiny_model: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TOKEN_DELAY", "0.3")
    router = make_router(backends={"fake": FakeBackend()})
    router.load(tiny_model, backend="fake")
    stream = router.complete(tiny_model, "hi", stream=True)
    assert isinstance(stream, Stream)
    got: list[str] = []
    errors: list[BaseException] = []
    first = threading.Event()

    def read() -> None:
        try:
            for chunk in stream:
                got.append(chunk)
                first.set()
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    assert first.wait(10)
    stream.close()  # while the reader is blocked in the next read
    stream.close()  # idempotent
    reader.join(10)
    assert not reader.is_alive() and errors == [] and 1 <= len(got) < 5
    assert router.status()[0].requests_in_flight == 0


def test_unloading_a_crashed_model_forgets_its_options(make_router: Callable[..., Router],
                                                       tiny_model: str, events: EventLog) -> None:
    router = make_router()
    router.subscribe(events)
    loaded = router.load(tiny_model, ctx_size=256)
    os.kill(loaded.pid, signal.SIGKILL)
    events.wait_for(lambda e: e.new is ModelState.CRASHED)
    assert router.status()[0].options is not None  # what crashed is still shown
    router.unload(tiny_model)
    [status] = router.status()
    assert status.state is ModelState.UNLOADED and status.options is None


def test_a_crash_mid_request_is_an_inference_error(make_router: Callable[..., Router], tiny_model: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TOKEN_DELAY", "0.3")
    router = make_router(backends={"fake": FakeBackend()})
    loaded = router.load(tiny_model, backend="fake")
    stream = router.complete(tiny_model, "hi", stream=True)
    assert isinstance(stream, Stream)
    with pytest.raises(InferenceError, match="exited while serving the request"):
        for _ in stream:
            os.kill(loaded.pid, signal.SIGKILL)


def test_the_plan_of_a_stopping_model_says_so() -> None:
    from lemon_magic.options import ResolvedOptions

    opts = ResolvedOptions("llama-server", 256, 2)
    plan = Plan("m", "wait", opts, None, {}, state=ModelState.STOPPING)
    assert plan.describe() == "m is stopping; the load will wait for it, then decide"


def test_unsubscribe_runs_on_the_router_thread(make_router: Callable[..., Router]) -> None:
    router = make_router()
    threads: list[int] = []

    class Recording(list):  # type: ignore[type-arg]
        def remove(self, item: object) -> None:
            threads.append(threading.get_ident())
            super().remove(item)

    router.async_router._subscribers = Recording()
    unsubscribe = router.subscribe(lambda e: None)
    unsubscribe()
    unsubscribe()  # idempotent
    assert len(threads) == 1 and threads[0] == router._loop_thread


def test_the_streaming_client_is_made_once_under_concurrency(make_router: Callable[..., Router]) -> None:
    router = make_router()
    barrier = threading.Barrier(8)
    clients: list[object] = []

    def get() -> None:
        barrier.wait()
        clients.append(router._http_client())

    workers = [threading.Thread(target=get) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len({id(c) for c in clients}) == 1


def test_max_tokens_must_be_positive(make_router: Callable[..., Router], tiny_model: str) -> None:
    router = make_router()
    for bad in (0, -1, True, 2.5):
        with pytest.raises(InvalidOptions, match="max_tokens must be a positive integer"):
            router.complete(tiny_model, "hi", max_tokens=bad)  # type: ignore[arg-type]
    assert router.status() == []  # nothing was loaded


def test_models_lists_without_assembling_and_survives_a_bad_entry(
        make_router: Callable[..., Router], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEMON_MAGIC_CACHE_DIR", str(tmp_path / "cache"))
    router = make_router()
    registry = router.async_router.registry
    registry.path.parent.mkdir(parents=True, exist_ok=True)
    registry.path.write_text('{"broken": {"kind": 3}, "odd": "not a table"}')
    entries = {e.name: e for e in router.models()}
    assert not (tmp_path / "cache" / "models").exists()  # the 253 MB model was not assembled
    assert entries["gemma3-270m"].present is False
    assert "malformed entry for 'broken'" in (entries["broken"].problem or "")
    assert "malformed entry for 'odd'" in (entries["odd"].problem or "")
    for name in ("broken", "odd"):
        with pytest.raises(InvalidModelFile, match=f"malformed entry for '{name}'"):
            router.load(name)
    registry.path.unlink()


def test_load_options_never_go_to_the_request(make_router: Callable[..., Router], tiny_model: str) -> None:
    router = make_router()
    with pytest.raises(InvalidOptions, match="load option"):
        router.complete(tiny_model, "hi", ctx_size=512)
    assert router.complete(tiny_model, "hi", max_tokens=2,
                           load_options=LoadOptions(ctx_size=256)).load.options.ctx_size == 256  # type: ignore[union-attr]


def test_the_last_resort_kill_reads_no_router_state(make_router: Callable[..., Router],
                                                    tiny_model: str) -> None:
    router = make_router()
    pid = router.load(tiny_model, ctx_size=256).pid
    router.async_router._models = {}  # the router's table is not consulted (another thread owns it)
    router.async_router._kill_all_now()  # from this thread, without the loop
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(pid) and not [r for r in _pid_records() if r.stem == str(pid)]


def test_a_stream_closed_while_its_model_loads_just_ends(make_router: Callable[..., Router],
                                                         tiny_model: str, tmp_path: Path,
                                                         events: EventLog) -> None:
    gate = tmp_path / "gate"
    router = make_router(backends={"fake": FakeBackend(gate=gate)})
    router.subscribe(events)
    stream = router.complete(tiny_model, "hi", stream=True, load_options=LoadOptions(backend="fake"))
    assert isinstance(stream, Stream)
    outcome: list[object] = []
    reader = threading.Thread(target=lambda: outcome.append(list(stream)))
    reader.start()
    events.wait_for(lambda e: e.new is ModelState.LOADING)
    stream.close()  # while the reader waits for the load
    gate.touch()
    reader.join(30)
    assert not reader.is_alive() and outcome == [[]]
    events.wait_for(lambda e: e.new is ModelState.READY)
    assert router.status()[0].requests_in_flight == 0
