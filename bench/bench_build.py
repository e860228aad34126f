"""What the one portable llama.cpp build costs, against a native build of the same sources.

    .venv/bin/python bench/bench_build.py [--rounds 5] [--prompt-tokens 512] [--gen-tokens 64]

Three ``llama-server`` binaries of the pinned sources run the embedded Gemma 3 270M:

- ``auto``: what users run (ggml picks the best CPU variant this machine has);
- ``baseline``: what the tests run (the AVX2/FMA/F16C/BMI2 variant only);
- ``native``: ``-march=native`` without AMX, built here on first use (about 4 minutes;
  ``python -m lemon_magic.build_llama_server --native``).

Rounds alternate the three (the order rotates each round). Per start: the cold load (spawn
until ``/health`` answers 200), then ``--requests`` greedy completions of a
``--prompt-tokens`` prompt (prompt cache off) generating ``--gen-tokens`` tokens; prompt and
generation speeds are llama-server's own ``timings``. Reports medians and the ratios
``auto / native`` and ``baseline / native`` (speeds: tokens/s ÷ tokens/s; cold load:
native seconds ÷ seconds, so that 1.0 is "as fast" and lower is slower everywhere);
writes bench/results/build.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from pathlib import Path

import httpx
import psutil

from lemon_magic import build_llama_server as build
from lemon_magic.registry import embedded_model_path

RESULTS = Path(__file__).with_name("results")
BUILDS = ("auto", "baseline", "native")


def binary(which: str) -> Path:
    if which == "native":
        return build.build(native=True) / "auto" / "llama-server"
    return build.lib_dir(which) / "llama-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def variant_loaded(pid: int) -> str:
    """The CPU variant library the process has mapped (``built in``: a build without variants)."""
    names = {Path(m.path).name for m in psutil.Process(pid).memory_maps() if m.path}
    return ", ".join(sorted(n for n in names if n.startswith("libggml-cpu"))) or "built in"


def one_start(which: str, prompt: str, args: argparse.Namespace) -> dict[str, object]:
    port = free_port()
    argv = [str(binary(which)), "-m", str(embedded_model_path()), "--port", str(port),
            "--host", "127.0.0.1", "--ctx-size", "2048", "--threads", str(args.threads),
            "--no-warmup"]
    client = httpx.Client(timeout=300, trust_env=False)
    began = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while True:
            assert proc.poll() is None, f"{which}: llama-server exited {proc.returncode}"
            try:
                if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.01)
        load_s = time.perf_counter() - began
        variant = variant_loaded(proc.pid)
        pp, tg = [], []
        for _ in range(args.requests):
            body = {"prompt": prompt, "n_predict": args.gen_tokens, "temperature": 0,
                    "cache_prompt": False, "ignore_eos": True}
            timings = client.post(f"http://127.0.0.1:{port}/completion", json=body).json()["timings"]
            pp.append(timings["prompt_per_second"])
            tg.append(timings["predicted_per_second"])
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
        client.close()
    return {"load_s": load_s, "pp": max(pp), "tg": max(tg), "variant": variant}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    for which in BUILDS:
        binary(which)  # builds native on first use, before any timing
    # about one token per word for Gemma's tokenizer
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * (args.prompt_tokens // 10))
    runs: dict[str, list[dict[str, object]]] = {b: [] for b in BUILDS}
    for which in BUILDS:  # warm-up: page cache, model file
        one_start(which, prompt, args)
    for r in range(args.rounds):
        order = BUILDS[r % 3:] + BUILDS[:r % 3]
        for which in order:
            runs[which].append(one_start(which, prompt, args))
            print(which, runs[which][-1], flush=True)
    med = {b: {k: statistics.median(float(run[k]) for run in runs[b])  # type: ignore[arg-type]
               for k in ("load_s", "pp", "tg")} for b in BUILDS}
    ratios = {f"{b}/native": {"prompt": med[b]["pp"] / med["native"]["pp"],
                              "generation": med[b]["tg"] / med["native"]["tg"],
                              "cold_load": med["native"]["load_s"] / med[b]["load_s"]}
              for b in ("auto", "baseline")}
    result = {"machine": platform.processor() or platform.machine(),
              "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                           .splitlines() if line.startswith("model name")), ""),
              "variants": {b: runs[b][0]["variant"] for b in BUILDS},
              "args": vars(args), "medians": med, "ratios": ratios}
    print(json.dumps({"variants": result["variants"], "medians": med, "ratios": ratios}, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "build.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
