"""The magics of the model catalogue: list, register, forget (a mixin of ``LemonMagics``).

Its methods are decorated here and collected by ``@magics_class`` on
``LemonMagics``, whose module imports this one first. Like that module, it imports
what a magic needs when the magic first runs, so ``%load_ext`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from IPython.core.error import UsageError
from IPython.core.magic import line_magic
from IPython.core.magic_arguments import argument, magic_arguments

from lemon_magic import errors
from lemon_magic._magic_args import _interrupted, _no_abbrev, _parse

if TYPE_CHECKING:
    from lemon_magic import _render
    from lemon_magic.runtime import Router

__all__ = ("CatalogMagics",)


class CatalogMagics:
    """``%lemon_models``, ``%lemon_pull``, ``%lemon_delete``, ``%lemon_register``,
    ``%lemon_unregister``."""

    @property
    def router(self) -> Router:
        raise NotImplementedError  # LemonMagics.router

    @_no_abbrev
    @magic_arguments()
    @argument("--all", action="store_true",
              help="also the built-in catalogue's models that are not pulled yet")
    @line_magic
    def lemon_models(self, line: str) -> _render.ModelsTable:
        """Built-in, registered and pulled models, and which of them are loaded; with ``--all``
        also the catalogue (loadable by name: the first load pulls it), with download sizes.

        In [1]: %lemon_models --all
        """
        from lemon_magic._render import ModelsTable

        args = _parse(self.lemon_models, line)
        return ModelsTable(self.router.models(all=args.all))

    @_no_abbrev
    @magic_arguments()
    @argument("model", help="a catalogue name (%%lemon_models --all) or a Hub checkpoint: "
                            "org/repo or org/repo:VARIANT (Q4_K_M, or a file name)")
    @argument("--name", help="the name to register it as (default: as written)")
    @line_magic
    def lemon_pull(self, line: str) -> None:
        """Download a model from the Hugging Face Hub and register it (no load); progress shows
        in the cell, Stop cancels the download and registers nothing.

        In [1]: %lemon_pull unsloth/Qwen3-0.6B-GGUF:Q8_0 --name qwen-small
        pulled unsloth/Qwen3-0.6B-GGUF:Q8_0 as qwen-small (805 MB downloaded in 41.2 s)
        """
        from lemon_magic._progress import PullBar
        from lemon_magic._render import describe_pull

        args = _parse(self.lemon_pull, line)
        bar = PullBar(args.name or args.model)
        try:
            result = self.router.pull(args.model, name=args.name, progress=bar)
            bar.close(done=True)
        except errors.Interrupted as exc:
            raise _interrupted(exc) from None
        finally:
            bar.close()
        print(describe_pull(result))

    @_no_abbrev
    @magic_arguments()
    @argument("name", help="a registered or pulled model")
    @line_magic
    def lemon_delete(self, line: str) -> None:
        """Unload a model if it is loaded, forget it, and remove its pulled files.

        In [1]: %lemon_delete qwen-small
        deleted qwen-small (removed 805 MB from the Hugging Face cache)

        Only files a pull of ours downloaded are removed: files that were in the Hugging Face
        cache before (another tool's), and files another registration pulled from the same repo
        uses, are kept, and it says which and why; the built-in model cannot be deleted.
        """
        args = _parse(self.lemon_delete, line)
        result = self.router.delete(args.name)
        parts = []
        if result.unloaded_pid:
            parts.append(f"unloaded pid {result.unloaded_pid}")
        if result.freed:
            parts.append(f"removed {result.freed / 1e6:.0f} MB from the Hugging Face cache")
        if result.kept:
            n = len(result.kept)
            parts.append(f"kept {n} file{'' if n == 1 else 's'} in the Hugging Face cache: "
                         + result.kept_why.replace("(delete that", "(%lemon_delete that"))
        print(f"deleted {result.model}" + (f" ({'; '.join(parts)})" if parts else ""))

    @_no_abbrev
    @magic_arguments()
    @argument("name", help="the name to register")
    @argument("path", nargs="?", help="path of the .gguf file (not with --remote)")
    @argument("--remote", help="a server that serves the model: http(s)://host:port[/v1]")
    @argument("--remote-model", help="the model's name on that server")
    @argument("--api", default="lemonade", help="what the server speaks: lemonade (Lemonade "
                                                 "Server, lemon-magic serve) or openai")
    @argument("--api-key-env", help="environment variable holding the server's API key")
    @argument("--kind", default="llm", help="llm, embedding or reranking")
    @argument("--ctx-size", help="default context size")
    @argument("--threads", help="default CPU threads")
    @argument("--backend", help="default backend (a lemonade remote: its llama.cpp device)")
    @argument("--chat-template", help="default chat template")
    @argument("--description", default="", help="a note shown by %%lemon_models")
    @line_magic
    def lemon_register(self, line: str) -> None:
        """Give a GGUF file, or a model another server serves, a name with default load options
        (kept across sessions; an API key is never stored, only its variable's name).

        In [1]: %lemon_register tiny /data/tiny.gguf --ctx-size 2048
        registered tiny → /data/tiny.gguf
        In [2]: %lemon_register big --remote http://gpu-box:13305 --remote-model Qwen3-8B-GGUF
        registered big → http://gpu-box:13305 (lemonade: Qwen3-8B-GGUF)
        """
        args = _parse(self.lemon_register, line)
        defaults = {k: v for k, v in {"ctx_size": args.ctx_size, "threads": args.threads,
                                      "backend": args.backend,
                                      "chat_template": args.chat_template}.items() if v is not None}
        if args.remote is None:
            if args.path is None:
                raise UsageError("give the .gguf file's path, or --remote URL --remote-model NAME")
            if args.remote_model or args.api_key_env:
                raise UsageError("--remote-model and --api-key-env go with --remote URL")
            spec = self.router.register(args.name, args.path, kind=args.kind,
                                        description=args.description, **defaults)
        else:
            if args.path is not None:
                raise UsageError(f"give a path or --remote, not both (got {args.path!r} and "
                                 f"--remote {args.remote})")
            spec = self.router.register_remote(args.name, args.remote, args.remote_model,
                                               api=args.api, api_key_env=args.api_key_env,
                                               kind=args.kind, description=args.description,
                                               **defaults)
        print(f"registered {spec.name} → {spec.where}")

    @_no_abbrev
    @magic_arguments()
    @argument("name", help="the registered name to forget (a model loaded here is unloaded first; "
                               "a remote model stays loaded on its server)")
    @line_magic
    def lemon_unregister(self, line: str) -> None:
        """Forget a registered name (its file stays on disk).

        In [1]: %lemon_unregister tiny
        unregistered tiny
        """
        from lemon_magic._policy import ModelState

        args = _parse(self.lemon_unregister, line)
        remote = next((s for s in self.router.status() if s.name == args.name and s.remote
                       and s.state is ModelState.READY), None)
        unloaded = self.router.unregister(args.name)
        note = f" (unloaded pid {unloaded.pid})" if unloaded and unloaded.pid else ""
        if remote is not None and remote.remote is not None:
            note = (f" (it stays loaded on {remote.remote.url} as {remote.remote.remote_model!r}; "
                    "register it again to unload it there)")
        print(f"unregistered {args.name}{note}")
