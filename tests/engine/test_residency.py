"""Placement, eviction and pinning through the Manager, on three virtual devices with real tiny models."""

from __future__ import annotations

import pytest

import gpugroups as gg
from gpugroups.catalog import Catalog
from gpugroups.errors import GpuGroupsError
from tests.engine.gated import gated_manager
from tests.waiting import wait_for

GROUPS = ["g1", "g2", "g3", "g4", "g5"]


@pytest.fixture(scope="module")
def catalog_factory(tiny_llama, tiny_gpt2, models_root):
    """Five single-model groups (alternating architectures) and the largest one's estimate."""
    def make():
        cat = Catalog(roots=[models_root])
        for i, gid in enumerate(GROUPS):
            cat.register_group(gid, models={f"m{i + 1}": str(tiny_llama if i % 2 == 0 else tiny_gpt2)})
        return cat

    probe = gg.Manager(devices="virtual:1GiB", catalog=make())
    biggest = max(g["memory_estimate_bytes"] for g in probe.groups())
    probe.close()
    return make, biggest


def manager(catalog_factory, per_device_groups: float, **kw):
    return gated(catalog_factory, per_device_groups, **kw)[0]


def gated(catalog_factory, per_device_groups: float, **kw):
    """A manager on three virtual devices whose workers can be held, and those workers."""
    make, biggest = catalog_factory
    return gated_manager(devices=f"virtual:3x{int(biggest * per_device_groups)}B", catalog=make(), **kw)


def resident(m):
    return {d["device_id"]: d["resident_groups"] for d in m.state()["devices"]}


def test_groups_spread_over_free_devices_then_evict_lru(catalog_factory):
    with manager(catalog_factory, 1.5) as m:  # one group fits per device
        placed = [m.load_group(g)["device_id"] for g in ("g1", "g2", "g3")]
        assert sorted(placed) == [0, 1, 2]
        m.process("m2", "x = ")  # g2 used most recently, g1 least
        m.load_group("g3")
        out = m.load_group("g4")
        assert out["status"] == "loaded"
        where = resident(m)
        assert ["g4"] in where.values() and ["g1"] not in where.values(), where
        assert all(len(v) == 1 for v in where.values())


def test_pinned_groups_are_never_evicted(catalog_factory):
    with manager(catalog_factory, 1.5) as m:
        for g in ("g1", "g2", "g3"):
            m.pin(g)
        with pytest.raises(GpuGroupsError) as e:
            m.load_group("g4")
        assert e.value.code == "insufficient_memory"
        assert e.value.details["estimate_bytes"] > 0 and len(e.value.details["devices"]) == 3
        m.unpin("g2")
        dev = m.load_group("g4")["device_id"]
        assert resident(m)[dev] == ["g4"]
        assert {g["id"] for g in m.state()["groups"] if g["pinned"]} == {"g1", "g3"}


def test_pin_with_device_sets_affinity(catalog_factory):
    with manager(catalog_factory, 2.5) as m:
        assert m.pin("g5", device_id=2)["device_id"] == 2
        assert resident(m)[2] == ["g5"]
        with pytest.raises(GpuGroupsError) as e:
            m.load_group("g5", device_id=0)
        assert e.value.code == "conflict"


def test_explicit_device_is_honoured_and_evicts_there(catalog_factory):
    with manager(catalog_factory, 1.5) as m:
        m.load_group("g1", device_id=1)
        m.load_group("g2", device_id=1)
        assert resident(m) == {0: [], 1: ["g2"], 2: []}
        m.load_group("g2", device_id=0)  # moving a resident group
        assert resident(m) == {0: ["g2"], 1: [], 2: []}


def test_max_groups_per_device_one_keeps_one_current_group(catalog_factory):
    with manager(catalog_factory, 10, max_groups_per_device=1) as m:
        m.load_group("g1", device_id=0)
        m.load_group("g2", device_id=0)
        s = m.state()["devices"][0]
        assert s["resident_groups"] == ["g2"] and s["current_group"]["id"] == "g2"


def test_current_group_is_most_recently_used(catalog_factory):
    with manager(catalog_factory, 3) as m:
        m.load_group("g1", device_id=0)
        m.load_group("g2", device_id=0)
        assert m.state()["devices"][0]["current_group"]["id"] == "g2"
        m.process("m1", "import")
        d = m.state()["devices"][0]
        assert d["current_group"]["id"] == "g1" and d["resident_groups"] == ["g1", "g2"]


def test_group_larger_than_any_device_is_refused_up_front(catalog_factory):
    with manager(catalog_factory, 0.5) as m:
        with pytest.raises(GpuGroupsError) as e:
            m.load("m1")
        assert e.value.code == "insufficient_memory"
        assert "needs an estimated" in e.value.message
        assert m.state()["operations"] == [] and all(not d["resident_groups"] for d in m.state()["devices"])


def test_clear_device_keeps_pinned_groups(catalog_factory):
    with manager(catalog_factory, 3) as m:
        m.load_group("g1", device_id=0)
        m.pin("g2", device_id=0)
        assert m.clear_device(0)["unloaded"] == ["g1"]
        assert resident(m)[0] == ["g2"]
        assert m.state()["devices"][0]["memory"]["manager_bytes"] == m.state()["groups"][1]["memory_estimate_bytes"]


def test_a_busy_device_never_delays_a_prompt_on_another(catalog_factory):
    import threading

    m, workers = gated(catalog_factory, 3)
    with m:
        m.load_group("g1", device_id=0)
        m.load_group("g2", device_id=1)
        gate = workers[0].hold()  # device 0 stuck in a long operation
        slow = threading.Thread(target=m.process, args=("m1", "import"))
        slow.start()
        try:
            assert m.process("m2", "import", device_id=1)["device_id"] == 1
            assert slow.is_alive(), "the prompt on device 0 should still be waiting"
            assert m.state()["devices"][0]["queue_depth"] == 2
        finally:
            gate.set()
            slow.join(30)


def test_concurrent_loads_on_two_devices_leave_transformers_intact(catalog_factory, tiny_gpt2):
    """transformers patches torch.nn.init and weight tying while it builds a model: loads on two
    device workers at once must not leave those patches behind (tied heads untied, NaN buffers)."""
    import threading

    import torch
    from transformers import AutoModelForCausalLM

    originals = (torch.nn.init.normal_, torch.nn.init.zeros_)
    with manager(catalog_factory, 3) as m:
        for _ in range(3):
            threads = [threading.Thread(target=m.load_group, args=(g, d)) for g, d in (("g2", 0), ("g4", 1), ("g1", 2))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            for g in ("g2", "g4", "g1"):
                m.unload_group(g)
    assert (torch.nn.init.normal_, torch.nn.init.zeros_) == originals
    fresh = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    assert fresh.lm_head.weight.data_ptr() == fresh.transformer.wte.weight.data_ptr()


def test_an_interrupt_reaches_a_caller_waiting_for_another_callers_load(tiny_catalog_toml):
    """Ctrl-C (SIGINT, a KeyboardInterrupt in the main thread) while this call waits for a load
    another caller started: the interrupt is raised here, and the load still completes."""
    import signal
    import threading

    m, workers = gated_manager(devices="cpu", catalog=tiny_catalog_toml)
    gate = workers[0].hold()  # the other caller's load stays in progress
    loader = threading.Thread(target=m.load, args=("tiny-a",))
    raised_in_wait = threading.Event()

    def interrupt_if_waiting(signum, frame):
        # Only an interrupt that lands inside the manager's wait tests anything: before the call
        # gets there, ignore it (the sender tries again).
        f = frame
        while f is not None:
            if f.f_code.co_name == "result" and f.f_code.co_filename.endswith("futures/_base.py"):
                raised_in_wait.set()
                raise KeyboardInterrupt
            f = f.f_back

    def sender(main: int) -> None:
        for _ in range(200):  # about 10 s, the generous bound for "raised at all"
            if raised_in_wait.is_set():
                break
            signal.pthread_kill(main, signal.SIGINT)
            raised_in_wait.wait(0.05)
        gate.set()  # if the interrupt was swallowed, the waiting call returns normally now

    previous = signal.signal(signal.SIGINT, interrupt_if_waiting)
    try:
        loader.start()
        assert wait_for(lambda: m.state()["operations"])
        threading.Thread(target=sender, args=(threading.main_thread().ident,), daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            m.load("tiny-b")  # waits for the other caller's load of the same group
    finally:
        signal.signal(signal.SIGINT, previous)
        gate.set()
        loader.join(60)
    try:
        s = m.state()
        assert s["operations"] == [] and s["devices"][0]["resident_groups"] == ["tiny"]
        assert m.load("tiny-b")["status"] == "switched"  # resident: no load
    finally:
        m.close()


def test_a_move_that_cannot_fit_leaves_the_group_where_it_is(catalog_factory):
    """A load, process or pin naming a device the group cannot fit on fails before the group is
    unloaded from where it is: a refused call loses nothing."""
    make, _ = catalog_factory
    probe = gg.Manager(devices="virtual:1GiB", catalog=make())
    need = next(g["memory_estimate_bytes"] for g in probe.groups() if g["id"] == "g1")
    probe.close()
    with gg.Manager(devices=[f"virtual:{2 * need}B", f"virtual:{need // 2}B"], catalog=make()) as m:
        m.load_group("g1")
        before = m.state()["devices"]
        for move in (
            lambda: m.load_group("g1", device_id=1),
            lambda: m.process("m1", "import", device_id=1),
            lambda: m.pin("g1", device_id=1),
        ):
            with pytest.raises(GpuGroupsError) as e:
                move()
            assert e.value.code == "insufficient_memory"
            assert resident(m) == {0: ["g1"], 1: []}
        assert [d["memory"] for d in m.state()["devices"]] == [d["memory"] for d in before]
        assert m.process("m1", "import")["device_id"] == 0


def test_close_refuses_loads_once_begun_and_leaves_nothing_resident(catalog_factory):
    """``close`` waits for a group held by ``run``; a load asked for meanwhile is refused, so
    nothing is resident (in the state or in a worker) once ``close`` returns; after it, a new
    group or subscriber is refused."""
    import threading

    m, workers = gated(catalog_factory, 3)
    m.load_group("g1", device_id=1)
    release = threading.Event()
    runner = threading.Thread(target=m.run, args=("m1", lambda model, tokenizer: release.wait(30)))
    runner.start()
    closer = threading.Thread(target=m.close)
    try:
        assert wait_for(lambda: any(g["status"] == "in_use" for g in m.state()["groups"]))
        closer.start()
        assert wait_for(lambda: m.closed)  # close has begun: it waits for g1's hold
        with pytest.raises(GpuGroupsError) as e:
            m.load_group("g2", device_id=0)
        assert e.value.code == "invalid_request" and "closed" in e.value.message
    finally:
        release.set()
        runner.join(30)
        closer.join(30)
    s = m.state()
    assert s["closed"] and all(not d["resident_groups"] for d in s["devices"])
    assert [w.resident() for w in workers] == [{}, {}, {}]
    # a change nobody would ever hear of is refused too, not silently kept
    for change in (lambda: m.register_group("later", models=["m1"]), lambda: m.subscribe(print)):
        with pytest.raises(GpuGroupsError) as e:
            change()
        assert e.value.code == "invalid_request" and "closed" in e.value.message
    assert "later" not in m.catalog.groups


FIRST_LOADS = """
import json, sys, threading
import gpugroups as gg
m = gg.Manager(devices="virtual:2x1GiB", catalog=sys.argv[1], progress=False)
out = []
def load():
    try:
        out.append(m.load("tiny-a")["status"])
    except Exception as exc:
        out.append(repr(exc))
threads = [threading.Thread(target=load) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join(120)
m.close()
print(json.dumps(out))
"""


def test_first_loads_from_many_threads_at_once_all_succeed(tiny_catalog_toml):
    """The first loads in a fresh process, from eight threads at once on a multi-device manager
    (whose estimates build models on the meta device in the callers' threads): transformers is
    imported once, under a lock; without it most of them failed with ``ImportError``."""
    import json
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", FIRST_LOADS, str(tiny_catalog_toml)], capture_output=True, text=True, timeout=300, check=True
    )
    statuses = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(statuses) <= {"loaded", "switched", "already_loaded"} and statuses.count("loaded") == 1, statuses


def test_a_load_failed_by_a_lost_worker_keeps_what_the_worker_said():
    """A load whose worker process ended fails as ``load_failed``, its details still naming the
    device and the process's exit code (as the device's other pending calls do)."""
    from gpugroups.catalog import GroupSpec
    from gpugroups.engine.loads import _failure

    ended = GpuGroupsError("host_unavailable", "the worker process of device 1 ended", {"device_id": 1, "exitcode": -9})
    err = _failure(GroupSpec("g", "models", "g", ["m"]), ended)
    assert err.code == "load_failed" and "ended" in err.message
    assert err.details == {"device_id": 1, "exitcode": -9, "group_id": "g", "cause": ended.message}


INTERRUPTED_IMPORT = """
import _thread, sys, threading, time
from gpugroups.engine.estimate import meta_bytes
from gpugroups.localfiles import DEMO_DIR
ctrl_c = threading.Timer(float(sys.argv[1]), _thread.interrupt_main)  # Ctrl-C while the first import runs
ctrl_c.start()
try:
    meta_bytes(DEMO_DIR / "tinygpt2", "float32")  # an estimate: torch and transformers' first import
    print("not-interrupted", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
try:
    ctrl_c.join()
    time.sleep(1)  # an interrupt that came after the import ended lands here
except KeyboardInterrupt:
    pass
print("ok", meta_bytes(DEMO_DIR / "tinygpt2", "float32") > 0)
"""


def test_an_interrupt_during_the_first_import_leaves_torch_whole():
    """Ctrl-C while a kernel's first estimate or load imports torch stops the wait, not the import:
    a torch import cut short could not be done again (the next estimate aborted the process)."""
    import subprocess
    import sys

    said = []
    for after_s in ("0.2", "0.5", "0.8"):  # within torch's import, or later
        run = subprocess.run(
            [sys.executable, "-c", INTERRUPTED_IMPORT, after_s], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, (after_s, run.stderr[-2000:])
        first, *rest = run.stdout.split()
        assert rest == ["ok", "True"], (after_s, run.stdout)
        said.append(first)
    assert "interrupted" in said, said  # at least one Ctrl-C came while the import ran


def test_a_close_interrupted_while_it_waits_is_finished_by_the_next(catalog_factory):
    """Ctrl-C while ``close`` waits for a group held by ``run`` leaves the manager closed but not
    yet stopped; the next ``close`` unloads what is left and stops the workers (it used to return
    at once, leaving groups loaded and worker threads running)."""
    import os
    import signal
    import threading

    before = set(threading.enumerate())
    m, workers = gated(catalog_factory, 2)
    m.load_group("g1", device_id=1)
    release = threading.Event()
    runner = threading.Thread(target=m.run, args=("m1", lambda model, tokenizer: release.wait(30)))
    runner.start()
    assert wait_for(lambda: any(g["status"] == "in_use" for g in m.state()["groups"]))
    ctrl_c = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))  # a real Ctrl-C: it wakes a wait
    ctrl_c.start()
    with pytest.raises(KeyboardInterrupt):
        m.close()  # waits for the run's hold until the interrupt
    ctrl_c.join()
    assert m.closed and workers[1].resident() != {}
    release.set()
    runner.join(30)
    m.close()
    assert [w.resident() for w in workers] == [{}, {}, {}]
    assert wait_for(lambda: not [t for t in set(threading.enumerate()) - before if t.name.startswith("gpugroups-")])
