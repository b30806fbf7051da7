"""The teaching notebook runs top to bottom, and is stored without outputs.

Runs tutorial.ipynb with nbclient on the "python3" kernel (ipykernel provides it) at the
notebook's small budget (A2MIM_NOTEBOOK_BUDGET=small, well under a minute on 2 CPU cores),
with the repository as the kernel's working directory, so that it imports the project's files.
"""
import os
from pathlib import Path

import ipykernel  # noqa: F401  (provides the "python3" kernel that nbclient starts)
import nbclient
import nbformat

REPO = Path(__file__).resolve().parent
NOTEBOOK = REPO / "tutorial.ipynb"


def test_committed_notebook_has_no_outputs_and_no_execution_counts():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert dirty == [], f"cells {dirty} carry outputs; clear them before committing (keeps git small)"


def test_notebook_runs_every_cell_without_error_at_the_small_budget(monkeypatch):
    # The kernel is a child process and inherits this environment.
    monkeypatch.setenv("A2MIM_NOTEBOOK_BUDGET", "small")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute()  # raises CellExecutionError, naming the cell and its traceback, if any cell fails
    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert "budget 'small'" in text  # the environment variable reached the kernel
