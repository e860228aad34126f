"""Shared fixtures: isolated config/state dirs, tiny GGUF models, routers that clean up."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
from IPython.core.interactiveshell import InteractiveShell

from lemon_magic import Router, RouterConfig, RouterEvent, get_router
from tests.tinygguf import write_tiny_llama

BACKEND_MARKERS = ("llama-server", "llama_cpp.server", "fake_server.py")


def pytest_unconfigure(config: pytest.Config) -> None:
    """Whatever test started the demo remote (tests/test_notebooks.py), it stops with the session."""
    from tests.remotes import close_session_demo_remote

    close_session_demo_remote()


def _our_backends() -> list[psutil.Process]:
    """Backends this process's routers started (not a server a test runs as a remote, nor its
    backends: ``lemon_magic serve``, llama-server's router mode; their fixtures stop them)."""
    out, servers = [], set()
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            line = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "lemon_magic serve" in line or "--models-dir" in line:
            servers.add(child.pid)
        elif any(m in line for m in BACKEND_MARKERS):
            out.append(child)
    return [p for p in out if not _under(p, servers)]


def _under(p: psutil.Process, pids: set[int]) -> bool:
    try:
        return any(parent.pid in pids for parent in p.parents())
    except psutil.Error:
        return False


@pytest.fixture(scope="session", autouse=True)
def _isolated_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """User config and pid records go to temp dirs; the cache (model, built binary) is shared."""
    root = tmp_path_factory.mktemp("lemon")
    old = {k: os.environ.get(k) for k in ("LEMON_MAGIC_CONFIG_DIR", "LEMON_MAGIC_STATE_DIR")}
    os.environ["LEMON_MAGIC_CONFIG_DIR"] = str(root / "config")
    os.environ["LEMON_MAGIC_STATE_DIR"] = str(root / "state")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    # after the whole suite, no backend process may be left alive
    left = _our_backends()
    for p in left:
        p.kill()
    assert not left, f"backend processes left alive after the suite: {[p.pid for p in left]}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-a.gguf", seed=1))


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-b.gguf", seed=2))


@pytest.fixture(scope="session")
def tiny_model_c(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-c.gguf", seed=3))


@pytest.fixture
def forget_registrations() -> Iterator[None]:
    """Registrations persist (models.json is per session): drop the ones a test made."""
    from lemon_magic import Registry

    registry = Registry()
    before = set(registry.user_names())
    yield
    for name in set(registry.user_names()) - before:
        registry.unregister(name)


@pytest.fixture
def make_router() -> Iterator[Callable[..., Router]]:
    """Build routers that are closed (and checked for leftovers) when the test ends."""
    made: list[Router] = []

    def make(config: RouterConfig | None = None, **kwargs: Any) -> Router:
        r = Router(config or RouterConfig(start_timeout=60, drain_timeout=5, stop_grace=3), **kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()
    wait_no_backends()


def wait_no_backends(seconds: float = 5.0) -> None:
    """Wait until no backend process of ours is left, then fail if one still is."""
    deadline = time.monotonic() + seconds
    while _our_backends() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _our_backends()
    for p in left:
        p.kill()
    assert not left, f"backends left running: {[(p.pid, p.cmdline()[:2]) for p in left]}"


@pytest.fixture
def ip() -> Iterator[InteractiveShell]:
    """A real IPython shell with the extension loaded; the process's router is closed after."""
    shell = InteractiveShell.instance()
    shell.config.pop("LemonMagics", None)
    shell.run_line_magic("load_ext", "lemon_magic")
    yield shell
    if "lemon_magic" in shell.extension_manager.loaded:
        shell.run_line_magic("unload_ext", "lemon_magic")
    shell.config.pop("LemonMagics", None)
    get_router().close()
    wait_no_backends()


@pytest.fixture
def router(make_router: Callable[..., Router]) -> Router:
    return make_router()


class EventLog:
    """Collects router events (delivered on the router thread) for a test thread to wait on."""

    def __init__(self) -> None:
        self.events: list[RouterEvent] = []
        self._cond = threading.Condition()

    def __call__(self, event: RouterEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[RouterEvent], bool], timeout: float = 30) -> RouterEvent:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.events:
                    if predicate(e):
                        return e
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no matching event within {timeout} s: {self.events}")
                self._cond.wait(remaining)


@pytest.fixture
def events() -> EventLog:
    return EventLog()


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
from tests.serving import served  # noqa: E402, F401  (the HTTP tests' fixture: a served router)
