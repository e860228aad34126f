"""The remote client against real servers on 127.0.0.1 (``tests/remotes.py``): ``lemon-magic serve``
as a ``lemonade`` remote, and llama.cpp's router mode as an ``openai`` remote."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from lemon_magic._remote import RemoteEntry, parse_remote, remote_action
from lemon_magic._remote_client import RemoteClient, remote_error
from lemon_magic.errors import (
    InferenceError,
    InvalidOptions,
    LoadError,
    ModelNotFound,
    RemoteAuthError,
    RemoteError,
    RemoteUnreachable,
)
from lemon_magic.options import LoadOptions
from lemon_magic.registry import Registry
from tests.remotes import (
    KEY_ENV,
    SECRET,
    Proc,
    health,
    lemon,
    lemon_root,
    lemonade,
    lemonade_shaped,
    llama_router,
    models_dir,
    own_lemon,
    run,
    start_llama_router,
)
from tests.tinygguf import write_tiny_llama

__all__ = ("lemon", "lemon_root", "llama_router", "models_dir", "own_lemon")  # fixtures


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
