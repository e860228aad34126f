"""Registrations keep what they are not asked to change, whoever writes them (issue 20).

Every kind of entry (built in, a local file, a pulled single file, a pulled split model, a
remote) goes through every writer (pull, register, options save over HTTP, ``save_options``
of ``POST load``), then is loaded and deleted; and several processes registering at once lose
nothing (one writer, merging, under a lock held across processes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lemon_magic import Registry, Router
from tests.fake_remote import FakeRemote
from tests.hubstub import HubStub, hub, split_gguf, tiny_gguf
from tests.serving import Served

__all__ = ("hub",)  # the fixture, imported for the tests below

REPO = "lemon/tiny-GGUF"
FILES = {"tiny-Q4_K_M.gguf": tiny_gguf(1), "tiny-Q8_0.gguf": tiny_gguf(2)}
SPLIT_REPO = "lemon/split-GGUF"
PARTS = split_gguf(4)
SPLIT = {f"tiny-F32-{i:05d}-of-{len(PARTS):05d}.gguf": p for i, p in enumerate(PARTS, 1)}
KINDS = ("builtin", "path", "pulled", "split", "remote")


def _raw(router: Router) -> dict[str, Any]:
    """The registrations file as it is on disk."""
    path = router.async_router.registry.path
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.fixture
def remote() -> Iterator[FakeRemote]:
    with FakeRemote() as fake:
        yield fake


def _make(kind: str, served: Served, hub: HubStub, tiny_model: str, remote: FakeRemote) -> str:
    """An entry of ``kind``, made the way users make it; its name."""
    http = served.http
    if kind == "builtin":
        return "gemma3-270m"
    if kind == "path":
        served.router.register("local", tiny_model, description="a file of mine", ctx_size=256)
        return "local"
    if kind == "remote":
        served.router.register_remote("far", remote.url, "m", description="over there", ctx_size=256)
        return "far"
    repo, files, name = (REPO, FILES, "one") if kind == "pulled" else (SPLIT_REPO, SPLIT, "split")
    hub.add_repo(repo, files)
    checkpoint = f"{repo}:Q8_0" if kind == "pulled" else repo
    r = http.post("/pull", json={"model_name": f"user.{name}", "checkpoint": checkpoint})
    assert r.status_code == 200, r.text
    return name


def _write_with_every_writer(kind: str, name: str, served: Served) -> None:
    """Pull, register, save options (both HTTP ways) over ``name``: each one changes only what it
    is asked to, or refuses and changes nothing."""
    router, http = served.router, served.http
    user = kind not in ("builtin", "remote")

    def step(write: Callable[[], None], *changed: str) -> None:
        before = _raw(router).get(name)
        write()
        after = _raw(router).get(name)
        if before is None:
            assert after is None
            return
        assert after is not None, f"{name}'s registration went"
        assert {k: v for k, v in after.items() if k not in changed} == \
            {k: v for k, v in before.items() if k not in changed}

    def save() -> None:
        r = http.post(f"/models/{name}/options", json={"ctx_size": 512})
        assert (r.status_code == 200) == user, r.text

    def save_on_load() -> None:  # (a built-in or remote model saves nothing)
        r = http.post("/load", json={"model_name": name, "ctx_size": 384, "save_options": True})
        assert (r.status_code == 200) == user, r.text
        if user:
            assert http.post("/unload", json={"model_name": name}).status_code == 200

    def pull() -> None:  # pulled again, or nothing to pull
        r = http.post("/pull", json={"model_name": f"user.{name}"})
        assert r.status_code == (400 if kind == "remote" else 200), r.text

    def register() -> None:  # registered again, the same way, with the options it has
        spec = router.async_router.registry.lookup(name)
        saved = {k: v for k, v in vars(spec.defaults).items() if v is not None}
        if spec.remote is not None:
            router.register_remote(name, spec.remote.url, spec.remote.remote_model, kind=spec.kind,
                                   description=spec.description, **saved)
        elif kind != "builtin":
            router.register(name, spec.path, kind=spec.kind, description=spec.description, **saved)

    step(save, "defaults")
    if user:
        assert _raw(router)[name]["defaults"]["ctx_size"] == 512
    step(save_on_load, "defaults")
    if user:
        assert _raw(router)[name]["defaults"]["ctx_size"] == 384
    step(pull)
    step(register)


@pytest.mark.real
@pytest.mark.usefixtures("forget_registrations")
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_entry_goes_through_every_writer_then_loads_and_deletes(
        kind: str, hub: HubStub, served: Served, tiny_model: str, remote: FakeRemote) -> None:
    name = _make(kind, served, hub, tiny_model, remote)
    first = _raw(served.router).get(name)
    _write_with_every_writer(kind, name, served)
    if first is not None:
        assert {k: v for k, v in _raw(served.router)[name].items() if k != "defaults"} == \
            {k: v for k, v in first.items() if k != "defaults"}
    body = {"model_name": name, **({"ctx_size": 256} if kind == "builtin" else {})}
    r = served.http.post("/load", json=body)
    assert r.status_code == 200, r.text
    if kind in ("pulled", "split"):  # the link in the Hub's snapshot, not the blob
        assert "/snapshots/" in r.json()["checkpoint"]
    r = served.http.post("/delete", json={"model_name": name})
    if kind == "builtin":
        assert r.status_code == 400 and "built in" in r.json()["error"]["message"], r.text
        return
    assert r.status_code == 200, r.text
    files = FILES["tiny-Q8_0.gguf"] if kind == "pulled" else SPLIT if kind == "split" else None
    expected = 0 if files is None else len(files) if isinstance(files, bytes) else \
        sum(map(len, files.values()))
    assert r.json()["freed_bytes"] == expected
    assert name not in _raw(served.router)
    if kind == "path":
        assert Path(tiny_model).is_file()  # a file of the user's own is never removed


WRITER = r'''
import sys, time
from pathlib import Path
from lemon_magic.registry import Registry

path, model, prefix, start, count = sys.argv[1:6]
registry = Registry(Path(path))
while time.time() < float(start):
    pass
for i in range(int(count)):
    registry.register(f"{prefix}-{i}", model)
    registry.lookup(f"{prefix}-{i}")
'''


def test_processes_registering_at_once_lose_nothing(tmp_path: Path, tiny_model: str) -> None:
    path = tmp_path / "models.json"
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tiny_model, f"p{n}",
                               str(start), "40"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for n in range(3)]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    names = set(Registry(path).user_names())
    assert names == {f"p{n}-{i}" for n in range(3) for i in range(40)}, f"{len(names)} of 120 kept"


def test_the_registry_writes_under_a_lock_file_beside_it(tmp_path: Path, tiny_model: str) -> None:
    registry = Registry(tmp_path / "models.json")
    registry.register("x", tiny_model)
    assert (tmp_path / "models.json.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models.json", "models.json.lock"]
