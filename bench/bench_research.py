"""Overhead of research access: ``Manager.run`` with a trivial ``fn`` against calling it directly.

Both sides are measured alternately in the same run on the demo ``pycode`` group: the baseline
calls ``fn(model, tokenizer)`` on a model held by hand; ``run`` adds getting the group resident,
holding it, queueing ``fn`` on the device's worker with the member activated, and the answer.
Goal for thread workers: <= 0.5 ms (median). A ``use`` block's enter and exit is shown beside it.

Usage: ``python bench/bench_research.py [--devices cpu|cuda:0|virtual:...] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpugroups as gg
from bench.bench_core import _demo, median_ms, paired_ms

GOAL_MS = 0.5


def trivial(model: Any, tokenizer: Any) -> int:
    """As little work as a fn can do while still touching the model."""
    return id(model)


def run(devices: str = "cpu", repeat: int = 2000) -> dict[str, float]:
    """Measure and print the overhead of ``run`` (and ``use``); returns the figures."""
    with gg.Manager(devices=devices, catalog=_demo()) as m:
        m.load("pycode-tests")
        with m.use("pycode-tests") as h:
            model, tokenizer = h.model, h.tokenizer

        def direct() -> None:
            trivial(model, tokenizer)

        def through_run() -> None:
            m.run("pycode-tests", trivial)

        def through_use() -> None:
            with m.use("pycode-tests") as held:
                trivial(held.model, held.tokenizer)

        run_ms, direct_ms = paired_ms(through_run, direct, repeat, lambda: None)
        use_ms = median_ms(through_use, repeat)
    out = {
        "run_ms": run_ms, "direct_ms": direct_ms, "run_overhead_ms": run_ms - direct_ms,
        "use_ms": use_ms, "use_overhead_ms": use_ms - direct_ms,
    }
    verdict = "meets" if out["run_overhead_ms"] <= GOAL_MS else "misses"
    print(
        f"run    : {run_ms:.3f} ms vs direct call {direct_ms:.4f} ms: overhead {out['run_overhead_ms']:.3f} ms "
        f"({verdict} the {GOAL_MS} ms goal for thread workers)"
    )
    print(f"use    : enter+exit {use_ms:.3f} ms: overhead {out['use_overhead_ms']:.3f} ms")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cpu")
    p.add_argument("--repeat", type=int, default=2000)
    args = p.parse_args()
    print(f"gpugroups {gg.__version__}, devices {args.devices}")
    run(args.devices, args.repeat)


if __name__ == "__main__":
    main()
