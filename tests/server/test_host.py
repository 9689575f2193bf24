"""The host policy (``host.py``) with pytest-jupyter's in-process server and real kernels: an
auto-started host serving REST and the socket (on a subshell and on the main-shell fallback) with
the settings that reach it (model roots), an auto host that cannot serve, and the watchdog that
keeps watching the host while another kernel is being attached."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from gpugroups.hostrecord import host_record_path
from gpugroups.protocol import API_PREFIX

from .routes import post, read

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def extra_root(tmp_path: Path, tiny_llama: Path) -> Path:
    """A model folder under a root only the extension's ``model_roots`` setting allows."""
    return Path(shutil.copytree(tiny_llama, tmp_path / "extra-models" / "llama-copy"))


@pytest.fixture
def jp_server_config(request: pytest.FixtureRequest, tiny_env: Path, extra_root: Path) -> dict[str, Any]:
    settings = {
        "host_kernel": "auto",
        "model_roots": [str(extra_root.parent)],
        **getattr(request, "param", {}),
    }
    return {"ServerApp": {"jpserver_extensions": {"gpugroups": True}}, "GpuGroupsHost": settings}


@pytest.mark.parametrize(
    "jp_server_config",
    [{"use_subshells": True}, {"use_subshells": False}],
    indirect=True,
    ids=["subshell", "main-shell"],
)
async def test_rest_and_websocket_through_an_auto_started_host(
    jp_serverapp: Any,
    jp_fetch: Any,
    jp_ws_fetch: Any,
    jp_server_config: dict[str, Any],
    extra_root: Path,
    tmp_path: Path,
) -> None:
    ws = await jp_ws_fetch(API_PREFIX, "ws")
    try:
        first = json.loads(await ws.read_message())  # connecting was the first use: a host started
        assert first["type"] == "system_state" and first["version"] == first["state"]["version"]
        host = json.loads((await jp_fetch(API_PREFIX, "system", "host")).body)
        assert host["kernel_id"] in jp_serverapp.kernel_manager
        assert host["subshells"] is jp_server_config["GpuGroupsHost"]["use_subshells"]
        assert host["started_by"] == "server"

        r = await post(jp_fetch, "models/load", {"model_id": "tiny-b"}, request_timeout=120)
        assert json.loads(r.body)["status"] == "loaded"
        update = await read(
            ws,
            lambda m: (
                m["type"] == "state_update"
                and any(g["id"] == "tiny" and g["resident_on"] for g in m["state"]["groups"])
            ),
        )
        assert update["version"] > first["version"]

        # another client on the host made the usual way (the kernel manager's session, hence its
        # socket identity) connects: the bridge keeps its own identity and keeps answering
        other = jp_serverapp.kernel_manager.get_kernel(host["kernel_id"]).client()
        other.start_channels()
        await other.wait_for_ready(timeout=30)
        r = await post(
            jp_fetch, "models/process", {"model_id": "tiny-b", "prompt": "import"}, request_timeout=20
        )
        assert len(json.loads(r.body)["predictions"]) == 3
        other.stop_channels()

        # a folder under the configured model roots loads by its path; the same model elsewhere does not
        r = await post(jp_fetch, "models/load", {"model_id": str(extra_root)}, request_timeout=60)
        assert json.loads(r.body)["group_id"] == f"single:{extra_root}"
        elsewhere = shutil.copytree(extra_root, tmp_path / "elsewhere" / "llama-copy")
        r = await post(jp_fetch, "models/load", {"model_id": str(elsewhere)})
        assert r.code == 404 and json.loads(r.body)["error"]["code"] == "unknown_model"
    finally:
        ws.close()


async def test_an_auto_host_that_cannot_serve_is_503_and_is_shut_down(
    jp_serverapp: Any, jp_fetch: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text('[groups.x]\nkind = "no-such-kind"\n')
    monkeypatch.setenv("GPUGROUPS_CATALOG", str(broken))  # the host kernel will inherit it
    r = await jp_fetch(API_PREFIX, "system", "state", raise_error=False, request_timeout=120)
    assert r.code == 503
    error = json.loads(r.body)["error"]
    assert error["code"] == "host_unavailable" and "broken.toml" in error["message"], error
    for _ in range(100):
        if not jp_serverapp.kernel_manager.list_kernel_ids():
            break
        await asyncio.sleep(0.1)
    assert jp_serverapp.kernel_manager.list_kernel_ids() == []


@pytest.mark.parametrize("jp_server_config", [{"host_kernel": "none", "use_subshells": False}], indirect=True)
async def test_the_host_is_watched_while_another_kernel_is_being_attached(
    jp_serverapp: Any, jp_fetch: Any, jp_ws_fetch: Any
) -> None:
    # A notebook runs gg.serve() and then a long cell: on the main shell its attach waits for the
    # cell. Meanwhile the current host dies, and that must still be noticed (and announced) at once.
    km = jp_serverapp.kernel_manager
    first = await km.start_kernel()
    r = await post(jp_fetch, "system/host", {"kernel_id": first}, request_timeout=120)
    assert r.code == 200, r.body
    ws = await jp_ws_fetch(API_PREFIX, "ws")
    await read(ws, lambda m: m["type"] == "system_state")
    second = await km.start_kernel()
    cell = km.get_kernel(second).client()
    cell.start_channels()
    try:
        await cell.wait_for_ready(timeout=60)
        record = host_record_path()
        before = record.stat().st_mtime_ns if record.exists() else None
        cell.execute("import time, gpugroups as gg\ngg.serve(gg.Manager(devices='cpu', catalog=[]))\ntime.sleep(30)")
        for _ in range(600):  # the record names the second kernel: its attach starts, and waits
            if record.exists() and record.stat().st_mtime_ns != before:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        os.kill(km.get_kernel(first).provisioner.pid, signal.SIGKILL)
        message = await asyncio.wait_for(read(ws, lambda m: m["type"] == "error"), 2.0)
        assert message["error"]["code"] == "host_unavailable" and first in message["error"]["message"]
    finally:
        await km.interrupt_kernel(second)
        cell.stop_channels()


KERNEL_ACTIONS = "https://events.jupyter.org/jupyter_server/kernel_actions/v1"


@pytest.mark.parametrize(
    "jp_server_config", [{"host_start_timeout": 30.0, "kernel_name": "gpugroups-slow-start"}], indirect=True
)
async def test_a_client_that_gives_up_does_not_stop_the_host_start(
    jp_serverapp: Any, slow_start_kernel: str, jp_fetch: Any
) -> None:
    """The first request starts the auto host, whose kernel stalls 3 s in its start; its client
    gives up after 1 s. That cancels the client's wait, not the start: the next request is served
    by that same kernel, the only one started."""
    from tornado.httpclient import HTTPClientError

    started: list[str] = []

    async def on_kernel_action(logger: Any, schema_id: str, data: dict[str, Any]) -> None:
        if data.get("action") == "start" and data.get("status") == "success":
            started.append(data["kernel_id"])

    jp_serverapp.event_logger.add_listener(schema_id=KERNEL_ACTIONS, listener=on_kernel_action)
    with pytest.raises(HTTPClientError) as gave_up:
        await jp_fetch(API_PREFIX, "system", "state", request_timeout=1.0)
    assert gave_up.value.code == 599  # the client's own timeout
    r = await jp_fetch(API_PREFIX, "system", "state", raise_error=False, request_timeout=60)
    assert r.code == 200, r.body
    host = json.loads((await jp_fetch(API_PREFIX, "system", "host")).body)
    assert started == [host["kernel_id"]]
