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
from ..placement import Decision, DeviceView, Layout, Ledger, ResidentView, place
from .bus import EventBus
from .devices import Device
from .estimates import EstimateCache, folders, needed_bytes
from .worker import OutOfMemory, Span, Worker


@dataclass
class Slot:
    """A group's place: its bytes on each device it spans (in layer order); loading, resident or unloading."""

    group: GroupSpec
    shares: dict[int, int]
    weights: dict[int, int] = field(default_factory=dict)  # placement's layer bytes per device (sharded only)
    state: str = "loading"  # "loading" | "resident" | "unloading"
    last_used: float = field(default_factory=time.monotonic)
    inflight: int = 0
    in_use: int = 0  # ``run`` calls and ``use`` blocks holding it
    holders: list[int] = field(default_factory=list)  # threads inside a ``use`` block on it
    done: Future[Slot] = field(default_factory=Future)  # loaded (result) or failed (exception)
    gone: Future[None] = field(default_factory=Future)  # set once unloaded

    @property
    def device_id(self) -> int:
        """The first device: the one whose worker holds the group."""
        return next(iter(self.shares))

    @property
    def device_ids(self) -> list[int]:
        """Every device the group spans, in layer order."""
        return list(self.shares)

    @property
    def bytes(self) -> int:
        return sum(self.shares.values())

    def shares_json(self) -> list[dict[str, int]]:
        """``[{"device_id", "bytes"}]`` in layer order (the state JSON's ``shards``)."""
        return [{"device_id": d, "bytes": b} for d, b in self.shares.items()]

    @property
    def busy(self) -> bool:
        """Serving requests or held by ``run``/``use``: not to be evicted now."""
        return self.inflight > 0 or self.in_use > 0


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
        self.pins: dict[str, list[int]] = {}  # group id -> the devices it is pinned to
        self.current: dict[str, str] = {}  # group id -> current member
        self.measured: dict[str, int] = {}
        self.warm: set[int] = set()  # devices whose context (overhead) already exists
        self.ops: dict[str, Operation] = {}
        self.ledger = Ledger()  # what each group is worth keeping (placement's eviction order)
        self.closed = False
        self._lock, self._bus, self._changed = lock, bus, changed
        self._use_ended = threading.Condition(lock)
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
                slot = Slot(group, {i: nbytes + parts.get("reserve_bytes", 0)}, state="resident")
                slot.done.set_result(slot)
                with self._lock:
                    self.slots[gid], self.measured[gid] = slot, nbytes
                    self.warm.add(i)  # no current member: the worker does not know it, so the first load names it
                    self._changed()

    def lose(self, device_id: int) -> None:
        """A device became unreachable: its resident groups leave (loads and unloads under way
        fail on their own through the worker)."""
        with self._lock:
            gone = [s for s in self.slots.values() if device_id in s.shares and s.state == "resident"]
            for s in gone:
                del self.slots[s.group.id]
                self.pins.pop(s.group.id, None)
            self._changed()
        for s in gone:
            if not s.gone.done():
                s.gone.set_result(None)

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
                if self.closed:
                    raise GpuGroupsError("invalid_request", "the manager is closed")
                slot = self.slots.get(group.id)
                elsewhere = (device_id is not None and device_id not in slot.shares) or (
                    device_ids is not None and device_ids != slot.device_ids
                ) if slot is not None else False
                if slot is not None and slot.state == "resident" and elsewhere:
                    if group.id in self.pins:
                        raise GpuGroupsError(
                            "conflict",
                            f"group {group.id!r} is pinned to device {'+'.join(map(str, slot.device_ids))}; unpin it to move it",
                        )
                    wait_for: Future[Any] = self.queue_unload(slot)  # resident elsewhere: move it
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

    def queue_unload(self, slot: Slot) -> Future[None]:
        """Under the lock: mark a resident slot unloading and queue its unload after its requests."""
        slot.state = "unloading"
        self._changed()
        return self._drop(slot)

    # ---- run and use: holding a resident group -----------------------------------------------
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
        """``conflict`` if this thread is inside a ``use`` block on the device: waiting for that
        device's worker would wait for the block, which cannot end while this thread waits."""
        me = threading.get_ident()
        with self._lock:
            if any(me in s.holders for s in self.slots.values() if s.device_id == device_id):
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
        if any(me in s.holders for s in self.slots.values()):
            return False
        try:
            self._place(group, device_id, device_ids, in_use_evictable=True)
        except GpuGroupsError:
            return False
        return True

    def _place(
        self, group: GroupSpec, device_id: int | None, device_ids: list[int] | None, in_use_evictable: bool = False
    ) -> tuple[Decision, int]:
        """Under the lock: placement's decision for the group, and the bytes it needs on its first device."""
        pinned = self.pins.get(group.id)
        if device_id is None and device_ids is None and pinned is not None:  # a pin's affinity
            device_id, device_ids = (pinned[0], None) if len(pinned) == 1 else (None, pinned)
        first = device_id if device_id is not None else (device_ids[0] if device_ids else 0)
        need = self.estimate(group, first, strict=True)
        decision = place(
            group.id, need, self.views(in_use_evictable), device_id, self.max_groups_per_device, device_ids,
            self._layout(group),
        )
        return decision, need

    def _reserve(self, group: GroupSpec, device_id: int | None, device_ids: list[int] | None) -> tuple[Slot, list[Slot]]:
        """Under the lock: choose the device(s), mark the victims, reserve the estimate. Emits a change."""
        decision, _ = self._place(group, device_id, device_ids)
        if device_ids is not None and list(decision.device_ids) != list(device_ids):
            # e.g. a model with fewer layer blocks than devices: loading it on fewer devices than
            # asked would never satisfy the request (and ``ensure`` would move it forever)
            raise GpuGroupsError(
                "invalid_request",
                f"group {group.id!r} cannot be laid out over exactly devices {list(device_ids)}; "
                f"it would span {list(decision.device_ids)}",
                {"group_id": group.id, "device_ids": list(device_ids)},
            )
        if len(decision.shares) > 1:
            slot = Slot(group, {s.device_id: s.bytes for s in decision.shares})
            slot.weights = {s.device_id: s.weight_bytes for s in decision.shares}
        else:
            slot = Slot(group, {decision.device_id: self.estimate(group, decision.device_id, strict=True)})
        victims = [self.slots[g] for g in decision.evict]
        for v in victims:
            v.state = "unloading"
            self.ledger.evicted(v.group.id)
        self.slots[group.id] = slot
        self.ops[group.id] = Operation(f"op-{next(self._op_ids)}", "load", group.id, decision.device_id)
        self._changed()
        return slot, victims

    def _layout(self, group: GroupSpec) -> Layout | None:
        """Under the lock: how the group splits over devices, for placement (None: it cannot)."""
        blocks = self.estimates.blocks(group, self.devices[0])
        parts = self.estimates.peek(group, self.devices[0])
        if not blocks or parts is None or len(self.devices) < 2:
            return None
        weights = self.measured.get(group.id, parts["weights_bytes"] + parts["adapters_bytes"])
        scale = weights / sum(blocks)  # adapters sit beside their layers: spread them pro rata
        fixed = {}
        for d in self.devices:
            p = self.estimates.peek(group, d) or parts
            fixed[d.device_id] = p["reserve_bytes"] + (0 if d.device_id in self.warm else p["overhead_bytes"])
        return Layout(tuple(int(b * scale) + 1 for b in blocks), fixed)

    def _load(self, slot: Slot, victims: list[Slot]) -> None:
        """On a load thread: drop the victims, load on the worker(s), admit; settle ``slot.done``."""
        group, dev = slot.group, self.devices[slot.device_id]
        try:
            paths = folders(self.catalog, group)
            dtype = self.estimates.dtype_for(group, dev)
            for attempt in (1, 2):
                try:
                    measured = self._start_load(slot, victims if attempt == 1 else [], paths, dtype)()
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

    def _start_load(
        self, slot: Slot, victims: list[Slot], paths: dict[str, Any], dtype: str
    ) -> Callable[[], dict[int, int]]:
        """Queue the victims' unloads and the load (with holds on a span's other devices), all
        under the lock so every worker sees multi-device work in one order; returns a waiter
        for the measured bytes per device."""
        group, first = slot.group, slot.device_id
        worker = self.workers[first]

        def progress(p: float, stage: str) -> None:
            self._progress(slot, p, stage)

        with self._lock:
            for v in victims:
                self._drop(v)  # queued before the load on the same worker(s)
            if len(slot.shares) == 1:
                single = worker.load(group, paths, dtype, progress)
                return lambda: {first: single.result()}
            release: Future[None] = Future()
            holds = tuple(self.workers[d].pause(release) for d in slot.device_ids[1:])
            last = slot.device_ids[-1]
            weights = [slot.weights[d] for d in slot.device_ids]
            # the last device may take what it has room for, so accelerate's own rounding never spills
            weights[-1] = max(weights[-1], self.devices[last].memory(self.accounted(last) - slot.shares[last])["free_bytes"])
            span = Span(tuple(self.devices[d].backing for d in slot.device_ids), tuple(weights), holds)
            sharded = worker.load_sharded(group, paths, dtype, progress, span)
            sharded.add_done_callback(lambda _: release.set_result(None))
        return lambda: dict(zip(slot.device_ids, sharded.result()))

    def _admit(self, slot: Slot, measured: dict[int, int]) -> None:
        """Account the loaded group per device; a device over its budget is an OOM (virtual devices too)."""
        parts = self.estimates.peek(slot.group, self.devices[slot.device_id], strict=True) or {}
        # The device overhead (CUDA context) is the device's, not the group's: NVML shows it
        # as used from the first load on, so each share accounts weights + reserve only.
        totals = {d: b + parts.get("reserve_bytes", 0) for d, b in measured.items()}
        with self._lock:
            over = []
            for d, total in totals.items():
                dev = self.devices[d]
                others = sum(s.shares.get(d, 0) for s in self.slots.values() if s is not slot)
                if dev.kind != "cuda" and others + total > dev.budget_bytes:
                    over.append(f"device {d} has {dev.budget_bytes - others} of its {dev.budget_bytes}-byte budget left for {total}")
            if not over:
                slot.shares = totals
                self.measured[slot.group.id] = sum(measured.values())
                self.warm.update(totals)
        if over:
            self.workers[slot.device_id].unload(slot.group.id).result()
            raise OutOfMemory(f"group {slot.group.id!r} takes {sum(totals.values())} bytes; " + "; ".join(over))

    def _evict_for(self, slot: Slot) -> bool:
        """After an OOM: queue the unload of every evictable group on the slot's devices; False if none."""
        with self._lock:
            victims = [
                s for s in self.slots.values()
                if set(s.shares) & set(slot.shares) and s is not slot and s.state == "resident"
                and not s.busy and s.group.id not in self.pins
            ]
            for v in victims:
                v.state = "unloading"
            for v in victims:
                self._drop(v)
        return bool(victims)

    def _drop(self, slot: Slot) -> Future[None]:
        """Queue a slot's unload on its (first device's) worker; forget the slot once done. Returns ``slot.gone``."""

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
        return needed_bytes(parts, self.measured.get(group.id), device_id in self.warm)

    def views(self, in_use_evictable: bool = False) -> list[DeviceView]:
        """What ``placement.place`` sees of each device (``in_use_evictable``: as if no ``run``/``use`` held any group)."""
        views = []
        for d in self.devices:
            residents = tuple(
                ResidentView(
                    s.group.id, s.shares[d.device_id], s.last_used, s.group.id in self.pins,
                    s.state != "resident" or s.inflight > 0 or (s.in_use > 0 and not in_use_evictable),
                    self.ledger.value(s.group.id),
                )
                for s in self.slots.values() if d.device_id in s.shares and s.state != "unloading"
            )
            free = 0 if self.workers[d.device_id].status == "lost" else d.memory(self.accounted(d.device_id))["free_bytes"]
            views.append(DeviceView(d.device_id, free, residents))
        return views

    def accounted(self, device_id: int) -> int:
        """Bytes this manager holds or has reserved on a device."""
        return sum(s.shares.get(device_id, 0) for s in self.slots.values())

    def resident(self, device_id: int) -> list[Slot]:
        """The device's resident slots, most recently used first."""
        on = [s for s in self.slots.values() if device_id in s.shares and s.state == "resident"]
        return sorted(on, key=lambda s: -s.last_used)

    def touch(self, slot: Slot) -> bool:
        """Mark a slot used now; emits (and returns True) if a device's current group changed."""
        def current() -> list[str]:
            return [s.group.id for d in slot.shares for s in self.resident(d)[:1]]

        before = current()
        slot.last_used = time.monotonic()
        self.ledger.used(slot.group.id, slot.bytes)
        if current() != before:
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
