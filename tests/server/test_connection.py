"""One kernel connection (``connection.py``): requests matched to their replies, a closed
connection, a stale subshell after a restart, the request timeout, and attaching a kernel that is
slow to start or restarts meanwhile. Real kernels from pytest-jupyter's in-process server.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gpugroups.errors import GpuGroupsError
from gpugroups.protocol import API_PREFIX
from gpugroups.server.connection import KernelConnection

from .routes import post

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def jp_server_config(request: pytest.FixtureRequest, tiny_env: Path) -> dict[str, Any]:
    settings = {"host_kernel": "auto", **getattr(request, "param", {})}
    return {"ServerApp": {"jpserver_extensions": {"gpugroups": True}}, "GpuGroupsHost": settings}


class Recorder:
    """What a connection hands its owner: pushed events and the reasons it broke."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.broken: list[str] = []

    def connect(self, km: Any, kernel_id: str, **options: Any) -> KernelConnection:
        return KernelConnection(
            km, kernel_id, lambda _c, e: self.events.append(e), lambda _c, r: self.broken.append(r), **options
        )


async def until(pred: Any, timeout: float = 30) -> None:
    """Wait for ``pred()`` to hold (the loop keeps running the connection's readers meanwhile)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("direct_line", [True, False], ids=["direct-line", "comm"])
@pytest.mark.parametrize("jp_server_config", [{"host_kernel": "none"}], indirect=True)
async def test_concurrent_requests_get_their_own_replies_and_events_flow(jp_serverapp: Any, direct_line: bool) -> None:
    km = jp_serverapp.kernel_manager
    kernel_id = await km.start_kernel()
    seen = Recorder()
    conn = seen.connect(km, kernel_id, direct_line=direct_line)
    await conn.attach(120)
    try:
        assert conn.subshells and conn.pid == km.get_kernel(kernel_id).provisioner.pid
        assert (conn.line is not None) is direct_line
        groups, state, missing = await asyncio.gather(
            conn.request("groups", {}, 60),
            conn.request("state", {}, 60),
            conn.request("load", {"model_id": "no-such-model"}, 60),
            return_exceptions=True,
        )
        assert isinstance(groups, list) and any(g["id"] == "tiny" for g in groups), groups
        assert isinstance(state, dict) and state["version"] >= 0 and "devices" in state, state
        assert isinstance(missing, GpuGroupsError) and missing.code == "unknown_model", missing
        result = await conn.request("load", {"model_id": "tiny-b"}, 120)
        assert result["status"] == "loaded"
        await until(
            lambda: any(
                e["type"] == "state_update" and any(g["id"] == "tiny" and g["resident_on"] for g in e["state"]["groups"])
                for e in seen.events
            )
        )
        assert all(e["type"] in ("state_update", "load_progress") for e in seen.events), seen.events
    finally:
        await conn.close("the test is over")
    with pytest.raises(GpuGroupsError) as exc:
        await conn.request("state", {}, 5)
    assert exc.value.code == "host_unavailable" and kernel_id in exc.value.message
    assert seen.broken == []  # closing on purpose is no break


@pytest.mark.parametrize("jp_server_config", [{"host_kernel": "none"}], indirect=True)
async def test_a_stale_subshell_after_a_restart_breaks_the_connection(jp_serverapp: Any) -> None:
    km = jp_serverapp.kernel_manager
    kernel_id = await km.start_kernel()
    seen = Recorder()
    conn = seen.connect(km, kernel_id, direct_line=False)  # the comm's requests go to the subshell
    await conn.attach(120)
    try:
        await km.restart_kernel(kernel_id)
        # the new process knows no subshell of ours: ipykernel answers on shell with an error
        pending = asyncio.ensure_future(conn.request("state", {}, 60))
        await until(lambda: len(seen.broken) == 2, timeout=60)
        # first the kernel's own announcement (its shutdown_reply on IOPub), then the stale subshell
        assert seen.broken == ["the kernel is restarting", "the kernel restarted (its subshell is gone)"]
        assert conn.restarting
        assert not pending.done()  # the owner (the host policy) closes it and fails what waits
        await conn.close(seen.broken[0])
        with pytest.raises(GpuGroupsError) as exc:
            await pending
        assert exc.value.code == "host_unavailable"
    finally:
        await conn.close("the test is over")


@pytest.mark.parametrize(
    "jp_server_config", [{"request_timeout": 1.0, "use_subshells": False, "direct_line": False}], indirect=True
)
async def test_an_answer_later_than_the_request_timeout_is_504(jp_serverapp: Any, jp_fetch: Any) -> None:
    # An answer that is really late: on the main shell (no subshell, no direct line) the request
    # queues behind a running cell. (A tiny timeout alone is no proof: a reply that is in by the time the timer
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


@pytest.mark.parametrize("jp_server_config", [{"host_kernel": "none"}], indirect=True)
async def test_moving_the_host_cancels_what_ran_there_for_callers_it_failed(
    jp_serverapp: Any, jp_fetch: Any
) -> None:
    """``POST /system/host`` to another kernel answers the requests in flight 503; the kernel that
    stays behind (a notebook's) must not go on with them for nobody: they are cancelled there.
    Its device is held by a ``use`` block meanwhile, so the requests wait in its queue."""
    km = jp_serverapp.kernel_manager
    first, second = await km.start_kernel(), await km.start_kernel()
    for kernel_id in (second, first):  # each serves once: the switch below is quick, not a kernel's first serve
        assert (await post(jp_fetch, "system/host", {"kernel_id": kernel_id}, request_timeout=120)).code == 200
    assert (await post(jp_fetch, "models/load", {"model_id": "tiny-a"}, request_timeout=120)).code == 200
    behind = km.get_kernel(first).client()
    behind.start_channels()

    async def queue_depth(code: str = "") -> int:
        reply = await behind.execute_interactive(
            code, user_expressions={"q": "gg.manager().state()['devices'][0]['queue_depth']"}, timeout=60
        )
        return int(reply["content"]["user_expressions"]["q"]["data"]["text/plain"])

    try:
        await behind.wait_for_ready(timeout=60)
        assert await queue_depth("import gpugroups as gg\nheld = gg.manager().use('tiny-a')\nheld.__enter__()") == 1
        request = {"model_id": "tiny-a", "prompt": "x"}
        calls = [
            asyncio.ensure_future(post(jp_fetch, "models/process", request, request_timeout=120)) for _ in range(2)
        ]
        await until_async(lambda: queue_depth(), 3)  # both wait behind the block
        assert (await post(jp_fetch, "system/host", {"kernel_id": second}, request_timeout=120)).code == 200
        assert [r.code for r in await asyncio.gather(*calls)] == [503, 503]
        await until_async(lambda: queue_depth(), 1, timeout=60)  # they left the first kernel's queue (a loaded machine: slow)
    finally:
        await behind.execute_interactive("held.__exit__(None, None, None)", timeout=60)
        behind.stop_channels()


async def until_async(read: Any, value: Any, timeout: float = 10) -> None:
    """Wait for the coroutine ``read()`` to answer ``value``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := await read()) != value:
        assert asyncio.get_running_loop().time() < deadline, f"{got}, not {value}"
        await asyncio.sleep(0.1)
