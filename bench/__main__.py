"""``python -m bench``: run every benchmark, print one table of metric / measured / goal / met.

Each module in ``BENCHES`` has ``run(quick)`` (or ``run()``) returning a flat dict of figures;
modules that do not exist in this checkout are skipped, and a goal whose figure no module
measured shows as not measured. ``--json out.json`` writes every figure as one flat object,
``--markdown`` prints the README's Figures table, ``--only a,b`` runs some modules.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.goals import GOALS

#: Benchmark modules under bench/, in the order they run (optional ones may be absent).
BENCHES = [
    "placement_trace", "placement_manager", "bench_switch", "bench_core", "bench_memory", "bench_rest", "bench_ws",
    "bench_isolation", "bench_research", "bench_ray", "bench_shard", "bench_lanes", "bench_fair",
]  # fmt: skip


def run_all(names: list[str], quick: bool) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for name in names:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"bench.{name}":
                raise
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        kwargs = {"quick": quick} if "quick" in inspect.signature(module.run).parameters else {}
        figures.update(module.run(**kwargs))
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    return figures


def table(figures: dict[str, Any], markdown: bool = False) -> str:
    rows = []
    for g in GOALS:
        value = figures.get(g.metric)
        met = g.met(value)
        shown = "not measured" if value is None else f"{value:.3g}"
        rows.append((g.metric, shown, f"{g.op} {g.target:g}", {True: "yes", False: "NO", None: "-"}[met], g.what))
    if markdown:
        lines = ["| metric | measured | goal | met? | what |", "|---|---|---|---|---|"]
        return "\n".join([*lines, *(f"| `{r[0]}` | {r[1]} | {r[2]} | {r[3]} | {r[4]} |" for r in rows)])
    return "\n".join(f"{r[0]:<26}{r[1]:>14}  {r[2]:<10}{r[3]:<5}{r[4]}" for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (under 5 minutes)")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    p.add_argument("--markdown", action="store_true", help="print the table as the README's Markdown")
    p.add_argument("--only", default="", help="comma-separated module names")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or BENCHES
    figures = run_all(names, args.quick)
    stamp = f"{datetime.date.today()}, {platform.node() or 'this machine'}, {platform.processor() or platform.machine()}"
    print(f"\nfigures ({'quick, ' if args.quick else ''}{stamp})")
    print(table(figures, args.markdown))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
