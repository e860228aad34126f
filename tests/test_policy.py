"""The pure policy: decision table, transition table, slot eviction, memory admission."""

from __future__ import annotations

import itertools

import pytest

from lemon_magic import NotEnoughMemory, ResolvedOptions, SlotsFull
from lemon_magic._policy import (
    TRANSITIONS,
    Decision,
    ModelState,
    SlotView,
    admit_memory,
    choose_evictions,
    decide,
)

A = ResolvedOptions("llama-server", 4096, 2)
B = ResolvedOptions("llama-server", 8192, 2)
S = ModelState


@pytest.mark.parametrize(("state", "loaded", "wanted", "explicit", "expected"), [
    (S.UNLOADED, None, A, True, Decision.START),
    (S.UNLOADED, None, A, False, Decision.START),
    (S.FAILED, None, A, True, Decision.START),
    (S.CRASHED, None, A, False, Decision.START),
    (S.LOADING, A, A, True, Decision.WAIT_LOAD),
    (S.LOADING, A, B, True, Decision.WAIT_LOAD),
    (S.LOADING, A, B, False, Decision.WAIT_LOAD),
    (S.READY, A, A, True, Decision.USE),
    (S.READY, A, B, True, Decision.RELOAD),
    (S.READY, A, B, False, Decision.USE),  # auto-load never reloads
    (S.STOPPING, A, A, True, Decision.WAIT_STOP),
    (S.STOPPING, A, B, False, Decision.WAIT_STOP),
])
def test_decision_table(state: ModelState, loaded: ResolvedOptions | None, wanted: ResolvedOptions,
                        explicit: bool, expected: Decision) -> None:
    assert decide(state, loaded, wanted, explicit=explicit) is expected


@pytest.mark.parametrize(("old", "new"), list(itertools.product(ModelState, ModelState)))
def test_transition_table_is_explicit_for_every_pair(old: ModelState, new: ModelState) -> None:
    allowed = {(S.UNLOADED, S.LOADING), (S.LOADING, S.READY), (S.LOADING, S.FAILED),
               (S.LOADING, S.UNLOADED), (S.READY, S.LOADING), (S.READY, S.STOPPING),
               (S.READY, S.CRASHED), (S.STOPPING, S.UNLOADED), (S.CRASHED, S.LOADING),
               (S.CRASHED, S.UNLOADED), (S.FAILED, S.LOADING), (S.FAILED, S.UNLOADED)}
    assert (new in TRANSITIONS[old]) == ((old, new) in allowed)


def v(name: str, last_used: float, *, pinned: bool = False, state: ModelState = S.READY,
      rss: int = 0) -> SlotView:
    return SlotView(name, state, pinned, last_used, rss)


def test_no_eviction_below_the_limit() -> None:
    assert choose_evictions("c", "llm", [v("a", 1)], 2) == []


def test_lru_unpinned_goes_first_and_loading_last() -> None:
    holders = [v("a", 3), v("b", 1, pinned=True), v("c", 2), v("d", 0, state=S.LOADING)]
    assert choose_evictions("x", "llm", holders, 3) == ["c", "a"]
    assert choose_evictions("x", "llm", holders, 2) == ["c", "a", "d"]


def test_all_pinned_raises() -> None:
    with pytest.raises(SlotsFull, match=r"held by pinned models \(a\)"):
        choose_evictions("x", "llm", [v("a", 1, pinned=True)], 1)


def test_reloading_target_does_not_count_itself() -> None:
    assert choose_evictions("a", "llm", [v("a", 1)], 1) == []


def test_memory_fits() -> None:
    assert admit_memory("x", 100, 200, [v("a", 1, rss=50)]) == []


def test_memory_evicts_lru_until_it_fits() -> None:
    cands = [v("new", 5, rss=100), v("old", 1, rss=60), v("mid", 3, rss=60)]
    assert admit_memory("x", 200, 100, cands) == ["old", "mid"]


def test_memory_refuses_with_figures() -> None:
    with pytest.raises(NotEnoughMemory, match=r"needs about 1\.00 GiB of memory but only 0\.50 GiB"):
        admit_memory("x", 2**30, 2**29, [])


def test_restart_backoff_grows_and_is_capped() -> None:
    from lemon_magic._policy import restart_backoff

    assert [restart_backoff(n) for n in range(6)] == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0]
    assert restart_backoff(50) == 30.0
