"""Load progress bars: tqdm fed by the load_progress events, shown for real loads only, and off on request."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpugroups as gg
from gpugroups.engine import progress
from gpugroups.errors import GpuGroupsError


@pytest.fixture
def no_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Show the bar from the first event: the tiny test loads are faster than the user-facing delay."""
    monkeypatch.setattr(progress, "DELAY_S", 0)
    monkeypatch.delenv(progress.ENV, raising=False)


def test_a_real_load_draws_a_bar_that_reaches_100(tiny_catalog_toml: Path, no_delay: None) -> None:
    out = io.StringIO()
    with gg.Manager(devices="cpu", catalog=tiny_catalog_toml, progress=out) as m:
        assert m.load("tiny-a")["status"] == "loaded"
        text = out.getvalue()
        assert "loading tiny:   0%" in text  # drawn at the load's first event, before it ended
        assert text.rstrip().endswith("100%|##########| 00:00, ready") or "100%" in text.splitlines()[-1]
        drawn = len(out.getvalue())
        assert m.load("tiny-b")["status"] == "switched"  # no load, no bar
        assert m.load_group("gpt")["status"] == "loaded"
        assert "loading gpt" in out.getvalue()[drawn:] and out.getvalue().rstrip().endswith("ready")


def test_a_load_faster_than_the_delay_shows_no_bar_at_all(tiny_catalog_toml: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "DELAY_S", 60)  # longer than any load here
    monkeypatch.delenv(progress.ENV, raising=False)
    out = io.StringIO()
    with gg.Manager(devices="cpu", catalog=tiny_catalog_toml, progress=out) as m:
        assert m.load("tiny-a")["status"] == "loaded"
        assert m.load_group("gpt")["status"] == "loaded"
    assert out.getvalue() == ""  # neither a partial bar nor a filled one


@pytest.mark.parametrize("how", ["option", "env"])
def test_bars_can_be_turned_off(tiny_catalog_toml: Path, no_delay: None, how: str,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    if how == "env":
        monkeypatch.setenv(progress.ENV, "0")
    with gg.Manager(devices="cpu", catalog=tiny_catalog_toml, progress=False if how == "option" else None) as m:
        assert m.load("tiny-a")["status"] == "loaded"
    captured = capsys.readouterr()
    assert "loading tiny" not in captured.err + captured.out


def test_the_default_bar_shows_on_stderr_for_a_script(tiny_catalog_toml: Path, no_delay: None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with gg.Manager(devices="cpu", catalog=tiny_catalog_toml) as m:
        m.load("tiny-a")
    assert "100%" in capsys.readouterr().err


def test_a_bar_that_tqdm_turns_off_leaves_the_load_alone(tiny_catalog_toml: Path) -> None:
    """``TQDM_DISABLE=1`` (read when tqdm is imported, hence a fresh process) makes bars that keep
    no clock: the load must neither fail nor draw."""
    script = f"""
import io
import gpugroups as gg
from gpugroups.engine import progress
progress.DELAY_S = 0
out = io.StringIO()
with gg.Manager(devices="cpu", catalog={str(tiny_catalog_toml)!r}, progress=out) as m:
    assert m.load("tiny-a")["status"] == "loaded"
assert out.getvalue() == "", out.getvalue()
print("loaded, nothing drawn")
"""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop(progress.ENV, None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "loaded, nothing drawn", done.stderr[-3000:]


def test_a_bad_progress_option_is_refused() -> None:
    with pytest.raises(GpuGroupsError) as e:
        gg.Manager(devices="cpu", catalog=[], progress="yes")
    assert e.value.code == "invalid_request"
