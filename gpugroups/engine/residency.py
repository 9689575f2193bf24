"""Residency: which group holds which device. Slots, pins, current members and measured bytes.

A load goes reserve -> load -> admit (or drop): ``reserve`` (under the manager's lock) asks
``placement.place`` for a device and its victims and reserves the estimate; a load thread then
queues the victims' unloads and the group's load on that device's worker, admits the measured
bytes against the budget, and on an out-of-memory evicts what it may and retries once. A group
sharded over several devices has one slot with a share per device; its first device's worker
drives it while the others' workers are held (``Worker.pause``), and everything that acts on a
slot (eviction, unload, pin) acts on all its shares.
A slot held by ``run``/``use`` is in use: never a victim, and a load that needs its room waits
for it. Everything here runs under the manager's lock except the load thread's waits on the worker.
The load mechanism is in ``loads.py``, holds in ``holds.py``, adoption and lost devices in
``adoption.py``, the ``Slot`` itself in ``slot.py``; this room gets groups resident and releases them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from ..catalog import GroupSpec
from ..errors import GpuGroupsError
from .adoption import Adoption
from .calls import Request
from .holds import Holds
from .slot import Slot

__all__ = ["Residency", "Slot"]  # Slot re-exported: the manager imports it from here

T = TypeVar("T")


class Residency(Holds, Adoption):
    """The slots of one manager: getting a group resident and releasing it, over the load mechanism
    (``loads.py``), holds for ``run``/``use`` (``holds.py``) and adoption of what workers hold
    (``adoption.py``).
    """

    # ---- getting a group resident ----------------------------------------------------------
    def ensure(
        self, group: GroupSpec, device_id: int | None, then: Callable[[Slot], Any], device_ids: list[int] | None = None
    ) -> tuple[Slot, bool, Any]:
        """Get the group resident (loading it if needed), then run ``then(slot)`` under the lock.

        ``then`` runs while the slot is known to be resident, so what it does (queue a request,
        set a pin, switch member) cannot interleave with an eviction or an unload. Returns the
        slot, whether this call loaded it, and what ``then`` returned. ``device_ids`` asks for
        the group sharded over exactly those devices (a resident group elsewhere is moved).
        """
        self.check_device(device_id)
        if device_ids is not None:
            if device_id is not None:
                raise GpuGroupsError("invalid_request", "give device_id or device_ids, not both")
            if not isinstance(device_ids, (list, tuple)) or not device_ids:
                raise GpuGroupsError("invalid_request", "device_ids must be a non-empty list of device ids")
            for d in device_ids:
                self.check_device(d, required=True)
            device_ids = list(device_ids)
        if group.id not in self.slots:
            self.estimates.ensure(group, self.devices, retry_failed=True)  # file I/O: before the lock
            if len(self.devices) > 1 and self.estimates.peek(group, self.devices[0]) is not None:
                self.estimates.ensure_blocks(group, self.devices[0])
        loaded = False
        while True:
            mine = None
            with self._lock:
                self.check_open()
                slot = self.slots.get(group.id)
                wanted = [device_id] if device_id is not None else device_ids  # device_ids=[n] is device_id=n
                elsewhere = slot is not None and wanted is not None and wanted != slot.device_ids
                if slot is not None and slot.state == "resident" and elsewhere:
                    if group.id in self.pins:
                        raise GpuGroupsError(
                            "conflict",
                            f"group {group.id!r} is pinned to device {'+'.join(map(str, slot.device_ids))}; unpin it to move it",
                        )
                    # resident elsewhere: move it, unless it cannot go there (then it stays where it is)
                    there, _ = self._place(group, device_id, device_ids, in_use_evictable=True, without=slot)
                    for d in there.device_ids:  # a move there would wait for this thread's hold: before the unload
                        self.guard(d)
                    wait_for: Future[Any] = self.queue_unload(slot)
                elif slot is not None and slot.state == "resident":
                    return slot, loaded, then(slot)
                elif slot is not None:
                    wait_for = slot.done if slot.state == "loading" else slot.gone
                else:
                    try:
                        mine, victims = self._reserve(group, device_id, device_ids)
                    except GpuGroupsError as exc:
                        if not self._use_would_make_room(exc, group, device_id, device_ids):
                            raise
                        self._use_ended.wait()
                        continue
                    threading.Thread(
                        target=self._load, args=(mine, victims), name=f"gpugroups-load-{group.id}", daemon=True
                    ).start()
                    loaded = True
            waiting_on = mine if mine is not None else slot
            if waiting_on is not None:
                self.guard(waiting_on.device_id)
            if mine is not None:
                mine.done.result()  # our own load: its failure is ours to raise
            else:
                _wait(wait_for)

    def kept(self, group_id: str) -> bool:
        """Whether the group is loaded, loading or pinned (an ad-hoc group is then not forgotten)."""
        with self._lock:
            return group_id in self.slots or group_id in self.pins

    def release(self, group: GroupSpec, device_id: int | None) -> list[int] | None:
        """Unload a group (every shard) once its queued requests are answered; the devices it
        spanned, or None if it is not loaded (on ``device_id``)."""
        self.check_device(device_id)
        while True:
            with self._lock:
                slot = self.slots.get(group.id)
                if slot is None or (device_id is not None and device_id not in slot.shares):
                    return None
                self.guard(slot.device_id)
                if slot.state == "resident":
                    self.pins.pop(group.id, None)
                    gone = self.queue_unload(slot)
                    break
                wait_for = slot.done if slot.state == "loading" else slot.gone
            _wait(wait_for)
        gone.result()
        return slot.device_ids

    def queue_process(self, slot: Slot, group_id: str, request: Request) -> Future[dict[str, Any]]:
        """Under the lock: queue a request on a resident slot's first device (``on_span``)."""
        first = self.workers[slot.device_id]

        def submit(after: tuple[Future[None], ...]) -> Future[dict[str, Any]]:
            request.after = after
            return first.process(group_id, request)

        return self.on_span(slot, submit)

    def on_span(self, slot: Slot, submit: Callable[[tuple[Future[None], ...]], Future[T]]) -> Future[T]:
        """Under the lock: ``submit(after)`` queues work on a resident slot's first device. For a
        sharded slot it runs there while the slot's other devices are held (``after``: those holds
        begun), queued now, under the lock, so that every worker sees multi-device work in the same
        order; they are released when the work ends."""
        if len(slot.shares) == 1:
            return submit(())
        release: Future[None] = Future()
        holds, ends = self.pause_span(slot, release)
        fut = submit(holds)
        fut.add_done_callback(lambda _: release.set_result(None))
        return _once_ended(fut, ends)

    def queue_unload(self, slot: Slot) -> Future[None]:
        """Under the lock: mark a resident slot unloading and queue its unload after its requests."""
        slot.state = "unloading"
        self._changed()
        return self._drop(slot)


def _once_ended(fut: Future[T], ends: list[Future[None]]) -> Future[T]:
    """``fut``'s outcome, settled once every one of ``ends`` is done too (they end after it): an
    answer on a sharded group comes when each device it held shows free again, so the state made
    on that answer shows them idle."""
    out: Future[T] = Future()
    lock = threading.Lock()
    settled: list[bool] = []

    def settle(_: Future[Any]) -> None:
        with lock:  # the last of them to be done settles ``out``, once
            if settled or not fut.done() or not all(e.done() for e in ends):
                return
            settled.append(True)
        if fut.exception() is not None:
            out.set_exception(fut.exception())
        else:
            out.set_result(fut.result())

    fut.add_done_callback(settle)
    for e in ends:
        e.add_done_callback(settle)
    return out


def _wait(fut: Future[Any]) -> None:
    """Wait for another caller's load or unload. Its failure is that caller's to report; an
    interrupt (KeyboardInterrupt) is this caller's and propagates."""
    try:
        fut.result()
    except Exception:
        pass
