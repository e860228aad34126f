"""Timing helpers shared by the benchmarks (run as scripts: ``bench/`` is on ``sys.path``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx


def backend_headers(router: Any, url: str) -> dict[str, str]:
    """What a request straight to the backend at ``url`` needs: its key, which only the router
    holds (issue 21; read from the router's private state, as only a benchmark should)."""
    return next(dict(m.process.headers) for m in router.async_router._models.values()
                if m.process is not None and url.startswith(m.process.url))


def timed_stream(client: httpx.Client, url: str, payload: dict[str, Any],
                 headers: dict[str, str] | None = None) -> tuple[float, float, int]:
    """(time to first token, tokens/s after it, tokens) of one streamed completion at ``url``."""
    ttft, tps, n, _ = timed_stream_with_timings(client, url, payload, headers)
    return ttft, tps, n


def timed_stream_with_timings(client: httpx.Client, url: str, payload: dict[str, Any],
                              headers: dict[str, str] | None = None,
                              ) -> tuple[float, float, int, dict[str, Any]]:
    """:func:`timed_stream`, plus llama-server's own ``timings`` (from the last event)."""
    stamps = []
    timings: dict[str, Any] = {}
    began = time.perf_counter()
    with client.stream("POST", url, json={**payload, "stream": True}, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                event = json.loads(line[5:])
                timings = event.get("timings") or timings
                text = event["choices"][0].get("text") if event.get("choices") else None
                if text and text.strip():
                    stamps.append(time.perf_counter())
    return stamps[0] - began, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps), timings


_clients: dict[bool, httpx.Client] = {}


def stream_from_here(url: str, payload: dict[str, Any], keepalive: bool,
                     headers: dict[str, str] | None = None) -> tuple[float, float, int, dict[str, Any]]:
    """:func:`timed_stream_with_timings` with this process's client (one per keep-alive
    choice): run it in a separate client process, as any HTTP client of the server is."""
    if keepalive not in _clients:
        limits = httpx.Limits() if keepalive else httpx.Limits(max_keepalive_connections=0)
        _clients[keepalive] = httpx.Client(timeout=300, limits=limits, trust_env=False)
    return timed_stream_with_timings(_clients[keepalive], url, payload, headers)


def time_together(calls: Sequence[Callable[[], object]]) -> float:
    """Seconds from releasing ``calls`` at once (one thread each, behind a barrier) until the
    last one returns."""
    barrier = threading.Barrier(len(calls) + 1)

    def run(call: Callable[[], object]) -> None:
        barrier.wait()
        call()

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - began
