"""Magics overheads, measured side by side in one run.

    .venv/bin/python bench/bench_magics.py [--trials 7] [--tokens 128] [--load-ext-only]

1. Streaming through ``%%lemon_infer`` against the same request streamed
   straight from the backend with httpx: tokens/s ratio and added time to
   first token.
2. ``%load_ext lemon_magic``: a whole process (interpreter start to exit) that
   makes an IPython shell and loads the extension, paired with one that only
   makes the shell, run in turn (A B, B A, ...) so that drift cancels; the
   medians of the per-pair differences in wall time, CPU time and peak RSS are
   what the extension adds (issue 20: target ≤ 100 ms, ≤ 15 MiB).

Writes bench/results/magics.json (``--load-ext-only``: only the figures of 2,
the others kept as they were).
"""

from __future__ import annotations

import argparse
import io
import json
import os
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


LOAD_EXT_PROBE = """
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
{work}
print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""
LOAD_EXT = "ip.run_line_magic('load_ext', 'lemon_magic')"


def _whole_process(code: str, cwd: str) -> tuple[float, float, float]:
    """Run ``python -c code`` to its end: wall seconds from spawn to reap and CPU seconds (user +
    system) as the kernel accounts the finished child, and the peak RSS in MiB that the
    process reports last (its ``VmHWM``: ``ru_maxrss`` would count this forking parent's)."""
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    peak_kib = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stdout.close()
    if proc.returncode:
        raise RuntimeError(f"the probe exited {proc.returncode}: {code!r}")
    return wall, usage.ru_utime + usage.ru_stime, int(peak_kib.split()[-1]) / 1024


def load_ext_cost(trials: int) -> dict[str, float]:
    """What ``%load_ext lemon_magic`` adds to a bare IPython shell: whole processes, paired
    (run from an empty directory: no ``pyproject.toml`` is read)."""
    import tempfile

    bare, loaded = LOAD_EXT_PROBE.format(work=""), LOAD_EXT_PROBE.format(work=LOAD_EXT)
    pairs = []
    with tempfile.TemporaryDirectory() as cwd:
        _whole_process(loaded, cwd)  # warm the file cache (and the .pyc files)
        _whole_process(bare, cwd)
        for i in range(trials):
            if i % 2:
                b = _whole_process(bare, cwd)
                a = _whole_process(loaded, cwd)
            else:
                a = _whole_process(loaded, cwd)
                b = _whole_process(bare, cwd)
            pairs.append((a, b))
    med = statistics.median
    return {
        "load_ext_trials": trials,
        "load_ext_added_wall_ms": med(a[0] - b[0] for a, b in pairs) * 1e3,
        "load_ext_added_cpu_ms": med(a[1] - b[1] for a, b in pairs) * 1e3,
        "load_ext_added_peak_mib": med(a[2] - b[2] for a, b in pairs),
        "bare_shell_wall_ms": med(b[0] for _, b in pairs) * 1e3,
        "bare_shell_peak_mib": med(b[2] for _, b in pairs),
    }


def _say_load_ext(r: dict[str, Any]) -> None:
    print(f"%load_ext lemon_magic over a bare IPython shell (whole processes, paired, "
          f"{r['load_ext_trials']} pairs): wall {r['load_ext_added_wall_ms']:+.1f} ms, "
          f"CPU {r['load_ext_added_cpu_ms']:+.1f} ms, peak RSS {r['load_ext_added_peak_mib']:+.1f} MiB "
          f"(bare shell {r['bare_shell_wall_ms']:.0f} ms, {r['bare_shell_peak_mib']:.1f} MiB; "
          "target <= 100 ms, <= 15 MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--load-ext-only", action="store_true",
                        help="measure only %%load_ext (no model is loaded)")
    args = parser.parse_args()
    out = RESULTS / "magics.json"
    if args.load_ext_only:
        cost = load_ext_cost(args.trials)
        kept = json.loads(out.read_text()) if out.exists() else {}
        kept = {k: v for k, v in kept.items() if not k.startswith("import_and_load_ext")}
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps({**kept, **cost}, indent=2) + "\n")
        _say_load_ext(cost)
        return

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
    cost = load_ext_cost(args.trials)
    result = {
        "trials": args.trials, "tokens": args.tokens,
        "magic_ttft_ms": med(m[0] for m in magic) * 1e3,
        "direct_ttft_ms": med(d[0] for d in direct) * 1e3,
        "ttft_added_ms": ttft_added_ms,
        "magic_tokens_per_s": med(m[1] for m in magic),
        "direct_tokens_per_s": med(d[1] for d in direct),
        "tokens_per_s_ratio": rate_ratio,
        **cost,
    }
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"streaming tokens/s: %%lemon_infer {result['magic_tokens_per_s']:.1f} / httpx "
          f"{result['direct_tokens_per_s']:.1f} = {rate_ratio:.3f}  (target >= 0.98)")
    print(f"time to first token: %%lemon_infer {result['magic_ttft_ms']:.1f} ms, httpx "
          f"{result['direct_ttft_ms']:.1f} ms: {ttft_added_ms:+.2f} ms  (target <= 5 ms)")
    _say_load_ext(cost)


if __name__ == "__main__":
    main()
