"""The shipped notebooks run top to bottom, headless, in a kernel from this environment (nbclient).

Each runs in a copy under a temp folder (its working directory, so no ``./gpugroups.toml`` of the
repo leaks into the default catalog) with its own Jupyter runtime dir (so no running server on
this machine is mistaken for the one that started the kernel).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(NOTEBOOKS / name, work / name)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    nb = nbformat.read(work / name, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    ).execute()
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    """Every stream and text/plain output of the executed notebook, in order."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif "data" in out and "text/plain" in out.data:
                parts.append(out.data["text/plain"])
    return "\n".join(parts)


def panels(nb: nbformat.NotebookNode) -> int:
    """How many outputs show a panel (other widgets, e.g. progress bars, do not count)."""
    return sum(
        WIDGET_VIEW in out.get("data", {}) and "Panel" in out.data.get("text/plain", "")
        for cell in nb.cells
        for out in cell.get("outputs", [])
    )


@pytest.mark.parametrize("name", ["quickstart.ipynb", "multi_device.ipynb", "research.ipynb", "cluster.ipynb"])
def test_notebook_is_committed_clean(name: str) -> None:
    raw = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
    assert all("id" in cell for cell in raw["cells"]), f"{name} has cells without an id"
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name} was committed with outputs"


@pytest.mark.slow
def test_quickstart_runs_headless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute("quickstart.ipynb", tmp_path, monkeypatch)
    text = text_of(nb)
    assert panels(nb) == 1
    assert "switched in" in text  # switching member did not load anything
    assert "No Jupyter server started this kernel" in text
    assert "End of the tour." in text
    assert "Traceback" not in text


@pytest.mark.slow
def test_multi_device_runs_headless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute("multi_device.ipynb", tmp_path, monkeypatch)
    text = text_of(nb)
    assert panels(nb) == 1
    assert "evicted:" in text
    assert "insufficient_memory" in text
    assert "resident on [0, 1" in text  # the section that shards a group over several devices
    assert "Traceback" not in text


@pytest.mark.slow
def test_research_runs_headless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute("research.ipynb", tmp_path, monkeypatch)
    text = text_of(nb)
    plots = [out for cell in nb.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(plots) == 1
    assert text.count("diverges from the base from layer") == 2
    assert "in_use on cpu" in text and "resident after the block" in text
    assert "End of the research tour." in text
    assert "Traceback" not in text


@pytest.mark.slow
@pytest.mark.ray
def test_cluster_runs_headless(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ray")
    # the notebook starts a cluster of its own, in a temp folder of its own (not the session cluster's)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    nb = execute("cluster.ipynb", tmp_path, monkeypatch)
    text = text_of(nb)
    assert panels(nb) == 1
    assert "2 nodes, 4.0 GPUs" in text
    assert "lost after" in text and "resident on: {}" in text  # the group left with the node
    assert "after loading it again" in text
    assert "conflict - another manager drives the Ray namespace 'notebook-demo' (process" in text
    assert "loaded by process" in text  # the script that then died without closing its manager
    assert "already_loaded" in text  # the next manager adopted the group
    assert "actors left: []" in text
    assert "End of the tour." in text
    assert "Traceback" not in text
