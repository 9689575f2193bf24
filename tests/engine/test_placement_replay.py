"""The manager places as the pure policy does: a trace replayed through both makes the same loads.

``bench/placement_trace.py`` states the placement goals on the pure policy; this checks, on real
tiny models and a real manager, that what the manager does is that policy (its loads are counted
the way ``bench/placement_manager.py`` counts them), so the bench's figures are the product's.
"""

from __future__ import annotations

from pathlib import Path

from bench.placement_manager import build_models, replay, sizes
from bench.placement_trace import Trace, simulate, zipf_trace


def test_the_manager_makes_the_loads_the_pure_policy_makes(tmp_path: Path) -> None:
    models = build_models(tmp_path, layers_per_unit=1, hidden=64)
    need = sizes(models)
    room = sum(need.values()) // 3
    for seed, scan in ((0, 0), (1, 25)):
        shape = zipf_trace(seed, 1.0, n=120, scan_every=scan)
        trace = Trace(shape.name, shape.requests, need, (room, room))
        policy = simulate(trace, "policy")
        assert policy < len(trace.requests)  # some requests find their group resident
        assert policy not in (simulate(trace, "lru"), simulate(trace, "size"))  # the trace tells them apart
        assert replay(trace, models) == policy, trace.name
