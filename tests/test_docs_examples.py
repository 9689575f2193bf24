"""The README's and docs' Python examples run, and the outputs they show are the real ones."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import gpugroups as gg
from gpugroups.engine import default as default_module
from tests.docexamples import blocks, mismatch, run_file, shown_output

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _close_default() -> None:
    """The examples use ``gg.manager()``: each file starts and ends without one."""
    if default_module._default is not None:
        default_module._default.close()


@pytest.fixture
def docs_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A temp working dir with no ``gpugroups.toml`` and no catalog variable: the demo catalog only."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUGROUPS_CATALOG", raising=False)
    _close_default()
    yield
    _close_default()


@pytest.mark.slow
@pytest.mark.parametrize("path", [f for f in FILES if any(b.runnable for b in blocks(f))], ids=lambda p: p.name)
def test_examples_run_and_show_real_outputs(path: Path, docs_env: None) -> None:
    namespace, checked = run_file(path)
    try:
        if path.name == "README.md":
            assert checked >= 2, "the README shows outputs; they must be checked"
    finally:
        for value in namespace.values():
            if isinstance(value, gg.Manager):
                value.close()


def test_every_python_block_runs_or_says_why_not() -> None:
    """A skipped block is marked; most blocks run (a marker is not a way out of the check)."""
    all_blocks = [b for f in FILES for b in blocks(f)]
    assert sum(b.runnable for b in all_blocks) >= 3
    markers = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("<!-- not run:")]
    assert len(markers) == sum(not b.runnable for b in blocks(ROOT / "README.md"))  # no stray marker


def test_a_drifted_output_is_caught() -> None:
    lines = ["x", "# {'token': '):', 'probability': 0.62, 'rest': {...}, 'items': [1, ...], ...}"]
    shown, _ = shown_output(lines, 1) or (None, "")
    real = {"token": "):", "probability": 0.6243, "rest": {"a": 1}, "items": [1, 2, 3], "more": True}
    assert mismatch(shown, real) is None
    assert "0.71" in (mismatch(shown, {**real, "probability": 0.7129}) or "")
    assert "','" in (mismatch(shown, {**real, "token": ","}) or "")
    assert "missing" in (mismatch(shown, {"token": "):"}) or "")
    assert mismatch(shown, {**real, "items": [2]}) is not None
    assert shown_output(["x", "# loads the group"], 1) is None  # prose is not an output
