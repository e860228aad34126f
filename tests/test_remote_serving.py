"""Remote models behind our own HTTP server: one stable URL for any client (the ``openai``
package over a real socket), the same contract, for every kind of model. The remote is a real
``lemon-magic serve`` process (``tests/remotes.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from lemon_magic import Router, RouterConfig
from lemon_magic.registry import Registry
from tests.remotes import Proc, free_port, health, lemon, lemon_root, unload_remote
from tests.tinygguf import write_tiny_llama

__all__ = ("lemon", "lemon_root")  # fixtures

pytestmark = pytest.mark.usefixtures("forget_registrations")


@pytest.fixture
def rr(make_router: Callable[..., Router]) -> Router:
    return make_router(RouterConfig(start_timeout=60, drain_timeout=5, stop_grace=3))


def test_a_remote_model_served_over_http_by_name(lemon: Proc, rr: Router) -> None:
    """Our own server in front of a remote model: one stable URL, the same contract."""
    unload_remote(lemon)
    rr.register_remote("big", lemon.url, "tiny")
    base = rr.serve(port=free_port())
    with httpx.Client(base_url=base, timeout=60, trust_env=False) as http:
        first = http.post("/load", json={"model_name": "big", "ctx_size": 256})
        assert first.status_code == 200, first.text
        assert http.post("/load", json={"model_name": "big", "ctx_size": 256}).json()["action"] == "noop"
        loaded = http.get("/health").json()["all_models_loaded"]
        assert [m["model_name"] for m in loaded] == ["big"]
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    done = client.completions.create(model="big", prompt="once", max_tokens=3)
    assert done.model == "big" and done.choices[0].text is not None
    chunks = list(client.chat.completions.create(model="big", max_tokens=3, stream=True,
                                                 messages=[{"role": "user", "content": "hi"}]))
    assert chunks and health(lemon).ctx_size == 256


def test_a_remote_embedding_model_keeps_its_kind(lemon: Proc, lemon_root: Path, rr: Router) -> None:
    """``--kind`` keeps its meaning for a remote: embeddings go to the remote's embeddings route;
    an LLM route refuses it before anything loads."""
    emb = write_tiny_llama(lemon_root / "emb.gguf", seed=11, mean_pooling=True)
    Registry(lemon_root / "config" / "models.json").register("emb", emb, kind="embedding")
    rr.register_remote("vectors", lemon.url, "emb", kind="embedding")
    base = rr.serve(port=free_port())
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    out = client.embeddings.create(model="vectors", input=["hello", "world"])
    assert len(out.data) == 2 and len(out.data[0].embedding) > 0
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        client.completions.create(model="vectors", prompt="x", max_tokens=1)
    assert health(lemon, "emb").loaded


def test_a_remote_that_fails_is_a_bad_gateway_in_one_line(rr: Router) -> None:
    """Over HTTP, a remote model's server failing is 502 (not the client's fault, not ours)."""
    gone = f"http://127.0.0.1:{free_port()}"
    rr.register_remote("gone", gone, "m")
    base = rr.serve(port=free_port())
    with httpx.Client(base_url=base, timeout=60, trust_env=False) as http:
        for path, body in (("/load", {"model_name": "gone"}),
                           ("/completions", {"model": "gone", "prompt": "x", "max_tokens": 1})):
            r = http.post(path, json=body)
            assert r.status_code == 502, r.text
            error = r.json()["error"]
            assert error["type"] == "remote_unreachable" and gone in error["message"]
            assert "\n" not in error["message"]
        assert http.get("/health").status_code == 200
