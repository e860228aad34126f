"""Pulls from the Hugging Face Hub (issue 10): the real ``huggingface_hub`` against a local stand-in.

Every test here goes over real sockets to ``tests/hubstub.py``; nothing in the
client is mocked (apart from free space, and the chunk size where a test needs a
transfer of several chunks).
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from lemon_magic import (
    ChecksumMismatch,
    DiskFull,
    HubUnreachable,
    NotGGUF,
    PullCancelled,
    PullError,
    RepoAccessDenied,
    RepoNotFound,
    Router,
    VariantNotFound,
    _hub,
)
from lemon_magic._hub import (
    PullProgress,
    downloaded_checkpoints,
    find_local,
    pull,
    remote_variants,
    remove_local,
)
from lemon_magic._hubfiles import Checkpoint
from tests.hubstub import HubStub, hub, split_gguf, tiny_gguf

__all__ = ("hub",)  # the fixture: imported, so that ruff sees it used (F401) and not redefined (F811)

REPO = "lemon/tiny-GGUF"
FILES = {"tiny-Q8_0.gguf": tiny_gguf(2), "tiny-Q4_K_M.gguf": tiny_gguf(1), "README.md": b"# tiny\n"}


def _cache_files(root: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file() or p.is_symlink())


# -- pulls ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cdn", [True, False], ids=["lfs-via-cdn-redirect", "lfs-from-resolve"])
def test_a_pull_downloads_once_then_hits_the_cache_and_works_offline(
        hub: HubStub, monkeypatch: pytest.MonkeyPatch, cdn: bool) -> None:
    hub.cdn = cdn
    hub.add_repo(REPO, FILES)
    seen: list[PullProgress] = []
    got = pull(REPO, progress=seen.append)  # no variant: Q4_K_M first
    assert (got.checkpoint, got.variant) == (f"{REPO}:Q4_K_M", "Q4_K_M")
    assert got.downloaded == len(FILES["tiny-Q4_K_M.gguf"])
    assert Path(got.path).read_bytes() == FILES["tiny-Q4_K_M.gguf"]
    assert got.path.startswith(os.environ["HF_HUB_CACHE"]) and got.files == (got.path,) and got.mmproj is None
    assert seen[-1].finished and seen[-1].done == seen[-1].total == got.size and seen[-1].fraction == 1.0
    assert len(hub.gets(REPO, "tiny-Q4_K_M.gguf")) == 1 and hub.gets(REPO, "tiny-Q8_0.gguf") == []
    # again: the listing is asked, the file is not
    asked = len(hub.requests)
    again = pull(f"{REPO}:Q4_K_M")
    assert again.path == got.path and again.downloaded == 0
    assert [r.path for r in hub.requests[asked:]] == [f"/api/models/{REPO}/revision/main"]
    assert find_local(REPO) == again and find_local(f"{REPO}:Q8_0") is None
    assert downloaded_checkpoints() == (f"{REPO}:Q4_K_M",)
    # offline: from the cache without a request; what is not there is refused, naming what is
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = len(hub.requests)
    assert pull(REPO) == again and len(hub.requests) == asked
    with pytest.raises(HubUnreachable, match=rf"offline mode.*downloaded: {REPO}:Q4_K_M\)"):
        pull(f"{REPO}:Q8_0")


def test_settings_are_read_at_each_pull_not_at_import(hub: HubStub, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """huggingface_hub fixed HF_ENDPOINT and the cache when it was imported: lemon_magic reads them
    at each pull, so ``%env HF_ENDPOINT=...`` in a notebook works."""
    from huggingface_hub import constants

    hub.add_repo(REPO, FILES)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # as if imported before the env
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.delenv("HF_HUB_CACHE")  # HF_HOME alone places the cache
    got = pull(REPO)
    assert got.path.startswith(os.path.join(os.environ["HF_HOME"], "hub", "models--lemon--tiny-GGUF"))
    assert not (tmp_path / "elsewhere").exists()


def test_a_cancel_before_the_transfer_fetches_nothing(hub: HubStub) -> None:
    hub.add_repo(REPO, FILES)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(PullCancelled):
        pull(REPO, cancel=cancel)
    assert [r.path for r in hub.requests] == [f"/api/models/{REPO}/revision/main"]


def test_variants_on_the_hub_and_removal_of_a_pulled_checkpoint(hub: HubStub) -> None:
    hub.add_repo(REPO, {**FILES, "mmproj-F16.gguf": tiny_gguf(7)})
    assert remote_variants(REPO) == ("Q4_K_M", "Q8_0")
    q4, q8 = pull(f"{REPO}:Q4_K_M"), pull(f"{REPO}:Q8_0")
    assert q4.mmproj == q8.mmproj is not None
    freed = remove_local(f"{REPO}:Q4_K_M")  # the mmproj stays: Q8_0 still uses it
    assert freed == len(FILES["tiny-Q4_K_M.gguf"]) and not os.path.exists(q4.path)
    assert find_local(f"{REPO}:Q4_K_M") is None
    assert find_local(f"{REPO}:Q8_0") == replace(q8, downloaded=0, fetched=())
    assert remove_local(f"{REPO}:Q8_0") == len(FILES["tiny-Q8_0.gguf"]) + len(tiny_gguf(7))
    assert downloaded_checkpoints() == () and remove_local(f"{REPO}:Q8_0") == 0
    assert not [f for f in _cache_files(os.environ["HF_HUB_CACHE"]) if "/blobs/" in f or "/snapshots/" in f]
    assert pull(f"{REPO}:Q8_0").downloaded > 0  # and it can be pulled again


def test_a_hub_that_cannot_be_reached_falls_back_to_the_cache(hub: HubStub) -> None:
    hub.add_repo(REPO, FILES)
    got = pull(REPO)
    hub.stop()
    assert pull(REPO).path == got.path
    with pytest.raises(HubUnreachable, match=r"cannot be reached .* not downloaded"):
        pull(f"{REPO}:Q8_0")


def test_a_connection_dropped_half_way_resumes_with_a_range_request(
        hub: HubStub, monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub retries within the call (after 1 s) from the last whole chunk it wrote:
    with its 10 MB chunks a drop in a small file restarts from byte 0, so chunks are made small."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 8192)
    hub.add_repo(REPO, FILES)
    hub.drop_once[(REPO, "tiny-Q4_K_M.gguf")] = 20_000
    seen: list[PullProgress] = []
    got = pull(REPO, progress=seen.append)
    assert Path(got.path).read_bytes() == FILES["tiny-Q4_K_M.gguf"]
    assert [g.range for g in hub.gets(REPO, "tiny-Q4_K_M.gguf")] == [None, "bytes=16384-"]
    assert got.downloaded == len(FILES["tiny-Q4_K_M.gguf"]) == seen[-1].done
    assert [p.done for p in seen[:3]] == [8192, 16384, 24576]  # counted once across the break


def test_a_changed_file_is_a_new_revision_and_is_fetched_again(hub: HubStub) -> None:
    repo = hub.add_repo(REPO, FILES)
    first = pull(REPO)
    old_commit = repo.commit
    repo.put("tiny-Q4_K_M.gguf", tiny_gguf(3))
    second = pull(REPO)
    assert second.commit == repo.commit != old_commit == first.commit
    assert Path(second.path).read_bytes() == tiny_gguf(3) and second.downloaded > 0
    assert len(hub.gets(REPO, "tiny-Q4_K_M.gguf")) == 2
    assert Path(first.path).read_bytes() == tiny_gguf(1)  # the old snapshot stays as it was
    repo.put("README.md", b"# changed\n")  # a new commit, the same GGUF: no transfer
    third = pull(REPO)
    assert third.commit == repo.commit and third.downloaded == 0
    assert len(hub.gets(REPO, "tiny-Q4_K_M.gguf")) == 2


def test_a_split_gguf_is_fetched_whole_with_its_mmproj(hub: HubStub) -> None:
    parts = split_gguf(4)
    assert len(parts) == 3
    names = [f"Q8_0/tiny-Q8_0-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    hub.add_repo("lemon/split-GGUF", {**dict(zip(names, parts, strict=True)),
                                      "mmproj-tiny-F16.gguf": tiny_gguf(5), "tiny-Q4_K_M.gguf": tiny_gguf(1)})
    got = pull("lemon/split-GGUF:Q8_0")
    assert got.path.endswith(names[0])
    assert got.mmproj is not None and got.mmproj.endswith("mmproj-tiny-F16.gguf")
    assert [Path(p).read_bytes() for p in got.files] == [*parts, tiny_gguf(5)]
    assert got.size == sum(map(len, parts)) + len(tiny_gguf(5)) == got.downloaded
    assert find_local("lemon/split-GGUF:Q8_0") == pull("lemon/split-GGUF:Q8_0")


def test_an_unknown_repo_a_gated_one_a_private_one_and_a_bad_token(hub: HubStub,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RepoNotFound,
                       match=r"no repo lemon/nothing on http://127\.0\.0\.1:\d+ \(if it is private, set HF"):
        pull("lemon/nothing")
    hub.add_repo(REPO, FILES)
    hub.add_repo("lemon/gated-GGUF", FILES, gated=True, token="hf_good")
    hub.add_repo("lemon/private-GGUF", FILES, private=True, token="hf_good")
    with pytest.raises(RepoAccessDenied, match=r"gated or private \(HTTP 401\): set HF_TOKEN"):
        pull("lemon/gated-GGUF")
    with pytest.raises(RepoNotFound, match="if it is private, set HF_TOKEN"):
        pull("lemon/private-GGUF")
    monkeypatch.setenv("HF_TOKEN", "hf_unknown")  # a token the Hub does not know: refused everywhere
    with pytest.raises(RepoAccessDenied, match=r"the Hub refused the token in HF_TOKEN \(HTTP 401\)"):
        pull(REPO)
    hub.tokens.add("hf_wrong")  # a real token, without access to these two repos
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(RepoAccessDenied, match=r"\(HTTP 403\): the token in HF_TOKEN has no access"):
        pull("lemon/gated-GGUF")
    with pytest.raises(RepoNotFound, match=r"no repo lemon/private-GGUF on \S+$"):
        pull("lemon/private-GGUF")
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    assert Path(pull("lemon/gated-GGUF").path).read_bytes() == FILES["tiny-Q4_K_M.gguf"]
    assert pull("lemon/private-GGUF").variant == "Q4_K_M"
    # the token goes to the Hub, never to the CDN the file is fetched from
    asked = [r for r in hub.requests if r.repo == "lemon/private-GGUF"]
    assert {(r.method, r.path.split("/")[1], r.authorization) for r in asked} == {
        ("HEAD", "lemon", "Bearer hf_good"), ("GET", "cdn", None)}


def test_no_file_of_the_variant_lists_the_variants_there_are(hub: HubStub) -> None:
    hub.add_repo(REPO, FILES)
    with pytest.raises(VariantNotFound,
                       match=r"no file of lemon/tiny-GGUF matches 'Q2_K' \(variants: Q4_K_M, Q8_0\)"):
        pull(f"{REPO}:Q2_K")
    assert hub.gets(REPO, "tiny-Q4_K_M.gguf") == []


def test_a_corrupted_body_fails_the_checksum_and_leaves_nothing(hub: HubStub) -> None:
    hub.add_repo(REPO, FILES)
    hub.corrupt.add((REPO, "tiny-Q4_K_M.gguf"))
    with pytest.raises(ChecksumMismatch, match=r"tiny-Q4_K_M.gguf of lemon/tiny-GGUF is corrupt: sha256 "):
        pull(REPO)
    assert find_local(REPO) is None
    assert not [f for f in _cache_files(os.environ["HF_HUB_CACHE"]) if "/blobs/" in f or "/snapshots/" in f]
    hub.corrupt.clear()
    assert Path(pull(REPO).path).read_bytes() == FILES["tiny-Q4_K_M.gguf"]


def test_the_checksum_is_computed_during_the_transfer(hub: HubStub, monkeypatch: pytest.MonkeyPatch) -> None:
    """No second pass over a fresh file: it is hashed as huggingface_hub writes it (also across a
    resumed connection); a corrupted body is still caught."""
    from huggingface_hub import constants

    def no_second_pass(path: str) -> str:
        raise AssertionError(f"hashed after the transfer: {path}")

    monkeypatch.setattr(_hub, "_sha256", no_second_pass)
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 8192)
    hub.add_repo(REPO, FILES)
    hub.drop_once[(REPO, "tiny-Q8_0.gguf")] = 50_000
    assert pull(f"{REPO}:Q8_0").downloaded == len(FILES["tiny-Q8_0.gguf"])
    assert [g.range for g in hub.gets(REPO, "tiny-Q8_0.gguf")] == [None, "bytes=49152-"]
    hub.corrupt.add((REPO, "tiny-Q4_K_M.gguf"))
    with pytest.raises(ChecksumMismatch):
        pull(f"{REPO}:Q4_K_M")


def test_a_file_that_is_not_gguf_is_refused_and_removed(hub: HubStub) -> None:
    hub.add_repo("lemon/html-GGUF", {"page-Q4_K_M.gguf": b"<!doctype html>" + b" " * 4000})
    with pytest.raises(NotGGUF,
                       match=r"page-Q4_K_M.gguf of lemon/html-GGUF is not a GGUF file \(it starts with b'<"):
        pull("lemon/html-GGUF")
    assert find_local("lemon/html-GGUF") is None and downloaded_checkpoints() == ()


def test_not_enough_disk_space_is_refused_before_any_transfer(hub: HubStub,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo(REPO, FILES)
    monkeypatch.setattr(_hub, "_free_bytes", lambda path: 1000)
    with pytest.raises(DiskFull,
                       match=r"not enough disk space to pull lemon/tiny-GGUF: 0.1 MB needed, 0.0 MB free"):
        pull(REPO)
    assert hub.gets(REPO, "tiny-Q4_K_M.gguf") == []


def test_a_slow_transfer_reports_progress_and_stops_when_cancelled(
        hub: HubStub, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 8192)  # progress (and cancel) once per chunk
    hub.add_repo(REPO, FILES)
    hub.throttle = 100_000  # bytes/s: the file takes about 0.7 s
    cancel = threading.Event()
    seen: list[PullProgress] = []

    def report(p: PullProgress) -> None:
        seen.append(p)
        if p.done >= 16384:
            cancel.set()

    with pytest.raises(PullCancelled, match="the pull of lemon/tiny-GGUF was cancelled"):
        pull(REPO, progress=report, cancel=cancel)
    size = len(FILES["tiny-Q4_K_M.gguf"])
    assert [p.done for p in seen] == [8192, 16384] and seen[-1].total == size
    assert seen[-1].rate > 0 and seen[-1].eta is not None and seen[-1].file == "tiny-Q4_K_M.gguf"
    # huggingface_hub 2.4 deletes its own partial file; the bytes stay under a second link (the
    # third chunk was cancelled before it was written), and the next pull resumes from there
    assert find_local(REPO) is None
    sha = hashlib.sha256(FILES["tiny-Q4_K_M.gguf"]).hexdigest()
    left = _cache_files(os.environ["HF_HUB_CACHE"])
    assert [f for f in left if "incomplete" in f or "/snapshots/" in f or "/blobs/" in f] == [
        f"models--lemon--tiny-GGUF/blobs/{sha}.partial"], left
    hub.throttle = None
    seen.clear()
    got = pull(REPO, progress=seen.append)
    assert [g.range for g in hub.gets(REPO, "tiny-Q4_K_M.gguf")] == [None, "bytes=16384-"]
    assert Path(got.path).read_bytes() == FILES["tiny-Q4_K_M.gguf"] and got.downloaded == size - 16384
    assert seen[0].done == 16384 and seen[-1].done == size and seen[-1].finished
    assert not [f for f in _cache_files(os.environ["HF_HUB_CACHE"]) if f.endswith(".partial")]


def test_a_kept_partial_that_no_longer_fits_is_dropped(hub: HubStub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new revision of the file, or a corrupt partial: the resume starts over or fails cleanly."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 8192)
    repo = hub.add_repo(REPO, FILES)
    blobs = Path(os.environ["HF_HUB_CACHE"]) / "models--lemon--tiny-GGUF" / "blobs"
    blobs.mkdir(parents=True)
    old = hashlib.sha256(FILES["tiny-Q4_K_M.gguf"]).hexdigest()
    (blobs / f"{old}.partial").write_bytes(FILES["tiny-Q4_K_M.gguf"][:10_000])
    repo.put("tiny-Q4_K_M.gguf", tiny_gguf(9))  # the kept bytes belong to the old file: not asked for
    assert Path(pull(REPO).path).read_bytes() == tiny_gguf(9)
    assert (blobs / f"{old}.partial").exists()  # another file's partial is not this pull's business
    new = hashlib.sha256(tiny_gguf(9)).hexdigest()
    (blobs / f"{new}.partial").write_bytes(b"x" * 10_000)  # kept bytes that are wrong
    for p in blobs.glob(new):
        p.unlink()
    for p in (blobs.parent / "snapshots").rglob("tiny-Q4_K_M.gguf"):
        p.unlink()
    with pytest.raises(ChecksumMismatch):
        pull(REPO)
    assert not (blobs / f"{new}.partial").exists()
    assert Path(pull(REPO).path).read_bytes() == tiny_gguf(9)


def test_two_threads_pulling_one_model_make_one_transfer(hub: HubStub) -> None:
    """huggingface_hub's file lock (per blob, in the cache) serializes the two: the second waits for
    the first's transfer and then finds the blob. It reports no progress while it waits."""
    hub.add_repo(REPO, FILES)
    hub.throttle = 200_000
    results: list[object] = []
    start = threading.Barrier(2)

    def run() -> None:
        start.wait()
        try:
            results.append(pull(REPO))
        except Exception as exc:  # pragma: no cover - shown by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 2 and all(isinstance(r, _hub.PulledModel) for r in results), results
    a, b = results
    assert isinstance(a, _hub.PulledModel) and isinstance(b, _hub.PulledModel) and a.path == b.path
    assert sorted([a.downloaded, b.downloaded]) == [0, len(FILES["tiny-Q4_K_M.gguf"])]
    assert len(hub.gets(REPO, "tiny-Q4_K_M.gguf")) == 1


def test_two_processes_pulling_one_model_make_one_transfer(hub: HubStub) -> None:
    """As two kernels would: the lock is a file in the cache, so it holds across processes."""
    hub.add_repo(REPO, FILES)
    hub.throttle = 200_000
    code = "import sys; from lemon_magic._hub import pull; print(pull(sys.argv[1]).downloaded)"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [subprocess.Popen([sys.executable, "-c", code, REPO], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(int(o) for o in outs) == [0, len(FILES["tiny-Q4_K_M.gguf"])]
    assert len(hub.gets(REPO, "tiny-Q4_K_M.gguf")) == 1


def test_the_demo_hub_runs_as_a_process_for_notebooks(tmp_path: Path) -> None:
    """``python -m tests.hubstub``: what a notebook under nbval (or a bench) points HF_ENDPOINT at."""
    root = Path(__file__).resolve().parent.parent
    server = subprocess.Popen([sys.executable, "-m", "tests.hubstub"], cwd=root, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(tmp_path), "PYTHONPATH": str(root)}
        env.pop("HF_HUB_CACHE", None)
        code = "from lemon_magic._hub import pull; print(pull('lemon/split-GGUF').path)"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().endswith("tiny-F32-00001-of-00003.gguf")
    finally:
        if server.stdin is not None:
            server.stdin.close()
        assert server.wait(10) == 0


def test_failures_map_to_one_line_errors() -> None:
    """The mappings _translate makes that the tests above do not reach over the wire."""
    from huggingface_hub import errors as hf

    s = _hub.HubSettings("http://hub", "/nonexistent/cache", offline=False)
    ck = Checkpoint("o/r", "Q4_0")
    full = _hub._translate(OSError(errno.ENOSPC, "No space left on device"), ck, s, needed=5_000_000)
    assert isinstance(full, DiskFull) and full.needed == 5_000_000
    assert isinstance(_hub._translate(hf.OfflineModeIsEnabled("off"), ck, s), HubUnreachable)
    other = _hub._translate(ValueError("odd\nsecond line"), ck, s)
    assert type(other) is PullError and other.message == "pull of o/r:Q4_0 failed: ValueError: odd"




@pytest.mark.real
@pytest.mark.usefixtures("forget_registrations")
@pytest.mark.parametrize("variant", ["Q4_K_M", "F32"])
def test_a_pulled_model_loads_on_a_real_backend_and_completes(
        hub: HubStub, make_router: Callable[..., Router], variant: str) -> None:
    """One file (Q4_K_M), and a split one (F32, three parts) loaded by its first part (the
    registration keeps the snapshot's link, whose name tells llama.cpp where the others are)."""
    parts = split_gguf(6)
    names = [f"tiny-F32-0000{i}-of-0000{len(parts)}.gguf" for i in range(1, len(parts) + 1)]
    hub.add_repo(REPO, {**FILES, **dict(zip(names, parts, strict=True))})
    router = make_router()
    got = router.pull(f"{REPO}:{variant}", name="pulled")
    assert got.checkpoint == f"{REPO}:{variant}" and got.path.endswith(names[0] if variant == "F32"
                                                                        else "tiny-Q4_K_M.gguf")
    router.load("pulled", ctx_size=256)
    done = router.complete("pulled", "once upon", max_tokens=4)
    assert isinstance(done.text, str) and done.usage["completion_tokens"] > 0
