"""WebSocket fan-out: how long a state change takes to reach every one of 500 ``/api/v2/ws`` clients.

Starts a real ``jupyter server`` with the extension and a real host kernel (the shipped demo
catalog, ``pycode`` loaded), opens ``--clients`` WebSockets on ``/api/v2/ws`` (tornado's client,
all in this process's event loop), then makes ``--changes`` state changes over REST (pin and
unpin of ``pycode``, in turn, one at a time). For each change, each client's latency is the time
from sending the REST call to that client receiving the first ``state_update`` newer than the
state before the change. Prints p50/p99 over clients x changes, beside the same with one client
(the floor: REST call, kernel, bridge and one socket, no fan-out).

The clients share this process, so the figure includes reading 500 frames in one Python loop on
the same CPUs as the server: an upper bound on what 500 separate browsers would see.

    .venv/bin/python bench/bench_ws.py [--clients 500] [--changes 40]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tornado.httpclient import AsyncHTTPClient, HTTPRequest  # noqa: E402
from tornado.websocket import WebSocketClientConnection, websocket_connect  # noqa: E402

from bench.bench_rest import Server, pct  # noqa: E402
from gpugroups.protocol import API_PREFIX  # noqa: E402

GROUP, MODEL = "pycode", "pycode-tests"
#: The first ``"version": N`` of an event; reading it this way keeps the clients' own cost low.
_VERSION = re.compile(rb'"version":\s*(\d+)')


class Round:
    """One change: when each client first received a version above ``before``; done when all have."""

    def __init__(self, before: int, clients: int) -> None:
        self.before = before
        self.clients = clients
        self.heard: dict[int, float] = {}
        self.done = asyncio.get_running_loop().create_future()

    def hear(self, client: int, version: int, when: float) -> None:
        if version > self.before and client not in self.heard:
            self.heard[client] = when
            if len(self.heard) == self.clients and not self.done.done():
                self.done.set_result(None)


class Client:
    """One WebSocket client: the newest version it received, told to the round in progress.

    Messages are taken in tornado's message callback, with no reader task or queue per message
    and no polling, to keep the clients' own share of the CPUs small."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.conn: WebSocketClientConnection | None = None
        self.newest = -1
        self.round: Round | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def on_message(self, message: str | bytes | None) -> None:
        if message is None:
            if not self.closed.done():
                self.closed.set_result(None)
            return
        now = time.perf_counter()
        raw = message.encode() if isinstance(message, str) else message
        found = _VERSION.search(raw, 0, 200)
        if found is not None:
            self.newest = max(self.newest, int(found[1]))
            if self.round is not None:
                self.round.hear(self.index, self.newest, now)


async def connect(server: Server, n: int) -> list[Client]:
    """``n`` clients, each holding the state the server sent on connect."""
    url = server.url.replace("http", "ws", 1) + API_PREFIX + "/ws"
    clients: list[Client] = []
    for start in range(0, n, 50):  # in batches: the server's accept backlog is finite
        batch = [Client(i) for i in range(start, min(n, start + 50))]
        # one request each: the client writes its own handshake key into the request's headers
        conns = await asyncio.gather(
            *(websocket_connect(HTTPRequest(url, headers=server.headers), on_message_callback=c.on_message) for c in batch)
        )
        for client, conn in zip(batch, conns, strict=True):
            client.conn = conn
        clients += batch
    while any(c.newest < 0 for c in clients):
        await asyncio.sleep(0.01)
    return clients


async def changes(server: Server, clients: list[Client], count: int, verbose: bool = False) -> list[float]:
    """Latencies (ms) of every client for ``count`` pin/unpin changes made one at a time over REST."""
    http = AsyncHTTPClient()
    latencies: list[float] = []
    for i in range(count):
        change = Round(max(c.newest for c in clients), len(clients))
        for c in clients:
            c.round = change
        path = "/groups/pin" if i % 2 == 0 else "/groups/unpin"
        t0 = time.perf_counter()
        await http.fetch(server.url + API_PREFIX + path, method="POST", body=json.dumps({"group_id": GROUP}),
                         headers=server.headers)  # fmt: skip
        try:
            await asyncio.wait_for(asyncio.shield(change.done), 30)
        except TimeoutError:
            raise TimeoutError(f"change {i}: {len(change.heard)} of {len(clients)} clients heard of it in 30 s") from None
        these = sorted((t - t0) * 1e3 for t in change.heard.values())
        if verbose:
            print(f"    change {i}: first {these[0]:.1f}  median {these[len(these) // 2]:.1f}  last {these[-1]:.1f} ms")
        latencies += these
        await asyncio.sleep(0.05)  # one change at a time: let the sockets drain
    return latencies


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) the process ``pid`` has used so far, in ms (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


async def measure(server: Server, n: int, count: int, verbose: bool = False) -> tuple[list[float], float, float]:
    """Latencies (ms) of ``n`` clients over ``count`` changes, and the CPU ms per change of the
    server process and of this one (the clients) while they ran."""
    clients = await connect(server, n)
    try:
        await changes(server, clients, 4)  # warm-up: first calls pay for lazy setup
        # The clients' garbage collection is this harness's pause, not the server's: keep it out.
        gc.collect()
        gc.disable()
        server_cpu, own_cpu = cpu_ms(server.proc.pid), time.process_time() * 1e3
        latencies = await changes(server, clients, count, verbose)
        server_cpu, own_cpu = cpu_ms(server.proc.pid) - server_cpu, time.process_time() * 1e3 - own_cpu
        return latencies, server_cpu / count, own_cpu / count
    finally:
        gc.enable()
        for c in clients:
            if c.conn is not None:
                c.conn.close()
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), 30)


def raise_fd_limit(need: int) -> None:
    """Room for ``need`` sockets in this process and the server it starts (which inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def report(label: str, values: list[float]) -> None:
    print(f"  {label:<22} p50 {pct(values, 50):7.1f} ms   p99 {pct(values, 99):7.1f} ms   max {max(values):7.1f} ms   (n={len(values)})")


def run(quick: bool = False, clients: int = 500, changes_: int = 40, verbose: bool = False) -> dict[str, float]:
    """p50/p99 (ms) from a REST change to each of ``clients`` WebSocket clients receiving it."""
    count = 15 if quick else changes_
    raise_fd_limit(4 * clients + 256)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        try:
            import requests

            kernel = requests.post(server.url + "/api/kernels", json={}, headers=server.headers).json()["id"]
            requests.post(server.url + API_PREFIX + "/system/host", json={"kernel_id": kernel},
                          headers=server.headers, timeout=300).raise_for_status()  # fmt: skip
            requests.post(server.url + API_PREFIX + "/models/load", json={"model_id": MODEL},
                          headers=server.headers, timeout=300).raise_for_status()  # fmt: skip
            one, one_server, one_own = asyncio.run(measure(server, 1, count, verbose))
            many, many_server, many_own = asyncio.run(measure(server, clients, count, verbose))
        finally:
            server.stop()
    print(f"{count} state changes (pin / unpin over REST), from the call to each client's receipt:")
    report("1 client", one)
    report(f"{clients} clients", many)
    print(f"  CPU per change: server {one_server:.1f} ms with 1 client, {many_server:.1f} ms with {clients}; "
          f"the clients' process {one_own:.1f} ms / {many_own:.1f} ms")  # fmt: skip
    return {
        "ws_fanout_ms_p50": pct(many, 50),
        "ws_fanout_ms_p99": pct(many, 99),
        "ws_one_client_ms_p50": pct(one, 50),
        "ws_fanout_server_cpu_ms": many_server - one_server,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--verbose", action="store_true", help="print first / median / last receipt of each change")
    args = parser.parse_args()
    run(clients=args.clients, changes_=args.changes, verbose=args.verbose)


if __name__ == "__main__":
    main()
