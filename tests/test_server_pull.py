"""Pulls over HTTP (issue 10): Lemonade's POST pull (and its SSE progress), POST delete,
GET pull/variants, models?show_all, and loading a checkpoint by name, over real sockets."""

from __future__ import annotations

import json

import openai
import pytest

from lemon_magic._hubcatalog import load_catalog
from tests.hubstub import HubStub, hub, tiny_gguf
from tests.serving import CHAT, Served

__all__ = ("hub",)  # the fixture, imported for the tests below

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("forget_registrations")]

REPO = "lemon/tiny-GGUF"
FILES = {"tiny-Q4_K_M.gguf": tiny_gguf(1), "tiny-Q8_0.gguf": tiny_gguf(2)}




def _events(text: str) -> list[tuple[str, dict[str, object]]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_pull_registers_a_user_model_and_delete_removes_it(hub: HubStub, served: Served) -> None:
    hub.add_repo(REPO, FILES)
    r = served.http.post("/pull", json={"model_name": "user.small", "checkpoint": f"{REPO}:Q8_0"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "success" and r.json()["registered_as"] == "small"
    model = served.http.get("/models/user.small").json()
    assert model["downloaded"] is True and model["id"] == "small"
    again = served.http.post("/pull", json={"model_name": "user.small"}).json()
    assert again["downloaded"] == 0  # in the cache: nothing transferred
    assert len(hub.gets(REPO, "tiny-Q8_0.gguf")) == 1
    gone = served.http.post("/delete", json={"model_name": "user.small"})
    assert gone.status_code == 200 and gone.json()["message"] == "Deleted model: user.small"
    assert gone.json()["freed_bytes"] == len(FILES["tiny-Q8_0.gguf"])
    assert served.http.post("/delete", json={"model_name": "user.small"}).status_code == 422
    assert served.http.post("/delete", content=b"").status_code == 400


def test_a_streamed_pull_sends_progress_then_complete(hub: HubStub, served: Served,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 8192)
    hub.add_repo(REPO, FILES)
    hub.throttle = 60_000
    r = served.http.post("/pull", json={"model_name": REPO, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    kinds = [e for e, _ in events]
    assert kinds[-1] == "complete" and kinds.count("progress") >= 2 and set(kinds) == {"progress", "complete"}
    percents = [d["percent"] for e, d in events if e == "progress"]
    assert percents == sorted(percents) and events[-1][1]["checkpoint"] == f"{REPO}:Q4_K_M"
    failed = _events(served.http.post("/pull", json={"model_name": "lemon/nope-GGUF", "stream": True}).text)
    assert failed == [("error", {"error": failed[0][1]["error"]})] and "no repo" in str(failed[0][1]["error"])


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"model_name": "lemon/nope-GGUF"}, 400, "no repo lemon/nope-GGUF"),
    ({"model_name": f"{REPO}:Q2_K"}, 400, "variants: Q4_K_M, Q8_0"),
    ({"model_name": "user.x", "checkpoint": "not a checkpoint"}, 400, "does not name a Hub repo"),
    ({"model_name": "no-such-model"}, 404, "a catalogue model or a checkpoint"),
    ({"checkpoint": REPO}, 400, "'model_name' is required"),
    ({"model_name": REPO, "stream": "yes"}, 400, "'stream' must be a boolean"),
])
def test_bad_pulls_get_one_line_and_register_nothing(hub: HubStub, served: Served,
                                                     body: dict[str, object], status: int, says: str) -> None:
    hub.add_repo(REPO, FILES)
    before = served.router.model_names()
    r = served.http.post("/pull", json=body)
    assert r.status_code == status and says in r.text and "\\n" not in r.text
    assert served.router.model_names() == before and served.router.spawn_count == 0


def test_a_checkpoint_loads_and_infers_by_name_over_http(hub: HubStub, served: Served) -> None:
    hub.add_repo(REPO, FILES)
    r = served.http.post("/load", json={"model_name": REPO, "ctx_size": 512})
    assert r.status_code == 200 and r.json()["action"] == "loaded"
    client = served.openai()
    chat = client.chat.completions.create(model=f"{REPO}:Q8_0", messages=CHAT, max_tokens=3)  # type: ignore[arg-type]
    assert chat.model == f"{REPO}:Q8_0" and chat.usage is not None and chat.usage.completion_tokens > 0
    assert len(hub.gets(REPO, "tiny-Q8_0.gguf")) == 1 and served.router.spawn_count == 2
    with pytest.raises(openai.BadRequestError, match="no repo lemon/nope-GGUF"):
        client.completions.create(model="lemon/nope-GGUF", prompt="x", max_tokens=2)


def test_show_all_lists_the_catalogue_and_variants_lists_a_repo(hub: HubStub, served: Served) -> None:
    hub.add_repo(REPO, FILES)
    listed = {m["id"]: m for m in served.http.get("/models", params={"show_all": "true"}).json()["data"]}
    assert set(load_catalog()) <= set(listed)
    entry = listed["Qwen3-0.6B-GGUF"]
    assert entry["downloaded"] is False and entry["source"] == "catalog" and entry["size"] > 0
    assert "Qwen3-0.6B-GGUF" not in {m["id"] for m in served.http.get("/models").json()["data"]}
    variants = served.http.get("/pull/variants", params={"checkpoint": REPO}).json()
    assert variants["variants"] == ["Q4_K_M", "Q8_0"] and variants["suggested_name"] == "tiny-GGUF"
    assert served.http.get("/pull/variants").status_code == 400
    assert served.http.get("/pull/variants", params={"checkpoint": "lemon/nope-GGUF"}).status_code == 404
