"""The HTTP server's overheads, measured side by side in one run.

    .venv/bin/python bench/bench_server.py [--trials 7] [--tokens 128] [--concurrency 32]

1. No-op ``POST /api/v1/load`` over HTTP (one keep-alive client) against the same
   no-op through the blocking facade.
2. Streaming ``/api/v1/completions`` through the server against the same request
   streamed straight to the backend with httpx: tokens/s ratio, added time to first token.
3. ``--concurrency`` concurrent HTTP ``/load`` of one cold model: spawns, and time
   against one cold HTTP ``/load``.
4. Requests issued while 5 reloads run (``ctx_size`` changes over ``/load``): failures.

Writes bench/results/server.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from _timing import backend_headers, stream_from_here, time_together, timed_stream

from lemon_magic import Router, RouterConfig

RESULTS = Path(__file__).with_name("results")
PROMPT = "Once upon a time"
MODEL = "gemma3-270m"


def stream(client: httpx.Client, url: str, tokens: int, model: str | None) -> tuple[float, float, int]:
    """(time to first token, tokens/s after it, tokens) of one streamed completion."""
    payload: dict[str, Any] = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "seed": 1}
    if model is not None:
        payload["model"] = model
    return timed_stream(client, url + "/completions", payload)


def http_load(client: httpx.Client, base: str, ctx_size: int) -> dict[str, Any]:
    r = client.post(base + "/load", json={"model_name": MODEL, "ctx_size": ctx_size,
                                          "backend": "llama-server"})
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    router = Router(RouterConfig(max_loaded={"llm": 1}))
    base = router.serve("127.0.0.1", 0)
    med = statistics.median
    timeout = httpx.Timeout(300)
    client = httpx.Client(timeout=timeout)
    try:
        # 1. no-op load: HTTP and facade, alternating blocks of 100
        assert http_load(client, base, 2048)["action"] in ("loaded", "noop")
        http_noop: list[float] = []
        facade_noop: list[float] = []
        for _ in range(args.trials):
            for _ in range(100):
                t0 = time.perf_counter()
                body = http_load(client, base, 2048)
                http_noop.append(time.perf_counter() - t0)
                assert body["action"] == "noop", body
            for _ in range(100):
                t0 = time.perf_counter()
                router.load(MODEL, ctx_size=2048, backend="llama-server")
                facade_noop.append(time.perf_counter() - t0)

        # 2. streaming: through the server and straight to the backend, alternating, from a
        # client in another process (as any HTTP client is: in this one it would share the
        # server's interpreter lock). The backend without keep-alive, like the router's
        # per-backend client (llama-server closes kept-alive connections after a few requests);
        # the server's client keeps its connection, as OpenAI's SDK does.
        backend = router.status()[0].url
        assert backend is not None
        key = backend_headers(router, backend)  # the backend answers only the router (issue 21)
        served, direct = [], []
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn) as client_process:

            def remote(url: str, model: str | None, tokens: int, keepalive: bool) -> Any:
                payload: dict[str, Any] = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                                           "seed": 1, **({"model": model} if model else {})}
                return client_process.submit(stream_from_here, url + "/completions", payload,
                                             keepalive, None if model else key).result()

            remote(base, MODEL, 8, True)  # warm the prompt cache, and both clients
            remote(backend + "/v1", None, 8, False)
            for _ in range(args.trials):
                direct.append(remote(backend + "/v1", None, args.tokens, False))
                served.append(remote(base, MODEL, args.tokens, True))

        # 3. one cold HTTP load against N concurrent cold HTTP loads
        cold, crowd, crowd_spawns = [], [], []
        for _ in range(args.trials):
            router.unload(MODEL)
            t0 = time.perf_counter()
            assert http_load(client, base, 2048)["action"] == "loaded"
            cold.append(time.perf_counter() - t0)
            router.unload(MODEL)
            before = router.spawn_count
            clients = [httpx.Client(timeout=timeout) for _ in range(args.concurrency)]
            crowd.append(time_together([functools.partial(http_load, c, base, 2048) for c in clients]))
            crowd_spawns.append(router.spawn_count - before)
            for c in clients:
                c.close()

        # 4. requests issued while reloads run: each reload starts, then its share is fired
        per_reload = args.requests // args.reloads
        failures: list[str] = []
        reload_pids: list[int] = []
        issued = 0

        def infer(c: httpx.Client) -> None:
            try:
                r = c.post(base + "/completions", json={"model": MODEL, "prompt": PROMPT,
                                                        "max_tokens": 4, "temperature": 0})
                if r.status_code != 200 or not r.json()["choices"][0]["text"]:
                    failures.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                failures.append(repr(e))

        storm_clients = [httpx.Client(timeout=timeout) for _ in range(per_reload)]
        t_storm = time.perf_counter()
        with ThreadPoolExecutor(per_reload) as pool:
            for i in range(args.reloads):
                ctx = 4096 if i % 2 == 0 else 2048
                loader = pool.submit(http_load, client, base, ctx)
                time.sleep(0.02)  # the reload is under way
                futures = [pool.submit(infer, c) for c in storm_clients]
                issued += len(futures)
                body = loader.result()
                assert body["action"] == "reloaded", body
                reload_pids.append(body["pid"])
                for f in futures:
                    f.result()
        storm_s = time.perf_counter() - t_storm
        for c in storm_clients:
            c.close()
        served_requests = router.serving
        assert served_requests is not None
    finally:
        client.close()
        router.close()

    result = {
        "model": MODEL, "trials": args.trials, "tokens": args.tokens, "python": sys.version.split()[0],
        "http_noop_load_median_ms": med(http_noop) * 1e3,
        "http_noop_load_p99_ms": sorted(http_noop)[int(len(http_noop) * 0.99)] * 1e3,
        "facade_noop_load_median_ms": med(facade_noop) * 1e3,
        "served_ttft_ms": med(s[0] for s in served) * 1e3,
        "direct_ttft_ms": med(d[0] for d in direct) * 1e3,
        "ttft_added_ms": (med(s[0] for s in served) - med(d[0] for d in direct)) * 1e3,
        "served_tokens_per_s": med(s[1] for s in served),
        "direct_tokens_per_s": med(d[1] for d in direct),
        "tokens_per_s_ratio": med(s[1] for s in served) / med(d[1] for d in direct),
        "paired_tokens_per_s_ratio": med(s[1] / d[1] for s, d in zip(served, direct, strict=True)),
        "paired_ttft_added_ms": med((s[0] - d[0]) * 1e3 for s, d in zip(served, direct, strict=True)),
        # llama-server's own generation speed in the two paths: below 1, the router took CPU
        # from the backend (2 CPUs, llama-server runs 2 threads)
        "backend_own_tokens_per_s_ratio": med(
            s[3].get("predicted_per_second", 0) / d[3]["predicted_per_second"]
            for s, d in zip(served, direct, strict=True) if d[3].get("predicted_per_second")),
        "cold_http_load_s": med(cold),
        "concurrent_loads": args.concurrency, "concurrent_spawns_max": max(crowd_spawns),
        "concurrent_s": med(crowd), "concurrent_ratio": med(crowd) / med(cold),
        "reloads": args.reloads, "requests_during_reloads": issued,
        "failed_requests": len(failures), "failures": failures[:5],
        "distinct_reload_pids": len(set(reload_pids)), "storm_s": storm_s,
        "requests_served": served_requests.requests_served,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "server.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result
    print(f"no-op POST /api/v1/load: median {r['http_noop_load_median_ms']:.3f} ms, p99 "
          f"{r['http_noop_load_p99_ms']:.3f} ms (facade {r['facade_noop_load_median_ms']:.3f} ms)"
          "  (target <= 1 ms; Lemonade: 2 ms)")
    print(f"paired: tokens/s ratio {r['paired_tokens_per_s_ratio']:.3f}, added first token "
          f"{r['paired_ttft_added_ms']:.1f} ms; llama-server's own speed served/direct "
          f"{r['backend_own_tokens_per_s_ratio']:.3f}")
    print(f"streaming tokens/s: server {r['served_tokens_per_s']:.1f} / backend "
          f"{r['direct_tokens_per_s']:.1f} = {r['tokens_per_s_ratio']:.3f}  (target >= 0.98)")
    print(f"time to first token: server {r['served_ttft_ms']:.1f} ms, backend {r['direct_ttft_ms']:.1f} ms: "
          f"{r['ttft_added_ms']:+.2f} ms  (target <= 5 ms)")
    print(f"{args.concurrency} concurrent HTTP /load of a cold model: {r['concurrent_spawns_max']} spawn(s), "
          f"{r['concurrent_s']:.3f} s / one cold HTTP load {r['cold_http_load_s']:.3f} s = "
          f"{r['concurrent_ratio']:.3f}  (target 1 spawn, <= 1.05)")
    print(f"{issued} requests issued during {args.reloads} reloads: {len(failures)} failed  (target 0)")


if __name__ == "__main__":
    main()
