"""A shared server against clients that misbehave, end to end through a real ``jupyter server``
process and its host kernel: a WebSocket client that stops reading, REST callers that time out or
hang up in the middle of a long generation, and a host restarted in the middle of a request. One
server for the module, with a short ``ws_send_timeout`` and ``request_timeout``.
"""

from __future__ import annotations

import base64
import http.client
import json
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
from tests.waiting import wait_for

from .conftest import LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: Seconds the server waits for a client to take one message (short, so the test sees the close).
SEND_TIMEOUT = 3
#: Seconds a REST request waits for the host (short, so a test sees a 504).
REQUEST_TIMEOUT = 10
#: Run in the host kernel: every forward pass of tiny-gpt2 sleeps ``{pause}`` s (so a generation of
#: 256 steps takes long) and is counted in ``steps``.
SLOW_STEPS = """
import time, gpugroups as gg
steps = [0]
def _slow(*_):
    steps[0] += 1
    time.sleep({pause})
gg.manager().load("tiny-gpt2")
slow_hook = gg.manager().run("tiny-gpt2", lambda model, tok: model.register_forward_hook(_slow))
"""
#: A request of 256 generation steps, within the work budget.
LONG_JOB = {"model_id": "tiny-gpt2", "prompt": "def f(", "num_predictions": 2, "max_new_tokens": 256}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, tiny_catalog_toml: Path) -> Iterator[LiveServer]:
    server = LiveServer(
        tmp_path_factory.mktemp("shared"),
        tiny_catalog_toml,
        [
            "--GpuGroupsHost.host_kernel=auto",
            f"--GpuGroupsHost.ws_send_timeout={SEND_TIMEOUT}",
            f"--GpuGroupsHost.request_timeout={REQUEST_TIMEOUT}",
        ],
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
    # take the first message (the state on connect), so the server's fetch of it is over and the
    # events that follow are written to this socket, not held for it: then stop reading
    sock.settimeout(60)
    _, length = _exactly(sock, 2)
    length &= 0x7F
    if length >= 126:
        length = int.from_bytes(_exactly(sock, 2 if length == 126 else 8), "big")
    _exactly(sock, length)
    return sock


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "the server closed the socket"
        data += chunk
    return data


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


#: Run in the host kernel: make the state large (``{groups}`` catalog groups), then change it ``n`` times.
CHURN = """
import time, gpugroups as gg
m = gg.manager()
for i in range({groups}):
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


def churn(groups: int, changes: int) -> str:
    return CHURN.replace("{groups}", str(groups)).replace("{n}", str(changes))


def test_a_websocket_that_stops_reading_costs_bounded_memory_and_is_closed(shared: LiveServer) -> None:
    shared.client().state()  # a host is up
    kernel = host_kernel(shared)
    kernel.run(churn(groups=160, changes=100))  # the server's usual memory for such states, before
    sock = silent_websocket(shared)
    silent_since = time.monotonic()
    try:
        server = psutil.Process(shared.proc.pid)
        before = server.memory_info().rss
        size, changes = kernel.run(churn(groups=160, changes=1600), timeout=240)
        grew = server.memory_info().rss - before
        assert changes >= 1500
        assert size > 30_000  # ~1,500 unsent states would be tens of MB if each were kept
        assert grew < 50 * 2**20, f"server RSS grew {grew / 2**20:.1f} MiB"
        # The socket is closed once a write to it has waited SEND_TIMEOUT: its buffers (MBs) must be
        # full first. A busy machine coalesces more of the churn's changes into fewer events, so
        # change on until the server says it closed it, within Jupyter's own 90 s ping timeout.
        while "closing a WebSocket that does not read" not in shared.log_path.read_text():
            assert time.monotonic() - silent_since < 75, "the silent socket was not closed for not reading"
            kernel.run(churn(groups=160, changes=200), timeout=60)
        assert closed_by_server(sock, timeout=SEND_TIMEOUT + 30)
    finally:
        sock.close()
        kernel.close()
    log = shared.log_path.read_text()
    assert "closing a WebSocket that does not read" in log
    assert "Task exception was never retrieved" not in log
    assert shared.client().state()["version"] > 0  # everybody else is served as before


def test_events_over_64_kib_reach_websocket_clients_whole(shared: LiveServer) -> None:
    """The server frames each event itself, once for all sockets: a state past the 16-bit length
    (a frame with a 64-bit length) still arrives as one text message, as a fan-out and on connect."""
    shared.client().state()  # a host is up
    listening = shared.client().events(timeout=60)
    kernel = host_kernel(shared)
    try:
        assert next(listening)["type"] == "system_state"
        size, _ = kernel.run(churn(groups=400, changes=2))
        version = kernel.run("out = gg.manager().state()['version']")
        assert size > 0xFFFF
        update = next(m for m in listening if m["type"] == "state_update" and m["version"] == version)
        assert len(json.dumps(update["state"])) > 0xFFFF
        assert "churn-399" in [g["id"] for g in update["state"]["groups"]]
        with shared.client().events(timeout=60) as joining:
            first = next(joining)
        assert first["type"] == "system_state" and first["state"] == update["state"]
    finally:
        listening.close()
        kernel.close()


#: Run in the host kernel: three threads switch the tiny group's member for {seconds} s.
SWITCHING = """
import threading, time, gpugroups as gg
def _switch(m=gg.manager(), until=time.monotonic() + {seconds}):
    n = 0
    while time.monotonic() < until:
        m.load("tiny-a" if n % 2 else "tiny-b")
        n += 1
_threads = [threading.Thread(target=_switch) for _ in range(3)]
[t.start() for t in _threads]
[t.join() for t in _threads]
"""


def test_versions_only_go_up_after_a_system_state_while_kernel_and_rest_both_change(shared: LiveServer) -> None:
    """A socket's state fetch may be answered ahead of the event stream: events older than the
    state it sent, arriving after it, went out too (seen 46 times in 20 s, up to 1,337 versions
    back, with the kernel and a REST client changing the state together)."""
    client = shared.client()
    client.load("tiny-a")
    kernel = host_kernel(shared)
    switching = threading.Thread(target=kernel.run, args=(SWITCHING.replace("{seconds}", "12"),), kwargs={"timeout": 120})
    stop = threading.Event()

    def pin_unpin() -> None:
        rest, n = shared.client(), 0
        while not stop.is_set():
            (rest.pin if n % 2 else rest.unpin)("tiny")
            n += 1

    pinning = threading.Thread(target=pin_unpin)
    switching.start()
    pinning.start()
    went_back, sockets = [], 0
    try:
        until = time.monotonic() + 10
        while time.monotonic() < until:
            with shared.client().events(timeout=30) as stream:
                sockets += 1
                first = next(stream)
                assert first["type"] == "system_state"
                seen, opened = first["version"], time.monotonic()
                for message in stream:
                    if message["type"] == "state_update":
                        if message["version"] < seen:
                            went_back.append((seen, message["version"]))
                        seen = max(seen, message["version"])
                    if time.monotonic() - opened > 0.5:
                        break
    finally:
        stop.set()
        pinning.join()
        switching.join()
        kernel.close()
    assert sockets >= 2 and went_back == []  # a loaded machine connects slowly: each socket still checks


def queue_depth(live: LiveServer) -> int:
    return sum(d["queue_depth"] for d in live.client().state()["devices"])


def test_a_caller_that_hangs_up_mid_generation_cancels_it(shared: LiveServer) -> None:
    kernel = host_kernel(shared)
    try:
        kernel.run(SLOW_STEPS.replace("{pause}", "0.1"))
        conn = http.client.HTTPConnection("127.0.0.1", shared.port, timeout=60)
        headers = {**shared.headers, "Content-Type": "application/json"}
        conn.request("POST", f"{API_PREFIX}/models/process", json.dumps(LONG_JOB), headers)
        assert wait_for(lambda: kernel.run("out = steps[0]") >= 3, timeout=60)  # it runs
        conn.close()  # the caller goes away without reading the answer
        assert wait_for(lambda: queue_depth(shared) == 0, timeout=30)
        assert kernel.run("out = steps[0]") < 100  # stopped, long before its 256 steps
        assert shared.client().process("tiny-gpt2", "x", num_predictions=1)["predictions"]
    finally:
        kernel.run("slow_hook.remove()")
        kernel.close()


def test_a_request_that_times_out_is_cancelled_and_the_queue_empties(shared: LiveServer) -> None:
    kernel = host_kernel(shared)
    try:
        kernel.run(SLOW_STEPS.replace("{pause}", "0.1"))
        callers = [threading.Thread(target=lambda: shared.post(f"{API_PREFIX}/models/process", LONG_JOB)) for _ in range(3)]
        answers = []
        for caller in callers:  # one runs, two wait in the device's queue
            caller.start()
        assert wait_for(lambda: queue_depth(shared) == 3, timeout=30)
        answers.append(shared.post(f"{API_PREFIX}/models/process", LONG_JOB))  # a fourth, timed out too
        assert answers[0].status_code == 504 and answers[0].json()["error"]["code"] == "timeout"
        assert "cancelled there" in answers[0].json()["error"]["message"]
        assert wait_for(lambda: queue_depth(shared) == 0, timeout=30)
        for caller in callers:
            caller.join(30)
        assert kernel.run("out = steps[0]") < 256  # not even one job ran to its end
    finally:
        kernel.run("slow_hook.remove()")
        kernel.close()


def test_a_host_restarted_mid_request_answers_503_and_stays_the_host(shared: LiveServer) -> None:
    client = shared.client()
    client.load("tiny-gpt2")
    host = client.host()
    kernels = shared.kernel_ids()
    answer: dict[str, Any] = {}

    def process() -> None:
        try:
            answer["result"] = client.process(**LONG_JOB)
        except GpuGroupsError as exc:
            answer["error"] = exc

    kernel = host_kernel(shared)
    kernel.run(SLOW_STEPS.replace("{pause}", "0.1"))  # gone with the restart
    kernel.close()
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
