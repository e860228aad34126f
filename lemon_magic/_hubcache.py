"""The local Hugging Face cache, read without the network: what is downloaded, and where.

huggingface_hub's cache layout (``models--org--repo/{blobs,snapshots/<commit>,refs}``)
is read as it is; a file is downloaded when its snapshot link resolves. Removing a
checkpoint removes its links and the blobs no other link uses; :func:`remove_files` removes
only the given files (what a pull of ours downloaded), the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lemon_magic._hubfiles import (
    Checkpoint,
    RepoFile,
    Selection,
    choose_files,
    complete,
    model_groups,
    variant_label,
)
from lemon_magic.errors import PullError

__all__ = ("HubSettings", "PulledModel", "downloaded_checkpoints", "find_local", "remove_files",
           "remove_local")

_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class PulledModel:
    """A checkpoint whose files are all in the local cache."""

    checkpoint: str  #: ``org/repo:VARIANT`` with the variant that was chosen
    repo_id: str
    variant: str
    commit: str
    path: str  #: what to load: the model file, or the first part of a split one
    files: tuple[str, ...]  #: local paths of every file (model parts, then mmproj)
    mmproj: str | None
    size: int  #: bytes of all files
    downloaded: int = 0  #: bytes this call transferred (0: everything was cached)
    #: local paths of the files this call transferred (or completed from an interrupted pull of
    #: ours); the others were in the cache already, put there by anyone
    fetched: tuple[str, ...] = ()


@dataclass(frozen=True)
class HubSettings:
    """Where pulls go, read from the environment at call time (huggingface_hub reads it at import)."""

    endpoint: str
    cache_dir: str
    offline: bool

    @classmethod
    def from_env(cls) -> HubSettings:
        from huggingface_hub import constants

        env = os.environ
        endpoint = (env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
        if not cache and env.get("HF_HOME"):
            cache = os.path.join(env["HF_HOME"], "hub")
        cache_dir = os.path.expandvars(os.path.expanduser(cache)) if cache else constants.HF_HUB_CACHE
        flag = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
        return cls(endpoint, cache_dir, flag.upper() in _TRUE or constants.HF_HUB_OFFLINE)


def _repo_folder(settings: HubSettings, repo_id: str) -> Path:
    return Path(settings.cache_dir) / ("models--" + repo_id.replace("/", "--"))


def _snapshot_listing(snapshot: Path) -> list[RepoFile]:
    return [RepoFile(p.relative_to(snapshot).as_posix(), p.stat().st_size)
            for p in sorted(snapshot.rglob("*")) if p.is_file()]  # is_file: a broken link is not


def _pulled(checkpoint: Checkpoint, commit: str, selection: Selection, paths: dict[str, str],
            downloaded: int = 0) -> PulledModel:
    return PulledModel(f"{checkpoint.repo_id}:{selection.variant}", checkpoint.repo_id, selection.variant,
                       commit, paths[selection.model[0].name], tuple(paths[f.name] for f in selection.files),
                       paths[selection.mmproj.name] if selection.mmproj else None,
                       sum(os.path.getsize(paths[f.name]) for f in selection.files), downloaded)


def find_local(checkpoint: str | Checkpoint, *, with_mmproj: bool = True,
               settings: HubSettings | None = None) -> PulledModel | None:
    """The checkpoint's files in the local cache, without the network (``None``: not downloaded).

    The snapshot that the revision (``main``) points to is tried first, then the
    others, newest first. Without a variant, the default order applies to the files
    that are there: offline, ``org/repo`` finds whichever variant was pulled.
    """
    ck = Checkpoint.parse(checkpoint)
    s = settings or HubSettings.from_env()
    folder = _repo_folder(s, ck.repo_id)
    snapshots = folder / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = folder / "refs" / ck.revision
    first = ref.read_text().strip() if ref.is_file() else ck.revision
    others = sorted((p for p in snapshots.iterdir() if p.name != first), key=lambda p: -p.stat().st_mtime)
    for snapshot in [snapshots / first, *others]:
        if not snapshot.is_dir():
            continue
        listing = _snapshot_listing(snapshot)
        try:
            selection = choose_files(ck, listing, with_mmproj=with_mmproj)
        except PullError:
            continue
        return _pulled(ck, snapshot.name, selection, {f.name: str(snapshot / f.name) for f in listing})
    return None


def downloaded_checkpoints(settings: HubSettings | None = None) -> tuple[str, ...]:
    """Every ``org/repo:VARIANT`` whose GGUF files are complete in the local cache, sorted."""
    s = settings or HubSettings.from_env()
    found: set[str] = set()
    root = Path(s.cache_dir)
    for folder in root.glob("models--*--*") if root.is_dir() else ():
        repo_id = folder.name[len("models--"):].replace("--", "/", 1)
        for snapshot in (folder / "snapshots").glob("*"):
            groups = model_groups(_snapshot_listing(snapshot))
            found.update(f"{repo_id}:{variant_label(g[0].name)}" for g in groups if complete(g))
    return tuple(sorted(found))


def _remove_from_cache(path: str) -> None:
    """Forget one downloaded file: the snapshot's link and the blob it points to."""
    blob = os.path.realpath(path)
    for p in {path, blob}:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def remove_local(checkpoint: str | Checkpoint, *, settings: HubSettings | None = None) -> int:
    """Remove the checkpoint's files from every snapshot of its repo; returns the bytes freed.

    A blob another link still uses stays (another variant, another commit). An
    ``mmproj`` file goes with the last model file of its snapshot. Nothing there: 0.
    """
    ck = Checkpoint.parse(checkpoint)
    s = settings or HubSettings.from_env()
    folder = _repo_folder(s, ck.repo_id)
    snapshots = [p for p in (folder / "snapshots").glob("*") if p.is_dir()]
    doomed: set[Path] = set()
    for snapshot in snapshots:
        listing = _snapshot_listing(snapshot)
        try:
            selection = choose_files(ck, listing)
        except PullError:
            continue
        models = {f.name for g in model_groups(listing) for f in g}
        gone = {f.name for f in selection.model}
        keep_mmproj = bool(models - gone)
        doomed.update(snapshot / f.name for f in selection.files
                      if not (f is selection.mmproj and keep_mmproj))
    return _unlink(doomed, snapshots)


def remove_files(paths: tuple[str, ...] | list[str]) -> int:
    """Remove these snapshot links of the Hub's cache and the blobs no other link of their repo
    uses; returns the bytes freed. A path that is not a link in a ``snapshots`` folder, or is
    gone already, is left alone."""
    doomed: set[Path] = set()
    snapshots: set[Path] = set()
    for p in map(Path, paths):
        parts = p.parts
        if not p.is_symlink() or "snapshots" not in parts:
            continue
        at = len(parts) - 1 - parts[::-1].index("snapshots")
        if len(parts) < at + 3:  # .../snapshots/<commit>/<file>
            continue
        repo = Path(*parts[:at])
        doomed.add(p)
        snapshots.update(s for s in (repo / "snapshots").glob("*") if s.is_dir())
    return _unlink(doomed, sorted(snapshots))


def _unlink(doomed: set[Path], snapshots: list[Path]) -> int:
    """Unlink ``doomed`` (snapshot links), then the blobs no link in ``snapshots`` uses, then the
    snapshot folders left empty; returns the bytes freed."""
    blobs = {Path(os.path.realpath(p)) for p in doomed}
    for link in doomed:
        link.unlink()
    still_used = {Path(os.path.realpath(p)) for snap in snapshots for p in snap.rglob("*") if p.is_symlink()}
    freed = 0
    for blob in blobs - still_used:
        if blob.is_file() and blob.parent.name == "blobs":
            freed += blob.stat().st_size
            blob.unlink()
    for snapshot in snapshots:  # drop snapshot folders left empty
        for d in sorted((p for p in snapshot.rglob("*") if p.is_dir()), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()
        if not any(snapshot.iterdir()):
            snapshot.rmdir()
    return freed
