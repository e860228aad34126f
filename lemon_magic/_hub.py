"""Pull GGUF checkpoints (``org/repo[:VARIANT]``) from the Hugging Face Hub with ``huggingface_hub``.

Everything here blocks and is meant for a worker thread: :func:`pull` lists the
repo, picks the files (:func:`choose_files`), downloads each one with
``hf_hub_download`` (its cache, its locks, its ETag checks, ``HF_TOKEN``), checks
them and reports progress through a callback; a :class:`threading.Event` cancels
it. :func:`find_local` answers "is it downloaded, and where?" without the network.

Which files a checkpoint means is decided in :mod:`lemon_magic._hubfiles`.

Settings are read from the environment at each call, not at import as
``huggingface_hub`` does (``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``), so ``%env HF_ENDPOINT=...`` in a notebook takes effect.

What ``huggingface_hub`` 2.4 does not do, and this module adds: a sha256 check of a
fresh download against the Hub's listing (it checks sizes only), the GGUF magic, a
free-space check that fails (it only warns), cancellation, one-line errors. What it
does that shapes this module: a dropped connection is resumed (``Range``) within the
same call, up to five times; but a cancelled or failed call deletes its partial file
(its temporary files are unique per call), so a cancelled pull starts over next time.
Progress arrives once per ``huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE`` (10 MB),
which is also how soon a cancel takes effect during a transfer.
"""

from __future__ import annotations

import errno
import functools
import glob
import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from lemon_magic._hubfiles import (
    DEFAULT_VARIANTS,
    Checkpoint,
    RepoFile,
    Selection,
    choose_files,
    complete,
    list_variants,
    model_groups,
    variant_label,
)
from lemon_magic.errors import (
    ChecksumMismatch,
    DiskFull,
    HubUnreachable,
    LemonError,
    NotGGUF,
    PullCancelled,
    PullError,
    RepoAccessDenied,
    RepoNotFound,
)

__all__ = ("DEFAULT_VARIANTS", "Checkpoint", "HubSettings", "PullProgress", "PulledModel", "RepoFile",
           "Selection", "choose_files", "downloaded_checkpoints", "find_local", "list_variants", "pull",
           "variant_label")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class PullProgress:
    """A progress report: bytes across all files this pull transfers (cached files excluded)."""

    checkpoint: str
    file: str
    done: int
    total: int
    rate: float  #: bytes per second since the pull started
    eta: float | None  #: seconds left at that rate (None before the first byte)
    finished: bool = False

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)


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


# -- the local cache -----------------------------------------------------------------------------


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


# -- pulling ------------------------------------------------------------------------------------


class _Transfer:
    """Byte accounting across the files of one pull; its bars are huggingface_hub's ``tqdm_class``."""

    def __init__(self, checkpoint: str, total: int, report: Callable[[PullProgress], None] | None,
                 cancel: threading.Event | None) -> None:
        self.checkpoint, self.total, self.report, self.cancel = checkpoint, total, report, cancel
        self.done = 0
        self.file = ""
        self.started = time.monotonic()
        self.transferred: set[str] = set()  # files a GET was made for (they get the sha256 check)
        self.partial: str | None = None  # glob of huggingface_hub's temporary file for self.file
        self.tail: _TailHash | None = None

    def begin(self, f: RepoFile, blobs: Path | None) -> None:
        """Account the next file; with ``blobs``, hash it while it downloads (its sha256 is its name)."""
        self.file = f.name
        self.partial = str(blobs / f"{f.sha256}.*.incomplete") if blobs is not None and f.sha256 else None
        self.tail = None

    def digest(self) -> tuple[str, int] | None:
        """The sha256 and size the tail hash saw (None: not hashed on the way, or rewritten)."""
        tail, self.tail = self.tail, None
        return tail.result() if tail is not None else None

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise PullCancelled(self.checkpoint)

    def advance(self, n: float, *, finished: bool = False) -> None:
        self.done += int(n)
        if not finished:
            self.check()
        if self.report is not None:
            elapsed = max(time.monotonic() - self.started, 1e-9)
            rate = self.done / elapsed
            eta = (max(self.total - self.done, 0) / rate) if rate > 0 else None
            self.report(PullProgress(self.checkpoint, self.file, self.done, self.total, rate, eta, finished))

    def bar(self, **kwargs: Any) -> _Bar:
        self.transferred.add(self.file)
        self.check()
        found = glob.glob(self.partial) if self.partial and self.tail is None else []
        if len(found) == 1 and not kwargs.get("initial"):
            self.tail = _TailHash(found[0])
        return _Bar(self, int(kwargs.get("initial") or 0))


class _Bar:
    """What ``huggingface_hub.file_download.http_get`` uses of a tqdm bar: update() and with."""

    def __init__(self, transfer: _Transfer, initial: int) -> None:
        self.transfer = transfer
        self.n = initial

    def update(self, n: float | None = 1) -> None:
        self.n += int(n or 0)
        if (n or 0) < 0 and self.transfer.tail is not None:  # a resume restarts from zero: the file
            self.transfer.tail.invalidate()  # is rewritten, the tail hash is wrong
        self.transfer.advance(n or 0)

    def close(self) -> None:
        pass

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _TailHash:
    """The sha256 of a file that another thread is writing (huggingface_hub's temporary file), read
    as it grows: on a second core the check costs no time of its own. It keeps the file open, so
    huggingface_hub's rename into the cache does not disturb it."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "rb")
        self._hash = hashlib.sha256()
        self._size = 0
        self._valid = True
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lemon-magic-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while self._valid:
                finishing = self._done.is_set()
                chunk = self._file.read(1 << 20)
                if chunk:
                    self._hash.update(chunk)
                    self._size += len(chunk)
                elif finishing:
                    return
                else:
                    self._done.wait(0.02)
        except OSError:
            self._valid = False
        finally:
            self._file.close()

    def invalidate(self) -> None:
        self._valid = False
        self._done.set()

    def result(self) -> tuple[str, int] | None:
        """Read to the end (the writer is done), then the digest and size; None if invalidated."""
        self._done.set()
        self._thread.join()
        return (self._hash.hexdigest(), self._size) if self._valid else None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _free_bytes(path: str) -> int:
    """Free space where ``path`` is (or would be created)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def _has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _translate(exc: BaseException, ck: Checkpoint, s: HubSettings, *, needed: int = 0) -> LemonError:
    """The one mapping of huggingface_hub's and the network's failures to lemon_magic errors
    (``needed``: the bytes the pull still had to write, for a disk that filled up)."""
    from huggingface_hub import errors as hf
    from huggingface_hub.utils import httpx as hx  # type: ignore[attr-defined]  # its httpx2, re-exported

    name = str(ck)
    if isinstance(exc, LemonError):
        return exc
    if isinstance(exc, hf.LocalEntryNotFoundError) and isinstance(exc.__cause__, hf.HfHubHTTPError):
        exc = exc.__cause__  # a HEAD answered with an error huggingface_hub took for an outage
    status = exc.response.status_code if isinstance(exc, hf.HfHubHTTPError) else None
    if isinstance(exc, hf.GatedRepoError) or (status in (401, 403) and not isinstance(
            exc, hf.RepositoryNotFoundError)):
        token = _has_token()
        refused = token and status == 401 and not isinstance(exc, hf.GatedRepoError)
        return RepoAccessDenied(name, ck.repo_id, status or 401, has_token=token, token_refused=refused)
    if isinstance(exc, hf.RepositoryNotFoundError):
        return RepoNotFound(name, ck.repo_id, s.endpoint, has_token=_has_token())
    if isinstance(exc, hf.RevisionNotFoundError):
        return RepoNotFound(name, f"{ck.repo_id}@{ck.revision}", s.endpoint, has_token=_has_token())
    if isinstance(exc, (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError, hx.TransportError)):
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return HubUnreachable(name, f"the Hub at {s.endpoint} cannot be reached ({why})",
                              downloaded_checkpoints(s))
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskFull(name, needed, _free_bytes(s.cache_dir), s.cache_dir)
    if status is not None:
        return PullError(f"the Hub at {s.endpoint} answered HTTP {status} for {name}", checkpoint=name)
    first = str(exc).splitlines()[0] if str(exc) else ""
    return PullError(f"pull of {name} failed: {type(exc).__name__}: {first}", checkpoint=name)


def _listing(ck: Checkpoint, s: HubSettings) -> tuple[str, list[RepoFile]]:
    """The commit the revision points to and its files (with sizes and LFS sha256)."""
    from huggingface_hub import HfApi, constants

    info = HfApi(endpoint=s.endpoint).model_info(ck.repo_id, revision=ck.revision, files_metadata=True,
                                                 timeout=constants.HF_HUB_ETAG_TIMEOUT)
    files = [RepoFile(f.rfilename, f.size, f.lfs.sha256 if f.lfs is not None else None)
             for f in info.siblings or ()]
    return str(info.sha), files


def _check_file(ck: Checkpoint, f: RepoFile, path: str, *, fresh: bool, verify: bool,
                digest: tuple[str, int] | None = None) -> None:
    """GGUF magic always; the sha256 of a fresh download when the Hub gives one (``digest``: as
    hashed during the transfer). A bad file is removed."""
    blob = os.path.realpath(path)
    if verify and fresh:
        expected = f.sha256 or (os.path.basename(blob) if _SHA256.fullmatch(os.path.basename(blob)) else None)
        if expected is not None:
            hashed = digest is not None and digest[1] == os.path.getsize(blob)
            actual = digest[0] if digest is not None and hashed else _sha256(blob)
            if actual != expected:
                _remove_from_cache(path)
                raise ChecksumMismatch(str(ck), f.name, expected, actual)
    with open(blob, "rb") as fh:
        head = fh.read(4)
    if head != b"GGUF":
        _remove_from_cache(path)
        raise NotGGUF(str(ck), f.name, head)


def pull(checkpoint: str | Checkpoint, *, progress: Callable[[PullProgress], None] | None = None,
         cancel: threading.Event | None = None, with_mmproj: bool = True, verify: bool = True,
         settings: HubSettings | None = None) -> PulledModel:
    """Download the checkpoint's files into the Hugging Face cache (what is there is not fetched again).

    Blocks; call it from a worker thread. ``progress`` is called on this thread
    with a :class:`PullProgress` after each chunk; setting ``cancel`` ends the pull
    with :class:`PullCancelled` at the next chunk (files completed before stay).
    Offline (``HF_HUB_OFFLINE``) or when the Hub cannot be reached, a checkpoint that
    is already downloaded is returned from the cache. Raises a :class:`PullError`.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    ck = Checkpoint.parse(checkpoint)
    s = settings or HubSettings.from_env()
    if s.offline:
        local = find_local(ck, with_mmproj=with_mmproj, settings=s)
        if local is not None:
            return local
        raise HubUnreachable(str(ck), "offline mode is on (HF_HUB_OFFLINE)", downloaded_checkpoints(s))
    try:
        commit, listing = _listing(ck, s)
    except Exception as exc:
        error = _translate(exc, ck, s)
        local = find_local(ck, with_mmproj=with_mmproj, settings=s)
        if isinstance(error, HubUnreachable) and local is not None:
            return local
        raise error from exc
    selection = choose_files(ck, listing, with_mmproj=with_mmproj)
    paths: dict[str, str] = {}
    todo: list[RepoFile] = []
    for f in selection.files:
        cached = try_to_load_from_cache(ck.repo_id, f.name, cache_dir=s.cache_dir, revision=commit)
        if isinstance(cached, str):
            paths[f.name] = cached
        else:
            todo.append(f)
    total = sum(f.size or 0 for f in todo)
    free = _free_bytes(s.cache_dir) if total else 0
    if total > free:
        raise DiskFull(str(ck), total, free, s.cache_dir)
    transfer = _Transfer(str(ck), total, progress, cancel)
    bars = functools.partial(_Transfer.bar, transfer)
    blobs = _repo_folder(s, ck.repo_id) / "blobs" if verify else None
    for f in todo:
        transfer.begin(f, blobs)
        transfer.check()
        try:
            path = hf_hub_download(ck.repo_id, f.name, revision=ck.revision, cache_dir=s.cache_dir,
                                   endpoint=s.endpoint, tqdm_class=cast(Any, bars))
        except Exception as exc:
            if transfer.tail is not None:
                transfer.tail.invalidate()
                transfer.digest()
            raise _translate(exc, ck, s, needed=total - transfer.done) from exc
        paths[f.name] = str(path)
        _check_file(ck, f, str(path), fresh=f.name in transfer.transferred, verify=verify,
                    digest=transfer.digest())
    commits = {os.path.basename(p[:-len(name) - 1]) for name, p in paths.items()}
    if len(commits) > 1:
        raise PullError(f"{ck.repo_id} changed during the pull of {ck}; pull again", checkpoint=str(ck))
    for f in selection.files:
        if f not in todo:
            _check_file(ck, f, paths[f.name], fresh=False, verify=verify)
    moved = transfer.done
    if progress is not None:
        transfer.file = selection.files[-1].name
        transfer.advance(total - transfer.done, finished=True)
    return _pulled(ck, commits.pop(), selection, paths, moved)
