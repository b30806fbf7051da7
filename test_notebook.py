"""The teaching notebook runs top to bottom, and is committed with the outputs of a full run (figures visible
without a kernel; regenerate them with `jupyter-execute --inplace tutorial.ipynb`, nbclient's command).

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


def text_of(nb):
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)


def test_committed_notebook_shows_the_outputs_of_a_full_run_small_and_without_progress_bars():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [i for i, cell in enumerate(code) if not cell.outputs] == [], "every code cell shows its output"
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
    figures = [out for cell in code for out in cell.outputs if "image/png" in out.get("data", {})]
    assert len(figures) >= 6 and NOTEBOOK.stat().st_size <= 2_000_000
    assert "budget 'full'" in text_of(nb) and "it/s" not in text_of(nb)  # the full budget; no tqdm pages


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
    assert "budget 'small'" in text_of(nb)  # the environment variable reached the kernel
    assert "it/s" not in text_of(nb)  # progress is printed once per step by the notebook, never as tqdm bars
