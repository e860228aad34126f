"""Build llama.cpp once, offline, from the sources in the ``llama-cpp-python`` sdist.

Usage::

    python -m lemon_magic.build_llama_server [--sdist PATH] [--jobs N] [--force]
    python -m lemon_magic.build_llama_server --fetch      # only download the sdist; print its path
    python -m lemon_magic.build_llama_server --wheel      # llama-cpp-python's Python part, no compile
    python -m lemon_magic.build_llama_server --check-cpu  # exit 1 with one line if the CPU is too old

One build serves both backends: ``llama-server`` and the shared libraries
(``libllama``, ``libggml``...) that ``llama-cpp-python`` loads through
``LLAMA_CPP_LIB_PATH``. On x86-64 the CPU code is built as ggml's runtime
variants (``GGML_BACKEND_DL``): :data:`BASELINE` (AVX2, FMA, F16C, BMI2) and
:data:`FAST_VARIANTS` (AVX-512, never AMX, whose kernels crash on Gemma's
Q4_K_M tensors). The build is laid out twice, hard-linked:

* ``<cache>/llama.cpp/<key>/auto/``: every variant; ggml picks the best one
  the CPU has at start-up. What users run.
* ``<cache>/llama.cpp/<key>/baseline/``: the baseline variant only. What the
  tests run (``LEMON_MAGIC_CPU=baseline``), so that greedy text, and the
  stored notebook outputs, are the same on every x86-64 machine.

Elsewhere (not x86-64) both are one ``-march=native`` build.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from lemon_magic._paths import cache_dir

__all__ = ("BASELINE", "CPU_ENV_VAR", "FAST_VARIANTS", "LLAMA_CPP_PYTHON_VERSION", "build",
           "build_wheel", "built_binary", "lib_dir", "missing_baseline_features")

#: The llama-cpp-python release whose vendored llama.cpp we build (the Python part we pin).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

#: ggml's x86-64 CPU variant that every machine (and every test) can run, and the
#: ``/proc/cpuinfo`` flags it needs: Intel Haswell (2013), AMD Excavator/Zen or newer.
BASELINE = "haswell"
BASELINE_CPU_FLAGS = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2")
#: Faster variants for CPUs that have more: AVX-512 F/CD/VL/DQ/BW + VBMI/VNNI/BF16 (AMD Zen 4/5,
#: Intel Sapphire Rapids and newer), without AMX. ggml scores each at start-up and takes the best.
FAST_VARIANTS = ("zen4",)

#: ``auto`` (default: the best variant the CPU has) or ``baseline`` (the tests' choice)
CPU_ENV_VAR = "LEMON_MAGIC_CPU"
CPU_CHOICES = ("auto", "baseline")

_COMMON_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    # every library and llama-server land in bin/ and find each other there, wherever it is copied
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)
_VARIANT_FLAGS = ("-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON",
                  # -O2 for what is not on the token path (the server, HTTP, JSON, chat parsing,
                  # mtmd): a cold set-up takes about 10 % less; _HOT_AT_O3 keeps -O3 where it counts
                  "-DCMAKE_C_FLAGS_RELEASE=-O2 -DNDEBUG", "-DCMAKE_CXX_FLAGS_RELEASE=-O2 -DNDEBUG")
#: appended to llama.cpp's top-level CMakeLists.txt: the kernels and the model code stay at -O3
#: (GCC takes the last -O; a target's own options come after the build type's flags)
_HOT_AT_O3 = (
    "\n# lemon_magic: the token path at -O3, the rest at -O2 (CMAKE_<LANG>_FLAGS_RELEASE)\n"
    "foreach(hot ggml-base ggml llama {variants})\n"
    "    if (TARGET ${{hot}})\n"
    "        target_compile_options(${{hot}} PRIVATE -O3)\n"
    "    endif()\n"
    "endforeach()\n")
#: GCC lets explicit -mno-* flags win over -march=native whatever their order
_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
_NATIVE_FLAGS = ("-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={_NO_AMX}", f"-DCMAKE_CXX_FLAGS={_NO_AMX}")

#: ggml makes libggml depend on every CPU variant it defines (a dozen on x86-64); we build
#: only ours, as explicit targets, so this one line of the pinned sources goes.
_ALL_VARIANTS_DEPENDENCY = "        add_dependencies(ggml ${backend})\n"


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _kind(native: bool) -> str:
    return "native" if native or not is_x86_64() else "+".join((BASELINE, *FAST_VARIANTS))


def build_root(version: str = LLAMA_CPP_PYTHON_VERSION, *, native: bool = False) -> Path:
    """The cache folder of one build, keyed by version, variants and flags."""
    kind = _kind(native)
    flags = _NATIVE_FLAGS if kind == "native" else _VARIANT_FLAGS
    digest = hashlib.sha256("\n".join((*_COMMON_FLAGS, *flags, _hot_at_o3())).encode()).hexdigest()[:8]
    return cache_dir() / "llama.cpp" / f"{version}-{kind}-{digest}"


def cpu_choice() -> str:
    """``$LEMON_MAGIC_CPU``: ``auto`` unless it says ``baseline``.

    :raises ValueError: any other value.
    """
    value = os.environ.get(CPU_ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CPU_CHOICES:
        raise ValueError(f"${CPU_ENV_VAR} must be one of {', '.join(CPU_CHOICES)}, not {value!r}")
    return value


def lib_dir(choice: str | None = None, *, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The folder of llama-server and the shared libraries for ``choice`` (default:
    :func:`cpu_choice`); it may not exist yet."""
    return build_root(version) / (choice or cpu_choice())


def built_binary(choice: str | None = None, *, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Where the built ``llama-server`` for ``choice`` lives (it may not exist yet)."""
    return lib_dir(choice, version=version) / "llama-server"


def missing_baseline_features(cpuinfo: str | None = None) -> list[str]:
    """The baseline's CPU flags this machine lacks (``[]`` off x86-64 or where it cannot tell)."""
    if not is_x86_64():
        return []
    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), None)
    if flags is None:
        return []
    return [flag for flag in BASELINE_CPU_FLAGS if flag not in flags]


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def baseline_error(missing: list[str]) -> str:
    """One line for a CPU without the baseline."""
    return (f"this CPU lacks {', '.join(missing)}: the llama.cpp build needs x86-64 with "
            f"{', '.join(BASELINE_CPU_FLAGS)} (Intel Haswell, AMD Zen or newer)")


def fetch_sdist(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Download the sdist once into the cache and return its path: straight from pip's index
    (checked against the index's sha256), else through ``pip download`` (which also builds the
    package's metadata: about 25 s more on a cold pip cache)."""
    folder = cache_dir() / "sdist"
    target = folder / f"llama_cpp_python-{version}.tar.gz"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lemon-sdist-", dir=folder) as tmp:
        got = _download_from_index(target.name, Path(tmp))
        if got is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                            ":all:", "--quiet", "-d", tmp, f"llama-cpp-python=={version}"], check=True)
            got = Path(tmp) / target.name
        got.replace(target)
    return target


def _index_url() -> str:
    """pip's index: ``$PIP_INDEX_URL``, else its configuration, else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].split()[0]
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                            text=True, check=False).stdout
    for line in reversed(listed.splitlines()):
        key, _, value = line.partition("=")
        if key.endswith(".index-url"):
            return value.strip("'\"").split()[0]
    return "https://pypi.org/simple"


def _download_from_index(filename: str, into: Path) -> Path | None:
    """``filename`` from the index's PEP 691 JSON page, verified; ``None`` if that fails."""
    import json
    import urllib.parse
    import urllib.request

    page_url = _index_url().rstrip("/") + "/llama-cpp-python/"
    try:
        request = urllib.request.Request(page_url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            files = json.load(response)["files"]
        entry = next(f for f in files if f["filename"] == filename)
        path = into / filename
        digest = hashlib.sha256()
        with urllib.request.urlopen(urllib.parse.urljoin(page_url, entry["url"]), timeout=60) as got, \
                path.open("wb") as out:
            while chunk := got.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, ValueError, KeyError, StopIteration):
        return None
    return path if digest.hexdigest() == entry["hashes"].get("sha256") else None


def _extract_llama_cpp(sdist: Path, into: Path) -> Path:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(into, members=members, filter="data")
    return next(into.glob("*/vendor/llama.cpp"))


def _drop_all_variants_dependency(source: Path) -> None:
    cmake = source / "ggml" / "src" / "CMakeLists.txt"
    text = cmake.read_text()
    if _ALL_VARIANTS_DEPENDENCY not in text:
        raise SystemExit(f"build_llama_server: {cmake} changed; the variant patch no longer applies")
    cmake.write_text(text.replace(_ALL_VARIANTS_DEPENDENCY, "", 1))


def _hot_at_o3() -> str:
    return _HOT_AT_O3.format(variants=" ".join(f"ggml-cpu-{v}" for v in (BASELINE, *FAST_VARIANTS)))


def _keep_the_token_path_at_o3(source: Path) -> None:
    with (source / "CMakeLists.txt").open("a") as cmake:
        cmake.write(_hot_at_o3())


def _run_logged(steps: list[list[str]], log_path: Path) -> None:
    with log_path.open("w") as log_file:
        for step in steps:
            print("$", " ".join(step), file=log_file, flush=True)
            done = subprocess.run(step, stdout=log_file, stderr=subprocess.STDOUT)
            if done.returncode != 0:
                tail = log_path.read_text(errors="replace").splitlines()[-25:]
                raise SystemExit("build_llama_server: {} failed (exit {}); last lines of {}:\n{}".format(
                    " ".join(step[:2]), done.returncode, log_path, "\n".join(tail)))


def _lay_out(bin_dir: Path, root: Path, *, variants: bool) -> None:
    """Copy llama-server and the libraries to ``auto/``; hard-link ``baseline/`` beside it
    without the fast variants. Both appear at once (renamed into place), or not at all."""
    wanted = [p for p in bin_dir.iterdir()
              if p.name == "llama-server" or (".so" in p.name and p.name.startswith("lib"))]
    fast = {f"libggml-cpu-{v}.so" for v in FAST_VARIANTS} if variants else set()
    for choice, skip in (("auto", set()), ("baseline", fast)):
        partial = root / f"{choice}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for path in wanted:
            if path.name in skip:
                continue
            if path.is_symlink():
                (partial / path.name).symlink_to(os.readlink(path))
            elif choice == "auto":
                shutil.copy2(path, partial / path.name)
            else:
                os.link(root / "auto.partial" / path.name, partial / path.name)
    for choice in ("auto", "baseline"):
        shutil.rmtree(root / choice, ignore_errors=True)
        (root / f"{choice}.partial").replace(root / choice)


def build(version: str = LLAMA_CPP_PYTHON_VERSION, *, sdist: Path | None = None,
          jobs: int | None = None, force: bool = False, native: bool = False) -> Path:
    """Build (or reuse) llama.cpp and return the folder of its build (``auto/`` and
    ``baseline/`` inside). ``native=True`` builds for this CPU only (``-march=native``, no
    AMX), for the benchmark that compares against it."""
    root = build_root(version, native=native)
    if (root / "auto" / "llama-server").exists() and (root / "baseline").exists() and not force:
        return root
    missing = missing_baseline_features()
    if missing:
        raise SystemExit(f"build_llama_server: {baseline_error(missing)}")
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"build_llama_server: {tool!r} is not on PATH; install cmake and a C++ compiler")
    variants = _kind(native) != "native"
    targets = ["llama-server", *(f"ggml-cpu-{v}" for v in (BASELINE, *FAST_VARIANTS))] if variants \
        else ["llama-server"]
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    jobs = jobs or os.cpu_count() or 2
    started = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lemon-llama-build-") as tmp:
        work = Path(tmp)
        source = _extract_llama_cpp(sdist or fetch_sdist(version), work / "src")
        if variants:
            _drop_all_variants_dependency(source)
            _keep_the_token_path_at_o3(source)
        build_dir = work / "build"
        flags = (*_COMMON_FLAGS, *(_VARIANT_FLAGS if variants else _NATIVE_FLAGS))
        _run_logged([["cmake", "-S", str(source), "-B", str(build_dir), *generator, *flags],
                     ["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *targets]],
                    root / "build.log")
        _lay_out(build_dir / "bin", root, variants=variants)
    print(f"built llama.cpp {version} ({_kind(native)}) in {time.monotonic() - started:.0f} s",
          file=sys.stderr)
    return root


def wheel_dir() -> Path:
    """Where :func:`build_wheel` keeps the llama-cpp-python wheels it built."""
    return cache_dir() / "wheels" / "nolib"


def build_wheel(version: str = LLAMA_CPP_PYTHON_VERSION, *, sdist: Path | None = None) -> Path:
    """Build (or reuse) llama-cpp-python's wheel *without* its own llama.cpp
    (``LLAMA_BUILD=OFF``: seconds, no compile) and return the folder holding it, for
    ``pip install --find-links``. It runs on the shared build through ``LLAMA_CPP_LIB_PATH``
    (lemon_magic's llama-cpp-python backend sets it)."""
    folder = wheel_dir()
    if any(folder.glob(f"llama_cpp_python-{version}-*.whl")):
        return folder
    sdist = sdist or fetch_sdist(version)
    with tempfile.TemporaryDirectory(prefix="lemon-llama-wheel-") as tmp:
        env = {**os.environ, "CMAKE_ARGS": "-DLLAMA_BUILD=OFF"}
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "--no-cache-dir", "-w", tmp, str(sdist)], check=True, env=env)
        folder.mkdir(parents=True, exist_ok=True)
        for wheel in Path(tmp).glob("*.whl"):
            shutil.copy2(wheel, folder / f"{wheel.name}.partial")
            (folder / f"{wheel.name}.partial").replace(folder / wheel.name)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", default=LLAMA_CPP_PYTHON_VERSION, help="llama-cpp-python sdist version")
    parser.add_argument("--sdist", type=Path, help="use this sdist instead of pip download")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--native", action="store_true",
                        help="build for this CPU only (-march=native, no AMX), for bench/")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--fetch", action="store_true", help="only download the sdist; print its path")
    what.add_argument("--wheel", action="store_true",
                      help="build llama-cpp-python's wheel without llama.cpp; print its folder")
    what.add_argument("--check-cpu", action="store_true",
                      help="exit 1 with one line if this CPU lacks the baseline")
    args = parser.parse_args(argv)
    if args.check_cpu:
        missing = missing_baseline_features()
        if missing:
            raise SystemExit(f"setup: {baseline_error(missing)}")
        return
    if args.fetch:
        print(fetch_sdist(args.version))
    elif args.wheel:
        print(build_wheel(args.version, sdist=args.sdist))
    else:
        print(build(args.version, sdist=args.sdist, jobs=args.jobs, force=args.force, native=args.native))


if __name__ == "__main__":
    main()
