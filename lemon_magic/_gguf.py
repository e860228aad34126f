"""A minimal GGUF header reader: validates the file and reads the few metadata keys we need.

Only the header and the key/value section are read (never the tensors), and
results are cached per (path, size, mtime).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from lemon_magic.errors import InvalidModelFile

__all__ = ("GGUFInfo", "read_gguf_info", "special_tokens")

_MAGIC = b"GGUF"
# value type -> struct format of a scalar (8 = string and 9 = array are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_WANTED_SUFFIXES = (".context_length", ".block_count", ".embedding_length",
                    ".attention.head_count", ".attention.head_count_kv", ".attention.key_length",
                    ".attention.value_length")


@dataclass(frozen=True)
class GGUFInfo:
    """What lemon_magic needs to know about a GGUF file."""

    path: str
    size: int
    architecture: str
    context_length: int | None
    block_count: int | None
    embedding_length: int | None
    head_count: int | None
    head_count_kv: int | None
    key_length: int | None
    value_length: int | None
    has_chat_template: bool

    def kv_cache_bytes(self, ctx_size: int) -> int:
        """An estimate of the f16 KV cache for ``ctx_size`` tokens (0 if unknown)."""
        if not (self.block_count and self.embedding_length and self.head_count):
            return 0
        head_dim = self.embedding_length // self.head_count
        kv_heads = self.head_count_kv or self.head_count
        k = (self.key_length or head_dim) * kv_heads
        v = (self.value_length or head_dim) * kv_heads
        return ctx_size * self.block_count * (k + v) * 2


class _Reader:
    def __init__(self, f: BinaryIO, path: str) -> None:
        self.f, self.path = f, path

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise InvalidModelFile(self.path, "is truncated (the GGUF header ends early)")
        return data

    def scalar(self, fmt: str) -> object:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = int(self.scalar("<Q"))  # type: ignore[call-overload]
        if n > 1 << 24:
            raise InvalidModelFile(self.path, "is corrupt (a GGUF string is implausibly long)")
        return self.take(n).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Skip ``count`` strings, reading their lengths from 1 MiB blocks (a read per string
        would cost a call each: 0.15 s for Gemma 3's vocabulary)."""
        buf, off = b"", 0
        for _ in range(count):
            if off + 8 > len(buf):
                buf, off = buf[off:] + self.f.read(1 << 20), 0
                if off + 8 > len(buf):
                    raise InvalidModelFile(self.path, "is truncated (the GGUF header ends early)")
            n = _U64.unpack_from(buf, off)[0]
            if n > 1 << 24:
                raise InvalidModelFile(self.path, "is corrupt (a GGUF string is implausibly long)")
            off += 8 + n
            if off > len(buf):  # the string runs past the block: skip the rest in the file
                missing = off - len(buf)
                if len(self.f.read(missing)) != missing:
                    raise InvalidModelFile(self.path, "is truncated (the GGUF header ends early)")
                buf, off = b"", 0
        self.f.seek(off - len(buf), 1)  # give back what was read ahead

    def value(self, vtype: int) -> object:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype = int(self.scalar("<I"))  # type: ignore[call-overload]
            count = int(self.scalar("<Q"))  # type: ignore[call-overload]
            if itype in _SCALARS:  # skip fixed-size arrays without decoding them
                self.take(struct.calcsize(_SCALARS[itype]) * count)
                return None
            if itype == _STRING:  # a vocabulary (262k strings for Gemma): skip it unread
                self.skip_strings(count)
                return None
            for _ in range(count):
                self.value(itype)
            return None
        raise InvalidModelFile(self.path, f"is corrupt (unknown GGUF value type {vtype})")


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """Validate ``path`` as GGUF and read its architecture and size metadata.

    :raises InvalidModelFile: missing, empty, not GGUF, or a truncated header.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InvalidModelFile(str(p), "does not exist") from None
    except OSError as exc:
        raise InvalidModelFile(str(p), f"cannot be read ({exc.strerror})") from None
    if not p.is_file():
        raise InvalidModelFile(str(p), "is not a regular file")
    return _read_cached(str(p.resolve()), st.st_size, st.st_mtime_ns)


def _entries(path: str, string_arrays: tuple[str, ...] = ()) -> Iterator[tuple[str, object]]:
    """Each metadata key of the GGUF file ``path`` with its value (arrays are skipped unread and
    read as ``None``, except the string arrays named in ``string_arrays``, read as lists).

    :raises InvalidModelFile: not a readable GGUF file.
    """
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise InvalidModelFile(path, f"cannot be read ({exc.strerror})") from None
    with f:
        r = _Reader(f, path)
        if f.read(4) != _MAGIC:
            raise InvalidModelFile(path, "is not a GGUF file (its first bytes are not 'GGUF')")
        version = int(r.scalar("<I"))  # type: ignore[call-overload]
        if version not in (2, 3):
            raise InvalidModelFile(path, f"has unsupported GGUF version {version}")
        r.scalar("<Q")  # tensor count
        n_kv = int(r.scalar("<Q"))  # type: ignore[call-overload]
        for _ in range(n_kv):
            key = r.string()
            vtype = int(r.scalar("<I"))  # type: ignore[call-overload]
            if key in string_arrays and vtype == _ARRAY:
                itype = int(r.scalar("<I"))  # type: ignore[call-overload]
                count = int(r.scalar("<Q"))  # type: ignore[call-overload]
                if itype != _STRING:
                    raise InvalidModelFile(path, f"is corrupt (its {key} are not strings)")
                yield key, [r.string() for _ in range(count)]
            else:
                yield key, r.value(vtype)


@lru_cache(maxsize=64)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFInfo:
    if size == 0:
        raise InvalidModelFile(path, "is empty (0 bytes)")
    meta: dict[str, object] = {}
    arch: str | None = None
    has_template = False
    for key, value in _entries(path):
        if key == "general.architecture":
            arch = str(value)
        elif key == "tokenizer.chat_template":
            has_template = True
        elif key.endswith(_WANTED_SUFFIXES):
            meta[key] = value
    if arch is None:
        raise InvalidModelFile(path, "is corrupt (no general.architecture key)")

    def get(suffix: str) -> int | None:
        v = meta.get(f"{arch}{suffix}")
        return int(v) if isinstance(v, int) and not isinstance(v, bool) else None

    return GGUFInfo(path=path, size=size, architecture=arch, context_length=get(".context_length"),
                    block_count=get(".block_count"), embedding_length=get(".embedding_length"),
                    head_count=get(".attention.head_count"),
                    head_count_kv=get(".attention.head_count_kv"),
                    key_length=get(".attention.key_length"),
                    value_length=get(".attention.value_length"), has_chat_template=has_template)


@lru_cache(maxsize=8)
def special_tokens(path: str) -> tuple[str, str]:
    """The text of the BOS and EOS tokens of the GGUF file ``path`` (``""`` if it names none);
    reads the whole vocabulary, so only for what needs it (a template file on llama-cpp-python).

    :raises InvalidModelFile: not a readable GGUF file.
    """
    ids: dict[str, int] = {}
    tokens: list[str] = []
    for key, value in _entries(path, string_arrays=("tokenizer.ggml.tokens",)):
        if key == "tokenizer.ggml.tokens" and isinstance(value, list):
            tokens = value
        elif key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id") and \
                isinstance(value, int):
            ids[key.split(".")[2]] = value

    def text(name: str) -> str:
        i = ids.get(name)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else ""

    return text("bos_token_id"), text("eos_token_id")
