"""The public surface: ``__all__`` matches what the package exports."""

from __future__ import annotations

import lemon_magic
from lemon_magic import errors


def test_all_is_sorted_and_complete() -> None:
    modules = {"annotations", "backends", "errors", "options", "registry", "router", "runtime",
               "build_llama_server", "magics", "widgets", "importlib", "TYPE_CHECKING", "Any",
               "load_ipython_extension", "unload_ipython_extension"}
    public = {n for n in dir(lemon_magic) if not n.startswith("_") and n not in modules}
    assert set(lemon_magic.__all__) == public
    assert list(lemon_magic.__all__) == sorted(lemon_magic.__all__, key=lambda s: (not s.isupper(), s))


def test_every_error_is_exported_and_rooted() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert getattr(lemon_magic, name) is cls
        assert issubclass(cls, lemon_magic.LemonError) or cls is lemon_magic.RouterClosed


def test_every_lazy_name_resolves() -> None:
    for name in lemon_magic.__all__:
        assert getattr(lemon_magic, name) is not None
