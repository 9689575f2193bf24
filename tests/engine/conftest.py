"""Managers on the tiny catalog: plain (``m``) and with holdable workers (``held``)."""

from __future__ import annotations

from pathlib import Path

import pytest

import gpugroups as gg
from tests.engine.gated import GatedWorker, gated_manager


@pytest.fixture
def m(tiny_catalog_toml: Path):
    mgr = gg.Manager(devices="cpu", catalog=tiny_catalog_toml)
    yield mgr
    mgr.close()


@pytest.fixture
def held(tiny_catalog_toml: Path) -> tuple[gg.Manager, GatedWorker]:
    """A cpu manager whose one worker can be held with ``worker.hold()``."""
    mgr, workers = gated_manager(devices="cpu", catalog=tiny_catalog_toml)
    yield mgr, workers[0]
    mgr.close()
