"""The bridge's direct line (``directline.py``) is as private as the kernel's own channels: only
messages signed with the kernel's key are served, and a server whose line gets no pong keeps to
the comm. Real kernels from pytest-jupyter's in-process server, real ZeroMQ sockets.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from jupyter_client.session import Session

from gpugroups.directline import ServerLine, answering_line
from gpugroups.protocol import request_message
from gpugroups.server.connection import KernelConnection

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def jp_server_config(tiny_env: Path) -> dict[str, Any]:
    return {"ServerApp": {"jpserver_extensions": {"gpugroups": True}}, "GpuGroupsHost": {"host_kernel": "none"}}


async def _ask(address: str, session: Session, data: dict[str, Any], sign: bool = True) -> Any:
    """Send one message on the line from a socket of our own; its answer, or None after 1.5 s."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    try:
        body = session.pack(data)
        await sock.send_multipart([session.sign([body]) if sign else b"", body])
        if not await sock.poll(1500):
            return None
        signature, reply = await sock.recv_multipart()
        assert signature == session.sign([reply])  # the kernel signs what it sends too
        return session.unpack(reply)
    finally:
        sock.close()


async def test_only_messages_signed_with_the_kernels_key_are_served(jp_serverapp: Any) -> None:
    km = jp_serverapp.kernel_manager
    kernel_id = await km.start_kernel()
    conn = KernelConnection(km, kernel_id, lambda _c, _e: None, lambda _c, _r: None)
    await conn.attach(120)
    try:
        assert conn.line is not None
        address = conn.line.address
        assert address.startswith("tcp://127.0.0.1:")  # the kernel's own interface
        key = km.get_kernel(kernel_id).session.key
        load = request_message("x1", "load", {"model_id": "tiny-b"})
        assert await _ask(address, Session(key=b"not-the-key"), load) is None
        assert await _ask(address, Session(key=key), load, sign=False) is None
        state = await conn.request("state", {}, 60)
        assert not any(g["resident_on"] for g in state["groups"])  # neither load ran
        # a second signed peer and the server at once: each reply goes to whoever asked
        reply, state = await asyncio.gather(
            _ask(address, Session(key=key), request_message("x2", "groups", {})), conn.request("state", {}, 60)
        )
        assert reply["id"] == "x2" and reply["ok"] and any(g["id"] == "tiny" for g in reply["result"])
        assert "devices" in state
        assert (await conn.request("load", {"model_id": "tiny-b"}, 120))["status"] == "loaded"  # still served
    finally:
        await conn.close("the test is over")


async def test_a_line_that_gives_no_pong_is_not_used() -> None:
    with zmq.Context.instance().socket(zmq.ROUTER) as silent:  # binds, never answers
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        session, address = Session(key=uuid.uuid4().hex.encode()), f"tcp://127.0.0.1:{port}"
        line = ServerLine(session, address, lambda _d: None)
        try:
            assert await line.ping(timeout=0.5) is False
        finally:
            line.close()
        assert await answering_line(session, address, lambda _d: None) is None  # the comm, then
