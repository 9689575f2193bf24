"""Request lanes: cheap ops beside slow forward passes, over ``/api/v2`` on a real server.

Starts a real ``jupyter server`` with the extension and a host kernel (the shipped demo catalog),
puts ``--slow`` long ``process`` calls in flight for group ``pycode``, and meanwhile times
``groups/unpin`` of ``pycode`` and a member switch (``models/load`` of the other adapter of the
resident group). Prints p50/p99 of each, and the same idle, for comparison. The goal on a 2-core
machine: p99 under 50 ms with 10 slow calls in flight.

    .venv/bin/python bench/bench_lanes.py [--slow 10] [--rounds 40]
"""

from __future__ import annotations

import argparse
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


def timed(server: Server, path: str, body: dict[str, object]) -> float:
    t0 = time.perf_counter()
    r = requests.post(server.url + API_PREFIX + path, json=body, headers=server.headers, timeout=600)
    assert r.ok, r.text
    return (time.perf_counter() - t0) * 1e3


def measure(server: Server, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"unpin": [], "switch": []}
    for i in range(rounds):
        out["unpin"].append(timed(server, "/groups/unpin", {"group_id": "pycode"}))
        member = ("pycode-docs", "pycode-tests")[i % 2]
        out["switch"].append(timed(server, "/models/load", {"model_id": member}))
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
            one = timed(server, "/models/process", SLOW)
            print(f"one slow process call: {one:.0f} ms")
            report("idle", measure(server, rounds))
            stop = threading.Event()

            def keep_busy() -> None:
                while not stop.is_set():
                    timed(server, "/models/process", SLOW)

            threads = [threading.Thread(target=keep_busy, daemon=True) for _ in range(slow)]
            for t in threads:
                t.start()
            time.sleep(1.0)  # all of them in flight
            busy = measure(server, rounds)
            report(f"{slow} slow in flight", busy)
            stop.set()
            for t in threads:
                t.join()
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
