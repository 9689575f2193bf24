"""Placement policy: where a group goes and what must leave first. Pure: no torch, no I/O.

``place`` is a function of a state snapshot (``DeviceView``s), so it can be unit-tested and
replayed on traces (``bench/placement_trace.py``). The order of preference: (1) a device where
the group is already resident; (2) a device whose free budget fits the estimate; (3) evict the
least valuable groups that are neither pinned nor serving, on the device where that loses the
least value; (4) only when no single device can hold the group even after evicting all it may,
and the caller gave its ``Layout`` (block sizes in layer order), shard it over the fewest devices
that can, those with most free budget first (``Decision.shares``); (5) ``insufficient_memory``
naming, per device, what the group would need there and what it has. An explicit ``device_id``
(or a pin's affinity) restricts the choice to that device; explicit ``device_ids`` shard over
exactly those devices, in that order.

A resident's value is what losing it costs: its use count, decayed by half every
``HALF_LIFE`` uses of any group (an LRFU-like count, kept by a ``Ledger``; it survives eviction, so
a popular group that was unloaded comes back with its popularity). Victims are the set of evictable
groups whose total value is least among those that make room, not the least valuable one by one:
one big cold group goes rather than several small warm ones. A group that fits without evicting
goes to the device with the most free room, so groups spread over the devices and serve in
parallel (packing them tightly instead loads about 5 % less on the reference traces, and leaves
a device idle while another one's queue is shared).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import GpuGroupsError

HALF_LIFE = 300.0  # uses (of any group) over which a count halves: enough to learn popularity, few enough to follow it
_SEARCH_STEPS = 4096  # victim sets tried per device before the best so far is taken


@dataclass(frozen=True)
class ResidentView:
    """A group resident (or loading) on a device, as placement sees it."""

    group_id: str
    bytes: int
    last_used: float
    pinned: bool = False
    busy: bool = False  # serving requests, held by run/use, or being loaded: never a victim
    value: float = 0.0  # what losing it costs, >= 0 (``Ledger.value``): victims lose the least in total

    @property
    def evictable(self) -> bool:
        """Whether placement may unload this group to make room."""
        return not (self.pinned or self.busy)


@dataclass(frozen=True)
class DeviceView:
    """A device as placement sees it: free budget bytes and its resident groups."""

    device_id: int
    free_bytes: int
    residents: tuple[ResidentView, ...] = ()


@dataclass(frozen=True)
class Share:
    """One device's part of a placed group: its bytes, of which ``weight_bytes`` are layers, and its victims."""

    device_id: int
    bytes: int
    weight_bytes: int
    evict: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """Where to load: the first device, every victim, whether it is already resident, and the
    per-device ``shares`` in layer order (one share unless the group is sharded; none if resident)."""

    device_id: int
    evict: tuple[str, ...] = ()
    resident: bool = False
    shares: tuple[Share, ...] = ()

    @property
    def device_ids(self) -> list[int]:
        """Every device the group spans, in layer order."""
        return [s.device_id for s in self.shares] or [self.device_id]


@dataclass(frozen=True)
class Layout:
    """How a group splits over devices: its indivisible blocks' weight bytes in layer order, the
    bytes each spanned device adds besides its blocks (the runtime reserve every device needs,
    device overhead), and the bytes each block brings wherever it goes (``extra``: a decoder
    layer's KV cache, the output head's logits; none when empty)."""

    blocks: tuple[int, ...]
    fixed: Mapping[int, int]
    extra: tuple[int, ...] = ()

    def fixed_on(self, device_id: int) -> int:
        return self.fixed.get(device_id, 0)

    def costs(self) -> list[int]:
        """Each block's bytes on the device that takes it: its weights and its ``extra``."""
        return [b + (self.extra[i] if i < len(self.extra) else 0) for i, b in enumerate(self.blocks)]


def place(
    group_id: str,
    need_bytes: int,
    devices: Sequence[DeviceView],
    device_id: int | None = None,
    max_groups_per_device: int | None = None,
    device_ids: Sequence[int] | None = None,
    layout: Layout | None = None,
) -> Decision:
    """Choose where ``group_id`` (``need_bytes`` on one device) goes; raise ``insufficient_memory`` if nowhere.

    With ``device_id`` only that device is considered (the caller moves a group resident
    elsewhere). Without it, fitting devices are preferred over evicting ones; among fitting
    devices the one with the most free bytes wins (spreading load), among evicting ones the one whose victims are worth least together, then
    the one that unloads the fewest bytes.
    With a ``layout`` and no single device able to hold the group, it is sharded (see the
    module docstring); ``device_ids`` shard over exactly those devices, evenly where room allows.
    """
    known = {d.device_id: d for d in devices}
    if device_ids is not None:
        if device_id is not None:
            raise GpuGroupsError("invalid_request", "give device_id or device_ids, not both")
        if not device_ids or len(set(device_ids)) != len(device_ids):
            raise GpuGroupsError("invalid_request", f"device_ids must be distinct device ids, got {list(device_ids)!r}")
        for i in device_ids:
            if i not in known:
                raise GpuGroupsError("unknown_device", f"unknown device {i!r}")
        if len(device_ids) == 1:
            device_id = device_ids[0]
        else:
            span = [known[i] for i in device_ids]
            if all(any(r.group_id == group_id for r in d.residents) for d in span):
                return Decision(span[0].device_id, resident=True)
            if layout is None:
                raise GpuGroupsError("invalid_request", f"group {group_id!r} cannot be sharded (no layer layout)")
            shares = _spread(layout, span, max_groups_per_device, even=True) or _spread(
                layout, span, max_groups_per_device, even=False
            )
            if shares is None:
                raise _insufficient(group_id, need_bytes, span, layout, max_groups_per_device)
            return _decision(shares)
    if device_id is not None:
        if device_id not in known:
            raise GpuGroupsError("unknown_device", f"unknown device {device_id!r}")
        candidates = [known[device_id]]
    else:
        candidates = list(devices)
    for d in candidates:
        if any(r.group_id == group_id for r in d.residents):
            return Decision(d.device_id, resident=True)

    fitting = [d for d in candidates if d.free_bytes >= need_bytes and _room_for_one(d, max_groups_per_device)]
    if fitting:
        best = max(fitting, key=lambda d: (d.free_bytes, -d.device_id))
        return _decision([Share(best.device_id, need_bytes, need_bytes - _fixed(layout, best))])

    options = []
    for d in candidates:
        victims = _victims(d, need_bytes, max_groups_per_device)
        if victims is not None:
            lost = sum(r.value for r in victims)
            cost = sum(r.bytes for r in victims)
            options.append((lost, cost, len(victims), d.device_id, tuple(r.group_id for r in victims)))
    if options:
        *_, dev, evict = min(options)
        return _decision([Share(dev, need_bytes, need_bytes - _fixed(layout, known[dev]), evict)])

    if layout is not None and device_id is None:
        shares = _shard(layout, candidates, max_groups_per_device)
        if shares is not None:
            return _decision(shares)
    raise _insufficient(group_id, need_bytes, candidates, layout, max_groups_per_device)


def _shard(layout: Layout, devices: Sequence[DeviceView], max_groups: int | None) -> list[Share] | None:
    """The fewest devices that can hold the layout (most free budget first, then most room
    once idle groups go), in device order for the layers; None if all of them together cannot."""
    usable = [d for d in devices if _room_for_one(d, max_groups) or any(r.evictable for r in d.residents)]
    for k in range(2, len(usable) + 1):
        for with_evictable in (False, True):
            def room(d: DeviceView, with_evictable: bool = with_evictable) -> int:
                return d.free_bytes + (_evictable(d) if with_evictable else 0)

            chosen = sorted(sorted(usable, key=lambda d: (-room(d), d.device_id))[:k], key=lambda d: d.device_id)
            shares = _spread(layout, chosen, max_groups, even=False)
            if shares is not None:
                return shares
    return None


def _spread(layout: Layout, span: Sequence[DeviceView], max_groups: int | None, even: bool) -> list[Share] | None:
    """Assign the layout's blocks to ``span`` in order, with the victims each device needs, or None.

    ``even`` aims at equal layer bytes per device, each device taking one block at least
    (explicit ``device_ids``); otherwise each
    device takes what its free room holds, evicting only for what the later devices' free room
    cannot take. Devices left without a block drop out of the span.
    """
    blocks = list(zip(layout.costs(), layout.blocks, strict=True))  # (bytes on its device, weight bytes)
    total = sum(c for c, _ in blocks)
    shares: list[Share] = []
    placed = 0
    for i, d in enumerate(span):
        fixed = layout.fixed_on(d.device_id)
        last = i == len(span) - 1
        free = d.free_bytes - fixed
        room = free + _evictable(d)
        later_free = sum(max(0, e.free_bytes - layout.fixed_on(e.device_id)) for e in span[i + 1:])
        must = total - placed - later_free
        target = total * (i + 1) // len(span) - placed if even else None
        taken = weights = 0
        later = len(span) - i - 1
        while blocks:
            b, w = blocks[0]
            if not last:
                if taken + b > room:
                    break
                # an explicit span uses every device: each takes one block at least, and leaves one for each after it
                if target is not None and taken and (taken + b / 2 > target or len(blocks) <= later):
                    break
                if target is None and taken + b > free and taken >= must:
                    break
            blocks.pop(0)
            taken += b
            weights += w
        if taken == 0:
            continue
        placed += taken
        victims = _victims(d, fixed + taken, max_groups)
        if victims is None:
            return None
        shares.append(Share(d.device_id, fixed + taken, weights, tuple(r.group_id for r in victims)))
    return shares if not blocks and shares else None


def _decision(shares: Sequence[Share]) -> Decision:
    evict = tuple(dict.fromkeys(g for s in shares for g in s.evict))  # a sharded victim counts once
    return Decision(shares[0].device_id, evict, shares=tuple(shares))


def _fixed(layout: Layout | None, d: DeviceView) -> int:
    return layout.fixed_on(d.device_id) if layout is not None else 0


def _evictable(d: DeviceView) -> int:
    return sum(r.bytes for r in d.residents if r.evictable)


def _insufficient(
    group_id: str, need: int, devices: Sequence[DeviceView], layout: Layout | None, max_groups: int | None
) -> GpuGroupsError:
    """``insufficient_memory`` naming, per device, what the group needs there and what it has.

    ``need_bytes`` is the whole group on that device; with a layout, ``shard_need_bytes`` is
    that device's part were the group spread evenly over all these devices.
    """
    rooms = []
    for d in devices:
        room = {"device_id": d.device_id, "need_bytes": need, "free_bytes": d.free_bytes, "evictable_bytes": _evictable(d)}
        if layout is not None and len(devices) > 1:
            room["shard_need_bytes"] = layout.fixed_on(d.device_id) + sum(layout.costs()) // len(devices)
        rooms.append(room)
    where = "; ".join(
        f"device {r['device_id']}: needs {_mib(r['need_bytes'])}"
        + (f" ({_mib(r['shard_need_bytes'])} as a shard)" if "shard_need_bytes" in r else "")
        + f", has {_mib(r['free_bytes'])} free + {_mib(r['evictable_bytes'])} evictable"
        + _kept(d)
        for r, d in zip(rooms, devices, strict=True)
    )
    if max_groups is not None and all(r["free_bytes"] + r["evictable_bytes"] >= r.get("shard_need_bytes", need) for r in rooms):
        # memory would do (for the whole group, or for each device's part of it): the group limit is what refuses
        kept = "; ".join(
            f"device {d.device_id}: {sum(not r.evictable for r in d.residents)} group(s) that cannot be evicted "
            "(pinned or busy)" for d in devices
        )
        message = (
            f"group {group_id!r} cannot be placed: max_groups_per_device={max_groups} is reached "
            f"and no resident group can make way ({kept})"
        )
    else:
        nowhere = "no device has room" if len(devices) > 1 else f"device {devices[0].device_id} has no room"
        message = (
            f"group {group_id!r} needs an estimated {_mib(need)}; {nowhere}"
            + (", nor do the devices together" if layout is not None and len(devices) > 1 else "")
            + f" ({where})"
        )
    return GpuGroupsError(
        "insufficient_memory", message, {"group_id": group_id, "estimate_bytes": need, "devices": rooms}
    )


def _kept(d: DeviceView) -> str:
    """What keeps a device's room: its groups that cannot be evicted, and why (what to do)."""
    pinned = [r.group_id for r in d.residents if r.pinned]
    busy = [r.group_id for r in d.residents if r.busy and not r.pinned]
    said = ([f"pinned {', '.join(pinned)} (unpin to free)"] if pinned else []) + (
        [f"busy {', '.join(busy)} (serving, in use or loading: wait)"] if busy else []
    )
    return f", kept by {' and '.join(said)}" if said else ""


def _room_for_one(d: DeviceView, max_groups: int | None) -> bool:
    return max_groups is None or len(d.residents) < max_groups


def _victims(d: DeviceView, need: int, max_groups: int | None) -> list[ResidentView] | None:
    """The evictable groups of least total value whose unloading makes ``need`` fit (and a group
    slot free under ``max_groups``); None if even all of them cannot.

    A depth-first search over the groups, least valuable (then least recently used) first, taking
    a group before leaving it out: its first answer is the greedy one (the cheapest groups until
    the need fits), and among answers of equal value the earliest found stays. A branch that
    already loses as much as the best answer is cut, and after ``_SEARCH_STEPS`` steps the best
    answer so far is taken, so many small groups cannot make the search explode.
    """
    short = need - d.free_bytes  # bytes to free
    slots = 0 if max_groups is None else len(d.residents) - max_groups + 1  # groups to unload
    pool = sorted((r for r in d.residents if r.evictable), key=lambda r: (r.value, r.last_used))
    rest = [0] * (len(pool) + 1)  # bytes the groups from i on free together
    for i in range(len(pool) - 1, -1, -1):
        rest[i] = rest[i + 1] + pool[i].bytes
    if rest[0] < short or len(pool) < slots:
        return None
    best: tuple[float, list[ResidentView]] | None = None
    steps = 0

    def search(i: int, chosen: list[ResidentView], freed: int, lost: float) -> None:
        nonlocal best, steps
        if freed >= short and len(chosen) >= slots:
            if best is None or lost < best[0]:
                best = (lost, chosen[:])
            return
        steps += 1
        if (
            i == len(pool) or freed + rest[i] < short or len(chosen) + len(pool) - i < slots
            or (best is not None and lost >= best[0]) or steps > _SEARCH_STEPS
        ):
            return
        chosen.append(pool[i])
        search(i + 1, chosen, freed + pool[i].bytes, lost + pool[i].value)
        chosen.pop()
        search(i + 1, chosen, freed, lost)

    search(0, [], 0, 0.0)
    return best[1] if best is not None else None


class Ledger:
    """Each group's use count, decayed by half every ``half_life`` uses of any group (LRFU-like).

    The manager calls ``used`` whenever a group serves (a load, a switch, a request);
    ``value`` feeds ``ResidentView.value``. Counts outlive evictions: a popular group unloaded to
    make room for a rare one is still worth more than that one when it comes back. The decay lets
    old popularity fade, so a group that stops being used is outlived by ones in use now.
    """

    def __init__(self, half_life: float = HALF_LIFE) -> None:
        self.half_life = half_life
        self._now = 0  # uses so far, of all groups: the clock counts decay by
        self._count: dict[str, tuple[float, int]] = {}  # group -> (count at its last use, that use's time)

    def used(self, group_id: str) -> None:
        """Count a use of ``group_id``."""
        self._now += 1
        self._count[group_id] = (self.value(group_id) + 1.0, self._now)

    def value(self, group_id: str) -> float:
        """What losing ``group_id`` costs now: its decayed use count (0 for a group never used)."""
        count, at = self._count.get(group_id, (0.0, self._now))
        return count * math.pow(0.5, (self._now - at) / self.half_life)

    def forget(self, group_id: str) -> None:
        """Drop everything known about ``group_id`` (it left the catalog)."""
        self._count.pop(group_id, None)


def _mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"
