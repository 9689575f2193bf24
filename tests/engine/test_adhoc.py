"""Ad-hoc ``single:`` groups through the Manager: one group per folder whatever the spelling, only
a successful load creates one, and their number is bounded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import gpugroups as gg
from gpugroups.catalog import Catalog
from gpugroups.errors import GpuGroupsError


def copies(src: Path, root: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        shutil.copytree(src, root / f"m{i}")
        out.append(root / f"m{i}")
    return out


def test_every_spelling_loads_the_same_group_once(tmp_path: Path, tiny_gpt2: Path) -> None:
    (folder,) = copies(tiny_gpt2, tmp_path, 1)
    with gg.Manager(devices="cpu", catalog=Catalog(roots=[tmp_path])) as m:
        first = m.load(f"{folder}/./.")
        assert (first["status"], first["model_id"], first["group_id"]) == ("loaded", str(folder), f"single:{folder}")
        for spelling in (str(folder), f"{folder}//", f"{tmp_path}/m0/../m0"):
            again = m.load(spelling)
            assert (again["status"], again["group_id"]) == ("already_loaded", f"single:{folder}")
        assert m.process(f"{folder}/", "def f(")["group_id"] == f"single:{folder}"
        assert [g["id"] for g in m.state()["groups"]] == [f"single:{folder}"]
        assert m.unload(f"{folder}/.")["status"] == "unloaded"


def test_only_a_successful_load_creates_a_group(tmp_path: Path, tiny_gpt2: Path) -> None:
    (folder,) = copies(tiny_gpt2, tmp_path, 1)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "gpt2", "n_layer": "not a number"}')
    with gg.Manager(devices="cpu", catalog=Catalog(roots=[tmp_path])) as m:
        assert m.unload(str(folder))["status"] == "not_loaded"
        assert m.unpin(f"single:{folder}")["pinned"] is False
        with pytest.raises(GpuGroupsError) as err:
            m.load(str(broken))
        assert err.value.code in ("invalid_model", "load_failed")
        assert m.state()["groups"] == [] and m.catalog.groups == {}


def test_adhoc_groups_are_bounded_keeping_resident_ones(tmp_path: Path, tiny_gpt2: Path) -> None:
    folders = copies(tiny_gpt2, tmp_path, 4)
    with gg.Manager(devices="cpu", catalog=Catalog(roots=[tmp_path]), max_adhoc_groups=2) as m:
        m.pin(f"single:{folders[0]}")
        for f in folders[1:]:
            m.load(str(f))
            m.unload(str(f))
        assert sorted(g["id"] for g in m.state()["groups"]) == sorted(f"single:{f}" for f in (folders[0], folders[3]))
        assert m.load(str(folders[1]))["status"] == "loaded"  # forgotten is not refused: it comes back


def test_max_adhoc_groups_must_be_positive() -> None:
    with pytest.raises(GpuGroupsError) as err:
        gg.Manager(devices="cpu", catalog=[], max_adhoc_groups=0)
    assert err.value.code == "invalid_request"
