"""The state JSON (``GET /api/v2/system/state``, ``state_update`` events), built from residency.

Called under the manager's lock; reads only what is in memory (cached estimates, NVML figures
cached for half a second), so building it stays cheap enough to do after every change.
"""

from __future__ import annotations

from typing import cast

from ..schema import State
from .residency import Residency


def build_state(res: Residency, version: int) -> State:
    """``{"version", "num_devices", "devices", "groups", "models", "operations", "closed"}``."""
    devices = []
    for d, w in zip(res.devices, res.workers):
        on = res.resident(d.device_id)
        current = on[0].group if on else None
        loading = any(s.device_id == d.device_id and s.state == "loading" for s in res.slots.values())
        devices.append({
            **d.to_json(),
            "memory": d.memory(res.accounted(d.device_id)),
            "current_group": {"id": current.id, "name": current.name, "model": res.current.get(current.id)} if current else None,
            "resident_groups": [s.group.id for s in on],
            "loaded_models": [m for s in on for m in s.group.members],
            "status": "loading" if loading else w.status,
            "queue_depth": w.queue_depth,
        })
    groups, models = [], []
    for g in list(res.catalog.groups.values()):
        slot = res.slots.get(g.id)
        resident = slot is not None and slot.state == "resident"
        on_device = [slot.device_id] if slot is not None and resident else []
        groups.append({
            **g.to_json(),
            "memory_estimate_bytes": res.estimate(g, slot.device_id if slot else 0),
            "measured_bytes": res.measured.get(g.id),
            "pinned": g.id in res.pins,
            "resident_on": on_device,
            "status": slot.state if slot else "unloaded",
            "current_model": res.current.get(g.id, g.members[0]),
        })
        for mid in g.members:
            models.append({
                "id": mid, "group_id": g.id, "role": res.catalog.models[mid].role,
                "is_loaded": resident, "devices": list(on_device),
            })
    return cast(State, {
        "version": version,
        "num_devices": len(res.devices),
        "devices": devices,
        "groups": groups,
        "models": models,
        "operations": [op.to_json() for op in res.ops.values()],
        "closed": res.closed,
    })
