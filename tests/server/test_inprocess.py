"""pytest-jupyter's in-process server with real kernels: ``jp_fetch`` and ``jp_ws_fetch`` through
an auto-started host, on a subshell and on the main-shell fallback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gpugroups.protocol import API_PREFIX

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(params=[True, False], ids=["subshell", "main-shell"])
def jp_server_config(request: pytest.FixtureRequest, tiny_env: Path) -> dict[str, Any]:
    return {
        "ServerApp": {"jpserver_extensions": {"gpugroups": True}},
        "GpuGroupsApp": {"host_kernel": "auto", "use_subshells": request.param},
    }


async def read(ws: Any, pred: Any) -> dict[str, Any]:
    while True:
        message = json.loads(await ws.read_message())
        if pred(message):
            return message


async def test_rest_and_websocket_through_an_auto_started_host(
    jp_serverapp: Any, jp_fetch: Any, jp_ws_fetch: Any, jp_server_config: dict[str, Any]
) -> None:
    ws = await jp_ws_fetch(API_PREFIX, "ws")
    try:
        first = json.loads(await ws.read_message())  # connecting was the first use: a host started
        assert first["type"] == "system_state" and first["version"] == first["state"]["version"]
        host = json.loads((await jp_fetch(API_PREFIX, "system", "host")).body)
        assert host["kernel_id"] in jp_serverapp.kernel_manager
        assert host["subshells"] is jp_server_config["GpuGroupsApp"]["use_subshells"]
        assert host["started_by"] == "server"

        r = await jp_fetch(
            API_PREFIX, "models", "load", method="POST", body=json.dumps({"model_id": "tiny-b"}), request_timeout=120
        )
        assert json.loads(r.body)["status"] == "loaded"
        update = await read(ws, lambda m: m["type"] == "state_update" and any(g["id"] == "tiny" and g["resident_on"] for g in m["state"]["groups"]))
        assert update["version"] > first["version"]
        # another client on the host made the usual way (the kernel manager's session, hence its
        # socket identity) connects: the bridge keeps its own identity and keeps answering
        other = jp_serverapp.kernel_manager.get_kernel(host["kernel_id"]).client()
        other.start_channels()
        await other.wait_for_ready(timeout=30)
        r = await jp_fetch(
            API_PREFIX, "models", "process", method="POST", body=json.dumps({"model_id": "tiny-b", "prompt": "import"}),
            request_timeout=20,
        )
        assert len(json.loads(r.body)["predictions"]) == 3
        other.stop_channels()
    finally:
        ws.close()
