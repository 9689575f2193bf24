"""Random sequences of manager calls from two threads on virtual devices, checked after every step.

Invariants: no device over budget, each group resident at most once, the state JSON agrees
with what is really loaded on each device, and every call is answered or fails with a
``GpuGroupsError`` (never another exception, never a hang).
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
from tests.engine.gated import gated_manager

MODELS = ["tiny-base", "tiny-a", "tiny-b", "tiny-gpt2", "solo-llama", "solo-gpt2"]
GROUPS = ["tiny", "gpt", "solo1", "solo2"]
OPS = ["load", "unload", "load_group", "unload_group", "pin", "unpin", "process", "clear_device"]
NUM_DEVICES = 3


def _calls():
    """One manager call: op name and its arguments."""
    device = st.one_of(st.none(), st.integers(0, NUM_DEVICES - 1))
    return st.one_of(
        st.tuples(st.just("load"), st.fixed_dictionaries({"model_id": st.sampled_from(MODELS), "device_id": device})),
        st.tuples(st.just("unload"), st.fixed_dictionaries({"model_id": st.sampled_from(MODELS)})),
        st.tuples(st.just("load_group"), st.fixed_dictionaries({"group_id": st.sampled_from(GROUPS), "device_id": device})),
        st.tuples(st.just("unload_group"), st.fixed_dictionaries({"group_id": st.sampled_from(GROUPS)})),
        st.tuples(st.just("pin"), st.fixed_dictionaries({"group_id": st.sampled_from(GROUPS), "device_id": device})),
        st.tuples(st.just("unpin"), st.fixed_dictionaries({"group_id": st.sampled_from(GROUPS)})),
        st.tuples(st.just("process"), st.fixed_dictionaries({"model_id": st.sampled_from(MODELS), "prompt": st.sampled_from(["def f(", "import"])})),
        st.tuples(st.just("clear_device"), st.fixed_dictionaries({"device_id": st.integers(0, NUM_DEVICES - 1)})),
    )


@pytest.fixture(scope="module")
def stateful_setup(tiny_llama, tiny_adapters, tiny_gpt2, models_root):
    """A catalog of four groups and a device size that holds about two of them."""
    def catalog():
        cat = Catalog(roots=[models_root])
        cat.register_group("tiny", base=str(tiny_llama), adapters={k: str(v) for k, v in tiny_adapters.items()}, base_id="tiny-base")
        cat.register_group("gpt", models={"tiny-gpt2": str(tiny_gpt2)})
        cat.register_group("solo1", models={"solo-llama": str(tiny_llama)})
        cat.register_group("solo2", models={"solo-gpt2": str(tiny_gpt2)})
        return cat

    probe = gg.Manager(devices="virtual:1GiB", catalog=catalog())
    sizes = [g["memory_estimate_bytes"] for g in probe.groups()]
    probe.close()
    return catalog, int(max(sizes) * 2.2)


def test_random_call_sequences_keep_the_manager_consistent(stateful_setup):
    make_catalog, device_bytes = stateful_setup

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.m, self.workers = gated_manager(devices=f"virtual:{NUM_DEVICES}x{device_bytes}B", catalog=make_catalog())

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
            seen: list[str] = []
            for d in s["devices"]:
                mem = d["memory"]
                assert mem["manager_bytes"] <= mem["budget_bytes"], d
                seen += d["resident_groups"]
                loaded = self.workers[d["device_id"]].runtimes()  # what the device's worker really holds
                assert sorted(d["resident_groups"]) == sorted(loaded)
                members = sorted(mid for rt in loaded.values() for mid in rt.members)
                assert sorted(d["loaded_models"]) == members
            assert len(seen) == len(set(seen)), "a group is resident twice"
            for g in s["groups"]:
                assert len(g["resident_on"]) <= 1
                if g["pinned"]:
                    assert g["resident_on"], f"pinned group {g['id']} is not resident"
            assert s["operations"] == []

    Machine.TestCase.settings = settings(
        max_examples=12, stateful_step_count=8, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    Machine.TestCase().runTest()
