"""The estimate cache: read once, failures cached too, file I/O outside the manager's lock."""

from __future__ import annotations

import pytest

import gpugroups as gg
from gpugroups.catalog import Catalog
from gpugroups.errors import GpuGroupsError


def test_an_unresolvable_group_is_looked_up_once_not_on_every_state(tmp_path, tiny_gpt2):
    cat = Catalog(roots=[tmp_path])
    cat.register_group("ghost", models={"ghost": "nobody/not-in-the-cache"})
    cat.register_group("gpt", models={"tiny-gpt2": str(tiny_gpt2)})
    lookups: list[str] = []
    real = cat.local_path

    def counted(source: str):  # the real lookup, counted
        lookups.append(source)
        return real(source)

    cat.local_path = counted  # type: ignore[method-assign]
    with gg.Manager(devices="virtual:2x256MiB", catalog=cat) as m:
        for _ in range(20):
            groups = {g["id"]: g for g in m.state()["groups"]}
        assert groups["ghost"]["memory_estimate_bytes"] == 0 and groups["gpt"]["memory_estimate_bytes"] > 0
        assert lookups.count("nobody/not-in-the-cache") == 1
        assert lookups.count(str(tiny_gpt2)) == 1
        with pytest.raises(GpuGroupsError) as e:  # a load asks again (the model may have arrived since)
            m.load("ghost")
        assert e.value.code == "unknown_model"
        assert lookups.count("nobody/not-in-the-cache") == 2
        assert m.state()["operations"] == []


def test_estimate_io_runs_outside_the_manager_lock(tmp_path, tiny_gpt2):
    """While an estimate reads files, another thread's call that takes the manager's lock completes."""
    import threading

    cat = Catalog(roots=[tmp_path])
    cat.register_group("gpt", models={"tiny-gpt2": str(tiny_gpt2)})
    real = cat.local_path
    seen: list[bool] = []

    with gg.Manager(devices="cpu", catalog=cat) as m:
        def probing(source: str):
            # unpin takes the manager's lock and nothing else: it completes only if the lock is free
            t = threading.Thread(target=m.unpin, args=("gpt",))
            t.start()
            t.join(10)
            seen.append(not t.is_alive())
            return real(source)

        cat.local_path = probing  # type: ignore[method-assign]
        m.state()
    assert seen and all(seen)


def test_a_group_unregistered_while_it_loads_says_so(tiny_llama):
    """A load looks up its members' folders after its group was looked up; ``unregister_group`` in
    between made that a bare ``KeyError``."""
    from gpugroups.engine.estimates import folders

    cat = Catalog(roots=[])
    spec = cat.register_group("x", models={"x-model": str(tiny_llama)})
    cat.unregister("x", unless=lambda gid: False)
    with pytest.raises(GpuGroupsError) as gone:
        folders(cat, spec)
    assert gone.value.code == "unknown_group" and "left the catalog" in gone.value.message
