"""How PDEATHSIG is set at spawn: setpriv (exec, no Python in the child) against preexec_fn.

    .venv/bin/python bench/bench_spawn.py [--trials 200] [--ballast-mb 2048] [--threads 4]

Both ways go through the supervisor's own ``_popen`` (new session, pipe,
close_fds), interleaved trial by trial in one run, with ``--threads`` busy
Python threads alive as in a kernel. Two figures per way:

- ``popen``: how long ``Popen()`` blocks the caller (the router's loop thread);
- ``running``: from the call until the spawned program has been exec'd and
  printed its first byte (setpriv execs twice: itself, then the backend).

Each is measured with the parent at its own size, then again after
``--ballast-mb`` of touched memory (a kernel holding data): a fork() copies
the page tables of all of it, a vfork() nothing. Reports medians and the
ratio preexec_fn / setpriv; writes bench/results/spawn.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

from lemon_magic.backends import _process

RESULTS = Path(__file__).with_name("results")
WAYS = ("preexec_fn", "setpriv")
PROGRAM = ["/bin/echo", "x"]


def one(via: str) -> tuple[float, float]:
    began = time.perf_counter()
    popen = _process._popen(PROGRAM, None, via)  # type: ignore[arg-type]
    returned = time.perf_counter()
    assert popen.stdout is not None
    first = popen.stdout.read(1)
    running = time.perf_counter()
    popen.stdout.close()
    assert first == b"x" and popen.wait(5) == 0
    return returned - began, running - began


def measure(trials: int) -> dict[str, dict[str, float]]:
    times: dict[str, dict[str, list[float]]] = {w: {"popen": [], "running": []} for w in WAYS}
    for w in WAYS:  # warm-up: setpriv's probe, page cache
        one(w)
    for i in range(trials):
        for w in (WAYS if i % 2 == 0 else WAYS[::-1]):
            popen_s, running_s = one(w)
            times[w]["popen"].append(popen_s)
            times[w]["running"].append(running_s)
    out: dict[str, dict[str, float]] = {}
    for w in WAYS:
        out[w] = {f"{k}_median_ms": statistics.median(v) * 1e3 for k, v in times[w].items()}
        out[w].update({f"{k}_p90_ms": statistics.quantiles(v, n=10)[-1] * 1e3 for k, v in times[w].items()})
    for k in ("popen", "running"):
        out["ratio_preexec_fn_over_setpriv"] = out.get("ratio_preexec_fn_over_setpriv", {})
        out["ratio_preexec_fn_over_setpriv"][k] = (out["preexec_fn"][f"{k}_median_ms"]
                                                   / out["setpriv"][f"{k}_median_ms"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--ballast-mb", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    if _process._find_setpriv() is None or _process._libc is None:
        sys.exit("bench_spawn: needs Linux and util-linux's setpriv with --pdeathsig")

    stop = threading.Event()

    def busy() -> None:  # a kernel always has threads; these hold the GIL now and then
        while not stop.is_set():
            sum(range(1000))
            time.sleep(0.001)

    threads = [threading.Thread(target=busy, daemon=True) for _ in range(args.threads)]
    for t in threads:
        t.start()
    result: dict[str, object] = {"trials": args.trials, "threads": args.threads,
                                 "python": platform.python_version(), "program": PROGRAM}
    try:
        rss = psutil.Process().memory_info().rss / 2**20
        result["small"] = {"rss_mb": round(rss), **measure(args.trials)}
        ballast = bytearray(args.ballast_mb * 2**20)
        for i in range(0, len(ballast), 4096):  # touch every page
            ballast[i] = 1
        rss = psutil.Process().memory_info().rss / 2**20
        result["ballast"] = {"rss_mb": round(rss), **measure(args.trials)}
        del ballast
    finally:
        stop.set()
        for t in threads:
            t.join()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "spawn.json").write_text(json.dumps(result, indent=2) + "\n")
    for size in ("small", "ballast"):
        r = result[size]
        assert isinstance(r, dict)
        print(f"parent RSS {r['rss_mb']} MB, {args.threads} busy threads, {args.trials} trials each:")
        for k in ("popen", "running"):
            print(f"  {k:8s} preexec_fn {r['preexec_fn'][f'{k}_median_ms']:7.3f} ms   "
                  f"setpriv {r['setpriv'][f'{k}_median_ms']:7.3f} ms   "
                  f"ratio {r['ratio_preexec_fn_over_setpriv'][k]:5.2f}x")


if __name__ == "__main__":
    main()
