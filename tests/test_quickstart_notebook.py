"""The quickstart notebook runs top to bottom (slow: it trains, fine-tunes, serves and evaluates)."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_notebook_executes_without_error(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  nb = nbformat.read(os.path.join(ROOT, "experiments", "quickstart.ipynb"), as_version=4)
  env_keep = dict(os.environ)
  os.environ["INTERNLM_JAX_REPO"] = ROOT
  os.environ["QUICKSTART_RUNS"] = str(tmp_path / "runs")
  os.environ.pop("XLA_FLAGS", None)  # the kernel sets its own simulated device count
  try:
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.join(ROOT, "experiments")}})
    client.execute()
  finally:
    os.environ.clear()
    os.environ.update(env_keep)
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "validation loss" in outputs
  assert (tmp_path / "runs" / "report.md").exists()
