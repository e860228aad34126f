"""The public surface: ``__all__`` against what a fresh ``import lemon_magic`` really exports.

Nothing here reads ``dir(lemon_magic)``: the package's ``__dir__`` is built from
``__all__``, so comparing the two is true by construction. Instead a fresh
interpreter imports the package and checks ``__all__`` against independent
enumerations: what ``getattr`` resolves each name to, every public name of every
``lemon_magic`` submodule that the package would hand out, and the names that
type checkers see (the ``from lemon_magic... import`` statements of ``__init__``).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import lemon_magic
from lemon_magic import errors

INIT = Path(lemon_magic.__file__)
HOOKS = {"load_ipython_extension", "unload_ipython_extension"}  # IPython looks these up by name

PROBE = r'''
import importlib, inspect, json, pkgutil, sys, types

import lemon_magic as pkg

out = {"all": list(pkg.__all__), "problems": []}
problems = out["problems"]
# the names the package defines itself, before any lazy attribute was resolved
out["eager"] = {n: getattr(v, "__module__", None) for n, v in vars(pkg).items()
                if not n.startswith("_") and not isinstance(v, types.ModuleType)}

resolved = {}
for name in pkg.__all__:
    try:
        obj = getattr(pkg, name)
        exec(f"from lemon_magic import {name}", {})
    except Exception as exc:
        problems.append(f"{name!r} is in __all__ but does not import: {exc!r}")
        continue
    entry = {"kind": type(obj).__name__, "module": None}
    if inspect.isclass(obj) or inspect.isfunction(obj):
        entry["module"] = obj.__module__
        home = sys.modules.get(obj.__module__)
        if home is None or getattr(home, obj.__qualname__, None) is not obj:
            problems.append(f"{name!r} is not {obj.__module__}.{obj.__qualname__}")
    resolved[name] = entry
out["resolved"] = resolved

# every public name of every submodule: those the package resolves are its lazy exports
lazy = {}
for info in pkgutil.walk_packages(pkg.__path__, "lemon_magic."):
    try:
        module = importlib.import_module(info.name)
    except ModuleNotFoundError as exc:  # an optional third-party dependency is missing
        if (exc.name or "").startswith("lemon_magic"):
            raise
        continue
    declared = getattr(module, "__all__", None)
    if declared is not None:
        if len(set(declared)) != len(declared):
            problems.append(f"{info.name}.__all__ has duplicates")
        for name in declared:
            if not hasattr(module, name):
                problems.append(f"{info.name}.__all__ names {name!r}, which it does not define")
    for name, value in vars(module).items():
        if name.startswith("_") or isinstance(value, types.ModuleType) or name in out["eager"]:
            continue
        try:
            exported = getattr(pkg, name)
        except AttributeError:
            continue
        lazy[name] = getattr(exported, "__module__", None)
out["lazy"] = lazy
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def probe() -> dict[str, Any]:
    """What a fresh interpreter sees after ``import lemon_magic``."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          cwd=INIT.parent.parent)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_every_name_in_all_imports_from_a_fresh_interpreter(probe: dict[str, Any]) -> None:
    assert not probe["problems"], probe["problems"]
    assert set(probe["resolved"]) == set(probe["all"])


def test_all_is_sorted_without_duplicates(probe: dict[str, Any]) -> None:
    names = probe["all"]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    assert names == sorted(names, key=lambda s: (not s.isupper(), s))  # constants first


def test_every_lazily_exported_name_is_in_all(probe: dict[str, Any]) -> None:
    """A public name that ``lemon_magic.X`` resolves but ``__all__`` omits (or the reverse)."""
    assert set(probe["lazy"]) == set(probe["all"]), {
        "exported but not in __all__": sorted(set(probe["lazy"]) - set(probe["all"])),
        "in __all__ but not exported": sorted(set(probe["all"]) - set(probe["lazy"]))}


def test_the_package_defines_only_the_extension_hooks_itself(probe: dict[str, Any]) -> None:
    own = {name for name, module in probe["eager"].items() if module == "lemon_magic"}
    assert own == HOOKS


def test_exported_classes_and_functions_live_in_lemon_magic(probe: dict[str, Any]) -> None:
    foreign = {name: e["module"] for name, e in probe["resolved"].items()
               if e["module"] is not None and not e["module"].startswith("lemon_magic")}
    assert not foreign
    assert {name for name, e in probe["resolved"].items() if e["kind"] == "type"} >= \
        {"Router", "AsyncRouter", "LemonError", "LoadOptions", "RouterConfig"}


def test_type_checkers_see_the_same_names() -> None:
    """The ``from lemon_magic... import`` statements of ``__init__`` (under TYPE_CHECKING, or
    at module level) name exactly ``__all__``: what IDEs and mypy see is what runs."""
    tree = ast.parse(INIT.read_text())
    body: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            body.extend(node.body)
        else:
            body.append(node)
    static = {alias.asname or alias.name for node in body if isinstance(node, ast.ImportFrom)
              and (node.level > 0 or (node.module or "").startswith("lemon_magic"))
              for alias in node.names}
    assert static == set(lemon_magic.__all__), {
        "imported, not in __all__": sorted(static - set(lemon_magic.__all__)),
        "in __all__, not imported": sorted(set(lemon_magic.__all__) - static)}


def test_every_error_is_exported_and_rooted() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert getattr(lemon_magic, name) is cls
        assert issubclass(cls, lemon_magic.LemonError) or cls in (
            lemon_magic.RouterClosed, lemon_magic.IllegalTransition, lemon_magic.Interrupted)
