"""Request lanes: cheap ops beside slow forward passes, over ``/api/v2`` on a real server.

Starts a real ``jupyter server`` with the extension and a host kernel (the shipped demo catalog),
puts ``--slow`` long ``process`` calls in flight for group ``pycode``, and meanwhile times
``groups/unpin`` of ``pycode`` and a member switch (``models/load`` of the other adapter of the
resident group). Prints p50/p99 of each, and the same idle, for comparison. The slow calls come
from another process, as they would from other notebooks or scripts: threads in the timing
process would share its interpreter lock with the timed calls and time themselves, not the server.

    .venv/bin/python bench/bench_lanes.py [--slow 10] [--rounds 40]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_rest import Server, pct  # noqa: E402
from gpugroups.protocol import API_PREFIX  # noqa: E402

SLOW = {"model_id": "pycode-tests", "prompt": "def test_" * 20, "num_predictions": 8, "max_new_tokens": 16}


def timed(http: requests.Session, url: str, path: str, body: dict[str, object]) -> float:
    t0 = time.perf_counter()
    r = http.post(url + API_PREFIX + path, json=body, timeout=600)
    assert r.ok, r.text
    return (time.perf_counter() - t0) * 1e3


def session(server: Server) -> requests.Session:
    http = requests.Session()
    http.headers.update(server.headers)
    return http


def queued(server: Server) -> int:
    """Calls waiting or running on the device, as the state says."""
    state = session(server).get(server.url + API_PREFIX + "/system/state", timeout=60).json()
    return int(sum(d["queue_depth"] for d in state["devices"]))


def keep_busy(url: str, headers: dict[str, str], slow: int, stop: object) -> None:
    """In a process of its own: ``slow`` threads, each sending slow process calls back to back."""

    def loop() -> None:
        http = requests.Session()
        http.headers.update(headers)
        while not stop.is_set():  # type: ignore[attr-defined]
            http.post(url + API_PREFIX + "/models/process", json=SLOW, timeout=600).raise_for_status()

    threads = [threading.Thread(target=loop) for _ in range(slow)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def measure(server: Server, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"unpin": [], "switch": []}
    http = session(server)
    for i in range(rounds):
        out["unpin"].append(timed(http, server.url, "/groups/unpin", {"group_id": "pycode"}))
        member = ("pycode-docs", "pycode-tests")[i % 2]
        out["switch"].append(timed(http, server.url, "/models/load", {"model_id": member}))
    return out


def report(label: str, figures: dict[str, list[float]]) -> None:
    for name, values in figures.items():
        print(f"{label:>22} {name:>7}: p50 {pct(values, 50):8.1f} ms   p99 {pct(values, 99):8.1f} ms   (n={len(values)})")


def run(quick: bool = False, slow: int = 10, rounds: int = 40) -> dict[str, float]:
    """p99 of an unpin and of a member switch with ``slow`` long process calls in flight (ms)."""
    rounds = 15 if quick else rounds
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        try:
            kernel = requests.post(server.url + "/api/kernels", json={}, headers=server.headers).json()["id"]
            requests.post(server.url + API_PREFIX + "/system/host", json={"kernel_id": kernel},
                          headers=server.headers, timeout=300).raise_for_status()
            one = timed(session(server), server.url, "/models/process", SLOW)
            print(f"one slow process call: {one:.0f} ms")
            report("idle", measure(server, rounds))
            spawn = multiprocessing.get_context("spawn")
            stop = spawn.Event()
            busy_process = spawn.Process(target=keep_busy, args=(server.url, server.headers, slow, stop))
            busy_process.start()
            while queued(server) < slow:  # wait until all of them are in flight
                time.sleep(0.1)
            busy = measure(server, rounds)
            print(f"calls queued on the device after the measurement: {queued(server)}")
            report(f"{slow} slow in flight", busy)
            stop.set()
            busy_process.join()
        finally:
            server.stop()
    return {"lanes_unpin_ms_p99": pct(busy["unpin"], 99), "lanes_switch_ms_p99": pct(busy["switch"], 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slow", type=int, default=10, help="slow process calls kept in flight")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    run(slow=args.slow, rounds=args.rounds)


if __name__ == "__main__":
    main()
