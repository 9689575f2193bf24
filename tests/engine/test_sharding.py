"""Groups sharded across virtual devices, with a real deep tiny Llama and a LoRA adapter."""

from __future__ import annotations

import pytest

import gpugroups as gg
from gpugroups.catalog import Catalog
from gpugroups.engine.worker import OutOfMemory
from gpugroups.errors import GpuGroupsError
from tests.engine.gated import GatedWorker, gated_manager

PROMPTS = ["def add(a, b):", "import os"]


@pytest.fixture(scope="module")
def deep(models_root, deep_llama, tiny_llama):
    """A catalog factory (adapters group ``big``, single groups ``s1``/``s2``) and ``big``'s estimate."""
    base, adapter = deep_llama

    def make() -> Catalog:
        cat = Catalog(roots=[models_root])
        cat.register_group("big", base=str(base), adapters={"big-a": str(adapter)}, base_id="big-base")
        cat.register_group("s1", models={"solo-1": str(tiny_llama)})
        cat.register_group("s2", models={"solo-2": str(tiny_llama)})
        return cat

    with gg.Manager(devices="virtual:1GiB", catalog=make()) as probe:
        sizes = {g["id"]: g["memory_estimate_bytes"] for g in probe.groups()}
    return make, sizes


def devices(deep, n=3, factor=1 / 1.5):
    return f"virtual:{n}x{int(deep[1]['big'] * factor)}B"


def by_id(m):
    s = m.state()
    return {d["device_id"]: d for d in s["devices"]}, {g["id"]: g for g in s["groups"]}


def test_a_group_bigger_than_any_device_shards_onto_two_of_three(deep):
    make, _ = deep
    with gg.Manager(devices=devices(deep), catalog=make()) as m:
        out = m.load("big-base")
        assert len(out["device_ids"]) == 2 and out["device_id"] == out["device_ids"][0]
        devs, groups = by_id(m)
        g = groups["big"]
        assert g["resident_on"] == out["device_ids"]
        assert [s["device_id"] for s in g["shards"]] == g["resident_on"]
        for s in g["shards"]:  # each device counts only its share, within its budget
            mem = devs[s["device_id"]]["memory"]
            assert mem["manager_bytes"] == s["bytes"] <= mem["budget_bytes"]
            assert devs[s["device_id"]]["resident_groups"] == ["big"]
        assert sum(s["bytes"] for s in g["shards"]) > max(d["memory"]["budget_bytes"] for d in devs.values())
        models = {x["id"]: x for x in m.models()}
        assert models["big-a"]["devices"] == g["resident_on"]


def test_sharded_results_equal_unsharded_for_base_and_adapter(deep):
    make, _ = deep
    with gg.Manager(devices="cpu", catalog=make()) as whole, gg.Manager(devices=devices(deep), catalog=make()) as split:
        for model in ("big-base", "big-a", "big-base"):  # switching member stays a pointer change
            for prompt in PROMPTS:
                a = whole.process(model, prompt, num_predictions=5)
                b = split.process(model, prompt, num_predictions=5)
                assert len(b["device_ids"]) == 2
                assert [p["token"] for p in a["predictions"]] == [p["token"] for p in b["predictions"]]
                for x, y in zip(a["predictions"], b["predictions"]):
                    assert y["probability"] == pytest.approx(x["probability"], abs=1e-5)


def test_explicit_device_ids_shard_in_that_order_even_when_one_device_would_do(deep):
    make, _ = deep
    with gg.Manager(devices=devices(deep, factor=2.0), catalog=make()) as m:
        assert m.load_group("big", device_ids=[2, 0])["device_ids"] == [2, 0]
        _, groups = by_id(m)
        assert groups["big"]["resident_on"] == [2, 0]
        with pytest.raises(GpuGroupsError) as e:
            m.load("big-base", device_id=0, device_ids=[0, 1])
        assert e.value.code == "invalid_request"
        assert m.load_group("s1")["device_ids"] == [1]  # a group that fits one device stays on one


def test_idle_groups_are_evicted_to_make_room_for_shards_and_pins_stay(deep):
    make, sizes = deep
    with gg.Manager(devices=devices(deep), catalog=make()) as m:
        m.pin("s1", device_id=0)
        m.load_group("s2", device_id=1)
        m.load_group("big")
        devs, groups = by_id(m)
        assert groups["s1"]["resident_on"] == [0] and groups["s1"]["pinned"]  # never moved
        assert 0 not in groups["big"]["resident_on"] or devs[0]["memory"]["manager_bytes"] <= devs[0]["memory"]["budget_bytes"]
        for d in devs.values():
            assert d["memory"]["manager_bytes"] <= d["memory"]["budget_bytes"]
        if groups["s2"]["resident_on"] == []:
            assert 1 in groups["big"]["resident_on"]  # evicted to make room there
        m.unpin("s1")


def test_unload_and_clear_device_act_on_every_shard(deep):
    make, _ = deep
    with gg.Manager(devices=devices(deep), catalog=make()) as m:
        before = {d["device_id"]: d["memory"]["manager_bytes"] for d in m.state()["devices"]}
        span = m.load_group("big")["device_ids"]
        assert m.unload_group("big", device_id=span[1])["device_ids"] == span
        after, groups = by_id(m)
        assert {i: d["memory"]["manager_bytes"] for i, d in after.items()} == before
        assert groups["big"]["shards"] == [] and all(not d["resident_groups"] for d in after.values())
        m.load_group("big")
        assert m.clear_device(span[-1])["unloaded"] == ["big"]
        assert all(not d["resident_groups"] for d in m.state()["devices"])


class OomOnSecondShard(GatedWorker):
    """A worker whose sharded loads run out of memory on the second device: it loads the group
    for real, then fails the way a CUDA OOM on shard 2 would, leaving nothing behind."""

    def _load(self, group, folders, dtype, progress, span=None):
        out = super()._load(group, folders, dtype, progress, span)
        if span is not None:
            self._unload(group.id)
            raise OutOfMemory(f"out of memory on {span.backings[1]} (shard 2)")
        return out


def test_an_oom_on_one_shard_leaves_nothing_behind(deep):
    make, _ = deep
    with gg.Manager(devices=devices(deep), catalog=make(), worker=OomOnSecondShard) as m:
        with pytest.raises(GpuGroupsError) as e:
            m.load_group("big")
        assert e.value.code == "insufficient_memory", e.value.message
        s = m.state()
        assert all(d["memory"]["manager_bytes"] == 0 and not d["resident_groups"] for d in s["devices"])
        assert s["operations"] == [] and all(not w.runtimes() for w in m._workers)
        assert m.load_group("s1")["status"] == "loaded"  # the devices are usable again


def test_a_sharded_pass_holds_every_spanned_device(deep):
    make, _ = deep
    m, workers = gated_manager(devices=devices(deep), catalog=make())
    with m:
        span = m.load_group("big")["device_ids"]
        gate = workers[span[1]].hold()  # the second device is busy: the pass must wait for it
        import threading

        done = threading.Event()
        t = threading.Thread(target=lambda: (m.process("big-base", "x = "), done.set()))
        t.start()
        assert not done.wait(0.5)
        gate.set()
        assert done.wait(30)
        t.join()
