"""The server extension with Ray devices, end to end: a real ``jupyter server`` whose auto-started
host kernel's manager uses ``ray:virtual:512MiB`` on the session's local Ray cluster (two nodes of two
simulated GPUs, ``tests/raycluster.py``), configured only through ``c.GpuGroupsHost.*``.

REST, the WebSocket and the panel in the host kernel show the Ray devices with their node and host;
loads and forward passes run on them; a host kernel restarted through Jupyter's REST API adopts
the groups its actors still hold, so nothing is loaded again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpugroups import GpuGroupsError
from gpugroups.server.openapi import build_spec
from tests.contract import check
from tests.raycluster import SPEC, RayCluster, end_namespace, namespace
from tests.waiting import wait_for

from .conftest import LiveServer
from .test_end_to_end import Events, resident

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, tiny_catalog_toml: Path, ray_cluster: RayCluster
) -> Iterator[LiveServer]:
    """A server whose auto-started host kernel drives the Ray cluster in a namespace of its own;
    afterwards that namespace is emptied, so the GPUs are free for the next test's manager."""
    ns = namespace()
    server = LiveServer(
        tmp_path_factory.mktemp("ray-live"),
        tiny_catalog_toml,
        [
            "--GpuGroupsHost.host_kernel=auto",
            f"--GpuGroupsHost.devices={SPEC}",
            f"--GpuGroupsHost.ray_address={ray_cluster.address}",
            f"--GpuGroupsHost.ray_namespace={ns}",
            "--ServerApp.log_level=DEBUG",
            "--GpuGroupsApp.log_level=DEBUG",
        ],
    )
    try:
        yield server
        host = server.client().host()["kernel_id"]
        if host is not None:
            kernel = server.kernel(host)
            try:
                kernel.run("import gpugroups as gg; gg.manager().close()")
            finally:
                kernel.close()
    finally:
        server.stop()
        assert end_namespace(ns), "actors of the host kernel's namespace outlived the test"


@pytest.fixture
def events(live: LiveServer) -> Iterator[Events]:
    ev = Events(live.client())
    yield ev
    ev.close()


def host_run(live: LiveServer, code: str) -> Any:
    """Run ``code`` in the host kernel as a cell; the JSON value of its ``out``."""
    kernel = live.kernel(live.client().host()["kernel_id"])
    try:
        return kernel.run(code)
    finally:
        kernel.close()


def test_rest_the_websocket_and_the_panel_show_ray_devices_and_run_on_them(
    live: LiveServer, events: Events, ray_cluster: RayCluster
) -> None:
    state = live.get("/api/v2/system/state").json()
    check(build_spec("/"), "State", state)
    devices = state["devices"]
    assert [d["device"] for d in devices] == ["ray:0", "ray:1", "ray:2", "ray:3"]
    assert {d["host"] for d in devices} == {"127.0.0.1"}
    nodes = [d["node"] for d in devices]
    assert len(set(nodes)) == 2 and ray_cluster.second.node_id in nodes
    far = nodes.index(ray_cluster.second.node_id)

    loaded = live.post("/api/v2/models/load", {"model_id": "tiny-a", "device_id": far})
    assert loaded.ok, loaded.text
    assert loaded.json()["status"] == "loaded" and loaded.json()["device_id"] == far
    answer = live.post("/api/v2/models/process", {"model_id": "tiny-b", "prompt": "the cat", "num_predictions": 3})
    assert answer.ok, answer.text
    assert answer.json()["device_id"] == far and len(answer.json()["predictions"]) == 3

    # the socket carries the load's progress from the remote device and the state with the group on it
    events.wait_for(lambda m: m["type"] == "load_progress" and m["device_id"] == far, timeout=10)
    _, update = events.wait_for(
        lambda m: m["type"] in ("state_update", "system_state") and resident(m["state"], "tiny"), timeout=10
    )
    assert [d["node"] for d in update["state"]["devices"]] == nodes

    # the panel in the host kernel renders the same devices, the group on the far node's card
    panel = host_run(live, "import gpugroups as gg; p = gg.panel(); out = p.state; p.close()")
    assert [(d["device"], d["node"], d["host"]) for d in panel["devices"]] == [
        (d["device"], d["node"], d["host"]) for d in devices
    ]
    assert panel["devices"][far]["resident_groups"] == ["tiny"]


def test_a_restarted_host_adopts_its_ray_models(live: LiveServer, events: Events) -> None:
    client = live.client()
    if not resident(client.state(), "tiny"):  # when run alone
        client.load("tiny-a")
    before = client.state()
    where = next(g["resident_on"] for g in before["groups"] if g["id"] == "tiny")
    expected = client.process("tiny-b", "adopt me", num_predictions=3)["predictions"]
    host = client.host()
    pid = host_run(live, "import os; out = os.getpid()")

    assert live.post(f"/api/kernels/{host['kernel_id']}/restart").ok

    def attached() -> bool:
        try:
            client.state()
        except GpuGroupsError as exc:  # 503 until the restarted kernel is attached again
            assert exc.code == "host_unavailable", exc
            return False
        return True

    assert wait_for(attached, 120, every=0.5), "the restarted host was not attached again"
    assert client.host() == host  # the same kernel, attached again
    assert host_run(live, "import os; out = os.getpid()") != pid  # in a new process
    after = client.state()
    assert next(g["resident_on"] for g in after["groups"] if g["id"] == "tiny") == where
    assert after["operations"] == []
    assert [d["node"] for d in after["devices"]] == [d["node"] for d in before["devices"]]

    asked = len(events.messages)
    load = client.load("tiny-a")
    assert load["status"] == "already_loaded" and load["device_ids"] == where
    assert client.process("tiny-b", "adopt me", num_predictions=3)["predictions"] == expected
    assert not any(m["type"] == "load_progress" for _, m in events.messages[asked:])
