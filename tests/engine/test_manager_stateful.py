"""Random sequences of manager calls from two threads on virtual devices, checked after every step.

Invariants: no device over budget, each group resident at most once, the state JSON agrees
with what is really loaded on each device (and the newest event's state with the state read),
and every call is answered or fails with a ``GpuGroupsError`` (never another exception, never a hang). The catalog has a group (``big``)
that no single device holds, so it shards, and calls may ask for ``device_ids``: a device's
accounted bytes are the sum of its groups' shares, no shard outlives its group, and a sharded
group's model lives on its first device's worker only.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import gpugroups as gg
from gpugroups.catalog import Catalog
from gpugroups.errors import GpuGroupsError
from tests import tinymodels
from tests.engine.gated import gated_manager
from tests.waiting import wait_for

MODELS = ["tiny-base", "tiny-a", "tiny-b", "tiny-gpt2", "solo-llama", "solo-gpt2", "big-base"]
GROUPS = ["tiny", "gpt", "solo1", "solo2", "big"]
OPS = ["load", "unload", "load_group", "unload_group", "pin", "unpin", "process", "clear_device"]
NUM_DEVICES = 3


def _calls():
    """One manager call: op name and its arguments."""
    device = st.one_of(st.none(), st.integers(0, NUM_DEVICES - 1))
    span = st.lists(st.integers(0, NUM_DEVICES - 1), min_size=2, max_size=NUM_DEVICES, unique=True)
    return st.one_of(
        st.tuples(st.just("load"), st.fixed_dictionaries({"model_id": st.sampled_from(MODELS), "device_id": device})),
        st.tuples(st.just("load_group"), st.fixed_dictionaries({"group_id": st.sampled_from(GROUPS), "device_ids": span})),
        st.tuples(st.just("pin"), st.fixed_dictionaries({"group_id": st.sampled_from(GROUPS), "device_ids": span})),
        st.tuples(st.just("unload"), st.fixed_dictionaries({"model_id": st.sampled_from(MODELS)})),
        st.tuples(st.just("load_group"), st.fixed_dictionaries({"group_id": st.sampled_from(GROUPS), "device_id": device})),
        st.tuples(st.just("unload_group"), st.fixed_dictionaries({"group_id": st.sampled_from(GROUPS)})),
        st.tuples(st.just("pin"), st.fixed_dictionaries({"group_id": st.sampled_from(GROUPS), "device_id": device})),
        st.tuples(st.just("unpin"), st.fixed_dictionaries({"group_id": st.sampled_from(GROUPS)})),
        st.tuples(st.just("process"), st.fixed_dictionaries({"model_id": st.sampled_from(MODELS), "prompt": st.sampled_from(["def f(", "import"])})),
        st.tuples(st.just("clear_device"), st.fixed_dictionaries({"device_id": st.integers(0, NUM_DEVICES - 1)})),
    )


@pytest.fixture(scope="module")
def stateful_setup(tiny_llama, tiny_adapters, tiny_gpt2, models_root, tokenizer_dir):
    """A catalog of five groups and a device size that holds about two of the small ones but
    not ``big`` (a deep tiny Llama of about 1.7 devices)."""
    big = models_root / "stateful-deep"
    if not big.exists():
        tinymodels.build_causal_lm(big, "llama", "deep", tokenizer_dir=tokenizer_dir, seed=11, context=32)

    def catalog():
        cat = Catalog(roots=[models_root])
        cat.register_group("tiny", base=str(tiny_llama), adapters={k: str(v) for k, v in tiny_adapters.items()}, base_id="tiny-base")
        cat.register_group("gpt", models={"tiny-gpt2": str(tiny_gpt2)})
        cat.register_group("solo1", models={"solo-llama": str(tiny_llama)})
        cat.register_group("solo2", models={"solo-gpt2": str(tiny_gpt2)})
        cat.register_group("big", models={"big-base": str(big)})
        return cat

    probe = gg.Manager(devices="virtual:1GiB", catalog=catalog())
    sizes = {g["id"]: g["memory_estimate_bytes"] for g in probe.groups()}
    probe.close()
    return catalog, int(max(max(v for k, v in sizes.items() if k != "big") * 2.2, sizes["big"] / 1.7))


def _unversioned(state: dict) -> dict:
    """``state`` less the fields read live from the workers."""
    return {**state, "devices": [{k: v for k, v in d.items() if k not in ("status", "queue_depth")} for d in state["devices"]]}


def test_random_call_sequences_keep_the_manager_consistent(stateful_setup):
    make_catalog, device_bytes = stateful_setup

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.m, self.workers = gated_manager(devices=f"virtual:{NUM_DEVICES}x{device_bytes}B", catalog=make_catalog())
            self.seen = 0  # the newest event's version
            self.last: dict = {}  # the newest state_update
            self.m.subscribe(self._on_event)

        def _on_event(self, event: dict) -> None:
            self.seen = event["version"]
            if event["type"] == "state_update":
                self.last = event

        def teardown(self) -> None:
            self.m.close()

        def _call(self, op: str, args: dict) -> None:
            try:
                getattr(self.m, op)(**args)
            except GpuGroupsError:
                pass  # a clear, coded refusal is a valid answer

        @rule(call=_calls())
        def one_call(self, call):
            self._call(*call)

        @rule(a=_calls(), b=_calls())
        def two_threads(self, a, b):
            errors: list[BaseException] = []

            def run(call):
                try:
                    self._call(*call)
                except BaseException as exc:  # anything but GpuGroupsError is a failure
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(c,)) for c in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
                assert not t.is_alive(), f"call hung: {a} / {b}"
            assert not errors, errors

        @invariant()
        def consistent(self):
            s = self.m.state()
            groups = {g["id"]: g for g in s["groups"]}
            for d in s["devices"]:
                mem, dev = d["memory"], d["device_id"]
                assert mem["manager_bytes"] <= mem["budget_bytes"], d
                assert len(d["resident_groups"]) == len(set(d["resident_groups"])), "a group is resident twice"
                shares = [sh["bytes"] for g in groups.values() for sh in g["shards"] if sh["device_id"] == dev]
                assert mem["manager_bytes"] == sum(shares), d  # a device counts exactly its shares
                spanning = [g for g in d["resident_groups"] if dev in groups[g]["resident_on"]]
                assert spanning == d["resident_groups"], "a device lists a group that does not span it"
                loaded = self.workers[dev].runtimes()  # what the device's worker really holds
                driven = [g for g in d["resident_groups"] if groups[g]["resident_on"][0] == dev]
                assert sorted(driven) == sorted(loaded)
            for g in groups.values():
                on = g["resident_on"]
                assert len(on) == len(set(on)), f"{g['id']} spans a device twice"
                assert [sh["device_id"] for sh in g["shards"]] == on, "a shard without its group, or the reverse"
                for dev in on:
                    assert g["id"] in s["devices"][dev]["resident_groups"]
                if g["pinned"]:
                    assert on, f"pinned group {g['id']} is not resident"
            assert s["operations"] == []
            # the events' states are built from the changes since the one before: when no change
            # came in between, the newest equals a state read afresh (less the workers' status and
            # queue depth, which move without a version: a queued request is no change)
            assert wait_for(lambda: self.seen == self.m.version)
            if self.last.get("version") == s["version"]:
                assert _unversioned(self.last["state"]) == _unversioned(s)

    Machine.TestCase.settings = settings(
        max_examples=12, stateful_step_count=8, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    Machine.TestCase().runTest()


def test_an_explicit_span_that_cannot_be_honoured_is_refused_not_moved_forever(stateful_setup):
    """Found by the state machine: pinning a one-block model over three devices (the others
    being full of pinned groups) placed it on one device, which ``ensure`` saw as "elsewhere"
    and moved again, forever. Now placement's span must be the one asked for."""
    make_catalog, device_bytes = stateful_setup
    m, _ = gated_manager(devices=f"virtual:{NUM_DEVICES}x{device_bytes}B", catalog=make_catalog())
    try:
        m.pin("tiny", device_ids=[0, 1, 2])
        m.pin("gpt")
        outcome: list[BaseException | None] = []

        def pin() -> None:
            try:
                m.pin("solo2", device_ids=[0, 1, 2])
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=pin, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "pin kept moving the group"
        if outcome[0] is not None:  # refused (room or span), never anything else
            assert isinstance(outcome[0], GpuGroupsError) and outcome[0].code in ("invalid_request", "insufficient_memory")
        else:
            solo2 = next(g for g in m.state()["groups"] if g["id"] == "solo2")
            assert solo2["resident_on"] == [0, 1, 2]
    finally:
        m.close()
