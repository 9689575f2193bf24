"""The Ray actor that serves one GPU of a cluster node: a ``ThreadWorker`` for that device, over Ray.

It runs on the node, so it loads, batches, switches and predicts with exactly the code of a local
device, reads model files from the node's own disks, and answers in plain data: ``("ok", value)``
or ``("error", error JSON)`` (``"oom"`` for an out-of-memory), never a pickled exception. It is
detached and named, so it outlives the kernel that made it; without a manager's ping for its idle
time it unloads everything and ends itself.

Prompts (``process``, ``cancel``) come on the actor's direct line (``rayline``) where the manager
could open one; the other calls, and prompts from a manager without a line, come as Ray calls.
It is a threaded actor: each Ray call waits for its answer on a thread of Ray's pool, and a
``process`` call that finds the device idle runs its forward pass in that thread
(``ThreadWorker.process_here``, where ``worker.lends``: a GPU, or torch on one thread as Ray
sets it) instead of handing it to the device's thread and back. Ray starts such calls in no
set order, so the worker's calls carry their caller's numbering and pass ``InOrder`` in it,
the line's among them; the small calls that need no order (``info``, ``ping``, ``resident``)
have a thread of their own, never queued behind requests. This module also fixes how the
worker's Ray calls travel: one sealed argument each (``seal``), answers pickled.
"""

from __future__ import annotations

import pickle
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import ray

from ..catalog import GroupSpec
from ..errors import GpuGroupsError
from .calls import Held
from .devices import Device, detect
from .rayline import InOrder, LineServer
from .remote import outcome, run_outcome, unpack
from .turns import MAX_BATCH
from .worker import ThreadWorker

#: The concurrency group of the calls that must answer while requests wait (the manager's ping).
CONTROL = "control"
#: How ``ray.remote`` makes the actor: threads for two full batches of waiting requests (one
#: running, the next queued behind it), one more for ``CONTROL``.
ACTOR_OPTIONS: dict[str, Any] = {"max_concurrency": 2 * MAX_BATCH, "concurrency_groups": {CONTROL: 1}}
#: How long ``resident`` (a new manager adopting) waits for the work queued before it to end.
SETTLE_S = 30.0
#: Ray hands an argument bigger than its inline limit (100 KiB) to the actor through its object
#: store, and that call starts only once the actor has fetched it, after calls sent later: they
#: would hold the actor's threads at its gate meanwhile, all of them in a flood. A sealed call
#: bigger than this goes as a reference in a list instead, which Ray leaves alone and ``unseal``
#: fetches in the call's own thread.
INLINE_BYTES = 64 * 1024

#: A call as it travels: ``seal``'s bytes, or a reference to them in a list.
Sealed = bytes | list[Any]


def seal(caller: str, number: int, *args: Any) -> Sealed:
    """A worker's call to the actor as its one argument: ``(caller, number, *args)`` pickled. Ray
    passes bytes as they are, where it would run its own serializer over every argument (and over
    the answer, which comes back pickled too): a tenth of a millisecond or more a call, measured."""
    blob = pickle.dumps((caller, number, *args), protocol=pickle.HIGHEST_PROTOCOL)
    return blob if len(blob) <= INLINE_BYTES else [ray.put(blob)]


def unseal(call: Sealed) -> tuple[Any, ...]:
    """What ``seal`` sealed: ``(caller, number, *args)``."""
    if isinstance(call, list):
        ref: ray.ObjectRef[bytes] = call[0]
        return tuple(pickle.loads(ray.get(ref)))
    return tuple(pickle.loads(call))


class DeviceActor:
    """One GPU of this node (``kind="cuda"``) or a virtual device of ``size`` bytes on its CPU.

    The calls that reach the worker take one argument, ``seal(caller, number, *args)``: the
    caller's id, the call's place among the calls it sent (0, 1, ...), and the arguments named in
    the method's docstring. Their answers are pickled (``pickle.loads`` reads them)."""

    def __init__(self, kind: str, size: int, idle_timeout_s: float) -> None:
        ctx = ray.get_runtime_context()
        self.node = ctx.get_node_id()
        self.host = ray.util.get_node_ip_address()
        if kind == "cuda":
            found = detect("cuda:0")  # Ray shows the actor only its own GPU (CUDA_VISIBLE_DEVICES)
            device = found[0]
        else:
            device = Device(0, "virtual:0", "virtual", "virtual", size, size, "cpu")
        self.device = device
        self.idle_timeout_s = idle_timeout_s
        self._seen = time.monotonic()  # when a manager last used the device (``_touch``)
        self._worker = ThreadWorker(device)
        self._order = InOrder()
        self._line = LineServer(self.host, self._worker, self._order, self._error, self._touch)
        self._me = ctx.current_actor
        threading.Thread(target=self._watch_idle, name="gpugroups-idle", daemon=True).start()

    @ray.method(concurrency_group=CONTROL)
    def info(self) -> dict[str, Any]:
        """What the manager needs to describe the device (a manager is attaching: the idle clock restarts)."""
        self._touch()
        return {
            "node": self.node, "host": self.host, "name": self.device.name, "total_bytes": self.device.total_bytes,
            "supports_bf16": self.device.supports_bf16, "line": self._line.address,
        }

    @ray.method(concurrency_group=CONTROL)
    def ping(self, idle_timeout_s: float) -> dict[str, Held]:
        """A manager is attached: restart the idle clock (with its idle time). Answers ``resident()``."""
        self._touch()
        self.idle_timeout_s = idle_timeout_s
        return self._worker.resident()

    def resident(self) -> dict[str, Held]:
        """The groups held here and their measured bytes, once the work queued before this call has
        ended (at most ``SETTLE_S``): a manager adopting them after its kernel died while a load
        ran here adopts that load's group too (read at once, it was held here unaccounted and loaded
        again). Not in ``CONTROL``: the pings go on meanwhile."""
        try:
            self._worker.call(lambda: None).result(timeout=SETTLE_S)
        except Exception:
            pass  # still busy, or stopping: what is held now
        return self._worker.resident()

    def load(self, call: Sealed) -> Iterator[Any]:
        """``(group, folders, dtype)``. A streaming call: ``("progress", fraction, stage)`` items, then
        the load's outcome (as they are: a load is not a call to shave microseconds off)."""
        self._touch()
        caller, number, group, folders, dtype = unseal(call)
        items: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def progress(fraction: float, stage: str) -> None:
            items.put(("progress", fraction, stage))

        missing = [str(p) for p in folders.values() if not Path(p).exists()]
        with self._order.turn(caller, number):  # its turn passes even when there is nothing to load
            done = None if missing else self._worker.load(group, folders, dtype, progress)
        if done is None:
            yield ("error", self._load_error(group, f"{missing[0]} is not on this node").to_json())
            return
        done.add_done_callback(lambda _: items.put(None))  # after every progress item
        while (item := items.get()) is not None:
            yield item
        yield outcome(done, lambda exc: self._load_error(group, f"{type(exc).__name__}: {exc}"))

    def unload(self, call: Sealed) -> bytes:
        """``(group_id)``."""
        caller, number, group_id = unseal(call)
        with self._order.turn(caller, number):
            done = self._worker.unload(group_id)
        return self._answer(done)

    def keep(self, call: Sealed) -> None:
        """``(group_id, pinned)``: the manager pinned or unpinned a group held here (``Worker.keep``)."""
        caller, number, group_id, pinned = unseal(call)
        with self._order.turn(caller, number):
            self._worker.keep(group_id, pinned)

    def process(self, call: Sealed) -> bytes:
        """``(group_id, request)``."""
        self._touch()
        caller, number, group_id, request = unseal(call)
        with self._order.turn(caller, number):
            done, here = self._worker.process_here(group_id, request)
        if here is not None:
            here()  # the device was idle: the pass runs in this thread, after the gate
        return self._answer(done)

    def cancel(self, call: Sealed) -> None:
        """``(request_id)``: cancel a ``process`` request queued or running here (``Worker.cancel``)."""
        caller, number, request_id = unseal(call)
        with self._order.turn(caller, number):
            self._worker.cancel(request_id)

    def run(self, call: Sealed) -> bytes:
        """``(group_id, member_id, blob)``: ``fn(model, tokenizer, *args, **kwargs)`` here, on the
        node, from ``remote.pack``'s bytes of ``(fn, args, kwargs)``; what it returns comes back with
        its tensors on the CPU, what it raises comes back as itself, both packed (``run_outcome``)."""
        self._touch()
        caller, number, group_id, member_id, blob = unseal(call)
        try:
            fn: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | GpuGroupsError = unpack(blob, "fn or its arguments")
        except GpuGroupsError as exc:
            fn = exc
        with self._order.turn(caller, number):  # its turn passes even when there is nothing to run
            if isinstance(fn, GpuGroupsError):
                return pickle.dumps(("error", fn.to_json()))
            done = self._worker.run(group_id, member_id, *fn)
        done.exception()  # waits for it
        return pickle.dumps(run_outcome(done))

    def shutdown(self, call: Sealed) -> None:
        """``()``: unload everything and stop the worker (the manager then kills the actor)."""
        caller, number = unseal(call)
        with self._order.turn(caller, number):
            unloads = [self._worker.unload(gid) for gid in self._worker.resident()]
        for done in unloads:
            done.exception()
        self._worker.stop()

    def _touch(self) -> None:
        """A manager is using the device: its idle clock restarts."""
        self._seen = time.monotonic()

    def _answer(self, done: Future[Any]) -> bytes:
        """``done``'s outcome, pickled, once it is done (``exception()`` waits for it without raising)."""
        done.exception()
        return pickle.dumps(outcome(done, self._error))

    def _error(self, exc: BaseException) -> GpuGroupsError:
        return GpuGroupsError("internal_error", f"on Ray node {self.host} ({self.node[:8]}): {type(exc).__name__}: {exc}")

    def _load_error(self, group: GroupSpec, cause: str) -> GpuGroupsError:
        cause = f"on Ray node {self.host} ({self.node[:8]}): {cause}"
        return GpuGroupsError(
            "load_failed", f"loading group {group.id!r} failed {cause}",
            {"group_id": group.id, "cause": cause, "node": self.node, "host": self.host},
        )

    def _watch_idle(self) -> None:
        """Unload and end once no manager has pinged for the idle time."""
        while True:
            left = self.idle_timeout_s - (time.monotonic() - self._seen)
            if left <= 0:
                break
            time.sleep(min(left, 5.0))
        for gid in list(self._worker.resident()):
            self._worker.unload(gid).result()
        self._worker.stop()
        ray.kill(self._me, no_restart=True)
