"""Which files of a Hugging Face repo a checkpoint ``org/repo[:VARIANT]`` means (pure: no I/O).

- ``VARIANT`` is a quantization label (``Q4_K_M``, any case), matched against the
  label read from each ``.gguf`` file name (``Qwen3-0.6B-Q4_K_M.gguf`` → ``Q4_K_M``;
  ``...-UD-Q4_K_XL.gguf`` → ``UD-Q4_K_XL``, which ``Q4_K_XL`` also matches), or an
  exact file name of the repo.
- No variant: the first of :data:`DEFAULT_VARIANTS` the repo has, else the smallest.
- A split GGUF (``name-00001-of-00003.gguf``) is fetched whole; the load path is part 1.
- ``mmproj`` files (vision projectors) are never a variant. When the repo has one,
  it is fetched with the model: the one with the model's label, else F16, BF16, F32,
  else the smallest (``with_mmproj=False`` skips it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lemon_magic.errors import InvalidCheckpoint, PullError, VariantNotFound

__all__ = ("DEFAULT_VARIANTS", "Checkpoint", "RepoFile", "Selection", "choose_files", "complete",
           "model_groups", "list_variants", "variant_label")

#: the variants tried in order when a checkpoint names none (then: the smallest file)
DEFAULT_VARIANTS = ("Q4_K_M", "Q4_0")
_MMPROJ_ORDER = ("F16", "BF16", "F32")
_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SPLIT = re.compile(r"^(?P<base>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_QUANT = re.compile(r"(?:^|(?<=[-._]))((?:UD-)?(?:[IT]?Q\d+(?:_[A-Z0-9]+)*|BF16|F16|F32|MXFP4(?:_MOE)?))"
                    r"(?=$|[-.])", re.IGNORECASE)


@dataclass(frozen=True)
class Checkpoint:
    """A parsed ``org/repo[:VARIANT]``; ``variant`` is ``None`` for the default choice."""

    repo_id: str
    variant: str | None = None
    revision: str = "main"

    @classmethod
    def parse(cls, text: str | Checkpoint) -> Checkpoint:
        """Parse ``org/repo`` or ``org/repo:VARIANT``; raises :class:`InvalidCheckpoint`."""
        if isinstance(text, Checkpoint):
            return text
        repo, sep, variant = text.strip().partition(":")
        if not _REPO.fullmatch(repo) or "--" in repo or ".." in repo:
            raise InvalidCheckpoint(text, "does not name a Hub repo")
        if sep and not variant.strip():
            raise InvalidCheckpoint(text, "has an empty variant after ':'")
        return cls(repo, variant.strip() or None)

    def __str__(self) -> str:
        return self.repo_id if self.variant is None else f"{self.repo_id}:{self.variant}"


@dataclass(frozen=True)
class RepoFile:
    """One file of a repo listing: its path in the repo, size and LFS sha256 when known."""

    name: str
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Selection:
    """The files a checkpoint needs: the model (split parts in order) and an optional mmproj."""

    variant: str
    model: tuple[RepoFile, ...]
    mmproj: RepoFile | None = None

    @property
    def files(self) -> tuple[RepoFile, ...]:
        return self.model + ((self.mmproj,) if self.mmproj is not None else ())

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)



def variant_label(filename: str) -> str:
    """The quantization label of a GGUF file name (``Q4_K_M``), else its stem."""
    base = filename.rsplit("/", 1)[-1]
    split = _SPLIT.match(base)
    stem = split["base"] if split else re.sub(r"\.gguf$", "", base, flags=re.IGNORECASE)
    found = _QUANT.findall(stem)
    return found[-1].upper() if found else stem


def _is_mmproj(name: str) -> bool:
    return "mmproj" in name.rsplit("/", 1)[-1].lower()


def model_groups(files: Iterable[RepoFile]) -> list[tuple[RepoFile, ...]]:
    """Model files grouped: a split GGUF's parts together (in order), any other file alone."""
    groups: dict[str, list[RepoFile]] = {}
    for f in files:
        if not f.name.lower().endswith(".gguf") or _is_mmproj(f.name):
            continue
        split = _SPLIT.match(f.name)
        groups.setdefault(split["base"] if split else f.name, []).append(f)
    return [tuple(sorted(g, key=lambda f: f.name)) for _, g in sorted(groups.items())]


def complete(group: Sequence[RepoFile]) -> bool:
    split = _SPLIT.match(group[0].name)
    return split is None or len(group) == int(split["count"])


def _size(group: Sequence[RepoFile]) -> float:
    return sum(f.size if f.size is not None else float("inf") for f in group)


def list_variants(files: Iterable[RepoFile]) -> tuple[str, ...]:
    """The variants a listing offers (one label per model file or split set), sorted."""
    return tuple(sorted({variant_label(g[0].name) for g in model_groups(files)}))


def choose_files(checkpoint: Checkpoint, files: Sequence[RepoFile], *,
                 with_mmproj: bool = True) -> Selection:
    """The files ``checkpoint`` needs from a repo listing (the rules are in the module docstring);
    raises :class:`VariantNotFound` or, for a split set with parts missing, :class:`PullError`."""
    groups = model_groups(files)
    wanted = checkpoint.variant
    if wanted is None:
        picked = next((g for v in DEFAULT_VARIANTS for g in groups if variant_label(g[0].name) == v), None)
        if picked is None and groups:
            picked = min(groups, key=lambda g: (_size(g), g[0].name))
    else:
        by_name = [g for g in groups if any(wanted in (f.name, f.name.rsplit("/", 1)[-1]) for f in g)]
        exact = [g for g in groups if variant_label(g[0].name) == wanted.upper()]
        loose = [g for g in groups if variant_label(g[0].name).endswith("-" + wanted.upper())]
        found = by_name or exact or loose
        picked = min(found, key=lambda g: (g[0].name.count("/"), _size(g), g[0].name)) if found else None
    if picked is None:
        raise VariantNotFound(str(checkpoint), wanted or "any GGUF file", list_variants(files))
    if not complete(picked):
        raise PullError(f"{checkpoint}: the split GGUF {picked[0].name} has only {len(picked)} parts "
                        "in the repo", checkpoint=str(checkpoint))
    label = variant_label(picked[0].name)
    mmprojs = [f for f in files if f.name.lower().endswith(".gguf") and _is_mmproj(f.name)]
    mmproj = None
    if with_mmproj and mmprojs:
        rank = {v: i for i, v in enumerate((label, *_MMPROJ_ORDER))}
        mmproj = min(mmprojs, key=lambda f: (rank.get(variant_label(f.name), len(rank)), _size([f]), f.name))
    return Selection(label, picked, mmproj)
