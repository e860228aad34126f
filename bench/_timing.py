"""Timing helpers shared by the benchmarks (run as scripts: ``bench/`` is on ``sys.path``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx


def timed_stream(client: httpx.Client, url: str, payload: dict[str, Any]) -> tuple[float, float, int]:
    """(time to first token, tokens/s after it, tokens) of one streamed completion at ``url``."""
    stamps = []
    began = time.perf_counter()
    with client.stream("POST", url, json={**payload, "stream": True}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                text = json.loads(line[5:])["choices"][0].get("text")
                if text and text.strip():
                    stamps.append(time.perf_counter())
    return stamps[0] - began, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


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
