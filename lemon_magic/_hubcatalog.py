"""The built-in catalog of small GGUF models that can be pulled by name (``lemon_magic/catalog.json``).

Each entry has a Lemonade-style name (``Qwen3-0.6B-GGUF``), a checkpoint
``org/repo:VARIANT``, a kind (``llm`` or ``embedding``), an approximate download
size and the load options it is registered with. The file is data: edit it, not
this module. It is read once and checked as a whole: a bad entry fails the load
of the catalog with a message that names it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any

from lemon_magic._hubfiles import Checkpoint
from lemon_magic.errors import InvalidOptions, LemonError
from lemon_magic.options import LoadOptions
from lemon_magic.registry import MODEL_KINDS

__all__ = ("CatalogEntry", "catalog_entry", "load_catalog")

@dataclass(frozen=True)
class CatalogEntry:
    """One model of the built-in catalog."""

    name: str
    checkpoint: str  #: ``org/repo:VARIANT``
    kind: str
    size: int  #: approximate download size, bytes
    labels: tuple[str, ...]
    description: str
    defaults: LoadOptions

    @property
    def parsed(self) -> Checkpoint:
        return Checkpoint.parse(self.checkpoint)


def _entry(name: str, raw: Mapping[str, Any]) -> CatalogEntry:
    try:
        ck = Checkpoint.parse(raw["checkpoint"])
        if ck.variant is None:
            raise InvalidOptions("its checkpoint names no variant")
        if raw["kind"] not in MODEL_KINDS:
            raise InvalidOptions(f"kind {raw['kind']!r} is not one of {', '.join(MODEL_KINDS)}")
        return CatalogEntry(name, str(ck), raw["kind"], int(float(raw["size_gb"]) * 1e9),
                            tuple(raw.get("labels", ())), str(raw.get("description", "")),
                            LoadOptions.from_kwargs(raw.get("defaults", {})))
    except (KeyError, TypeError, ValueError, LemonError) as exc:
        what = f"misses {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"catalog.json: entry {name!r}: {what}") from exc


@cache
def load_catalog() -> Mapping[str, CatalogEntry]:
    """Name -> entry, in the file's order (read once; read-only)."""
    text = resources.files("lemon_magic").joinpath("catalog.json").read_text(encoding="utf-8")
    models = json.loads(text)["models"]
    return MappingProxyType({name: _entry(name, raw) for name, raw in models.items()})


def catalog_entry(name: str) -> CatalogEntry | None:
    """The entry called ``name`` (exactly, else ignoring case), or ``None``."""
    catalog = load_catalog()
    if name in catalog:
        return catalog[name]
    folded = {n.casefold(): e for n, e in catalog.items()}
    return folded.get(name.casefold())
