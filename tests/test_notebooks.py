"""The notebooks: committed without outputs, structured as the guide asks, and executable with FAST=1."""
import json
import os
import pathlib
import re
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 600


def test_the_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_kl_to_dkl_derivation.ipynb", "02_gradient_anatomy.ipynb", "03_knowledge_distillation.ipynb",
            "04_adversarial_training.ipynb", "05_compare_kl_dkl_ikl.ipynb"} <= names


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    """One empty run cache for the notebooks of this test session: CI exercises the cold path, and
    nothing is written to (or reused from) the repository's runs/."""
    return tmp_path_factory.mktemp("runs")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
    nb = json.loads(path.read_text())
    dirty = [i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"
             and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs or execution counts; strip them before commit"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_structure(path):
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "import dkl_lib as dkl" in code
    assert 'os.environ.get("FAST"' in code
    assert code.count("assert ") >= 3, "key claims are stated as visible asserts"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert ".show()" not in code


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_with_fast(path, monkeypatch, tmp_path, runs_dir):
    monkeypatch.setenv("FAST", "1")
    monkeypatch.setenv("DKL_RUNS_DIR", str(runs_dir))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    monkeypatch.chdir(tmp_path)  # anything a notebook writes by mistake lands in a temp folder
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the traceback) on any error
    elapsed = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    print(f"{path.name}: {elapsed:.1f} s with FAST=1")
    assert os.environ["FAST"] == "1"


MEAN_PLUS_MINUS_STD = re.compile(r"\d[\d.]*\s*±\s*\d")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_markdown_quotes_no_measured_mean_and_std(path):
    """A "mean ± std" is the result of one run: quoted in a markdown cell it is true for the FAST run or for the
    full run, not both, and goes stale when a preset changes. A notebook prints or displays its results from a
    code cell (a generated Markdown sentence where prose is wanted), and its markdown refers to them."""
    nb = nbformat.read(path, as_version=4)
    quoted = [(i, m.group(0)) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
              for m in MEAN_PLUS_MINUS_STD.finditer(c.source)]
    assert not quoted, f"{path.name}: markdown cells quote measured mean ± std values {quoted}"


def test_a_dashboard_cell_says_why_it_is_empty_with_fast(monkeypatch, tmp_path):
    """With FAST=1 the dashboards are skipped; their cells were silent below prose that says "the dashboard
    below has a slider for every logit", so a reader saw nothing and no reason. Each now prints how to show it."""
    monkeypatch.setenv("FAST", "1")
    monkeypatch.delenv("DKL_WIDGETS", raising=False)
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    monkeypatch.chdir(tmp_path)
    path = NOTEBOOK_DIR / "02_gradient_anatomy.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
    dashboards = [c for c in nb.cells if c.cell_type == "code" and re.search(r"dkl\.widgets\.\w+_dashboard\(", c.source)]
    assert len(dashboards) == 3
    for cell in dashboards:
        text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
        assert "DKL_WIDGETS=1" in text, cell.source
