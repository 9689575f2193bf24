"""The Ray actor that serves one GPU of a cluster node: a ``ThreadWorker`` for that device, over Ray.

It runs on the node, so it loads, batches, switches and predicts with exactly the code of a local
device, reads model files from the node's own disks, and answers in plain data: ``("ok", value)``
or ``("error", error JSON)`` (``"oom"`` for an out-of-memory), never a pickled exception. It is
detached and named, so it outlives the kernel that made it; without a manager's ping for its idle
time it unloads everything and ends itself.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import ray

from ..catalog import GroupSpec
from ..errors import GpuGroupsError
from .devices import Device, detect
from .remote import Outcome, outcome, run_outcome
from .worker import Request, ThreadWorker


class DeviceActor:
    """One GPU of this node (``kind="cuda"``) or a virtual device of ``size`` bytes on its CPU."""

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
        self._me = ctx.current_actor
        threading.Thread(target=self._watch_idle, name="gpugroups-idle", daemon=True).start()

    def info(self) -> dict[str, Any]:
        """What the manager needs to describe the device (a manager is attaching: the idle clock restarts)."""
        self._seen = time.monotonic()
        return {
            "node": self.node, "host": self.host, "name": self.device.name, "total_bytes": self.device.total_bytes,
            "supports_bf16": self.device.supports_bf16,
        }

    def ping(self, idle_timeout_s: float) -> dict[str, int]:
        """A manager is attached: restart the idle clock (with its idle time). Answers ``resident()``."""
        self._seen = time.monotonic()
        self.idle_timeout_s = idle_timeout_s
        return self.resident()

    def resident(self) -> dict[str, int]:
        """The groups held here and their measured bytes."""
        return self._worker.resident()

    async def load(self, group: GroupSpec, folders: Mapping[str, Path], dtype: str) -> AsyncIterator[Any]:
        """A streaming call: ``("progress", fraction, stage)`` items, then the load's outcome."""
        self._seen = time.monotonic()
        missing = [str(p) for p in folders.values() if not Path(p).exists()]
        if missing:
            yield ("error", self._load_error(group, f"{missing[0]} is not on this node").to_json())
            return
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[Any] = asyncio.Queue()

        def progress(fraction: float, stage: str) -> None:
            loop.call_soon_threadsafe(items.put_nowait, ("progress", fraction, stage))

        done = asyncio.wrap_future(self._worker.load(group, folders, dtype, progress))
        done.add_done_callback(lambda _: items.put_nowait(None))  # after every progress item
        while (item := await items.get()) is not None:
            yield item
        yield outcome(done, lambda exc: self._load_error(group, f"{type(exc).__name__}: {exc}"))

    async def unload(self, group_id: str) -> Outcome:
        return await self._run(self._worker.unload(group_id))

    async def process(self, group_id: str, request: Request) -> Outcome:
        self._seen = time.monotonic()
        return await self._run(self._worker.process(group_id, request))

    def cancel(self, request_id: str) -> None:
        """Cancel a ``process`` request queued or running here (``Worker.cancel``)."""
        self._worker.cancel(request_id)

    async def run(
        self, group_id: str, member_id: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Outcome:
        """``fn(model, tokenizer, *args, **kwargs)`` here, on the node; what it returns comes back
        with its tensors on the CPU, what it raises comes back as itself (``("raised", exc)``)."""
        self._seen = time.monotonic()
        return run_outcome(await _finished(self._worker.run(group_id, member_id, fn, args, kwargs)))

    async def shutdown(self) -> None:
        """Unload everything and stop the worker (the manager then kills the actor)."""
        for gid in list(self._worker.resident()):
            await asyncio.wrap_future(self._worker.unload(gid))
        self._worker.stop()

    async def _run(self, fut: Future[Any]) -> Outcome:
        return outcome(await _finished(fut), self._error)

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


async def _finished(fut: Future[Any]) -> asyncio.Future[Any]:
    """``fut`` as an asyncio future, once it is done (its outcome is read from it, not raised here)."""
    wrapped = asyncio.wrap_future(fut)
    await asyncio.wait([wrapped])
    return wrapped
