"""The state JSON (``GET /api/v2/system/state``, ``state_update`` events), built from residency.

Two steps, so that the manager's lock is never held for work that grows with the catalog:
``snapshot`` runs under the lock and copies only what changes under it (slots, pins, current
members, measured bytes, operations, worker status): O(devices x resident groups).
``render`` runs outside it (on the event thread for events, in the caller for ``state()``) and
walks the catalog.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from ..catalog import Catalog, GroupSpec
from ..schema import State
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


def render(snap: Snapshot) -> State:
    """Outside the lock: ``{"version", "num_devices", "devices", "groups", "models", "operations"}``."""
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
            "status": "loading" if v.loading else v.status,
            "queue_depth": v.queue_depth,
        })
    groups, models = [], []
    for g in list(catalog.groups.values()):
        slot = snap.slots.get(g.id)
        resident = slot is not None and slot.state == "resident"
        on_device = slot.device_ids if slot is not None and resident else []
        groups.append({
            **g.to_json(),
            "memory_estimate_bytes": _estimate(snap, g, slot.device_id if slot else 0),
            "measured_bytes": snap.measured.get(g.id),
            "pinned": g.id in snap.pins,
            "resident_on": on_device,
            "shards": list(slot.shards) if slot is not None and resident else [],
            "status": "unloaded" if slot is None else "in_use" if resident and slot.in_use else slot.state,
            "current_model": snap.current.get(g.id, g.members[0]),
        })
        for mid in g.members:
            spec = catalog.models.get(mid)
            if spec is None:  # the group is being forgotten (a failed ad-hoc load) right now
                continue
            models.append({
                "id": mid, "group_id": g.id, "role": spec.role, "is_loaded": resident, "devices": list(on_device),
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


def _estimate(snap: Snapshot, group: GroupSpec, device_id: int) -> int:
    """The group's estimate for display (0 until estimated), as of the snapshot."""
    parts = snap.estimates.peek(group, snap.devices[device_id].device)
    return 0 if parts is None else needed_bytes(parts, snap.measured.get(group.id), device_id in snap.warm)

