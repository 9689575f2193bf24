"""Replay request traces through the placement policy and count loads (pure: no torch, no models).

The policy is ``placement.place`` fed the manager's ``Ledger`` values. It is measured against two
references that do not go through ``place``, so a change to the policy cannot move them: plain LRU
over the devices (a group goes to the device with most free room if one fits it, else to the device
whose least recently used groups, unloaded until it fits, were used longest ago; "size" is the
same but unloads on the device that frees the fewest bytes: the project's first rule), and the
offline optimum: the fewest loads of any schedule that knows the whole trace, found exactly by a
shortest path over residency states (each group on one device or none). ``reference_traces`` are
the traces the project's goals are stated on: Zipf-skewed requests over 8 groups of different
sizes on 2 devices that hold about 3 groups each, several seeds and skews, plus a scan-heavy trace.
For scale: a policy that knows each trace's true request frequencies and minimises the expected
loads for them (an average-cost Markov decision process over the same states) makes 1.16 to 1.28
times the optimum's loads on these traces; one that must learn the frequencies can expect no better.

Usage: ``python bench/placement_trace.py`` prints loads per policy and the ratios.
"""

from __future__ import annotations

import itertools
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def simulate(trace: Trace, policy: str) -> int:
    """How many loads ``policy`` makes: "policy" (``place`` with the ``Ledger``), "lru" or "size"."""
    if policy != "policy":
        return _lru(trace, fewest_bytes=policy == "size")
    resident: list[dict[str, int]] = [{} for _ in trace.devices]  # group -> last use
    ledger = Ledger()
    loads = 0
    for i, gid in enumerate(trace.requests):
        views = [
            DeviceView(
                d,
                cap - sum(trace.sizes[g] for g in resident[d]),
                tuple(ResidentView(g, trace.sizes[g], t, value=ledger.value(g)) for g, t in resident[d].items()),
            )
            for d, cap in enumerate(trace.devices)
        ]
        decision = place(gid, trace.sizes[gid], views)
        if not decision.resident:
            loads += 1
            for victim in decision.evict:
                del resident[decision.device_id][victim]
        resident[decision.device_id][gid] = i
        ledger.used(gid)
    return loads


def _lru(trace: Trace, fewest_bytes: bool) -> int:
    """Loads of plain LRU over the devices (see the module docstring); ``fewest_bytes``: the "size" rule."""
    resident: list[dict[str, int]] = [{} for _ in trace.devices]  # group -> last use
    loads = 0
    for i, gid in enumerate(trace.requests):
        size = trace.sizes[gid]
        where = next((d for d, on in enumerate(resident) if gid in on), None)
        if where is None:
            loads += 1
            free = [cap - sum(trace.sizes[g] for g in on) for cap, on in zip(trace.devices, resident, strict=True)]
            fitting = [d for d in range(len(free)) if free[d] >= size]
            if fitting:
                where = max(fitting, key=lambda d: (free[d], -d))
            else:
                options = []
                for d, on in enumerate(resident):
                    victims, room = [], free[d]
                    for g in sorted(on, key=on.__getitem__):
                        if room >= size:
                            break
                        victims.append(g)
                        room += trace.sizes[g]
                    if room >= size:
                        age = 0 if fewest_bytes else sum(on[g] for g in victims)
                        options.append((age, sum(trace.sizes[g] for g in victims), len(victims), d, victims))
                *_, where, victims = min(options)
                for g in victims:
                    del resident[where][g]
        resident[where][gid] = i
    return loads


def optimum(trace: Trace) -> int:
    """The fewest loads that serve ``trace``, by dynamic programming over residency states.

    A state says which device holds each group (or none) within the devices' room. Loading only
    the requested group, only when it is requested, loses nothing (delaying a load never costs
    room, and unloading is free), so a request either finds its group resident (no cost) or loads
    it on some device after unloading any of that device's groups (one load). The minimum over the
    states reached after the last request is the optimum, not an estimate.
    """
    groups = sorted(trace.sizes)
    size = [trace.sizes[g] for g in groups]
    states = [
        a for a in itertools.product(range(len(trace.devices) + 1), repeat=len(groups))  # 0: nowhere, d + 1: device d
        if all(sum(s for s, x in zip(size, a, strict=True) if x == d + 1) <= cap for d, cap in enumerate(trace.devices))
    ]
    index = {a: i for i, a in enumerate(states)}
    moves = []  # per group: (states holding it, load sources, load targets)
    for k in range(len(groups)):
        src, dst = [], []
        for a in states:
            for d in range(len(trace.devices)) if a[k] == 0 else ():
                on = [j for j, x in enumerate(a) if x == d + 1]
                for out in itertools.chain.from_iterable(itertools.combinations(on, r) for r in range(len(on) + 1)):
                    b = tuple(d + 1 if j == k else 0 if j in out else x for j, x in enumerate(a))
                    if b in index:
                        src.append(index[a])
                        dst.append(index[b])
        holding = [i for i, a in enumerate(states) if a[k]]
        moves.append((np.array(holding), np.array(src), np.array(dst)))
    far = len(trace.requests) + 1
    cost = np.full(len(states), far)
    cost[index[(0,) * len(groups)]] = 0
    at = {g: k for k, g in enumerate(groups)}
    for gid in trace.requests:
        holding, src, dst = moves[at[gid]]
        after = np.full(len(states), far)
        after[holding] = cost[holding]
        np.minimum.at(after, dst, cost[src] + 1)
        cost = after
    return int(cost.min())


def run() -> dict[str, float]:
    """Loads per policy on every reference trace; returns the worst ratios (the goals' figures)."""
    worst_opt = worst_lru = 0.0
    print(f"{'trace':<28}{'policy':>7}{'lru':>7}{'size':>7}{'opt':>7}{'/opt':>7}{'/lru':>7}")
    for trace in reference_traces():
        n = {p: simulate(trace, p) for p in ("policy", "lru", "size")}
        opt = optimum(trace)
        vs_opt, vs_lru = n["policy"] / opt, n["policy"] / n["lru"]
        worst_opt, worst_lru = max(worst_opt, vs_opt), max(worst_lru, vs_lru)
        print(f"{trace.name:<28}{n['policy']:>7}{n['lru']:>7}{n['size']:>7}{opt:>7}{vs_opt:>7.2f}{vs_lru:>7.2f}")
    print(f"worst: policy/opt {worst_opt:.2f} (goal <= 1.25), policy/lru {worst_lru:.2f} (goal <= 1.0)")
    return {"placement_vs_opt": worst_opt, "placement_vs_lru": worst_lru}


if __name__ == "__main__":
    run()
