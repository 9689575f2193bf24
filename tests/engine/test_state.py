"""The state JSON built from residency, and the events that carry it."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest

import gpugroups as gg
from gpugroups.catalog import Catalog, GroupSpec
from gpugroups.engine import state as state_module
from gpugroups.engine.state import States, render, snapshot
from gpugroups.schema import State
from tests.waiting import wait_for


def test_state_json_shape_and_consistency(m):
    m.load("tiny-gpt2")
    s = m.state()
    assert set(s) == {"version", "num_devices", "devices", "groups", "models", "operations", "closed"}
    d = s["devices"][0]
    assert set(d) == {"device_id", "device", "kind", "name", "memory", "current_group", "resident_groups",
                      "loaded_models", "status", "queue_depth"}
    assert set(d["memory"]) == {"total_bytes", "used_bytes", "free_bytes", "budget_bytes", "manager_bytes", "other_bytes"}
    assert d["resident_groups"] == ["gpt"] and d["loaded_models"] == ["tiny-gpt2"]
    groups = {g["id"]: g for g in s["groups"]}
    assert set(groups["gpt"]) >= {"memory_estimate_bytes", "measured_bytes", "pinned", "resident_on", "status", "current_model"}
    assert groups["gpt"]["measured_bytes"] > 0 and groups["tiny"]["measured_bytes"] is None
    assert groups["gpt"]["resident_on"] == [0] and groups["tiny"]["resident_on"] == []
    assert groups["tiny"]["models"] == ["tiny-base", "tiny-a", "tiny-b"]
    assert all(g["memory_estimate_bytes"] > 0 for g in groups.values())
    models = {x["id"]: x for x in s["models"]}
    assert models["tiny-gpt2"]["is_loaded"] and not models["tiny-a"]["is_loaded"]
    assert s["operations"] == []
    m.unload("tiny-gpt2")
    s = m.state()
    assert s["devices"][0]["resident_groups"] == [] and s["devices"][0]["memory"]["manager_bytes"] == 0


def test_events_follow_every_change_in_order(m):
    events: list[dict] = []
    unsubscribe = m.subscribe(events.append)
    m.load("tiny-a")
    m.load("tiny-b")
    m.unload_group("tiny")
    assert wait_for(lambda: events and events[-1]["version"] == m.version)
    assert not events[-1]["state"]["devices"][0]["resident_groups"]
    versions = [e["version"] for e in events]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    progress = [e for e in events if e["type"] == "load_progress"]
    assert progress and progress[-1]["progress"] == 1.0 and progress[0]["group_id"] == "tiny"
    states = [e["state"] for e in events if e["type"] == "state_update"]
    assert any(s["operations"] for s in states), "a load shows as an operation while it runs"
    unsubscribe()
    n = len(events)
    m.load("tiny-gpt2")
    time.sleep(0.2)
    assert len(events) == n


def test_event_state_equals_state_read_of_the_same_version(m):
    """The state built on the event thread from a snapshot is the one ``state()`` reads."""
    m.state()  # every group estimated (before, a group not yet estimated shows 0)
    events: list[dict] = []
    m.subscribe(events.append)
    m.load("tiny-a")
    m.pin("tiny")
    m.load("tiny-b")
    assert wait_for(lambda: events and events[-1]["version"] == m.version)
    last = events[-1]
    now = m.state()
    # the cpu device's free and other bytes are read from the machine at each build: they move
    # between two builds of one version; everything else, this manager's bytes included, may not
    assert last["type"] == "state_update" and _steady(last["state"]) == _steady(now)
    groups = {g["id"]: g for g in last["state"]["groups"]}
    assert groups["tiny"]["pinned"] and groups["tiny"]["current_model"] == "tiny-b"
    assert last["state"]["devices"][0]["current_group"] == {"id": "tiny", "name": groups["tiny"]["name"], "model": "tiny-b"}


def test_estimates_a_state_read_computes_reach_subscribers_with_a_new_version(m):
    """``state()`` estimates the groups not yet estimated: the state it answers is a new version,
    and subscribers (the server's mirror, the panel) get it, not 0 bytes under the same version."""
    events: list[dict] = []
    m.subscribe(events.append)
    m.load("tiny-a")  # estimates its own group only
    assert wait_for(lambda: events and events[-1]["version"] == m.version)
    before = events[-1]
    assert {g["id"]: g["memory_estimate_bytes"] for g in before["state"]["groups"]}["gpt"] == 0
    now = m.state()
    assert now["version"] > before["version"]
    assert wait_for(lambda: events[-1]["version"] == now["version"])
    assert _steady(events[-1]["state"]) == _steady(now)
    assert {g["id"]: g["memory_estimate_bytes"] for g in now["groups"]}["gpt"] > 0
    assert m.state()["version"] == now["version"]  # nothing new to estimate: no new version


def test_the_event_an_answer_makes_shows_its_device_idle(m):
    """A worker frees its device before it answers, so the state a finished load or unload makes
    (and its event: the last until the next change) shows the device idle, not still busy."""
    events: list[dict] = []
    m.subscribe(events.append)
    for step in (lambda: m.load_group("gpt"), lambda: m.unload_group("gpt"), lambda: m.load("tiny-a")):
        step()
        assert wait_for(lambda: events and events[-1]["version"] == m.version)
        last = [e for e in events if e["type"] == "state_update"][-1]
        device = last["state"]["devices"][0]
        assert (device["status"], device["queue_depth"]) == ("idle", 0), step


def _steady(state: dict) -> dict:
    """``state`` less what is read from the machine at each build: the cpu device's free and
    other bytes move between two builds of one version; everything else, this manager's bytes
    included, may not."""
    devices = [
        {**d, "memory": {k: v for k, v in d["memory"].items() if k not in ("used_bytes", "free_bytes", "other_bytes")}}
        for d in state["devices"]
    ]
    return {**state, "devices": devices}


def _follow(mgr: gg.Manager, steps: list[Callable[[], object]]) -> State:
    """Run ``steps``; after each, build the state of the manager's snapshot with one ``States``
    (from the changes since its last state) and with ``render`` (afresh): they must agree."""
    states = States()
    for step in steps:
        step()
        with mgr._lock:
            snap = snapshot(mgr._res, mgr.version)
        assert _steady(states.render(snap)) == _steady(render(snap))
    return render(snap)


def test_states_built_from_the_changes_equal_states_built_afresh(m, tiny_llama):
    """Through loads, switches, pins, a growing catalog, unloads and a close."""
    last = _follow(m, [
        lambda: None, lambda: m.load("tiny-a"), lambda: m.load("tiny-b"), lambda: m.pin("tiny"),
        lambda: m.load("tiny-gpt2"), lambda: m.unpin("tiny"), lambda: m.load("tiny-base"),
        lambda: m.register_group("late", models={"late": str(tiny_llama)}), lambda: m.load("late"),
        lambda: m.unload_group("tiny"), lambda: m.load("tiny-b"), lambda: m.unload("tiny-gpt2"), m.close,
    ])
    assert [g["id"] for g in last["groups"]] == ["tiny", "gpt", "late"] and last["closed"]


def test_a_state_that_failed_to_build_is_built_whole_next_time(m, monkeypatch):
    """A failure half way (the bus logs it and goes on) leaves no stale entry behind."""
    states = States()

    def snap_now():
        with m._lock:
            return snapshot(m._res, m.version)

    states.render(snap_now())
    m.load("tiny-a")
    changed = snap_now()
    with monkeypatch.context() as patched:
        patched.setattr(state_module, "_group_json", lambda snap, g: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            states.render(changed)
    assert _steady(states.render(changed)) == _steady(render(changed))


def test_states_built_from_the_changes_drop_a_forgotten_group(tmp_path, tiny_gpt2):
    """A group leaving the catalog changes no slot, pin or estimate: the catalog's revision tells."""
    folders = []
    for name in ("m0", "m1"):
        shutil.copytree(tiny_gpt2, tmp_path / name)
        folders.append(str(tmp_path / name))
    with gg.Manager(devices="cpu", catalog=Catalog(roots=[tmp_path])) as mgr:
        last = _follow(mgr, [
            lambda: mgr.load(folders[0]), lambda: mgr.unload(folders[0]), lambda: mgr.load(folders[1]),
            lambda: mgr.catalog.forget(f"single:{folders[0]}"),
        ])
    assert [g["id"] for g in last["groups"]] == [f"single:{folders[1]}"]


def _visits_under_lock(mgr: gg.Manager, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count catalog groups walked (``GroupSpec.to_json``, iterating ``catalog.groups``) while
    ``mgr``'s lock is held by the walking thread: the work a switch does under the lock."""
    visits = [0]

    class CountingGroups(dict):
        def values(self):  # type: ignore[override]
            if mgr._lock._is_owned():  # type: ignore[attr-defined]
                visits[0] += len(self)
            return super().values()

    to_json = GroupSpec.to_json

    def counted(self: GroupSpec) -> dict:
        if mgr._lock._is_owned():  # type: ignore[attr-defined]
            visits[0] += 1
        return to_json(self)

    monkeypatch.setattr(GroupSpec, "to_json", counted)
    mgr.catalog.groups = CountingGroups(mgr.catalog.groups)
    return visits


@pytest.mark.parametrize("extra", [0, 200])
def test_a_switch_does_not_walk_the_catalog_under_the_lock(tiny_catalog_toml, tiny_llama, extra, monkeypatch):
    with gg.Manager(devices="cpu", catalog=tiny_catalog_toml) as mgr:
        for i in range(extra):
            mgr.register_group(f"extra{i}", models={f"extra{i}": str(tiny_llama)})
        events: list[dict] = []
        mgr.subscribe(events.append)
        mgr.load("tiny-a")
        visits = _visits_under_lock(mgr, monkeypatch)
        for member in ("tiny-b", "tiny-a", "tiny-base"):
            mgr.load(member)
        mgr.state()
        assert wait_for(lambda: events and events[-1]["version"] == mgr.version)
        assert visits[0] == 0
        assert len(events[-1]["state"]["groups"]) == 2 + extra, "the state still lists the whole catalog"


@pytest.mark.parametrize("extra", [0, 200])
def test_a_switch_event_builds_the_switched_group_only(tiny_catalog_toml, tiny_llama, extra, monkeypatch):
    """A switch's event carries the whole state, but the event thread builds the JSON of the one
    group that changed (its current member) and keeps the rest: the same work for any catalog."""
    with gg.Manager(devices="cpu", catalog=tiny_catalog_toml) as mgr:
        for i in range(extra):
            mgr.register_group(f"extra{i}", models={f"extra{i}": str(tiny_llama)})
        mgr.state()  # every group estimated now, so that no estimate arrives during the switches
        events: list[dict] = []
        mgr.subscribe(events.append)
        mgr.load("tiny-a")
        assert wait_for(lambda: events and events[-1]["version"] == mgr.version)
        built: list[str] = []
        to_json = GroupSpec.to_json

        def counted(self: GroupSpec) -> dict:
            if threading.current_thread().name == "gpugroups-events":
                built.append(self.id)
            return to_json(self)

        monkeypatch.setattr(GroupSpec, "to_json", counted)
        for member in ("tiny-b", "tiny-a", "tiny-base"):
            mgr.load(member)
        assert wait_for(lambda: events[-1]["version"] == mgr.version)
        assert built == ["tiny"] * 3
        groups = {g["id"]: g for g in events[-1]["state"]["groups"]}
        assert len(groups) == 2 + extra and groups["tiny"]["current_model"] == "tiny-base"
        assert _steady(events[-1]["state"]) == _steady(mgr.state())


def test_a_device_that_goes_idle_after_an_event_showed_it_at_work_says_so(held):
    """An event made while a request waited or ran shows its device busy; going idle is no event
    of its own, so subscribers (the server's mirror, the panel) showed it busy until the next
    change. The request's end now makes one more event when the last one showed the device at work."""
    m, worker = held
    m.load("tiny-gpt2")
    events: list[dict] = []
    m.subscribe(events.append)
    gate = worker.hold()
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(m.process, "tiny-gpt2", "def f(")
        assert wait_for(lambda: m.state()["devices"][0]["queue_depth"] == 2)
        m.pin("gpt")  # a change while the request waits (no load): its event shows the device at work
        assert wait_for(lambda: events and events[-1]["version"] == m.version)
        shown = events[-1]["state"]["devices"][0]
        assert (shown["status"], shown["queue_depth"]) != ("idle", 0)
        gate.set()
        answer.result(timeout=60)
    now = m.state()["devices"][0]
    assert (now["status"], now["queue_depth"]) == ("idle", 0)
    assert wait_for(lambda: events[-1]["version"] == m.version)
    last = events[-1]["state"]["devices"][0]
    assert (last["status"], last["queue_depth"]) == ("idle", 0)
