"""Router overheads against the bare backend, measured side by side in one run.

    .venv/bin/python bench/bench_router.py [--trials 7] [--model gemma3-270m]

Reports medians and the ratios the README quotes; writes bench/results/router.json.
Bare runs start the very same llama-server argv by hand and poll /health every
millisecond, so the ratios show only what the router adds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _timing import time_together

from lemon_magic import LoadOptions, Router, RouterConfig
from lemon_magic.backends import LlamaServer
from lemon_magic.backends._process import free_port

RESULTS = Path(__file__).with_name("results")


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def bare_start(argv: list[str], port: int) -> tuple[subprocess.Popen[bytes], float]:
    began = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    while not _healthy(port):
        if proc.poll() is not None:
            raise RuntimeError(f"bare backend exited with {proc.returncode}")
        time.sleep(0.001)
    return proc, time.perf_counter() - began


def bare_stop(proc: subprocess.Popen[bytes]) -> float:
    began = time.perf_counter()
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(10)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    model = args.model
    config = RouterConfig(max_loaded={"llm": 1})
    router = Router(config)
    ar = router.async_router
    spec = ar.registry.resolve(model)
    small = ar.resolve(spec, LoadOptions(ctx_size=2048, backend="llama-server"))
    large = ar.resolve(spec, LoadOptions(ctx_size=4096, backend="llama-server"))
    server = LlamaServer()

    noop: list[float] = []
    cold, bare_cold = [], []
    reload, bare_reload = [], []
    crowd, crowd_spawns = [], []
    for _ in range(args.trials):
        # bare: start (small), stop, start (large) -- the same argv the router uses
        port = free_port()
        proc, t_start = bare_start(server.argv(spec.path, small, port), port)
        bare_cold.append(t_start)
        t_stop = bare_stop(proc)
        port = free_port()
        proc, t_start2 = bare_start(server.argv(spec.path, large, port), port)
        bare_reload.append(t_stop + t_start2)
        bare_stop(proc)

        # router: cold load (small), no-ops, reload (large), unload
        t0 = time.perf_counter()
        router.load(model, ctx_size=2048, backend="llama-server")
        cold.append(time.perf_counter() - t0)
        for _ in range(200):
            t0 = time.perf_counter()
            router.load(model, ctx_size=2048, backend="llama-server")
            noop.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert router.load(model, ctx_size=4096, backend="llama-server").action == "reloaded"
        reload.append(time.perf_counter() - t0)
        router.unload(model)

        # N concurrent cold loads from threads
        before = router.spawn_count
        def one() -> None:
            router.load(model, ctx_size=2048, backend="llama-server")

        crowd.append(time_together([one] * args.concurrency))
        crowd_spawns.append(router.spawn_count - before)
        router.unload(model)
    router.close()

    med = statistics.median
    result = {
        "model": model, "trials": args.trials, "python": sys.version.split()[0],
        "noop_median_ms": med(noop) * 1e3,
        "noop_p99_ms": sorted(noop)[int(len(noop) * 0.99)] * 1e3,
        "cold_load_s": med(cold), "bare_start_to_healthy_s": med(bare_cold),
        "cold_ratio": med(cold) / med(bare_cold),
        "reload_s": med(reload), "bare_stop_plus_start_s": med(bare_reload),
        "reload_ratio": med(reload) / med(bare_reload),
        "concurrent_loads": args.concurrency, "concurrent_spawns_max": max(crowd_spawns),
        "concurrent_s": med(crowd), "concurrent_ratio": med(crowd) / med(cold),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "router.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"no-op load (blocking facade): median {result['noop_median_ms']:.3f} ms, "
          f"p99 {result['noop_p99_ms']:.3f} ms  (target <= 0.1 ms; Lemonade: 2 ms)")
    print(f"cold load {result['cold_load_s']:.3f} s / bare start-to-healthy "
          f"{result['bare_start_to_healthy_s']:.3f} s = {result['cold_ratio']:.3f}  (target <= 1.03)")
    print(f"reload {result['reload_s']:.3f} s / bare stop+start {result['bare_stop_plus_start_s']:.3f} s"
          f" = {result['reload_ratio']:.3f}  (target <= 1.05)")
    print(f"{args.concurrency} concurrent cold loads: {result['concurrent_spawns_max']} spawn(s), "
          f"{result['concurrent_s']:.3f} s = {result['concurrent_ratio']:.3f} x one cold load "
          "(target 1 spawn, <= 1.05)")


if __name__ == "__main__":
    main()
