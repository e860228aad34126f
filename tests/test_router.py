"""The load contract on real llama.cpp backends (tiny GGUF models and the embedded Gemma)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from lemon_magic import (
    LoadCancelled,
    ModelState,
    Router,
    RouterConfig,
    SlotsFull,
)
from tests.conftest import EventLog, alive
from tests.fakes import FakeBackend, RacyRouter
from tests.serving import backend_headers

pytestmark = pytest.mark.real
BACKENDS = ["llama-server", "llama-cpp-python"]

# Each race test runs against the real router and against RacyRouter (check-then-act
# outside the lock, as Lemonade did before PR #1604); on the racy one it must fail.
IMPLS = [pytest.param(None, id="router"),
         pytest.param(RacyRouter, id="racy", marks=pytest.mark.xfail(strict=True,
                                                                      reason="racy design"))]


def _state(router: Router, name: str) -> ModelState | None:
    return next((s.state for s in router.status() if s.name == name), None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_options_is_noop_and_different_ctx_reloads(router: Router, tiny_model: str,
                                                         backend: str) -> None:
    first = router.load(tiny_model, ctx_size=256, backend=backend)
    assert first.action == "loaded" and alive(first.pid)
    again = router.load(tiny_model, ctx_size=256, backend=backend)
    assert again.action == "noop" and again.pid == first.pid
    assert router.spawn_count == 1
    bigger = router.load(tiny_model, ctx_size=512, backend=backend)
    assert bigger.action == "reloaded" and bigger.pid != first.pid
    assert bigger.previous_options is not None and bigger.previous_options.ctx_size == 256
    assert not alive(first.pid) and alive(bigger.pid)
    assert router.spawn_count == 2
    [status] = router.status()
    assert status.state is ModelState.READY and status.options is not None
    assert status.options.ctx_size == 512 and status.pid == bigger.pid


def test_reload_confirms_new_ctx_from_the_backend(router: Router, tiny_model: str) -> None:
    router.load(tiny_model, ctx_size=256, backend="llama-server")
    r = router.load(tiny_model, ctx_size=1024, backend="llama-server")
    props = httpx.get(r.url + "/props", headers=backend_headers(router, r.url), timeout=5).json()
    assert props["default_generation_settings"]["n_ctx"] == 1024


def test_auto_load_never_reloads_and_reports_the_difference(router: Router, tiny_model: str) -> None:
    from lemon_magic import LoadOptions

    loaded = router.load(tiny_model, ctx_size=256)
    c = router.complete(tiny_model, "once upon a time", max_tokens=4, temperature=0,
                        load_options=LoadOptions(ctx_size=512))
    assert c.load.action == "noop" and c.load.pid == loaded.pid
    assert dict(c.load.options_differ) == {"ctx_size": (256, 512)}
    assert router.spawn_count == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_1603_auto_load_in_flight_and_explicit_same_options_load(
        make_router: Callable[..., Router], events: EventLog, impl: type | None) -> None:
    """Lemonade #1603 on the embedded Gemma: one start, no eviction, both callers succeed."""
    router = make_router(**({"impl": impl} if impl else {}))
    router.subscribe(events)
    results: dict[str, object] = {}

    def infer() -> None:
        try:
            results["infer"] = router.complete("gemma3-270m", "Once upon a time", max_tokens=4,
                                               temperature=0)
        except Exception as exc:
            results["infer"] = exc

    t = threading.Thread(target=infer)
    t.start()
    events.wait_for(lambda e: e.new is ModelState.LOADING)
    explicit = router.load("gemma3-270m")  # the same options the auto-load resolved to
    t.join(60)
    assert not isinstance(results["infer"], Exception), results["infer"]
    assert explicit.joined and explicit.action == "loaded"
    assert router.spawn_count == 1
    assert not [e for e in events.events if e.new in (ModelState.STOPPING, ModelState.UNLOADED)]


@pytest.mark.parametrize("impl", IMPLS)
def test_32_concurrent_cold_loads_spawn_once(make_router: Callable[..., Router],
                                             impl: type | None) -> None:
    router = make_router(**({"impl": impl} if impl else {}))
    barrier = threading.Barrier(32)

    def load(_: int) -> int:
        barrier.wait()
        return router.load("gemma3-270m", ctx_size=1024, backend="llama-server").pid

    with ThreadPoolExecutor(32) as pool:
        pids = list(pool.map(load, range(32)))
    assert router.spawn_count == 1
    assert len(set(pids)) == 1 and alive(pids[0])


def test_loads_of_different_models_overlap(make_router: Callable[..., Router], tiny_model: str,
                                           tiny_model_b: str, events: EventLog) -> None:
    router = make_router(RouterConfig(max_loaded={"llm": 2}))
    router.subscribe(events)
    barrier = threading.Barrier(2)

    def load(model: str) -> None:
        barrier.wait()
        router.load(model, ctx_size=256, backend="llama-cpp-python")

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(load, [tiny_model, tiny_model_b]))

    def span(name: str) -> tuple[float, float]:
        start = next(e.at for e in events.events if e.model == name and e.new is ModelState.LOADING)
        end = next(e.at for e in events.events if e.model == name and e.new is ModelState.READY)
        return start, end

    (a0, a1), (b0, b1) = span(tiny_model), span(tiny_model_b)
    assert a0 < b1 and b0 < a1, "the two loads ran one after the other"


def test_inference_on_a_loaded_model_proceeds_while_another_loads(
        make_router: Callable[..., Router], tiny_model: str, tiny_model_b: str, tmp_path: Path,
        events: EventLog) -> None:
    gate = tmp_path / "gate"
    from lemon_magic.backends import default_backends

    backends = {**default_backends(), "fake": FakeBackend(gate=gate)}
    router = make_router(RouterConfig(max_loaded={"llm": 2}, start_timeout=60), backends=backends)
    router.subscribe(events)
    router.load(tiny_model, ctx_size=256)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(router.load, tiny_model_b, backend="fake")
        events.wait_for(lambda e: e.model == tiny_model_b and e.new is ModelState.LOADING)
        text = router.complete(tiny_model, "once upon", max_tokens=4, temperature=0)
        assert text.load.model == tiny_model
        assert _state(router, tiny_model_b) is ModelState.LOADING  # still held at the gate
        gate.touch()
        assert slow.result(30).action == "loaded"


def _pid_of_the_load(router: Router, events: EventLog, model: str, timeout: float = 10) -> int:
    """Wait until ``model``'s load has a process; return its pid.

    The router announces the load (a LOADING event) but not the spawn that follows it,
    so after the event this waits, bounded, for ``status()`` to show the pid.
    """
    events.wait_for(lambda e: e.model == model and e.new is ModelState.LOADING)
    deadline = time.monotonic() + timeout
    while True:
        [s] = [s for s in router.status() if s.name == model]
        assert s.state is ModelState.LOADING, f"the load ended before it had a process: {s}"
        if s.pid is not None:
            return s.pid
        assert time.monotonic() < deadline, f"no process for {model} within {timeout} s"
        time.sleep(0.005)


def test_unload_during_load_cancels_it(make_router: Callable[..., Router], tiny_model: str,
                                       tmp_path: Path, events: EventLog) -> None:
    backends = {"fake": FakeBackend(gate=tmp_path / "never")}  # held unhealthy: LOADING for ever
    router = make_router(backends=backends)
    router.subscribe(events)
    records = Path(os.environ["LEMON_MAGIC_STATE_DIR"]) / "backends"
    with ThreadPoolExecutor(2) as pool:
        loads = [pool.submit(router.load, tiny_model, backend="fake") for _ in range(2)]
        pid = _pid_of_the_load(router, events, tiny_model)
        assert alive(pid) and (records / f"{pid}.json").exists()  # a half-started process to kill
        result = router.unload(tiny_model)
        assert result.cancelled_load and result.pid == pid
        for f in loads:
            with pytest.raises(LoadCancelled, match="unloaded while loading"):
                f.result(10)
    assert not alive(pid), "the half-started process must be killed"
    assert not (records / f"{pid}.json").exists()
    [s] = router.status()
    assert (s.state, s.pid) == (ModelState.UNLOADED, None)
    assert router.spawn_count == 1


def test_unload_during_a_real_load(router: Router, events: EventLog) -> None:
    router.subscribe(events)
    with ThreadPoolExecutor(1) as pool:
        f = pool.submit(router.load, "gemma3-270m")
        events.wait_for(lambda e: e.new is ModelState.LOADING)
        router.unload("gemma3-270m")
        with pytest.raises(LoadCancelled):
            f.result(30)
    assert _state(router, "gemma3-270m") is ModelState.UNLOADED
    # and the router is consistent: the next load works
    assert router.load("gemma3-270m").action == "loaded"


def test_lru_eviction_at_the_slot_limit(make_router: Callable[..., Router], tiny_model: str,
                                        tiny_model_b: str, tiny_model_c: str) -> None:
    router = make_router(RouterConfig(max_loaded={"llm": 2}))
    a = router.load(tiny_model, ctx_size=256)
    b = router.load(tiny_model_b, ctx_size=256)
    router.complete(tiny_model, "the", max_tokens=1)  # a is now more recently used than b
    c = router.load(tiny_model_c, ctx_size=256)
    states = {s.name: s.state for s in router.status()}
    assert states == {tiny_model: ModelState.READY, tiny_model_b: ModelState.UNLOADED,
                      tiny_model_c: ModelState.READY}
    assert alive(a.pid) and not alive(b.pid) and alive(c.pid)


def test_pinned_models_are_not_evicted(make_router: Callable[..., Router], tiny_model: str,
                                       tiny_model_b: str, tiny_model_c: str) -> None:
    router = make_router(RouterConfig(max_loaded={"llm": 2}))
    router.load(tiny_model, ctx_size=256, pin=True)
    router.load(tiny_model_b, ctx_size=256)
    router.complete(tiny_model_b, "the", max_tokens=1)  # b is more recent; a is pinned anyway
    router.load(tiny_model_c, ctx_size=256)
    states = {s.name: s.state for s in router.status()}
    assert states[tiny_model] is ModelState.READY and states[tiny_model_b] is ModelState.UNLOADED
    router.load(tiny_model_b, ctx_size=256, pin=True)  # evicts c (a is pinned)
    with pytest.raises(SlotsFull, match="pinned"):
        router.load(tiny_model_c, ctx_size=256)
    assert {s.name: s.state for s in router.status()}[tiny_model_c] is ModelState.UNLOADED


def test_default_slot_limit_is_one_llm(router: Router, tiny_model: str, tiny_model_b: str) -> None:
    a = router.load(tiny_model, ctx_size=256)
    router.load(tiny_model_b, ctx_size=256)
    assert not alive(a.pid)
    assert [s.name for s in router.status() if s.state is ModelState.READY] == [tiny_model_b]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_marks_crashed_within_a_second_and_next_use_restarts(
        router: Router, tiny_model: str, events: EventLog, backend: str) -> None:
    first = router.load(tiny_model, ctx_size=256, backend=backend)
    router.subscribe(events)
    killed_at = time.time()
    os.kill(first.pid, signal.SIGKILL)
    crashed = events.wait_for(lambda e: e.new is ModelState.CRASHED, timeout=5)
    assert crashed.at - killed_at < 1.0
    [status] = router.status()
    assert status.state is ModelState.CRASHED
    assert status.last_error is not None and "killed by SIGKILL" in status.last_error
    c = router.complete(tiny_model, "once", max_tokens=2)
    assert c.load.action == "loaded" and c.load.pid != first.pid and alive(c.load.pid)


def test_streaming_chunks_arrive_in_order_and_match_the_final_text(router: Router) -> None:
    stream = router.complete("gemma3-270m", "The capital of France is", max_tokens=12,
                             temperature=0, seed=1, stream=True)
    chunks = list(stream)
    assert len(chunks) > 1
    assert stream.completion is not None and stream.completion.text == "".join(chunks)
    plain = router.complete("gemma3-270m", "The capital of France is", max_tokens=12,
                            temperature=0, seed=1)
    assert plain.text == "".join(chunks)


def test_chat_with_the_gemma_template_streams(router: Router) -> None:
    texts = []
    for question in ("What is the capital of France?",
                     "Write the word banana three times, separated by commas."):
        stream = router.chat("gemma3-270m", [{"role": "user", "content": question}],
                             max_tokens=8, temperature=0, stream=True)
        texts.append("".join(stream))
        assert stream.completion is not None and stream.completion.text == texts[-1]
    assert texts[0] != texts[1]  # an empty prompt (issue 17) answered both alike


def test_status_reports_everything(router: Router, tiny_model: str) -> None:
    r = router.load(tiny_model, ctx_size=256)
    [s] = router.status()
    assert (s.name, s.state, s.backend, s.pid, s.url) == (tiny_model, ModelState.READY, r.backend,
                                                          r.pid, r.url)
    assert s.rss is not None and s.rss > 0 and s.load_seconds and s.last_used
    assert abs(s.last_used - time.time()) < 60 and s.log_tail
    assert psutil.Process(s.pid).status() != psutil.STATUS_ZOMBIE


def test_plan_matches_what_load_does(router: Router, tiny_model: str) -> None:
    assert router.plan(tiny_model, ctx_size=256).action == "load"
    router.load(tiny_model, ctx_size=256)
    assert router.plan(tiny_model, ctx_size=256).action == "noop"
    plan = router.plan(tiny_model, ctx_size=512)
    assert plan.action == "reload" and dict(plan.diff) == {"ctx_size": (256, 512)}
    assert "ctx_size 256 → 512" in plan.describe()
    assert router.load(tiny_model, ctx_size=512).action == "reloaded"


def test_close_stops_every_backend(make_router: Callable[..., Router], tiny_model: str) -> None:
    router = make_router()
    pid = router.load(tiny_model, ctx_size=256).pid
    router.close()
    assert not alive(pid)
    assert router.closed


def test_the_async_router_on_its_own_loop(tiny_model: str) -> None:
    """AsyncRouter is usable directly from async code (no portal, no blocking facade)."""
    import anyio

    from lemon_magic import AsyncRouter, LoadOptions

    async def main() -> tuple[str, str, str, int, int]:
        async with AsyncRouter(RouterConfig(start_timeout=60)) as r:
            loaded = await r.ensure_loaded(tiny_model, LoadOptions(ctx_size=256))
            again = await r.ensure_loaded(tiny_model, LoadOptions(ctx_size=256))
            chunks = [c.text async for c in r.stream(tiny_model, "/v1/completions",
                                                       {"prompt": "once", "max_tokens": 16})]
            whole = await r.request(tiny_model, "/v1/completions",
                                    {"prompt": "once", "max_tokens": 4, "temperature": 0})
            assert r.status()[0].requests_in_flight == 0
            return loaded.action, again.action, whole.finish_reason or "", len(chunks), loaded.pid

    loaded, again, finish, n_chunks, pid = anyio.run(main)
    assert (loaded, again) == ("loaded", "noop") and finish in {"length", "stop"} and n_chunks >= 1
    assert not alive(pid)


def test_a_lease_ended_before_its_acquire_finishes_releases_the_model(tiny_model: str) -> None:
    """Stop can land between the loop admitting a request and the caller learning of it."""
    import anyio

    from lemon_magic import AsyncRouter, LoadCancelled, LoadOptions, _requests
    from lemon_magic._requests import Lease

    async def main() -> list[int]:
        busy = []
        async with AsyncRouter(RouterConfig(start_timeout=60)) as r:
            opts = LoadOptions(ctx_size=256)
            lease = Lease()
            await _requests.admit(r, tiny_model, opts, lease)
            busy.append(r.status()[0].requests_in_flight)
            lease.served = True
            _requests.end_lease(r, lease)
            _requests.end_lease(r, lease)  # idempotent
            busy.append(r.status()[0].requests_in_flight)
            abandoned = Lease()
            _requests.end_lease(r, abandoned)  # the caller gave up first
            with pytest.raises(LoadCancelled, match="abandoned"):
                await _requests.admit(r, tiny_model, opts, abandoned)
            busy.append(r.status()[0].requests_in_flight)
        return busy

    assert anyio.run(main) == [1, 0, 0]


def test_a_stream_dropped_half_way_releases_its_request(make_router: Callable[..., Router],
                                                        tiny_model: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_TOKEN_DELAY", "0.2")
    router = make_router(backends={"fake": FakeBackend()})
    router.load(tiny_model, backend="fake")
    for _chunk in router.complete(tiny_model, "hi", stream=True):
        break  # the Stream is dropped here, unfinished
    assert router.status()[0].requests_in_flight == 0


def test_a_pin_given_by_a_caller_that_joins_a_load_is_kept(make_router: Callable[..., Router],
                                                           tiny_model: str, tmp_path: Path,
                                                           events: EventLog) -> None:
    gate = tmp_path / "gate"
    router = make_router(backends={"fake": FakeBackend(gate=gate)})
    router.subscribe(events)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(router.load, tiny_model, backend="fake")
        events.wait_for(lambda e: e.new is ModelState.LOADING)
        joiner = pool.submit(router.load, tiny_model, backend="fake", pin=True)
        time.sleep(0.2)  # let the joiner reach the in-flight load
        gate.touch()
        assert first.result(30).action == "loaded" and joiner.result(30).joined
    assert router.status()[0].pinned


def test_close_refuses_new_loads_and_leaves_nothing_running(tiny_model: str, tiny_model_b: str) -> None:
    import anyio

    from lemon_magic import AsyncRouter, LemonError, LoadOptions, RouterClosed

    async def main() -> list[int]:
        pids: list[int] = []
        async with AsyncRouter(RouterConfig(start_timeout=60, max_loaded={"llm": 2})) as r:
            pids.append((await r.ensure_loaded(tiny_model, LoadOptions(ctx_size=256))).pid)

            async def late_load() -> None:
                try:
                    pids.append((await r.ensure_loaded(tiny_model_b, LoadOptions(ctx_size=256))).pid)
                except (LemonError, RouterClosed):  # refused or cancelled by the close
                    pass

            async with anyio.create_task_group() as tg:
                tg.start_soon(late_load)
                tg.start_soon(r.aclose)
            assert not [s for s in r.status() if s.pid]
        return pids

    for pid in anyio.run(main):
        assert not alive(pid)
