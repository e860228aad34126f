"""Tiny, valid llama-architecture GGUF files made with the ``gguf`` package.

They load in milliseconds and generate (meaningless) text, so tests that
start many backends stay fast while still running real llama.cpp code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiny_llama(path: Path, *, n_embd: int = 32, n_layer: int = 1, n_ctx_train: int = 4096,
                     seed: int = 0, mean_pooling: bool = False) -> Path:
    """Write a random 1-layer llama model with an SPM vocabulary of byte tokens
    (``mean_pooling``: it says so in its metadata, as embedding models do)."""
    import gguf

    rng = np.random.default_rng(seed)
    n_head, n_ff = 2, 64
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    words = [w.encode() for w in ("\u2581the", "\u2581a", "\u2581once", "\u2581upon", "\u2581time")]
    tokens += words
    n_vocab = len(tokens)
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)  # unknown, control, byte, normal

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-test-llama")
    w.add_context_length(n_ctx_train)
    if mean_pooling:
        w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)  # all f32
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    t("token_embd.weight", n_vocab, n_embd)
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    t("output.weight", n_vocab, n_embd)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{name}.weight", n_embd, n_embd)
        t(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


if __name__ == "__main__":
    import sys

    print(write_tiny_llama(Path(sys.argv[1])))
