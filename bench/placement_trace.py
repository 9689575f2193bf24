"""Replay request traces through the placement policy and count loads (pure: no torch, no models).

The policy is ``placement.place`` fed the manager's ``Ledger`` values. It is measured against three
references that do not go through ``place``, so a change to the policy cannot move them: plain LRU
over the devices (a group goes to the device with most free room if one fits it, else to the device
whose least recently used groups, unloaded until it fits, were used longest ago; "size" is the
same but unloads on the device that frees the fewest bytes: the project's first rule), and the
offline optimum: the fewest loads of any schedule that knows the whole trace, found exactly by a
shortest path over residency states (each group on one device or none). ``reference_traces`` are
the traces the project's goals are stated on: Zipf-skewed requests over 8 groups of different
sizes on 2 devices that hold about 3 groups each, several seeds and skews, plus a scan-heavy trace.
The third, the frequency oracle (``oracle``), is the policy that knows each trace's request
frequencies and minimises the expected loads for them (an average-cost Markov decision process over
the same states): 1.16 to 1.28 times the optimum's loads on these traces. One that must learn the
frequencies can expect no better, so ``placement_vs_oracle`` says how far the policy is from what
an online policy can reach, and ``placement_oracle_vs_opt`` what only knowing the future adds.

Usage: ``python bench/placement_trace.py`` prints loads per policy and the ratios.
"""

from __future__ import annotations

import collections
import functools
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
_MAX_ITERATIONS = 100_000  # of the oracle's value iteration (the reference traces take 508 to 11,494)


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


@dataclass(frozen=True)
class Moves:
    """One group's loads: the states that hold it, and every load as ``origins[j]`` -> ``targets[j]``,
    grouped by origin: the states that do not hold it (``sources``, ascending) and the states a
    load can reach from each, ``targets[starts[i]:starts[i + 1]]``."""

    holding: np.ndarray
    origins: np.ndarray
    targets: np.ndarray
    sources: np.ndarray
    starts: np.ndarray


def _graph(trace: Trace) -> tuple[list[str], list[tuple[int, ...]], list[Moves]]:
    """The trace's groups (sorted), every residency state, and per group the loads between states
    (``_graph_of`` its sizes and devices: the same for every reference trace, so built once)."""
    return _graph_of(tuple(sorted(trace.sizes.items())), trace.devices)


@functools.cache
def _graph_of(sizes: tuple[tuple[str, int], ...], devices: tuple[int, ...]) -> tuple[list[str], list[tuple[int, ...]], list[Moves]]:
    """Groups of these ``sizes`` (sorted by name) on these ``devices``: see ``_graph``.

    A state says which device holds each group (0: none, d + 1: device d) within the devices'
    room. Loading only the requested group, only when it is requested, loses nothing (delaying a
    load never costs room, and unloading is free), so a request either finds its group resident
    (no cost) or loads it on some device after unloading any of that device's groups (one load).
    """
    groups = [g for g, _ in sizes]
    size = [b for _, b in sizes]
    states = [
        a for a in itertools.product(range(len(devices) + 1), repeat=len(groups))
        if all(sum(s for s, x in zip(size, a, strict=True) if x == d + 1) <= cap for d, cap in enumerate(devices))
    ]
    index = {a: i for i, a in enumerate(states)}
    moves = []
    for k in range(len(groups)):
        src, dst = [], []
        for a in states:
            for d in range(len(devices)) if a[k] == 0 else ():
                on = [j for j, x in enumerate(a) if x == d + 1]
                for out in itertools.chain.from_iterable(itertools.combinations(on, r) for r in range(len(on) + 1)):
                    b = tuple(d + 1 if j == k else 0 if j in out else x for j, x in enumerate(a))
                    if b in index:
                        src.append(index[a])
                        dst.append(index[b])
        order = np.argsort(src, kind="stable")
        src_sorted, dst_sorted = np.array(src)[order], np.array(dst)[order]
        starts = np.flatnonzero(np.r_[True, src_sorted[1:] != src_sorted[:-1]])
        holding = np.array([i for i, a in enumerate(states) if a[k]])
        moves.append(Moves(holding, src_sorted, dst_sorted, src_sorted[starts], starts))
    return groups, states, moves


def optimum(trace: Trace) -> int:
    """The fewest loads that serve ``trace``: a shortest path over residency states (``_graph``),
    request by request. The minimum over the states reached after the last request is the
    optimum, not an estimate."""
    groups, states, moves = _graph(trace)
    far = len(trace.requests) + 1
    cost = np.full(len(states), far)
    cost[states.index((0,) * len(groups))] = 0
    at = {g: k for k, g in enumerate(groups)}
    for gid in trace.requests:
        mv = moves[at[gid]]
        after = np.full(len(states), far)
        after[mv.holding] = cost[mv.holding]
        np.minimum.at(after, mv.targets, cost[mv.origins] + 1)
        cost = after
    return int(cost.min())


def oracle(trace: Trace, tolerance: float = 1e-9) -> int:
    """Loads of the best policy that knows how often each group is requested in ``trace`` (and
    nothing else): the policy of least expected loads per request, found by relative value
    iteration over the residency states (``_graph``) with requests drawn independently at those
    frequencies, then replayed on the trace. An online policy must learn the frequencies, so it
    can expect no better on requests drawn that way; the ratio of this to ``optimum`` is what
    knowing the future is worth, beyond any online policy's reach.
    """
    groups, states, moves = _graph(trace)
    counts = collections.Counter(trace.requests)
    p = [counts[g] / len(trace.requests) for g in groups]
    h = np.zeros(len(states))  # relative expected loads from each state
    for _ in range(_MAX_ITERATIONS):
        th = np.zeros(len(states))
        for pk, mv in zip(p, moves, strict=True):
            c = np.empty(len(states))
            c[mv.sources] = 1 + np.minimum.reduceat(h[mv.targets], mv.starts)
            c[mv.holding] = h[mv.holding]
            th += pk * c
        gap = th - h
        if gap.max() - gap.min() < tolerance:
            break
        h = 0.5 * h + 0.5 * (th - th[0])  # damped: converges on periodic chains too
    else:
        raise RuntimeError(f"{trace.name}: the oracle's values did not converge in {_MAX_ITERATIONS} iterations")
    at = {g: k for k, g in enumerate(groups)}
    state, loads = states.index((0,) * len(groups)), 0
    for gid in trace.requests:
        mv = moves[at[gid]]
        i = np.searchsorted(mv.sources, state)
        if i < len(mv.sources) and mv.sources[i] == state:  # not resident: load, to the best state
            end = mv.starts[i + 1] if i + 1 < len(mv.starts) else len(mv.targets)
            reachable = mv.targets[mv.starts[i]:end]
            state = int(reachable[np.argmin(h[reachable])])
            loads += 1
    return loads


def run() -> dict[str, float]:
    """Loads per policy on every reference trace; returns the worst ratios (the goals' figures)."""
    worst = {"opt": 0.0, "lru": 0.0, "oracle": 0.0, "oracle_opt": 0.0}
    print(f"{'trace':<28}{'policy':>7}{'lru':>7}{'size':>7}{'oracle':>7}{'opt':>7}{'/opt':>7}{'/lru':>7}{'/orcl':>7}")
    for trace in reference_traces():
        n = {p: simulate(trace, p) for p in ("policy", "lru", "size")}
        opt, best = optimum(trace), oracle(trace)
        ratios = {"opt": n["policy"] / opt, "lru": n["policy"] / n["lru"], "oracle": n["policy"] / best,
                  "oracle_opt": best / opt}  # fmt: skip
        worst = {k: max(v, ratios[k]) for k, v in worst.items()}
        print(f"{trace.name:<28}{n['policy']:>7}{n['lru']:>7}{n['size']:>7}{best:>7}{opt:>7}"
              f"{ratios['opt']:>7.2f}{ratios['lru']:>7.2f}{ratios['oracle']:>7.2f}")
    print(f"worst: policy/opt {worst['opt']:.2f} (goal <= 1.25), policy/lru {worst['lru']:.2f} (goal <= 1.0), "
          f"policy/oracle {worst['oracle']:.2f}; the oracle itself makes up to {worst['oracle_opt']:.2f}x the optimum's loads")
    return {
        "placement_vs_opt": worst["opt"], "placement_vs_lru": worst["lru"], "placement_vs_oracle": worst["oracle"],
        "placement_oracle_vs_opt": worst["oracle_opt"],
    }


if __name__ == "__main__":
    run()
