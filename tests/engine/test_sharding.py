"""Groups sharded across virtual devices, with a real deep tiny Llama and a LoRA adapter."""

from __future__ import annotations

import pytest

import gpugroups as gg
from gpugroups.catalog import Catalog
from gpugroups.engine.calls import OutOfMemory
from gpugroups.errors import GpuGroupsError
from tests.engine.gated import GatedWorker, gated_manager
from tests.waiting import wait_for

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
        # device_id=n is device_ids=[n]: only that device, so a group sharded over it moves onto it alone
        moved = m.load("big-a", device_id=0)
        assert (moved["status"], moved["device_ids"]) == ("loaded", [0])
        assert m.load("big-a", device_ids=[0])["status"] != "loaded"  # the same place: nothing to do
        assert m.pin("big", device_id=2)["device_ids"] == [2]
        assert m.process("big-a", "x", device_id=2)["device_ids"] == [2]  # pinned there: no move needed


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


def test_run_and_use_on_a_sharded_group_hold_every_spanned_device(deep):
    """While ``run``'s function or a ``use`` block works on a sharded group, the other devices it
    spans take no other work, as during a sharded pass; from inside, a call that would wait for one
    of them is a ``conflict``, not a wedge."""
    import threading

    make, sizes = deep
    with gg.Manager(devices=f"virtual:2x{int(sizes['big'] * 0.75 + sizes['s1'] * 1.1)}B", catalog=make()) as m:
        span = m.pin("big", device_ids=[0, 1])["device_ids"]
        assert m.load_group("s1", device_id=span[1])["device_ids"] == [span[1]]
        release, started, out = threading.Event(), threading.Event(), []

        def holds(model, tokenizer) -> str:
            started.set()
            try:
                m.process("solo-1", "x = ")
            except GpuGroupsError as exc:
                release.wait(30)
                return exc.code
            return "answered"

        runner = threading.Thread(target=lambda: out.append(m.run("big-base", holds)))
        runner.start()
        assert started.wait(30)
        done = threading.Event()
        t = threading.Thread(target=lambda: (m.process("solo-1", "x = "), done.set()))
        t.start()
        assert not done.wait(0.5)  # s1's device is held by the run
        release.set()
        runner.join(30)
        assert done.wait(30) and out == ["conflict"]
        t.join()
        with m.use("big-base"), pytest.raises(GpuGroupsError) as e:
            m.process("solo-1", "x = ")
        assert e.value.code == "conflict"
        assert m.process("solo-1", "x = ")["predictions"]


def test_the_gpu_checks_sharding_comparison_runs_on_cpu_backed_virtual_devices(deep):
    from bench import gpu_check

    make, _ = deep
    out = gpu_check.sharded_equals_whole(make(), "big", "big-a", "cpu", devices(deep))
    assert len(out["span"]) == 2 and out["max_gap"] <= gpu_check.TOLERANCE
    with pytest.raises(RuntimeError, match="was not sharded"):  # one device that holds it all: no shard
        gpu_check.sharded_equals_whole(make(), "big", "big-a", "cpu", devices(deep, n=1, factor=2.0))


def test_the_gpu_check_says_it_skips_without_cuda(capsys):
    import torch

    from bench import gpu_check

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the check would run for real")
    gpu_check.main([])
    assert "gpu check skipped: no CUDA device" in capsys.readouterr().out


def _sharded_runtime(deep, group="big"):
    """A manager sharding ``group`` over two of three devices, and the runtime its first device holds."""
    from gpugroups.engine.worker import ThreadWorker

    make, _ = deep
    workers: list[ThreadWorker] = []
    m = gg.Manager(devices=devices(deep), catalog=make(), worker=lambda d: workers.append(ThreadWorker(d)) or workers[-1])
    span = m.load_group(group)["device_ids"]
    return m, span, workers[span[0]].runtimes()[group]


def test_each_spanned_device_reserves_at_least_what_its_part_of_a_pass_allocates(deep):
    import torch

    from bench.bench_memory import shard_peaks
    from gpugroups.engine import estimate as est

    m, span, rt = _sharded_runtime(deep)
    with m:
        base = rt.members["big-base"].model.get_base_model()
        config = base.config.to_dict()
        seq = min(est.REFERENCE_SEQ, base.config.max_position_embeddings)
        ids = torch.randint(1, base.config.vocab_size, (est.REFERENCE_BATCH, seq))

        def reference_pass() -> None:  # the batch the runtime reserve is sized for
            with torch.inference_mode():
                base(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)

        reference_pass()
        peaks = shard_peaks(base, rt.device_map, len(span), reference_pass)
        assert all(p > 0 for p in peaks)
        for peak, reserve in zip(peaks, rt.reserves, strict=True):
            assert peak <= reserve
        full = est.runtime_reserve(config, "float32")
        assert all(r < full for r in rt.reserves)  # no device keeps the whole reserve any more
        parts = est.reserve_parts(config, "float32")
        layers, head = rt._layers, rt._head
        assert sum(layers) == base.config.num_hidden_layers and head == len(span) - 1
        assert rt.reserves[head] - rt.reserves[0] >= parts.logits - parts.kv  # the logits live with the head
        budget = rt.members["big-base"].budget  # a pass is bounded on each device by what it reserved
        assert [budget.reserve.on(n, sum(layers), h) for n, h in budget.layout] == rt.reserves
        assert budget.fits(est.REFERENCE_BATCH, seq) and not budget.fits(est.REFERENCE_BATCH + 1, seq)
        shards = next(g for g in m.state()["groups"] if g["id"] == "big")["shards"]
        assert [s["bytes"] for s in shards] == [w + r for w, r in zip(rt.shares, rt.reserves, strict=True)]


def test_a_tied_head_shards_with_its_embedding_and_answers_as_unsharded(models_root, tiny_gpt2):
    from gpugroups.engine.worker import ThreadWorker

    def cat() -> Catalog:
        c = Catalog(roots=[models_root])
        c.register_group("g", models={"gpt": str(tiny_gpt2)})
        return c

    workers: list[ThreadWorker] = []
    seam = lambda d: workers.append(ThreadWorker(d)) or workers[-1]  # noqa: E731
    with gg.Manager(devices="cpu", catalog=cat()) as whole, gg.Manager(devices="virtual:2x1GiB", catalog=cat(), worker=seam) as split:
        assert split.load_group("g", device_ids=[0, 1])["device_ids"] == [0, 1]
        rt = workers[0].runtimes()["g"]
        assert rt.device_map["lm_head"] == rt.device_map["transformer.wte"] == 0 and rt._head == 0
        assert rt._layers == [1, 1] and rt.reserves[0] > rt.reserves[1]  # the logits are where the head is
        for prompt in PROMPTS:
            a, b = whole.process("gpt", prompt, 5)["predictions"], split.process("gpt", prompt, 5)["predictions"]
            assert [p["token_id"] for p in a] == [p["token_id"] for p in b]
            for x, y in zip(a, b, strict=True):
                assert y["probability"] == pytest.approx(x["probability"], abs=1e-5)


@pytest.fixture(scope="module")
def pair(deep, models_root, tiny_llama):
    """A catalog factory with ``pair``, a models group of the deep Llama and the tiny one, and
    devices that hold the deep one alone but not both."""
    make, _ = deep

    def make_pair() -> Catalog:
        cat = make()
        cat.register_group("pair", models={"deep": str(models_root / "deep-llama"), "tiny": str(tiny_llama)})
        return cat

    from gpugroups.engine.estimate import weight_bytes

    with gg.Manager(devices="virtual:1GiB", catalog=make_pair()) as probe:
        need = next(g for g in probe.groups() if g["id"] == "pair")["memory_estimate_bytes"]
    return make_pair, f"virtual:3x{need - weight_bytes(tiny_llama, 'float32') // 2}B"


def test_a_models_group_shards_by_whole_members_and_answers_as_unsharded(pair, models_root, tiny_llama):
    import json

    from gpugroups.engine import estimate as est

    make, spec = pair
    with gg.Manager(devices="cpu", catalog=make()) as whole, gg.Manager(devices=spec, catalog=make()) as split:
        span = split.load_group("pair")["device_ids"]
        assert len(span) == 2
        devs, groups = by_id(split)
        budget = devs[0]["memory"]["budget_bytes"]
        assert groups["pair"]["memory_estimate_bytes"] > budget  # no one device could hold it
        for s in groups["pair"]["shards"]:
            assert devs[s["device_id"]]["memory"]["manager_bytes"] == s["bytes"] <= budget
        # each member whole on one device, which keeps the group's reserve (one member's pass runs there)
        deep = models_root / "deep-llama"
        reserve = max(est.runtime_reserve(json.loads((f / "config.json").read_text()), "float32") for f in (deep, tiny_llama))
        weights = [est.weight_bytes(deep, "float32"), est.weight_bytes(tiny_llama, "float32")]
        shares = [s["bytes"] - reserve for s in groups["pair"]["shards"]]
        assert shares == pytest.approx(weights, abs=1024)  # measured: the rotary buffers too
        for model in ("deep", "tiny", "deep"):
            for prompt in PROMPTS:
                a, b = whole.process(model, prompt, 5)["predictions"], split.process(model, prompt, 5)["predictions"]
                assert [p["token_id"] for p in a] == [p["token_id"] for p in b]
                for x, y in zip(a, b, strict=True):
                    assert y["probability"] == pytest.approx(x["probability"], abs=1e-5)
        assert split.unload_group("pair")["device_ids"] == span
        assert all(d["memory"]["manager_bytes"] == 0 for d in split.state()["devices"])


def test_a_models_group_whose_largest_member_fits_no_device_is_refused_with_why(pair):
    make, _ = pair
    with gg.Manager(devices="virtual:1GiB", catalog=make()) as probe:
        deep_alone = next(g for g in probe.groups() if g["id"] == "big")["memory_estimate_bytes"]
    with gg.Manager(devices=f"virtual:3x{int(deep_alone * 0.7)}B", catalog=make()) as m:  # together they would hold it
        with pytest.raises(GpuGroupsError) as e:
            m.load_group("pair")
        assert e.value.code == "insufficient_memory"
        assert "sharded by whole members" in e.value.message and e.value.details["largest_member"] == "deep"
        assert all(not d["resident_groups"] for d in m.state()["devices"])


def test_after_a_sharded_load_that_evicts_the_last_event_shows_every_spanned_device_idle(deep):
    """The span's other devices are paused behind their queues (here a victim's unload); the load
    answers once they show free again, so the state its event carries shows them idle (it showed
    one busy until an unrelated change, in about one round in four)."""
    make, _ = deep
    with gg.Manager(devices=devices(deep), catalog=make(), progress=False) as m:
        last: list[dict] = []
        m.subscribe(lambda e: last.append(e) if e["type"] == "state_update" else None)
        for _ in range(6):
            m.load_group("s1", device_id=1)
            m.load_group("big", device_ids=[0, 1])  # evicts s1: device 1 unloads it, then is paused
            assert wait_for(lambda: last[-1]["version"] == m.state()["version"])
            assert [d["status"] for d in last[-1]["state"]["devices"]] == ["idle"] * 3
            m.unload_group("big")
