"""The load mechanism under ``Residency``: the slots, and how they are filled and emptied.

``_reserve`` (under the manager's lock) asks ``placement.place`` for a device and its victims and
reserves the estimate; a load thread then queues the victims' unloads and the group's load on that
device's worker, admits the measured bytes against the budget, and on an out-of-memory evicts what
it may and retries once. A sharded group's load drives its first device's worker while the others'
are held (``Worker.pause``). ``views`` is what placement sees of each device.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from ..catalog import Catalog, GroupSpec
from ..errors import GpuGroupsError, manager_closed
from ..placement import Decision, DeviceView, Layout, Ledger, ResidentView, place
from ..protocol import MAX_DEVICE_ID
from .bus import EventBus
from .calls import OutOfMemory, Span, Worker
from .devices import Device
from .estimates import EstimateCache, folders, needed_bytes, shard_reserve
from .shield import ShieldedLock
from .slot import Operation, Slot


class Loads:
    """The slots of one manager and the mechanism that fills and empties them.

    ``changed`` is called under ``lock`` after every change (the manager publishes the state).
    """

    def __init__(
        self,
        devices: list[Device],
        workers: list[Worker],
        catalog: Catalog,
        estimates: EstimateCache,
        lock: ShieldedLock,
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
        self._use_ended = threading.Condition(lock)  # type: ignore[arg-type]  # notified when a hold ends (``Holds.unhold``); a wait lifts the shield
        self._op_ids = itertools.count(1)

    def check_open(self) -> None:
        """Raise ``invalid_request`` ("the manager is closed") once ``close`` began."""
        if self.closed:
            raise manager_closed()

    # ---- the load path -----------------------------------------------------------------------
    def _place(
        self, group: GroupSpec, device_id: int | None, device_ids: list[int] | None, in_use_evictable: bool = False,
        without: Slot | None = None,
    ) -> tuple[Decision, int]:
        """Under the lock: placement's decision for the group, and the bytes it needs on its first
        device (``without``: as if that slot were gone, for a move that unloads it first)."""
        pinned = self.pins.get(group.id)
        if device_id is None and device_ids is None and pinned is not None:  # a pin's affinity
            device_id, device_ids = (pinned[0], None) if len(pinned) == 1 else (None, pinned)
        first = device_id if device_id is not None else (device_ids[0] if device_ids else 0)
        need = self.estimate(group, first, strict=True)
        layout = self._layout(group)
        try:
            decision = place(
                group.id, need, self.views(in_use_evictable, without), device_id, self.max_groups_per_device, device_ids,
                layout,
            )
        except GpuGroupsError as exc:
            if exc.code != "insufficient_memory":
                raise
            raise self._why_not(exc, group, layout, first) from None
        return decision, need

    def _why_not(self, exc: GpuGroupsError, group: GroupSpec, layout: Layout | None, first: int) -> GpuGroupsError:
        """``insufficient_memory`` saying more where more is known: devices that are lost (they
        count no room), and the member a models group cannot place on any one device."""
        message, details = exc.message, dict(exc.details)
        lost = [w.device.device_id for w in self.workers if w.status == "lost"]
        if lost:
            message += f"; device(s) {', '.join(map(str, lost))} are lost (unreachable) and count no room"
            details["lost_devices"] = lost
        blocks = self.estimates.blocks(group, self.devices[0]) or []
        if layout is not None and any(b.kind == "model" for b in blocks):
            # a models group spreads whole members: say which member no device can take
            largest = max(range(len(blocks)), key=lambda i: layout.costs()[i])
            member_need = layout.costs()[largest] + layout.fixed_on(first)
            message += (
                f"; a models group is sharded by whole members, one device each, and its largest member "
                f"{blocks[largest].name!r} needs {member_need / 2**20:.1f} MiB on one device"
            )
            details.update(largest_member=blocks[largest].name, member_need_bytes=member_need)
        return GpuGroupsError("insufficient_memory", message, details)

    def guard(self, device_id: int) -> None:
        """``conflict`` if this thread may not wait for the device's worker (``Holds``: inside a
        ``use`` block or ``run``'s function there); loads do not know of holds."""

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
        for d in decision.device_ids:  # before anything is unloaded or reserved for it
            self.guard(d)
        if len(decision.shares) > 1:
            slot = Slot(group, {s.device_id: s.bytes for s in decision.shares})
            slot.weights = {s.device_id: s.weight_bytes for s in decision.shares}
        else:
            slot = Slot(group, {decision.device_id: self.estimate(group, decision.device_id, strict=True)})
        victims = [self.slots[g] for g in decision.evict]
        for v in victims:
            v.state = "unloading"
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
        scale = weights / sum(b.bytes for b in blocks)  # adapters sit beside their layers: spread them pro rata
        reserve = shard_reserve(parts)
        layers = sum(b.kind == "layer" for b in blocks)
        head = any(b.kind == "head" for b in blocks)
        # each layer takes its share of the KV cache along, the head the logits (a tied head is
        # no block: then every device keeps room for the logits)
        extra = tuple(
            reserve.on(1, layers, False) - reserve.each if b.kind == "layer" else reserve.logits if b.kind == "head" else 0
            for b in blocks
        )
        fixed = {}
        for d in self.devices:
            p = self.estimates.peek(group, d) or parts
            every = shard_reserve(p).on(0, layers, not head)
            fixed[d.device_id] = every + (0 if d.device_id in self.warm else p["overhead_bytes"])
        return Layout(tuple(int(b.bytes * scale) + 1 for b in blocks), fixed, extra)

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
            self._forget(slot, exc)
            return
        with self._lock:
            # A device the span lost meanwhile held only a pause: the load did not fail, but
            # ``lose`` passed the slot by while it was loading. Checked where it turns resident.
            lost = [d for d in slot.device_ids if self.workers[d].status == "lost"]
            if not lost:
                slot.state = "resident"
                self.ops.pop(group.id, None)
                self.current.setdefault(group.id, group.members[0])
                self._changed()
        if lost:
            if slot.device_id not in lost:  # its first device holds the whole model: freed before its room is
                with contextlib.suppress(Exception):
                    self.workers[slot.device_id].unload(group.id).result()
            which = f"device {lost[0]} of its span was" if len(lost) == 1 else f"devices {', '.join(map(str, lost))} of its span were"
            self._forget(slot, GpuGroupsError("host_unavailable", f"{which} lost while it loaded"))
            return
        slot.done.set_result(slot)

    def _forget(self, slot: Slot, exc: BaseException) -> None:
        """A load that failed: its slot leaves (and its accounting with it); ``slot.done`` says why."""
        with self._lock:
            self.slots.pop(slot.group.id, None)
            self.ops.pop(slot.group.id, None)
            self._changed()
        slot.done.set_exception(_failure(slot.group, exc))
        slot.gone.set_result(None)

    def _start_load(
        self, slot: Slot, victims: list[Slot], paths: dict[str, Any], dtype: str
    ) -> Callable[[], dict[int, tuple[int, int]]]:
        """Queue the victims' unloads and the load (with holds on a span's other devices), all
        under the lock so every worker sees multi-device work in one order; returns a waiter
        for the measured weight bytes and the runtime reserve per device."""
        group, first = slot.group, slot.device_id
        worker = self.workers[first]

        def progress(p: float, stage: str) -> None:
            self._progress(slot, p, stage)

        with self._lock:
            for v in victims:
                self._drop(v)  # queued before the load on the same worker(s)
            parts = self.estimates.peek(group, self.devices[first], strict=True) or {}
            if len(slot.shares) == 1:
                single = worker.load(group, paths, dtype, progress)
                return lambda: {first: (single.result(), parts["reserve_bytes"])}
            release: Future[None] = Future()
            holds, ends = self.pause_span(slot, release)
            weights = tuple(slot.weights[d] for d in slot.device_ids)
            span = Span(tuple(self.devices[d].backing for d in slot.device_ids), weights, shard_reserve(parts), holds)
            sharded = worker.load_sharded(group, paths, dtype, progress, span)
            sharded.add_done_callback(lambda _: release.set_result(None))

        def measured() -> dict[int, tuple[int, int]]:
            try:
                return dict(zip(slot.device_ids, sharded.result()))
            finally:
                wait(ends)  # the held devices show free again before the load's state is made

        return measured

    def pause_span(self, slot: Slot, release: Future[Any]) -> tuple[tuple[Future[None], ...], list[Future[None]]]:
        """Under the lock: pause the slot's devices after its first until ``release``; the pauses
        begun (a sharded call's ``after``) and their ends (each device free again)."""
        ends: list[Future[None]] = [Future() for _ in slot.device_ids[1:]]
        return tuple(self.workers[d].pause(release, e) for d, e in zip(slot.device_ids[1:], ends, strict=True)), ends

    def _admit(self, slot: Slot, measured: dict[int, tuple[int, int]]) -> None:
        """Account the loaded group per device (its weights and runtime reserve there); a device
        over its budget is an OOM (virtual devices too)."""
        # The device overhead (CUDA context) is the device's, not the group's: NVML shows it
        # as used from the first load on, so each share accounts weights + reserve only.
        totals = {d: w + r for d, (w, r) in measured.items()}
        with self._lock:
            over = []
            for d, total in totals.items():
                dev = self.devices[d]
                others = self.accounted(d) - slot.shares.get(d, 0)
                if dev.kind != "cuda" and others + total > dev.budget_bytes:
                    over.append(f"device {d} has {dev.budget_bytes - others} of its {dev.budget_bytes}-byte budget left for {total}")
            if not over:
                slot.shares = totals
                self.measured[slot.group.id] = sum(w for w, _ in measured.values())
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

    def views(self, in_use_evictable: bool = False, without: Slot | None = None) -> list[DeviceView]:
        """What ``placement.place`` sees of each device (``in_use_evictable``: as if no ``run``/``use``
        held any group; ``without``: as if that slot were unloaded)."""
        views = []
        for d in self.devices:
            residents = tuple(
                ResidentView(
                    s.group.id, s.shares[d.device_id], s.last_used, s.group.id in self.pins,
                    s.state != "resident" or s.inflight > 0 or (s.in_use > 0 and not in_use_evictable),
                    self.ledger.value(s.group.id),
                )
                for s in self.slots.values()
                if d.device_id in s.shares and s.state != "unloading" and s is not without
            )
            held = self.accounted(d.device_id) - (without.shares.get(d.device_id, 0) if without is not None else 0)
            free = 0 if self.workers[d.device_id].status == "lost" else d.memory(held)["free_bytes"]
            views.append(DeviceView(d.device_id, free, residents))
        return views

    def accounted(self, device_id: int) -> int:
        """Bytes this manager holds or has reserved on a device. A group being unloaded counts no
        more: its unload is queued on the device's worker before any load placed in its room (a
        span's other devices are paused behind their queues first), so its room is promised to
        what comes after it, and counting both would put the device over its budget on paper."""
        return sum(s.shares.get(device_id, 0) for s in self.slots.values() if s.state != "unloading")

    def resident(self, device_id: int) -> list[Slot]:
        """The device's resident slots, most recently used first."""
        on = [s for s in self.slots.values() if device_id in s.shares and s.state == "resident"]
        return sorted(on, key=lambda s: -s.last_used)

    def touch(self, slot: Slot) -> bool:
        """Mark a slot used now; emits (and returns True) if a device's current group (its most
        recently used resident one) changed: unless the slot was current on each of its devices
        already (one pass over the slots, on every request)."""
        changed = slot.state == "resident" and any(self._current(d) is not slot for d in slot.shares)
        slot.last_used = time.monotonic()
        self.ledger.used(slot.group.id)
        if changed:
            self._changed()
        return changed

    def _current(self, device_id: int) -> Slot | None:
        """The device's most recently used resident slot."""
        on = (s for s in self.slots.values() if device_id in s.shares and s.state == "resident")
        return max(on, key=lambda s: s.last_used, default=None)

    def check_device(self, device_id: int | None, required: bool = False) -> None:
        """``unknown_device`` unless ``device_id`` names a device (or is None and not ``required``);
        ``invalid_request`` for what no device id can be (the ops table's rule: an integer 0..4095)."""
        if device_id is None and not required:
            return
        if not isinstance(device_id, int) or isinstance(device_id, bool) or not 0 <= device_id <= MAX_DEVICE_ID:
            raise GpuGroupsError("invalid_request", f"device_id must be an integer in 0..{MAX_DEVICE_ID}, got {device_id!r}")
        if device_id >= len(self.devices):
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
    known = exc.details if isinstance(exc, GpuGroupsError) else {}  # e.g. a worker process's exit code
    return GpuGroupsError(
        "load_failed", f"loading group {group.id!r} failed: {cause}", {**known, "group_id": group.id, "cause": cause}
    )
