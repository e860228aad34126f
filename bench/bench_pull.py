"""Pulls from a local Hub against plain ``huggingface_hub``, and loads by name against loads
by path, measured side by side in one run.

    .venv/bin/python bench/bench_pull.py [--trials 7] [--noops 200]

The Hub is ``python -m tests.hubstub --gemma`` in its own process (its CPU does not share
this process's GIL), serving the embedded Gemma 3 270M file (253 MB) as
``lemon/gemma-3-270m-GGUF``; every download goes to a fresh, empty cache, so every trial
really transfers the file.

1. Throughput (bytes / wall seconds) of ``router.pull("lemon/gemma-3-270m-GGUF:Q4_K_M")``,
   of the product's ``_hub.pull`` alone (no router, no registration), and of ``_hub.pull``
   with ``verify=False`` (no sha256 of the fresh file), against plain ``hf_hub_download``
   of the same file; the four run in a rotating order within each trial, and the ratios
   are taken per trial (median and range reported), with the CPU seconds this process
   spent on each pull (steadier than wall time on a shared machine: the sha256 check and
   the registration's GGUF header read show there).
2. A model pulled once, loaded by its name against the same file loaded by its path
   (two models to the router, so each is unloaded before the other is loaded): cold loads
   alternating which goes first (wall time, and the router's own part: wall time minus the
   backend's spawn-to-healthy), and ``--noops`` no-op loads after each. Also the registry's
   uncached resolution of the name and of the path.

Writes bench/results/pull.json. Results are ratios and differences from this one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("results")
REPO = "lemon/gemma-3-270m-GGUF"
FILE = "gemma-3-270m-Q4_K_M.gguf"
CHECKPOINT = REPO + ":Q4_K_M"
NAME = "bench-pull-gemma"
CTX = 512
T = TypeVar("T")


class Hub:
    """``python -m tests.hubstub --gemma`` as a process: its URL is the first line it prints,
    closing its stdin stops it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.hubstub", "--gemma"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.close()
            raise RuntimeError("the local Hub did not start")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def timed(call: Callable[[], T]) -> tuple[float, float, T]:
    """(wall seconds, CPU seconds of this process, result) of ``call()``."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = call()
    return time.perf_counter() - t0, time.process_time() - c0, out


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--noops", type=int, default=200)
    parser.add_argument("--scratch", default=None, help="where the caches go (default: the temp dir)")
    args = parser.parse_args()

    loadavg_start = Path("/proc/loadavg").read_text().split()[:3]
    scratch = Path(tempfile.mkdtemp(prefix="lemon-bench-pull-", dir=args.scratch))
    # before huggingface_hub is imported (it reads its settings once): no token, caches in scratch
    os.environ.pop("HF_TOKEN", None)
    os.environ.pop("HUGGING_FACE_HUB_TOKEN", None)
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ["HF_HOME"] = str(scratch / "hf-home")
    os.environ["LEMON_MAGIC_CONFIG_DIR"] = str(scratch / "config")  # registrations stay here

    from huggingface_hub import hf_hub_download

    from lemon_magic import LoadOptions, Router, RouterConfig, _hub
    from lemon_magic.registry import embedded_model_path

    size = embedded_model_path().stat().st_size
    hub = Hub()
    os.environ["HF_ENDPOINT"] = hub.url
    router = Router(RouterConfig())
    ar = router.async_router
    med = statistics.median

    def fresh(tag: str) -> Path:
        d = scratch / tag
        os.environ["HF_HUB_CACHE"] = str(d)  # the product reads it at each call
        return d

    def plain(tag: str) -> tuple[float, float]:
        d = fresh(tag)
        seconds, cpu, path = timed(lambda: hf_hub_download(REPO, FILE, cache_dir=str(d), endpoint=hub.url))
        assert os.path.getsize(str(path)) == size
        shutil.rmtree(d)
        return seconds, cpu

    def router_pull(tag: str) -> tuple[float, float]:
        d = fresh(tag)
        name = f"{NAME}-{tag}"
        seconds, cpu, result = timed(lambda: router.pull(CHECKPOINT, name=name))
        assert result.downloaded == size, result
        router.delete(name)
        shutil.rmtree(d)
        return seconds, cpu

    def hub_pull(tag: str, verify: bool = True) -> tuple[float, float]:
        d = fresh(tag)
        seconds, cpu, pulled = timed(lambda: _hub.pull(CHECKPOINT, verify=verify))
        assert pulled.downloaded == size, pulled
        shutil.rmtree(d)
        return seconds, cpu

    arms: dict[str, Callable[[str], tuple[float, float]]] = {
        "plain": plain, "router": router_pull, "hub": hub_pull,
        "hub_noverify": functools.partial(hub_pull, verify=False)}
    times: dict[str, list[float]] = {k: [] for k in arms}
    cpu: dict[str, list[float]] = {k: [] for k in arms}  # CPU seconds of this process (all threads)
    try:
        # 1. throughput: one untimed round (the stub hashes its file once, imports, first
        # connections), then trials in a rotating order
        for k, arm in arms.items():
            arm(f"warm-{k}")
        order = list(arms)
        for i in range(args.trials):
            for k in order[i % len(order):] + order[:i % len(order)]:
                wall, used = arms[k](f"{k}-{i}")
                times[k].append(wall)
                cpu[k].append(used)

        # 2. one pull, then loads by name and by path of that file
        fresh("kept")
        pulled = router.pull(CHECKPOINT, name=NAME)
        path = pulled.path
        opts = LoadOptions(ctx_size=CTX, backend="llama-server")
        by_name_spec, by_path_spec = ar.registry.resolve(NAME), ar.registry.resolve(path)
        # the same options and file; the name keeps the snapshot link as its -m, the path the blob
        name_opts, path_opts = ar.resolve(by_name_spec, opts), ar.resolve(by_path_spec, opts)
        same_argv = dataclasses.replace(name_opts, model_path="") == \
            dataclasses.replace(path_opts, model_path="") and \
            os.path.realpath(name_opts.model_path) == os.path.realpath(path_opts.model_path)
        for model in (NAME, path):  # untimed: the first spawns of this file
            router.unload(router.load(model, ctx_size=CTX, backend="llama-server").model)

        cold: dict[str, list[float]] = {"name": [], "path": []}
        cold_router: dict[str, list[float]] = {"name": [], "path": []}  # outside spawn-to-healthy
        noop: dict[str, list[float]] = {"name": [], "path": []}
        noop_blocks: dict[str, list[float]] = {"name": [], "path": []}  # each block's median
        noop_inside: dict[str, list[float]] = {"name": [], "path": []}  # on the loop (LoadResult.seconds)
        for i in range(args.trials):
            for how in (("name", "path") if i % 2 == 0 else ("path", "name")):
                model = NAME if how == "name" else path
                seconds, _, loaded = timed(functools.partial(router.load, model, ctx_size=CTX,
                                                          backend="llama-server"))
                assert loaded.action == "loaded", loaded
                cold[how].append(seconds)
                cold_router[how].append(seconds - loaded.load_seconds)
                block = []
                for _ in range(args.noops):
                    t0 = time.perf_counter()
                    again = router.load(model, ctx_size=CTX, backend="llama-server")
                    block.append(time.perf_counter() - t0)
                    assert again.action == "noop", again
                    noop_inside[how].append(again.seconds)
                noop[how] += block
                noop_blocks[how].append(med(block))
                router.unload(loaded.model)

        # uncached resolution (what a first load after a pull or a registry change does)
        resolve: dict[str, list[float]] = {"name": [], "path": []}
        for _ in range(args.noops):
            for how, model in (("name", NAME), ("path", path)):
                t0 = time.perf_counter()
                ar.registry.resolve(model)
                resolve[how].append(time.perf_counter() - t0)
        router.delete(NAME)
    finally:
        router.close()
        hub.close()
        shutil.rmtree(scratch, ignore_errors=True)

    rate = {k: [size / s for s in v] for k, v in times.items()}
    router_ratio = [r / p for r, p in zip(rate["router"], rate["plain"], strict=True)]
    hub_ratio = [h / p for h, p in zip(rate["hub"], rate["plain"], strict=True)]
    router_vs_hub = [r / h for r, h in zip(rate["router"], rate["hub"], strict=True)]
    noverify_ratio = [h / p for h, p in zip(rate["hub_noverify"], rate["plain"], strict=True)]
    verify_cost = [h / n for h, n in zip(rate["hub"], rate["hub_noverify"], strict=True)]
    result = {
        "checkpoint": CHECKPOINT, "bytes": size, "trials": args.trials, "noops": args.noops,
        "ctx_size": CTX, "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "loadavg_start": loadavg_start, "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        "plain_MB_per_s": spread([r / 1e6 for r in rate["plain"]]),
        "router_pull_MB_per_s": spread([r / 1e6 for r in rate["router"]]),
        "hub_pull_MB_per_s": spread([r / 1e6 for r in rate["hub"]]),
        "hub_pull_noverify_MB_per_s": spread([r / 1e6 for r in rate["hub_noverify"]]),
        "router_pull_ratio": spread(router_ratio),  # per trial: router.pull / hf_hub_download
        "hub_pull_ratio": spread(hub_ratio),  # per trial: _hub.pull / hf_hub_download
        "router_over_hub_ratio": spread(router_vs_hub),  # per trial: router.pull / _hub.pull
        "hub_noverify_ratio": spread(noverify_ratio),  # per trial: _hub.pull(verify=False) / plain
        "verify_over_noverify_ratio": spread(verify_cost),  # per trial: _hub.pull / verify=False
        "plain_s": times["plain"], "router_pull_s": times["router"], "hub_pull_s": times["hub"],
        "hub_pull_noverify_s": times["hub_noverify"],
        # CPU seconds this process spent per pull (the Hub's own process not included): steadier
        # than wall time on a shared machine, and what a core must find free for the pull
        "cpu_s": {k: spread(v) for k, v in cpu.items()},
        "same_argv": same_argv,
        "cold_load_by_name_s": med(cold["name"]), "cold_load_by_path_s": med(cold["path"]),
        "cold_load_name_minus_path_ms": (med(cold["name"]) - med(cold["path"])) * 1e3,
        "cold_load_name_minus_path_per_trial_ms": spread(
            [(n - p) * 1e3 for n, p in zip(cold["name"], cold["path"], strict=True)]),
        "cold_router_part_by_name_ms": med(cold_router["name"]) * 1e3,
        "cold_router_part_by_path_ms": med(cold_router["path"]) * 1e3,
        "cold_router_part_name_minus_path_ms": (med(cold_router["name"]) - med(cold_router["path"])) * 1e3,
        "cold_router_part_name_minus_path_per_trial_ms": spread(
            [(n - p) * 1e3 for n, p in zip(cold_router["name"], cold_router["path"], strict=True)]),
        "noop_by_name_median_us": med(noop["name"]) * 1e6,
        "noop_by_path_median_us": med(noop["path"]) * 1e6,
        "noop_name_minus_path_us": (med(noop["name"]) - med(noop["path"])) * 1e6,
        "noop_name_minus_path_per_trial_us": spread(  # paired: the two blocks of one trial
            [(n - p) * 1e6 for n, p in zip(noop_blocks["name"], noop_blocks["path"], strict=True)]),
        "noop_inside_by_name_median_us": med(noop_inside["name"]) * 1e6,
        "noop_inside_by_path_median_us": med(noop_inside["path"]) * 1e6,
        "resolve_by_name_median_us": med(resolve["name"]) * 1e6,
        "resolve_by_path_median_us": med(resolve["path"]) * 1e6,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pull.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result
    mb = size / 1e6

    def row(label: str, key: str) -> str:
        s = r[key]
        return f"{label:<34}{s['median']:>8.3f}  [{s['min']:.3f} .. {s['max']:.3f}]"

    print(f"pull of {CHECKPOINT} ({mb:.0f} MB) from a local Hub, {args.trials} trials, median [min .. max]"
          f"; load average {' '.join(loadavg_start)} at the start on {os.cpu_count()} CPUs")
    print(row("hf_hub_download MB/s", "plain_MB_per_s"))
    print(row("router.pull MB/s", "router_pull_MB_per_s"))
    print(row("_hub.pull MB/s", "hub_pull_MB_per_s"))
    print(row("router.pull / hf_hub_download", "router_pull_ratio") + "  (target >= 0.95)")
    print(row("_hub.pull / hf_hub_download", "hub_pull_ratio"))
    print(row("_hub.pull(verify=False) MB/s", "hub_pull_noverify_MB_per_s"))
    print(row("router.pull / _hub.pull", "router_over_hub_ratio"))
    print(row("_hub.pull(verify=False) / plain", "hub_noverify_ratio"))
    print(row("_hub.pull / _hub.pull(verify=False)", "verify_over_noverify_ratio"))
    print("CPU seconds of this process per pull: " + ", ".join(
        f"{k} {r['cpu_s'][k]['median']:.3f}" for k in arms))
    print(f"cold load (ctx {CTX}) by name {r['cold_load_by_name_s']:.3f} s, by path "
          f"{r['cold_load_by_path_s']:.3f} s: {r['cold_load_name_minus_path_ms']:+.2f} ms  (target <= 1 ms)"
          f"{'' if same_argv else '  (the two loads differ in options or file!)'}")
    print(f"  the router's part (wall minus spawn-to-healthy): by name "
          f"{r['cold_router_part_by_name_ms']:.2f} ms, by path {r['cold_router_part_by_path_ms']:.2f} ms: "
          f"{r['cold_router_part_name_minus_path_ms']:+.2f} ms, per trial "
          f"{r['cold_router_part_name_minus_path_per_trial_ms']['median']:+.2f} ms")
    print(f"no-op load by name {r['noop_by_name_median_us']:.1f} us, by path "
          f"{r['noop_by_path_median_us']:.1f} us: {r['noop_name_minus_path_us']:+.1f} us, per trial "
          f"{r['noop_name_minus_path_per_trial_us']['median']:+.1f} us  (target <= 1 ms)")
    print(f"  on the router's loop: by name {r['noop_inside_by_name_median_us']:.1f} us, by path "
          f"{r['noop_inside_by_path_median_us']:.1f} us")
    print(f"registry resolve (uncached) by name {r['resolve_by_name_median_us']:.1f} us, by path "
          f"{r['resolve_by_path_median_us']:.1f} us")


if __name__ == "__main__":
    main()
