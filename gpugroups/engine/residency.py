"""Residency: which group holds which device. Slots, pins, current members and measured bytes.

A load goes reserve -> load -> admit (or drop): ``reserve`` (under the manager's lock) asks
``placement.place`` for a device and its victims and reserves the estimate; a load thread then
queues the victims' unloads and the group's load on that device's worker, admits the measured
bytes against the budget, and on an out-of-memory evicts what it may and retries once.
Everything here runs under the manager's lock except the load thread's waits on the worker.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..catalog import Catalog, GroupSpec
from ..errors import GpuGroupsError
from ..placement import DeviceView, Ledger, ResidentView, place
from .bus import EventBus
from .devices import Device
from .estimates import EstimateCache, folders
from .worker import OutOfMemory, Worker


@dataclass
class Slot:
    """A group's place on a device: loading, resident or unloading."""

    group: GroupSpec
    device_id: int
    bytes: int
    state: str = "loading"  # "loading" | "resident" | "unloading"
    last_used: float = field(default_factory=time.monotonic)
    inflight: int = 0
    done: Future[Slot] = field(default_factory=Future)  # loaded (result) or failed (exception)
    gone: Future[None] = field(default_factory=Future)  # set once unloaded


@dataclass
class Operation:
    """A long-running operation shown in the state JSON."""

    id: str
    op: str
    group_id: str
    device_id: int
    progress: float = 0.0
    stage: str = "queued"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "op": self.op, "group_id": self.group_id, "device_id": self.device_id,
            "progress": round(self.progress, 4), "stage": self.stage,
        }


class Residency:
    """The slots of one manager and the mechanism that fills and empties them.

    ``changed`` is called under ``lock`` after every change (the manager publishes the state).
    """

    def __init__(
        self,
        devices: list[Device],
        workers: list[Worker],
        catalog: Catalog,
        estimates: EstimateCache,
        lock: threading.RLock,
        bus: EventBus,
        changed: Callable[[], None],
        max_groups_per_device: int | None,
    ) -> None:
        self.devices, self.workers, self.catalog, self.estimates = devices, workers, catalog, estimates
        self.max_groups_per_device = max_groups_per_device
        self.slots: dict[str, Slot] = {}
        self.pins: dict[str, int | None] = {}
        self.current: dict[str, str] = {}  # group id -> current member
        self.measured: dict[str, int] = {}
        self.warm: set[int] = set()  # devices whose context (overhead) already exists
        self.ops: dict[str, Operation] = {}
        self.ledger = Ledger()  # what each group is worth keeping (placement's eviction order)
        self.closed = False
        self._lock, self._bus, self._changed = lock, bus, changed
        self._op_ids = itertools.count(1)

    # ---- devices that come with groups or go away -------------------------------------------
    def adopt(self) -> None:
        """Take over what the workers already hold (Ray actors outlive the kernel that loaded
        into them) and listen for lost devices. Held groups this catalog does not know are unloaded."""
        for i, w in enumerate(self.workers):
            w.on_lost(functools.partial(self.lose, i))
            for gid, nbytes in w.resident().items():
                try:
                    group = self.catalog.group(gid)
                except GpuGroupsError:
                    group = None
                if group is None or gid in self.slots:
                    w.unload(gid)
                    continue
                self.estimates.ensure(group, self.devices)
                parts = self.estimates.peek(group, self.devices[i], False) or {}
                slot = Slot(group, i, nbytes + parts.get("reserve_bytes", 0), state="resident")
                slot.done.set_result(slot)
                with self._lock:
                    self.slots[gid], self.measured[gid] = slot, nbytes
                    self.warm.add(i)
                    self.current.setdefault(gid, group.members[0])
                    self._changed()

    def lose(self, device_id: int) -> None:
        """A device became unreachable: its resident groups leave (loads and unloads under way
        fail on their own through the worker)."""
        with self._lock:
            gone = [s for s in self.slots.values() if s.device_id == device_id and s.state == "resident"]
            for s in gone:
                del self.slots[s.group.id]
                self.pins.pop(s.group.id, None)
            self._changed()
        for s in gone:
            if not s.gone.done():
                s.gone.set_result(None)

    # ---- getting a group resident ----------------------------------------------------------
    def ensure(self, group: GroupSpec, device_id: int | None, then: Callable[[Slot], Any]) -> tuple[Slot, bool, Any]:
        """Get the group resident (loading it if needed), then run ``then(slot)`` under the lock.

        ``then`` runs while the slot is known to be resident, so what it does (queue a request,
        set a pin, switch member) cannot interleave with an eviction or an unload. Returns the
        slot, whether this call loaded it, and what ``then`` returned.
        """
        self.check_device(device_id)
        if group.id not in self.slots:
            self.estimates.ensure(group, self.devices, retry_failed=True)  # file I/O: before the lock
        loaded = False
        while True:
            mine = None
            with self._lock:
                if self.closed:
                    raise GpuGroupsError("invalid_request", "the manager is closed")
                slot = self.slots.get(group.id)
                if slot is not None and slot.state == "resident" and device_id not in (None, slot.device_id):
                    if group.id in self.pins:
                        raise GpuGroupsError(
                            "conflict", f"group {group.id!r} is pinned to device {slot.device_id}; unpin it to move it"
                        )
                    wait_for: Future[Any] = self.queue_unload(slot)  # resident elsewhere: move it
                elif slot is not None and slot.state == "resident":
                    return slot, loaded, then(slot)
                elif slot is not None:
                    wait_for = slot.done if slot.state == "loading" else slot.gone
                else:
                    mine, victims = self._reserve(group, device_id)
                    threading.Thread(
                        target=self._load, args=(mine, victims), name=f"gpugroups-load-{group.id}", daemon=True
                    ).start()
                    loaded = True
            if mine is not None:
                mine.done.result()  # our own load: its failure is ours to raise
            else:
                _wait(wait_for)

    def release(self, group: GroupSpec, device_id: int | None) -> int | None:
        """Unload a group once its queued requests are answered; its device, or None if not loaded there."""
        self.check_device(device_id)
        while True:
            with self._lock:
                slot = self.slots.get(group.id)
                if slot is None or (device_id is not None and slot.device_id != device_id):
                    return None
                if slot.state == "resident":
                    self.pins.pop(group.id, None)
                    gone = self.queue_unload(slot)
                    break
                wait_for = slot.done if slot.state == "loading" else slot.gone
            _wait(wait_for)
        gone.result()
        return slot.device_id

    def queue_unload(self, slot: Slot) -> Future[None]:
        """Under the lock: mark a resident slot unloading and queue its unload after its requests."""
        slot.state = "unloading"
        self._changed()
        return self._drop(slot)

    def _reserve(self, group: GroupSpec, device_id: int | None) -> tuple[Slot, list[Slot]]:
        """Under the lock: choose a device, mark the victims, reserve the estimate. Emits a change."""
        target = device_id if device_id is not None else self.pins.get(group.id)
        need = self.estimate(group, target if target is not None else 0, strict=True)
        decision = place(group.id, need, self.views(), target, self.max_groups_per_device)
        if target is None and decision.device_id != 0:
            need = self.estimate(group, decision.device_id, strict=True)
        victims = [self.slots[g] for g in decision.evict]
        for v in victims:
            v.state = "unloading"
            self.ledger.evicted(v.group.id)
        slot = Slot(group, decision.device_id, need)
        self.slots[group.id] = slot
        self.ops[group.id] = Operation(f"op-{next(self._op_ids)}", "load", group.id, decision.device_id)
        self._changed()
        return slot, victims

    def _load(self, slot: Slot, victims: list[Slot]) -> None:
        """On a load thread: drop the victims, load on the worker, admit; settle ``slot.done``."""
        group, dev = slot.group, self.devices[slot.device_id]
        worker = self.workers[slot.device_id]
        try:
            for v in victims:
                self._drop(v)  # queued before the load on the same worker
            paths = folders(self.catalog, group)
            dtype = self.estimates.dtype_for(group, dev)
            for attempt in (1, 2):
                try:
                    measured = worker.load(group, paths, dtype, lambda p, s: self._progress(slot, p, s)).result()
                    self._admit(slot, measured)
                    break
                except OutOfMemory:
                    if attempt == 2 or not self._evict_for(slot):
                        raise
        except BaseException as exc:
            with self._lock:
                self.slots.pop(group.id, None)
                self.ops.pop(group.id, None)
                self._changed()
            slot.done.set_exception(_failure(group, exc))
            slot.gone.set_result(None)
            return
        with self._lock:
            slot.state = "resident"
            self.ops.pop(group.id, None)
            self.current.setdefault(group.id, group.members[0])
            self._changed()
        slot.done.set_result(slot)

    def _admit(self, slot: Slot, measured: int) -> None:
        """Account the loaded group; one over the device's budget is an OOM (virtual devices too)."""
        dev = self.devices[slot.device_id]
        parts = self.estimates.peek(slot.group, dev, strict=True) or {}
        # The device overhead (CUDA context) is the device's, not the group's: NVML shows it
        # as used from the first load on, so the slot accounts weights + reserve only.
        total = measured + parts.get("reserve_bytes", 0)
        with self._lock:
            others = sum(s.bytes for s in self.slots.values() if s.device_id == slot.device_id and s is not slot)
            fits = dev.kind == "cuda" or others + total <= dev.budget_bytes
            if fits:
                slot.bytes = total
                self.measured[slot.group.id] = measured
                self.warm.add(slot.device_id)
        if not fits:
            self.workers[slot.device_id].unload(slot.group.id).result()
            raise OutOfMemory(
                f"group {slot.group.id!r} takes {total} bytes; device {dev.device_id} has "
                f"{dev.budget_bytes - others} of its {dev.budget_bytes}-byte budget left"
            )

    def _evict_for(self, slot: Slot) -> bool:
        """After an OOM: queue the unload of every evictable group on the slot's device; False if none."""
        with self._lock:
            victims = [
                s for s in self.slots.values()
                if s.device_id == slot.device_id and s is not slot and s.state == "resident"
                and s.inflight == 0 and s.group.id not in self.pins
            ]
            for v in victims:
                v.state = "unloading"
        for v in victims:
            self._drop(v)
        return bool(victims)

    def _drop(self, slot: Slot) -> Future[None]:
        """Queue a slot's unload on its worker; forget the slot once done. Returns ``slot.gone``."""

        def forget(_: Future[None]) -> None:
            with self._lock:
                if self.slots.get(slot.group.id) is slot:
                    del self.slots[slot.group.id]
                self._changed()
            if not slot.gone.done():
                slot.gone.set_result(None)

        self.workers[slot.device_id].unload(slot.group.id).add_done_callback(forget)
        return slot.gone

    def _progress(self, slot: Slot, progress: float, stage: str) -> None:
        with self._lock:
            op = self.ops.get(slot.group.id)
            if op is None:
                return
            op.progress, op.stage = progress, stage
            self._bus.emit(
                "load_progress", operation_id=op.id, group_id=op.group_id, device_id=op.device_id,
                progress=op.progress, stage=stage,
            )

    # ---- reading (under the lock) ------------------------------------------------------------
    def estimate(self, group: GroupSpec, device_id: int, strict: bool = False) -> int:
        """Bytes the group needs resident on a device; measured weights replace estimated ones once known.

        Without ``strict`` an unestimable (or not yet estimated) group counts 0 for display.
        """
        parts = self.estimates.peek(group, self.devices[device_id], strict)
        if parts is None:
            return 0
        weights = self.measured.get(group.id, parts["weights_bytes"] + parts["adapters_bytes"])
        overhead = 0 if device_id in self.warm else parts["overhead_bytes"]
        return int(weights + parts["reserve_bytes"] + overhead)

    def views(self) -> list[DeviceView]:
        """What ``placement.place`` sees of each device."""
        views = []
        for d in self.devices:
            residents = tuple(
                ResidentView(
                    s.group.id, s.bytes, s.last_used, s.group.id in self.pins,
                    s.state != "resident" or s.inflight > 0, self.ledger.value(s.group.id),
                )
                for s in self.slots.values() if s.device_id == d.device_id and s.state != "unloading"
            )
            free = 0 if self.workers[d.device_id].status == "lost" else d.memory(self.accounted(d.device_id))["free_bytes"]
            views.append(DeviceView(d.device_id, free, residents))
        return views

    def accounted(self, device_id: int) -> int:
        """Bytes this manager holds or has reserved on a device."""
        return sum(s.bytes for s in self.slots.values() if s.device_id == device_id)

    def resident(self, device_id: int) -> list[Slot]:
        """The device's resident slots, most recently used first."""
        on = [s for s in self.slots.values() if s.device_id == device_id and s.state == "resident"]
        return sorted(on, key=lambda s: -s.last_used)

    def touch(self, slot: Slot) -> bool:
        """Mark a slot used now; emits (and returns True) if its device's current group changed."""
        before = [s.group.id for s in self.resident(slot.device_id)[:1]]
        slot.last_used = time.monotonic()
        self.ledger.used(slot.group.id, slot.bytes)
        if [s.group.id for s in self.resident(slot.device_id)[:1]] != before:
            self._changed()
            return True
        return False

    def check_device(self, device_id: int | None, required: bool = False) -> None:
        """``unknown_device`` unless ``device_id`` names a device (or is None and not ``required``)."""
        if device_id is None and not required:
            return
        if not isinstance(device_id, int) or isinstance(device_id, bool) or not 0 <= device_id < len(self.devices):
            raise GpuGroupsError(
                "unknown_device", f"unknown device {device_id!r}; devices are 0..{len(self.devices) - 1}"
            )


def _failure(group: GroupSpec, exc: BaseException) -> GpuGroupsError:
    """The error a failed load reports: ``insufficient_memory``, its own code, or ``load_failed``."""
    if isinstance(exc, OutOfMemory):
        return GpuGroupsError(
            "insufficient_memory", f"group {group.id!r} does not fit: {exc}", {"group_id": group.id, "cause": str(exc)}
        )
    if isinstance(exc, GpuGroupsError) and exc.code in ("insufficient_memory", "unknown_model", "load_failed"):
        return exc
    cause = exc.message if isinstance(exc, GpuGroupsError) else f"{type(exc).__name__}: {exc}"
    return GpuGroupsError(
        "load_failed", f"loading group {group.id!r} failed: {cause}", {"group_id": group.id, "cause": cause}
    )


def _wait(fut: Future[Any]) -> None:
    """Wait for another caller's load or unload. Its failure is that caller's to report; an
    interrupt (KeyboardInterrupt) is this caller's and propagates."""
    try:
        fut.result()
    except Exception:
        pass
