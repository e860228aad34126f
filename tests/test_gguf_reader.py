"""The GGUF header reader skips a large vocabulary in blocks and still reads the keys after it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lemon_magic._gguf import read_gguf_info
from lemon_magic.errors import InvalidModelFile


def _write(path: Path, tokens: list[str]) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(1234)
    w.add_token_list(tokens)  # a string array that spans several 1 MiB blocks
    w.add_block_count(3)  # after the array: found only if the array was skipped exactly
    w.add_chat_template("{{ messages }}")
    w.add_tensor("t", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_vocabulary_over_many_blocks_is_skipped_exactly(tmp_path: Path) -> None:
    tokens = [f"tok{i}" * (1 + i % 7) for i in range(200_000)]  # ~5 MB of strings, odd lengths
    tokens[1000] = "x" * 3_000_000  # one string longer than a block
    info = read_gguf_info(_write(tmp_path / "big.gguf", tokens))
    assert (info.context_length, info.block_count, info.has_chat_template) == (1234, 3, True)


def test_a_vocabulary_cut_short_is_a_truncated_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "cut.gguf", [f"tok{i}" for i in range(300_000)])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelFile, match="is truncated"):
        read_gguf_info(path)
