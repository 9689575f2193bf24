"""The Manager: the public API over the devices and the groups on them (``gg.Manager``, ``gg.manager()``).

State lives in ``Residency`` under one lock and every change bumps ``version``; the ``EventBus``
delivers events in version order after the change. Each device has a ``Worker`` (a thread, or a
process per GPU on a machine with two or more: ``worker_factory``) that runs its loads, unloads
and forward passes in order, so a load on one device never delays a prompt on another. The
methods submit and wait; their awaitable twins are in ``twins``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, cast

from ..catalog import Catalog, GroupSpec, canonical_dtype
from ..display import manager_html, rich_process_result
from ..errors import GpuGroupsError
from ..protocol import MAX_REQUEST_WORK, check_work, get_op
from ..schema import (
    ClearResult,
    GroupList,
    LoadResult,
    ModelList,
    PinResult,
    ProcessResult,
    State,
    UnloadResult,
)
from .bus import EventBus, Subscriber
from .calls import Request, Worker, new_request_id
from .cancels import Cancels
from .catalogs import make_catalog
from .devices import detect, release
from .estimates import EstimateCache
from .progress import LoadBar, ProgressOption, check_option
from .registry import Registry
from .research import Handle, Research
from .residency import Residency, Slot
from .shield import ShieldedLock
from .state import Announcer, render, snapshot
from .twins import AwaitableTwins
from .worker import WorkerChoice, worker_factory

P = ParamSpec("P")
T = TypeVar("T")


class Manager(Registry, AwaitableTwins):
    """Owns devices and the groups on them. Thread-safe; one per kernel is usual (``gg.manager()``).

    ``devices``: ``"auto"`` (CUDA devices, else one ``cpu``), ``"cpu"``, ``"cuda:N"``,
    ``"virtual:[Nx]SIZE[@backing]"`` or a list of such specs. ``catalog``: a ``Catalog``, a TOML
    path, a list of ``register_group`` dicts, or None for the default (the shipped demo, then
    ``$GPUGROUPS_CATALOG`` or ``./gpugroups.toml`` when present). ``max_groups_per_device=1``
    keeps one current group per device. ``dtype`` is the load dtype of every group that names
    none (a group's own ``dtype`` wins; ``"bfloat16"``/``"bf16"``, ``torch.float16``, ...; default or
    ``"auto"``: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on cpu and virtual devices).
    ``worker``: ``"process"`` runs each device's models in a worker process of its own (a load on
    one device then never slows prompts on another through the interpreter lock; ``use`` is not
    available there, ``run`` is), ``"thread"`` in a thread of this process, ``"auto"`` (default)
    chooses processes for two or more CUDA devices and threads otherwise; or a factory that makes
    a device's ``engine.worker.Worker`` from its ``Device``. ``max_adhoc_groups`` bounds
    the ``single:`` groups that loading uncatalogued ids creates (default: the catalog's, 64); the
    oldest one neither resident nor pinned is forgotten first. ``max_request_work`` is the most work
    one ``process`` request may cost (``protocol.WORK_RULE``: token positions computed; default
    ``protocol.MAX_REQUEST_WORK``, one forward pass of the reference batch; None: no limit); a
    request over it is refused with ``invalid_request`` naming both. Ray devices (``"ray"``,
    ``"ray:virtual:SIZE"``) are actors named in ``ray_namespace``, which a later manager in that
    namespace adopts with their groups; with no manager attached for ``ray_idle_timeout_s`` they
    unload and exit (see docs/scale-out.md). ``progress``: a load that takes a while shows tqdm's
    auto bar (``engine.progress``); False turns it off, as does ``GPUGROUPS_PROGRESS=0`` when it
    is None; a text file gets a plain bar. Bad options are ``invalid_request`` and start nothing.
    """

    def __init__(
        self,
        devices: str | list[str] = "auto",
        catalog: Catalog | str | os.PathLike[str] | Iterable[Mapping[str, Any]] | None = None,
        max_groups_per_device: int | None = None,
        dtype: str | None = None,
        worker: WorkerChoice = "auto",
        max_adhoc_groups: int | None = None,
        ray_namespace: str = "gpugroups",
        ray_idle_timeout_s: float = 1800.0,
        progress: ProgressOption = None,
        max_request_work: int | None = MAX_REQUEST_WORK,
    ) -> None:
        for name, limit in (
            ("max_groups_per_device", max_groups_per_device), ("max_request_work", max_request_work),
            ("max_adhoc_groups", max_adhoc_groups),
        ):
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
                raise GpuGroupsError("invalid_request", f"{name} must be a positive integer or None")
        dtype = canonical_dtype(dtype, "invalid_request")
        self.max_request_work, self.max_groups_per_device, self.dtype = max_request_work, max_groups_per_device, dtype
        self.progress = check_option(progress)
        self.catalog = make_catalog(catalog)
        if max_adhoc_groups is not None:
            self.catalog.max_adhoc_groups = max_adhoc_groups
        worker_factory(worker, [])  # a bad choice is refused before any device (a Ray actor) exists
        self.devices = detect(devices, ray={"namespace": ray_namespace, "idle_timeout_s": ray_idle_timeout_s})
        make = worker_factory(worker, self.devices)
        self._lock = ShieldedLock()  # held in the main thread, it holds Ctrl-C back (see engine/shield.py)
        self._cancels = Cancels()
        self._estimates = EstimateCache(self.catalog, dtype)
        self._bus = EventBus()
        self._events = Announcer(self._bus)
        self._bump = self._events.bump  # under the lock: a change happened, its event is queued
        self._stopped = False  # ``close`` ran to its end
        self._workers: list[Worker] = []
        try:  # a constructor that fails leaves no thread, process or actor behind
            for d in self.devices:
                self._workers.append(make(d) if d.remote_worker is None else d.remote_worker(d))
            self._res = Residency(
                self.devices, self._workers, self.catalog, self._estimates, self._lock, self._bus, self._bump,
                max_groups_per_device,
            )
            self._events.res = self._res
            self._res.adopt()
        except BaseException:
            for w in self._workers:
                w.stop()
            release(self.devices)  # the Ray namespace, as ``close`` does
            self._bus.close()
            raise
        self._research = Research(self.catalog, self._res, self._workers)

    # ---- loading ------------------------------------------------------------------------
    def load(self, model_id: str, device_id: int | None = None, device_ids: list[int] | None = None) -> LoadResult:
        """Make ``model_id`` its group's current member, loading the group first if needed.

        Returns ``{"status", "model_id", "group_id", "device_id", "device_ids", "seconds"}``;
        ``status`` is ``"loaded"`` (this call loaded the group), ``"switched"`` (the group was
        resident and ``model_id`` became its current member: a pointer change, no memory op) or
        ``"already_loaded"`` (it already was the current member). In the result ``device_id`` is
        the first of ``device_ids``, the devices the group spans. As an argument, ``device_id`` puts the group
        on that device: one resident elsewhere is unloaded and loaded there (``conflict`` if it is
        pinned elsewhere); without it the manager picks the device (``placement``).
        ``device_ids=[0, 1]`` shards the group over exactly those devices, in that order (see
        docs/sharding.md); without it a group too big for any one device shards by itself.
        """
        t0 = time.perf_counter()
        model, group = self.catalog.resolve(model_id)
        model_id = model.id  # the canonical spelling: the group's member

        def switch(slot: Slot) -> bool:
            # an adopted group has no current member yet: naming one is no switch
            changed = self._res.current.get(group.id, model_id) != model_id
            self._res.current[group.id] = model_id
            if not self._res.touch(slot) and changed:
                self._bump()
            return changed

        with LoadBar(self._bus, group.id, self.progress) as bar:
            slot, loaded, changed = self._ensure(group, device_id, switch, device_ids)
            bar.loaded = loaded
        status: Literal["loaded", "switched", "already_loaded"] = (
            "loaded" if loaded else "switched" if changed else "already_loaded"
        )
        return {
            "status": status, "model_id": model_id, "group_id": group.id,
            "device_id": slot.device_id, "device_ids": slot.device_ids, "seconds": time.perf_counter() - t0,
        }

    def load_group(self, group_id: str, device_id: int | None = None, device_ids: list[int] | None = None) -> LoadResult:
        """Load a whole group (all its members) onto a device, or sharded over ``device_ids``; see ``load``."""
        t0 = time.perf_counter()
        group = self.catalog.group(group_id)
        with LoadBar(self._bus, group.id, self.progress) as bar:
            slot, loaded, _ = self._ensure(group, device_id, self._res.touch, device_ids)
            bar.loaded = loaded
        return {
            "status": "loaded" if loaded else "already_loaded", "group_id": group.id,
            "model_id": self._res.current.get(group.id, group.members[0]), "device_id": slot.device_id,
            "device_ids": slot.device_ids, "seconds": time.perf_counter() - t0,
        }

    def unload(self, model_id: str, device_id: int | None = None) -> UnloadResult:
        """Unload the group that holds ``model_id`` (its other members go with it); see ``unload_group``."""
        return self.unload_group(self.catalog.group_of(model_id).id, device_id)

    def unload_group(self, group_id: str, device_id: int | None = None) -> UnloadResult:
        """Unload a group and free its memory (every shard) once its queued requests are answered.

        An explicit unload also drops the group's pin. With ``device_id`` only a group on that
        device is unloaded (any device a sharded group spans names it); ``status`` is
        ``"not_loaded"`` when the group is not resident (there), and nothing changes.
        """
        group = self.catalog.group(group_id)
        done_on = self._res.release(group, device_id)
        if done_on is None:
            return {"status": "not_loaded", "group_id": group.id, "device_id": device_id}
        return {"status": "unloaded", "group_id": group.id, "device_id": done_on[0], "device_ids": done_on}

    def clear_device(self, device_id: int) -> ClearResult:
        """Unload every unpinned group on a device (a sharded one from all its devices); pinned groups stay."""
        self._res.check_device(device_id, required=True)
        with self._lock:
            ids = [s.group.id for s in self._res.slots.values() if device_id in s.shares and s.group.id not in self._res.pins]
        done = [gid for gid in ids if self.unload_group(gid, device_id)["status"] == "unloaded"]
        return {"device_id": device_id, "unloaded": done}

    def pin(
        self, group_id: str, device_id: int | None = None, pinned: bool = True, device_ids: list[int] | None = None
    ) -> PinResult:
        """Keep a group resident (loading it if needed) with affinity to its device(s); ``pinned=False`` unpins."""
        if not isinstance(pinned, bool):
            raise GpuGroupsError("invalid_request", f"pin: 'pinned' must be a boolean, got {type(pinned).__name__}")
        if not pinned:
            return self.unpin(group_id)
        group = self.catalog.group(group_id)

        def set_pin(slot: Slot) -> None:
            self._res.pins[group.id] = slot.device_ids
            self._workers[slot.device_id].keep(group.id, True)  # in order with the loads and unloads
            self._bump()

        slot, _, _ = self._ensure(group, device_id, set_pin, device_ids)
        return {"group_id": group.id, "device_id": slot.device_id, "device_ids": slot.device_ids, "pinned": True}

    def unpin(self, group_id: str) -> PinResult:
        """Let a pinned group be evicted again (it stays resident until then)."""
        group = self.catalog.group(group_id)
        with self._lock:
            if self._res.pins.pop(group.id, "absent") != "absent":
                slot = self._res.slots.get(group.id)
                if slot is not None:
                    self._workers[slot.device_id].keep(group.id, False)
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
        *,
        request_id: str | None = None,
    ) -> ProcessResult:
        """Top-N next-token predictions for ``prompt`` from ``model_id``, most likely first.

        Returns ``{"model_id", "group_id", "device_id", "device_ids", "prompt", "prompt_tokens",
        "predictions", "truncated", "notes", "timing"}`` (``schema.ProcessResult``): each
        prediction is ``{"token", "token_id", "probability", "logprob"}`` (and ``"text"``, its
        greedy continuation, with ``max_new_tokens``); ``timing`` holds ``load_ms``,
        ``tokenize_ms``, ``forward_ms``, ``total_ms``, ``request_ms`` and the pass's ``batch_size``.
        Shown in a notebook, the result renders as a table.

        Loads the group if needed (or waits for its load). With ``max_new_tokens > 0`` each
        prediction is continued greedily and carries its ``text``. Arguments follow the ops
        table's rules (``protocol.OPS["process"]``): ``num_predictions`` or ``max_new_tokens`` above
        its cap is lowered and the result's ``notes`` say so; a prompt longer than the model's
        context is truncated from the left, ``truncated`` is true and ``notes`` say so; a request
        whose work is over ``max_request_work`` is refused with ``invalid_request``.
        ``device_id`` works as in ``load``: the group is moved there first if it is resident on
        another device (``conflict`` if pinned there).

        ``request_id`` (unique; default a fresh one) lets another thread ``cancel`` the request.
        An interrupted caller (Ctrl-C while it waits) cancels its own request: it leaves the
        device's queue, or stops between generation steps if it runs.
        """
        t0 = time.perf_counter()
        op = get_op("process")
        kwargs = op.validate({
            "model_id": model_id, "prompt": prompt, "num_predictions": num_predictions, "device_id": device_id,
            "max_new_tokens": max_new_tokens,
        })
        notes = op.apply_caps(kwargs)
        n, new = kwargs["num_predictions"], kwargs["max_new_tokens"]
        check_work(None, n, new, self.max_request_work)  # over it with one prompt token: refused before any load
        model, group = self.catalog.resolve(model_id)
        request = Request(
            model.id, prompt, n, new, notes, request_id=request_id or new_request_id(), max_work=self.max_request_work
        )
        rid = request.request_id
        counted: list[Slot] = []  # the slot that counts this request in flight, once it is queued

        def queue(slot: Slot) -> Future[dict[str, Any]]:  # under the lock, where no interrupt comes between
            self._res.guard(slot.device_id)
            self._cancels.queued(rid, slot.device_id)
            slot.inflight += 1
            counted.append(slot)
            self._res.touch(slot)
            return self._res.queue_process(slot, group.id, request)

        fut: Future[dict[str, Any]] | None = None
        try:
            slot, _, fut = self._ensure(group, device_id, queue)
            t1 = time.perf_counter()
            out = fut.result()
        except BaseException:
            if counted and (fut is None or not fut.done()):  # interrupted while waiting: nobody will read the answer
                self.cancel(rid)
            raise
        finally:
            if counted:
                with self._lock:
                    counted[0].inflight -= 1
                    self._cancels.done(rid)
                    self._events.settled(counted[0].device_ids)
        out["timing"].update(load_ms=(t1 - t0) * 1e3, request_ms=(time.perf_counter() - t0) * 1e3)
        return rich_process_result(cast(ProcessResult, {
            "model_id": model_id, "group_id": group.id, "device_id": slot.device_id, "device_ids": slot.device_ids,
            "prompt": prompt, **out,
        }))

    def cancel(self, request_id: str) -> None:
        """Cancel the ``process`` request made with ``request_id``: it leaves its device's queue if
        it has not started, or stops between generation steps if it runs, and fails with
        ``cancelled``. One that has not reached its device yet (it waits for a load) never starts;
        an unknown or finished one is left alone."""
        with self._lock:
            device_id = self._cancels.cancel(request_id)
        if device_id is not None:
            self._workers[device_id].cancel(request_id)

    def _ensure(
        self, group: GroupSpec, device_id: int | None, then: Callable[[Slot], Any], device_ids: list[int] | None = None
    ) -> tuple[Slot, bool, Any]:
        """``Residency.ensure``, registering an ad-hoc group for its load and forgetting it again if
        the load fails: only a successful load adds a ``single:`` group to the catalog."""
        known = group.id in self.catalog.groups
        group, forgotten = self.catalog.adopt(group, self._res.kept)
        if forgotten:
            with self._lock:
                for gid in forgotten:
                    self._res.current.pop(gid, None)
                    self._res.ledger.forget(gid)
        try:
            return self._res.ensure(group, device_id, then, device_ids)
        except BaseException:
            if not known:
                self.catalog.forget(group.id, unless=self._res.kept)
            raise

    # ---- research access (kernel only: no op of the ops table reaches these) ----------------
    def run(self, model_id: str, fn: Callable[Concatenate[Any, Any, P], T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(model, tokenizer, *args, **kwargs)`` on the worker where ``model_id`` lives; what ``fn`` returns.

        The group is made resident and held (``in_use``: not evicted; unloads, and loads needing its
        room, wait) and ``model_id`` is active (its adapter, or none for the base) while ``fn`` runs
        in order with the device's other work. ``fn``'s exception reaches the caller as itself, with
        a note naming the device. Out-of-process workers pickle ``fn`` and its arguments and return
        tensors on the CPU. A call from ``fn`` that would wait for its own device raises ``conflict``.
        Afterwards eval mode, grad mode, the adapters' switches and the generation settings are put
        back and gradients freed; hooks ``fn`` leaves stay, with a warning (remove them unless you steer).
        """
        return self._research.run(model_id, fn, args, kwargs)  # type: ignore[no-any-return]

    def use(self, model_id: str) -> contextlib.AbstractContextManager[Handle]:
        """``with m.use(model_id) as h:`` ``h.model``, ``h.tokenizer``, ``h.device`` in this thread.

        As ``run``, but the block runs in the caller's thread while the device's worker takes no
        other work, until the block ends (return, exception or interrupt). Inside it, calls that
        would wait for that worker raise ``conflict``. A worker in another process answers
        ``invalid_request`` pointing to ``run``.
        """
        return self._research.use(model_id)

    # ---- state and events ---------------------------------------------------------------
    @property
    def version(self) -> int:
        """Bumped by every change."""
        return self._bus.version

    def state(self) -> State:
        """The state JSON (same as ``GET /api/v2/system/state``): devices, groups, models, operations.

        Groups not yet estimated are estimated first (reading their configs); new estimates make a
        new version, which subscribers get too."""
        known = self._estimates.revision
        for g in list(self.catalog.groups.values()):
            self._estimates.ensure(g, self.devices)  # file I/O stays outside the lock; cached after
        with self._lock:
            if self._estimates.revision != known:  # new estimates: a new version, which subscribers get too
                self._bump()
            snap = snapshot(self._res, self._bus.version)
        return render(snap)

    def models(self) -> ModelList:
        """The catalog's models with where each is loaded."""
        return self.state()["models"]

    def groups(self) -> GroupList:
        """The catalog's groups with estimates, pins and residence."""
        return self.state()["groups"]

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(event)`` after every change; returns a function that unsubscribes.

        Events: ``{"type": "state_update", "version", "state"}`` and ``{"type": "load_progress",
        "version", "operation_id", "group_id", "device_id", "progress", "stage"}``, delivered in
        order from one background thread. A failing callback is logged once and kept, never fatal.
        An event's ``state`` shares the entries of groups and models that did not change with the
        states before it: read it, copy it to change it (``state()`` returns a copy of one's own).
        A closed manager has no events left: ``invalid_request``.
        """
        self._res.check_open()
        return self._bus.subscribe(callback)

    def close(self) -> None:
        """Refuse new loads, unload everything (after the loads under way, and once ``run`` and
        ``use`` let go), stop the workers, emit a last ``state_update`` (``closed`` true), stop the
        event thread. A close that was interrupted (Ctrl-C while it waited) is finished by the next;
        one from inside a ``use`` block or ``run``'s function, which it would wait for, is ``conflict``."""
        for d in range(len(self._workers)):
            self._res.guard(d)  # before anything changes
        with self._lock:
            if self._stopped:
                return
            self._res.closed = True  # from here ``ensure`` refuses: no load can start after the unloads
        for gid in list(self._res.slots):
            try:
                self.unload_group(gid)  # waits for a load under way, then unloads it
            except GpuGroupsError:
                pass
        for w in self._workers:
            w.stop()
        release(self.devices)  # the Ray namespace is free for the next manager
        with self._lock:  # the last event: panels and clients see the manager closed, workers idle
            self._bump()
            self._stopped = True
        self._bus.close()

    @property
    def closed(self) -> bool:
        """Whether ``close`` ran."""
        return self._res.closed

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.state()
        return f"<gpugroups.Manager {s['num_devices']} device(s), {sum(len(d['resident_groups']) for d in s['devices'])} resident group(s)>"

    def _repr_html_(self) -> str:
        return manager_html(self.state())

