"""What pyproject.toml declares matches what the package uses: dependencies, floors, Python."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest

from lemon_magic.magics import LemonMagics, apply_pyproject

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lemon_magic"


def _lowest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lowest_requirements",
                                                  ROOT / "scripts" / "lowest_requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lowest = _lowest()
PROJECT = lowest.load_project()


def _trees() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


_STDLIB = sys.stdlib_module_names | {"tomllib"}  # tomllib: stdlib from 3.11 on


def _third_party(module: str) -> bool:
    top = module.split(".")[0]
    return top not in _STDLIB and top not in ("lemon_magic", "__future__")


def _imported_modules() -> set[str]:
    """Every module the package imports (also inside functions), stdlib and itself left out."""
    found: set[str] = set()
    for tree in _trees().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    return {m for m in found if _third_party(m)}


def _distribution(module: str) -> str:
    top = module.split(".")[0]
    dists = metadata.packages_distributions().get(top)
    name = dists[0] if dists else top  # not installed here (tomli on 3.11+): its own name
    return lowest.canonicalize_name(name)  # type: ignore[no-any-return]


def test_every_imported_distribution_is_a_declared_dependency_with_a_floor() -> None:
    declared = {lowest.canonicalize_name(lowest.Requirement(s).name): lowest.Requirement(s)
                for s in PROJECT["dependencies"]}
    used = {_distribution(m) for m in _imported_modules()}
    assert used - declared.keys() == set(), "imported but not declared in [project] dependencies"
    for name in used:
        lowest.floor(declared[name])  # raises if it has no lower bound


def test_every_attribute_used_of_a_dependency_exists_in_the_installed_version() -> None:
    """``anyio.notify_closing`` and friends: run in .venv-lowest, this checks the declared floors."""
    importlib.import_module("lemon_magic.magics")
    importlib.import_module("lemon_magic.widgets")
    missing = []
    for path, tree in _trees().items():
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if _third_party(a.name) and a.name.split(".")[0] != "tomli":
                        top = a.name.split(".")[0]
                        if a.asname:  # import a.b as c: c is a.b
                            aliases[a.asname] = a.name
                        else:  # import a.b: a is a
                            aliases[top] = top
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and _third_party(node.module) and node.module != "tomli":
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases:
                module = importlib.import_module(aliases[node.value.id])
                if not hasattr(module, node.attr):
                    missing.append(f"{path.name}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    versions = {d: metadata.version(d) for d in ("anyio", "httpx", "psutil", "ipython", "ipywidgets")}
    assert missing == [], f"not in the installed versions {versions}"


def test_mypy_and_ruff_check_the_oldest_declared_python() -> None:
    oldest = lowest.python_floor(PROJECT)
    tools = lowest.tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    assert tools["mypy"]["python_version"] == oldest
    assert tools["ruff"]["target-version"] == "py" + oldest.replace(".", "")


def test_the_lowest_requirements_pin_every_dependency_at_its_floor() -> None:
    lines = lowest.lowest_lines(PROJECT, tools=["pytest"])
    pins = [lowest.Requirement(line) for line in lines[:-1]]
    assert [p.name for p in pins] == [lowest.canonicalize_name(lowest.Requirement(s).name)
                                      for s in PROJECT["dependencies"]]
    assert all([s.operator for s in p.specifier] == ["=="] for p in pins)
    assert next(p for p in pins if p.name == "tomli").marker is not None
    assert lines[-1].startswith("pytest>=")
    with pytest.raises(ValueError, match="no lower bound"):
        lowest.floor(lowest.Requirement("numpy<3"))


def test_the_default_install_compiles_nothing() -> None:
    """llama-cpp-python (which compiles llama.cpp when pip builds it) is an extra, not a dependency."""
    names = {lowest.canonicalize_name(lowest.Requirement(s).name) for s in PROJECT["dependencies"]}
    assert "llama-cpp-python" not in names
    extra = PROJECT["optional-dependencies"]["llama-cpp-python"]
    assert [lowest.Requirement(s).name for s in extra] == ["llama-cpp-python"]


def test_pyproject_settings_are_read_where_there_is_no_tomllib(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """As on Python 3.10 (issue 8, item 2): ``tomllib`` does not exist, ``tomli`` does."""
    parser = importlib.import_module("tomllib" if sys.version_info >= (3, 11) else "tomli")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "tomli", parser)
    monkeypatch.setattr(sys, "version_info", (3, 10, 13, "final", 0))
    (tmp_path / "pyproject.toml").write_text("[tool.lemon_magic]\nmax-tokens = 7\n")
    magics = LemonMagics()
    assert apply_pyproject(magics, tmp_path) == ["max_tokens=7"]
    assert magics.max_tokens == 7
