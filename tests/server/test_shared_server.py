"""A shared server against clients that misbehave, end to end through a real ``jupyter server``
process and its host kernel: a WebSocket client that stops reading, and a host restarted in the
middle of a request. One server for the module, with a short ``ws_send_timeout``.
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from gpugroups import GpuGroupsError
from gpugroups.protocol import API_PREFIX

from .conftest import LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: Seconds the server waits for a client to take one message (short, so the test sees the close).
SEND_TIMEOUT = 3


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, tiny_catalog_toml: Path) -> Iterator[LiveServer]:
    server = LiveServer(
        tmp_path_factory.mktemp("shared"),
        tiny_catalog_toml,
        ["--GpuGroupsHost.host_kernel=auto", f"--GpuGroupsHost.ws_send_timeout={SEND_TIMEOUT}"],
    )
    yield server
    server.stop()


def host_kernel(live: LiveServer) -> Any:
    return live.kernel(live.client().host()["kernel_id"])


def silent_websocket(live: LiveServer) -> socket.socket:
    """A WebSocket to ``/api/v2/ws`` on a plain socket with a small receive buffer, upgraded and
    then never read again (a client that hung or stopped reading)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", live.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {API_PREFIX}/ws HTTP/1.1\r\nHost: 127.0.0.1:{live.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: token {live.token}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Read what the server had sent until it closes the connection (True) or ``timeout`` passes."""
    sock.settimeout(timeout)
    try:
        while sock.recv(1 << 16):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


#: Run in the host kernel: make the state large (many catalog groups), then change it ``n`` times.
CHURN = """
import time, gpugroups as gg
m = gg.manager()
for i in range(160):
    gid = f"churn-{i:03d}"
    if gid not in m.catalog.groups:
        m.catalog.register_group(gid, models={f"churn-model-{i:03d}": f"example-org/churn-model-{i:03d}"})
m.pin("gpt")
size = len(__import__("json").dumps(m.state()))
first = m.state()["version"]
for i in range({n}):
    m.pin("gpt", pinned=bool(i % 2))
    time.sleep(0.002)
out = [size, m.state()["version"] - first]
"""


def test_a_websocket_that_stops_reading_costs_bounded_memory_and_is_closed(shared: LiveServer) -> None:
    shared.client().state()  # a host is up
    kernel = host_kernel(shared)
    kernel.run(CHURN.replace("{n}", "100"))  # the server's usual memory for such states, before
    sock = silent_websocket(shared)
    try:
        server = psutil.Process(shared.proc.pid)
        before = server.memory_info().rss
        size, changes = kernel.run(CHURN.replace("{n}", "1600"), timeout=240)
        grew = server.memory_info().rss - before
        assert changes >= 1500
        assert size > 30_000  # ~1,500 unsent states would be tens of MB if each were kept
        assert grew < 50 * 2**20, f"server RSS grew {grew / 2**20:.1f} MiB"
        assert closed_by_server(sock, timeout=SEND_TIMEOUT + 30)
    finally:
        sock.close()
        kernel.close()
    log = shared.log_path.read_text()
    assert "closing a WebSocket that does not read" in log
    assert "Task exception was never retrieved" not in log
    assert shared.client().state()["version"] > 0  # everybody else is served as before


def test_a_host_restarted_mid_request_answers_503_and_stays_the_host(shared: LiveServer) -> None:
    client = shared.client()
    client.load("tiny-gpt2")
    host = client.host()
    kernels = shared.kernel_ids()
    answer: dict[str, Any] = {}

    def process() -> None:
        try:
            answer["result"] = client.process("tiny-gpt2", "hello " * 50, num_predictions=100, max_new_tokens=256)
        except GpuGroupsError as exc:
            answer["error"] = exc

    caller = threading.Thread(target=process)
    caller.start()
    deadline = time.monotonic() + 30
    while not any(d["status"] == "busy" for d in client.state()["devices"]):  # the request runs there now
        assert time.monotonic() < deadline and caller.is_alive(), "the request never ran"
        time.sleep(0.05)
    assert shared.post(f"/api/kernels/{host['kernel_id']}/restart").ok
    caller.join(60)
    assert "error" in answer, answer
    assert answer["error"].code == "host_unavailable", answer["error"]

    # the next request is answered by the same kernel, attached again; no kernel was started or stopped
    assert client.state()["version"] >= 0
    assert client.host() == host
    assert shared.kernel_ids() == kernels
    assert client.process("tiny-gpt2", "hello", num_predictions=1, max_new_tokens=2)
