"""Replay request traces through the placement policy and count loads (pure: no torch, no models).

Each policy is ``placement.place`` fed a different ``ResidentView.value``: GreedyDual-Size-Frequency
(the manager's ``Ledger``), plain LRU (value = last use), the old rule (every value equal: the device
that unloads the fewest bytes), and two offline rules that know the future: Belady's (value = minus
the position of the next use: the group needed furthest ahead goes first) and a nearness rule
(value = 1 / distance to the next use). The exact optimum with groups of different sizes on several
devices is NP-hard; the better of the two offline rules stands in for it, so ratios against it are,
if anything, pessimistic. ``reference_traces`` are the traces the
project's goals are stated on: Zipf-skewed requests over 8 groups of different sizes on 2 devices
that hold about 3 groups each, several seeds and skews, plus a scan-heavy trace.

Usage: ``python bench/placement_trace.py`` prints loads per policy and the ratios.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpugroups.placement import DeviceView, Ledger, ResidentView, place

UNIT = 1 << 20
SIZES = (1, 1, 2, 2, 3, 3, 4, 5)  # units; the 8 groups of the reference traces
DEVICES = (7, 7)  # units of room per device: about 3 groups each


@dataclass(frozen=True)
class Trace:
    name: str
    requests: tuple[str, ...]
    sizes: dict[str, int]  # bytes
    devices: tuple[int, ...] = tuple(u * UNIT for u in DEVICES)


def zipf_trace(seed: int, skew: float, n: int = 3000, scan_every: int = 0) -> Trace:
    """``n`` Zipf(``skew``) requests over the 8 groups, popularity ranks shuffled by ``seed``; with
    ``scan_every`` a scan of every group in turn interrupts them that often."""
    rng = random.Random(seed)
    groups = [f"g{i}" for i in range(len(SIZES))]
    ranked = groups[:]
    rng.shuffle(ranked)
    weights = [1 / (r + 1) ** skew for r in range(len(ranked))]
    out: list[str] = []
    while len(out) < n:
        if scan_every and len(out) % scan_every == 0 and out:
            out.extend(groups)
        out.append(rng.choices(ranked, weights)[0])
    name = f"zipf s={skew} seed={seed}" + (f" scan/{scan_every}" if scan_every else "")
    return Trace(name, tuple(out[:n]), {g: s * UNIT for g, s in zip(groups, SIZES)})


def reference_traces() -> Iterator[Trace]:
    for skew in (0.8, 1.0, 1.2):
        for seed in range(5):
            yield zipf_trace(seed, skew)
    for seed in range(3):
        yield zipf_trace(seed, 1.0, scan_every=100)


Valuer = Callable[[str, int, int], float]  # (group, bytes, request index) -> value


def simulate(trace: Trace, policy: str) -> int:
    """How many loads ``policy`` makes: "gdsf", "lru", "size" (the old fewest-bytes rule), or the
    offline "belady" and "nearness"."""
    resident: list[dict[str, int]] = [{} for _ in trace.devices]  # group -> last use
    ledger = Ledger()
    next_use = _next_uses(trace.requests)
    loads = 0
    for i, gid in enumerate(trace.requests):
        size = trace.sizes[gid]

        def value(g: str, d: int) -> float:
            if policy == "gdsf":
                return ledger.value(g)
            if policy == "lru":
                return float(resident[d][g])
            if policy == "belady":
                return -float(next_use[i].get(g, len(trace.requests)))
            if policy == "nearness":
                return 1.0 / (next_use[i].get(g, 2 * len(trace.requests)) - i)
            return 0.0

        views = [
            DeviceView(
                d,
                cap - sum(trace.sizes[g] for g in resident[d]),
                tuple(ResidentView(g, trace.sizes[g], t, value=value(g, d)) for g, t in resident[d].items()),
            )
            for d, cap in enumerate(trace.devices)
        ]
        decision = place(gid, size, views)
        if not decision.resident:
            loads += 1
            for victim in decision.evict:
                del resident[decision.device_id][victim]
                ledger.evicted(victim)
        resident[decision.device_id][gid] = i
        ledger.used(gid, size)
    return loads


def _next_uses(requests: tuple[str, ...]) -> list[dict[str, int]]:
    """For each position, where each group is requested next after it."""
    out: list[dict[str, int]] = []
    upcoming: dict[str, int] = {}
    for i in range(len(requests) - 1, -1, -1):
        out.append(dict(upcoming))
        upcoming[requests[i]] = i
    out.reverse()
    return out


def run() -> dict[str, float]:
    """Loads per policy on every reference trace; returns the worst ratios (the goals' figures)."""
    worst_opt = worst_lru = 0.0
    print(f"{'trace':<28}{'gdsf':>7}{'lru':>7}{'size':>7}{'opt':>7}{'/opt':>7}{'/lru':>7}")
    for trace in reference_traces():
        n = {p: simulate(trace, p) for p in ("gdsf", "lru", "size", "belady", "nearness")}
        opt = min(n["belady"], n["nearness"])
        vs_opt, vs_lru = n["gdsf"] / opt, n["gdsf"] / n["lru"]
        worst_opt, worst_lru = max(worst_opt, vs_opt), max(worst_lru, vs_lru)
        print(f"{trace.name:<28}{n['gdsf']:>7}{n['lru']:>7}{n['size']:>7}{opt:>7}{vs_opt:>7.2f}{vs_lru:>7.2f}")
    print(f"worst: gdsf/opt {worst_opt:.2f} (goal <= 1.25), gdsf/lru {worst_lru:.2f} (goal <= 1.0)")
    return {"placement_vs_opt": worst_opt, "placement_vs_lru": worst_lru}


if __name__ == "__main__":
    run()
