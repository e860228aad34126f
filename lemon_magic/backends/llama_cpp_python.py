"""The OpenAI-style server of ``llama-cpp-python`` (``python -m llama_cpp.server``), an optional
backend (``pip install 'lemon_magic[llama-cpp-python]'``) that runs on the same llama.cpp build
as ``llama-server``."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from lemon_magic._gguf import special_tokens
from lemon_magic._templates import is_template_file, llama_cpp_python_config
from lemon_magic.backends.base import Backend
from lemon_magic.errors import BackendUnavailable
from lemon_magic.options import ResolvedOptions

__all__ = ("INSTALL_HINT", "LlamaCppPython")

INSTALL_HINT = "pip install 'lemon_magic[llama-cpp-python]'"


class LlamaCppPython(Backend):
    """``llama_cpp.server`` run by this Python interpreter, on the shared llama.cpp build
    (``python -m lemon_magic.build_llama_server``) when there is one, else on the libraries
    the package carries."""

    name = "llama-cpp-python"
    health_path = "/v1/models"
    reserved_flags = frozenset({"--model", "--host", "--port", "--n_ctx", "--n_threads",
                                "--chat_format", "--hf_tokenizer_config_path", "--config_file",
                                "--api_key"})

    def __init__(self, python: str | None = None) -> None:
        self._python = python or sys.executable

    def lib_dir(self) -> Path | None:
        """The shared build's folder if it is built, else ``None`` (the package's own libraries).

        :raises BackendUnavailable: neither has ``libllama``, or ``$LEMON_MAGIC_CPU`` is invalid.
        """
        from lemon_magic.build_llama_server import baseline_error, lib_dir, missing_baseline_features

        try:
            shared = lib_dir()
        except ValueError as exc:
            raise BackendUnavailable(str(exc)) from None
        if (shared / "libllama.so").exists():
            missing = missing_baseline_features()
            if missing:
                raise BackendUnavailable(f"llama-cpp-python cannot run here: {baseline_error(missing)}")
            return shared
        spec = importlib.util.find_spec("llama_cpp")
        own = [Path(p) / "lib" / "libllama.so" for p in (spec.submodule_search_locations or [])] \
            if spec else []
        if any(p.exists() for p in own):
            return None
        raise BackendUnavailable(f"llama-cpp-python has no llama.cpp library here and the shared "
                                 f"build is missing ({shared}): run 'python -m "
                                 f"lemon_magic.build_llama_server'")

    def command(self) -> list[str]:
        if importlib.util.find_spec("llama_cpp") is None or \
                importlib.util.find_spec("uvicorn") is None:
            raise BackendUnavailable(f"the llama-cpp-python backend is not installed ({INSTALL_HINT})")
        self.lib_dir()
        return [self._python, "-m", "llama_cpp.server"]

    def environment(self) -> dict[str, str] | None:
        shared = self.lib_dir()
        return None if shared is None else {**os.environ, "LLAMA_CPP_LIB_PATH": str(shared)}

    def key_environment(self, key: str) -> dict[str, str]:
        return {"API_KEY": key}  # its ServerSettings (pydantic-settings) read api_key from here

    def workdir(self) -> Path | None:
        # ggml looks for its CPU variants (libggml-cpu-*.so) next to the program and in the
        # current folder; the program here is python, so the folder is the build's
        return self.lib_dir()

    def argv(self, model_path: Path, options: ResolvedOptions, port: int) -> list[str]:
        argv = [*self.command(), "--model", str(model_path.absolute()), "--host", "127.0.0.1",
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
