"""Panel overheads, measured side by side in one run.

    .venv/bin/python bench/bench_widgets.py [--cycles 20]

1. Latency from a router event (its timestamp) to the moment the panel's row
   shows the new state (the trait change), over load/unload cycles.
2. No-op ``load`` with and without a panel subscribed, alternating blocks.
3. Piled-up panels (a cell re-run 20 times) while a model is ready: panel
   threads, and ``status()`` calls per second the panels make, while they are
   open and after they are closed.

Writes bench/results/widgets.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from lemon_magic import ModelStatus, Router, RouterEvent
from lemon_magic.widgets import LemonPanel

RESULTS = Path(__file__).with_name("results")


def _tiny_model() -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from tests.tinygguf import write_tiny_llama

    return str(write_tiny_llama(Path(tempfile.mkdtemp()) / "tiny.gguf"))


def noop_median(router: Router, model: str, n: int = 500) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        router.load(model, ctx_size=256)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _panel_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("lemon-panel"))


def status_rate(router: Router, seconds: float) -> float:
    """``status()`` calls per second made through ``router`` (by the panels) over ``seconds``."""
    calls = 0
    real = router.status

    def counting() -> list[ModelStatus]:
        nonlocal calls
        calls += 1
        return real()

    router.status = counting  # type: ignore[method-assign]
    try:
        time.sleep(seconds)
    finally:
        del router.status
    return calls / seconds


def pile_up(router: Router, model: str, n: int, seconds: float) -> dict[str, float]:
    router.load(model, ctx_size=256)
    panels = [LemonPanel(router) for _ in range(n)]
    for p in panels:
        p.wait_idle()
    open_threads, open_rate = _panel_threads(), status_rate(router, seconds)
    for p in panels:
        p.close()
    time.sleep(1.5)  # let closed panels' threads notice
    closed_threads, closed_rate = _panel_threads(), status_rate(router, seconds)
    router.unload(model)
    return {"panels": n, "open_panel_threads": open_threads, "open_status_calls_per_s": open_rate,
            "closed_panel_threads": closed_threads, "closed_status_calls_per_s": closed_rate}


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--panels", type=int, default=20)
    args = parser.parse_args()
    model = _tiny_model()
    router = Router()

    # 2. no-op cost, without and with a panel (alternating blocks)
    router.load(model, ctx_size=256)
    without, with_panel = [], []
    panel: LemonPanel | None = None
    for _ in range(5):
        without.append(noop_median(router, model))
        panel = LemonPanel(router)
        panel.wait_idle()
        with_panel.append(noop_median(router, model))
        panel.close()
    router.unload(model)

    # 3. piled-up panels
    piled = pile_up(router, model, args.panels, 3.0)

    # 1. event -> trait latency
    panel = LemonPanel(router)
    panel.wait_idle()
    events: list[RouterEvent] = []
    shown: list[tuple[float, str]] = []
    lock = threading.Lock()
    router.subscribe(lambda e: e.old != e.new and events.append(e))

    watched: set[str] = set()

    def watch_rows(_change: object = None) -> None:
        for name, row in panel._rows.items():
            if name not in watched:
                watched.add(name)
                row.summary.observe(lambda c: shown.append((time.time(), str(c["new"]))), names="value")

    watch_rows()
    panel.rows_box.observe(watch_rows, names="children")
    for _ in range(args.cycles):
        router.load(model, ctx_size=256)
        panel.wait_until(lambda p: "ready" in repr(p))
        router.unload(model)
        panel.wait_until(lambda p: "unloaded" in repr(p))
    panel.close()
    router.close()

    delays = []
    with lock:
        for e in events:
            later = [t for t, html in shown if t >= e.at - 0.001 and f">{e.new.value}<" in html]
            if later:
                delays.append(later[0] - e.at)
    med = statistics.median
    result = {
        "cycles": args.cycles, "events": len(events), "events_seen": len(delays),
        "event_to_trait_median_ms": med(delays) * 1e3, "event_to_trait_max_ms": max(delays) * 1e3,
        "noop_without_panel_ms": med(without) * 1e3, "noop_with_panel_ms": med(with_panel) * 1e3,
        "noop_ratio": med(with_panel) / med(without), **piled,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "widgets.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"router event -> row trait: median {result['event_to_trait_median_ms']:.1f} ms, "
          f"max {result['event_to_trait_max_ms']:.1f} ms over {len(delays)}/{len(events)} events "
          "(target <= 50 ms)")
    print(f"no-op load: {result['noop_without_panel_ms']:.4f} ms without a panel, "
          f"{result['noop_with_panel_ms']:.4f} ms with one = {result['noop_ratio']:.3f}")
    print(f"{piled['panels']} panels on a ready model: {piled['open_panel_threads']} panel thread(s), "
          f"{piled['open_status_calls_per_s']:.1f} status() calls/s while open; "
          f"{piled['closed_panel_threads']} thread(s), {piled['closed_status_calls_per_s']:.1f} calls/s "
          "once closed")


if __name__ == "__main__":
    main()
