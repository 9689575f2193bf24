"""Loads that overlap on one device: a group being unloaded to make room for one load no longer
counts beside that load's reservation, so another load admitted meanwhile is not judged out of
memory (it was, with a negative room, or it evicted the group just loaded), and no state shows the
device over its budget."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import gpugroups as gg
from tests.engine.gated import gated_manager
from tests.waiting import wait_for

MIB = 1 << 20


def test_a_load_admitted_while_another_evicts_for_its_room_counts_each_byte_once(
    tiny_llama: Path, tiny_gpt2: Path, deep_llama: tuple[Path, Path], tmp_path: Path
) -> None:
    big = deep_llama[0]
    twin = Path(shutil.copytree(big, tmp_path / "deep-twin"))  # another group of the same size
    groups = {"small": tiny_gpt2, "lb": big, "mi": twin, "g2": tiny_llama}
    with gg.Manager(devices="virtual:1GiB", catalog=[], progress=False) as probe:
        for gid, folder in groups.items():
            probe.register_group(gid, models={f"{gid}-m": folder})
        need = {g["id"]: g["memory_estimate_bytes"] for g in probe.groups()}
    # room for small + lb + g2 or small + g2 + mi, never for lb and mi together
    budget = need["small"] + need["g2"] + need["lb"] + need["lb"] // 2
    m, workers = gated_manager(devices=f"virtual:1x{budget}B", catalog=[], progress=False)
    try:
        for gid, folder in groups.items():
            m.register_group(gid, models={f"{gid}-m": folder})
        over: list[tuple[int, int]] = []

        def watch(event: dict[str, Any]) -> None:
            if event["type"] == "state_update":
                memory = event["state"]["devices"][0]["memory"]
                if memory["manager_bytes"] > memory["budget_bytes"]:
                    over.append((event["version"], memory["manager_bytes"]))

        m.subscribe(watch)
        m.pin("small")
        m.load("lb-m")
        gate = workers[0].hold()
        answers: dict[str, Any] = {}

        def call(name: str, fn: Any, *args: Any) -> threading.Thread:
            def go() -> None:
                try:
                    answers[name] = fn(*args)
                except gg.GpuGroupsError as exc:
                    answers[name] = f"{exc.code}: {exc.message}"

            t = threading.Thread(target=go)
            t.start()
            return t

        a = call("g2", m.load, "g2-m")  # fits beside lb: queued behind the hold
        assert wait_for(lambda: any(g["id"] == "g2" and g["status"] == "loading" for g in m.state()["groups"]))
        b = call("mi", m.pin, "mi")  # evicts lb (its unload queued after g2's load), then loads
        assert wait_for(lambda: any(g["id"] == "lb" and g["status"] == "unloading" for g in m.state()["groups"]))
        gate.set()
        a.join(60)
        b.join(60)
        assert all(isinstance(answers[k], dict) for k in ("g2", "mi")), answers
        assert answers["g2"]["status"] == "loaded" and answers["mi"]["pinned"] is True, answers
        state = m.state()
        assert sorted(state["devices"][0]["resident_groups"]) == ["g2", "mi", "small"]
        assert state["devices"][0]["memory"]["manager_bytes"] <= budget
        assert over == [], f"states over the {budget / MIB:.1f} MiB budget: {over}"
    finally:
        m.close()
