"""The placement policy as a pure function of a state snapshot."""

import functools
import itertools
import random

import pytest

from bench.placement_trace import Trace, optimum, oracle, reference_traces, simulate
from gpugroups.errors import GpuGroupsError
from gpugroups.placement import DeviceView, Layout, Ledger, ResidentView, place

MiB = 1024**2


def dev(i, free, *residents):
    return DeviceView(i, free * MiB, tuple(residents))


def res(gid, size, last_used, pinned=False, busy=False, value=0.0):
    return ResidentView(gid, size * MiB, last_used, pinned, busy, value)


def test_resident_group_stays_where_it_is():
    d = place("a", 100 * MiB, [dev(0, 0, res("a", 100, 1)), dev(1, 500)])
    assert (d.device_id, d.resident, d.evict) == (0, True, ())


def test_a_fitting_group_goes_where_most_room_is_free():
    assert place("a", 10 * MiB, [dev(0, 50), dev(1, 80), dev(2, 20), dev(3, 5)]).device_id == 1
    assert place("b", 60 * MiB, [dev(0, 50), dev(1, 80), dev(2, 20)]).device_id == 1  # the only one it fits


def test_evicts_least_recently_used_unpinned_idle_groups_at_least_cost():
    devices = [
        dev(0, 10, res("old", 60, 1.0), res("new", 60, 5.0)),
        dev(1, 10, res("pinned", 200, 0.5, pinned=True), res("busy", 100, 0.1, busy=True)),
    ]
    d = place("x", 50 * MiB, devices)
    assert d.device_id == 0 and d.evict == ("old",)


def test_chooses_device_freeing_fewest_bytes():
    devices = [dev(0, 0, res("big", 300, 1.0)), dev(1, 0, res("small", 60, 9.0))]
    assert place("x", 50 * MiB, devices).evict == ("small",)


def test_explicit_device_is_honoured_even_if_it_must_evict():
    devices = [dev(0, 0, res("a", 100, 1.0)), dev(1, 1000)]
    d = place("x", 50 * MiB, devices, device_id=0)
    assert d.device_id == 0 and d.evict == ("a",)


def test_unknown_explicit_device():
    with pytest.raises(GpuGroupsError) as e:
        place("x", 1, [dev(0, 10)], device_id=3)
    assert e.value.code == "unknown_device"


def test_max_groups_per_device_one_swaps_the_current_group():
    devices = [dev(0, 1000, res("a", 10, 1.0))]
    assert place("b", 10 * MiB, devices, max_groups_per_device=1).evict == ("a",)
    assert place("b", 10 * MiB, devices).evict == ()


def test_insufficient_memory_names_estimate_and_each_device_room():
    devices = [dev(0, 10, res("p", 100, 1.0, pinned=True)), dev(1, 20, res("q", 30, 1.0))]
    with pytest.raises(GpuGroupsError) as e:
        place("x", 500 * MiB, devices)
    err = e.value
    assert err.code == "insufficient_memory"
    assert err.details["estimate_bytes"] == 500 * MiB
    assert [r["device_id"] for r in err.details["devices"]] == [0, 1]
    assert err.details["devices"][1]["evictable_bytes"] == 30 * MiB
    assert "500.0 MiB" in err.message and "device 1" in err.message
    assert "no device has room" in err.message and "kept by pinned p (unpin to free)" in err.message
    with pytest.raises(GpuGroupsError) as one:  # one device asked for: that device is named
        place("x", 500 * MiB, devices, device_id=0)
    assert "device 0 has no room" in one.value.message and "device 1" not in one.value.message


def test_a_small_hot_group_outlives_a_big_cold_one_used_more_recently():
    ledger = Ledger()
    for _ in range(10):
        ledger.used("hot")
    ledger.used("cold")  # used last, but once
    devices = [dev(0, 0, res("hot", 50, 1.0, value=ledger.value("hot")), res("cold", 200, 2.0, value=ledger.value("cold")))]
    assert place("x", 40 * MiB, devices).evict == ("cold",)


def test_victims_are_the_set_worth_least_together_not_the_cheapest_one_by_one():
    devices = [dev(0, 0, res("a", 10, 1.0, value=1.0), res("b", 10, 2.0, value=1.5), res("c", 30, 3.0, value=2.0))]
    assert place("x", 25 * MiB, devices).evict == ("c",)  # one by one: a, b, then c all the same
    assert place("x", 20 * MiB, devices).evict == ("c",)  # a and b would do too, but lose 2.5
    assert place("x", 5 * MiB, devices).evict == ("a",)


def test_the_victim_search_stays_bounded_with_many_groups_and_still_makes_room():
    residents = [res(f"g{i}", 1 + i % 7, float(i), value=float((i * 7919) % 101)) for i in range(60)]
    d = place("x", 100 * MiB, [dev(0, 0, *residents)])
    freed = sum(r.bytes for r in residents if r.group_id in d.evict)
    assert freed >= 100 * MiB


def test_use_counts_survive_eviction_and_halve_every_half_life_of_uses():
    ledger = Ledger(half_life=10)
    for _ in range(4):
        ledger.used("old")
    count = ledger.value("old")
    assert count == pytest.approx(sum(0.5 ** (k / 10) for k in range(4)))  # each use ages the earlier ones
    for _ in range(20):  # two half-lives of other groups' uses
        ledger.used("new")
    assert ledger.value("old") == pytest.approx(count / 4)
    assert ledger.value("new") > ledger.value("old")  # old popularity fades behind current use
    assert ledger.value("never") == 0.0
    ledger.forget("old")
    assert ledger.value("old") == 0.0


def test_the_device_losing_least_value_is_chosen():
    devices = [dev(0, 0, res("precious", 10, 1.0, value=9.0)), dev(1, 0, res("cheap", 100, 9.0, value=1.0))]
    assert place("x", 10 * MiB, devices).evict == ("cheap",)


def test_on_the_reference_traces_the_policy_loads_less_than_lru_and_the_old_rule():
    for trace in reference_traces():
        loads = simulate(trace, "policy")
        assert loads < simulate(trace, "lru"), trace.name
        assert loads < simulate(trace, "size"), trace.name
        assert loads >= optimum(trace), trace.name


def test_the_optimum_is_beladys_on_one_device_of_equal_groups():
    rng = random.Random(7)
    requests = tuple(rng.choice("abcdef") for _ in range(300))
    trace = Trace("equal", requests, {g: MiB for g in "abcdef"}, devices=(3 * MiB,))
    held: set[str] = set()
    loads = 0
    for i, g in enumerate(requests):
        if g not in held:
            loads += 1
            if len(held) == 3:  # Belady: unload the group needed furthest ahead (optimal for equal sizes)
                ahead = {h: requests.index(h, i) if h in requests[i:] else len(requests) for h in held}
                held.remove(max(held, key=ahead.__getitem__))
            held.add(g)
    assert optimum(trace) == loads


def test_the_optimum_matches_an_exhaustive_search_on_small_traces_of_groups_of_different_sizes():
    sizes = {"a": 1, "b": 1, "c": 2, "d": 3, "e": 4}
    caps = (4, 5)
    for seed in range(4):
        rng = random.Random(seed)
        requests = tuple(rng.choice("aabbcde") for _ in range(30))
        trace = Trace("small", requests, {g: s * MiB for g, s in sizes.items()}, tuple(c * MiB for c in caps))

        @functools.cache
        def fewest(i: int, where: tuple[tuple[str, ...], ...]) -> int:
            """Loads to serve requests[i:] from ``where``, trying every device and every set of victims."""
            if i == len(requests):
                return 0
            g = requests[i]
            if any(g in on for on in where):
                return fewest(i + 1, where)
            best = len(requests)
            for d, on in enumerate(where):
                for r in range(len(on) + 1):
                    for out in itertools.combinations(on, r):
                        kept = tuple(sorted(h for h in on if h not in out) + [g])
                        if sum(sizes[h] for h in kept) <= caps[d]:
                            best = min(best, 1 + fewest(i + 1, where[:d] + (kept,) + where[d + 1:]))
            return best

        assert optimum(trace) == fewest(0, ((), ())), requests


def test_the_frequency_oracle_keeps_the_hot_group_and_swaps_the_others_in_its_second_slot():
    # a, b, c of equal size, room for two: knowing a is requested most, the best policy never
    # unloads a; b and c take turns in the other slot, so every change between them is a load.
    rng = random.Random(3)
    requests = tuple(rng.choices("abc", weights=(6, 3, 1))[0] for _ in range(400))
    trace = Trace("hot", requests, {g: MiB for g in "abc"}, devices=(2 * MiB,))
    assert requests[0] == "a"  # so b and c never share the room: a is there before either comes
    others = [g for g in requests if g != "a"]
    turns = 1 + sum(x != y for x, y in itertools.pairwise(others))  # the first load of b or c, then each change
    assert oracle(trace) == 1 + turns  # and a's one load
    assert optimum(trace) <= oracle(trace)


def test_the_frequency_oracle_never_beats_the_optimum_on_the_reference_traces():
    for trace in itertools.islice(reference_traces(), 0, None, 6):
        assert optimum(trace) <= oracle(trace) <= simulate(trace, "lru"), trace.name


# ---- sharding -------------------------------------------------------------------------------
def layout(blocks, fixed=0, devices=3):
    return Layout(tuple(b * MiB for b in blocks), {i: fixed * MiB for i in range(devices)})


def test_a_group_that_fits_one_device_is_never_sharded():
    devices = [dev(0, 60), dev(1, 60, res("idle", 50, 1.0))]
    d = place("x", 100 * MiB, devices, layout=layout([25] * 4, devices=2))
    assert d.device_ids == [1] and d.evict == ("idle",)


def test_too_big_for_any_device_shards_over_the_fewest_with_most_free_room():
    devices = [dev(0, 50), dev(1, 100), dev(2, 80)]
    d = place("x", 170 * MiB, devices, layout=layout([10] * 16, fixed=5))
    assert d.device_ids == [1, 2]  # two devices suffice; the two with most free room, in device order
    assert [s.bytes for s in d.shares] == [95 * MiB, 75 * MiB]
    assert sum(s.weight_bytes for s in d.shares) == 160 * MiB and d.evict == ()


def test_sharding_evicts_idle_groups_but_never_pinned_ones():
    devices = [
        dev(0, 40, res("pinned", 60, 1.0, pinned=True)),
        dev(1, 40, res("idle", 60, 1.0)),
        dev(2, 100),
    ]
    d = place("x", 180 * MiB, devices, layout=layout([10] * 18))
    assert d.device_ids == [1, 2]
    assert d.shares[0].evict == ("idle",) and d.evict == ("idle",)
    assert "pinned" not in d.evict


def test_explicit_device_ids_shard_evenly_in_the_given_order():
    d = place("x", 40 * MiB, [dev(0, 500), dev(1, 500), dev(2, 500)], device_ids=[2, 0], layout=layout([10] * 4))
    assert d.device_ids == [2, 0] and [s.weight_bytes for s in d.shares] == [20 * MiB, 20 * MiB]


def test_blocks_bring_their_extra_bytes_and_an_explicit_span_uses_every_device():
    # a small embedding, two layers that each carry a large KV share, a head with its logits
    lay = Layout((1 * MiB, 1 * MiB, 1 * MiB, 1 * MiB), {i: 2 * MiB for i in range(3)}, extra=(0, 9 * MiB, 9 * MiB, 1 * MiB))
    d = place("x", 30 * MiB, [dev(0, 500), dev(1, 500), dev(2, 500)], device_ids=[0, 1, 2], layout=lay)
    assert d.device_ids == [0, 1, 2]
    assert [s.weight_bytes for s in d.shares] == [2 * MiB, 1 * MiB, 1 * MiB]
    assert [s.bytes for s in d.shares] == [(2 + 11) * MiB, (2 + 10) * MiB, (2 + 2) * MiB]


def test_explicit_device_ids_with_device_id_or_duplicates_are_invalid():
    for kw in ({"device_ids": [0, 1], "device_id": 0}, {"device_ids": [0, 0]}, {"device_ids": []}):
        with pytest.raises(GpuGroupsError) as e:
            place("x", MiB, [dev(0, 10), dev(1, 10)], layout=layout([1]), **kw)
        assert e.value.code == "invalid_request"
    with pytest.raises(GpuGroupsError) as e:
        place("x", MiB, [dev(0, 10)], device_ids=[0, 5], layout=layout([1]))
    assert e.value.code == "unknown_device"


def test_a_sharded_resident_group_is_resident():
    devices = [dev(0, 0, res("x", 50, 1.0)), dev(1, 0, res("x", 50, 1.0))]
    assert place("x", 100 * MiB, devices, device_ids=[0, 1], layout=layout([10] * 10)).resident


def test_insufficient_memory_names_per_device_needs_when_even_sharding_cannot():
    devices = [dev(0, 30), dev(1, 30, res("p", 50, 1.0, pinned=True))]
    with pytest.raises(GpuGroupsError) as e:
        place("x", 100 * MiB, devices, layout=layout([10] * 10, devices=2))
    rooms = e.value.details["devices"]
    assert [r["shard_need_bytes"] for r in rooms] == [50 * MiB, 50 * MiB]
    assert [r["free_bytes"] for r in rooms] == [30 * MiB, 30 * MiB]
    assert "nor do the devices together" in e.value.message


def test_the_group_limit_is_named_when_it_is_what_refuses():
    devices = [dev(0, 500, res("a", 10, 1, pinned=True))]
    with pytest.raises(GpuGroupsError) as err:
        place("b", 10 * MiB, devices, max_groups_per_device=1)
    assert err.value.code == "insufficient_memory"
    assert "max_groups_per_device=1" in err.value.message and "free" not in err.value.message
    with pytest.raises(GpuGroupsError) as err:
        place("b", 900 * MiB, devices, max_groups_per_device=1)
    assert "needs an estimated" in err.value.message
    # a group that must shard, with room on every device for its part: the limit refuses, not memory
    devices = [dev(0, 60), dev(1, 40, res("a", 10, 1, pinned=True)), dev(2, 40, res("c", 10, 1, pinned=True))]
    with pytest.raises(GpuGroupsError) as err:
        place("b", 100 * MiB, devices, max_groups_per_device=1, layout=layout([10] * 10))
    assert "max_groups_per_device=1" in err.value.message and "free" not in err.value.message
    assert place("b", 100 * MiB, devices, layout=layout([10] * 10)).device_ids == [0, 1]  # without the limit
