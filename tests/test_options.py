"""Options: validation, resolution, comparison of resolved options."""

from __future__ import annotations

import pytest

from lemon_magic import InvalidOptions, LoadOptions, ResolvedOptions, Router
from lemon_magic._templates import gemma3_template


def test_auto_and_none_are_the_same_request() -> None:
    assert LoadOptions(ctx_size="auto", backend="auto") == LoadOptions()


def test_numeric_strings_and_shell_like_args_are_normalised() -> None:
    o = LoadOptions(ctx_size="2048", extra_args="--temp-x 1  --flag")
    assert o.ctx_size == 2048 and o.extra_args == ("--temp-x", "1", "--flag")
    assert o == LoadOptions(ctx_size=2048, extra_args=["--temp-x", "1", "--flag"])


def test_merged_over_keeps_set_fields() -> None:
    base = LoadOptions(ctx_size=1024, chat_template="gemma")
    assert LoadOptions(threads=3).merged_over(base) == LoadOptions(ctx_size=1024, threads=3,
                                                                   chat_template="gemma")


def test_diff_and_description() -> None:
    a = ResolvedOptions("llama-server", 4096, 2)
    b = ResolvedOptions("llama-server", 8192, 2, ("--flag",))
    assert a.diff(b) == {"ctx_size": (4096, 8192), "extra_args": ((), ("--flag",))}
    assert a.describe_diff(b) == "ctx_size 4096 → 8192, extra_args (none) → --flag"


def test_unknown_and_sampling_names_are_refused() -> None:
    with pytest.raises(InvalidOptions, match="sampling parameter"):
        LoadOptions.from_kwargs({"max_tokens": 3})
    with pytest.raises(InvalidOptions, match="unknown load option 'ctxsize'"):
        LoadOptions.from_kwargs({"ctxsize": 3})


def test_resolution_fills_defaults_from_model_and_router(router: Router, tiny_model: str) -> None:
    ar = router.async_router
    spec = ar.registry.resolve(tiny_model)
    resolved = ar.resolve(spec, LoadOptions())
    assert resolved.ctx_size == 4096 and resolved.threads >= 1 and resolved.extra_args == ()
    assert resolved == ar.resolve(spec, LoadOptions(ctx_size=4096, backend=resolved.backend,
                                                    threads=resolved.threads))
    gemma = ar.resolve(ar.registry.resolve("gemma3-270m"), LoadOptions())
    assert gemma.chat_template == str(gemma3_template())  # Gemma 3's own Jinja file (issue 17)
