"""The Ray actor that serves one GPU of a cluster node: a ``ThreadWorker`` for that device, over Ray.

It runs on the node, so it loads, batches, switches and predicts with exactly the code of a local
device, reads model files from the node's own disks, and answers in plain data: ``("ok", value)``
or ``("error", error JSON)`` (``"oom"`` for an out-of-memory), never a pickled exception. It is
detached and named, so it outlives the kernel that made it; without a manager's ping for its idle
time it unloads everything and ends itself.

It is a threaded actor: each call waits for its answer on a thread of Ray's pool, and a ``process``
call that finds the device idle runs its forward pass in that thread (``ThreadWorker.process_here``)
instead of handing it to the device's thread and back. Ray starts such calls in no set order, so the
worker's calls carry their caller's numbering and pass ``_InOrder`` in it; the small calls that need
no order (``info``, ``ping``, ``resident``) have a thread of their own, never queued behind requests.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from ..catalog import GroupSpec
from ..errors import GpuGroupsError
from .devices import Device, detect
from .remote import Outcome, outcome, run_outcome, unpack
from .turns import MAX_BATCH
from .worker import Request, ThreadWorker

#: The concurrency group of the calls that must answer while requests wait (the manager's ping).
CONTROL = "control"
#: How ``ray.remote`` makes the actor: threads for two full batches of waiting requests (one
#: running, the next queued behind it), one more for ``CONTROL``.
ACTOR_OPTIONS: dict[str, Any] = {"max_concurrency": 2 * MAX_BATCH, "concurrency_groups": {CONTROL: 1}}


class DeviceActor:
    """One GPU of this node (``kind="cuda"``) or a virtual device of ``size`` bytes on its CPU.

    The calls that reach the worker take ``caller`` and ``number`` first: the caller's id and the
    call's place among the calls it sent (0, 1, ...)."""

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
        self._seen = time.monotonic()
        self._worker = ThreadWorker(device)
        self._order = _InOrder()
        self._me = ctx.current_actor
        threading.Thread(target=self._watch_idle, name="gpugroups-idle", daemon=True).start()

    @ray.method(concurrency_group=CONTROL)
    def info(self) -> dict[str, Any]:
        """What the manager needs to describe the device (a manager is attaching: the idle clock restarts)."""
        self._seen = time.monotonic()
        return {
            "node": self.node, "host": self.host, "name": self.device.name, "total_bytes": self.device.total_bytes,
            "supports_bf16": self.device.supports_bf16,
        }

    @ray.method(concurrency_group=CONTROL)
    def ping(self, idle_timeout_s: float) -> dict[str, int]:
        """A manager is attached: restart the idle clock (with its idle time). Answers ``resident()``."""
        self._seen = time.monotonic()
        self.idle_timeout_s = idle_timeout_s
        return self._worker.resident()

    @ray.method(concurrency_group=CONTROL)
    def resident(self) -> dict[str, int]:
        """The groups held here and their measured bytes."""
        return self._worker.resident()

    def load(self, caller: str, number: int, group: GroupSpec, folders: Mapping[str, Path], dtype: str) -> Iterator[Any]:
        """A streaming call: ``("progress", fraction, stage)`` items, then the load's outcome."""
        self._seen = time.monotonic()
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

    def unload(self, caller: str, number: int, group_id: str) -> Outcome:
        with self._order.turn(caller, number):
            done = self._worker.unload(group_id)
        return self._answer(done)

    def process(self, caller: str, number: int, group_id: str, request: Request) -> Outcome:
        self._seen = time.monotonic()
        with self._order.turn(caller, number):
            done, here = self._worker.process_here(group_id, request)
        if here is not None:
            here()  # the device was idle: the pass runs in this thread, after the gate
        return self._answer(done)

    def cancel(self, caller: str, number: int, request_id: str) -> None:
        """Cancel a ``process`` request queued or running here (``Worker.cancel``)."""
        with self._order.turn(caller, number):
            self._worker.cancel(request_id)

    def run(self, caller: str, number: int, group_id: str, member_id: str, blob: bytes) -> Outcome:
        """``fn(model, tokenizer, *args, **kwargs)`` here, on the node, from ``remote.pack``'s bytes
        of ``(fn, args, kwargs)``; what it returns comes back with its tensors on the CPU, what it
        raises comes back as itself, both packed (``run_outcome``)."""
        self._seen = time.monotonic()
        try:
            call: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | GpuGroupsError = unpack(blob, "fn or its arguments")
        except GpuGroupsError as exc:
            call = exc
        with self._order.turn(caller, number):  # its turn passes even when there is nothing to run
            if isinstance(call, GpuGroupsError):
                return ("error", call.to_json())
            done = self._worker.run(group_id, member_id, *call)
        done.exception()  # waits for it
        return run_outcome(done)

    def shutdown(self, caller: str, number: int) -> None:
        """Unload everything and stop the worker (the manager then kills the actor)."""
        with self._order.turn(caller, number):
            unloads = [self._worker.unload(gid) for gid in self._worker.resident()]
        for done in unloads:
            done.exception()
        self._worker.stop()

    def _answer(self, done: Future[Any]) -> Outcome:
        """``done``'s outcome once it is done (``exception()`` waits for it without raising)."""
        done.exception()
        return outcome(done, self._error)

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


class _InOrder:
    """Ray starts a threaded actor's calls on its threads in no set order; here each caller's calls
    pass in the order it numbered them, so they reach the worker in the order sent (an unload
    after the requests sent before it, a load after the unloads that make room for it)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._next: dict[str, int] = {}  # caller -> the number of its next call

    @contextmanager
    def turn(self, caller: str, number: int) -> Iterator[None]:
        """Wait for the caller's calls numbered below ``number``; the body runs before its next."""
        with self._cv:
            self._cv.wait_for(lambda: self._next.get(caller, 0) == number)
            try:
                yield
            finally:
                self._next[caller] = number + 1
                self._cv.notify_all()
