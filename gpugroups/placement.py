"""Placement policy: where a group goes and what must leave first. Pure: no torch, no I/O.

``place`` is a function of a state snapshot (``DeviceView``s), so it can be unit-tested and
replayed on traces (``bench/placement_trace.py``). The order of preference: (1) a device where
the group is already resident; (2) a device whose free budget fits the estimate; (3) evict the
least valuable groups that are neither pinned nor serving, on the device where that loses the
least value; (4) ``insufficient_memory`` naming the estimate and each device's room. An explicit
``device_id`` (or a pin's affinity) restricts the choice to that device.

A resident's value is GreedyDual-Size-Frequency's (Cherkasova, 1998), kept by a ``Ledger``:
``clock + uses / size``, where ``clock`` rises to the value of each evicted group. Small, often
used groups stay; large, rarely used ones go first; and since every new use is priced at the
current clock, a group that was hot long ago ages out, as under LRU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import GpuGroupsError


@dataclass(frozen=True)
class ResidentView:
    """A group resident (or loading) on a device, as placement sees it."""

    group_id: str
    bytes: int
    last_used: float
    pinned: bool = False
    busy: bool = False  # serving requests, held by run/use, or being loaded: never a victim
    value: float = 0.0  # what keeping it is worth (``Ledger.value``); the least valuable goes first

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
class Decision:
    """Where to load: the device, the groups to unload there first, and whether it is already resident."""

    device_id: int
    evict: tuple[str, ...] = ()
    resident: bool = False


def place(
    group_id: str,
    need_bytes: int,
    devices: Sequence[DeviceView],
    device_id: int | None = None,
    max_groups_per_device: int | None = None,
) -> Decision:
    """Choose a device for ``group_id`` needing ``need_bytes``; raise ``insufficient_memory`` if none.

    With ``device_id`` only that device is considered (the caller moves a group resident
    elsewhere). Without it, fitting devices are preferred over evicting ones; among fitting
    devices the one with the most free bytes wins (spreading load), among evicting ones the
    one whose victims are worth least together, then the one that unloads the fewest bytes.
    """
    if device_id is not None:
        candidates = [d for d in devices if d.device_id == device_id]
        if not candidates:
            raise GpuGroupsError("unknown_device", f"unknown device {device_id!r}")
    else:
        candidates = list(devices)
    for d in candidates:
        if any(r.group_id == group_id for r in d.residents):
            return Decision(d.device_id, resident=True)

    fitting = [d for d in candidates if d.free_bytes >= need_bytes and _room_for_one(d, max_groups_per_device)]
    if fitting:
        best = max(fitting, key=lambda d: (d.free_bytes, -d.device_id))
        return Decision(best.device_id)

    options = []
    for d in candidates:
        victims = _victims(d, need_bytes, max_groups_per_device)
        if victims is not None:
            lost = sum(r.value for r in victims)
            cost = sum(r.bytes for r in victims)
            options.append((lost, cost, len(victims), d.device_id, tuple(r.group_id for r in victims)))
    if options:
        *_, dev, evict = min(options)
        return Decision(dev, evict=evict)

    rooms = [
        {
            "device_id": d.device_id,
            "free_bytes": d.free_bytes,
            "evictable_bytes": sum(r.bytes for r in d.residents if r.evictable),
        }
        for d in candidates
    ]
    where = "; ".join(
        f"device {r['device_id']}: {_mib(r['free_bytes'])} free + {_mib(r['evictable_bytes'])} evictable" for r in rooms
    )
    raise GpuGroupsError(
        "insufficient_memory",
        f"group {group_id!r} needs an estimated {_mib(need_bytes)}; no device has room ({where})",
        {"group_id": group_id, "estimate_bytes": need_bytes, "devices": rooms},
    )


def _room_for_one(d: DeviceView, max_groups: int | None) -> bool:
    return max_groups is None or len(d.residents) < max_groups


def _victims(d: DeviceView, need: int, max_groups: int | None) -> list[ResidentView] | None:
    """The least valuable evictable groups (least recently used first among equals) whose
    unloading makes ``need`` fit, or None."""
    free, count = d.free_bytes, len(d.residents)
    chosen: list[ResidentView] = []
    for r in sorted((r for r in d.residents if r.evictable), key=lambda r: (r.value, r.last_used)):
        if free >= need and (max_groups is None or count < max_groups):
            break
        chosen.append(r)
        free += r.bytes
        count -= 1
    if free >= need and (max_groups is None or count < max_groups):
        return chosen
    return None


class Ledger:
    """GreedyDual-Size-Frequency bookkeeping: each group's uses and value, and the clock.

    The manager calls ``used`` whenever a group serves (a load, a switch, a request) and
    ``evicted`` when placement unloads one to make room; ``value`` feeds ``ResidentView.value``.
    As in GDSF, an evicted group starts counting its uses afresh when it comes back.
    """

    def __init__(self) -> None:
        self.clock = 0.0
        self._uses: dict[str, int] = {}
        self._value: dict[str, float] = {}

    def used(self, group_id: str, size_bytes: int) -> None:
        """Count a use of ``group_id`` (``size_bytes`` resident) and reprice it at the clock."""
        uses = self._uses[group_id] = self._uses.get(group_id, 0) + 1
        self._value[group_id] = self.clock + uses / max(size_bytes, 1)

    def evicted(self, group_id: str) -> None:
        """``group_id`` was unloaded to make room: the clock rises to its value."""
        self.clock = max(self.clock, self._value.pop(group_id, 0.0))
        self._uses.pop(group_id, None)

    def value(self, group_id: str) -> float:
        """What keeping ``group_id`` is worth now (0 for a group never used)."""
        return self._value.get(group_id, 0.0)

    def forget(self, group_id: str) -> None:
        """Drop everything known about ``group_id`` (it left the catalog)."""
        self._uses.pop(group_id, None)
        self._value.pop(group_id, None)


def _mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"
