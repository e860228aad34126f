"""lemon_magic: declarative, race-free local LLM loading for Jupyter and Python.

The public face is flat: the router (``get_router``, ``Router``, ``AsyncRouter``),
its records, the options and the errors. Load it in IPython with
``%load_ext lemon_magic``.
"""

from __future__ import annotations

from lemon_magic._policy import ModelState
from lemon_magic.errors import (
    BackendExited,
    BackendStartError,
    BackendUnavailable,
    HealthCheckTimeout,
    InferenceError,
    InvalidModelFile,
    InvalidOptions,
    LemonError,
    LoadCancelled,
    LoadError,
    ModelNotFound,
    ModelNotLoaded,
    NotEnoughMemory,
    RouterClosed,
    SlotsFull,
    WaitTimeout,
)
from lemon_magic.options import LoadOptions, ResolvedOptions
from lemon_magic.registry import DEFAULT_MODEL, Registry
from lemon_magic.router import (
    AsyncRouter,
    Completion,
    LoadResult,
    ModelStatus,
    Plan,
    RouterConfig,
    RouterEvent,
    UnloadResult,
)
from lemon_magic.runtime import Router, Stream, get_router

__version__ = "0.1.0"

__all__ = (
    "DEFAULT_MODEL",
    "AsyncRouter",
    "BackendExited",
    "BackendStartError",
    "BackendUnavailable",
    "Completion",
    "HealthCheckTimeout",
    "InferenceError",
    "InvalidModelFile",
    "InvalidOptions",
    "LemonError",
    "LoadCancelled",
    "LoadError",
    "LoadOptions",
    "LoadResult",
    "ModelNotFound",
    "ModelNotLoaded",
    "ModelState",
    "ModelStatus",
    "NotEnoughMemory",
    "Plan",
    "Registry",
    "ResolvedOptions",
    "Router",
    "RouterClosed",
    "RouterConfig",
    "RouterEvent",
    "SlotsFull",
    "Stream",
    "UnloadResult",
    "WaitTimeout",
    "get_router",
)
