"""Models by name from the Hugging Face Hub, under the load contract: one pull per model.

A name that is neither registered nor a path can still be loaded when it is
pullable (:func:`pull_target`): a model of the built-in catalogue
(``Qwen3-0.6B-GGUF``) or a checkpoint (``org/repo[:VARIANT]``). Its first load,
auto-load or ``pull`` starts a *pull flight*, a task in the router's task group:
``huggingface_hub`` downloads the files in a worker thread (:mod:`lemon_magic._hub`),
then the model is registered under that name, and only then can a load spawn a
backend. Any number of callers of one name join the same flight: one transfer,
then one spawn. A caller that goes away (Stop) stops waiting; when the last one
has gone, the download is cancelled at its next chunk (files completed before stay
in the cache; a cancelled file is resumed by the next pull) and nothing is
registered; a caller that comes while a cancelled flight ends starts a new one.
A Stop that comes once the files are complete and checked no longer undoes
anything: the registration (a file write) completes. A failed pull leaves the
registry as it was. ``delete`` of a name being pulled cancels that pull first.

While a flight runs, ``status()`` has a row for the model whose ``download`` says
how far it is, and subscribers get an event (``unloaded → unloaded`` with the
progress as ``detail``) at most every :data:`PROGRESS_EVERY` seconds.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from lemon_magic import _catalog, _hub
from lemon_magic._hubcatalog import catalog_entry, load_catalog
from lemon_magic._policy import ModelState
from lemon_magic._records import DeleteResult, ModelEntry, ModelStatus, PullResult, RouterEvent
from lemon_magic.errors import (
    InvalidCheckpoint,
    InvalidModelFile,
    InvalidOptions,
    LemonError,
    ModelNotFound,
    ModelNotLoaded,
    NotDownloaded,
    PullCancelled,
    PullError,
    RouterClosed,
)
from lemon_magic.options import LoadOptions
from lemon_magic.registry import DEFAULT_MODEL, ModelSpec, Registry

if TYPE_CHECKING:
    from lemon_magic.router import AsyncRouter

__all__ = ("PROGRESS_EVERY", "PullTarget", "Pulls", "catalog_entries", "looks_like_checkpoint",
           "pull", "pull_target", "registered_target", "spec_for_plan", "spec_or_pull")

#: seconds between two progress events of one pull
PROGRESS_EVERY = 0.25


@dataclass(frozen=True)
class PullTarget:
    """What pulling a name means: which checkpoint, and how to register it."""

    name: str
    checkpoint: str
    kind: str = "llm"
    description: str = ""
    defaults: LoadOptions = field(default_factory=LoadOptions)


def looks_like_checkpoint(text: str) -> bool:
    """Whether ``text`` is a Hub checkpoint (``org/repo[:VARIANT]``) rather than a file path:
    one slash, no leading ``/``, ``.`` or ``~``, a ``.gguf`` ending only after a ``:``, and no
    such file here."""
    if text.count("/") != 1 or text.startswith(("/", ".", "~")):
        return False
    if text.lower().endswith(".gguf") and ":" not in text:
        return False
    try:
        _hub.Checkpoint.parse(text)
    except InvalidCheckpoint:
        return False
    return not Path(text).exists()


def pull_target(name: str, *, register_as: str | None = None) -> PullTarget | None:
    """The pull that ``name`` means (``None``: it is not pullable): a catalogue model (its
    checkpoint, kind and load defaults) or a checkpoint, registered as ``register_as`` (by
    default: ``name`` itself)."""
    entry = catalog_entry(name)
    if entry is not None:
        return PullTarget(register_as or entry.name, entry.checkpoint, entry.kind, entry.description,
                          entry.defaults)
    if looks_like_checkpoint(name):
        return PullTarget(register_as or name, name)
    return None


async def _spec_or_target(router: AsyncRouter, model: str) -> ModelSpec | PullTarget:
    """The spec of ``model``, or, when it is not here but pullable, the pull that brings it: a
    catalogue model or a checkpoint never seen, or a pulled model whose files have gone.

    :raises LemonError: neither (the resolution's own error).
    """
    try:
        return await router._spec(model)
    except (ModelNotFound, InvalidModelFile):
        canonical = canonical_name(router.registry, model)
        if canonical != model and canonical in router.registry.names():
            return await router._spec(canonical)  # pulled before, under the catalogue's spelling
        target = registered_target(router.registry, model) or pull_target(model)
        if target is None:
            raise
        return target


async def spec_or_pull(router: AsyncRouter, model: str) -> ModelSpec:
    """The spec of ``model``, pulling it first if it is pullable and not here."""
    found = await _spec_or_target(router, model)
    if isinstance(found, ModelSpec):
        return found
    pulled = await router._pulls.pull(found)
    return await router._spec(pulled.model)  # the catalogue's spelling of a name typed in any case


async def spec_for_plan(router: AsyncRouter, model: str) -> ModelSpec:
    """The spec of ``model`` for ``plan``, which never pulls.

    :raises NotDownloaded: a load would pull it first.
    """
    found = await _spec_or_target(router, model)
    if isinstance(found, ModelSpec):
        return found
    entry = catalog_entry(found.name)
    raise NotDownloaded(model, found.checkpoint, entry.size if entry else None)


async def pull(router: AsyncRouter, model: str, name: str | None) -> PullResult:
    """``router.pull``: a catalogue model, a checkpoint, or a pulled model's name (pulled again:
    only what changed on the Hub is fetched), registered as ``name`` (default: ``model``).

    :raises ModelNotFound: ``model`` is none of those.
    """
    if router._closed:
        raise RouterClosed()
    if name is None and _is_local(router.registry, model):  # nothing to pull: say where it is
        spec = await router._spec(model)
        return PullResult(spec.name, "", str(spec.path), spec.path.stat().st_size, 0, 0.0)
    target = registered_target(router.registry, model) if name is None else None
    target = target or pull_target(model, register_as=name)
    if target is None and (name is not None or "/" in model):
        _hub.Checkpoint.parse(model)  # raises InvalidCheckpoint, saying why
    if target is None:
        raise ModelNotFound(model, [e.name for e in catalog_entries(set())], paths=False,
                            what="a catalogue model or a checkpoint (org/repo or org/repo:VARIANT)")
    return await router._pulls.pull(target)


def _is_local(registry: Registry, name: str) -> bool:
    """Whether ``name`` is the built-in model or a registration of a local file (not pulled).

    :raises InvalidOptions: ``name`` is a remote model (its server has its files).
    """
    try:
        spec = registry.lookup(name)
    except LemonError:
        return False
    if spec.remote is not None:
        raise InvalidOptions(f"{name!r} is a remote model: its server has its files, there is "
                             "nothing to pull")
    return spec.source in ("builtin", "user") and spec.checkpoint is None


def registered_target(registry: Registry, name: str) -> PullTarget | None:
    """The pull of a registered, pulled model (``None``: ``name`` was not pulled)."""
    try:
        spec = registry.lookup(name)
    except LemonError:
        return None
    if spec.checkpoint is None:
        return None
    return PullTarget(name, spec.checkpoint, spec.kind, spec.description, spec.defaults)


def catalog_entries(registered: set[str]) -> list[ModelEntry]:
    """The catalogue's models that are not registered (yet), as ``models(all=True)`` lists them."""
    return [ModelEntry(e.name, "catalog", e.kind, e.checkpoint, False, description=e.description,
                       checkpoint=e.checkpoint, size=e.size)
            for e in load_catalog().values() if e.name not in registered]


@dataclass(eq=False)
class _Flight:
    target: PullTarget
    started: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    waiters: int = 0
    #: the latest report from the worker thread (written there, read on the loop)
    progress: _hub.PullProgress | None = None
    result: PullResult | None = None
    error: LemonError | None = None


class Pulls:
    """The router's pull flights, by the name they register (loop thread only)."""

    def __init__(self, router: AsyncRouter) -> None:
        self._router = router
        self._flights: dict[str, _Flight] = {}

    async def pull(self, target: PullTarget) -> PullResult:
        """Pull ``target`` and register it, joining a pull of the same name in flight.

        :raises PullError: the pull failed or was cancelled (nothing is registered).
        :raises LemonError: the registration failed.
        """
        router = self._router
        while True:
            if router._closed:
                raise RouterClosed()
            flight = self._flights.get(target.name)
            if flight is None or not flight.cancel.is_set():
                break
            await flight.done.wait()  # a cancelled pull is ending (Stop): then start anew
        if flight is not None and not _same_checkpoint(flight.target.checkpoint, target.checkpoint):
            raise InvalidOptions(f"{target.name!r} is being pulled from {flight.target.checkpoint} "
                                 f"right now: wait for it, or pull {target.checkpoint} under another name")
        joined = flight is not None
        if flight is None:
            flight = _Flight(target)
            assert router._tg is not None
            router._tg.start_soon(self._run, flight)  # before it is listed: a closed group raises
            self._flights[target.name] = flight
        flight.waiters += 1
        try:
            await flight.done.wait()
        finally:
            flight.waiters -= 1
            if not flight.waiters and not flight.done.is_set():
                flight.cancel.set()  # nobody waits any more (Stop): end the transfer
        if flight.error is not None:
            raise flight.error
        assert flight.result is not None
        return flight.result if not joined else _joined(flight.result)

    def cancel_all(self) -> None:
        """Cancel every pull (the router is closing)."""
        for flight in self._flights.values():
            flight.cancel.set()

    def statuses(self, known: set[str]) -> list[ModelStatus]:
        """A row for each model being pulled that has no row in ``known``."""
        wall = time.time() - time.monotonic()
        return [ModelStatus(name, f.target.kind, ModelState.UNLOADED, None, None, None, None, None,
                            False, None, None, 0, None, (), since=wall + f.started, download=_describe(f))
                for name, f in self._flights.items() if name not in known]

    def progress(self, name: str) -> _hub.PullProgress | None:
        """The latest progress report of the pull of ``name`` (``None``: none yet, or none runs)."""
        flight = self._flights.get(name)
        return flight.progress if flight is not None else None

    def download(self, name: str) -> str | None:
        """How far the pull of ``name`` is (``None``: none runs)."""
        flight = self._flights.get(name)
        return _describe(flight) if flight is not None else None

    async def _run(self, flight: _Flight) -> None:
        target = flight.target
        name = target.name

        def report(progress: _hub.PullProgress) -> None:  # on the worker thread
            flight.progress = progress

        self._emit(name, f"pulling {target.checkpoint}")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._report_progress, flight)
                try:  # failures are caught here, inside the group: no exception group
                    pulled = await anyio.to_thread.run_sync(functools.partial(
                        _hub.pull, target.checkpoint, progress=report, cancel=flight.cancel))
                    if flight.cancel.is_set():  # Stop came after the last chunk: register nothing
                        raise PullCancelled(target.checkpoint)
                    flight.result = await self._register(target, pulled, flight.started)
                except LemonError as exc:
                    flight.error = exc
                except Exception as exc:  # unexpected: still one clear error
                    flight.error = PullError(f"the pull of {target.checkpoint} failed: "
                                             f"{type(exc).__name__}: {exc}", checkpoint=target.checkpoint)
                finally:
                    tg.cancel_scope.cancel()
        finally:
            if flight.result is None and flight.error is None:  # cancelled from outside
                flight.error = PullCancelled(target.checkpoint)
            if self._flights.get(name) is flight:
                del self._flights[name]
            flight.done.set()
            self._emit(name, str(flight.error) if flight.error else _describe(flight) or "")

    async def _register(self, target: PullTarget, pulled: _hub.PulledModel, began: float) -> PullResult:
        """Register the pulled file under ``target.name``; a name registered before keeps its
        saved options, kind and description (decided on a fresh read under the registry's lock)."""
        await _catalog.register_pulled(self._router, target.name, pulled.path, pulled.checkpoint,
                                       kind=target.kind, description=target.description,
                                       defaults=target.defaults, files=pulled.files,
                                       downloaded=pulled.fetched)
        return PullResult(target.name, pulled.checkpoint, pulled.path, pulled.size, pulled.downloaded,
                          time.monotonic() - began)

    async def _report_progress(self, flight: _Flight) -> None:
        last = None
        try:
            while True:
                await anyio.sleep(PROGRESS_EVERY)
                if flight.progress is not last and flight.progress is not None:
                    last = flight.progress
                    self._emit(flight.target.name, _describe(flight) or "")
        finally:  # cancelled with the pull's group: tell the worker thread (it checks per chunk)
            if flight.result is None:
                flight.cancel.set()

    def _emit(self, name: str, detail: str) -> None:
        now = time.time()
        self._router._emit(RouterEvent(name, ModelState.UNLOADED, ModelState.UNLOADED, now, 0.0, detail))

    async def delete(self, name: str) -> DeleteResult:
        """Unload ``name`` if it is loaded, forget its registration, and remove from the Hub's
        cache the files that pulls of ours downloaded for it. The others stay, and the result
        says which and why: files that were in the cache before our pull (another tool's, or
        another user's), all of them when another registration was pulled from the same repo
        (it inherits what we downloaded, so the last one deleted removes it), and all of them
        for an entry written before the downloaded files were recorded (it cannot tell).

        :raises ModelNotFound: ``name`` is not a user registration.
        """
        router = self._router
        flight = self._flights.get(name)
        if flight is not None:  # a pull of it runs: it ends first, registering nothing
            flight.cancel.set()
            await flight.done.wait()
        if name not in router.registry.user_names():
            if name == DEFAULT_MODEL:
                router.registry.unregister(name)  # raises: it is built in
            raise ModelNotFound(name, router.registry.user_names(), paths=False)
        spec = router.registry.lookup(name)
        unloaded = None
        if spec.remote is not None:  # delete means gone: unloaded on its server too
            with contextlib.suppress(ModelNotLoaded):
                unloaded = await router.unload(name, reason="deleted")
        unloaded = await router.unregister(name) or unloaded
        freed = 0
        kept_for: tuple[str, ...] = ()
        kept: tuple[str, ...] = ()
        why = ""
        if spec.checkpoint is not None:
            owned = spec.downloaded
            # every repo whose files it owns: a name pulled again from another repo owns both
            kept_for = self._shared(spec.path, *(Path(p) for p in owned or ()))
            files = await anyio.to_thread.run_sync(_local_files, spec)  # while a split one is whole
            if kept_for:
                if owned:
                    await anyio.to_thread.run_sync(router.registry.adopt_downloaded, kept_for, owned)
                why = (f"{', '.join(kept_for)} {'was' if len(kept_for) == 1 else 'were'} pulled "
                       "from the same repo (delete that too to remove them)")
            elif owned is None:
                why = KEPT_OLD_ENTRY
            else:
                freed = await anyio.to_thread.run_sync(_hub.remove_files, owned)
                why = KEPT_NOT_OURS
            kept = tuple(f for f in files if os.path.exists(f))
            why = why if kept else ""
        return DeleteResult(name, unloaded.pid if unloaded else None, freed, kept_for, kept, why)

    def _shared(self, *paths: Path) -> tuple[str, ...]:
        """The other registrations pulled into the repo folder of any of ``paths``, in the same
        cache (removing a checkpoint's files touches every snapshot of its repo, so they stay)."""
        registry, folders = self._router.registry, {_repo_folder(p) for p in paths}
        out = []
        for other in registry.user_names():
            try:
                spec = registry.lookup(other)
            except LemonError:
                continue
            if spec.checkpoint is not None and _repo_folder(spec.path) in folders:
                out.append(other)
        return tuple(out)


#: why ``delete`` keeps a pulled model's files: our pull found them in the cache
KEPT_NOT_OURS = ("lemon_magic did not download them: they were in the Hugging Face cache before "
                 "its pull (another tool or user put them there; remove them with `hf cache delete` "
                 "if nothing else needs them)")
#: why ``delete`` keeps the files of an entry written before the downloaded files were recorded
KEPT_OLD_ENTRY = ("the model was registered before lemon_magic recorded which files its pulls "
                  "download, so it cannot tell whether another tool put them there (remove them with "
                  "`hf cache delete` if nothing else needs them)")


def _local_files(spec: ModelSpec) -> tuple[str, ...]:
    """The files of ``spec``'s checkpoint still in the Hub's cache (its snapshot links)."""
    assert spec.checkpoint is not None
    found = _hub.find_local(spec.checkpoint)
    files = [*(found.files if found is not None else ()), *(spec.downloaded or ())]
    return tuple(f for f in dict.fromkeys(files) if os.path.exists(f))


def _repo_folder(path: Path) -> str:
    """The Hub cache's folder of the repo a pulled file is in (its link resolves into
    ``models--org--repo/blobs/``)."""
    return os.path.dirname(os.path.dirname(os.path.realpath(path)))


def _same_checkpoint(a: str, b: str) -> bool:
    """Whether two spellings can mean the same pull (one repo; variants equal, or one unset)."""
    ca, cb = _hub.Checkpoint.parse(a), _hub.Checkpoint.parse(b)
    return ca.repo_id == cb.repo_id and (ca.variant is None or cb.variant is None
                                         or ca.variant.casefold() == cb.variant.casefold())


def canonical_name(registry: Registry, name: str) -> str:
    """The name a pull of ``name`` registers (and its flight is known by): a catalogue model's
    own spelling when ``name`` is one typed in another case, else ``name``."""
    if name in registry.names():
        return name
    entry = catalog_entry(name)
    return entry.name if entry is not None else name


def _joined(result: PullResult) -> PullResult:
    return PullResult(result.model, result.checkpoint, result.path, result.size, 0, result.seconds,
                      joined=True)


def _describe(flight: _Flight) -> str | None:
    if flight.error is not None:
        return None
    progress = flight.progress
    if flight.result is not None:
        return f"pulled {flight.result.checkpoint} ({flight.result.size / 1e6:.0f} MB)"
    if progress is None:
        return f"downloading {flight.target.checkpoint}: starting"
    return progress.describe()

