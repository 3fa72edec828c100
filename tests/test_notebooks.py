"""The course notebooks: committed clean, written to the course's conventions, and runnable.

Every notebook in notebooks/ is executed top to bottom with nbclient in the
QUICK setting (``SARA_EDU_QUICK=1``), from a temporary copy of notebooks/ (so
relative paths work and nothing is written into the repository), on a kernel
that runs *this* interpreter. A failing cell fails the test.

Set ``SARA_EDU_EXECUTED_DIR=/some/folder`` to keep the executed notebooks
(with outputs) for a look at the figures.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
MAX_NOTEBOOK_BYTES = 60_000      # text only: outputs (images) would blow far past this
MAX_CODE_CELL_LINES = 20         # "short cells that call sara_edu": logic lives in the package
CELL_TIMEOUT_S = 600
QUICK_BUDGET_S = 180             # the course's promise for the QUICK setting on a 2-core CPU
KERNEL_NAME = "sara-edu-test"


def _ids(path):
    return path.stem


def test_there_are_notebooks_and_each_is_listed_in_the_readme():
    assert NOTEBOOKS, "no notebooks found in notebooks/"
    readme = (NOTEBOOK_DIR / "README.md").read_text()
    for path in NOTEBOOKS:
        assert path.name in readme, f"add a line for {path.name} to notebooks/README.md"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_is_committed_clean_and_follows_the_conventions(path):
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name} is large: strip outputs (python -m sara_edu.lessons.notebook --strip)"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, \
                f"{path.name} cell {i} has outputs: run `python -m sara_edu.lessons.notebook --strip notebooks/*.ipynb`"
            lines = cell.source.strip().splitlines()
            assert len(lines) <= MAX_CODE_CELL_LINES, \
                f"{path.name} cell {i} has {len(lines)} lines: move the logic into sara_edu and call it"
        assert not cell.get("attachments"), f"{path.name} cell {i} embeds an attachment"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.lstrip().startswith("# ")
    assert "learning goals" in first.source.lower(), f"{path.name}: the first cell must state the learning goals"
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    headings = [line.lower() for text in markdown for line in text.splitlines() if line.startswith("#")]
    assert any("summary" in h for h in headings), f"{path.name} needs a '## Summary' section"
    assert any("exercise" in h for h in headings), f"{path.name} needs an '## Exercises' section"
    exercises = next(t for t in markdown if any("exercise" in line.lower() for line in t.splitlines() if line.startswith("#")))
    n_exercises = sum(1 for line in exercises.splitlines() if line.lstrip()[:2] in {f"{k}." for k in range(1, 10)})
    assert 2 <= n_exercises <= 3, f"{path.name}: give 2-3 numbered exercises (found {n_exercises})"
    text = "\n".join(markdown)
    assert "QUICK" in text, f"{path.name} must say what its QUICK setting changes"
    timing = re.compile(r"full setting[^.]*?\d+(\.\d+)?\s*(s|min|seconds|minutes|h)\b", re.IGNORECASE | re.DOTALL)
    assert timing.search(text), f"{path.name} must state how long the full setting takes (measured), e.g. 'full setting: 4 min'"


@pytest.fixture(scope="session")
def kernel_spec_manager(tmp_path_factory):
    """A kernelspec that runs this very interpreter, whatever other 'python3' kernels are installed."""
    from ipykernel.kernelspec import install
    from jupyter_client.kernelspec import KernelSpecManager

    prefix = tmp_path_factory.mktemp("kernels")
    install(kernel_name=KERNEL_NAME, display_name="sara-edu tests", prefix=str(prefix))
    return KernelSpecManager(kernel_dirs=[str(prefix / "share" / "jupyter" / "kernels")], ensure_native_kernel=False)


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
def test_notebook_runs_top_to_bottom_in_quick_mode(path, tmp_path, kernel_spec_manager, monkeypatch):
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    work = tmp_path / "notebooks"
    shutil.copytree(NOTEBOOK_DIR, work)
    nb = nbformat.read(work / path.name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    monkeypatch.setenv("SARA_EDU_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")  # figures as outputs
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    km = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, allow_errors=False,
                            resources={"metadata": {"path": str(work)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        keep = os.environ.get("SARA_EDU_EXECUTED_DIR")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(keep) / path.name)
    elapsed = time.perf_counter() - start
    kernel_prefix = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert Path(kernel_prefix) == Path(sys.prefix), f"the kernel ran {kernel_prefix}, not this venv ({sys.prefix})"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    print(f"{path.name}: {elapsed:.0f} s in the QUICK setting")
    if elapsed > QUICK_BUDGET_S:  # a budget, reported rather than a timed assertion
        warnings.warn(f"{path.name} took {elapsed:.0f} s in the QUICK setting (budget {QUICK_BUDGET_S} s)")
