"""The state JSON (``GET /api/v2/system/state``, ``state_update`` events), built from residency.

Two steps, so that the manager's lock is never held for work that grows with the catalog:
``snapshot`` runs under the lock and copies only what changes under it (slots, pins, current
members, measured bytes, operations, worker status): O(devices x resident groups).
The JSON is built outside it. ``States`` builds the events' states, one after another on the event
thread: it keeps each group's JSON and rebuilds only the groups whose part of the snapshot changed
(a switch: one), so an event costs O(changes), not O(catalog); it walks the catalog again only
when the catalog, the estimates or the warm devices changed. ``render`` builds one state afresh
(``Manager.state()``: the caller's own copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from ..catalog import Catalog, GroupSpec
from ..schema import State
from .bus import EventBus
from .devices import Device
from .estimates import EstimateCache, needed_bytes
from .residency import Residency


@dataclass(frozen=True)
class _SlotView:
    state: str
    device_id: int
    device_ids: list[int]
    shards: list[dict[str, int]]
    in_use: bool  # held by ``run``/``use``


@dataclass(frozen=True)
class _DeviceView:
    device: Device
    accounted: int
    resident: list[str]  # resident group ids, most recently used first
    loading: bool
    status: str
    queue_depth: int


@dataclass(frozen=True)
class Snapshot:
    """What the state JSON of one version needs from residency, copied under the lock."""

    version: int
    catalog: Catalog
    estimates: EstimateCache
    devices: list[_DeviceView]
    slots: dict[str, _SlotView]
    pins: frozenset[str]
    current: dict[str, str]
    measured: dict[str, int]
    warm: frozenset[int]
    operations: list[dict[str, Any]]
    closed: bool


def snapshot(res: Residency, version: int) -> Snapshot:
    """Under the manager's lock: copy residency's changing parts (never walks the catalog)."""
    slots = {
        gid: _SlotView(s.state, s.device_id, s.device_ids, s.shares_json(), s.in_use > 0) for gid, s in res.slots.items()
    }
    devices = []
    for d, w in zip(res.devices, res.workers):
        devices.append(_DeviceView(
            d, res.accounted(d.device_id), [s.group.id for s in res.resident(d.device_id)],
            any(d.device_id in v.device_ids and v.state == "loading" for v in slots.values()),
            w.status, w.queue_depth,
        ))
    return Snapshot(
        version, res.catalog, res.estimates, devices, slots, frozenset(res.pins), dict(res.current),
        dict(res.measured), frozenset(res.warm), [op.to_json() for op in res.ops.values()], res.closed,
    )


class Announcer:
    """The manager's ``state_update`` events: a snapshot per change, taken under the lock, whose
    JSON the event thread builds (``States``), and one more event when a request ends on a device
    the last event showed at work and it is idle now. Going idle is no change of its own (that
    would be an event per request), so without it every subscriber, the server's mirror among them,
    showed the device busy until the next change. ``res`` is set once residency exists."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._states = States()  # built on the bus thread only
        self._at_work: frozenset[int] = frozenset()  # devices the last event showed busy or queued
        self.res: Residency | None = None

    def bump(self) -> None:
        """Under the lock: a change happened. Queue its ``state_update``: the snapshot is taken now,
        the JSON is built on the event thread (outside the lock), from the previous event's JSON
        and what changed since."""
        assert self.res is not None
        snap = snapshot(self.res, self._bus.version + 1)
        self._at_work = frozenset(v.device.device_id for v in snap.devices if v.status != "idle" or v.queue_depth)
        self._bus.emit("state_update", build=lambda: {"state": self._states.render(snap)})

    def settled(self, device_ids: list[int]) -> None:
        """Under the lock, as a request on these devices ends (a sharded group's span): the event
        that says they are idle, if the last one showed one of them at work and it is idle now."""
        assert self.res is not None
        workers = self.res.workers
        if any(d in self._at_work and workers[d].status == "idle" and not workers[d].queue_depth for d in device_ids):
            self.bump()


def render(snap: Snapshot) -> State:
    """Outside the lock: ``{"version", "num_devices", "devices", "groups", "models", "operations"}``, all new."""
    return States().render(snap)


class States:
    """The states of successive snapshots, for one thread (the event bus's).

    Each group's JSON (its entry in ``groups`` and its members' in ``models``) is kept and built
    again only when the group's slot, pin, current member or measured bytes differ from the
    snapshot it was built from. The states share the unchanged entries: subscribers read them,
    never change them.
    """

    def __init__(self) -> None:
        self._base: Snapshot | None = None  # the snapshot the kept entries were built from
        self._inputs: tuple[int, int, frozenset[int]] | None = None  # catalog, estimates, warm devices then
        self._groups: list[dict[str, Any]] = []
        self._models: list[dict[str, Any]] = []
        self._at: dict[str, tuple[int, int, int]] = {}  # group id -> its index, its members' first index and count

    def render(self, snap: Snapshot) -> State:
        """The state of ``snap``: the catalog walked only if it (or an estimate, or a warm device) changed."""
        # read before the walk: a catalog changing during it reads as changed at the next state
        inputs = (snap.catalog.revision, snap.estimates.revision, snap.warm)
        base, self._base = self._base, None  # none until this state is built: a failure rebuilds all next time
        if base is None or inputs != self._inputs:
            self._inputs = inputs
            self._rebuild(snap)
        elif not all(self._update(base, snap, gid) for gid in _changed(base, snap)):
            self._rebuild(snap)
        self._base = snap
        return _state(snap, list(self._groups), list(self._models))

    def _rebuild(self, snap: Snapshot) -> None:
        """Build every group's entries, in the catalog's order."""
        self._groups, self._models, self._at = [], [], {}
        for g in list(snap.catalog.groups.values()):
            models = _models_json(snap, g)
            self._at[g.id] = (len(self._groups), len(self._models), len(models))
            self._groups.append(_group_json(snap, g))
            self._models.extend(models)

    def _update(self, base: Snapshot, snap: Snapshot, group_id: str) -> bool:
        """Build one group's entries again, in place; False if the catalog moved under it (walk it all)."""
        at, g = self._at.get(group_id), snap.catalog.groups.get(group_id)
        if at is None or g is None:
            return at is None and g is None  # a slot of a group no longer in the catalog: not shown
        i, first, count = at
        self._groups[i] = _group_json(snap, g)
        if _placement(base, group_id) != _placement(snap, group_id):
            models = _models_json(snap, g)
            if len(models) != count:
                return False
            self._models[first:first + count] = models
        return True


def _changed(a: Snapshot, b: Snapshot) -> set[str]:
    """The groups whose JSON may differ between two snapshots taken with the same catalog,
    estimates and warm devices (dictionary and set operations, no walk of the catalog)."""
    ids = {gid for gid in a.slots.keys() | b.slots.keys() if a.slots.get(gid) != b.slots.get(gid)}
    ids |= a.pins ^ b.pins
    for before, after in ((a.current, b.current), (a.measured, b.measured)):
        ids.update(gid for gid, _ in before.items() ^ after.items())
    return ids


def _state(snap: Snapshot, groups: list[dict[str, Any]], models: list[dict[str, Any]]) -> State:
    """The whole state: the devices built now, the groups and models given."""
    catalog = snap.catalog
    devices = []
    for v in snap.devices:
        d = v.device
        current = catalog.groups.get(v.resident[0]) if v.resident else None
        devices.append({
            **d.to_json(),
            "memory": d.memory(v.accounted),
            "current_group": {"id": current.id, "name": current.name, "model": snap.current.get(current.id)} if current else None,
            "resident_groups": list(v.resident),
            "loaded_models": [m for gid in v.resident if gid in catalog.groups for m in catalog.groups[gid].members],
            "status": "loading" if v.loading and v.status != "lost" else v.status,  # lost says more
            "queue_depth": v.queue_depth,
        })
    return cast(State, {
        "version": snap.version,
        "num_devices": len(snap.devices),
        "devices": devices,
        "groups": groups,
        "models": models,
        "operations": snap.operations,
        "closed": snap.closed,
    })


def _placement(snap: Snapshot, group_id: str) -> tuple[bool, list[int]]:
    """Whether the group is resident, and on which devices: what its members' JSON depends on."""
    slot = snap.slots.get(group_id)
    resident = slot is not None and slot.state == "resident"
    return resident, slot.device_ids if slot is not None and resident else []


def _group_json(snap: Snapshot, g: GroupSpec) -> dict[str, Any]:
    """The group's entry in ``groups``: the catalog's fields and its live ones."""
    slot = snap.slots.get(g.id)
    resident, on_device = _placement(snap, g.id)
    return {
        **g.to_json(),
        "memory_estimate_bytes": _estimate(snap, g, slot.device_id if slot else 0),
        "measured_bytes": snap.measured.get(g.id),
        "pinned": g.id in snap.pins,
        "resident_on": list(on_device),
        "shards": list(slot.shards) if slot is not None and resident else [],
        "status": "unloaded" if slot is None else "in_use" if resident and slot.in_use else slot.state,
        "current_model": snap.current.get(g.id, g.members[0]),
    }


def _models_json(snap: Snapshot, g: GroupSpec) -> list[dict[str, Any]]:
    """The group's members' entries in ``models``."""
    resident, on_device = _placement(snap, g.id)
    models = []
    for mid in g.members:
        spec = snap.catalog.models.get(mid)
        if spec is None:  # the group is being forgotten (a failed ad-hoc load) right now
            continue
        models.append({"id": mid, "group_id": g.id, "role": spec.role, "is_loaded": resident, "devices": list(on_device)})
    return models


def _estimate(snap: Snapshot, group: GroupSpec, device_id: int) -> int:
    """The group's estimate for display (0 until estimated), as of the snapshot."""
    parts = snap.estimates.peek(group, snap.devices[device_id].device)
    return 0 if parts is None else needed_bytes(parts, snap.measured.get(group.id), device_id in snap.warm)

