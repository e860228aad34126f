"""Execute a notebook with nbclient and print each cell with its outputs (text only).

    .venv/bin/python scripts/run_notebook.py notebooks/quickstart.ipynb [--write]

``--write`` saves the outputs into the notebook (the references nbval compares
against). Exits non-zero if any cell fails.
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], "--write" in sys.argv[2:]))
