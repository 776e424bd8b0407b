"""Every notebook in colabs/ runs top to bottom (small settings); a failing cell fails the test
with the cell's error shown. Committed notebooks carry no outputs."""

import json
import re
from pathlib import Path

import pytest

COLABS = Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))
EXPECTED = {"quickstart", "llm_oneshot", "sparse_training", "structured", "kernels"}


def test_notebooks_present():
    assert EXPECTED <= {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_outputs_stripped(path):
    # plain json: no nbformat needed for this check
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"{path.name}: cell {i} has outputs; strip them before committing"
        assert cell.get("execution_count") is None, f"{path.name}: cell {i} has an execution_count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    error = None
    try:
        client.execute()
    except CellExecutionError as e:
        error = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the cell's source and traceback, no colours
    if error is not None:
        pytest.fail(f"{path.name}: a cell failed\n{error}", pytrace=False)
