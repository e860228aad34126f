"""Remote models at the moments a real server cannot stage on demand (``tests/fake_remote.py``: a
slow ``/load`` or ``/health``, a refused ``/unload``, an odd answer, a key): each leaves the router
consistent and working, with a one-line error where something failed. Found by a review of the
remote wiring; each test failed before its fix."""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable

import pytest

from lemon_magic import ModelState, Router, RouterConfig
from lemon_magic._requests import Endpoint
from lemon_magic.errors import (
    InferenceError,
    InvalidOptions,
    LemonError,
    LoadCancelled,
    ModelNotLoaded,
    RemoteAuthError,
    RemoteError,
    RemoteUnreachable,
    RequestTimeout,
)
from tests.fake_remote import FakeRemote

pytestmark = pytest.mark.usefixtures("forget_registrations")

FAST = RouterConfig(start_timeout=30, drain_timeout=2, stop_grace=1, remote_poll_interval=0.2,
                    remote_timeout=3)
KEY_ENV = "LEMON_MAGIC_TEST_FAKE_KEY"


@pytest.fixture
def rr(make_router: Callable[..., Router]) -> Router:
    return make_router(FAST)


def _state(router: Router, name: str) -> ModelState:
    [state] = [s.state for s in router.status() if s.name == name]
    return state


def _until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _works(router: Router) -> None:
    """The router still serves: a status, and a fresh remote loads and answers."""
    with FakeRemote() as other:
        router.register_remote("other", other.url, "m")
        assert router.load("other").action == "loaded"
        assert router.complete("other", "x", max_tokens=1).text == "hi"


def test_inference_during_a_remote_unload_waits_for_it_then_loads(rr: Router) -> None:
    with FakeRemote(unload_seconds=1.0) as fake:
        rr.register_remote("m", fake.url, "m")
        rr.load("m")
        unloading = rr.unload_soon("m")
        _until(lambda: _state(rr, "m") is ModelState.STOPPING)
        done = rr.complete("m", "x", max_tokens=1)  # was: IllegalTransition, the router torn down
        assert done.text == "hi" and done.load.action == "loaded"
        assert unloading.result(10).detail == f"on {fake.url}"
        _works(rr)


def test_an_odd_health_answer_is_survived(rr: Router) -> None:
    body = {"all_models_loaded": [{"model_name": "m", "pid": "x", "recipe_options": "not a table"}]}
    with FakeRemote(health_body=body) as fake:
        rr.register_remote("m", fake.url, "m")
        result = rr.load("m", ctx_size=512)  # loaded, options not reported: the remote decides
        assert result.action in ("noop", "loaded", "reloaded")
        fake.cfg["health_body"] = {"all_models_loaded": "nonsense"}
        time.sleep(0.6)  # a few polls read it
        _works(rr)


def test_a_refused_remote_unload_keeps_the_model_ready(rr: Router) -> None:
    with FakeRemote(unload_status=500) as fake:
        rr.register_remote("m", fake.url, "m")
        rr.load("m")
        for _ in range(2):  # was: IllegalTransition, then the second unload waited forever
            with pytest.raises(RemoteError, match="answered HTTP 500: unload failed here") as info:
                rr.unload("m")
            assert "\n" not in info.value.message
            assert _state(rr, "m") is ModelState.READY
        assert rr.load("m").action == "noop"


def test_an_unload_during_an_explicit_check_cancels_it(rr: Router) -> None:
    with FakeRemote(loaded=True) as fake:
        rr.register_remote("m", fake.url, "m")
        rr.load("m")
        fake.cfg["health_seconds"] = 2.0
        checking = rr.load_soon("m")
        _until(lambda: fake.count("GET", "/health") >= 2)
        rr.unload("m")  # was: the loader was told "noop" while the model went away
        with pytest.raises(LoadCancelled, match="unloaded while loading"):
            checking.result(10)
        assert _state(rr, "m") is ModelState.UNLOADED and not fake.cfg["loaded"]


def test_unregister_during_a_flight_cancels_its_waiters_cleanly(rr: Router) -> None:
    with FakeRemote(load_seconds=2.0) as fake:
        rr.register_remote("m", fake.url, "m")
        loading = rr.load_soon("m")
        _until(lambda: fake.count("POST", "/load") == 1)
        slot = rr.async_router._remotes["m"]
        rr.unregister("m")  # was: "unreachable: ReadError", or a KeyError for a joined request
        with pytest.raises(LoadCancelled, match="unregistered"):
            loading.result(10)
        _until(lambda: slot.client.http.is_closed)
        _works(rr)


def test_registering_a_name_anew_moves_it_to_the_new_server(rr: Router) -> None:
    with FakeRemote() as old, FakeRemote() as new:
        rr.register_remote("m", old.url, "m")
        rr.load("m")
        rr.register_remote("m", new.url, "m")  # was: status and polls stayed on the old server
        assert [s.remote.url for s in rr.status() if s.name == "m" and s.remote] in ([], [new.url])
        polls = old.count("GET", "/health")
        time.sleep(0.6)
        assert old.count("GET", "/health") == polls
        assert rr.load("m").remote == new.url and new.cfg["loaded"]


def test_unload_all_unloads_the_others_when_one_remote_is_gone(rr: Router) -> None:
    with FakeRemote() as alive:
        gone = FakeRemote(keepalive=False)
        with gone:
            rr.register_remote("alive", alive.url, "m")
            rr.register_remote("gone", gone.url, "m")
            rr.load("alive")
            rr.load("gone")
        with pytest.raises(RemoteUnreachable) as info:  # was: a multi-line ExceptionGroup
            rr.unload_all()
        assert "\n" not in info.value.message and gone.url in info.value.message
        assert not alive.cfg["loaded"]
        assert [r.model for r in info.value.unloaded] == ["alive"]  # type: ignore[attr-defined]


def test_the_key_is_read_when_sent_never_kept(rr: Router, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "fake-secret-key-987"
    with FakeRemote(key=secret) as fake:
        monkeypatch.setenv(KEY_ENV, secret)
        rr.register_remote("m", fake.url, "m", api_key_env=KEY_ENV)
        assert rr.complete("m", "x", max_tokens=1).text == "hi"
        stream = rr.complete("m", "x", max_tokens=1, stream=True)
        assert "".join(stream) == "hi"
        endpoint = Endpoint.of_remote(rr.async_router._remotes["m"])
        assert secret not in repr(endpoint) and secret not in repr(stream._lease)
        monkeypatch.setenv(KEY_ENV, "wrong")
        for streamed in (False, True):  # was: "backend of 'm' answered HTTP 401", no variable
            with pytest.raises(RemoteAuthError, match=KEY_ENV):
                result = rr.complete("m", "x", max_tokens=1, stream=streamed)
                if streamed:
                    "".join(result)  # type: ignore[arg-type]
        time.sleep(0.6)  # polls answer (health needs no key here): ready, not "unreachable"
        assert _state(rr, "m") is ModelState.READY


def test_a_remote_inference_timeout_names_the_limit(make_router: Callable[..., Router]) -> None:
    import dataclasses

    rr = make_router(dataclasses.replace(FAST, request_timeout=1.0))
    with FakeRemote(infer_seconds=3.0) as fake:
        rr.register_remote("m", fake.url, "m")
        with pytest.raises(RequestTimeout, match=r"within 1 s \(request_timeout\)"):
            rr.complete("m", "x", max_tokens=1)


def test_closing_the_router_closes_a_retiring_slot(make_router: Callable[..., Router]) -> None:
    rr = make_router(FAST)
    with FakeRemote(infer_seconds=2.0) as fake:
        rr.register_remote("m", fake.url, "m")
        rr.load("m")
        slot = rr.async_router._remotes["m"]
        def infer() -> None:
            with contextlib.suppress(LemonError):  # closing the router ends it: that is all
                rr.complete("m", "x", max_tokens=1)

        worker = threading.Thread(target=infer, daemon=True)
        worker.start()
        _until(lambda: slot.busy == 1)
        rr.unregister("m")  # the slot retires once the request ends
        rr.close()  # was: its client left open
        assert slot.client.http.is_closed
        worker.join(10)


def test_changed_remote_timeouts_apply_to_a_model_already_known(rr: Router) -> None:
    with FakeRemote() as fake:
        rr.register_remote("m", fake.url, "m")
        rr.load("m")
        fake.cfg["health_seconds"] = 3.0
        rr.configure(remote_timeout=0.5)
        start = time.monotonic()
        with pytest.raises(RemoteUnreachable, match="no answer in time"):
            rr.load("m")
        assert time.monotonic() - start < 2.5


# ------------------------------------------------------------------ a second review


def test_a_wait_through_unregister_never_brings_the_registration_back(rr: Router) -> None:
    from lemon_magic.errors import ModelNotFound

    with FakeRemote(unload_seconds=1.5) as fake:
        rr.register_remote("m", fake.url, "m")
        rr.load("m")
        unloading = rr.unload_soon("m")
        _until(lambda: _state(rr, "m") is ModelState.STOPPING)
        waiting = rr.load_soon("m")  # waits for the unload to end
        time.sleep(0.2)
        rr.unregister("m")
        with pytest.raises(ModelNotFound):  # was: loaded again from the old registration
            waiting.result(10)
        unloading.result(10)
        assert fake.count("POST", "/load") == 1 and not any(s.name == "m" for s in rr.status())


def test_a_key_is_stripped_and_a_bad_one_is_refused_unshown(rr: Router,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeRemote(key="k-123") as fake:
        monkeypatch.setenv(KEY_ENV, "k-123\n")  # as read from a file
        rr.register_remote("m", fake.url, "m", api_key_env=KEY_ENV)
        assert rr.complete("m", "x", max_tokens=1).text == "hi"
        monkeypatch.setenv(KEY_ENV, "k-123\u00e9-secret")
        for call in (lambda: rr.load("m"), lambda: rr.complete("m", "x", max_tokens=1),
                     lambda: rr.unload("m")):
            with pytest.raises(InvalidOptions, match=rf"\${KEY_ENV} holds a value that cannot be "
                                                      "sent") as info:
                call()
            assert "secret" not in info.value.message and "\n" not in info.value.message
        assert _state(rr, "m") is ModelState.READY  # was: stuck in stopping
        shown = repr(rr.status()) + "\n".join(rr.logs("m"))
        assert "secret" not in shown
        monkeypatch.setenv(KEY_ENV, "k-123")
        assert rr.unload("m").detail == f"on {fake.url}"
    with pytest.raises(InvalidOptions, match="not the key itself") as info:
        rr.register_remote("k", "http://127.0.0.1:1", "m", api_key_env="sk-proj-SECRETKEY123")
    assert "SECRET" not in info.value.message


def test_a_refused_unload_keeps_the_poll_going(rr: Router) -> None:
    with FakeRemote(unload_status=500, unload_seconds=0.6) as fake:  # polls come during it
        rr.register_remote("m", fake.url, "m")
        rr.load("m")
        with pytest.raises(RemoteError):
            rr.unload("m")
        fake.cfg["loaded"] = False  # a third party unloads it: the poll still sees it
        _until(lambda: _state(rr, "m") is ModelState.UNLOADED, timeout=5)


def test_a_reload_the_remote_refuses_changes_nothing(rr: Router) -> None:
    with FakeRemote() as fake:
        rr.register_remote("m", fake.url, "m")
        rr.load("m")
        fake.cfg["load_status"] = 400
        with pytest.raises(InvalidOptions, match="HTTP 400: load refused here"):
            rr.load("m", ctx_size=512)
        assert _state(rr, "m") is ModelState.READY  # was: failed, and unload said "not loaded"
        assert rr.unload("m").detail == f"on {fake.url}"


def test_a_new_router_can_unload_what_an_old_one_loaded(make_router: Callable[..., Router]) -> None:
    with FakeRemote() as fake:
        first = make_router(FAST)
        first.register_remote("m", fake.url, "m")
        first.load("m")
        first.close()  # the kernel went away; the remote keeps the model
        assert fake.cfg["loaded"]
        second = make_router(FAST)  # a new kernel: same registrations, no slot yet
        assert second.unload("m").detail == f"on {fake.url}"  # was: ModelNotLoaded, never asked
        assert not fake.cfg["loaded"]
        with pytest.raises(ModelNotLoaded):
            second.unload("m")


def test_registering_the_same_remote_again_keeps_its_slot(rr: Router) -> None:
    with FakeRemote(infer_seconds=1.0) as fake:
        rr.register_remote("m", fake.url, "m")
        rr.load("m")
        answer = concurrent.futures.ThreadPoolExecutor(1).submit(
            rr.complete, "m", "x", max_tokens=1)
        time.sleep(0.2)
        rr.register_remote("m", fake.url, "m")  # the register cell run again: nothing changes
        assert answer.result(10).text == "hi"  # was: cut off mid-way
        assert _state(rr, "m") is ModelState.READY


def test_a_request_ended_by_unregister_says_so(rr: Router) -> None:
    with FakeRemote(infer_seconds=6.0) as fake:
        rr.register_remote("m", fake.url, "m")
        rr.load("m")
        answer = concurrent.futures.ThreadPoolExecutor(1).submit(
            rr.complete, "m", "x", max_tokens=1)
        _until(lambda: fake.count("POST", "/completions") == 1)
        rr.unregister("m")  # its client closes after drain_timeout (2 s)
        with pytest.raises(InferenceError, match="was ended here: the model was unregistered"):
            answer.result(15)  # was: "remote … cut the response off mid-way"


def test_a_failed_local_model_does_not_hide_the_remote_of_that_name(
        rr: Router, tiny_model: str) -> None:
    from lemon_magic.errors import LoadError

    with FakeRemote() as fake:
        rr.register("x", tiny_model)
        with pytest.raises(LoadError):
            rr.load("x", extra_args=["--no-such-flag"])
        rr.register_remote("x", fake.url, "m")
        rr.load("x")
        assert rr.unload("x").detail == f"on {fake.url}"  # was: ModelNotLoaded, the remote kept it
        assert not fake.cfg["loaded"]


# ------------------------------------------------------------------ a user's session


def test_a_name_in_use_does_not_switch_between_local_and_remote(rr: Router, tiny_model: str) -> None:
    with FakeRemote() as fake:
        rr.register("x", tiny_model)
        pid = rr.load("x").pid
        with pytest.raises(InvalidOptions, match=rf"'x' is ready here \(pid {pid}\): unload it first"):
            rr.register_remote("x", fake.url, "m")  # was: the local backend stopped, silently
        assert _state(rr, "x") is ModelState.READY
        rr.register_remote("y", fake.url, "m")
        rr.load("y")
        with pytest.raises(InvalidOptions, match=r"'y' is a remote model, ready on .*: unload it"):
            rr.register("y", tiny_model)
        assert fake.cfg["loaded"] and _state(rr, "y") is ModelState.READY


def test_pin_and_reserved_flags_are_refused_for_a_remote_before_anything_is_sent(rr: Router) -> None:
    with FakeRemote() as fake:
        rr.register_remote("m", fake.url, "m")
        with pytest.raises(InvalidOptions, match="never evicted here"):
            rr.load("m", pin=True)
        with pytest.raises(InvalidOptions, match="may not set --port: the remote's server sets it"):
            rr.load("m", extra_args=["--port", "9"])
        assert fake.calls == []


def test_an_unloaded_remote_row_shows_no_stale_pid_or_options(rr: Router) -> None:
    with FakeRemote() as fake:
        rr.register_remote("m", fake.url, "m")
        rr.load("m")
        [row] = [s for s in rr.status() if s.name == "m"]
        assert row.pid == fake.cfg["pid"] and row.remote is not None and row.remote.options
        rr.unload("m")
        [row] = [s for s in rr.status() if s.name == "m"]
        assert row.pid is None and row.remote is not None and row.remote.options == {}


def test_the_remote_key_is_scrubbed_from_what_the_remote_answers(
        rr: Router, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sk-remote-KEY-42"
    monkeypatch.setenv(KEY_ENV, secret)
    with FakeRemote(load_status=500, error_text=f"bad key {secret} for you") as fake:
        rr.register_remote("m", fake.url, "m", api_key_env=KEY_ENV)
        with pytest.raises(LemonError) as info:
            rr.load("m")
        assert secret not in info.value.message and "bad key *** for you" in info.value.message
        assert info.value.model == "m"


def test_a_cancelled_load_that_finishes_on_the_remote_is_unloaded_there(rr: Router) -> None:
    """A remote whose /load goes on after its client left (the fake: it ignores the disconnect):
    the unload that cancelled it unloads it again once it shows up."""
    with FakeRemote(load_seconds=1.5) as fake:
        rr.register_remote("m", fake.url, "m")
        loading = rr.load_soon("m")
        _until(lambda: fake.count("POST", "/load") == 1)
        assert rr.unload("m").cancelled_load
        with pytest.raises(LoadCancelled):
            loading.result(10)
        # its load finished over there, and was unloaded again (a second /unload)
        _until(lambda: fake.count("POST", "/unload") == 2 and not fake.cfg["loaded"], timeout=8)
        assert _state(rr, "m") is ModelState.UNLOADED
