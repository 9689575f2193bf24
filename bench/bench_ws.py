"""WebSocket fan-out: how long a state change takes to reach every one of 500 ``/api/v2/ws`` clients.

Starts a real ``jupyter server`` with the extension and a real host kernel (the shipped demo
catalog, ``pycode`` loaded), opens ``--clients`` WebSockets on ``/api/v2/ws`` (tornado's client),
spread over ``--procs`` client processes of their own, then makes ``--changes`` state changes over
REST (pin and unpin of ``pycode``, in turn, one at a time, from this process). For each change,
each client's latency is the time from sending the REST call to that client receiving the first
``state_update`` newer than the state before the change; a change is over only when every client
in every process has received it. Prints p50/p99 over clients x changes, beside the same with one
client (the floor: REST call, kernel, bridge and one socket, no fan-out), and the CPU per change
of the server and of the client processes together.

Separate browsers read their frames in parallel; one Python loop reads 500 frames one after the
other (~70 µs each with tornado's client), so with ``--procs 1`` (all clients in this process, as
the first version of this bench did) the last client's latency is mostly the harness's own
reading. With several processes they read in parallel, but still on the same CPUs as the server,
so they run at a lower priority (``--nice 10``): they take what the server and its kernel leave
(clients on other machines would take nothing from them), and their reading still counts in
every latency. Their CPU is still taken from the same cores, and the server still waits for the
CPU while they hold it: the figure remains an upper bound for clients on separate machines.

    .venv/bin/python bench/bench_ws.py [--clients 500] [--changes 40] [--procs 4] [--nice 10]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import re
import resource
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tornado.httpclient import AsyncHTTPClient, HTTPRequest  # noqa: E402
from tornado.websocket import WebSocketClientConnection, websocket_connect  # noqa: E402

from bench.bench_rest import Server, pct  # noqa: E402
from gpugroups.protocol import API_PREFIX  # noqa: E402

GROUP, MODEL = "pycode", "pycode-tests"
#: The first ``"version": N`` of an event; reading it this way keeps the clients' own cost low.
_VERSION = re.compile(rb'"version":\s*(\d+)')
#: How long every client has to hear of a change before the bench gives up, in seconds.
_PATIENCE = 30


def shared_clock() -> bool:
    """Whether ``time.perf_counter()`` reads one clock in every process, so that a receipt time
    taken in a client process can be set against the REST call's start taken in this one: on
    Linux it is ``clock_gettime(CLOCK_MONOTONIC)``, the same system-wide clock for all processes."""
    return sys.platform == "linux" and "CLOCK_MONOTONIC" in time.get_clock_info("perf_counter").implementation


class Round:
    """One change, seen by one process's clients: done when every one has a version above ``before``."""

    def __init__(self, before: int, clients: list[Client]) -> None:
        self.before = before
        self.waiting = sum(c.newest <= before for c in clients)
        self.done = asyncio.get_running_loop().create_future()
        if not self.waiting:
            self.done.set_result(None)

    def heard(self) -> None:
        self.waiting -= 1
        if not self.waiting and not self.done.done():
            self.done.set_result(None)


class Client:
    """One WebSocket client: each version it received that was newer than all before, and when.

    Messages are taken in tornado's message callback, with no reader task or queue per message
    and no polling, to keep the clients' own share of the CPUs small."""

    def __init__(self) -> None:
        self.conn: WebSocketClientConnection | None = None
        self.newest = -1
        #: (version, ``time.perf_counter()``) each time ``newest`` went up
        self.rises: list[tuple[int, float]] = []
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
        if found is not None and int(found[1]) > self.newest:
            old, self.newest = self.newest, int(found[1])
            self.rises.append((self.newest, now))
            if self.round is not None and old <= self.round.before < self.newest:
                self.round.heard()

    def first_above(self, version: int) -> float | None:
        """When this client first received a version above ``version`` (None: not yet)."""
        return next((when for v, when in self.rises if v > version), None)


class Clients:
    """Some of the clients, in the running event loop of the process they live in; ``call`` runs
    one of the methods below by name, the way a ``ClientProcess`` is asked over its pipe."""

    def __init__(self, url: str, headers: dict[str, str], n: int) -> None:
        self.url, self.headers = url, headers
        self.clients = [Client() for _ in range(n)]

    async def call(self, method: str, *args: Any) -> Any:
        return await getattr(self, method)(*args)

    async def connect(self) -> None:
        """Open every socket; done when each holds the state the server sends on connect."""
        for start in range(0, len(self.clients), 50):  # in batches: the server's accept backlog is finite
            batch = self.clients[start : start + 50]
            # one request each: the client writes its own handshake key into the request's headers
            conns = await asyncio.gather(
                *(websocket_connect(HTTPRequest(self.url, headers=self.headers), on_message_callback=c.on_message)
                  for c in batch)
            )  # fmt: skip
            for client, conn in zip(batch, conns, strict=True):
                client.conn = conn
        while any(c.newest < 0 for c in self.clients):
            await asyncio.sleep(0.01)

    async def newest(self) -> int:
        return max(c.newest for c in self.clients)

    async def heard(self, before: int, patience: float) -> list[float]:
        """The ``time.perf_counter()`` at which each client first received a version above
        ``before``, once all have or ``patience`` seconds have passed (then only those that have)."""
        change = Round(before, self.clients)
        for c in self.clients:
            c.round = change
        try:
            await asyncio.wait_for(change.done, patience)
        except TimeoutError:
            pass
        finally:
            for c in self.clients:
                c.round = None
        return [when for c in self.clients if (when := c.first_above(before)) is not None]

    async def pause_gc(self) -> None:
        """The clients' garbage collection is this harness's pause, not the server's: keep it out
        of the measured changes (``close`` lets it run again)."""
        gc.collect()
        gc.disable()

    async def cpu_ms(self) -> float:
        """CPU time (user + system) this process has used so far, in ms."""
        return time.process_time() * 1e3

    async def close(self) -> None:
        gc.enable()
        for c in self.clients:
            if c.conn is not None:
                c.conn.close()
        await asyncio.wait_for(asyncio.gather(*(c.closed for c in self.clients)), _PATIENCE)

    def stop(self) -> None:
        """Nothing to end: these clients live in this process."""


async def receive(conn: Connection) -> Any:
    """The next object from ``conn``, awaited in the running loop (no thread); EOFError once the
    other end has closed."""
    if not conn.poll():
        loop = asyncio.get_running_loop()
        fd, readable = conn.fileno(), loop.create_future()

        def ready() -> None:  # called again if the loop polls before the awaiting task resumes
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(fd, ready)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
    return conn.recv()


def serve_clients(conn: Connection, url: str, headers: dict[str, str], n: int, nice: int) -> None:
    """A client process's body: ``n`` clients in its own event loop at priority ``nice``, running
    each call that comes down the pipe and sending back its result, until the pipe closes (which
    also ends it when the bench process dies)."""
    os.nice(nice)

    async def serve() -> None:
        clients = Clients(url, headers, n)
        while True:
            try:
                method, args = await receive(conn)
            except EOFError:
                return
            try:
                conn.send((True, await clients.call(method, *args)))
            except Exception:
                conn.send((False, traceback.format_exc()))

    asyncio.run(serve())


class ClientProcess:
    """``Clients`` in a process of their own (spawned: this process has threads and loops, not to
    be forked), with the same ``call``, each a round trip over a pipe."""

    def __init__(self, url: str, headers: dict[str, str], n: int, nice: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        # daemonic: ended at this process's exit even if ``stop`` is never reached
        self.proc = context.Process(target=serve_clients, args=(child, url, headers, n, nice), daemon=True)
        self.proc.start()
        child.close()

    async def call(self, method: str, *args: Any) -> Any:
        try:
            self.conn.send((method, args))
            ok, result = await receive(self.conn)
        except (BrokenPipeError, EOFError):
            self.proc.join(1)
            raise RuntimeError(f"client process {self.proc.pid} ended (exit code {self.proc.exitcode})") from None
        if not ok:
            raise RuntimeError(f"in client process {self.proc.pid}, {method}:\n{result}")
        return result

    def stop(self) -> None:
        """Close the pipe (the process ends on seeing it closed) and reap the process; kill it if
        it does not end."""
        self.conn.close()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class Group(Protocol):
    """Clients here (``Clients``) or in a process of their own (``ClientProcess``)."""

    async def call(self, method: str, *args: Any) -> Any: ...

    def stop(self) -> None: ...


async def each(groups: list[Group], method: str, *args: Any) -> list[Any]:
    """``method`` called on every group at once; each call has ended when the first error is raised."""
    results = await asyncio.gather(*(g.call(method, *args) for g in groups), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


async def changes(server: Server, groups: list[Group], n: int, count: int, verbose: bool = False) -> list[float]:
    """Latencies (ms) of all ``n`` clients for ``count`` pin/unpin changes made one at a time over REST."""
    http = AsyncHTTPClient()
    latencies: list[float] = []
    for i in range(count):
        before = max(await each(groups, "newest"))
        path = "/groups/pin" if i % 2 == 0 else "/groups/unpin"
        t0 = time.perf_counter()
        await http.fetch(server.url + API_PREFIX + path, method="POST", body=json.dumps({"group_id": GROUP}),
                         headers=server.headers)  # fmt: skip
        these = sorted((t - t0) * 1e3 for times in await each(groups, "heard", before, _PATIENCE) for t in times)
        if len(these) < n:
            raise TimeoutError(f"change {i}: {len(these)} of {n} clients heard of it in {_PATIENCE} s")
        if verbose:
            print(f"    change {i}: first {these[0]:.1f}  median {these[len(these) // 2]:.1f}  last {these[-1]:.1f} ms")
        latencies += these
        await asyncio.sleep(0.05)  # one change at a time: let the sockets drain
    return latencies


def cpu_ms(pid: int) -> float:
    """CPU time (user + system) the process ``pid`` has used so far, in ms (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def start(server: Server, n: int, procs: int, nice: int) -> list[Group]:
    """``n`` clients (not yet connected): here if ``procs`` is 1, else spread over ``procs``
    processes at priority ``nice``."""
    url = server.url.replace("http", "ws", 1) + API_PREFIX + "/ws"
    if procs == 1:
        return [Clients(url, server.headers, n)]
    groups: list[Group] = []
    try:
        for i in range(min(procs, n)):
            groups.append(ClientProcess(url, server.headers, n // procs + (i < n % procs), nice))
    except BaseException:
        for g in groups:
            g.stop()
        raise
    return groups


async def measure(
    server: Server, n: int, count: int, procs: int, nice: int, verbose: bool = False
) -> tuple[list[float], float, float]:
    """Latencies (ms) of ``n`` clients in ``procs`` processes (at priority ``nice``) over ``count``
    changes, and the CPU ms per change of the server process and of the clients' processes."""
    groups = start(server, n, procs, nice)
    try:
        try:
            for g in groups:  # one after another, for the server's accept backlog
                await g.call("connect")
            await changes(server, groups, n, 4)  # warm-up: first calls pay for lazy setup
            await each(groups, "pause_gc")
            server_cpu, clients_cpu = cpu_ms(server.proc.pid), sum(await each(groups, "cpu_ms"))
            latencies = await changes(server, groups, n, count, verbose)
            server_cpu = cpu_ms(server.proc.pid) - server_cpu
            clients_cpu = sum(await each(groups, "cpu_ms")) - clients_cpu
            return latencies, server_cpu / count, clients_cpu / count
        finally:
            await each(groups, "close")
    finally:
        for g in groups:
            g.stop()


def raise_fd_limit(need: int) -> None:
    """Room for ``need`` sockets in this process and those it starts (the server and the client
    processes, which inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def report(label: str, values: list[float]) -> None:
    print(f"  {label:<22} p50 {pct(values, 50):7.1f} ms   p99 {pct(values, 99):7.1f} ms   max {max(values):7.1f} ms   (n={len(values)})")


def run(
    quick: bool = False, clients: int = 500, changes_: int = 40, procs: int = 4, nice: int = 10,
    verbose: bool = False,
) -> dict[str, float]:
    """p50/p99 (ms) from a REST change to each of ``clients`` WebSocket clients, in ``procs``
    client processes at priority ``nice``, receiving it."""
    count = 15 if quick else changes_
    if procs > 1 and not shared_clock():
        print(f"  (no clock shared by all processes on {sys.platform}: all clients in this process)")
        procs = 1
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
            one, one_server, one_clients = asyncio.run(measure(server, 1, count, procs, nice, verbose))
            many, many_server, many_clients = asyncio.run(measure(server, clients, count, procs, nice, verbose))
        finally:
            server.stop()
    where = "this process" if procs == 1 else f"{min(procs, clients)} client processes at nice {nice}"
    print(f"{count} state changes (pin / unpin over REST), from the call to each client's receipt, clients in {where}:")
    report("1 client", one)
    report(f"{clients} clients", many)
    print(f"  CPU per change: server {one_server:.1f} ms with 1 client, {many_server:.1f} ms with {clients}; "
          f"the clients' processes {one_clients:.1f} ms / {many_clients:.1f} ms")  # fmt: skip
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
    parser.add_argument("--procs", type=int, default=4, help="client processes (1: all clients in this process)")
    parser.add_argument("--nice", type=int, default=10, help="the client processes' priority (0: the server's)")
    parser.add_argument("--quick", action="store_true", help="15 changes, as in `python -m bench --quick`")
    parser.add_argument("--verbose", action="store_true", help="print first / median / last receipt of each change")
    args = parser.parse_args()
    if args.procs < 1:
        parser.error("--procs must be at least 1")
    run(quick=args.quick, clients=args.clients, changes_=args.changes, procs=args.procs, nice=args.nice, verbose=args.verbose)


if __name__ == "__main__":
    main()
