"""Backend kinds (``llama-server``, ``llama-cpp-python``) and the process supervisor."""

from __future__ import annotations

from lemon_magic.backends.base import Backend
from lemon_magic.backends.llama_cpp_python import LlamaCppPython
from lemon_magic.backends.llama_server import LlamaServer

__all__ = ("Backend", "LlamaCppPython", "LlamaServer", "default_backends")


def default_backends() -> dict[str, Backend]:
    """One instance of each backend kind, by name, in order of preference."""
    return {b.name: b for b in (LlamaServer(), LlamaCppPython())}
