"""lemon_magic: declarative, race-free local LLM loading for Jupyter and Python.

The public face is flat: the router (``get_router``, ``Router``, ``AsyncRouter``),
its records, the options and the errors. Load it in IPython with
``%load_ext lemon_magic``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lemon_magic._hub import PullProgress
    from lemon_magic._policy import ModelState
    from lemon_magic._records import (
        Completion,
        DeleteResult,
        LoadResult,
        ModelEntry,
        ModelStatus,
        Plan,
        PullResult,
        RemoteView,
        RouterConfig,
        RouterEvent,
        UnloadResult,
    )
    from lemon_magic.errors import (
        BackendCrashed,
        BackendExited,
        BackendStartError,
        BackendUnavailable,
        ChecksumMismatch,
        DiskFull,
        HealthCheckTimeout,
        HubUnreachable,
        IllegalTransition,
        InferenceError,
        Interrupted,
        InvalidCheckpoint,
        InvalidModelFile,
        InvalidOptions,
        LemonError,
        LoadCancelled,
        LoadError,
        LoadQueueFull,
        ModelNotFound,
        ModelNotLoaded,
        NotDownloaded,
        NotEnoughMemory,
        NotGGUF,
        PullCancelled,
        PullError,
        RemoteAuthError,
        RemoteError,
        RemoteUnreachable,
        RepoAccessDenied,
        RepoNotFound,
        RequestTimeout,
        RouterClosed,
        SlotsFull,
        VariantNotFound,
        WaitTimeout,
    )
    from lemon_magic.options import LoadOptions, ResolvedOptions
    from lemon_magic.registry import DEFAULT_MODEL, Registry
    from lemon_magic.router import AsyncRouter
    from lemon_magic.runtime import Router, Stream, get_router

# Names are imported on first use, so `import lemon_magic` and `%load_ext lemon_magic`
# stay cheap (anyio, httpx and psutil load with the first router call).
_LAZY = {
    "ModelState": "_policy",
    **dict.fromkeys(("BackendCrashed", "BackendExited", "BackendStartError",
                     "BackendUnavailable", "ChecksumMismatch", "DiskFull", "HealthCheckTimeout",
                     "HubUnreachable", "IllegalTransition", "InferenceError", "Interrupted",
                     "InvalidCheckpoint", "InvalidModelFile", "InvalidOptions", "LemonError",
                     "LoadCancelled", "LoadError", "LoadQueueFull", "ModelNotFound", "ModelNotLoaded",
                     "NotDownloaded", "NotEnoughMemory", "NotGGUF", "PullCancelled", "PullError",
                     "RemoteAuthError", "RemoteError", "RemoteUnreachable",
                     "RepoAccessDenied", "RepoNotFound", "RequestTimeout", "RouterClosed",
                     "SlotsFull", "VariantNotFound", "WaitTimeout"), "errors"),
    "LoadOptions": "options", "ResolvedOptions": "options",
    "DEFAULT_MODEL": "registry", "Registry": "registry",
    **dict.fromkeys(("Completion", "DeleteResult", "LoadResult", "ModelEntry", "ModelStatus",
                     "Plan", "PullResult", "RemoteView", "RouterConfig", "RouterEvent",
                     "UnloadResult"), "_records"),
    "PullProgress": "_hub",
    "AsyncRouter": "router",
    "Router": "runtime", "Stream": "runtime", "get_router": "runtime",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lemon_magic' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lemon_magic.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext lemon_magic``: register the magics (the router starts on first use)."""
    import os
    from pathlib import Path

    from lemon_magic._completion import install_completers
    from lemon_magic.magics import LemonMagics, apply_pyproject

    _forget_magics(ipython)
    magics = LemonMagics(shell=ipython)  # Magics() adds itself to the shell's configurables
    try:
        applied = apply_pyproject(magics, Path(os.getcwd()))  # a bad table fails before registering
    except BaseException:
        _forget_magics(ipython)
        raise
    ipython.register_magics(magics)
    install_completers(ipython, magics)
    if applied:
        print(f"lemon_magic: settings from pyproject.toml: {', '.join(applied)}")


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext lemon_magic``: detach the magics; running backends keep running.

    They live in ``lemon_magic.runtime``, so ``%reload_ext lemon_magic`` keeps
    them too. ``%lemon_unload --all`` stops them; so does the kernel's exit.
    """
    from lemon_magic._completion import remove_completers
    from lemon_magic.magics import MAGIC_NAMES

    remove_completers(ipython)
    manager = ipython.magics_manager
    for kind in ("line", "cell"):
        for name in MAGIC_NAMES:
            manager.magics[kind].pop(name, None)
    manager.registry.pop("LemonMagics", None)
    _forget_magics(ipython)


def _forget_magics(ipython: Any) -> None:
    """Drop old LemonMagics instances from the shell's configurables: %config would still
    reach them (and their observers would print) after %unload_ext or %reload_ext."""
    configurables = getattr(ipython, "configurables", None)
    if configurables is not None:
        configurables[:] = [c for c in configurables if type(c).__name__ != "LemonMagics"]


__version__ = "0.1.0"

__all__ = (
    "DEFAULT_MODEL",
    "AsyncRouter",
    "BackendCrashed",
    "BackendExited",
    "BackendStartError",
    "BackendUnavailable",
    "ChecksumMismatch",
    "Completion",
    "DeleteResult",
    "DiskFull",
    "HealthCheckTimeout",
    "HubUnreachable",
    "IllegalTransition",
    "InferenceError",
    "Interrupted",
    "InvalidCheckpoint",
    "InvalidModelFile",
    "InvalidOptions",
    "LemonError",
    "LoadCancelled",
    "LoadError",
    "LoadOptions",
    "LoadQueueFull",
    "LoadResult",
    "ModelEntry",
    "ModelNotFound",
    "ModelNotLoaded",
    "ModelState",
    "ModelStatus",
    "NotDownloaded",
    "NotEnoughMemory",
    "NotGGUF",
    "Plan",
    "PullCancelled",
    "PullError",
    "PullProgress",
    "PullResult",
    "Registry",
    "RemoteAuthError",
    "RemoteError",
    "RemoteUnreachable",
    "RemoteView",
    "RepoAccessDenied",
    "RepoNotFound",
    "RequestTimeout",
    "ResolvedOptions",
    "Router",
    "RouterClosed",
    "RouterConfig",
    "RouterEvent",
    "SlotsFull",
    "Stream",
    "UnloadResult",
    "VariantNotFound",
    "WaitTimeout",
    "get_router",
)
