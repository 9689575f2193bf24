"""The state JSON built from residency, and the events that carry it."""

from __future__ import annotations

import time

from tests.engine.gated import wait_for


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
