"""Tab completion of model names after the magics that take one."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lemon_magic.magics import LemonMagics

__all__ = ("install_completers", "remove_completers")

_COMPLETED = ("lemon_load", "lemon_unload", "lemon_logs", "lemon_infer", "lemon_unregister")


def install_completers(shell: Any, magics: LemonMagics) -> None:
    """Tab-complete model names after the magics that take one (replacing earlier ones)."""

    def complete(_self: Any, event: Any) -> Iterable[str]:
        return magics.complete_model_names(event.symbol)

    complete.lemon_magic = True  # type: ignore[attr-defined]
    remove_completers(shell)
    for name in _COMPLETED:
        for prefix in ("%", "%%"):
            shell.set_hook("complete_command", complete, str_key=f"{prefix}{name}")


def remove_completers(shell: Any) -> None:
    """Drop the completers :func:`install_completers` added (``%unload_ext``)."""
    dispatcher = getattr(shell, "strdispatchers", {}).get("complete_command")
    if dispatcher is None:
        return
    for name in _COMPLETED:
        for prefix in ("%", "%%"):
            chain = dispatcher.strs.get(f"{prefix}{name}")
            if chain is None:
                continue
            chain.chain = [(p, f) for p, f in chain.chain
                           if not getattr(getattr(f, "__func__", f), "lemon_magic", False)]
            if not chain.chain:
                del dispatcher.strs[f"{prefix}{name}"]
