"""The Colab notebook runs headless (nbclient, this venv's python3 kernel) on the example table."""

import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

from ldm_scaling import analysis
from ldm_scaling.eval import results

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
PATH = os.path.join(NOTEBOOKS, "sampling_cost_curves.ipynb")


@pytest.fixture(scope="module")
def executed():
  nb = nbformat.read(PATH, as_version=4)
  source = nbformat.read(PATH, as_version=4)
  # The kernel is the test interpreter's (jupyter_client runs spec argv "python" as
  # sys.executable), started in notebooks/ so the relative RESULTS path resolves as on Colab.
  NotebookClient(nb, kernel_name="python3", timeout=120,
                 resources={"metadata": {"path": NOTEBOOKS}}).execute()
  return source, nb


def test_committed_without_outputs(executed):
  source, _ = executed
  for cell in source.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:60]
  setup = next(c for c in source.cells if c.cell_type == "code")
  assert "'google.colab' in sys.modules" in setup.source.replace('"', "'")
  params = [c for c in source.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1 and 'RESULTS = "example_results/results.csv"' in params[0].source


def test_every_cell_ran_and_figures_drawn(executed):
  source, nb = executed
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code)
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
  # One inline image per figure the notebook displays.
  drawn = sum(len(re.findall(r"display\(analysis\.fig_", c.source)) for c in source.cells)
  assert drawn == 4 and pngs == drawn


def test_advice_matches_library(executed):
  _, nb = executed
  printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
  frame = results.load(os.path.join(NOTEBOOKS, "example_results", "results.csv"))
  assert printed.strip() == analysis.format_advice(analysis.advise(frame, 10.0)).strip()
