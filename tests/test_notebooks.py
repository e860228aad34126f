"""Every notebook runs under nbclient with no error reply (nbval alone passes a UsageError)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.hubstub import session_demo_hub
from tests.remotes import session_demo_remote

pytestmark = pytest.mark.real
NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _execute(nb: nbformat.NotebookNode, cwd: Path) -> None:
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd)}}).execute()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes_without_error_replies(path: Path, tmp_path: Path) -> None:
    session_demo_hub()  # models.ipynb pulls from it (HF_ENDPOINT); the kernel inherits the env
    session_demo_remote()  # remote.ipynb's "GPU box" (LEMON_MAGIC_DEMO_REMOTE)
    nb = nbformat.read(path, as_version=4)
    _execute(nb, tmp_path)
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", f"{path.name}: {output.get('ename')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_references_are_saved(path: Path) -> None:
    """nbval compares against saved outputs: every code cell must have been run and saved."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.execution_count is not None, f"{path.name}: a cell was never run"


def test_a_usage_error_fails_the_run(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%load_ext lemon_magic"),
                nbformat.v4.new_code_cell("%lemon_load gemma3-270m --ctx 4096")]
    with pytest.raises(CellExecutionError, match="unrecognized arguments: --ctx 4096"):
        _execute(nb, tmp_path)
