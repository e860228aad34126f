"""Pulls under the load contract (issue 10): the router's single flight, auto-load pulls, Stop,
delete, the catalogue, and the magics, against the local Hub stand-in and real backends."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from IPython.core.interactiveshell import InteractiveShell

from lemon_magic import (
    ChecksumMismatch,
    ModelNotFound,
    NotDownloaded,
    RepoNotFound,
    Router,
    VariantNotFound,
    get_router,
)
from lemon_magic._hub import find_local
from lemon_magic._hubcatalog import load_catalog
from lemon_magic.magics import Interrupted
from tests.conftest import EventLog
from tests.hubstub import HubStub, hub, tiny_gguf

__all__ = ("hub",)  # the fixture, imported for the tests below

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("forget_registrations")]

REPO = "lemon/tiny-GGUF"
FILES = {"tiny-Q4_K_M.gguf": tiny_gguf(1), "tiny-Q8_0.gguf": tiny_gguf(2)}
CHECKPOINT = f"{REPO}:Q4_K_M"




def _slow_chunks(monkeypatch: pytest.MonkeyPatch, hub: HubStub, bytes_per_second: int) -> None:
    """Progress (and cancel) every 8 KiB, and a transfer that takes a while."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 8192)
    hub.throttle = bytes_per_second


def test_concurrent_loads_and_pulls_of_one_model_make_one_transfer_and_one_spawn(
        hub: HubStub, make_router: Callable[..., Router], monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, FILES)
    _slow_chunks(monkeypatch, hub, 150_000)
    router = make_router()
    calls: list[Callable[[], object]] = [lambda: router.load(CHECKPOINT, ctx_size=256)] * 6
    calls += [lambda: router.pull(CHECKPOINT)] * 3
    calls += [lambda: router.complete(CHECKPOINT, "once upon", max_tokens=2)] * 3
    with ThreadPoolExecutor(len(calls)) as pool:
        results = [f.result(timeout=120) for f in [pool.submit(c) for c in calls]]
    assert len(hub.gets(REPO, "tiny-Q4_K_M.gguf")) == 1  # one transfer
    assert router.spawn_count == 1  # then one spawn
    pulls = [r for r in results if type(r).__name__ == "PullResult"]
    assert sum(not p.joined for p in pulls) <= 1  # type: ignore[attr-defined]
    [entry] = [e for e in router.models() if e.name == CHECKPOINT]
    assert entry.checkpoint == CHECKPOINT and entry.source == "user" and entry.present


def test_an_auto_load_by_inference_pulls_the_model_first(hub: HubStub,
                                                         make_router: Callable[..., Router]) -> None:
    hub.add_repo(REPO, FILES)
    router = make_router()
    done = router.complete(REPO, "once upon", max_tokens=3)  # no variant: Q4_K_M by default
    assert done.usage["completion_tokens"] > 0
    spec = router.async_router.registry.lookup(REPO)
    assert spec.checkpoint == CHECKPOINT and spec.path.name == "tiny-Q4_K_M.gguf"
    assert len(hub.gets(REPO, "tiny-Q4_K_M.gguf")) == 1 and not hub.gets(REPO, "tiny-Q8_0.gguf")


@pytest.mark.parametrize(("checkpoint", "error", "says"), [
    ("lemon/no-such-GGUF", RepoNotFound, "no repo lemon/no-such-GGUF"),
    (f"{REPO}:Q2_K", VariantNotFound, "variants: Q4_K_M, Q8_0"),
])
def test_a_failed_pull_leaves_the_registry_as_it_was(
        hub: HubStub, make_router: Callable[..., Router], checkpoint: str, error: type[Exception],
        says: str) -> None:
    hub.add_repo(REPO, FILES)
    router = make_router()
    before = router.model_names()
    with pytest.raises(error, match=says):
        router.load(checkpoint)
    with pytest.raises(error, match=says):
        router.pull(checkpoint, name="named")
    assert router.model_names() == before and router.spawn_count == 0 and router.status() == []


def test_a_corrupt_transfer_registers_nothing_and_the_next_pull_works(
        hub: HubStub, make_router: Callable[..., Router]) -> None:
    hub.add_repo(REPO, FILES)
    hub.corrupt.add((REPO, "tiny-Q4_K_M.gguf"))
    router = make_router()
    with pytest.raises(ChecksumMismatch, match="is corrupt"):
        router.pull(CHECKPOINT)
    assert CHECKPOINT not in router.model_names() and find_local(CHECKPOINT) is None
    hub.corrupt.clear()
    assert router.pull(CHECKPOINT).downloaded == len(FILES["tiny-Q4_K_M.gguf"])
    assert CHECKPOINT in router.model_names()


def test_plan_says_a_load_would_pull_and_status_shows_the_download(
        hub: HubStub, make_router: Callable[..., Router], monkeypatch: pytest.MonkeyPatch,
        events: EventLog) -> None:
    hub.add_repo(REPO, FILES)
    _slow_chunks(monkeypatch, hub, 100_000)
    router = make_router()
    with pytest.raises(NotDownloaded, match=f"loading it pulls {CHECKPOINT}"):
        router.plan(CHECKPOINT)
    assert not hub.gets(REPO, "tiny-Q4_K_M.gguf")  # a plan never pulls
    router.subscribe(events)
    reports: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        pulled = pool.submit(router.pull, CHECKPOINT, progress=lambda p: reports.append(p.describe()))
        seen = None
        while not pulled.done():
            seen = seen or next((s.download for s in router.status() if s.download and "%" in s.download),
                                None)
            time.sleep(0.02)
        pulled.result()
    assert seen is not None and seen.startswith("downloading ") and "MB" in seen
    assert any(e.detail.startswith("downloading") for e in events.events)
    assert router.status() == []  # the row goes when the pull ends (nothing is loaded)


def test_stop_cancels_the_download_and_registers_nothing(
        ip: InteractiveShell, hub: HubStub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, FILES)
    _slow_chunks(monkeypatch, hub, 20_000)  # the file takes over a minute
    router = get_router()
    main = threading.get_ident()

    def press() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(s.download and "%" in s.download for s in router.status()):
                signal.pthread_kill(main, signal.SIGINT)
                return
            time.sleep(0.02)

    threading.Thread(target=press, daemon=True).start()
    result = ip.run_cell(f"%lemon_pull {CHECKPOINT} --name stopped")
    err = result.error_in_exec
    assert isinstance(err, Interrupted)
    assert err._render_traceback_() == ["interrupted: stopped the download of stopped (unless another "
                                        "caller waits for it: then it goes on); nothing is registered "
                                        "until it completes"]
    deadline = time.monotonic() + 10
    while router.status() and time.monotonic() < deadline:  # the transfer ends at its next chunk
        time.sleep(0.05)
    assert router.status() == [] and "stopped" not in router.model_names()
    hub.throttle = None
    got = router.pull(CHECKPOINT, name="stopped")  # the partial file is resumed
    assert got.downloaded < len(FILES["tiny-Q4_K_M.gguf"])
    assert hub.gets(REPO, "tiny-Q4_K_M.gguf")[-1].range is not None


def test_delete_unloads_forgets_and_removes_the_files(hub: HubStub,
                                                      make_router: Callable[..., Router]) -> None:
    hub.add_repo(REPO, FILES)
    router = make_router()
    router.pull(CHECKPOINT, name="mine")
    loaded = router.load("mine", ctx_size=256)
    deleted = router.delete("mine")
    assert deleted.unloaded_pid == loaded.pid and deleted.freed == len(FILES["tiny-Q4_K_M.gguf"])
    assert "mine" not in router.model_names() and find_local(CHECKPOINT) is None
    assert router.status() == []  # its row went with the registration
    with pytest.raises(ModelNotFound):
        router.delete("mine")
    with pytest.raises(ModelNotFound, match="a catalogue model or a checkpoint"):
        router.pull("not-a-model")


def test_catalogue_models_are_listed_and_load_by_name(hub: HubStub,
                                                      make_router: Callable[..., Router]) -> None:
    entry = load_catalog()["Tiny-Test-Model-GGUF"]
    repo, _, filename = entry.checkpoint.partition(":")
    hub.add_repo(repo, {filename: tiny_gguf(7)})
    router = make_router()
    listed = {e.name: e for e in router.models(all=True)}
    assert listed["Tiny-Test-Model-GGUF"].source == "catalog" and not listed["Tiny-Test-Model-GGUF"].present
    assert set(load_catalog()) <= set(listed)
    assert "Tiny-Test-Model-GGUF" not in {e.name for e in router.models()}  # only with all=True
    result = router.load("Tiny-Test-Model-GGUF")
    assert result.options.ctx_size == entry.defaults.ctx_size  # the catalogue's recipe defaults
    after = {e.name: e for e in router.models(all=True)}["Tiny-Test-Model-GGUF"]
    assert after.source == "user" and after.present and after.checkpoint == f"{repo}:UD-IQ2_M"


def test_the_magics_pull_list_and_delete(ip: InteractiveShell, hub: HubStub,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    hub.add_repo(REPO, FILES)
    assert ip.run_cell(f"%lemon_pull {REPO} --name small").error_in_exec is None
    out = capsys.readouterr().out
    assert f"pulled {CHECKPOINT} as small (" in out and "MB downloaded" in out
    table = ip.run_line_magic("lemon_models", "--all")
    row = next(r for r in table.rows_ if r[0] == "small")
    assert row[1] == "user" and row[4].startswith(f"{CHECKPOINT}: ")
    assert any(r[1] == "catalog" and "not downloaded" in r[4] for r in table.rows_)
    assert ip.run_cell(f"%lemon_pull {REPO} --name small").error_in_exec is None
    assert "is in the cache" in capsys.readouterr().out
    assert ip.run_cell("%lemon_delete small").error_in_exec is None
    assert "deleted small (removed" in capsys.readouterr().out
    assert "small" not in get_router().model_names()


def test_the_panel_shows_the_download_and_says_a_load_would_pull(
        hub: HubStub, make_router: Callable[..., Router], monkeypatch: pytest.MonkeyPatch) -> None:
    from lemon_magic.widgets import LemonPanel, chip

    hub.add_repo(REPO, FILES)
    _slow_chunks(monkeypatch, hub, 60_000)
    router = make_router()
    panel = LemonPanel(router)
    try:
        panel.wait_idle()
        panel.model.options = [*panel.model.options, CHECKPOINT]
        panel.model.value = CHECKPOINT
        panel.wait_idle()
        assert f"loading it pulls {CHECKPOINT}" in panel.banner.value and not panel.apply.disabled
        with ThreadPoolExecutor(1) as pool:
            pulled = pool.submit(router.pull, CHECKPOINT)
            panel.wait_until(lambda p: CHECKPOINT in p._rows
                             and chip(p._rows[CHECKPOINT].status) == "downloading"
                             and " %" in p._rows[CHECKPOINT].summary.value, timeout=20)
            assert "MB" in panel._rows[CHECKPOINT].summary.value
            pulled.result(timeout=60)
    finally:
        panel.close()


def test_pulling_a_local_model_transfers_nothing_and_keeps_its_file(
        hub: HubStub, make_router: Callable[..., Router], tiny_model: str) -> None:
    entry = load_catalog()["Tiny-Test-Model-GGUF"]
    router = make_router()
    router.register("Tiny-Test-Model-GGUF", tiny_model)  # a local file under a catalogue name
    got = router.pull("Tiny-Test-Model-GGUF")
    assert (got.checkpoint, got.downloaded, got.path) == ("", 0, tiny_model)
    assert not hub.requests and router.async_router.registry.lookup("Tiny-Test-Model-GGUF").checkpoint is None
    assert entry.checkpoint  # the catalogue would have pulled this, had the name not been registered


def test_a_pull_right_after_a_stop_starts_anew_and_one_name_is_one_checkpoint(
        hub: HubStub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that comes while a cancelled flight ends does not inherit its cancellation; a name
    being pulled from one checkpoint refuses another (found by review)."""
    import anyio

    from lemon_magic import InvalidOptions
    from lemon_magic.router import AsyncRouter

    hub.add_repo(REPO, FILES)
    _slow_chunks(monkeypatch, hub, 20_000)

    async def main() -> None:
        async with AsyncRouter() as router:
            with anyio.move_on_after(0.5):
                await router.pull(CHECKPOINT)  # Stop: the last waiter leaves
            hub.throttle = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(router.pull, CHECKPOINT)
                await anyio.sleep(0.05)
                with pytest.raises(InvalidOptions, match="is being pulled from lemon/tiny-GGUF:Q4_K_M"):
                    await router.pull(f"{REPO}:Q8_0", name=CHECKPOINT)
            assert router.registry.lookup(CHECKPOINT).checkpoint == CHECKPOINT

    anyio.run(main)


def test_deleting_one_pull_of_a_repo_keeps_the_files_another_registration_uses(
        hub: HubStub, make_router: Callable[..., Router]) -> None:
    repo = hub.add_repo(REPO, FILES)
    router = make_router()
    router.pull(CHECKPOINT, name="a")
    repo.put("tiny-Q4_K_M.gguf", tiny_gguf(9))  # a new commit on the Hub
    router.pull(CHECKPOINT, name="b")
    assert router.delete("a").freed == 0  # "b" came from the same repo: its files stay
    assert router.load("b", ctx_size=256).action == "loaded"


def test_a_progress_callback_that_fails_lets_the_pull_go(
        hub: HubStub, make_router: Callable[..., Router], monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, FILES)
    _slow_chunks(monkeypatch, hub, 40_000)
    router = make_router()

    def broken(p: object) -> None:
        raise ValueError("callback bug")

    with pytest.raises(ValueError, match="callback bug"):
        router.pull(CHECKPOINT, progress=broken)
    deadline = time.monotonic() + 10
    while router.status() and time.monotonic() < deadline:  # no waiter left: it is cancelled
        time.sleep(0.05)
    assert router.status() == [] and CHECKPOINT not in router.model_names()
