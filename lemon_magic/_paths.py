"""Where lemon_magic keeps its files: cache (models, built binaries), config, runtime state."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ("cache_dir", "config_dir", "state_dir")


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def cache_dir() -> Path:
    """``$LEMON_MAGIC_CACHE_DIR``, else ``$XDG_CACHE_HOME/lemon_magic`` (``~/.cache/lemon_magic``)."""
    override = os.environ.get("LEMON_MAGIC_CACHE_DIR")
    return Path(override) if override else _xdg("XDG_CACHE_HOME", ".cache") / "lemon_magic"


def config_dir() -> Path:
    """``$LEMON_MAGIC_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/lemon_magic`` (``~/.config/lemon_magic``)."""
    override = os.environ.get("LEMON_MAGIC_CONFIG_DIR")
    return Path(override) if override else _xdg("XDG_CONFIG_HOME", ".config") / "lemon_magic"


def state_dir() -> Path:
    """Runtime state (pid records of running backends): ``$LEMON_MAGIC_STATE_DIR``, else
    ``<cache_dir>/run``."""
    override = os.environ.get("LEMON_MAGIC_STATE_DIR")
    return Path(override) if override else cache_dir() / "run"
