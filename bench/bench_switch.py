"""What a member switch really costs: the first ``process`` after it, and its event, against the catalog's size.

- switch cost: a tiny Llama with N LoRA adapters (2 and 64); each round pairs a ``process`` right
  after ``load`` of another adapter with a ``process`` of the member already current, in
  alternating order; the figure is the median difference (goal in ``bench/goals.py``, flat in N);
- catalog: the time of a switch (``load`` of another member: one state event, with a subscriber
  listening) with 1 and with 1000 extra groups in the catalog (goal: about the same; the event
  must not cost O(catalog) under the lock). Each round waits, untimed, for the event's delivery.

Usage: ``python bench/bench_switch.py [--quick]``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpugroups as gg
from gpugroups.catalog import Catalog
from tests import tinymodels

PROMPT = "def __init__(self"


def _adapters_catalog(folder: Path, n: int) -> Catalog:
    tok = tinymodels.build_tokenizer(folder / "tok")
    base = tinymodels.build_causal_lm(folder / "base", "llama", tokenizer_dir=tok)
    adapters = {f"a{i}": str(tinymodels.build_lora_adapter(folder / f"a{i}", base, seed=i)) for i in range(n)}
    cat = Catalog(roots=[str(folder)])
    cat.register_group("g", base=str(base), adapters=adapters, base_id="base")
    return cat


def switch_cost_ms(cat: Catalog, rounds: int) -> float:
    """Median over pairs of the first process after a switch minus a plain process of the member
    already current, in ms. The pairs alternate their order (switched first, then plain first),
    so that a second call's warmer caches favour neither side."""
    members = [m for m in cat.group("g").members if m != "base"]
    with gg.Manager(devices="cpu", catalog=cat) as m:
        m.load(members[0])
        for _ in range(5):
            m.process(members[0], PROMPT)
        current, diffs = members[0], []

        def timed(member: str) -> float:
            t0 = time.perf_counter()
            m.process(member, PROMPT)
            return time.perf_counter() - t0

        for i in range(rounds):
            other = members[(members.index(current) + 1 + i % (len(members) - 1)) % len(members)]
            if i % 2 == 0:
                m.load(other)
                switched = timed(other)
                plain = timed(other)
            else:
                plain = timed(current)
                m.load(other)
                switched = timed(other)
            current = other
            diffs.append((switched - plain) * 1e3)
    return statistics.median(diffs)


def switch_ms_by_catalog(cat: Catalog, extra: int, rounds: int) -> float:
    """Median ms of ``load`` of another member (one state event built) with ``extra`` more groups."""
    base = cat.group("g").base
    for i in range(extra):
        cat.register_group(f"extra{i}", models={f"extra{i}": str(cat.local_path(cat.models[base].source))})  # type: ignore[index]
    members = cat.group("g").members
    with gg.Manager(devices="cpu", catalog=cat) as m:
        delivered = threading.Event()
        m.subscribe(lambda e: delivered.set() if e["version"] == m.version else None)
        m.load(members[0])
        times = []
        for i in range(rounds):
            delivered.clear()
            t0 = time.perf_counter()
            m.load(members[(i + 1) % len(members)])
            times.append((time.perf_counter() - t0) * 1e3)
            delivered.wait(10)  # the event's JSON is built (and freed) on the event thread: untimed
            time.sleep(0.002)
    return statistics.median(times)


def run(quick: bool = False) -> dict[str, float]:
    rounds = 100 if quick else 400
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (2, 64):
            cat = _adapters_catalog(Path(tmp) / f"n{n}", n)
            out[f"switch_cost_ms_{n}"] = switch_cost_ms(cat, rounds)
            print(f"switch cost, {n} adapters: {out[f'switch_cost_ms_{n}']:+.3f} ms (median of {rounds})")
        small = switch_ms_by_catalog(_adapters_catalog(Path(tmp) / "c1", 2), 1, rounds)
        big = switch_ms_by_catalog(_adapters_catalog(Path(tmp) / "c1000", 2), 1000, rounds)
    out["switch_catalog_ratio"] = big / small
    print(f"switch (load of another member): {small:.3f} ms with 3 groups, {big:.3f} ms with 1002 groups")
    return out


if __name__ == "__main__":
    run("--quick" in sys.argv)
