"""Execute a notebook with nbclient and print each cell with its outputs (text only).

    .venv/bin/python scripts/run_notebook.py notebooks/quickstart.ipynb [--write]

``--write`` saves the outputs into the notebook (the references nbval compares
against): it runs the notebook as the test suite does, on llama.cpp's baseline CPU
variant, in config and state folders of its own, with the demo Hub and the demo
remote of ``notebooks/conftest.py`` started. Exits non-zero if any cell fails.
"""

from __future__ import annotations

import sys

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def _text(output: dict) -> str:
    if output["output_type"] == "stream":
        return str(output["text"])
    if output["output_type"] == "error":
        return "\n".join(output["traceback"]) + "\n"
    return str(output.get("data", {}).get("text/plain", "")) + "\n"


def main(path: str, write: bool = False) -> int:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3")
    failed = False
    try:
        client.execute()
    except CellExecutionError:
        failed = True
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            print("\n".join(f"# {line}" for line in cell.source.splitlines()))
            continue
        print("\n".join(f">>> {line}" for line in cell.source.splitlines()))
        text = "".join(_text(output) for output in cell.get("outputs", [])).rstrip("\n")
        if text:
            print(text)
        print()
    if write and not failed:
        nbformat.write(nb, path)
    return 1 if failed else 0


def write_references(path: str) -> int:
    """:func:`main` with ``write=True`` in the test suite's surroundings."""
    import os
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import tests  # noqa: F401  (LEMON_MAGIC_CPU=baseline, as for every test)
    from tests.hubstub import close_session_demo_hub, session_demo_hub
    from tests.remotes import close_session_demo_remote, session_demo_remote

    with tempfile.TemporaryDirectory(prefix="lemon-notebook-") as tmp:
        os.environ["LEMON_MAGIC_CONFIG_DIR"] = f"{tmp}/config"
        os.environ["LEMON_MAGIC_STATE_DIR"] = f"{tmp}/state"
        session_demo_hub()
        try:
            session_demo_remote()
            return main(path, write=True)
        finally:
            close_session_demo_remote()
            close_session_demo_hub()


if __name__ == "__main__":
    if "--write" in sys.argv[2:]:
        sys.exit(write_references(sys.argv[1]))
    sys.exit(main(sys.argv[1]))
