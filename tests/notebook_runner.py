"""Execute a notebook from notebooks/ top to bottom in a fresh kernel, inside a given working folder."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute_notebook(name: str, folder: Path) -> list:
    """Every output of every code cell, after running ``notebooks/<name>`` with ``folder`` as its cwd."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
