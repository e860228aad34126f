"""Writes docs/benchmarks.md from bench/results/*.json: every figure in its tables is read from a
result file, never typed by hand, so the page cannot drift from what the benchmarks measured.

    .venv/bin/python bench/report.py            # rewrite docs/benchmarks.md
    .venv/bin/python bench/report.py --check    # exit 1 if docs/benchmarks.md is not what it makes

Run it after a benchmark has written its result file, and commit both. ``tests/test_readme.py``
checks that the committed page is what this script makes from the committed results.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"

Data = dict[str, Any]
TIMES, DASH = "\u00d7", "\u2013"  # times and en dash, escaped for the linter


def _f(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def build(d: Data) -> str:
    m, r = d["medians"], d["ratios"]

    def row(name: str, variant: str, goal: str) -> tuple[str, ...]:
        ratio = r[f"{variant}/native"]
        return (f"`{variant}` ÷ native{goal}",
                f"{_f(ratio['prompt'])} ({m[variant]['pp']:.0f} ÷ {m['native']['pp']:.0f})",
                f"{_f(ratio['generation'])} ({m[variant]['tg']:.1f} ÷ {m['native']['tg']:.1f})",
                f"{_f(ratio['cold_load'])} ({m['native']['load_s']:.2f} ÷ {m[variant]['load_s']:.2f} s)")

    a = d["args"]
    return f"""## The portable llama.cpp build

`.venv/bin/python bench/bench_build.py` runs the embedded Gemma on three `llama-server` builds of
the same sources, alternating start by start ({a['rounds']} rounds): what users run (`auto`: ggml
picked `{d['variants']['auto']}` here), what the tests run (`baseline`: `{d['variants']['baseline']}`)
and a `-march=native` build without AMX (`python -m lemon_magic.build_llama_server --native`).
Prompt ({a['prompt_tokens']} tokens) and generation ({a['gen_tokens']}) speeds are llama-server's
own timings, {a['threads']} threads; cold load is spawn to `/health` 200. Ratios of medians, higher
is better (load: native seconds ÷ seconds), on {d['cpu']} ({d['machine']}):

{_table(("ratio", "prompt tokens/s", "generation tokens/s", "cold load"),
        [row("auto", "auto", " (goal ≥ 0.95)"), row("baseline", "baseline", "")])}

`auto` is what a user runs; `baseline` is what the tests run, so that greedy text is the same on
every x86-64 machine. Generation is bound by memory and hardly moves between the variants.
"""


def router(d: Data) -> str:
    rows = [
        ("no-op `load` through the blocking facade, median",
         f"{d['noop_median_ms']:.3f} ms (p99 {d['noop_p99_ms']:.3f} ms)",
         "≤ 0.1 ms (Lemonade: 2 ms over HTTP)"),
        ("cold load ÷ bare start-to-healthy",
         f"{d['cold_load_s']:.3f} s ÷ {d['bare_start_to_healthy_s']:.3f} s = {d['cold_ratio']:.2f}",
         "≤ 1.03"),
        ("option-change reload ÷ (bare stop + bare start)",
         f"{d['reload_s']:.3f} s ÷ {d['bare_stop_plus_start_s']:.3f} s = {d['reload_ratio']:.2f}",
         "≤ 1.05"),
        (f"{d['concurrent_loads']} concurrent cold loads",
         f"{d['concurrent_spawns_max']} spawn, {d['concurrent_ratio']:.2f} {TIMES} one cold load",
         "1 spawn, ≤ 1.05"),
    ]
    return f"""## The router

`.venv/bin/python bench/bench_router.py` measures the router against the same `llama-server`
binary and model ({d['model']}) started by hand, side by side in one run ({d['trials']} trials,
Python {d['python']}):

{_table(("measure", "result", "target"), rows)}
"""


def magics(d: Data) -> str:
    rows = [
        ("streaming tokens/s, `%%lemon_infer` ÷ the same request streamed with httpx",
         f"{d['magic_tokens_per_s']:.1f} ÷ {d['direct_tokens_per_s']:.1f} = {d['tokens_per_s_ratio']:.3f}",
         "≥ 0.98"),
        ("time to first token added by `%%lemon_infer`",
         f"{d['ttft_added_ms']:+.1f} ms ({d['magic_ttft_ms']:.1f} vs {d['direct_ttft_ms']:.1f} ms)",
         "≤ 5 ms"),
        (f"`%load_ext lemon_magic` over a bare IPython shell, whole processes, paired "
         f"({d['load_ext_trials']} pairs)",
         f"{d['load_ext_added_wall_ms']:+.0f} ms wall ({d['load_ext_added_cpu_ms']:+.0f} ms CPU), "
         f"{d['load_ext_added_peak_mib']:+.1f} MiB peak RSS (bare shell: "
         f"{d['bare_shell_wall_ms']:.0f} ms, {d['bare_shell_peak_mib']:.1f} MiB)",
         "≤ 100 ms, ≤ 15 MiB"),
    ]
    return f"""## The magics

`.venv/bin/python bench/bench_magics.py` ({d['trials']} trials of {d['tokens']} tokens;
`--load-ext-only` measures only the last row):

{_table(("measure", "result", "target"), rows)}

Inference runs in the calling thread: the router's loop admits the request (auto-load, busy count)
and releases it, while the tokens go straight from the backend's socket to the cell.
"""


def widgets(d: Data) -> str:
    rows = [
        ("a router event to the row's traits, median (max)",
         f"{d['event_to_trait_median_ms']:.1f} ms ({d['event_to_trait_max_ms']:.1f} ms; "
         f"{d['events_seen']} of {d['events']} events seen)", "≤ 50 ms"),
        ("no-op `load` with a panel subscribed ÷ without",
         f"{d['noop_with_panel_ms']:.3f} ÷ {d['noop_without_panel_ms']:.3f} ms = {d['noop_ratio']:.2f}",
         "noise"),
        (f"{d['panels']} open panels on a ready model",
         f"{d['open_panel_threads']} panel thread, {d['open_status_calls_per_s']:.1f} `status()` call/s",
         "1 thread"),
        (f"the same {d['panels']} panels, closed",
         f"{d['closed_panel_threads']} threads, {d['closed_status_calls_per_s']:.1f} calls/s", "0"),
    ]
    return f"""## The panel

`.venv/bin/python bench/bench_widgets.py` ({d['cycles']} load/unload cycles):

{_table(("measure", "result", "target"), rows)}
"""


def server(d: Data) -> str:
    rows = [
        ("no-op `POST /api/v1/load` over HTTP (keep-alive httpx client), median",
         f"{d['http_noop_load_median_ms']:.3f} ms (p99 {d['http_noop_load_p99_ms']:.2f} ms; the "
         f"facade's no-op in the same run: {d['facade_noop_load_median_ms']:.3f} ms)",
         "≤ 1 ms (Lemonade: 2 ms)"),
        ("streaming tokens/s, through the server ÷ straight to the backend (httpx, from a client process)",
         f"{d['served_tokens_per_s']:.1f} ÷ {d['direct_tokens_per_s']:.1f} = "
         f"{d['tokens_per_s_ratio']:.3f} (paired median {d['paired_tokens_per_s_ratio']:.3f})",
         f"≥ 0.98 {_mark(d['tokens_per_s_ratio'] >= 0.98)}"),
        ("time to first token added by the server",
         f"{d['ttft_added_ms']:+.1f} ms ({d['served_ttft_ms']:.1f} vs {d['direct_ttft_ms']:.1f} ms; "
         f"paired median {d['paired_ttft_added_ms']:+.1f} ms)",
         f"≤ 5 ms {_mark(d['ttft_added_ms'] <= 5)}"),
        (f"{d['concurrent_loads']} concurrent HTTP `/load` of one cold model",
         f"{d['concurrent_spawns_max']} spawn, {d['concurrent_ratio']:.3f} {TIMES} one cold HTTP load "
         f"({d['concurrent_s']:.3f} ÷ {d['cold_http_load_s']:.3f} s)", "1 spawn, ≤ 1.05"),
        (f"requests during {d['reloads']} reloads over `/load`",
         f"{d['failed_requests']} failed of {d['requests_during_reloads']} "
         f"({d['distinct_reload_pids']} new pids)", "0"),
    ]
    return f"""## The HTTP server

`.venv/bin/python bench/bench_server.py` serves the router from its own loop on port 0 and measures
it against the facade and the backend in the same run ({d['trials']} trials, {d['tokens']} tokens;
the streaming client runs in its own process, as any HTTP client does):

{_table(("measure", "result", "target"), rows)}

llama-server's own generation speed, from its `timings`, was {d['backend_own_tokens_per_s_ratio']:.3f}
of the direct run's in the same run: on 2 cores the router's loop takes CPU from the backend for each
streamed event rather than delaying tokens. A leaner backend reader (a raw asyncio protocol for the
chunked event stream) is the lever; it is not built.
"""


def pull(d: Data) -> str:
    r, rr = d["router_pull_ratio"], d["router_over_hub_ratio"]
    rows = [
        ("`router.pull` throughput ÷ plain `hf_hub_download` of the same file",
         f"{d['router_pull_MB_per_s']['median']:.0f} ÷ {d['plain_MB_per_s']['median']:.0f} MB/s = "
         f"{r['median']:.3f} (per trial {r['min']:.2f}{DASH}{r['max']:.2f})",
         f"≥ 0.95 {_mark(r['median'] >= 0.95)}"),
        ("`router.pull` ÷ `_hub.pull` (the router's flight and registration)",
         f"{rr['median']:.3f} ({rr['min']:.2f}{DASH}{rr['max']:.2f})", "free"),
        ("CPU per pull: `router.pull` vs plain",
         f"{d['cpu_s']['router']['median']:.2f} s vs {d['cpu_s']['plain']['median']:.2f} s", "—"),
        ("a cold load by name of a pulled model, the router's part (wall minus spawn-to-healthy), "
         "over a load by path",
         f"{d['cold_router_part_name_minus_path_ms']:+.2f} ms ({d['cold_router_part_by_name_ms']:.2f} vs "
         f"{d['cold_router_part_by_path_ms']:.2f} ms)", "≤ 1 ms"),
        ("a no-op load by name over one by path",
         f"{d['noop_name_minus_path_us']:+.1f} µs", "≤ 1 ms"),
    ]
    return f"""## Pulls from the Hub

`.venv/bin/python bench/bench_pull.py` pulls `{d['checkpoint']}` ({d['bytes'] / 1e6:.0f} MB) from a
local Hub process into a fresh cache each trial, against plain `hf_hub_download` ({d['trials']}
trials, {d['cpus']} CPUs):

{_table(("measure", "result", "target"), rows)}

The router adds nothing measurable to a pull; the gap is in `_hub.pull`: the sha256 check of the
transfer (`huggingface_hub` checks sizes only) and the progress hooks. Over a real network the hash
runs on a spare core while bytes arrive; against a Hub on the same 2-core machine the Hub server,
the client and the hash share two cores.
"""


def remote(d: Data) -> str:
    rows = [
        ("no-op `load` of a remote model (it asks the remote's `/health` first) over one plain "
         "keep-alive `GET /api/v1/health`",
         f"{d['noop_load_median_ms']:.3f} vs {d['health_get_median_ms']:.3f} ms: "
         f"{d['noop_minus_health_median_ms']:+.2f} ms "
         f"(paired {d['paired_noop_minus_health_median_ms']:+.2f}; on the router's loop, without the "
         f"facade's thread hops, {d['loop_noop_minus_health_median_ms']:+.2f} ms)",
         f"≤ one `/health` + 1 ms {_mark(d['noop_minus_health_median_ms'] <= 1)}"),
        ("streamed tokens/s through the router ÷ straight to the remote",
         f"{d['routed_tokens_per_s']:.1f} ÷ {d['direct_tokens_per_s']:.1f} = {d['tokens_per_s_ratio']:.3f} "
         f"(paired {d['paired_tokens_per_s_ratio']:.3f})",
         f"≥ 0.98 {_mark(d['tokens_per_s_ratio'] >= 0.98)}"),
        ("added time to first token",
         f"{d['ttft_added_ms']:+.1f} ms (paired {d['paired_ttft_added_ms']:+.1f})", "—"),
        (f"{d['concurrency']} threads reloading it at once",
         f"{d['concurrent_flights_max']} remote `/load`, {d['concurrent_new_backend_pids_seen_max']} new "
         f"remote pid, {d['concurrent_ratio']:.3f} {TIMES} one reload",
         f"one `/load` {_mark(d['concurrent_flights_max'] == 1)}"),
    ]
    return f"""## Remote models

`.venv/bin/python bench/bench_remote.py` puts a {d['remote']} on this machine as the remote
({d['model']}), registers it as a `lemonade` remote and measures the router against the remote
itself, side by side in one run ({d['trials']} trials, {d['cpus']} CPUs):

{_table(("measure", "result", "target"), rows)}
"""


def spawn(d: Data) -> str:
    def row(size: str) -> tuple[str, ...]:
        s = d[size]
        return (f"parent of {s['rss_mb']} MB",
                f"{s['setpriv']['popen_median_ms']:.2f} ms", f"{s['preexec_fn']['popen_median_ms']:.2f} ms",
                f"{s['ratio_preexec_fn_over_setpriv']['popen']:.1f}")

    return f"""## Spawning backends

`.venv/bin/python bench/bench_spawn.py` compares how the parent-death signal is set at spawn:
util-linux's `setpriv --pdeathsig KILL` (exec, no Python between fork and exec, so `subprocess` can
use `vfork`) against `preexec_fn` (the fallback where `setpriv` is missing), with {d['threads']}
busy threads alive as in a kernel ({d['trials']} trials). How long `Popen()` blocks the router's loop
thread, median:

{_table(("parent", "setpriv", "preexec_fn", "ratio"), [row("small"), row("ballast")])}
"""


SECTIONS: tuple[tuple[str, Callable[[Data], str]], ...] = (
    ("build", build), ("router", router), ("magics", magics), ("widgets", widgets),
    ("server", server), ("pull", pull), ("remote", remote), ("spawn", spawn),
)


def render(results: Path = RESULTS) -> str:
    parts = ["""# Benchmarks

<!-- Generated by bench/report.py from bench/results/*.json: do not edit by hand. -->

Each benchmark measures lemon_magic side by side with the thing it wraps, in one run, alternating,
on the machine that wrote its result file (a shared 2-core machine unless said otherwise), and
writes `bench/results/NAME.json`; `bench/report.py` makes this page from those files. Single runs
on a shared machine move by a few per cent; ratios just below 1 are that noise.
"""]
    for name, section in SECTIONS:
        data = json.loads((results / f"{name}.json").read_text())
        parts.append(section(data))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.exists() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run bench/report.py", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(exist_ok=True)
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
