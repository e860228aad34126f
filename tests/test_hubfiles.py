"""Checkpoints, the choice of files, progress lines and the built-in catalog (issue 10): no network."""

from __future__ import annotations

from pathlib import Path

import pytest

from lemon_magic import InvalidCheckpoint, VariantNotFound
from lemon_magic._hub import PullProgress
from lemon_magic._hubfiles import Checkpoint, RepoFile, choose_files, list_variants, variant_label

PROJECT_TOML = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_checkpoints_parse_and_refuse_what_is_not_a_repo() -> None:
    assert Checkpoint.parse("unsloth/Qwen3-0.6B-GGUF:q4_k_m") == \
        Checkpoint("unsloth/Qwen3-0.6B-GGUF", "q4_k_m")
    assert str(Checkpoint.parse(" ggml-org/gemma-3-1b-it-GGUF ")) == "ggml-org/gemma-3-1b-it-GGUF"
    for bad in ("qwen", "a/b/c", "a/b:", "/b", "a--b/c", "https://huggingface.co/a/b"):
        with pytest.raises(InvalidCheckpoint, match="org/repo"):
            Checkpoint.parse(bad)


def test_labels_default_order_split_sets_and_mmproj() -> None:
    assert [variant_label(n) for n in ("Qwen3-0.6B-Q4_K_M.gguf", "ggml-model-q4_0.gguf",
                                       "Qwen3-0.6B-UD-Q4_K_XL.gguf", "m.IQ4_XS-00001-of-00002.gguf",
                                       "Qwen3-Embedding-0.6B-f16.gguf", "model.gguf")] == \
        ["Q4_K_M", "Q4_0", "UD-Q4_K_XL", "IQ4_XS", "F16", "model"]
    files = [RepoFile("m-Q8_0.gguf", 800), RepoFile("m-Q4_0.gguf", 400), RepoFile("m-Q2_K.gguf", 200),
             RepoFile("m-UD-Q4_K_XL.gguf", 450), RepoFile("mmproj-F32.gguf", 90),
             RepoFile("mmproj-F16.gguf", 50), RepoFile("mmproj-Q8_0.gguf", 30), RepoFile("README.md", 1),
             *(RepoFile(f"BF16/m-BF16-0000{i}-of-00003.gguf", 1000) for i in (1, 2, 3))]
    ck = Checkpoint("o/m")
    assert list_variants(files) == ("BF16", "Q2_K", "Q4_0", "Q8_0", "UD-Q4_K_XL")  # mmproj is no variant
    pick = choose_files(ck, files)  # no Q4_K_M: Q4_0; the mmproj of its label, else F16
    assert (pick.variant, [f.name for f in pick.files]) == ("Q4_0", ["m-Q4_0.gguf", "mmproj-F16.gguf"])
    pick = choose_files(Checkpoint("o/m", "q8_0"), files)
    assert [f.name for f in pick.files] == ["m-Q8_0.gguf", "mmproj-Q8_0.gguf"]
    assert choose_files(Checkpoint("o/m", "Q4_K_XL"), files).variant == "UD-Q4_K_XL"
    split = choose_files(Checkpoint("o/m", "bf16"), files, with_mmproj=False)
    assert [f.name for f in split.files] == [f"BF16/m-BF16-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert choose_files(Checkpoint("o/m", "m-BF16-00002-of-00003.gguf"), files).model == split.model
    assert choose_files(Checkpoint("o/m", "m-Q2_K.gguf"), files).variant == "Q2_K"
    assert choose_files(ck, [f for f in files if "Q4_0" not in f.name]).variant == "Q2_K"  # the smallest
    with pytest.raises(VariantNotFound, match=r"matches 'Q5_K_M' \(variants: BF16, Q2_K, Q4_0, Q8_0"):
        choose_files(Checkpoint("o/m", "Q5_K_M"), files)
    with pytest.raises(VariantNotFound, match=r"no \.gguf file"):
        choose_files(ck, [RepoFile("README.md", 1)])


def test_progress_reads_as_one_line() -> None:
    p = PullProgress("o/r:Q4_0", "f.gguf", 120_000_000, 350_000_000, 12_000_000, 19.2)
    assert p.describe() == "downloading 34 % (120/350 MB), 12.0 MB/s, 0:19 left"
    assert PullProgress("o/r:Q4_0", "f.gguf", 0, 350_000_000, 0.0, None).describe() == \
        "downloading 0 % (0/350 MB)"
    assert PullProgress("o/r", "f", 5, 5, 1.0, 0.0, finished=True).describe() == "downloaded 0 MB"


# -- the built-in catalog ------------------------------------------------------------------------


def test_the_catalog_ships_in_the_package_and_every_entry_is_valid() -> None:
    from lemon_magic._hubcatalog import catalog_entry, load_catalog

    catalog = load_catalog()
    assert len(catalog) >= 5 and {e.kind for e in catalog.values()} == {"llm", "embedding"}
    qwen = catalog["Qwen3-0.6B-GGUF"]
    assert (qwen.checkpoint, qwen.parsed.variant) == ("unsloth/Qwen3-0.6B-GGUF:Q4_0", "Q4_0")
    assert 0.3e9 < qwen.size < 0.5e9 and qwen.defaults.ctx_size == 8192
    assert catalog_entry("qwen3-0.6b-gguf") is qwen and catalog_entry("nothing") is None
    assert all(e.parsed.variant for e in catalog.values())  # every checkpoint names its variant
    project = PROJECT_TOML.read_text()
    assert '[tool.setuptools.package-data]\nlemon_magic = ["catalog.json"]' in project  # in the wheel


def test_a_bad_catalog_entry_is_named() -> None:
    from lemon_magic._hubcatalog import _entry

    good = {"checkpoint": "o/r:Q4_0", "kind": "llm", "size_gb": 0.1}
    assert _entry("ok", good).size == 100_000_000
    for bad, why in [({**good, "checkpoint": "o/r"}, "names no variant"),
                     ({**good, "kind": "tts"}, "kind 'tts'"),
                     ({**good, "defaults": {"temperature": 0.1}}, "sampling parameter"),
                     ({"kind": "llm"}, "misses 'checkpoint'")]:
        with pytest.raises(ValueError, match=rf"catalog.json: entry 'x': .*{why}"):
            _entry("x", bad)
