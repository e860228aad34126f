"""Magics overheads, measured side by side in one run.

    .venv/bin/python bench/bench_magics.py [--trials 7] [--tokens 128]

1. Streaming through ``%%lemon_infer`` against the same request streamed
   straight from the backend with httpx: tokens/s ratio and added time to
   first token.
2. ``import lemon_magic`` + ``%load_ext lemon_magic`` in a fresh process:
   added wall time and memory over a bare IPython shell.

Writes bench/results/magics.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from _timing import backend_headers, timed_stream

RESULTS = Path(__file__).with_name("results")
PROMPT = "Once upon a time"


class _Clock(io.TextIOBase):
    """A stdout that records when each piece of text arrives."""

    def __init__(self) -> None:
        self.writes: list[tuple[float, str]] = []

    def write(self, s: str) -> int:
        self.writes.append((time.perf_counter(), s))
        return len(s)

    def flush(self) -> None:
        pass


def via_magic(ip: Any, tokens: int) -> tuple[float, float, int]:
    clock = _Clock()
    real, sys.stdout = sys.stdout, clock
    began = time.perf_counter()
    try:
        ip.run_cell_magic("lemon_infer", f"--max-tokens {tokens} --temperature 0 --seed 1", PROMPT)
    finally:
        sys.stdout = real
    texts = [(t, s) for t, s in clock.writes if s.strip()]
    first, last = texts[0][0], texts[-1][0]
    return first - began, (len(texts) - 1) / (last - first), len(texts)


def via_httpx(client: httpx.Client, url: str, tokens: int) -> tuple[float, float, int]:
    from lemon_magic import get_router

    payload = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "seed": 1}
    return timed_stream(client, url + "/v1/completions", payload,
                        backend_headers(get_router(), url))  # its key (issue 21)


IMPORT_PROBE = """
import os, time, psutil
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
proc = psutil.Process()
rss0, t0 = proc.memory_info().rss, time.perf_counter()
{work}
print(time.perf_counter() - t0, proc.memory_info().rss - rss0)
"""


def import_cost(trials: int) -> tuple[float, float]:
    work = "import lemon_magic\nip.run_line_magic('load_ext', 'lemon_magic')"
    times, mems = [], []
    for _ in range(trials):
        out = subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(work=work)],
                             capture_output=True, text=True, check=True).stdout.split()
        times.append(float(out[0]))
        mems.append(float(out[1]))
    return statistics.median(times), statistics.median(mems)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    from IPython.core.interactiveshell import InteractiveShell

    from lemon_magic import get_router

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "lemon_magic")
    ip.run_line_magic("lemon_load", "gemma3-270m --ctx-size 2048")
    url = get_router().status()[0].url
    assert url is not None
    via_magic(ip, 8)  # warm the prompt cache for both paths
    magic, direct = [], []
    # one client, without keep-alive, like the router's per-backend client
    with httpx.Client(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        via_httpx(client, url, 8)
        for _ in range(args.trials):
            direct.append(via_httpx(client, url, args.tokens))
            magic.append(via_magic(ip, args.tokens))
    get_router().close()

    med = statistics.median
    ttft_added_ms = (med(m[0] for m in magic) - med(d[0] for d in direct)) * 1e3
    rate_ratio = med(m[1] for m in magic) / med(d[1] for d in direct)
    import_s, import_bytes = import_cost(args.trials)
    result = {
        "trials": args.trials, "tokens": args.tokens,
        "magic_ttft_ms": med(m[0] for m in magic) * 1e3,
        "direct_ttft_ms": med(d[0] for d in direct) * 1e3,
        "ttft_added_ms": ttft_added_ms,
        "magic_tokens_per_s": med(m[1] for m in magic),
        "direct_tokens_per_s": med(d[1] for d in direct),
        "tokens_per_s_ratio": rate_ratio,
        "import_and_load_ext_ms": import_s * 1e3,
        "import_and_load_ext_mib": import_bytes / 2**20,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "magics.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"streaming tokens/s: %%lemon_infer {result['magic_tokens_per_s']:.1f} / httpx "
          f"{result['direct_tokens_per_s']:.1f} = {rate_ratio:.3f}  (target >= 0.98)")
    print(f"time to first token: %%lemon_infer {result['magic_ttft_ms']:.1f} ms, httpx "
          f"{result['direct_ttft_ms']:.1f} ms: {ttft_added_ms:+.2f} ms  (target <= 5 ms)")
    print(f"import lemon_magic + %load_ext: {result['import_and_load_ext_ms']:.1f} ms, "
          f"{result['import_and_load_ext_mib']:.1f} MiB  (target <= 150 ms, <= 25 MB)")


if __name__ == "__main__":
    main()
