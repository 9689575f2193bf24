"""Where a REST request's time goes, stage by stage: client, Jupyter's HTTP + auth, the bridge's
trip into the host kernel, the op itself, and the reply's trip back.

``bench_rest.py`` says how much REST adds; this says where. It starts the same server and host
kernel as ``bench_rest.py``, with timestamps added around the bridge on both sides (patched in at
start; ``time.perf_counter`` is one clock for all processes on Linux), then prints the median and
p90 of each stage over ``--calls`` requests of ``process`` and of ``state``.

    .venv/bin/python bench/rest_stages.py [--tiny] [--torch-threads 1] [--calls 300]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpugroups as gg
from bench.bench_rest import HostKernel, Server, pct, tiny_catalog

#: Runs the server with stamps on the bridge's sends and replies and on each REST handler;
#: SIGUSR2 writes them to $GPUGROUPS_STAGES_OUT.
SERVER = """
import json, os, signal, sys, time
from gpugroups.server import connection, handlers
stamps = {"http": []}

def stamp(rid, key):
    stamps.setdefault(rid, {})[key] = time.perf_counter()

send = connection.KernelConnection._send
def _send(self, data):
    if "id" in data:
        stamp(data["id"], "server_sent")
    return send(self, data)

receive = connection.KernelConnection._receive
def _receive(self, data):
    for item in data.get("batch", [data]):
        if "id" in item and "ok" in item:
            stamp(item["id"], "server_received")
    return receive(self, data)

handle = handlers.OpHandler._run
async def _run(self, path_args):
    t = time.perf_counter()
    await handle(self, path_args)
    stamps["http"].append((t, time.perf_counter()))

connection.KernelConnection._send = _send
connection.KernelConnection._receive = _receive
handlers.OpHandler._run = _run
signal.signal(signal.SIGUSR2, lambda *_: json.dump(stamps, open(os.environ["GPUGROUPS_STAGES_OUT"], "w")))
from jupyter_server.serverapp import main
sys.exit(main())
"""

#: Run in the host kernel before it serves: stamps when a request reaches the kernel (the direct
#: line's thread, or the subshell), when it starts to run (there for reads, on the pool otherwise)
#: and around its reply's send.
KERNEL = """
import time
from gpugroups import kernel as _k
stage_stamps = {}

def _stamp(rid, key):
    stage_stamps.setdefault(rid, {})[key] = time.perf_counter()

def _patch():
    handle, run = _k._Endpoint.handle, _k._Endpoint._run
    def handle_(self, data, answer):
        if isinstance(data, dict) and "id" in data:
            _stamp(data["id"], "kernel_received")
        return handle(self, data, answer)
    def _run(self, request, answer):
        _stamp(request["id"], "kernel_started")
        def answer_(reply):
            _stamp(reply["id"], "kernel_replying")
            answer(reply)
            _stamp(reply["id"], "kernel_replied")
        return run(self, request, answer_)
    _k._Endpoint.handle, _k._Endpoint._run = handle_, _run

_patch()
"""

#: (label, from, to): stamps of the client (``client_*``), server and kernel.
STAGES = [
    ("client -> REST handler (HTTP, auth)", "client_start", "handler_start"),
    ("handler -> bridge send (validate)", "handler_start", "server_sent"),
    ("bridge send -> kernel", "server_sent", "kernel_received"),
    ("kernel -> op starts (pool hop)", "kernel_received", "kernel_started"),
    ("the op in the kernel", "kernel_started", "kernel_replying"),
    ("sending the reply", "kernel_replying", "kernel_replied"),
    ("reply -> server", "kernel_replying", "server_received"),
    ("server -> REST handler done", "server_received", "handler_end"),
    ("the REST handler, all of it", "handler_start", "handler_end"),
    ("handler done -> client", "handler_end", "client_end"),
    ("total, as the client sees it", "client_start", "client_end"),
]


def measure(server: Server, host: HostKernel, out: Path, call: Any, calls: int) -> list[dict[str, float]]:
    """Each call's stamps from client, server and kernel, matched in order. A read the server's
    state mirror answers never reaches the kernel: its rows have client and handler stamps only."""
    for _ in range(30):  # warm up: first calls pay for lazy setup
        call()
    host.run("stage_stamps.clear()")
    client: list[tuple[float, float]] = []
    for _ in range(calls):
        t = time.perf_counter()
        call()
        client.append((t, time.perf_counter()))
    kernel: dict[str, dict[str, float]] = host.run("pass", "stage_stamps")
    out.unlink(missing_ok=True)
    os.kill(server.proc.pid, signal.SIGUSR2)
    while not out.exists():
        time.sleep(0.05)
    time.sleep(0.2)  # let the write finish
    served = json.loads(out.read_text())
    http = served.pop("http")[-calls:]
    ids: list[str | None] = sorted(kernel, key=lambda rid: kernel[rid]["kernel_received"])[-calls:]
    if not ids:
        ids = [None] * calls  # served from the mirror
    if len(ids) != calls or len(http) != calls:
        raise RuntimeError(f"stamps of {len(ids)} requests in the kernel and {len(http)} handlers, not {calls}")
    return [
        {
            "client_start": c0, "client_end": c1, "handler_start": h0, "handler_end": h1,
            **(served[rid] if rid else {}), **(kernel[rid] if rid else {}),
        }  # fmt: skip
        for (c0, c1), (h0, h1), rid in zip(client, http, ids, strict=True)
    ]


def report(title: str, rows: list[dict[str, float]]) -> None:
    print(title)
    for label, start, end in STAGES:
        if start not in rows[0] or end not in rows[0]:
            continue  # a stage this request never went through (a mirrored read)
        spans = [1000 * (r[end] - r[start]) for r in rows]
        print(f"  {label:<38} p50 {pct(spans, 50):6.2f} ms   p90 {pct(spans, 90):6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="build tiny test models instead of the shipped demo")
    parser.add_argument("--prompt", default="def test_")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads in the host kernel")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument(
        "--comm", action="store_true", help="requests on the bridge comm, not its direct line (to compare)"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        out = tmp / "stamps.json"
        catalog = tiny_catalog(tmp / "models") if args.tiny else None
        model = "tiny-a" if args.tiny else "pycode-tests"
        server = Server(
            tmp / "server", [sys.executable, "-c", SERVER], {"GPUGROUPS_STAGES_OUT": str(out)},
            *(["--GpuGroupsHost.direct_line=False"] if args.comm else []),
        )
        try:
            host = HostKernel(server, catalog, model, args.torch_threads, setup=KERNEL)
            client = gg.Client(server.url, server.token)
            for name, call in (
                (f"process({model!r}, {args.prompt!r})", lambda: client.process(model, args.prompt)),
                ("state()", client.state),
            ):
                report(f"{name}: {args.calls} calls", measure(server, host, out, call, args.calls))
            host.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
