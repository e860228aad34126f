"""Build ``llama-server`` offline from the llama.cpp sources in the ``llama-cpp-python`` sdist.

Usage::

    python -m lemon_magic.build_llama_server [--sdist PATH] [--jobs N] [--force]

The sdist of the pinned ``llama-cpp-python`` release ships llama.cpp with
``tools/server``. We fetch it with ``pip download`` (served from pip's cache
after the first time), configure a CPU-only, static, UI-less build and compile
only the ``llama-server`` target. The binary lands in
``<cache_dir>/llama-server/<version>/llama-server`` and is reused from then on;
it prints its path on stdout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from lemon_magic._paths import cache_dir

__all__ = ("LLAMA_CPP_PYTHON_VERSION", "build", "built_binary")

#: The llama-cpp-python release whose vendored llama.cpp we build (same as the wheel we pin).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

#: ggml's AMX kernels crash (SIGSEGV in ggml_backend_amx_mul_mat) on Gemma 3's Q4_K_M tensors
#: on CPUs with AMX (seen on these machines); build for the native CPU without AMX. GCC lets
#: explicit -mno-* flags win over -march=native whatever their order.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
#: part of the cache path: a binary built with other flags is never reused
BUILD_TAG = "noamx"

_CMAKE_FLAGS = (
    f"-DCMAKE_C_FLAGS={NO_AMX}",
    f"-DCMAKE_CXX_FLAGS={NO_AMX}",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)


def built_binary(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Where the cached binary for ``version`` lives (it may not exist yet)."""
    return cache_dir() / "llama-server" / f"{version}-{BUILD_TAG}" / "llama-server"


def _download_sdist(version: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--quiet", "-d", str(into), f"llama-cpp-python=={version}"]
    subprocess.run(cmd, check=True)
    return next(into.glob("llama_cpp_python-*.tar.gz"))


def _extract_llama_cpp(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(into, members=members, filter="data")
    return next(into.glob("*/vendor/llama.cpp"))


def build(version: str = LLAMA_CPP_PYTHON_VERSION, *, sdist: Path | None = None,
          jobs: int | None = None, force: bool = False) -> Path:
    """Build (or reuse) ``llama-server`` and return the path of the binary."""
    target = built_binary(version)
    if target.exists() and not force:
        return target
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"build_llama_server: {tool!r} is not on PATH; install cmake and a C++ compiler")
    jobs = jobs or os.cpu_count() or 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lemon-llama-build-") as tmp:
        work = Path(tmp)
        sdist = sdist or _download_sdist(version, work)
        source = _extract_llama_cpp(sdist, work / "src")
        build_dir = work / "build"
        log_path = target.parent / "build.log"
        target.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as log_file:
            for step in (["cmake", "-S", str(source), "-B", str(build_dir), *_CMAKE_FLAGS],
                         ["cmake", "--build", str(build_dir), "--target", "llama-server",
                          "-j", str(jobs)]):
                done = subprocess.run(step, stdout=log_file, stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    tail = log_path.read_text(errors="replace").splitlines()[-30:]
                    raise SystemExit("build_llama_server: {} failed (exit {}); log: {}\n{}".format(
                        " ".join(step[:2]), done.returncode, log_path, "\n".join(tail)))
        partial = target.with_suffix(".partial")
        shutil.copy2(build_dir / "bin" / "llama-server", partial)
        partial.replace(target)
    print(f"built llama-server {version} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return target


def wheel_dir() -> Path:
    """Where :func:`build_wheel` keeps the llama-cpp-python wheels it built."""
    return cache_dir() / "wheels" / BUILD_TAG


def build_wheel(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Build (or reuse) the ``llama-cpp-python`` wheel with the same flags as llama-server
    (no AMX) and return the folder holding it, for ``pip install --find-links``.

    pip's own wheel cache would hand back a wheel built with other flags, so this one
    is built with ``--no-cache-dir`` into a folder of ours, once per machine.
    """
    folder = wheel_dir()
    if any(folder.glob(f"llama_cpp_python-{version}-*.whl")):
        return folder
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lemon-llama-wheel-") as tmp:
        env = {**os.environ, "CMAKE_ARGS": f"-DCMAKE_C_FLAGS='{NO_AMX}' -DCMAKE_CXX_FLAGS='{NO_AMX}'"}
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "--no-cache-dir", "--no-binary", "llama-cpp-python", "-w", tmp,
                        f"llama-cpp-python=={version}"], check=True, env=env)
        folder.mkdir(parents=True, exist_ok=True)
        for wheel in Path(tmp).glob("*.whl"):
            shutil.copy2(wheel, folder / f"{wheel.name}.partial")
            (folder / f"{wheel.name}.partial").replace(folder / wheel.name)
    print(f"built the llama-cpp-python {version} wheel in {time.monotonic() - started:.0f} s",
          file=sys.stderr)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION, help="llama-cpp-python sdist version")
    parser.add_argument("--sdist", type=Path, help="use this sdist instead of pip download")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--wheel", action="store_true",
                        help="build the llama-cpp-python wheel instead; print its folder")
    args = parser.parse_args(argv)
    if args.wheel:
        print(build_wheel(args.version))
        return
    print(build(args.version, sdist=args.sdist, jobs=args.jobs, force=args.force))


if __name__ == "__main__":
    main()
