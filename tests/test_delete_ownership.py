"""``delete`` removes only what a pull of ours downloaded (issue 21, 9): a file another tool put in
the Hugging Face cache stays, and the Python result, the magic and the HTTP answer say what was
kept and why; against the local Hub stand-in, with the real huggingface_hub."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
from IPython.core.interactiveshell import InteractiveShell

from lemon_magic import Router
from tests.hubstub import HubStub, hub, split_gguf, tiny_gguf
from tests.serving import Served

__all__ = ("hub",)  # the fixture, imported for the tests below

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("forget_registrations")]

REPO = "lemon/tiny-GGUF"
FILES = {"tiny-Q4_K_M.gguf": tiny_gguf(1), "tiny-Q8_0.gguf": tiny_gguf(2)}
CHECKPOINT = f"{REPO}:Q4_K_M"
NOT_OURS = "lemon_magic did not download"


def _put_by_another_tool(repo: str, name: str) -> str:
    """What ``hf download`` or transformers would do: the file lands in the shared cache."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, name)


def _blob_exists(link: str) -> bool:
    return os.path.isfile(os.path.realpath(link))


def test_a_file_another_tool_downloaded_stays_and_the_result_says_why(
        hub: HubStub, make_router: Callable[..., Router]) -> None:
    hub.add_repo(REPO, FILES)
    theirs = _put_by_another_tool(REPO, "tiny-Q4_K_M.gguf")
    router = make_router()
    pulled = router.pull(CHECKPOINT, name="mine")
    assert pulled.downloaded == 0 and not hub.gets(REPO, "tiny-Q4_K_M.gguf")[1:]
    result = router.delete("mine")
    assert result.freed == 0 and result.kept == (theirs,)
    assert NOT_OURS in result.kept_why and "mine" not in router.model_names()
    assert os.path.exists(theirs) and _blob_exists(theirs)


def test_the_magic_says_what_it_kept_and_why(ip: InteractiveShell, hub: HubStub,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    hub.add_repo(REPO, FILES)
    theirs = _put_by_another_tool(REPO, "tiny-Q4_K_M.gguf")
    assert ip.run_cell(f"%lemon_pull {CHECKPOINT} --name mine").error_in_exec is None
    capsys.readouterr()
    assert ip.run_cell("%lemon_delete mine").error_in_exec is None
    out = capsys.readouterr().out
    assert out.startswith("deleted mine (") and "kept 1 file in the Hugging Face cache" in out
    assert NOT_OURS in out and "removed" not in out
    assert os.path.exists(theirs)


def test_the_http_answer_says_what_it_kept_and_why(hub: HubStub, served: Served) -> None:
    hub.add_repo(REPO, FILES)
    theirs = _put_by_another_tool(REPO, "tiny-Q8_0.gguf")
    r = served.http.post("/pull", json={"model_name": "user.mine", "checkpoint": f"{REPO}:Q8_0"})
    assert r.status_code == 200 and r.json()["downloaded"] == 0, r.text
    gone = served.http.post("/delete", json={"model_name": "user.mine"})
    assert gone.status_code == 200, gone.text
    body = gone.json()
    assert body["freed_bytes"] == 0 and body["kept"] == [theirs] and body["kept_for"] == []
    assert NOT_OURS in body["kept_reason"]
    assert os.path.exists(theirs)


def test_a_file_we_downloaded_is_removed_and_its_bytes_reported(
        hub: HubStub, served: Served) -> None:
    hub.add_repo(REPO, FILES)
    router = served.router
    pulled = router.pull(CHECKPOINT, name="mine")
    assert pulled.downloaded == len(FILES["tiny-Q4_K_M.gguf"])
    router.pull("mine")  # pulled again: 0 bytes, and the file is still ours
    result = router.delete("mine")
    assert result.freed == len(FILES["tiny-Q4_K_M.gguf"]) and result.kept == () and not result.kept_why
    assert not os.path.lexists(pulled.path)
    served.http.post("/pull", json={"model_name": "user.again", "checkpoint": CHECKPOINT})
    body = served.http.post("/delete", json={"model_name": "user.again"}).json()
    assert body["freed_bytes"] == len(FILES["tiny-Q4_K_M.gguf"])
    assert body["kept"] == [] and body["kept_for"] == [] and body["kept_reason"] == ""


def test_a_split_model_keeps_only_the_part_that_was_cached_before(
        hub: HubStub, make_router: Callable[..., Router]) -> None:
    parts = split_gguf(4)
    names = [f"tiny-Q8_0-{i:05d}-of-{len(parts):05d}.gguf" for i in range(1, len(parts) + 1)]
    hub.add_repo("lemon/split-GGUF", dict(zip(names, parts, strict=True)))
    theirs = _put_by_another_tool("lemon/split-GGUF", names[1])
    router = make_router()
    pulled = router.pull("lemon/split-GGUF:Q8_0", name="split")
    ours = sum(len(p) for i, p in enumerate(parts) if i != 1)
    assert pulled.downloaded == ours
    result = router.delete("split")
    assert result.freed == ours and result.kept == (theirs,) and NOT_OURS in result.kept_why
    assert os.path.exists(theirs) and _blob_exists(theirs)
    snapshot = os.path.dirname(theirs)
    assert sorted(os.listdir(snapshot)) == [names[1]]


def test_an_entry_written_before_ownership_was_recorded_keeps_its_files(
        hub: HubStub, make_router: Callable[..., Router], capsys: pytest.CaptureFixture[str]) -> None:
    hub.add_repo(REPO, FILES)
    router = make_router()
    pulled = router.pull(CHECKPOINT, name="old")
    registry = router.async_router.registry
    data = json.loads(registry.path.read_text())
    entry = data["old"]
    assert set(entry) - {"downloaded"} == {"path", "checkpoint", "kind", "defaults", "description"}
    data["old"] = {k: v for k, v in entry.items() if k != "downloaded"}  # the format before
    registry.path.write_text(json.dumps(data))
    assert router.load("old", ctx_size=256).action == "loaded"  # an old entry still works
    result = router.delete("old")
    assert result.freed == 0 and result.kept == (pulled.path,)
    assert "registered before" in result.kept_why and "hf cache" in result.kept_why
    assert os.path.exists(pulled.path) and "old" not in router.model_names()


def test_files_kept_for_another_registration_go_with_the_last_one(
        hub: HubStub, make_router: Callable[..., Router]) -> None:
    repo = hub.add_repo(REPO, FILES)
    router = make_router()
    a = router.pull(CHECKPOINT, name="a")
    repo.put("tiny-Q4_K_M.gguf", tiny_gguf(9))  # a new commit on the Hub
    b = router.pull(CHECKPOINT, name="b")
    first = router.delete("a")
    assert first.freed == 0 and first.kept_for == ("b",)
    assert "b was pulled from the same repo" in first.kept_why
    last = router.delete("b")  # it inherited what "a" downloaded
    assert last.freed == len(tiny_gguf(1)) + len(tiny_gguf(9)) and last.kept == ()
    assert not os.path.lexists(a.path) and not os.path.lexists(b.path)


def test_a_name_pulled_again_from_another_repo_keeps_files_another_name_uses(
        hub: HubStub, make_router: Callable[..., Router]) -> None:
    """x pulls r1 (ours), y pulls r1 too (cached), x is pulled again from r2: x owns files in
    both repos, and deleting x must not take y's file from r1 (found by review)."""
    hub.add_repo(REPO, FILES)
    hub.add_repo("lemon/other-GGUF", {"other-Q4_K_M.gguf": tiny_gguf(5)})
    router = make_router()
    first = router.pull(CHECKPOINT, name="x")
    y = router.pull(CHECKPOINT, name="y")
    assert y.path == first.path
    router.pull("lemon/other-GGUF:Q4_K_M", name="x")
    gone = router.delete("x")
    assert gone.kept_for == ("y",)
    assert os.path.lexists(y.path) and _blob_exists(y.path)
    assert router.load("y", ctx_size=256).action == "loaded"
