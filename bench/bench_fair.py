"""Fair queueing on one device: how long a 1-token request of group B waits while callers of group A
keep the device busy with maximal jobs (a backlog of them always queued), against B alone.

Groups take turns on a device (``ThreadWorker``): B's request runs after the A job that is running,
not after A's whole backlog. So B's wait is at most one A job: ``fair_wait_jobs_p99``, B's p99
under load less B alone, in A jobs (median), has the goal <= 1.2. A maximal job is the largest
``num_predictions`` at ``max_new_tokens=256`` within the work budget (``--quick``: 4 × 32 tokens).
Demo groups on the cpu device: A is ``pycode`` (``pycode-tests``), B is ``tinygpt2``.

Usage: ``python bench/bench_fair.py [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpugroups as gg
from bench.bench_core import _demo
from gpugroups.protocol import MAX_NEW_TOKENS, MAX_REQUEST_WORK, request_work

A_CALLERS = 3
PROMPT = "def add(a, b):"


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.99 * len(values)) - 1)]


def b_latencies(m: gg.Manager, n: int) -> list[float]:
    """``n`` one-token requests of B, one after another, in ms."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        m.process("tinygpt2", PROMPT, num_predictions=1)
        out.append((time.perf_counter() - t0) * 1e3)
        time.sleep(0.05)  # arrive at a different point of A's job each time
    return out


def run(quick: bool = False) -> dict[str, float]:
    """Measure and print B's wait with and without A's maximal jobs; returns the figures."""
    samples = 8 if quick else 20
    with gg.Manager(devices="cpu", catalog=_demo(), progress=False) as m:
        m.load("pycode-tests")
        m.load("tinygpt2")
        prompt_tokens = m.process("pycode-tests", PROMPT, num_predictions=1)["prompt_tokens"]
        new_tokens = 32 if quick else MAX_NEW_TOKENS
        predictions = 4 if quick else max(
            n for n in range(1, 101) if request_work(prompt_tokens, n, new_tokens) <= MAX_REQUEST_WORK
        )
        alone = b_latencies(m, samples)
        jobs: list[float] = []
        stop = threading.Event()

        def a_caller() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                m.process("pycode-tests", PROMPT, num_predictions=predictions, max_new_tokens=new_tokens)
                jobs.append((time.perf_counter() - t0) * 1e3)

        callers = [threading.Thread(target=a_caller, daemon=True) for _ in range(A_CALLERS)]
        for c in callers:
            c.start()
        while m.state()["devices"][0]["queue_depth"] < A_CALLERS:  # A's backlog is queued
            time.sleep(0.01)
        loaded = b_latencies(m, samples)
        stop.set()
        for c in callers:
            c.join()
    job_ms = statistics.median(jobs)
    out = {
        "fair_alone_ms_p99": p99(alone),
        "fair_wait_ms_p99": p99(loaded),
        "fair_job_ms": job_ms,
        "fair_wait_jobs_p99": (p99(loaded) - p99(alone)) / job_ms,
    }
    print(
        f"B alone p99 {out['fair_alone_ms_p99']:.0f} ms; while {A_CALLERS} callers of A run jobs of "
        f"{predictions} × {new_tokens} tokens ({job_ms:.0f} ms each): B p99 {out['fair_wait_ms_p99']:.0f} ms "
        f"= {out['fair_wait_jobs_p99']:.2f} A jobs of waiting"
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    run(p.parse_args().quick)


if __name__ == "__main__":
    main()
