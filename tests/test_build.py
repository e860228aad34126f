"""The one llama.cpp build (lemon_magic/build_llama_server.py): the tests' backends run its
baseline CPU variant only, both backends run on it, and a CPU without the baseline is told so."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import psutil
import pytest

from lemon_magic import BackendUnavailable, Router
from lemon_magic import build_llama_server as build
from lemon_magic.backends.llama_cpp_python import LlamaCppPython
from lemon_magic.backends.llama_server import LlamaServer

pytestmark = pytest.mark.real

#: AVX-512 (zmm registers, the upper 16 xmm/ymm, mask registers, embedded broadcast) and AMX
BEYOND_BASELINE = re.compile(r"%zmm|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[0-7]\b|\{1to\d+\}|"
                             r"\b(tileloadd|tilestored|tdpb\w+|ldtilecfg|tilerelease)\b")


def beyond_baseline(library: Path) -> list[str]:
    """Instructions of ``library`` that the baseline (AVX2/FMA/F16C/BMI2) does not have."""
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to read the build's instructions"
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(library)], capture_output=True,
                          text=True, check=True).stdout
    return [line.strip() for line in text.splitlines() if BEYOND_BASELINE.search(line)]


def mapped_from_build(pid: int) -> set[Path]:
    """The files of our build (program and libraries) that process ``pid`` has mapped."""
    root = build.build_root().resolve()
    mapped = {Path(m.path) for m in psutil.Process(pid).memory_maps(grouped=True) if m.path}
    exe = Path(psutil.Process(pid).exe())
    return {p for p in mapped | {exe} if root in p.resolve().parents}


needs_x86 = pytest.mark.skipif(not build.is_x86_64(), reason="CPU variants exist on x86-64 only")


@needs_x86
def test_the_check_can_see_avx512() -> None:
    """The fast variant of the same build does use AVX-512: the check below can fail."""
    fast = build.lib_dir("auto") / f"libggml-cpu-{build.FAST_VARIANTS[0]}.so"
    assert beyond_baseline(fast)


@needs_x86
@pytest.mark.parametrize("backend", ["llama-server", "llama-cpp-python"])
def test_tests_run_only_baseline_instructions(router: Router, tiny_model: str, backend: str) -> None:
    assert build.cpu_choice() == "baseline"
    r = router.load(tiny_model, ctx_size=256, backend=backend)
    assert r.pid is not None
    files = mapped_from_build(r.pid)
    names = {p.name for p in files}
    # both backends run on the one shared build, from its baseline folder
    assert any(n.startswith("libllama.so") for n in names), names
    assert all(p.parent == build.lib_dir("baseline") for p in files), files
    cpu = {n for n in names if n.startswith("libggml-cpu")}
    assert cpu == {f"libggml-cpu-{build.BASELINE}.so"}, cpu
    for path in sorted(files):
        found = beyond_baseline(path)
        assert not found, f"{path.name} has instructions beyond the baseline: {found[:3]}"
    out = router.complete(tiny_model, "hello", max_tokens=4, temperature=0)
    assert out.text is not None


def test_users_get_the_best_variant_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(build.CPU_ENV_VAR)
    assert build.built_binary().parent.name == "auto"
    monkeypatch.setenv(build.CPU_ENV_VAR, "turbo")
    with pytest.raises(BackendUnavailable, match=r"LEMON_MAGIC_CPU must be one of auto, baseline"):
        LlamaServer().locate()


OLD_CPU = "processor\t: 0\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx popcnt\n"


def test_a_cpu_without_the_baseline_is_told_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(build, "is_x86_64", lambda: True)
    assert build.missing_baseline_features(OLD_CPU) == ["f16c", "fma", "avx2", "bmi2"]
    monkeypatch.setattr(build, "_cpuinfo", lambda: OLD_CPU)
    with pytest.raises(SystemExit) as exit_info:
        build.main(["--check-cpu"])
    message = str(exit_info.value.code)
    assert message == ("setup: this CPU lacks f16c, fma, avx2, bmi2: the llama.cpp build needs "
                       "x86-64 with sse4_2, avx, f16c, fma, avx2, bmi2 (Intel Haswell, AMD Zen or newer)")
    monkeypatch.delenv("LEMON_MAGIC_LLAMA_SERVER", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name, **kw: None)
    with pytest.raises(BackendUnavailable) as err:
        LlamaServer().locate()
    assert "\n" not in str(err.value) and "lacks f16c, fma, avx2, bmi2" in str(err.value)
    with pytest.raises(BackendUnavailable) as err:
        LlamaCppPython().command()
    assert str(err.value).startswith("llama-cpp-python cannot run here: this CPU lacks f16c")


def test_a_full_cpu_passes_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "is_x86_64", lambda: True)
    monkeypatch.setattr(build, "_cpuinfo", lambda: OLD_CPU.replace("avx popcnt", "avx f16c fma avx2 bmi2"))
    build.main(["--check-cpu"])


def test_llama_cpp_python_without_the_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(BackendUnavailable) as err:
        LlamaCppPython().command()
    assert str(err.value) == ("the llama-cpp-python backend is not installed "
                              "(pip install 'lemon_magic[llama-cpp-python]')")


def test_the_shared_build_is_laid_out_for_both_backends() -> None:
    for choice in build.CPU_CHOICES:
        folder = build.lib_dir(choice)
        assert (folder / "llama-server").is_file() and (folder / "libllama.so").exists()
        # ggml finds its CPU variants next to the program: llama-server is a file, not a link
        assert not (folder / "llama-server").is_symlink()
    if build.is_x86_64():
        fast = {f"libggml-cpu-{v}.so" for v in build.FAST_VARIANTS}
        assert fast <= {p.name for p in build.lib_dir("auto").iterdir()}
        assert not fast & {p.name for p in build.lib_dir("baseline").iterdir()}
