"""A remote model through the router against the remote itself, measured side by side in one run.

    .venv/bin/python bench/bench_remote.py [--trials 7] [--tokens 128] [--noops 100] [--concurrency 16]

The remote is ``lemon-magic serve`` in its own process (``tests.remotes.start_lemon_serve``: its
own temporary config and state dirs) serving the built-in ``gemma3-270m``; the client router runs
in this process with temporary ``LEMON_MAGIC_CONFIG_DIR``/``LEMON_MAGIC_STATE_DIR`` (the user's
registrations are not touched), with the remote registered as ``big`` (``api="lemonade"``).

1. No-op ``router.load("big", ctx_size=C1)`` (the action must be ``noop``: it asks the remote's
   ``/health`` first) against one plain keep-alive ``httpx.Client`` GET of the remote's
   ``/api/v1/health``, alternating call by call (which goes first swaps each trial):
   medians, p90, and the difference. Also the same two on the router's loop
   (``AsyncRouter.ensure_loaded`` against an ``httpx.AsyncClient`` GET, no facade).
2. Streamed ``/api/v1/completions`` (completion mode, ``--tokens``, temperature 0, fixed seed)
   through ``router.complete("big", ..., stream=True)`` against the same payload streamed
   straight to the remote with httpx (keep-alive client, ``_timing.timed_stream``), alternating
   which goes first; tokens counted the same way (one per event with non-blank text):
   tokens/s after the first token, time to first token.
3. ``--concurrency`` threads calling ``router.load("big", ctx_size=C2)`` at once while it is
   loaded with C1 (#1603): the remote's ``/load`` count (flights started here; the remote's
   backend pid before, after, and every backend pid seen under the remote while it ran), and
   the wall time against one single reload (alternating the direction C1 <-> C2).

Writes bench/results/remote.json (with the load average at the start and the end). Results are
ratios and differences from this one run; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import psutil
from _timing import time_together, timed_stream

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("results")
PROMPT = "Once upon a time"
REMOTE_MODEL = "gemma3-270m"
NAME = "big"
C1, C2 = 2048, 4096


def p90(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.9)]


def timed_chunks(chunks: Iterable[str], began: float) -> tuple[float, float, int]:
    """(time to first token, tokens/s after it, tokens) of text chunks, counted as
    :func:`_timing.timed_stream` counts events: one per chunk with non-blank text."""
    stamps = [time.perf_counter() for text in chunks if text.strip()]
    return stamps[0] - began, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


class PidWatch:
    """Every llama-server pid seen under the remote's process while it runs (a sampler thread)."""

    def __init__(self, server_pid: int) -> None:
        self.server = psutil.Process(server_pid)
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pid-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.seen.update(c.pid for c in self.server.children(recursive=True)
                                 if "llama" in c.name())
            except psutil.Error:
                pass
            self._stop.wait(0.005)

    def __enter__(self) -> PidWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--noops", type=int, default=100, help="no-op loads (and GETs) per trial")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    loadavg_start = Path("/proc/loadavg").read_text().split()[:3]
    scratch = Path(tempfile.mkdtemp(prefix="lemon-bench-remote-"))
    # the client router's registrations and pid records stay in scratch (read at each call)
    os.environ["LEMON_MAGIC_CONFIG_DIR"] = str(scratch / "client" / "config")
    os.environ["LEMON_MAGIC_STATE_DIR"] = str(scratch / "client" / "state")
    sys.path.insert(0, str(ROOT))  # tests.remotes: how the test suite starts and stops a remote

    from lemon_magic import LoadOptions, Router, RouterConfig, Stream
    from tests.remotes import start_lemon_serve

    (scratch / "remote").mkdir()
    remote = start_lemon_serve(scratch / "remote")
    med = statistics.median
    client = httpx.Client(timeout=httpx.Timeout(300), trust_env=False)  # keep-alive
    health_url = remote.url + "/api/v1/health"
    router: Router | None = None

    def remote_pid() -> int | None:
        for item in client.get(health_url).json().get("all_models_loaded") or ():
            if item.get("model_name") == REMOTE_MODEL:
                return int(item["pid"])
        return None

    try:
        router = Router(RouterConfig())
        router.register_remote(NAME, remote.url, REMOTE_MODEL, api="lemonade")
        first = router.load(NAME, ctx_size=C1)
        assert first.action == "loaded", first

        # 1. no-op load against one GET /health, alternating call by call
        noop_load: list[float] = []
        plain_get: list[float] = []

        def load_noop() -> float:
            assert router is not None
            t0 = time.perf_counter()
            result = router.load(NAME, ctx_size=C1)
            seconds = time.perf_counter() - t0
            assert result.action == "noop", result
            return seconds

        def get_health() -> float:
            t0 = time.perf_counter()
            r = client.get(health_url)
            seconds = time.perf_counter() - t0
            r.raise_for_status()
            return seconds

        for _ in range(20):  # warm both connections
            load_noop()
            get_health()
        for trial in range(args.trials):
            for _ in range(args.noops):
                if trial % 2 == 0:
                    noop_load.append(load_noop())
                    plain_get.append(get_health())
                else:
                    plain_get.append(get_health())
                    noop_load.append(load_noop())

        # 1b. the same on the router's loop: no facade, no thread hop
        ar = router.async_router

        async def on_loop(n: int) -> tuple[list[float], list[float]]:
            loads, gets = [], []
            async with httpx.AsyncClient(timeout=300, trust_env=False) as aclient:
                for i in range(n):
                    for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                        t0 = time.perf_counter()
                        if which == 0:
                            result = await ar.ensure_loaded(NAME, LoadOptions(ctx_size=C1))
                            loads.append(time.perf_counter() - t0)
                            assert result.action == "noop", result
                        else:
                            (await aclient.get(health_url)).raise_for_status()
                            gets.append(time.perf_counter() - t0)
            return loads, gets

        router._call(on_loop, 20)
        loop_load, loop_get = router._call(on_loop, args.trials * args.noops)

        # 2. streaming through the router against straight to the remote, alternating
        def through_router(tokens: int) -> tuple[float, float, int]:
            assert router is not None
            began = time.perf_counter()
            stream = router.complete(NAME, PROMPT, max_tokens=tokens, temperature=0, seed=1,
                                     stream=True)
            assert isinstance(stream, Stream)
            with stream:
                return timed_chunks(stream, began)

        def straight(tokens: int) -> tuple[float, float, int]:
            payload = {"model": REMOTE_MODEL, "prompt": PROMPT, "max_tokens": tokens,
                       "temperature": 0, "seed": 1}
            return timed_stream(client, remote.url + "/api/v1/completions", payload)

        through_router(8)  # warm the remote's prompt cache, and both clients
        straight(8)
        routed: list[tuple[float, float, int]] = []
        direct: list[tuple[float, float, int]] = []
        for trial in range(args.trials):
            if trial % 2 == 0:
                direct.append(straight(args.tokens))
                routed.append(through_router(args.tokens))
            else:
                routed.append(through_router(args.tokens))
                direct.append(straight(args.tokens))

        # 3. N concurrent reloads against one, alternating the direction C1 <-> C2
        single_s: list[float] = []
        crowd_s: list[float] = []
        crowd_flights: list[int] = []
        crowd_result_pids: list[int] = []
        crowd_pids_seen: list[int] = []
        crowd_pid_changed: list[bool] = []
        single_pids_seen: list[int] = []

        def single(ctx: int) -> None:
            assert router is not None
            before = remote_pid()
            with PidWatch(remote.popen.pid) as watch:
                t0 = time.perf_counter()
                result = router.load(NAME, ctx_size=ctx)
                single_s.append(time.perf_counter() - t0)
            assert result.action == "reloaded" and result.pid != before, result
            single_pids_seen.append(len(watch.seen - {before}))

        def crowd(ctx: int) -> None:
            assert router is not None
            before = remote_pid()
            results: list[Any] = []

            def call() -> None:
                assert router is not None
                results.append(router.load(NAME, ctx_size=ctx))

            calls: list[Callable[[], object]] = [call] * args.concurrency
            with PidWatch(remote.popen.pid) as watch:
                crowd_s.append(time_together(calls))
            after = remote_pid()
            assert len(results) == args.concurrency
            assert {r.action for r in results} == {"reloaded"}, results
            crowd_flights.append(sum(not r.joined for r in results))
            crowd_result_pids.append(len({r.pid for r in results}))
            crowd_pids_seen.append(len(watch.seen - {before}))
            crowd_pid_changed.append(after != before and {r.pid for r in results} == {after})

        for trial in range(args.trials):
            if trial % 2 == 0:
                single(C2)
                crowd(C1)
            else:
                crowd(C2)
                single(C1)
    finally:
        client.close()
        if router is not None:
            router.close()  # a remote model stays loaded on its server: stopped with it below
        remote.stop()
        loadavg_end = Path("/proc/loadavg").read_text().split()[:3]
        shutil.rmtree(scratch, ignore_errors=True)

    ms = 1e3
    result = {
        "remote": "lemon-magic serve (own process)", "model": REMOTE_MODEL, "trials": args.trials,
        "noops_per_trial": args.noops, "tokens": args.tokens, "concurrency": args.concurrency,
        "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "loadavg_start": loadavg_start, "loadavg_end": loadavg_end,
        "noop_load_median_ms": med(noop_load) * ms, "noop_load_p90_ms": p90(noop_load) * ms,
        "health_get_median_ms": med(plain_get) * ms, "health_get_p90_ms": p90(plain_get) * ms,
        "noop_minus_health_median_ms": (med(noop_load) - med(plain_get)) * ms,
        "noop_minus_health_p90_ms": (p90(noop_load) - p90(plain_get)) * ms,
        "paired_noop_minus_health_median_ms": med(a - b for a, b in zip(noop_load, plain_get,
                                                                        strict=True)) * ms,
        "loop_noop_load_median_ms": med(loop_load) * ms,
        "loop_health_get_median_ms": med(loop_get) * ms,
        "loop_noop_minus_health_median_ms": (med(loop_load) - med(loop_get)) * ms,
        "routed_ttft_ms": med(s[0] for s in routed) * ms,
        "direct_ttft_ms": med(d[0] for d in direct) * ms,
        "ttft_added_ms": (med(s[0] for s in routed) - med(d[0] for d in direct)) * ms,
        "paired_ttft_added_ms": med((s[0] - d[0]) * ms for s, d in zip(routed, direct, strict=True)),
        "routed_tokens_per_s": med(s[1] for s in routed),
        "direct_tokens_per_s": med(d[1] for d in direct),
        "tokens_per_s_ratio": med(s[1] for s in routed) / med(d[1] for d in direct),
        "paired_tokens_per_s_ratio": med(s[1] / d[1] for s, d in zip(routed, direct, strict=True)),
        "routed_tokens": sorted({s[2] for s in routed}), "direct_tokens": sorted({d[2] for d in direct}),
        # per trial, in order: [time to first token ms, tokens/s]
        "routed_trials": [[round(s[0] * ms, 2), round(s[1], 2)] for s in routed],
        "direct_trials": [[round(d[0] * ms, 2), round(d[1], 2)] for d in direct],
        "single_reload_s": med(single_s), "single_reload_trials_s": [round(x, 3) for x in single_s],
        "concurrent_reload_trials_s": [round(x, 3) for x in crowd_s],
        "concurrent_reload_s": med(crowd_s),
        "concurrent_ratio": med(crowd_s) / med(single_s),
        "concurrent_flights_max": max(crowd_flights),
        "concurrent_distinct_result_pids_max": max(crowd_result_pids),
        "concurrent_new_backend_pids_seen_max": max(crowd_pids_seen),
        "single_new_backend_pids_seen_max": max(single_pids_seen),
        "concurrent_pid_changed_once_every_trial": all(crowd_pid_changed),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "remote.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result
    print(f"load average {' '.join(loadavg_start)} at the start on {os.cpu_count()} CPUs")
    print(f"no-op load of a remote model: median {r['noop_load_median_ms']:.3f} ms (p90 "
          f"{r['noop_load_p90_ms']:.3f}); GET /health {r['health_get_median_ms']:.3f} ms (p90 "
          f"{r['health_get_p90_ms']:.3f}); difference {r['noop_minus_health_median_ms']:+.3f} ms, "
          f"paired {r['paired_noop_minus_health_median_ms']:+.3f} ms  (target <= 1 ms)")
    print(f"  on the router's loop: ensure_loaded {r['loop_noop_load_median_ms']:.3f} ms, GET /health "
          f"{r['loop_health_get_median_ms']:.3f} ms: {r['loop_noop_minus_health_median_ms']:+.3f} ms")
    print(f"streaming tokens/s: router {r['routed_tokens_per_s']:.1f} / remote "
          f"{r['direct_tokens_per_s']:.1f} = {r['tokens_per_s_ratio']:.3f}, paired "
          f"{r['paired_tokens_per_s_ratio']:.3f}  (target >= 0.98)")
    print(f"time to first token: router {r['routed_ttft_ms']:.1f} ms, remote {r['direct_ttft_ms']:.1f} ms: "
          f"{r['ttft_added_ms']:+.2f} ms, paired {r['paired_ttft_added_ms']:+.2f} ms")
    print(f"{args.concurrency} concurrent reloads: {r['concurrent_flights_max']} remote /load(s), "
          f"{r['concurrent_new_backend_pids_seen_max']} new backend pid(s), "
          f"{r['concurrent_reload_s']:.3f} s / one reload {r['single_reload_s']:.3f} s = "
          f"{r['concurrent_ratio']:.3f}  (target 1 /load)")


if __name__ == "__main__":
    main()
