"""Pull GGUF checkpoints (``org/repo[:VARIANT]``) from the Hugging Face Hub with ``huggingface_hub``.

Everything here blocks and is meant for a worker thread: :func:`pull` lists the
repo, picks the files (:func:`choose_files`), downloads each one with
``hf_hub_download`` (its cache, its locks, its ETag checks, ``HF_TOKEN``), checks
them and reports progress through a callback; a :class:`threading.Event` cancels
it. The pieces live apart and are re-exported here: which files a checkpoint means
(:mod:`lemon_magic._hubfiles`, pure), and the local cache without the network
(:mod:`lemon_magic._hubcache`: :func:`find_local` answers "is it downloaded, and
where?", :func:`remove_local` deletes a checkpoint's files).

Settings are read from the environment at each call, not at import as
``huggingface_hub`` does (``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``), so ``%env HF_ENDPOINT=...`` in a notebook takes effect.

What ``huggingface_hub`` 2.4 does not do, and this module adds: a sha256 check of a
fresh download against the Hub's listing (it checks sizes only), the GGUF magic, a
free-space check that fails (it only warns), cancellation, one-line errors. What it
does that shapes this module: a dropped connection is resumed (``Range``) within the
same call, up to five times; but a cancelled or failed call deletes its partial file
(its temporary files are unique per call). So this module keeps a second link to that
file (``blobs/<sha256>.partial``), and the next pull completes it with a ``Range``
request (``huggingface_hub``'s ``http_get``, under its lock) before ``hf_hub_download``
links the blob into the snapshot.
Progress arrives once per ``huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE`` (10 MB),
which is also how soon a cancel takes effect during a transfer, and where a resumed
connection starts again. Two pulls of one file (threads or processes) wait on
huggingface_hub's file lock in the cache: one transfer; the waiting one reports no
progress and cannot be cancelled until the lock is free.
"""

from __future__ import annotations

import contextlib
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from lemon_magic._hubcache import (
    HubSettings,
    PulledModel,
    _pulled,
    _remove_from_cache,
    _repo_folder,
    downloaded_checkpoints,
    find_local,
    remove_files,
    remove_local,
)
from lemon_magic._hubfiles import (
    DEFAULT_VARIANTS,
    Checkpoint,
    RepoFile,
    Selection,
    choose_files,
    list_variants,
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
           "remove_files", "remove_local", "remote_variants", "variant_label")

_SHA256 = re.compile(r"[0-9a-f]{64}")


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

    def describe(self) -> str:
        """One line for a terminal or a panel row: ``downloading 34 % (120/350 MB), 12.0 MB/s, 0:19 left``."""
        if self.finished:
            return f"downloaded {self.total / 1e6:.0f} MB"
        text = f"downloading {self.fraction:.0%} ({self.done / 1e6:.0f}/{self.total / 1e6:.0f} MB)"
        text = text.replace("%", " %", 1)
        if self.rate > 0:
            text += f", {self.rate / 1e6:.1f} MB/s"
        if self.eta is not None:
            minutes, seconds = divmod(round(self.eta), 60)
            text += f", {minutes}:{seconds:02d} left"
        return text


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
        self.resumed = 0  # bytes an interrupted pull had kept (counted as done, not transferred)
        self.temp: str | None = None  # glob of huggingface_hub's temporary file for self.file
        self.keep: Path | None = None  # where that file's bytes are kept for a resume
        self.hash = False
        self.tail: _TailHash | None = None

    def begin(self, f: RepoFile, blobs: Path, *, verify: bool) -> None:
        """Account the next file: an LFS file (named by its sha256) is kept for a resume, and with
        ``verify`` hashed while it downloads."""
        self.file = f.name
        self.temp = str(blobs / f"{f.sha256}.*.incomplete") if f.sha256 else None
        self.keep = _partial(blobs, f)
        self.hash = verify
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
        found = glob.glob(self.temp) if self.temp and self.tail is None else []
        if len(found) == 1 and self.keep is not None:
            # huggingface_hub deletes its temporary file when the call fails: a second link keeps it
            with contextlib.suppress(OSError):
                self.keep.unlink(missing_ok=True)
                os.link(found[0], self.keep)
        if len(found) == 1 and self.hash and not kwargs.get("initial"):
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


def _partial(blobs: Path, f: RepoFile) -> Path | None:
    """Where the bytes of an interrupted download of ``f`` are kept (LFS files: named by sha256)."""
    return blobs / f"{f.sha256}.partial" if f.sha256 and _SHA256.fullmatch(f.sha256) else None


def _resume(ck: Checkpoint, s: HubSettings, f: RepoFile, partial: Path, transfer: _Transfer,
            bars: Callable[..., _Bar]) -> bool:
    """Complete the blob of ``f`` from the bytes an interrupted pull kept (a ``Range`` request),
    under huggingface_hub's lock for that blob; ``hf_hub_download`` then finds the blob and
    links it into the snapshot. A partial file that no longer fits the Hub's file is dropped
    (False: nothing was completed)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers  # type: ignore[attr-defined]

    assert f.sha256 is not None
    url = hf_hub_url(ck.repo_id, f.name, revision=ck.revision, endpoint=s.endpoint)
    meta = get_hf_file_metadata(url, endpoint=s.endpoint)
    blob = partial.with_name(f.sha256)
    lock = Path(s.cache_dir) / ".locks" / partial.parent.parent.name / f"{f.sha256}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        done = partial.stat().st_size if partial.exists() else 0
        if blob.exists() or meta.etag != f.sha256 or meta.size is None or done >= meta.size:
            partial.unlink(missing_ok=True)
            return False
        headers = build_hf_headers()
        if urlsplit(meta.location).netloc != urlsplit(url).netloc:
            headers.pop("authorization", None)  # a CDN: the token stays on the Hub
        transfer.temp = None  # no temporary file of huggingface_hub's to keep or to hash here
        transfer.resumed += done
        transfer.advance(done)  # what the interrupted pull had, counted as done
        with open(partial, "ab") as fh:
            http_get(meta.location, fh, resume_size=done, headers=headers, expected_size=meta.size,
                     displayed_filename=f.name, tqdm_class=cast(Any, bars))
        actual = _sha256(str(partial))
        if actual != f.sha256:
            partial.unlink()
            raise ChecksumMismatch(str(ck), f.name, f.sha256, actual)
        os.chmod(partial, 0o644)
        os.replace(partial, blob)
    return True


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
    blobs = _repo_folder(s, ck.repo_id) / "blobs"
    resumed: set[str] = set()
    for f in todo:
        transfer.begin(f, blobs, verify=verify)
        transfer.check()
        try:
            if transfer.keep is not None and transfer.keep.exists() and \
                    _resume(ck, s, f, transfer.keep, transfer, bars):
                transfer.transferred.discard(f.name)  # completed and checked: no second hash
                resumed.add(f.name)  # the bytes of an interrupted pull of ours: ours too
            path = hf_hub_download(ck.repo_id, f.name, revision=ck.revision, cache_dir=s.cache_dir,
                                   endpoint=s.endpoint, tqdm_class=cast(Any, bars))
        except Exception as exc:
            if transfer.tail is not None:
                transfer.tail.invalidate()
                transfer.digest()
            raise _translate(exc, ck, s, needed=total - transfer.done) from exc
        if transfer.keep is not None:
            transfer.keep.unlink(missing_ok=True)  # a link to the blob now (or to nothing)
        paths[f.name] = str(path)
        _check_file(ck, f, str(path), fresh=f.name in transfer.transferred, verify=verify,
                    digest=transfer.digest())
    commits = {os.path.basename(p[:-len(name) - 1]) for name, p in paths.items()}
    if len(commits) > 1:
        raise PullError(f"{ck.repo_id} changed during the pull of {ck}; pull again", checkpoint=str(ck))
    for f in selection.files:
        if f not in todo:
            _check_file(ck, f, paths[f.name], fresh=False, verify=verify)
    moved = transfer.done - transfer.resumed
    if progress is not None:
        transfer.file = selection.files[-1].name
        transfer.advance(total - transfer.done, finished=True)
    fetched = tuple(paths[f.name] for f in todo if f.name in transfer.transferred or f.name in resumed)
    return replace(_pulled(ck, commits.pop(), selection, paths, moved), fetched=fetched)


def remote_variants(repo: str | Checkpoint, *, settings: HubSettings | None = None) -> tuple[str, ...]:
    """The variants a repo offers on the Hub (Lemonade's ``pull/variants``); raises a :class:`PullError`."""
    ck = Checkpoint.parse(repo)
    s = settings or HubSettings.from_env()
    if s.offline:
        raise HubUnreachable(str(ck), "offline mode is on (HF_HUB_OFFLINE)", downloaded_checkpoints(s))
    try:
        _, listing = _listing(ck, s)
    except Exception as exc:
        raise _translate(exc, ck, s) from exc
    return list_variants(listing)
