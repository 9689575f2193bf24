"""Groups sharded over worker processes (``worker="process"``): a device lost while a group sharded
over it loads fails the load and leaves nothing behind, whether it was lost before the load began on
the first device (its pause fails) or while it ran there (the lost device held only a pause: nothing
of the load fails); and a device held by a sharded call shows busy, as with thread workers."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

import gpugroups as gg
from gpugroups.engine.procworker import ProcessWorker
from gpugroups.errors import GpuGroupsError
from tests import tinymodels
from tests.engine.test_procworker import DEVICES, collecting
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(300)


def wait_for_file(model: object, tokenizer: object, flag: str) -> None:
    """``run``'s function: keep the device's worker until ``flag`` exists (it runs in the worker process)."""
    while not os.path.exists(flag):
        time.sleep(0.01)


@pytest.mark.parametrize("when", ["queued", "loading"])
def test_a_device_lost_while_a_sharded_group_loads_fails_the_load_and_frees_everything(
    tiny_catalog_toml: Path, tiny_llama: Path, tmp_path: Path, when: str
) -> None:
    go = tmp_path / "go"
    workers: list[ProcessWorker] = []
    gated = tinymodels.build_gated(tmp_path / "gated", tiny_llama, go)
    m = gg.Manager(devices=DEVICES, catalog=tiny_catalog_toml, worker=collecting(workers), progress=False)
    failed: list[BaseException] = []

    def load() -> None:
        try:
            m.load("gated-1", device_ids=[0, 1])
        except BaseException as exc:
            failed.append(exc)

    busy = threading.Thread()
    try:
        m.register_group("gated", models={"gated-1": gated}, trust_remote_code=True)
        m.load("tiny-gpt2", device_id=0)
        busy = threading.Thread(target=m.run, args=("tiny-gpt2", wait_for_file, str(go)))
        if when == "queued":  # device 0's worker runs it: the sharded load waits behind it
            busy.start()
            assert wait_for(lambda: m.state()["devices"][0]["status"] != "idle")
        loading = threading.Thread(target=load)
        loading.start()
        assert wait_for(lambda: m.state()["devices"][1]["status"] == "loading")
        if when == "loading":  # its from_pretrained waits for the file: the load is under way
            assert wait_for(lambda: m.state()["devices"][0]["status"] == "loading")
            time.sleep(0.5)
        assert not failed
        os.kill(workers[1].pid, signal.SIGKILL)
        assert wait_for(lambda: m.state()["devices"][1]["status"] == "lost")
        if when == "loading":
            time.sleep(0.5)
            assert not failed  # the load is still waiting for the file
        go.touch()
        loading.join(60)
        assert len(failed) == 1 and isinstance(failed[0], GpuGroupsError), failed
        assert failed[0].code == "load_failed" and "device 1 " in failed[0].message
        state = m.state()
        assert [g["status"] for g in state["groups"] if g["id"] == "gated"] == ["unloaded"]
        assert state["devices"][0]["resident_groups"] == ["gpt"]
        assert state["devices"][1]["memory"]["manager_bytes"] == 0
        assert wait_for(lambda: "gated" not in workers[0].resident())  # the process that loaded it all freed it
        assert m.process("gated-1", "def f(")["device_ids"] == [0]  # it loads again where room is alive
    finally:
        go.touch()
        if busy.ident is not None:
            busy.join(60)
        m.close()


def test_a_device_held_by_a_sharded_call_shows_busy_until_it_ends(tiny_catalog_toml: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    m = gg.Manager(devices=DEVICES, catalog=tiny_catalog_toml, worker="process", progress=False)
    try:
        m.load("tiny-a", device_ids=[0, 1])
        running = threading.Thread(target=m.run, args=("tiny-a", wait_for_file, str(go)))
        running.start()
        assert wait_for(lambda: [d["status"] for d in m.state()["devices"]] == ["busy", "busy"])
        time.sleep(0.3)
        assert [d["status"] for d in m.state()["devices"]] == ["busy", "busy"]  # device 1 is held, not idle
        go.touch()
        running.join(60)
        assert wait_for(lambda: [d["status"] for d in m.state()["devices"]] == ["idle", "idle"])
    finally:
        go.touch()
        m.close()
