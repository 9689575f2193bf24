"""Holds for research access: a slot held by ``run``/``use`` is in use, never a victim, and a load
that needs its room waits for the hold to end; a thread inside a ``use`` block never waits for its
own device's worker, nor does ``run``'s function (``guard``). Part of ``Residency``, over the
load mechanism of ``loads.py``.
"""

from __future__ import annotations

import threading

from ..catalog import GroupSpec
from ..errors import GpuGroupsError
from .loads import Loads
from .slot import Slot
from .worker import current_worker


class Holds(Loads):
    """Holding resident slots for ``run`` and ``use`` (every method under, or taking, the manager's lock)."""

    def hold(self, slot: Slot, holder: int | None, held: list[Slot]) -> None:
        """Under the lock: ``run`` or ``use`` (``holder``: the thread of a ``use`` block) holds the
        slot until ``unhold``. ``held`` gets the slot in the same step as the count, so an interrupt
        can never leave a hold that its caller does not know to end."""
        slot.in_use += 1
        held.append(slot)
        if holder is not None:
            slot.holders.append(holder)
        if not self.touch(slot) and slot.in_use == 1:
            self._changed()

    def unhold(self, slot: Slot, holder: int | None = None) -> None:
        """The hold ends: the slot may be evicted again, and loads waiting for its room look again."""
        with self._lock:
            slot.in_use -= 1
            if holder in slot.holders:
                slot.holders.remove(holder)
            self._use_ended.notify_all()
            if slot.in_use == 0:
                self._changed()

    def guard(self, device_id: int) -> None:
        """``conflict`` if this thread is inside a ``use`` block on the device, or is the worker
        thread running ``run``'s function there: waiting for that device's worker would wait for the
        block or the function, which cannot end while this thread waits. A sharded group's block or
        function holds every device it spans."""
        worker = current_worker()
        with self._lock:
            runs_here = worker is not None and any(
                s.in_use and self.workers[s.device_id] is worker and device_id in s.shares for s in self.slots.values()
            )
        if runs_here:
            raise GpuGroupsError(
                "conflict",
                f"this call comes from the function `m.run` runs on device {device_id}, and would wait "
                "for that device's worker, which is running the function; use the model it was given, "
                "or call after `run` returns",
                {"device_id": device_id},
            )
        me = threading.get_ident()
        with self._lock:
            if any(me in s.holders for s in self.slots.values() if device_id in s.shares):
                raise GpuGroupsError(
                    "conflict",
                    f"device {device_id} is held by a `with m.use(...)` block in this thread, and this call "
                    "would wait for its worker; call the model directly inside the block, or leave it first",
                    {"device_id": device_id},
                )

    def _use_would_make_room(
        self, exc: GpuGroupsError, group: GroupSpec, device_id: int | None, device_ids: list[int] | None
    ) -> bool:
        """Under the lock, after ``insufficient_memory``: whether evicting groups now held by
        ``run``/``use`` (of other threads) would make room, so the load may wait for them."""
        if exc.code != "insufficient_memory":
            return False
        me = threading.get_ident()
        if current_worker() is not None or any(me in s.holders for s in self.slots.values()):
            return False  # from ``run``'s function or a ``use`` block: the hold waited for may be its own
        try:
            self._place(group, device_id, device_ids, in_use_evictable=True)
        except GpuGroupsError:
            return False
        return True
