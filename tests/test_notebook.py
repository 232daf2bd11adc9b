"""colab/r1_tiny.ipynb runs top to bottom (its runlocal config), so no change can silently
break what a Colab user runs: any cell error fails the test."""
from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colab", "r1_tiny.ipynb")


def test_notebook_executes_without_errors():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": REPO}})
  client.execute()  # raises CellExecutionError on the first failing cell
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "DeepSeek-V3: 671.0B total" in text  # the first cell's count, printed
  assert any(o.get("output_type") in ("display_data", "execute_result")
             and "image/png" in o.get("data", {})
             for o in outputs)  # the pipeline's plot
