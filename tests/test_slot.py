"""The slot's state table and invariants: every illegal transition is refused."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import anyio
import pytest

from lemon_magic import IllegalTransition, ModelState
from lemon_magic._policy import TRANSITIONS
from lemon_magic._slot import Load, Slot
from lemon_magic.options import ResolvedOptions
from lemon_magic.registry import ModelSpec

OPTS = ResolvedOptions("llama-server", 256, 2)
PAIRS = list(itertools.product(ModelState, ModelState))


class _Proc:
    pid = 4242


def _fields_for(state: ModelState) -> dict[str, Any]:
    """Field values that satisfy ``state``'s invariant."""
    return {
        ModelState.UNLOADED: {"process": None, "options": None, "load": None},
        ModelState.LOADING: {"process": None, "options": OPTS, "load": Load(OPTS, "loaded", None)},
        ModelState.READY: {"process": _Proc(), "options": OPTS, "load": None},
        ModelState.STOPPING: {"process": _Proc(), "options": OPTS, "load": None},
        ModelState.CRASHED: {"process": None, "options": OPTS, "load": None},
        ModelState.FAILED: {"process": None, "options": None, "load": None},
        ModelState.UNREACHABLE: {"process": None, "options": None, "load": None},  # remote only
    }[state]


async def _try(old: ModelState, new: ModelState, fields: dict[str, Any] | None = None) -> list[Any]:
    fields = _fields_for(new) if fields is None else fields  # made on the loop (anyio.Event)
    events: list[Any] = []
    slot = Slot("m", ModelSpec("m", Path("m.gguf")), events.append)
    slot.state = old  # the test places the slot in ``old``; only set_state moves it on
    for name, value in fields.items():
        setattr(slot, name, value)
    slot.set_state(new)
    assert slot.state is new
    return events


@pytest.mark.parametrize(("old", "new"), PAIRS, ids=[f"{a}->{b}" for a, b in PAIRS])
def test_every_transition_is_allowed_or_refused_by_the_table(old: ModelState, new: ModelState) -> None:
    if new in TRANSITIONS[old]:
        [event] = anyio.run(_try, old, new)
        assert (event.old, event.new) == (old, new)
    else:
        with pytest.raises(IllegalTransition, match=f"illegal transition {old} -> {new}"):
            anyio.run(_try, old, new)


BROKEN = [  # (state, fields that break its invariant)
    (ModelState.READY, {"process": None, "options": OPTS, "load": None}),
    (ModelState.READY, {"process": _Proc(), "options": None, "load": None}),
    (ModelState.UNLOADED, {"process": None, "options": OPTS, "load": None}),
    (ModelState.UNLOADED, {"process": _Proc(), "options": None, "load": None}),
    (ModelState.FAILED, {"process": _Proc(), "options": None, "load": None}),
    (ModelState.CRASHED, {"process": _Proc(), "options": OPTS, "load": None}),
    (ModelState.LOADING, {"process": None, "options": OPTS, "load": None}),
    (ModelState.STOPPING, {"process": _Proc(), "options": None, "load": None}),
]


@pytest.mark.parametrize(("new", "fields"), BROKEN)
def test_a_transition_that_would_break_an_invariant_is_refused(new: ModelState,
                                                                fields: dict[str, Any]) -> None:
    old = next(s for s in ModelState if new in TRANSITIONS[s])
    with pytest.raises(IllegalTransition):
        anyio.run(_try, old, new, fields)


def test_releasing_more_requests_than_were_admitted_is_refused() -> None:
    async def main() -> None:
        slot = Slot("m", ModelSpec("m", Path("m.gguf")), lambda e: None)
        slot.admit()
        slot.release(served=True)
        with pytest.raises(IllegalTransition, match="released twice"):
            slot.release(served=True)

    anyio.run(main)
