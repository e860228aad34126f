"""The remote client (``lemon_magic._remote`` and ``_remote_client``) against real servers on 127.0.0.1.

Remotes used:

* another process running ``lemon-magic serve`` (a ``lemonade`` remote), with its own
  config dir and a tiny GGUF registered;
* llama.cpp's own router mode (``llama-server --models-dir DIR``, the binary we build), as an
  ``openai`` remote.

No HTTP is mocked. Every process a test starts is stopped by its fixture (by pid).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import anyio
import httpx
import psutil
import pytest

from lemon_magic._remote import RemoteEntry, RemoteSpec, lemonade_load_body, parse_remote, remote_action
from lemon_magic._remote_client import MAPPINGS, RemoteClient, remote_error
from lemon_magic.backends.llama_server import LlamaServer
from lemon_magic.errors import (
    BackendUnavailable,
    InferenceError,
    InvalidOptions,
    LemonError,
    LoadError,
    ModelNotFound,
    RemoteAuthError,
    RemoteError,
    RemoteUnreachable,
)
from lemon_magic.options import LoadOptions
from lemon_magic.registry import Registry
from tests.tinygguf import write_tiny_llama

REPO = Path(__file__).resolve().parent.parent
KEY_ENV = "LEMON_MAGIC_TEST_REMOTE_KEY"
SECRET = "s3cret-remote-key-0123456789"
T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return anyio.run(fn, backend="asyncio")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ------------------------------------------------------------------ server processes


@dataclass
class Proc:
    """A server process this test module started, and how to reach it."""

    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    argv: list[str]
    env: dict[str, str]
    #: every descendant seen while it ran (killed at the end if still alive)
    seen: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def note_children(self) -> None:
        try:
            self.seen.update(c.pid for c in psutil.Process(self.popen.pid).children(recursive=True))
        except psutil.Error:
            pass

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server, wait (bounded), SIGKILL if needed, then kill any descendant left."""
        self.note_children()
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        for pid in self.seen:
            try:
                p = psutil.Process(pid)
                p.wait(5)
            except psutil.NoSuchProcess:
                continue
            except psutil.TimeoutExpired:
                p.kill()
                p.wait(5)


def _start(argv: list[str], env: dict[str, str], port: int, log: Path, ready_path: str) -> Proc:
    with open(log, "ab") as out:
        popen = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
    proc = Proc(popen, port, log, argv, env)
    deadline = time.monotonic() + 60
    while True:
        if popen.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited ({popen.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{proc.url}{ready_path}", timeout=2, trust_env=False).status_code < 500:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.stop(signal.SIGKILL)
            raise RuntimeError(f"{argv[0]} did not become ready: {log.read_text()[-2000:]}")
        time.sleep(0.1)


def start_lemon_serve(root: Path, *, api_key: str | None = None, port: int | None = None) -> Proc:
    """``lemon-magic serve`` in another process, with config and state under ``root``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LEMON_MAGIC_API_KEY", "LEMONADE_API_KEY", KEY_ENV)}
    env |= {"LEMON_MAGIC_CONFIG_DIR": str(root / "config"), "LEMON_MAGIC_STATE_DIR": str(root / "state"),
            "PYTHONPATH": str(REPO)}
    port = port or free_port()
    argv = [sys.executable, "-m", "lemon_magic", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]
    if api_key:
        argv += ["--api-key", api_key]
    return _start(argv, env, port, root / "serve.log", "/live")


def llama_server_binary() -> Path:
    try:
        return LlamaServer().locate()
    except BackendUnavailable as exc:
        pytest.skip(f"no llama-server: {exc}")


def start_llama_router(models_dir: Path, log: Path) -> Proc:
    """llama.cpp's router mode: no ``-m``, models from ``--models-dir``."""
    binary = llama_server_binary()
    if b"--models-dir" not in subprocess.run([binary, "--help"], capture_output=True, timeout=30).stdout:
        pytest.skip(f"{binary} has no router mode (--models-dir)")
    port = free_port()
    argv = [str(binary), "--models-dir", str(models_dir), "--models-max", "1", "--host", "127.0.0.1",
            "--port", str(port), "--threads", "1"]
    return _start(argv, dict(os.environ), port, log, "/health")


@pytest.fixture(scope="module")
def lemon_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    model = write_tiny_llama(root / "tiny.gguf", seed=5)
    Registry(root / "config" / "models.json").register("tiny", model)
    return root


@pytest.fixture(scope="module")
def lemon(lemon_root: Path) -> Iterator[Proc]:
    proc = start_lemon_serve(lemon_root)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def own_lemon(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start ``lemon-magic serve`` processes a test may kill; all are stopped at the end."""
    procs: list[Proc] = []
    model = write_tiny_llama(tmp_path / "tiny.gguf", seed=6)
    Registry(tmp_path / "config" / "models.json").register("tiny", model)

    def start(**kwargs: Any) -> Proc:
        procs.append(start_lemon_serve(tmp_path, **kwargs))
        return procs[-1]

    try:
        yield start
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("router-models")
    write_tiny_llama(d / "tiny.gguf", seed=7)
    return d


@pytest.fixture(scope="module")
def llama_router(models_dir: Path) -> Iterator[Proc]:
    proc = start_llama_router(models_dir, models_dir.parent / "router.log")
    try:
        yield proc
    finally:
        proc.stop()


def lemonade(proc: Proc, model: str = "tiny", **kw: Any) -> RemoteSpec:
    return parse_remote(proc.url, model, "lemonade", **kw)


def health(proc: Proc, model: str = "tiny") -> RemoteEntry:
    async def go() -> RemoteEntry:
        async with RemoteClient(lemonade(proc, model)) as c:
            return await c.health()
    return run(go)


@contextlib.contextmanager
def lemonade_shaped(upstream: str) -> Iterator[str]:
    """A real HTTP server in front of ``upstream`` that answers ``load`` the way Lemonade does:
    ``{"status", "model_name", "checkpoint", "recipe"}``, no ``action`` and no ``pid``."""
    http = httpx.Client(base_url=upstream, timeout=60, trust_env=False)

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            size = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(size) if size else None
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() in ("content-type", "authorization")}
            r = http.request(self.command, self.path, content=body, headers=headers)
            out = r.content
            if self.path.endswith("/load") and r.status_code == 200:
                out = json.dumps({k: v for k, v in r.json().items()
                                  if k in ("status", "model_name", "checkpoint", "recipe")}).encode()
            self.send_response(r.status_code)
            self.send_header("content-type", r.headers.get("content-type", "application/json"))
            self.send_header("content-length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _forward

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="lemonade-shaped", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        http.close()


# ------------------------------------------------------------------ parsing (no server)


def test_parse_remote_accepts_both_lemonade_spellings_and_openai() -> None:
    for url in ("http://gpu-box:13305", "http://gpu-box:13305/", "http://gpu-box:13305/api/v1"):
        spec = parse_remote(url, "Qwen3-8B-GGUF", "lemonade")
        assert spec.root == "http://gpu-box:13305"
        assert spec.base_url == "http://gpu-box:13305/api/v1"
    spec = parse_remote("https://vllm-box:8000/v1", "Qwen/Qwen3-8B", "openai", "GPU_BOX_KEY")
    assert spec.base_url == "https://vllm-box:8000/v1"
    assert spec.api_key_env == "GPU_BOX_KEY"


@pytest.mark.parametrize(("args", "says"), [
    (("ftp://box:1", "m"), "must start with http:// or https://"),
    (("box:13305", "m"), "must start with http://"),
    (("http://:13305", "m"), "has no host"),
    (("http://u:pw@box:1", "m"), "must not carry credentials"),
    (("http://box:1?x=1", "m"), "query"),
    (("http://box:notaport", "m"), "is not valid"),
    (("http://box:1", ""), "needs --remote-model"),
    (("http://box:1", None), "needs --remote-model"),
    (("http://box:1", "m", "ollama"), "api must be one of lemonade, openai"),
    (("http://box:1", "m", "openai", "not a name"), "environment variable name"),
])
def test_parse_remote_refuses_with_one_line(args: tuple[Any, ...], says: str) -> None:
    with pytest.raises(InvalidOptions) as info:
        parse_remote(*args)
    assert says in str(info.value) and "\n" not in str(info.value)
    assert "pw" not in str(info.value)


def test_remote_action_compares_against_what_the_remote_reports() -> None:
    ready = RemoteEntry(loaded=True, listed=True, pid=7, ctx_size=2048, llamacpp_args=("--no-warmup",),
                        llamacpp_backend="cpu")
    assert remote_action(None, LoadOptions()) == "load"
    assert remote_action(RemoteEntry(loaded=False), LoadOptions(ctx_size=2048)) == "load"
    assert remote_action(ready, LoadOptions()) == "noop"  # unset options are the remote's to choose
    assert remote_action(ready, LoadOptions(ctx_size=2048)) == "noop"
    assert remote_action(ready, LoadOptions(ctx_size=2048, extra_args=("--no-warmup",),
                                            backend="cpu")) == "noop"
    assert remote_action(ready, LoadOptions(ctx_size=4096)) == "reload"
    assert remote_action(ready, LoadOptions(extra_args=())) == "reload"
    assert remote_action(ready, LoadOptions(backend="vulkan")) == "reload"
    # an option the remote does not report cannot be confirmed: its declarative /load decides
    assert remote_action(RemoteEntry(loaded=True), LoadOptions(ctx_size=2048)) == "reload"


def test_lemonade_load_body_maps_options_and_refuses_what_it_cannot_apply() -> None:
    body = lemonade_load_body("m", LoadOptions(ctx_size=8192, extra_args=("--no-mmap", "-b", "64"),
                                               backend="vulkan"))
    assert body == {"model_name": "m", "ctx_size": 8192, "llamacpp_args": "--no-mmap -b 64",
                    "llamacpp_backend": "vulkan"}
    assert lemonade_load_body("m", LoadOptions()) == {"model_name": "m"}
    for bad, says in ((LoadOptions(threads=2, chat_template="gemma"), "threads, chat_template"),
                      (LoadOptions(backend="llama-server"), "llama.cpp device")):
        with pytest.raises(InvalidOptions, match=says) as info:
            lemonade_load_body("m", bad)
        assert "\n" not in str(info.value)


def _httpx_errors() -> list[type[httpx.HTTPError]]:
    def below(cls: type[httpx.HTTPError]) -> set[type[httpx.HTTPError]]:
        return {cls} | {s for c in cls.__subclasses__() for s in below(c)}
    return sorted(below(httpx.HTTPError), key=lambda c: c.__name__)


@pytest.mark.parametrize("cls", _httpx_errors())
@pytest.mark.parametrize("during", ["call", "load", "inference"])
def test_no_httpx_error_escapes_the_remote_boundary(cls: type[httpx.HTTPError], during: str) -> None:
    """Every httpx failure, in every phase, becomes a one-line LemonError (``MAPPINGS``)."""
    spec = parse_remote("http://box:13305", "m", api_key_env=KEY_ENV)
    request = httpx.Request("GET", "http://box:13305/api/v1/health")
    if issubclass(cls, httpx.HTTPStatusError):
        for status in (401, 403, 400, 404, 500, 503):
            response = httpx.Response(status, json={"error": {"message": "boom\nsecond line"}},
                                      request=request)
            error = remote_error(cls("x", request=request, response=response), spec, during=during)
            assert isinstance(error, LemonError) and "\n" not in error.message
            assert isinstance(error, RemoteAuthError) == (status in (401, 403))
            if during == "load" and status >= 500:
                assert type(error) is LoadError and error.message.endswith(f"HTTP {status}: boom")
        return
    exc = cls("x", request=request) if issubclass(cls, httpx.RequestError) else cls("x")
    error = remote_error(exc, spec, during=during)
    assert isinstance(error, LemonError) and "\n" not in error.message
    if isinstance(exc, httpx.ConnectError):
        assert isinstance(error, RemoteUnreachable)


def test_the_remote_mapping_table_names_every_target() -> None:
    targets = " ".join(target for _, target in MAPPINGS)
    for name in ("RemoteAuthError", "LoadError", "InvalidOptions", "InferenceError", "RemoteError",
                 "RemoteUnreachable", "RequestTimeout"):
        assert name in targets


# ------------------------------------------------------------------ lemonade remote


def test_lemonade_load_noop_reload_third_party_and_unload(lemon: Proc) -> None:
    spec = lemonade(lemon)

    async def go() -> None:
        async with RemoteClient(spec) as c:
            before = await c.health()
            assert not before.loaded and remote_action(before, LoadOptions()) == "load"

            first = await c.load(LoadOptions(ctx_size=2048), before=before)
            assert first.action == "loaded" and isinstance(first.pid, int)
            now = await c.health()
            assert (now.loaded, now.pid, now.ctx_size) == (True, first.pid, 2048)
            assert now.checkpoint and now.checkpoint.endswith("tiny.gguf")

            # same options: the remote's truth says no-op, and a load keeps the pid
            assert remote_action(now, LoadOptions(ctx_size=2048)) == "noop"
            same = await c.load(LoadOptions(ctx_size=2048))
            assert (same.action, same.pid) == ("noop", first.pid)

            # other ctx_size: reload, new pid
            assert remote_action(now, LoadOptions(ctx_size=3072)) == "reload"
            other = await c.load(LoadOptions(ctx_size=3072))
            assert other.action == "reloaded" and other.pid not in (None, first.pid)

            # a third party reloads it behind our back: the next health sees it
            r = httpx.post(f"{lemon.url}/api/v1/load", json={"model_name": "tiny", "ctx_size": 2048},
                           timeout=60, trust_env=False)
            assert r.status_code == 200
            seen = await c.health()
            assert seen.pid not in (None, other.pid) and seen.ctx_size == 2048
            assert remote_action(seen, LoadOptions(ctx_size=3072)) == "reload"
            assert remote_action(seen, LoadOptions(ctx_size=2048)) == "noop"

            # llamacpp_args round-trip as the remote reports them
            args = await c.load(LoadOptions(ctx_size=2048, extra_args=("--no-warmup",)))
            assert args.action == "reloaded"
            entry = await c.health()
            assert entry.llamacpp_args == ("--no-warmup",)
            assert remote_action(entry, LoadOptions(ctx_size=2048, extra_args=("--no-warmup",))) == "noop"

            # inference through the base URL, with the remote's model name
            r = httpx.post(f"{c.base_url}/completions", headers=c.headers(), timeout=60, trust_env=False,
                           json={"model": spec.remote_model, "prompt": "once", "max_tokens": 4})
            assert r.status_code == 200 and r.json()["choices"]

            assert await c.unload() is True
            assert not (await c.health()).loaded
            assert await c.unload() is False  # not loaded: no error, nothing done

    run(go)


def test_lemonade_unknown_model_and_refused_options(lemon: Proc) -> None:
    async def go() -> None:
        async with RemoteClient(lemonade(lemon, "no-such-model")) as c:
            with pytest.raises(ModelNotFound, match=r"'no-such-model'.*known models: .*tiny"):
                await c.load(LoadOptions())
        async with RemoteClient(lemonade(lemon)) as c:
            with pytest.raises(InvalidOptions, match="cannot apply threads"):
                await c.load(LoadOptions(threads=1))
            # the remote refuses a flag (4xx): its message, one line
            with pytest.raises(InvalidOptions, match=r"HTTP 400: .*--log-file") as info:
                await c.load(LoadOptions(extra_args=("--log-file", "x.log")))
            assert "\n" not in str(info.value)

    run(go)


def test_lemonade_5xx_during_load_is_a_load_error_with_the_remote_message(lemon: Proc,
                                                                           lemon_root: Path) -> None:
    bad = write_tiny_llama(lemon_root / "bad.gguf", seed=8)
    Registry(lemon_root / "config" / "models.json").register("bad", bad)
    bad.write_bytes(b"GGUF" + b"\0" * 64)  # the remote finds it broken only when it loads it

    async def go() -> None:
        async with RemoteClient(lemonade(lemon, "bad")) as c:
            with pytest.raises(LoadError, match=r"HTTP 500: Failed to load model.*bad.gguf") as info:
                await c.load(LoadOptions())
            assert "\n" not in info.value.message

    run(go)


def test_lemonade_killed_is_unreachable_quickly_and_recovers(own_lemon: Callable[..., Proc]) -> None:
    proc = own_lemon()
    port = proc.port

    async def load() -> int | None:
        async with RemoteClient(lemonade(proc)) as c:
            return (await c.load(LoadOptions(ctx_size=2048))).pid

    pid = run(load)
    assert pid is not None
    proc.note_children()
    proc.stop(signal.SIGKILL)  # the remote goes away at once (its backend dies with it)

    async def unreachable() -> None:
        async with RemoteClient(lemonade(proc), timeout=2) as c:
            start = time.monotonic()
            with pytest.raises(RemoteUnreachable, match=rf"remote http://127.0.0.1:{port} is unreachable: "
                                                        "cannot connect") as info:
                await c.health()
            assert time.monotonic() - start < 6 and "\n" not in str(info.value)
            with pytest.raises(RemoteUnreachable):
                await c.load(LoadOptions())

    run(unreachable)

    # restarted on the same port: reachable again, nothing loaded (the truth is the remote's)
    again = own_lemon(port=port)
    entry = health(again)
    assert not entry.loaded


def test_a_remote_that_never_answers_is_bounded() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"

        async def go() -> None:
            async with RemoteClient(parse_remote(url, "m"), timeout=1.0) as c:
                start = time.monotonic()
                with pytest.raises(RemoteUnreachable, match="no answer in time"):
                    await c.health()
                assert time.monotonic() - start < 3

        run(go)


def test_a_remote_that_drips_its_answer_is_bounded_in_total() -> None:
    """Each byte comes within the read timeout, the whole answer never does: the call still ends."""
    stop = threading.Event()
    with socket.socket() as drip:
        drip.bind(("127.0.0.1", 0))
        drip.listen(8)

        def serve() -> None:
            conn, _ = drip.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: 1000\r\n\r\n")
                while not stop.wait(0.2):
                    try:
                        conn.sendall(b" ")
                    except OSError:
                        return

        thread = threading.Thread(target=serve, name="drip", daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{drip.getsockname()[1]}"

        async def go() -> None:
            async with RemoteClient(parse_remote(url, "m"), timeout=1.0) as c:
                start = time.monotonic()
                with pytest.raises(RemoteUnreachable, match="no answer in time"):
                    await c.health()
                assert time.monotonic() - start < 2

        try:
            run(go)
        finally:
            stop.set()
            thread.join(5)


def test_load_control_on_an_openai_remote_is_misuse() -> None:
    async def go() -> None:
        async with RemoteClient(parse_remote("http://127.0.0.1:9/v1", "m", "openai")) as c:
            for call in (c.load(LoadOptions()), c.unload()):
                with pytest.raises(RuntimeError, match="needs a lemonade remote"):
                    await call

    run(go)


def test_tls_to_a_plain_http_server_is_one_line(lemon: Proc) -> None:
    async def go() -> None:
        async with RemoteClient(parse_remote(lemon.url.replace("http:", "https:"), "tiny")) as c:
            with pytest.raises(RemoteUnreachable, match="TLS failed") as info:
                await c.health()
            assert "\n" not in str(info.value)

    run(go)


def test_api_key_from_the_named_variable_only(own_lemon: Callable[..., Proc],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    proc = own_lemon(api_key=SECRET)
    monkeypatch.delenv(KEY_ENV, raising=False)
    spec = lemonade(proc, api_key_env=KEY_ENV)
    seen: list[str] = [repr(spec), str(spec)]

    async def go() -> None:
        async with RemoteClient(spec) as c:
            seen.append(repr(c))
            with pytest.raises(RemoteAuthError, match=rf"HTTP 401\): set \${KEY_ENV} to its API key") as a:
                await c.health()
            seen.append(a.value.render())
            async with RemoteClient(lemonade(proc)) as anonymous:
                with pytest.raises(RemoteAuthError, match="--api-key-env NAME") as b:
                    await anonymous.health()
                seen.append(b.value.render())

            monkeypatch.setenv(KEY_ENV, "wrong-key")
            with pytest.raises(RemoteAuthError, match=rf"the key in \${KEY_ENV} was refused") as w:
                await c.health()
            seen.append(w.value.render())

            monkeypatch.setenv(KEY_ENV, SECRET)  # read at call time: no new client needed
            entry = await c.health()
            loaded = await c.load(LoadOptions(ctx_size=2048))
            seen.extend([repr(entry), repr(loaded), repr(c), repr(spec), repr(await c.health())])
            assert loaded.action == "loaded"
            r = httpx.post(f"{c.base_url}/completions", headers=c.headers(), timeout=60, trust_env=False,
                           json={"model": "tiny", "prompt": "once", "max_tokens": 2})
            assert r.status_code == 200

    run(go)
    assert not any(SECRET in text for text in seen), seen


def test_lemonade_without_action_in_its_answer_is_told_by_pids(lemon: Proc) -> None:
    """Lemonade's /load answers the same body for load, no-op and reload: pids tell them apart."""
    with lemonade_shaped(lemon.url) as url:
        async def go() -> None:
            async with RemoteClient(parse_remote(url, "tiny")) as c:
                await c.unload()
                first = await c.load(LoadOptions(ctx_size=2048))
                assert "action" not in first.response and "pid" not in first.response
                assert first.action == "loaded" and first.pid == (await c.health()).pid
                same = await c.load(LoadOptions(ctx_size=2048))
                assert (same.action, same.pid) == ("noop", first.pid)
                other = await c.load(LoadOptions(ctx_size=3072))
                assert other.action == "reloaded" and other.pid not in (None, first.pid)
                assert await c.unload() is True

        run(go)


def test_a_server_that_is_not_lemonade_says_so(llama_router: Proc, lemon: Proc) -> None:
    async def go() -> None:
        async with RemoteClient(parse_remote(llama_router.url, "tiny", "lemonade")) as c:
            with pytest.raises(RemoteError, match=r"not a Lemonade server\? \(register it with --api openai"):
                await c.health()
        # and a lemonade server is an openai remote too (without load control)
        async with RemoteClient(parse_remote(f"{lemon.url}/api/v1", "tiny", "openai")) as c:
            assert "tiny" in await c.models()
            assert (await c.check_loadable(LoadOptions())).listed
            assert await c.props() is None  # no /props there: tolerated

    run(go)


# ------------------------------------------------------------------ openai remote: llama.cpp router mode


def test_router_mode_lists_checks_and_refuses_options(llama_router: Proc) -> None:
    spec = parse_remote(f"{llama_router.url}/v1", "tiny", "openai")

    async def go() -> None:
        async with RemoteClient(spec) as c:
            assert "tiny" in await c.models()
            entry = await c.check_loadable(LoadOptions())
            assert entry.listed and entry.status in ("unloaded", "loaded", "loading")
            props = await c.props()
            assert props is not None and props.get("role") == "router"
            for options, names in ((LoadOptions(ctx_size=2048), "ctx_size"),
                                   (LoadOptions(threads=2, extra_args=("--no-mmap",), chat_template="gemma",
                                                backend="cpu"),
                                    "threads, extra_args, chat_template, backend")):
                with pytest.raises(InvalidOptions, match=f"cannot apply {names} ") as info:
                    await c.check_loadable(options)
                assert "\n" not in str(info.value) and "no load control" in str(info.value)
        async with RemoteClient(parse_remote(spec.url, "nope", "openai")) as c:
            with pytest.raises(ModelNotFound, match=r"'nope'.*known models: tiny") as nf:
                await c.check_loadable(LoadOptions())
            assert "\n" not in str(nf.value)

    run(go)


def test_router_mode_inference_plain_streamed_and_unknown_model(llama_router: Proc) -> None:
    spec = parse_remote(f"{llama_router.url}/v1", "tiny", "openai")
    body = {"model": spec.remote_model, "prompt": "once upon", "max_tokens": 8}
    with httpx.Client(base_url=spec.base_url, headers=spec.headers(), timeout=60, trust_env=False) as http:
        r = http.post("/completions", json=body)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0

        with http.stream("POST", "/completions", json={**body, "stream": True}) as s:
            assert s.status_code == 200
            data = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert chunks and any(c["choices"] and c["choices"][0].get("text") for c in chunks)

        r = http.post("/completions", json={**body, "model": "nope"})
        with pytest.raises(httpx.HTTPStatusError) as info:
            r.raise_for_status()
        err = remote_error(info.value, parse_remote(spec.url, "nope", "openai"), during="inference")
        assert isinstance(err, InferenceError) and err.status == 400
        assert "model 'nope' not found" in err.message and "\n" not in err.message

    async def entry() -> RemoteEntry:
        async with RemoteClient(spec) as c:
            return await c.health()

    assert run(entry).loaded  # the router autoloaded it for the request


def test_router_mode_killed_mid_stream_is_a_clear_error(models_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "models"
    d.mkdir()
    shutil.copy(models_dir / "tiny.gguf", d / "tiny.gguf")
    proc = start_llama_router(d, tmp_path / "router.log")
    try:
        spec = parse_remote(f"{proc.url}/v1", "tiny", "openai")
        body = {"model": "tiny", "prompt": "once", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60, trust_env=False) as http, \
                http.stream("POST", f"{spec.base_url}/completions", json=body) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            proc.note_children()
            os.kill(proc.popen.pid, signal.SIGKILL)
            with pytest.raises(httpx.HTTPError) as info:
                for _ in lines:
                    pass
        err = remote_error(info.value, spec, during="inference")
        assert isinstance(err, InferenceError)
        assert err.message.startswith(f"remote {spec.url} cut the response off mid-way")
        assert "\n" not in err.message

        async def gone() -> None:
            async with RemoteClient(spec, timeout=2) as c:
                with pytest.raises(RemoteUnreachable, match="cannot connect"):
                    await c.models()

        run(gone)
    finally:
        proc.stop(signal.SIGKILL)
