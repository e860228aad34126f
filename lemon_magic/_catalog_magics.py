"""The magics of the model catalogue: list, register, forget (a mixin of ``LemonMagics``).

Its methods are decorated here and collected by ``@magics_class`` on
``LemonMagics``, whose module imports this one first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from IPython.core.error import UsageError
from IPython.core.magic import line_magic
from IPython.core.magic_arguments import argument, magic_arguments

from lemon_magic import _render
from lemon_magic._magic_args import _no_abbrev, _parse

if TYPE_CHECKING:
    from lemon_magic.runtime import Router

__all__ = ("CatalogMagics",)


class CatalogMagics:
    """``%lemon_models``, ``%lemon_register``, ``%lemon_unregister``."""

    @property
    def router(self) -> Router:
        raise NotImplementedError  # LemonMagics.router

    @line_magic
    def lemon_models(self, line: str) -> _render.ModelsTable:
        """Built-in and registered models, and which of them are loaded.

        In [1]: %lemon_models
        """
        if line.strip():
            raise UsageError("%lemon_models takes no arguments")
        return _render.ModelsTable(self.router.models())

    @_no_abbrev
    @magic_arguments()
    @argument("name", help="the name to register")
    @argument("path", help="path of the .gguf file")
    @argument("--kind", default="llm", help="llm, embedding or reranking")
    @argument("--ctx-size", help="default context size")
    @argument("--threads", help="default CPU threads")
    @argument("--backend", help="default backend")
    @argument("--chat-template", help="default chat template")
    @argument("--description", default="", help="a note shown by %%lemon_models")
    @line_magic
    def lemon_register(self, line: str) -> None:
        """Give a GGUF file a name, with default load options (kept across sessions).

        In [1]: %lemon_register tiny /data/tiny.gguf --ctx-size 2048
        registered tiny → /data/tiny.gguf
        """
        args = _parse(self.lemon_register, line)
        defaults = {k: v for k, v in {"ctx_size": args.ctx_size, "threads": args.threads,
                                      "backend": args.backend,
                                      "chat_template": args.chat_template}.items() if v is not None}
        spec = self.router.register(args.name, args.path, kind=args.kind,
                                    description=args.description, **defaults)
        print(f"registered {spec.name} → {spec.path}")

    @_no_abbrev
    @magic_arguments()
    @argument("name", help="the registered name to forget (a loaded model is unloaded first)")
    @line_magic
    def lemon_unregister(self, line: str) -> None:
        """Forget a registered name (its file stays on disk).

        In [1]: %lemon_unregister tiny
        unregistered tiny
        """
        args = _parse(self.lemon_unregister, line)
        unloaded = self.router.unregister(args.name)
        print(f"unregistered {args.name}" + (f" (unloaded pid {unloaded.pid})" if unloaded and
                                              unloaded.pid else ""))
