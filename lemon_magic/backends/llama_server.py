"""llama.cpp's ``llama-server``, launched the way Lemonade launches it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lemon_magic._templates import is_template_file
from lemon_magic.backends.base import Backend
from lemon_magic.errors import BackendUnavailable
from lemon_magic.options import ResolvedOptions

__all__ = ("ENV_VAR", "LlamaServer")

#: environment variable naming the llama-server binary
ENV_VAR = "LEMON_MAGIC_LLAMA_SERVER"


class LlamaServer(Backend):
    """``llama-server`` found through ``binary=``, ``$LEMON_MAGIC_LLAMA_SERVER``, PATH, or the
    cache where ``python -m lemon_magic.build_llama_server`` puts it (in that order; in the
    cache, ``$LEMON_MAGIC_CPU=baseline`` picks the build without the faster CPU variants)."""

    name = "llama-server"
    health_path = "/health"
    reserved_flags = frozenset({"-m", "--model", "--port", "--host", "-c", "--ctx-size",
                                "-t", "--threads", "--chat-template", "--chat-template-file",
                                "--jinja", "--no-jinja",
                                "-mu", "--model-url", "-hf", "--hf-repo", "--api-key",
                                "--api-key-file"})
    port_in_use_markers = ("couldn't bind", "address already in use")

    def __init__(self, binary: str | os.PathLike[str] | None = None) -> None:
        self._binary = binary

    def locate(self) -> Path:
        """The binary that will be run.

        :raises BackendUnavailable: not found, or not an executable file.
        """
        from lemon_magic.build_llama_server import baseline_error, built_binary, missing_baseline_features

        configured = self._binary or os.environ.get(ENV_VAR)
        if configured:
            path = Path(configured).expanduser()
            where = "configured" if self._binary else f"${ENV_VAR}"
        elif found := shutil.which("llama-server"):
            path, where = Path(found), "PATH"
        else:
            try:
                path, where = built_binary(), "the build cache"
            except ValueError as exc:
                raise BackendUnavailable(str(exc)) from None
            missing = missing_baseline_features()
            if missing:
                raise BackendUnavailable(f"llama-server cannot run here: {baseline_error(missing)}")
        if not path.is_file():
            raise BackendUnavailable(
                f"llama-server not found ({where}: {path}); build it with "
                f"'python -m lemon_magic.build_llama_server' or set ${ENV_VAR}")
        if not os.access(path, os.X_OK):
            raise BackendUnavailable(f"llama-server at {path} is not executable")
        return path

    def command(self) -> list[str]:
        return [str(self.locate())]

    def key_environment(self, key: str) -> dict[str, str]:
        return {"LLAMA_API_KEY": key}  # --api-key's variable (every route but /health, /models)

    def argv(self, model_path: Path, options: ResolvedOptions, port: int) -> list[str]:
        argv = [*self.command(), "-m", str(model_path), "--ctx-size", str(options.ctx_size),
                "--port", str(port), "--host", "127.0.0.1", "--threads", str(options.threads)]
        template = options.chat_template
        if template and is_template_file(template):
            argv += ["--jinja", "--chat-template-file", template]
        elif template:
            # llama.cpp reads --chat-template as Jinja text while --jinja is on, and this build
            # turns it on by default: a name ("gemma") then renders as that one word (issue 17).
            # Only the legacy renderer takes built-in names (tools then need a template file)
            argv += ["--no-jinja", "--chat-template", template]
        else:
            argv.append("--jinja")
        return [*argv, *options.extra_args]

    def kind_args(self, kind: str, options: ResolvedOptions) -> list[str]:
        flags = {"embedding": ("--embeddings", "--embedding"), "reranking": ("--reranking", "--rerank")}
        wanted = flags.get(kind)
        if wanted is None or set(wanted) & set(options.extra_args):
            return []
        return [wanted[0]]
