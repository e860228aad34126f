"""The OpenAI-style server of ``llama-cpp-python`` (``python -m llama_cpp.server``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from lemon_magic._gguf import special_tokens
from lemon_magic._templates import is_template_file, llama_cpp_python_config
from lemon_magic.backends.base import Backend
from lemon_magic.errors import BackendUnavailable
from lemon_magic.options import ResolvedOptions

__all__ = ("LlamaCppPython",)


class LlamaCppPython(Backend):
    """``llama_cpp.server`` run by this Python interpreter (``pip install 'llama-cpp-python[server]'``)."""

    name = "llama-cpp-python"
    health_path = "/v1/models"
    reserved_flags = frozenset({"--model", "--host", "--port", "--n_ctx", "--n_threads",
                                "--chat_format", "--hf_tokenizer_config_path", "--config_file",
                                "--api_key"})

    def __init__(self, python: str | None = None) -> None:
        self._python = python or sys.executable

    def command(self) -> list[str]:
        if importlib.util.find_spec("llama_cpp") is None or \
                importlib.util.find_spec("uvicorn") is None:
            raise BackendUnavailable("llama-cpp-python's server is not installed "
                                     "(pip install 'llama-cpp-python[server]')")
        return [self._python, "-m", "llama_cpp.server"]

    def argv(self, model_path: Path, options: ResolvedOptions, port: int) -> list[str]:
        argv = [*self.command(), "--model", str(model_path), "--host", "127.0.0.1",
                "--port", str(port), "--n_ctx", str(options.ctx_size),
                "--n_threads", str(options.threads)]
        template = options.chat_template
        if template and is_template_file(template):
            # its only way to a template file: a tokenizer_config.json (see llama_cpp_python_config)
            bos, eos = special_tokens(str(model_path))
            config = llama_cpp_python_config(template, bos, eos)
            argv += ["--chat_format", "hf-tokenizer-config", "--hf_tokenizer_config_path", str(config)]
        elif template:
            argv += ["--chat_format", template]
        return [*argv, *options.extra_args]

    def kind_args(self, kind: str, options: ResolvedOptions) -> list[str]:
        if kind != "embedding" or "--embedding" in options.extra_args:
            return []
        return ["--embedding", "true"]
