"""Devices that come with groups or go away: a worker that already holds groups (a Ray actor
outlives the kernel that loaded into them) and a device that becomes unreachable. Part of ``Residency``.
"""

from __future__ import annotations

import functools

from ..catalog import GroupSpec
from ..errors import GpuGroupsError
from .calls import loaded_as
from .devices import Device
from .estimates import folders
from .loads import Loads
from .slot import Slot


class Adoption(Loads):
    """Taking over what workers hold, and letting go of what a lost device held."""

    def adopt(self) -> None:
        """Take over what the workers already hold (Ray actors outlive the kernel that loaded
        into them), pinned as it was, and listen for lost devices. Held groups this catalog does
        not know, or whose entry no longer says what was loaded (members, folders, dtype), are unloaded."""
        for i, w in enumerate(self.workers):
            w.on_lost(functools.partial(self.lose, i))
            for gid, (nbytes, was, pinned) in w.resident().items():
                group = self._as_loaded(gid, was, self.devices[i])
                if group is None or gid in self.slots:
                    w.unload(gid)
                    continue
                self.estimates.ensure(group, self.devices)
                parts = self.estimates.peek(group, self.devices[i], False) or {}
                # no current member: the worker does not say it, so the first load names it
                slot = Slot(group, {i: nbytes + parts.get("reserve_bytes", 0)}, state="resident")
                slot.done.set_result(slot)
                with self._lock:
                    self.slots[gid], self.measured[gid] = slot, nbytes
                    if pinned:
                        self.pins[gid] = [i]
                    self.warm.add(i)  # its device's context exists already
                    self._changed()

    def _as_loaded(self, gid: str, was: str, device: Device) -> GroupSpec | None:
        """The catalog's group ``gid`` if loading it on ``device`` now would load what ``was`` says."""
        try:
            group = self.catalog.group(gid)
            now = loaded_as(group, folders(self.catalog, group), self.estimates.dtype_for(group, device))
        except GpuGroupsError:  # unknown now, or its files are gone
            return None
        return group if now == was else None

    def lose(self, device_id: int) -> None:
        """A device became unreachable: its resident groups leave (loads and unloads under way
        fail on their own through the worker), a sharded one unloaded where its first device lives on."""
        with self._lock:
            gone = [s for s in self.slots.values() if device_id in s.shares and s.state == "resident"]
            for s in gone:
                del self.slots[s.group.id]
                self.pins.pop(s.group.id, None)
            self._changed()
        for s in gone:
            if s.device_id != device_id:  # a sharded group's first device holds the whole model: free it
                self.workers[s.device_id].unload(s.group.id)
            if not s.gone.done():
                s.gone.set_result(None)
