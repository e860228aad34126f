"""What the magics say in the cases a newcomer meets (issue 20): deleting a model whose files
another registration uses, or the built-in one; the log of a model that does not exist; serving
twice; a load that evicts another model; argument mistakes; and an openai remote's context size
when the remote is ``lemon-magic serve``."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from lemon_magic import InvalidOptions, Router, get_router
from lemon_magic._remote import entry_from_models
from tests.hubstub import HubStub, hub, tiny_gguf
from tests.serving import Served

__all__ = ("hub",)  # the fixture, imported for the tests below

REPO = "lemon/tiny-GGUF"
FILES = {"tiny-Q4_K_M.gguf": tiny_gguf(1), "tiny-Q8_0.gguf": tiny_gguf(2)}


def _error(ip: InteractiveShell, cell: str) -> BaseException:
    result = ip.run_cell(cell)
    assert result.error_in_exec is not None, f"{cell!r} did not fail"
    return result.error_in_exec


@pytest.mark.real
@pytest.mark.usefixtures("forget_registrations")
def test_deleting_one_of_two_pulls_of_a_repo_says_it_keeps_the_files_and_why(
        ip: InteractiveShell, hub: HubStub, capsys: pytest.CaptureFixture[str]) -> None:
    hub.add_repo(REPO, FILES)
    assert ip.run_cell(f"%lemon_pull {REPO}:Q4_K_M --name tiny-small").error_in_exec is None
    assert ip.run_cell(f"%lemon_pull {REPO}:Q8_0 --name tiny-big").error_in_exec is None
    capsys.readouterr()
    assert ip.run_cell("%lemon_delete tiny-small").error_in_exec is None
    out = capsys.readouterr().out
    assert out.startswith("deleted tiny-small") and "kept" in out and "tiny-big" in out, out
    result = get_router().delete("tiny-big")  # the last one: its files go
    assert result.freed > 0 and result.kept_for == ()


def test_deleting_the_built_in_model_says_it_cannot_be(ip: InteractiveShell) -> None:
    exc = _error(ip, "%lemon_delete gemma3-270m")
    assert isinstance(exc, InvalidOptions) and "built in" in str(exc) and "cannot be deleted" in str(exc)
    assert "unknown model" not in str(exc)
    exc = _error(ip, "%lemon_unregister gemma3-270m")
    assert "built in" in str(exc)


def test_the_log_of_a_model_that_does_not_exist_says_unknown_model(ip: InteractiveShell) -> None:
    exc = _error(ip, "%lemon_logs nosuch")
    assert "unknown model 'nosuch'" in str(exc), exc
    exc = _error(ip, "%lemon_logs gemma3-270m")  # it exists, but never ran here
    assert "not loaded" in str(exc), exc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_lemon_serve_is_declarative_and_says_when_it_moves(
        ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_line_magic("lemon_serve", "--port 0")
    url = get_router().base_url
    assert url is not None and capsys.readouterr().out.startswith(f"serving {url}")
    for line in ("", "--port 0", f"--port {url.split(':')[2].split('/')[0]}"):  # the same address
        ip.run_line_magic("lemon_serve", line)
        out = capsys.readouterr().out
        assert out.startswith(f"already serving {url}") and "no change" in out, (line, out)
        assert get_router().base_url == url
    port = _free_port()
    ip.run_line_magic("lemon_serve", f"--port {port}")
    moved = get_router().base_url
    assert moved is not None and moved != url and f":{port}/" in moved
    out = capsys.readouterr().out
    assert out.startswith(f"moved serving from {url} to {moved}"), out
    assert httpx.get(moved + "/health", trust_env=False).json()["status"] == "ok"
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", trust_env=False, timeout=2)
    ip.run_line_magic("lemon_serve", "--stop")


def test_lemon_serve_to_a_busy_port_keeps_serving_where_it_was(
        ip: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    """Moving to a port that is taken: one line that says why, and the old URL still answers."""
    ip.run_line_magic("lemon_serve", "--port 0")
    url = get_router().base_url
    assert url is not None
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        capsys.readouterr()
        exc = _error(ip, f"%lemon_serve --port {port}")
        assert isinstance(exc, UsageError), repr(exc)
        message = str(exc)
        assert "\n" not in message and f"127.0.0.1:{port}" in message, message
        assert "in use" in message and f"still serving {url}" in message, message
    assert get_router().base_url == url
    assert httpx.get(url + "/health", trust_env=False, timeout=5).json()["status"] == "ok"
    ip.run_line_magic("lemon_serve", "--stop")


def test_lemon_serve_moves_a_keyed_server_with_its_key(ip: InteractiveShell) -> None:
    """A server that requires an API key still requires it on the port it moves to."""
    url = get_router().serve("127.0.0.1", 0, api_key="s3cret", allowed_origins=["http://nb.test"])
    port = _free_port()
    ip.run_line_magic("lemon_serve", f"--port {port}")
    moved = get_router().base_url
    assert moved is not None and moved != url and f":{port}/" in moved
    assert httpx.get(moved + "/models", trust_env=False, timeout=5).status_code == 401
    keyed = httpx.get(moved + "/models", trust_env=False, timeout=5,
                      headers={"Authorization": "Bearer s3cret", "Origin": "http://nb.test"})
    assert keyed.status_code == 200, keyed.text
    ip.run_line_magic("lemon_serve", "--stop")


@pytest.mark.real
def test_a_load_that_evicts_another_model_says_so(ip: InteractiveShell, tiny_model: str,
                                                  tiny_model_b: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    ip.run_line_magic("lemon_load", f"{tiny_model} --ctx-size 256")
    first = next(s.pid for s in get_router().status() if s.name == tiny_model)
    assert "evicted" not in capsys.readouterr().out
    ip.run_line_magic("lemon_load", f"{tiny_model_b} --ctx-size 256")
    out = capsys.readouterr().out
    assert f"evicted {tiny_model} (pid {first}) to make room" in out, out
    result = get_router().load(tiny_model, ctx_size=256)
    assert list(result.evicted) == [tiny_model_b] and result.evicted[tiny_model_b]


@pytest.mark.parametrize("line", ["--ctx-size abc", "--backend nosuch", "--threads 0",
                                  "--ctx-size -5", '--extra-args="--port 1"'])
def test_load_argument_mistakes_are_usage_errors(ip: InteractiveShell, line: str) -> None:
    exc = _error(ip, f"%lemon_load gemma3-270m {line}")
    assert isinstance(exc, UsageError), repr(exc)
    assert get_router().status() == []  # nothing started


@pytest.mark.parametrize("line", ["--ctx-size abc", "--temperature -1", "--temperature nan",
                                  "--max-tokens 0"])
def test_infer_argument_mistakes_are_usage_errors(ip: InteractiveShell, line: str) -> None:
    exc = _error(ip, f"%%lemon_infer {line}\nonce upon a time")
    assert isinstance(exc, UsageError), repr(exc)
    assert get_router().status() == []


def test_a_negative_temperature_is_refused_by_the_python_api(make_router: Callable[..., Router]) -> None:
    router = make_router()
    with pytest.raises(InvalidOptions, match="temperature"):
        router.complete("gemma3-270m", "hi", temperature=-1)
    with pytest.raises(InvalidOptions, match="temperature"):
        router.chat("gemma3-270m", [{"role": "user", "content": "hi"}], temperature=float("inf"))
    assert router.status() == []


def test_an_openai_listing_with_context_length_gives_the_context_size() -> None:
    entry = entry_from_models({"tiny": {"id": "tiny", "context_length": 2048}}, "tiny")
    assert entry.ctx_size == 2048 and entry.recipe_options["ctx_size"] == 2048


@pytest.mark.real
def test_an_openai_remote_pointed_at_lemon_magic_serve_shows_its_context_size(
        served: Served, make_router: Callable[..., Router]) -> None:
    assert served.http.post("/load", json={"model_name": "tiny", "ctx_size": 384}).status_code == 200
    client = make_router()
    client.register_remote("far-tiny", served.url, "tiny", api="openai")
    try:
        loaded = client.load("far-tiny")
        assert loaded.options.ctx_size == 384
        row = next(s for s in client.status() if s.name == "far-tiny")
        assert row.remote is not None and row.remote.options.get("ctx_size") == 384
    finally:
        client.unregister("far-tiny")


LOAD_EXT_PROBE = """
import sys
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
before = set(sys.modules)
ip.run_line_magic("load_ext", "lemon_magic")
print(" ".join(sorted(set(sys.modules) - before)))
"""


def test_load_ext_imports_what_the_magics_need_only_when_they_first_run(tmp_path: Path) -> None:
    """``%load_ext`` stays cheap (bench/bench_magics.py measures it: ≤ 100 ms, ≤ 15 MiB over a
    bare shell): the router, its HTTP client and the renderers load with the first magic."""
    out = subprocess.run([sys.executable, "-c", LOAD_EXT_PROBE], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    heavy = {"httpx", "anyio", "psutil", "lemon_magic.runtime", "lemon_magic.router",
             "lemon_magic.registry", "lemon_magic._render", "lemon_magic._hub", "ipywidgets"}
    assert not heavy & set(out), sorted(heavy & set(out))
    assert "lemon_magic.magics" in out


def test_the_magics_default_model_is_the_built_in_one() -> None:
    from lemon_magic.magics import LemonMagics
    from lemon_magic.registry import DEFAULT_MODEL

    assert LemonMagics.class_traits()["default_model"].default_value == DEFAULT_MODEL
