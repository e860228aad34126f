"""Room for one more model: which models the slot limit evicts, and what memory admits.

The policy itself is pure (``_policy``); this module measures the slots (RSS via
psutil, estimates from GGUF metadata) and feeds it. The router calls these
under its lock.
"""

from __future__ import annotations

from collections.abc import Iterable

import psutil

from lemon_magic._policy import ModelState, SlotView, admit_memory, choose_evictions
from lemon_magic._records import RouterConfig
from lemon_magic._slot import Slot
from lemon_magic.backends._process import BackendProcess
from lemon_magic.options import ResolvedOptions
from lemon_magic.registry import ModelSpec

__all__ = ("memory_needed", "memory_victims", "rss", "slot_victims", "view")


def rss(process: BackendProcess | None) -> int:
    """Resident memory of a live backend process, in bytes (0 if it is gone)."""
    if process is None or process.returncode is not None:
        return 0
    try:
        return int(psutil.Process(process.pid).memory_info().rss)
    except psutil.Error:
        return 0


def memory_needed(spec: ModelSpec, options: ResolvedOptions) -> int:
    """Estimated bytes a backend needs: weights + f16 KV cache, plus 10% and 64 MiB."""
    info = spec.info
    return int((info.size + info.kv_cache_bytes(options.ctx_size)) * 1.1) + 64 * 2**20


def view(m: Slot) -> SlotView:
    """What eviction and memory admission see of ``m``. A loading model counts at least at
    its estimate: early in a load its RSS is near zero, and two concurrent loads that
    together exceed the budget must not both be admitted."""
    used = rss(m.process)
    if m.state is ModelState.LOADING and m.options is not None:
        used = max(used, memory_needed(m.spec, m.options))
    return SlotView(m.name, m.state, m.pinned, m.last_used, used)


def slot_victims(slots: Iterable[Slot], m: Slot, kind: str, config: RouterConfig) -> list[str]:
    """The models the slot limit of ``kind`` evicts to make room for ``m``.

    :raises SlotsFull: pinned models fill every slot.
    """
    holders = [view(o) for o in slots
               if o is not m and o.spec.kind == kind
               and o.state in (ModelState.LOADING, ModelState.READY)]
    return choose_evictions(m.name, kind, holders, config.max_loaded.get(kind, 1))


def memory_victims(slots: Iterable[Slot], m: Slot, spec: ModelSpec, options: ResolvedOptions,
                   victims: list[str], config: RouterConfig) -> list[str]:
    """Extra models to evict so that ``m`` fits in memory once ``victims`` are gone.

    :raises NotEnoughMemory: it cannot fit even after evicting every candidate.
    """
    need = memory_needed(spec, options)
    views = {o.name: view(o) for o in slots if o.state in (ModelState.READY, ModelState.LOADING)}
    freed = sum(views[v].rss for v in victims if v in views)
    if m.name in views:  # a reload frees the old process
        freed += views[m.name].rss
    available = psutil.virtual_memory().available + freed
    if config.memory_limit is not None:
        in_use = sum(v.rss for n, v in views.items() if n not in victims and n != m.name)
        available = min(available, config.memory_limit - in_use)
    evictable = [v for n, v in views.items()
                 if n not in victims and n != m.name and not v.pinned
                 and v.state is ModelState.READY]
    return admit_memory(m.name, need, available, evictable)
