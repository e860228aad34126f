"""Model names: the embedded default, user registrations (persisted), plain paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lemon_magic import InvalidModelFile, InvalidOptions, ModelNotFound, Registry
from lemon_magic._gguf import read_gguf_info


def test_embedded_model_is_assembled_and_valid() -> None:
    spec = Registry().resolve("gemma3-270m")
    assert spec.source == "builtin" and spec.path.stat().st_size == 253_113_024
    info = read_gguf_info(spec.path)
    assert info.architecture == "gemma3" and info.context_length == 32768
    assert not info.has_chat_template  # a base model: chat needs the explicit "gemma" template


def test_register_persists_and_resolves(tmp_path: Path, tiny_model: str) -> None:
    reg = Registry(tmp_path / "models.json")
    reg.register("tiny", tiny_model, ctx_size=512, description="test model")
    again = Registry(tmp_path / "models.json")
    spec = again.resolve("tiny")
    assert spec.path == Path(tiny_model).resolve() and spec.defaults.ctx_size == 512
    assert "tiny" in again.names() and "gemma3-270m" in again.names()
    assert json.loads((tmp_path / "models.json").read_text())["tiny"]["kind"] == "llm"
    again.unregister("tiny")
    with pytest.raises(ModelNotFound):
        again.resolve("tiny")


@pytest.mark.parametrize(("name", "match"), [
    ("has space", "must not contain spaces"), ("", "non-empty"), ("gemma3-270m", "built in"),
    ("a/b", "slashes"), ("bad\udcff", "not valid UTF-8"),
])
def test_register_refuses_bad_names(tmp_path: Path, tiny_model: str, name: str, match: str) -> None:
    reg = Registry(tmp_path / "models.json")
    with pytest.raises(InvalidOptions, match=match):
        reg.register(name, tiny_model)
    assert not (tmp_path / "models.json").exists()


def test_register_refuses_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"nope")
    with pytest.raises(InvalidModelFile, match="not a GGUF file"):
        Registry(tmp_path / "models.json").register("x", bad)


def test_unknown_name_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="known models: gemma3-270m"):
        Registry(tmp_path / "models.json").resolve("gemma")
