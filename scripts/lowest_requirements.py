"""Requirements that pin each direct dependency of lemon_magic to the lowest version pyproject allows.

Usage::

    python scripts/lowest_requirements.py [--exclude NAME ...] [--with NAME ...] [-o FILE]
    python scripts/lowest_requirements.py --python-floor
    python scripts/lowest_requirements.py --verify FILE

Each entry of ``[project] dependencies`` becomes ``name==floor`` (its ``>=``,
``~=`` or ``==`` version; environment markers are kept). A dependency with no
lower bound is an error: every direct dependency must declare the oldest
release we have seen work, and CI installs exactly that release
(``.ci/run``, ``scripts/setup_lowest.sh``). ``--with NAME`` adds a test tool
from ``[project.optional-dependencies] test`` as declared there (not pinned);
``--exclude NAME`` leaves a dependency out (the lowest venv leaves out
llama-cpp-python: see ``scripts/setup_lowest.sh``). ``--verify FILE`` checks
that the current environment has exactly the pinned versions.

Runs on Python 3.10+ with ``packaging`` (which pytest brings) and ``tomllib``
or ``tomli``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def load_project(path: Path = ROOT / "pyproject.toml") -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads(path.read_text())["project"]
    return project


def floor(req: Requirement) -> str:
    """The lowest version ``req`` admits (``==``, ``>=`` or ``~=``); ValueError if it has none."""
    for op in ("==", ">=", "~="):
        versions = [s.version for s in req.specifier if s.operator == op]
        if versions:
            return max(versions, key=Version)
    raise ValueError(f"dependency {str(req)!r} declares no lower bound (>=, ~= or ==)")


def pin(req: Requirement) -> str:
    line = f"{canonicalize_name(req.name)}=={floor(req)}"
    return f"{line}; {req.marker}" if req.marker is not None else line


def lowest_lines(project: dict[str, Any], exclude: Iterable[str] = (),
                 tools: Iterable[str] = ()) -> list[str]:
    """Pins for the direct dependencies (minus ``exclude``), then the named test tools as declared."""
    skip = {canonicalize_name(n) for n in exclude}
    deps = [Requirement(s) for s in project["dependencies"]]
    unknown = skip - {canonicalize_name(r.name) for r in deps}
    if unknown:
        raise ValueError(f"--exclude names no dependency: {sorted(unknown)}")
    lines = [pin(r) for r in deps if canonicalize_name(r.name) not in skip]
    test = {canonicalize_name(Requirement(s).name): s
            for s in project.get("optional-dependencies", {}).get("test", [])}
    for name in tools:
        if canonicalize_name(name) not in test:
            raise ValueError(f"--with {name}: not in the test extra")
        lines.append(test[canonicalize_name(name)])
    return lines


def python_floor(project: dict[str, Any]) -> str:
    """``3.10`` for ``requires-python = ">=3.10"``."""
    return floor(Requirement(f"python{project['requires-python']}"))


def verify(lines: Sequence[str]) -> list[str]:
    """What differs between the pins in ``lines`` and the installed distributions (empty: all match)."""
    problems = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        pinned = [s.version for s in req.specifier if s.operator == "=="]
        if not pinned:
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req.name}: not installed (pinned {pinned[0]})")
            continue
        if Version(have) != Version(pinned[0]):
            problems.append(f"{req.name}: {have} installed, pinned {pinned[0]}")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--exclude", action="append", default=[], metavar="NAME")
    parser.add_argument("--with", dest="tools", action="append", default=[], metavar="NAME")
    parser.add_argument("-o", "--output", type=Path)
    parser.add_argument("--python-floor", action="store_true", help="print the lowest Python and exit")
    parser.add_argument("--verify", type=Path, metavar="FILE",
                        help="check the installed versions against FILE's pins")
    args = parser.parse_args(argv)
    project = load_project()
    if args.python_floor:
        print(python_floor(project))
        return 0
    if args.verify is not None:
        problems = verify(args.verify.read_text().splitlines())
        for p in problems:
            print(f"lowest: {p}", file=sys.stderr)
        return 1 if problems else 0
    try:
        lines = lowest_lines(project, args.exclude, args.tools)
    except ValueError as exc:
        parser.error(str(exc))
    text = ("# generated by scripts/lowest_requirements.py from pyproject.toml; do not edit\n"
            + "".join(f"{line}\n" for line in lines))
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
