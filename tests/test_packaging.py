"""What a pip user gets: the wheel built from this checkout carries everything the package needs
at run time, and ``python -m gpugroups notebooks`` hands out the notebooks the docs point to."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gpugroups as gg

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))


def gpugroups_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpugroups", *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_the_notebooks_command_copies_them_and_never_overwrites(tmp_path: Path) -> None:
    out = gpugroups_cli("notebooks", "mine", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    dest = tmp_path / "mine"
    assert sorted(p.name for p in dest.iterdir()) == NOTEBOOKS and "quickstart.ipynb" in NOTEBOOKS
    assert (dest / "research.ipynb").read_bytes() == (REPO / "notebooks" / "research.ipynb").read_bytes()
    assert f"jupyter lab {Path('mine') / 'quickstart.ipynb'}" in out.stdout
    (dest / "quickstart.ipynb").write_text("my edits")
    again = gpugroups_cli("notebooks", "mine", cwd=tmp_path)
    assert again.returncode == 0 and "kept" in again.stdout
    assert (dest / "quickstart.ipynb").read_text() == "my edits"
    assert gpugroups_cli(cwd=tmp_path).returncode == 2  # no command: usage, not a traceback
    (tmp_path / "afile").write_text("")
    refused = gpugroups_cli("notebooks", "afile", cwd=tmp_path)
    assert refused.returncode == 1 and "cannot copy the notebooks into afile" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.slow
def test_the_wheel_carries_the_package_its_demo_its_notebooks_and_its_server_config(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("gpugroups-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tracked = subprocess.run(
        ["git", "ls-files", "gpugroups"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked and not set(tracked) - names  # every file of the package, demo models and panel JS included
    assert {f"gpugroups/notebooks/{n}" for n in NOTEBOOKS} <= names
    data = f"gpugroups-{gg.__version__}.data/data/etc/jupyter/jupyter_server_config.d/gpugroups.json"
    assert data in names  # enables the server extension on install
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "bench/", ".venv/")) for n in names)
