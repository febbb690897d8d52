"""docs/demo.ipynb runs top to bottom on the embedded model: load, trace, plot, edit, compare, apply, undo.

The notebook checks itself: its cells assert that the trace found the answer, that the edit moved it to Rome
(and left the Louvre in Paris) and that undo restored the weights bit for bit, so a failed step is an error in
a cell, which fails the test. The kernel runs this interpreter in the repository root and inherits this
process's environment, so it loads the model from the tests' cache (ROME_EXPLORER_CACHE, set in conftest).
"""
from __future__ import annotations

import json
import os
import sys

import nbformat
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOK = REPO / "docs" / "demo.ipynb"
KERNEL = "rome-explorer-tests"
# Per cell. Usually the whole notebook takes 1-2 minutes; on a fresh machine the first cell converts the embedded
# model (about 2 minutes on 2 cores) unless another test did, and the edit measures key statistics (about 30 s).
CELL_TIMEOUT_S = 900


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_demo_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    cells = code_cells(notebook)
    assert cells and all(not cell.outputs and cell.execution_count is None for cell in cells)


def test_the_demo_notebook_runs_and_its_checks_hold(tmp_path, monkeypatch):
    # A kernel spec of this very interpreter, so that the notebook runs where the package and torch are (a
    # "python3" spec found elsewhere on the machine could start another Python).
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    assert os.environ.get("ROME_EXPLORER_CACHE"), "conftest sets the tests' model cache, which the kernel inherits"

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError (the cell's source and traceback) at the first cell that fails.
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                            resources={"metadata": {"path": str(REPO)}})  # the kernel's working directory
    client.execute()

    outputs = [output for cell in code_cells(notebook) for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    printed = "".join(output.text for output in outputs if output.output_type == "stream" and output.name == "stdout")
    assert "answer ' Paris'" in printed  # the trace's caption
    assert any("application/vnd.plotly.v1+json" in output.get("data", {}) for output in outputs)  # the heatmap
    assert "original: ' Paris" in printed and "edited:   ' Rome" in printed  # the edit changed the completion
    assert "weights identical to the original: True" in printed  # and undo restored the weights
