"""The Manager (in `core`, so that `gg.manager` stays the function): owns the devices and the groups on them.

State lives under one lock and every change bumps ``version``; events go to subscribers in
version order from one dispatcher thread, after the change. Each device has its own worker
thread that runs that device's loads, unloads and forward passes in order, so a load on one
device never delays a prompt on another. Pending ``process`` calls for the same resident group
are batched into one forward pass. The public methods are synchronous (submit and wait); the
``a``-prefixed twins return awaitables.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import estimate as est
from .catalog import Catalog, GroupSpec
from .devices import Device, detect
from .errors import GpuGroupsError
from .placement import DeviceView, ResidentView, place
from .protocol import MAX_NEW_TOKENS, MAX_NUM_PREDICTIONS, MAX_PROMPT_CHARS

Event = dict[str, Any]
Subscriber = Callable[[Event], None]
#: Most requests one forward pass serves.
MAX_BATCH = 32
CATALOG_ENV = "GPUGROUPS_CATALOG"


@dataclass
class Slot:
    """A group's place on a device: loading, resident or unloading."""

    group: GroupSpec
    device_id: int
    bytes: int
    state: str = "loading"  # "loading" | "resident" | "unloading"
    runtime: Any = None
    last_used: float = field(default_factory=time.monotonic)
    inflight: int = 0
    done: Future = field(default_factory=Future)  # loaded (result) or failed (exception)
    gone: Future = field(default_factory=Future)  # set once unloaded


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


class _OutOfMemory(Exception):
    """The device could not hold the group (real CUDA OOM or a virtual budget overrun)."""


class _Worker:
    """One device's thread: runs calls in order, batching queued ``process`` requests of a group."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.status = "idle"
        self._tasks: deque[tuple[str, Any, Future]] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._running = 0
        self._thread = threading.Thread(target=self._loop, name=f"gpugroups-{device.device}", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Tasks waiting or running on this device."""
        return len(self._tasks) + self._running

    def call(self, fn: Callable[[], Any], status: str = "busy") -> Future:
        """Run ``fn`` on this device's thread after what is already queued."""
        fut: Future = Future()
        self._put(("call", (fn, status), fut))
        return fut

    def process(self, slot: Slot, request: Any) -> Future:
        """Queue a prediction request for ``slot``'s runtime; batched with its neighbours."""
        fut: Future = Future()
        self._put(("process", (slot, request), fut))
        return fut

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _put(self, task: tuple[str, Any, Future]) -> None:
        with self._cv:
            if self._stop:
                task[2].set_exception(GpuGroupsError("invalid_request", "the manager is closed"))
                return
            self._tasks.append(task)
            self._cv.notify()

    def _take(self) -> list[tuple[str, Any, Future]] | None:
        with self._cv:
            while not self._tasks and not self._stop:
                self._cv.wait()
            if self._stop and not self._tasks:
                return None
            first = self._tasks.popleft()
            batch = [first]
            if first[0] == "process":
                slot = first[1][0]
                rt = slot.runtime
                keep: deque = deque()
                while self._tasks and len(batch) < MAX_BATCH:
                    t = self._tasks.popleft()
                    if t[0] == "call":  # never reorder past a load or unload
                        keep.append(t)
                        break
                    if t[1][0] is slot and rt.can_share_batch(first[1][1].member, t[1][1].member):
                        batch.append(t)
                    else:
                        keep.append(t)
                keep.extend(self._tasks)
                self._tasks = keep
            self._running = len(batch)
            return batch

    def _loop(self) -> None:
        from .inference import predict

        while True:
            batch = self._take()
            if batch is None:
                return
            kind, payload, fut = batch[0]
            try:
                if kind == "call":
                    fn, self.status = payload
                    _settle(fut, fn)
                else:
                    self.status = "busy"
                    futs = [f for _, _, f in batch]
                    try:
                        results = predict(payload[0].runtime, [p[1] for _, p, _ in batch])
                    except BaseException as exc:  # one bad batch fails its callers, not the worker
                        for f in futs:
                            f.set_exception(exc)
                    else:
                        for f, r in zip(futs, results):
                            f.set_result(r)
            finally:
                self._running = 0
                self.status = "idle"


def _settle(fut: Future, fn: Callable[[], Any]) -> None:
    try:
        fut.set_result(fn())
    except BaseException as exc:
        fut.set_exception(exc)


class Manager:
    """Owns devices and the groups on them. Thread-safe; one per kernel is usual (``gg.manager()``).

    ``devices``: ``"auto"`` (CUDA devices, else one ``cpu``), ``"cpu"``, ``"cuda:N"``,
    ``"virtual:[Nx]SIZE[@backing]"`` or a list of such specs. ``catalog``: a ``Catalog``, a TOML
    path, a list of ``register_group`` dicts, or None for the default (the shipped demo, then
    ``$GPUGROUPS_CATALOG`` or ``./gpugroups.toml`` when present). ``max_groups_per_device=1``
    keeps one current group per device. ``dtype`` overrides the load dtype of every group
    (default: bf16 on GPUs that support it, fp32 elsewhere; a group's own ``dtype`` wins).
    """

    def __init__(
        self,
        devices: str | list[str] = "auto",
        catalog: Catalog | str | os.PathLike[str] | Iterable[Mapping[str, Any]] | None = None,
        max_groups_per_device: int | None = None,
        dtype: str | None = None,
    ) -> None:
        if max_groups_per_device is not None and (not isinstance(max_groups_per_device, int) or max_groups_per_device < 1):
            raise GpuGroupsError("invalid_request", "max_groups_per_device must be a positive integer or None")
        self.catalog = _make_catalog(catalog)
        self.devices = detect(devices)
        self.max_groups_per_device = max_groups_per_device
        self.dtype = dtype
        self._lock = threading.RLock()
        self._version = 0
        self._slots: dict[str, Slot] = {}
        self._pins: dict[str, int | None] = {}
        self._current: dict[str, str] = {}  # group id -> current member
        self._estimates: dict[tuple[str, str, str], dict[str, int] | None] = {}
        self._measured: dict[str, int] = {}
        self._warm: set[int] = set()  # devices whose context (overhead) already exists
        self._ops: dict[str, Operation] = {}
        self._op_ids = itertools.count(1)
        self._subscribers: list[Subscriber] = []
        self._events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self._closed = False
        self._workers = [_Worker(d) for d in self.devices]
        self._dispatcher = threading.Thread(target=self._dispatch_events, name="gpugroups-events", daemon=True)
        self._dispatcher.start()

    # ---- loading ------------------------------------------------------------------------
    def load(self, model_id: str, device_id: int | None = None) -> dict[str, Any]:
        """Make ``model_id`` its group's current member, loading the group first if needed.

        Returns ``{"status": "loaded"|"already_loaded", "model_id", "group_id", "device_id",
        "seconds"}``. Switching member of a resident group is a pointer change: no memory op.
        """
        t0 = time.perf_counter()
        group = self.catalog.group_of(model_id)

        def switch(slot: Slot) -> None:
            changed = self._current.get(group.id) != model_id
            self._current[group.id] = model_id
            slot.runtime.switch(model_id)
            if not self._touch(slot) and changed:
                self._bump()

        slot, loaded, _ = self._ensure(group, device_id, switch)
        return {
            "status": "loaded" if loaded else "already_loaded", "model_id": model_id, "group_id": group.id,
            "device_id": slot.device_id, "seconds": time.perf_counter() - t0,
        }

    def load_group(self, group_id: str, device_id: int | None = None) -> dict[str, Any]:
        """Load a whole group (all its members) onto a device; see ``load``."""
        t0 = time.perf_counter()
        group = self.catalog.group(group_id)
        slot, loaded, _ = self._ensure(group, device_id, self._touch)
        return {
            "status": "loaded" if loaded else "already_loaded", "group_id": group.id,
            "model_id": self._current.get(group.id, group.members[0]), "device_id": slot.device_id,
            "seconds": time.perf_counter() - t0,
        }

    def unload(self, model_id: str, device_id: int | None = None) -> dict[str, Any]:
        """Unload the group that holds ``model_id`` (its other members go with it)."""
        return self.unload_group(self.catalog.group_of(model_id).id, device_id)

    def unload_group(self, group_id: str, device_id: int | None = None) -> dict[str, Any]:
        """Unload a group and free its memory once its queued requests are answered.

        An explicit unload also drops the group's pin.
        """
        group = self.catalog.group(group_id)
        self._check_device(device_id)
        while True:
            with self._lock:
                slot = self._slots.get(group.id)
                if slot is None or (device_id is not None and slot.device_id != device_id):
                    return {"status": "not_loaded", "group_id": group.id, "device_id": device_id}
                if slot.state == "resident":
                    self._pins.pop(group.id, None)
                    done = self._queue_unload(slot)
                    break
                wait_for = slot.done if slot.state == "loading" else slot.gone
            _wait_quietly(wait_for)
        done.result()
        return {"status": "unloaded", "group_id": group.id, "device_id": slot.device_id}

    def _queue_unload(self, slot: Slot) -> Future:
        """Under the lock: mark a resident slot unloading and queue its unload after its requests."""
        slot.state = "unloading"
        self._bump()
        return self._workers[slot.device_id].call(functools.partial(self._drop, slot), "unloading")

    def clear_device(self, device_id: int) -> dict[str, Any]:
        """Unload every unpinned group on a device; pinned groups stay."""
        self._check_device(device_id, required=True)
        with self._lock:
            ids = [s.group.id for s in self._slots.values() if s.device_id == device_id and s.group.id not in self._pins]
        done = [gid for gid in ids if self.unload_group(gid, device_id)["status"] == "unloaded"]
        return {"device_id": device_id, "unloaded": done}

    def pin(self, group_id: str, device_id: int | None = None, pinned: bool = True) -> dict[str, Any]:
        """Keep a group resident (loading it if needed) with affinity to its device; ``pinned=False`` unpins."""
        if not pinned:
            return self.unpin(group_id)
        group = self.catalog.group(group_id)

        def set_pin(slot: Slot) -> None:
            self._pins[group.id] = slot.device_id
            self._bump()

        slot, _, _ = self._ensure(group, device_id, set_pin)
        return {"group_id": group.id, "device_id": slot.device_id, "pinned": True}

    def unpin(self, group_id: str) -> dict[str, Any]:
        """Let a pinned group be evicted again (it stays resident until then)."""
        group = self.catalog.group(group_id)
        with self._lock:
            if self._pins.pop(group.id, "absent") != "absent":
                self._bump()
        return {"group_id": group.id, "pinned": False}

    # ---- processing ---------------------------------------------------------------------
    def process(
        self,
        model_id: str,
        prompt: str,
        num_predictions: int = 3,
        device_id: int | None = None,
        max_new_tokens: int = 0,
    ) -> dict[str, Any]:
        """Top-N next-token predictions for ``prompt`` from ``model_id``, most likely first.

        Loads the group if needed (or waits for its load). With ``max_new_tokens > 0`` each
        prediction is continued greedily and carries its ``text``. ``num_predictions`` above
        the cap is lowered and the result's ``notes`` say so; a prompt longer than the model's
        context is truncated from the left and ``truncated`` is true.
        """
        from .inference import Request

        t0 = time.perf_counter()
        notes: list[str] = []
        if not isinstance(prompt, str) or not prompt:
            raise GpuGroupsError("invalid_request", "prompt must be a non-empty string")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise GpuGroupsError("invalid_request", f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        if not isinstance(num_predictions, int) or isinstance(num_predictions, bool) or num_predictions < 1:
            raise GpuGroupsError("invalid_request", f"num_predictions must be a positive integer, got {num_predictions!r}")
        if num_predictions > MAX_NUM_PREDICTIONS:
            notes.append(f"num_predictions {num_predictions} capped at {MAX_NUM_PREDICTIONS}")
            num_predictions = MAX_NUM_PREDICTIONS
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise GpuGroupsError("invalid_request", f"max_new_tokens must be an integer in 0..{MAX_NEW_TOKENS}, got {max_new_tokens!r}")
        group = self.catalog.group_of(model_id)
        request = Request(model_id, prompt, num_predictions, max_new_tokens, notes)

        def queue(slot: Slot) -> Future:
            slot.inflight += 1
            self._touch(slot)
            return self._workers[slot.device_id].process(slot, request)

        slot, _, fut = self._ensure(group, device_id, queue)
        t1 = time.perf_counter()
        try:
            out = fut.result()
        finally:
            with self._lock:
                slot.inflight -= 1
        out["timing"].update(load_ms=(t1 - t0) * 1e3, request_ms=(time.perf_counter() - t0) * 1e3)
        return {"model_id": model_id, "group_id": group.id, "device_id": slot.device_id, "prompt": prompt, **out}

    # ---- state and events ---------------------------------------------------------------
    @property
    def version(self) -> int:
        """Bumped by every change."""
        return self._version

    def state(self) -> dict[str, Any]:
        """The state JSON (same as ``GET /api/v2/system/state``): devices, groups, models, operations."""
        with self._lock:
            return self._state_locked()

    def models(self) -> list[dict[str, Any]]:
        """The catalog's models with where each is loaded."""
        return self.state()["models"]

    def groups(self) -> list[dict[str, Any]]:
        """The catalog's groups with estimates, pins and residence."""
        return self.state()["groups"]

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` after every change; returns a function that unsubscribes.

        Events: ``{"type": "state_update", "version", "state"}`` and ``{"type": "load_progress",
        "version", "operation_id", "group_id", "device_id", "progress", "stage"}``, delivered in
        order from one background thread. A failing callback is skipped, never fatal.
        """
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def register_group(
        self,
        group_id: str,
        base: str | None = None,
        adapters: Mapping[str, str] | None = None,
        models: Mapping[str, str] | Iterable[str] | None = None,
        name: str | None = None,
        dtype: str | None = None,
    ) -> dict[str, Any]:
        """Add a group to the catalog: ``base`` + ``adapters`` ({member: path}) or ``models``."""
        spec = self.catalog.register_group(group_id, base=base, adapters=adapters, models=models, name=name, dtype=dtype)
        with self._lock:
            self._bump()
        return spec.to_json()

    def discover(self) -> list[str]:
        """Loadable ids that no group names yet: hub ids in the local Hugging Face cache and model
        folders (with ``config.json``, two levels deep) under the allowed roots. Each becomes the
        single-model group ``single:<id>`` when it is first loaded."""
        known = {m.source for m in self.catalog.models.values()} | set(self.catalog.models)
        found = self.catalog.scan_hf_cache() + self.catalog.scan_folders(self.catalog.roots)
        return [i for i in dict.fromkeys(found) if i not in known]

    def close(self) -> None:
        """Unload everything and stop the workers and the event thread."""
        if self._closed:
            return
        for gid in list(self._slots):
            try:
                self.unload_group(gid)
            except GpuGroupsError:
                pass
        self._closed = True
        for w in self._workers:
            w.stop()
        self._events.put(None)
        self._dispatcher.join(timeout=10)

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.state()
        return f"<gpugroups.Manager {s['num_devices']} device(s), {sum(len(d['resident_groups']) for d in s['devices'])} resident group(s)>"

    # ---- internals: placement and loading -------------------------------------------------
    def _ensure(self, group: GroupSpec, device_id: int | None, then: Callable[[Slot], Any]) -> tuple[Slot, bool, Any]:
        """Get the group resident (loading it if needed), then run ``then(slot)`` under the lock.

        ``then`` runs while the slot is known to be resident, so what it does (queue a request,
        set a pin, switch member) cannot interleave with an eviction or an unload. Returns the
        slot, whether this call loaded it, and what ``then`` returned.
        """
        self._check_device(device_id)
        loaded = False
        while True:
            mine = None
            with self._lock:
                if self._closed:
                    raise GpuGroupsError("invalid_request", "the manager is closed")
                slot = self._slots.get(group.id)
                if slot is not None and slot.state == "resident" and device_id not in (None, slot.device_id):
                    if group.id in self._pins:
                        raise GpuGroupsError(
                            "conflict", f"group {group.id!r} is pinned to device {slot.device_id}; unpin it to move it"
                        )
                    wait_for = self._queue_unload(slot)  # resident elsewhere: move it
                elif slot is not None and slot.state == "resident":
                    return slot, loaded, then(slot)
                elif slot is not None:
                    wait_for = slot.done if slot.state == "loading" else slot.gone
                else:
                    slot, victims = self._reserve(group, device_id)
                    mine = self._workers[slot.device_id].call(functools.partial(self._do_load, slot, victims), "loading")
                    loaded = True
            if mine is not None:
                mine.result()  # our own load: its failure is ours to raise
            else:
                _wait_quietly(wait_for)

    def _reserve(self, group: GroupSpec, device_id: int | None) -> tuple[Slot, list[Slot]]:
        """Under the lock: choose a device, mark the victims, reserve the estimate. Emits a change."""
        target = device_id if device_id is not None else self._pins.get(group.id)
        need = self._estimate(group, target if target is not None else 0, strict=True)
        decision = place(group.id, need, self._views(), target, self.max_groups_per_device)
        if target is None and decision.device_id != 0:
            need = self._estimate(group, decision.device_id, strict=True)
        victims = [self._slots[g] for g in decision.evict]
        for v in victims:
            v.state = "unloading"
        slot = Slot(group, decision.device_id, need)
        self._slots[group.id] = slot
        op = Operation(f"op-{next(self._op_ids)}", "load", group.id, decision.device_id)
        self._ops[group.id] = op
        self._bump()
        return slot, victims

    def _do_load(self, slot: Slot, victims: list[Slot]) -> None:
        """On the device's worker: unload the victims, load the group, settle the slot."""
        from .runtime import Runtime

        group, dev = slot.group, self.devices[slot.device_id]
        for v in victims:
            self._drop(v)
        try:
            folders = self._folders(group)
            dtype = self._dtype(group, dev)
            for attempt in (1, 2):
                try:
                    rt = Runtime.load(group, folders, dev, dtype, lambda p, s: self._progress(slot, p, s))
                    self._admit(slot, rt)
                    break
                except Exception as exc:
                    if not _is_oom(exc) or attempt == 2 or not self._evict_for(slot):
                        raise
        except BaseException as exc:
            err = self._failure(group, exc)
            with self._lock:
                self._slots.pop(group.id, None)
                self._ops.pop(group.id, None)
                self._bump()
            slot.done.set_exception(err)
            slot.gone.set_result(None)
            raise err from None
        with self._lock:
            slot.state = "resident"
            self._ops.pop(group.id, None)
            self._current.setdefault(group.id, group.members[0])
            slot.runtime.switch(self._current[group.id])
            self._bump()
        slot.done.set_result(slot)

    def _admit(self, slot: Slot, rt: Any) -> None:
        """Account the loaded runtime; a group over the device's budget is an OOM (virtual devices too)."""
        dev = self.devices[slot.device_id]
        parts = self._estimate_parts(slot.group, dev, strict=True) or {}
        # The device overhead (CUDA context) is the device's, not the group's: NVML shows it
        # as used from the first load on, so the slot accounts weights + reserve only.
        reserve = parts.get("reserve_bytes", 0)
        with self._lock:
            others = sum(s.bytes for s in self._slots.values() if s.device_id == slot.device_id and s is not slot)
            total = rt.bytes + reserve
            if dev.kind != "cuda" and others + total > dev.budget_bytes:
                rt.unload()
                raise _OutOfMemory(
                    f"group {slot.group.id!r} takes {total} bytes; device {dev.device_id} has "
                    f"{dev.budget_bytes - others} of its {dev.budget_bytes}-byte budget left"
                )
            slot.runtime, slot.bytes = rt, total
            self._measured[slot.group.id] = rt.bytes
            self._warm.add(slot.device_id)

    def _evict_for(self, slot: Slot) -> bool:
        """After an OOM: unload every evictable group on the slot's device; False if none."""
        with self._lock:
            victims = [
                s for s in self._slots.values()
                if s.device_id == slot.device_id and s is not slot and s.state == "resident"
                and s.inflight == 0 and s.group.id not in self._pins
            ]
            for v in victims:
                v.state = "unloading"
        for v in victims:
            self._drop(v)
        return bool(victims)

    def _drop(self, slot: Slot) -> None:
        """On the device's worker: unload a slot's runtime and forget it."""
        if slot.runtime is not None:
            slot.runtime.unload()
            slot.runtime = None
        with self._lock:
            if self._slots.get(slot.group.id) is slot:
                del self._slots[slot.group.id]
            self._bump()
        if not slot.gone.done():
            slot.gone.set_result(None)

    def _failure(self, group: GroupSpec, exc: BaseException) -> GpuGroupsError:
        if _is_oom(exc):
            return GpuGroupsError(
                "insufficient_memory", f"group {group.id!r} does not fit: {exc}", {"group_id": group.id, "cause": str(exc)}
            )
        if isinstance(exc, GpuGroupsError) and exc.code in ("insufficient_memory", "unknown_model", "load_failed"):
            return exc
        cause = exc.message if isinstance(exc, GpuGroupsError) else f"{type(exc).__name__}: {exc}"
        return GpuGroupsError(
            "load_failed", f"loading group {group.id!r} failed: {cause}", {"group_id": group.id, "cause": cause}
        )

    def _progress(self, slot: Slot, progress: float, stage: str) -> None:
        with self._lock:
            op = self._ops.get(slot.group.id)
            if op is None:
                return
            op.progress, op.stage = progress, stage
            self._version += 1
            self._events.put({
                "type": "load_progress", "version": self._version, "operation_id": op.id,
                "group_id": op.group_id, "device_id": op.device_id, "progress": op.progress, "stage": stage,
            })

    # ---- internals: estimates -------------------------------------------------------------
    def _folders(self, group: GroupSpec) -> dict[str, Path]:
        return {m: self.catalog.local_path(self.catalog.models[m].source) for m in group.members}

    def _dtype(self, group: GroupSpec, dev: Device) -> str:
        return group.dtype or self.dtype or est.default_dtype(dev.kind, dev.supports_bf16)

    def _estimate(self, group: GroupSpec, device_id: int, strict: bool = False) -> int:
        """Bytes the group needs resident on a device; measured weights replace estimated ones once known.

        Without ``strict`` an unestimable group (e.g. a hub id not in the cache) counts 0 for display.
        """
        dev = self.devices[device_id]
        parts = self._estimate_parts(group, dev, strict)
        if parts is None:
            return 0
        weights = self._measured.get(group.id, parts["weights_bytes"] + parts["adapters_bytes"])
        overhead = 0 if device_id in self._warm else parts["overhead_bytes"]
        return int(weights + parts["reserve_bytes"] + overhead)

    def _estimate_parts(self, group: GroupSpec, dev: Device, strict: bool) -> dict[str, int] | None:
        """``estimate.estimate_group`` for a device kind and dtype, cached (headers are read once)."""
        dtype = self._dtype(group, dev)
        key = (group.id, dev.kind, dtype)
        if self._estimates.get(key) is None:
            try:
                self._estimates[key] = est.estimate_group(group, self._folders(group), dtype, dev.kind)
            except GpuGroupsError:
                if strict:
                    raise
                self._estimates[key] = None
        return self._estimates[key]

    def _views(self) -> list[DeviceView]:
        views = []
        for d in self.devices:
            residents = tuple(
                ResidentView(s.group.id, s.bytes, s.last_used, s.group.id in self._pins, s.state != "resident" or s.inflight > 0)
                for s in self._slots.values() if s.device_id == d.device_id and s.state != "unloading"
            )
            views.append(DeviceView(d.device_id, d.memory(self._accounted(d.device_id))["free_bytes"], residents))
        return views

    def _accounted(self, device_id: int) -> int:
        return sum(s.bytes for s in self._slots.values() if s.device_id == device_id)

    def _check_device(self, device_id: int | None, required: bool = False) -> None:
        if device_id is None and not required:
            return
        if not isinstance(device_id, int) or isinstance(device_id, bool) or not 0 <= device_id < len(self.devices):
            raise GpuGroupsError(
                "unknown_device", f"unknown device {device_id!r}; devices are 0..{len(self.devices) - 1}"
            )

    # ---- internals: state JSON and events ----------------------------------------------------
    def _touch(self, slot: Slot) -> bool:
        """Under the lock: mark a slot used now; emits (and returns True) if its device's current group changed."""
        before = self._current_group(slot.device_id)
        slot.last_used = time.monotonic()
        if self._current_group(slot.device_id) != before:
            self._bump()
            return True
        return False

    def _current_group(self, device_id: int) -> str | None:
        on = [s for s in self._slots.values() if s.device_id == device_id and s.state == "resident"]
        return max(on, key=lambda s: s.last_used).group.id if on else None

    def _bump(self) -> None:
        """Under the lock: a change happened. Queue its ``state_update`` for the subscribers."""
        self._version += 1
        self._events.put({"type": "state_update", "version": self._version, "state": self._state_locked()})

    def _dispatch_events(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            with self._lock:
                subscribers = list(self._subscribers)
            for cb in subscribers:
                try:
                    cb(event)
                except Exception:  # a broken subscriber must not stop the others
                    pass

    def _state_locked(self) -> dict[str, Any]:
        devices = []
        for d, w in zip(self.devices, self._workers):
            on = sorted(
                (s for s in self._slots.values() if s.device_id == d.device_id and s.state == "resident"),
                key=lambda s: -s.last_used,
            )
            current = on[0].group if on else None
            loading = any(s.device_id == d.device_id and s.state == "loading" for s in self._slots.values())
            devices.append({
                **d.to_json(),
                "memory": d.memory(self._accounted(d.device_id)),
                "current_group": {"id": current.id, "name": current.name, "model": self._current.get(current.id)} if current else None,
                "resident_groups": [s.group.id for s in on],
                "loaded_models": [m for s in on for m in s.group.members],
                "status": "loading" if loading else w.status,
                "is_switching": False,
                "queue_depth": w.queue_depth,
            })
        groups, models = [], []
        for g in list(self.catalog.groups.values()):
            slot = self._slots.get(g.id)
            resident = slot is not None and slot.state == "resident"
            groups.append({
                **g.to_json(),
                "memory_estimate_bytes": self._estimate(g, slot.device_id if slot else 0),
                "measured_bytes": self._measured.get(g.id),
                "pinned": g.id in self._pins,
                "resident_on": [slot.device_id] if resident else [],
                "status": slot.state if slot else "unloaded",
                "current_model": self._current.get(g.id, g.members[0]),
            })
            for mid in g.members:
                models.append({
                    "id": mid, "group_id": g.id, "role": self.catalog.models[mid].role,
                    "is_loaded": resident, "devices": [slot.device_id] if resident else [],
                })
        return {
            "version": self._version,
            "num_devices": len(self.devices),
            "devices": devices,
            "groups": groups,
            "models": models,
            "operations": [op.to_json() for op in self._ops.values()],
        }


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, _OutOfMemory):
        return True
    try:
        import torch

        return isinstance(exc, torch.cuda.OutOfMemoryError)
    except Exception:
        return False


def _wait_quietly(fut: Future) -> None:
    """Wait for another caller's load/unload; its failure is reported to that caller, not here."""
    try:
        fut.result()
    except BaseException:
        pass


def _make_catalog(catalog: Any) -> Catalog:
    if isinstance(catalog, Catalog):
        return catalog
    cat = Catalog()
    if catalog is None:
        cat.add_demo()
        path = os.environ.get(CATALOG_ENV) or ("gpugroups.toml" if Path("gpugroups.toml").is_file() else None)
        if path:
            cat.load_toml(path)
    elif isinstance(catalog, (str, os.PathLike)):
        cat.load_toml(catalog)
    else:
        for spec in catalog:
            if not isinstance(spec, Mapping) or "group_id" not in spec:
                raise GpuGroupsError("invalid_catalog", f"catalog entries must be dicts with a group_id, got {spec!r}")
            cat.register_group(**spec)
    return cat


def _async_twin(name: str) -> Callable[..., Any]:
    async def twin(self: Manager, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(getattr(self, name), *args, **kwargs)

    twin.__name__ = twin.__qualname__ = f"a{name}"
    twin.__doc__ = f"Awaitable ``{name}``: runs it in a thread so the event loop stays free."
    return twin


for _name in ("load", "load_group", "unload", "unload_group", "clear_device", "pin", "unpin", "process"):
    setattr(Manager, f"a{_name}", _async_twin(_name))

_default: Manager | None = None
_default_lock = threading.Lock()


def default_manager(**kwargs: Any) -> Manager:
    """This process's manager, created on the first call with ``kwargs``."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Manager(**kwargs)
        elif kwargs:
            raise GpuGroupsError("invalid_request", "gg.manager() already exists; pass options on its first call only")
        return _default
