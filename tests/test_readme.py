"""The README is checked, so that a change of wording fails here instead of making it false.

- Every ```ipython block is an IPython session that the test runs, cell by cell, in a real shell
  on the embedded model, and each cell's output must be what the README quotes, after the masks
  nbval applies to the notebooks (tests/nbval_sanitize.cfg: pids, ports, durations, memory) and a
  few of this file's own (prompt numbers, the home folder, the machine's thread count).
- The magic table names every magic and every flag of each.
- The error tree is the real class tree of ``lemon_magic.errors``.
- Every environment variable the package reads, and every trait of ``LemonMagics``, is named.
- ``docs/benchmarks.md`` is what ``bench/report.py`` makes from ``bench/results/*.json``.
"""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

import lemon_magic
from lemon_magic import errors, get_router

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# ------------------------------------------------------------------ the README's sessions


@dataclass
class Cell:
    source: str
    expected: str


@dataclass
class Session:
    heading: str
    line: int
    cells: list[Cell] = field(default_factory=list)


_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
_IN = re.compile(r"^In \[\d+\]: ?(.*)$")
_MORE = re.compile(r"^ +\.\.\.: ?(.*)$")


def sessions(text: str = README) -> list[Session]:
    """The README's ```ipython blocks, as (input, quoted output) cells."""
    out = []
    for match in _FENCE.finditer(text):
        if match.group(1) != "ipython":
            continue
        before = text[:match.start()]
        headings = re.findall(r"^#+ (.*)$", before, re.M)
        session = Session(headings[-1] if headings else "", before.count("\n") + 1)
        source: list[str] | None = None
        output: list[str] = []
        for line in match.group(2).splitlines():
            if m := _IN.match(line):
                if source is not None:
                    session.cells.append(Cell("\n".join(source), "\n".join(output)))
                source, output = [m.group(1)], []
            elif (m := _MORE.match(line)) and source is not None and not output:
                source.append(m.group(1))
            else:
                assert source is not None, f"README line {session.line}: output before any input"
                output.append(line)
        if source is not None:
            session.cells.append(Cell("\n".join(source), "\n".join(output)))
        out.append(session)
    return out


def _nbval_masks() -> list[tuple[re.Pattern[str], str]]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "tests" / "nbval_sanitize.cfg")
    return [(re.compile(cfg[s]["regex"]), cfg[s]["replace"].strip("'")) for s in cfg.sections()]


# ours, applied first: prompt numbers, where the cache is, how many cores the machine has
_OWN_MASKS = [(re.compile(r"^Out\[\d+\]:", re.M), "Out[N]:"),
              (re.compile(re.escape(str(Path.home()))), "~"),
              (re.compile(r"threads \d+"), "threads N")]


def mask(text: str) -> str:
    for pattern, replacement in [*_OWN_MASKS, *_nbval_masks()]:
        text = pattern.sub(replacement, text)
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def run_cell(ip: InteractiveShell, source: str) -> str:
    """What a terminal shows for the cell: what it prints, its error line, ``Out[N]: value``."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        ip.run_cell(source, store_history=True)
    return buf.getvalue()


SESSIONS = sessions()


def test_the_readme_has_sessions_to_check() -> None:
    assert len(SESSIONS) >= 2 and all(s.cells for s in SESSIONS)


@pytest.mark.real
@pytest.mark.parametrize("session", SESSIONS, ids=[f"line{s.line}" for s in SESSIONS])
def test_readme_session_prints_what_it_quotes(session: Session, ip: InteractiveShell, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # each session starts as a new user's first kernel would: the extension not loaded, nothing
    # loaded, nothing registered (other tests' registrations stay in the suite's config dir)
    ip.run_line_magic("unload_ext", "lemon_magic")
    get_router().close()
    monkeypatch.setenv("LEMON_MAGIC_CONFIG_DIR", str(tmp_path / "config"))
    for cell in session.cells:
        got = run_cell(ip, cell.source)
        assert mask(got) == mask(cell.expected), (
            f"README line {session.line} ({session.heading}): {cell.source!r} printed:\n{got}")


def test_the_session_parser() -> None:
    [s] = sessions("## H\n\n```ipython\nIn [1]: %%x\n   ...: body\nout 1\n\nIn [2]: y\nOut[2]: 3\n```\n")
    assert s.heading == "H"
    assert [(c.source, c.expected) for c in s.cells] == [("%%x\nbody", "out 1\n"), ("y", "Out[2]: 3")]
    assert mask("Out[7]: pid 12 on 127.0.0.1:80 in 3.5 s, 12 MiB  \n") == \
        "Out[N]: pid PID on 127.0.0.1:PORT in T, N MiB"


# ------------------------------------------------------------------ the reference parts


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def test_the_readme_starts_with_the_commands_ci_runs() -> None:
    blocks = [m.group(2) for m in _FENCE.finditer(README)][:2]
    assert blocks == ["bash scripts/setup.sh && .venv/bin/python scripts/run_notebook.py "
                      "notebooks/quickstart.ipynb\n", ".venv/bin/python -m pytest\n"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh\n.venv/bin/python -m pytest\n" in ci


def test_the_magic_table_names_every_magic_and_flag(ip: InteractiveShell) -> None:
    from lemon_magic.magics import MAGIC_NAMES

    table = re.search(r"^\| magic \|.*?\n\n", README, re.S | re.M)
    assert table, "README has no magic table"
    rows = [r for r in table.group(0).splitlines()[2:] if r]
    magics = ip.magics_manager.magics
    for name in MAGIC_NAMES:
        kind = "cell" if name in magics["cell"] and name not in magics["line"] else "line"
        prefix = "%%" if kind == "cell" else "%"
        [row] = [r for r in rows if re.match(rf"\| `{prefix}{name}\b", r)] or [None]
        assert row, f"the magic table has no row for {prefix}{name}"
        parser = getattr(magics[kind][name], "parser", None)
        for action in parser._actions if parser else []:
            flags = action.option_strings
            if flags and "--help" not in flags:
                assert any(re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", row) for f in flags), (
                    f"{prefix}{name}: {flags} not in its row")
    assert len(rows) == len(MAGIC_NAMES)


_TREE = re.compile(r"^((?:[│ ] {3})*)(?:[├└]── )?(\w+)(?: \((\w+)\))?")


def test_the_error_tree_is_the_real_one() -> None:
    block = next(m.group(2) for m in _FENCE.finditer(README) if m.group(2).startswith("LemonError"))
    parents: list[type] = []
    named = set()
    for line in block.splitlines():
        m = _TREE.match(line)
        assert m, line
        depth = len(m.group(1)) // 4 + (1 if "──" in line else 0)
        cls = getattr(errors, m.group(2))
        named.add(cls.__name__)
        if depth:
            assert parents[depth - 1] in cls.__bases__, f"{cls.__name__} is not a {parents[depth - 1]}"
        else:
            assert cls is errors.LemonError or m.group(3), line
        if m.group(3):
            assert m.group(3) in {b.__name__ for b in cls.__mro__[1:]}, line
        parents[depth:] = [cls]
    assert named == set(errors.__all__)


def test_every_environment_variable_and_trait_is_named() -> None:
    config = _section("Configuration")
    source = "\n".join(p.read_text() for p in Path(lemon_magic.__file__).parent.rglob("*.py"))
    variables = set(re.findall(r"\b(LEMON_MAGIC_[A-Z_]+|LEMONADE_API_KEY|HF_[A-Z_]+)\b", source))
    missing = sorted(v for v in variables if f"`{v}`" not in config)
    assert not missing, f"the Configuration section does not name {missing}"
    from lemon_magic.magics import LemonMagics

    traits = LemonMagics.class_trait_names(config=True)
    missing = sorted(t for t in traits if f"`{t}`" not in config)
    assert not missing, f"the Configuration section does not name the traits {missing}"


def test_the_benchmarks_page_is_generated_from_the_results() -> None:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    assert spec and spec.loader
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert (ROOT / "docs" / "benchmarks.md").read_text() == report.render(), (
        "docs/benchmarks.md is out of date: run .venv/bin/python bench/report.py")


def test_no_issue_numbers_or_test_files_in_the_readme() -> None:
    assert not re.findall(r"issue \d+|tests/test_\w+\.py", README)


def test_the_stop_lines_are_what_the_magics_print() -> None:
    from lemon_magic._magic_args import _interrupted

    happens = _section("What happens when …")
    load = _interrupted(errors.Interrupted("MODEL", "load"))._render_traceback_()[0]
    assert f'"{load}"' in happens
    for phase in ("stream", "request"):
        assert f'"{errors.Interrupted("MODEL", phase)}"' in happens
