"""pytest-jupyter's in-process server with real kernels: ``jp_fetch`` and ``jp_ws_fetch`` through
an auto-started host, on a subshell and on the main-shell fallback, the extension's settings
that reach that host (model roots) or bound its answers (request timeout), and attaching a host
that is slow to start, restarts meanwhile, or attaches while the current host dies."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from gpugroups.kernel import host_record_path
from gpugroups.protocol import API_PREFIX

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
    return {"ServerApp": {"jpserver_extensions": {"gpugroups": True}}, "GpuGroupsApp": settings}


async def read(ws: Any, pred: Any) -> dict[str, Any]:
    while True:
        message = json.loads(await ws.read_message())
        if pred(message):
            return message


async def post(jp_fetch: Any, path: str, body: dict[str, Any], **kwargs: Any) -> Any:
    return await jp_fetch(API_PREFIX, path, method="POST", body=json.dumps(body), raise_error=False, **kwargs)


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
        assert host["subshells"] is jp_server_config["GpuGroupsApp"]["use_subshells"]
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


@pytest.mark.parametrize("jp_server_config", [{"request_timeout": 1.0, "use_subshells": False}], indirect=True)
async def test_an_answer_later_than_the_request_timeout_is_504(jp_serverapp: Any, jp_fetch: Any) -> None:
    # An answer that is really late: on the main shell (no subshell) the request queues behind a
    # running cell. (A tiny timeout alone is no proof: a reply that is in by the time the timer
    # fires is still answered, and on a loaded machine the host often is that quick.)
    km = jp_serverapp.kernel_manager
    kernel_id = await km.start_kernel()
    r = await post(jp_fetch, "system/host", {"kernel_id": kernel_id}, request_timeout=120)
    assert r.code == 200 and json.loads(r.body)["subshells"] is False, r.body
    cell = km.get_kernel(kernel_id).client()
    cell.start_channels()
    try:
        await cell.wait_for_ready(timeout=60)
        msg_id = cell.execute("import time; time.sleep(120)")
        while True:  # the cell runs: the main shell takes nothing else until it ends
            msg = await cell.get_iopub_msg(timeout=60)
            if msg["msg_type"] == "execute_input" and msg["parent_header"].get("msg_id") == msg_id:
                break
        r = await jp_fetch(API_PREFIX, "system", "state", raise_error=False, request_timeout=60)
        assert r.code == 504
        assert json.loads(r.body)["error"]["code"] == "timeout"
    finally:
        await km.interrupt_kernel(kernel_id)
        cell.stop_channels()


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


@pytest.fixture
def slow_start_kernel(jp_data_dir: Path) -> str:
    """The ``gpugroups-slow-start`` kernel spec (``slowkernel.SlowStartKernel``) for this server."""
    spec = jp_data_dir / "kernels" / "gpugroups-slow-start"
    spec.mkdir(parents=True)
    repo = Path(__file__).resolve().parents[2]
    argv = [
        sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
        "--IPKernelApp.kernel_class=tests.server.slowkernel.SlowStartKernel",
    ]  # fmt: skip
    kernel = {"argv": argv, "display_name": "slow start", "language": "python", "env": {"PYTHONPATH": str(repo)}}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    return spec.name


@pytest.mark.parametrize(
    "jp_server_config", [{"host_start_timeout": 30.0, "kernel_name": "gpugroups-slow-start"}], indirect=True
)
async def test_a_host_kernel_slow_to_start_still_becomes_the_host(slow_start_kernel: str, jp_fetch: Any) -> None:
    # The auto-started host answers kernel_info on control seconds before it can create a
    # subshell: the bridge asks again instead of waiting out the host start timeout.
    r = await jp_fetch(API_PREFIX, "system", "state", raise_error=False, request_timeout=60)
    assert r.code == 200, r.body
    r = await jp_fetch(API_PREFIX, "system", "host", method="GET")
    assert json.loads(r.body)["subshells"] is True


@pytest.mark.parametrize(
    "jp_server_config", [{"host_start_timeout": 60.0, "host_kernel": "none"}], indirect=True
)
async def test_a_kernel_restarted_while_it_is_attached_fails_the_attach_at_once(
    jp_serverapp: Any, slow_start_kernel: str, jp_fetch: Any
) -> None:
    km = jp_serverapp.kernel_manager
    kernel_id = await km.start_kernel(kernel_name=slow_start_kernel)
    attach = asyncio.ensure_future(post(jp_fetch, "system/host", {"kernel_id": kernel_id}, request_timeout=90))
    await asyncio.sleep(1.0)  # the kernel stalls in its start: the attach is waiting on it
    assert not attach.done()
    await km.restart_kernel(kernel_id)
    restarted = asyncio.get_running_loop().time()
    r = await attach
    assert r.code == 503, r.body
    error = json.loads(r.body)["error"]
    assert error["code"] == "host_unavailable" and kernel_id in error["message"], error
    assert asyncio.get_running_loop().time() - restarted < 5.0, error  # not the 60 s start timeout
    r = await jp_fetch(API_PREFIX, "system", "host", method="GET")
    assert json.loads(r.body)["kernel_id"] is None


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
