"""The device worker: the one place a device's loads, unloads, forward passes and research calls run, in order.

``calls.Worker`` is the seam: data in, data out, every call answered by a ``concurrent.futures.Future``
so the caller can queue work while it holds the manager's lock and wait after releasing it.
``ThreadWorker`` is the in-process implementation (one thread per device, queued ``process``
requests of a group batched into one forward pass, groups served in turn). Other implementations (``ProcessWorker``, a
worker process per device; ``RayWorker``, a Ray actor) satisfy the same protocol;
``Manager(worker=...)`` chooses one through ``worker_factory``.
Light: torch is imported only by ``ThreadWorker`` when it loads or predicts.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..catalog import GroupSpec
from ..errors import GpuGroupsError, HooksLeftWarning, manager_closed
from .calls import Held, OutOfMemory, Progress, Request, Span, Worker, cancelled, loaded_as
from .devices import Device
from .torchkit import import_transformers
from .turns import Task, Turns

if TYPE_CHECKING:
    from .runtime import Runtime

#: Makes the worker of one device; ``Manager(worker=...)`` takes one, or a name (``worker_factory``).
WorkerFactory = Callable[[Device], Worker]
WorkerChoice = WorkerFactory | Literal["auto", "thread", "process"]


def worker_factory(choice: WorkerChoice, devices: list[Device]) -> WorkerFactory:
    """The factory ``Manager(worker=choice)`` makes its devices' workers with (Ray devices bring their own).

    ``"thread"``: ``ThreadWorker``. ``"process"``: ``ProcessWorker``, a worker process per device,
    so that what one device does in Python (a load, above all) never holds the interpreter lock
    that another device's prompts need. ``"auto"``: processes where two or more CUDA devices are
    this machine's, threads for one device and for cpu or virtual devices (nothing to keep apart
    there, and a thread costs no process start). A factory is used as it is.
    """
    if callable(choice):
        return choice
    if choice == "auto":
        local_gpus = [d for d in devices if d.kind == "cuda" and d.remote_worker is None]
        choice = "process" if len(local_gpus) >= 2 else "thread"
    if choice == "thread":
        return ThreadWorker
    if choice == "process":
        from .procworker import ProcessWorker  # it imports this module

        return ProcessWorker
    raise GpuGroupsError("invalid_request", f"worker must be 'auto', 'thread', 'process' or a factory, not {choice!r}")


_device_thread = threading.local()  # ``worker``: the ThreadWorker whose device thread this is


def current_worker() -> ThreadWorker | None:
    """The ``ThreadWorker`` whose device thread calls this (None on any other thread): a call made
    from code a worker runs (``run``'s function) must not wait for that same worker."""
    return getattr(_device_thread, "worker", None)


def lends(device: Device) -> bool:
    """Whether ``device``'s forward passes may run on any thread of this process: a CUDA device, or
    torch on one thread (``OMP_NUM_THREADS=1``, as Ray's workers have it and as a worker process
    inherits it). On a CPU device whose torch runs on several threads, every thread that runs torch
    gets a pool of threads as large as the cores, and two pools on the same cores slow each other
    (measured: 2 to 4 times slower passes; ``docs/engine.md``)."""
    return device.kind == "cuda" or os.environ.get("OMP_NUM_THREADS") == "1"


class ThreadWorker:
    """One device's thread: runs calls in order, batching queued ``process`` requests of a group.
    ``lend``: whether ``process_here`` may run a pass in its caller's thread (default: ``lends``)."""

    in_process = True

    def __init__(self, device: Device, lend: bool | None = None) -> None:
        self.device = device
        self._lend = lends(device) if lend is None else lend
        self._status = "idle"
        self._runtimes: dict[str, Runtime] = {}
        self._loaded_as: dict[str, str] = {}  # group id -> ``loaded_as`` of its load
        self._pinned: set[str] = set()  # ``keep``
        self._turns = Turns()
        self._thread = threading.Thread(target=self._loop, name=f"gpugroups-{device.device}", daemon=True)
        self._thread.start()

    @property
    def status(self) -> str:
        return self._status

    @property
    def queue_depth(self) -> int:
        return self._turns.depth

    def load(self, group: GroupSpec, folders: Mapping[str, Path], dtype: str, progress: Progress) -> Future[int]:
        return self.call(functools.partial(self._load, group, dict(folders), dtype, progress), "loading")

    def load_sharded(
        self, group: GroupSpec, folders: Mapping[str, Path], dtype: str, progress: Progress, span: Span
    ) -> Future[list[tuple[int, int]]]:
        return self.call(functools.partial(self._load, group, dict(folders), dtype, progress, span), "loading")

    def pause(self, release: Future[Any], ended: Future[None] | None = None) -> Future[None]:
        begun: Future[None] = Future()

        def end(_: Any = None) -> None:
            if ended is not None:
                ended.set_result(None)

        if self._turns.claim_idle(Task(begun)):
            # An idle device is held at once, from the caller's thread: waking this device's
            # thread to begin the pause and again to end it would cost two thread hand-offs on
            # every sharded pass, and the first device's worker would wait for the first.
            self._status = "busy"
            begun.set_result(None)

            def free(_: Future[Any]) -> None:
                self._free()
                end()

            release.add_done_callback(free)
            return begun

        def paused() -> None:
            begun.set_result(None)
            _quietly(release)

        def answered(f: Future[Any]) -> None:  # once the device is free again, or the pause never began
            if not begun.done():
                begun.set_exception(f.exception() or manager_closed())
            end()

        self.call(paused, "busy").add_done_callback(answered)
        return begun

    def unload(self, group_id: str) -> Future[None]:
        return self.call(functools.partial(self._unload, group_id), "unloading")

    def process(self, group_id: str, request: Request) -> Future[dict[str, Any]]:
        fut: Future[dict[str, Any]] = Future()
        self._put(Task(fut, group_id=group_id, request=request))
        return fut

    def process_here(self, group_id: str, request: Request) -> tuple[Future[dict[str, Any]], Callable[[], None] | None]:
        """As ``process``, for a caller with a thread to lend (the Ray actor, a worker process's
        reading threads): where passes may run on any thread (``lend``), on an idle device with
        nothing queued, the request takes the device and comes back with its pass, which the caller
        must run in its thread (it settles the future and frees the device), sparing two thread
        hand-offs; otherwise it is queued as by ``process`` and comes back with None."""
        task = Task(Future(), group_id=group_id, request=request)
        if self._lend and self._turns.claim_idle(task):
            self._status = "busy"
            return task.future, functools.partial(self._serve, [task])
        self._put(task)
        return task.future, None

    def cancel(self, request_id: str) -> None:
        queued = self._turns.cancel(request_id)
        if queued is not None:  # outside the lock: the future's callbacks may queue work here
            queued.future.set_exception(cancelled(request_id))

    def run(
        self, group_id: str, member_id: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
        after: tuple[Future[None], ...] = (),
    ) -> Future[Any]:
        return self.call(functools.partial(self._run, group_id, member_id, fn, args, dict(kwargs), after))

    def call(self, fn: Callable[[], Any], status: str = "busy") -> Future[Any]:
        """Run ``fn`` on this device's thread after what is already queued (in-process only)."""
        fut: Future[Any] = Future()
        self._put(Task(fut, fn, status))
        return fut

    def runtimes(self) -> dict[str, Runtime]:
        """The groups loaded here, by group id (in-process only; for inspection)."""
        return dict(self._runtimes)

    def resident(self) -> dict[str, Held]:
        return {
            gid: Held(rt.bytes, self._loaded_as.get(gid, ""), gid in self._pinned) for gid, rt in list(self._runtimes.items())
        }

    def keep(self, group_id: str, pinned: bool) -> None:
        if pinned:
            self._pinned.add(group_id)
        else:
            self._pinned.discard(group_id)

    def on_lost(self, callback: Callable[[], None]) -> None:
        pass  # a thread of this process goes only with the process

    def stop(self) -> None:
        self._turns.stop()
        self._thread.join(timeout=30)

    def _load(
        self, group: GroupSpec, folders: dict[str, Path], dtype: str, progress: Progress, span: Span | None = None
    ) -> Any:
        import torch

        from .runtime import Runtime

        for f in span.after if span else ():
            f.result()  # the other devices' workers are paused: their earlier unloads are done
        try:
            rt = Runtime.load(group, folders, self.device, dtype, progress, span)
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(str(exc)) from exc
        self._runtimes[group.id] = rt
        self._loaded_as[group.id] = loaded_as(group, folders, dtype)
        return list(zip(rt.shares, rt.reserves)) if span else rt.bytes

    def _unload(self, group_id: str) -> None:
        rt = self._runtimes.pop(group_id, None)
        self._loaded_as.pop(group_id, None)
        self._pinned.discard(group_id)
        self._turns.forget(group_id)
        if rt is not None:
            rt.unload()

    def _run(
        self, group_id: str, member_id: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        after: tuple[Future[None], ...],
    ) -> Any:
        import torch

        from .aftercare import hook_handles

        rt = self._runtime(group_id)
        for f in after:
            f.result()  # a sharded group's other devices are paused while fn runs
        care, handles = rt.aftercare(), hook_handles()
        try:  # grad mode is this thread's: fn's setting must not reach the next call here
            with rt.rows([member_id]) as (model, _), torch.set_grad_enabled(torch.is_grad_enabled()):
                return fn(model, rt.members[member_id].tokenizer, *args, **kwargs)
        finally:
            try:
                left = care.restore(handles)
            except Exception as exc:  # fn's own outcome stands; what could not be put back is said
                left = 0
                warnings.warn(
                    f"after research code, group {group_id!r} could not be put back as it is served "
                    f"({type(exc).__name__}: {exc}); unload it and load it again", stacklevel=1,
                )
            if left:
                warnings.warn(HooksLeftWarning(
                    f"research code left {left} hook(s) on group {group_id!r} ({care.hooks()} on its models now): every "
                    "later answer of the group goes through them; remove them (handle.remove(), in a finally) "
                    "unless you steer it on purpose"
                ), stacklevel=1)

    def _runtime(self, group_id: str) -> Runtime:
        rt = self._runtimes.get(group_id)
        if rt is None:
            raise GpuGroupsError("invalid_request", f"group {group_id!r} is not loaded on this device")
        return rt

    def _put(self, task: Task) -> None:
        if not self._turns.put(task):
            task.future.set_exception(manager_closed())

    def _shares(self, group_id: str, a: str, b: str) -> bool:
        rt = self._runtimes.get(group_id)
        return rt is not None and rt.can_share_batch(a, b)

    def _loop(self) -> None:
        _device_thread.worker = self
        while (batch := self._turns.take(self._shares)) is not None:
            self._serve(batch)

    def _serve(self, batch: list[Task]) -> None:
        """Run what has the device (a call, or requests of one group), free it, then answer: whoever
        hears an answer (the manager's state and its event among them) finds the device idle, and a
        request sent on an answer finds it free to lend."""
        answers: list[Answer] = []
        try:
            if batch[0].fn is not None:
                self._status = batch[0].status
                answers = [_answer(batch[0].future, batch[0].fn)]
            else:
                self._status = "busy"
                answers = self._predict(batch)
        finally:
            self._free()
            for future, result, error in answers:
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

    def _free(self) -> None:
        """What had the device (a batch, a call, a hold) has ended: the next task may have it."""
        self._status = "idle"
        self._turns.done()

    def _predict(self, batch: list[Task]) -> list[Answer]:
        import_transformers()  # before inference imports from it
        from .inference import predict

        def stopped(request: Request) -> bool:
            return self._turns.stopped(request.request_id)

        try:
            rt = self._runtime(batch[0].group_id)
            for t in batch:
                for f in t.request.after if t.request else ():
                    f.result()  # a sharded group's other devices are paused for this pass
            outcomes = predict(rt, [t.request for t in batch if t.request is not None], stopped)
        except BaseException as exc:  # one bad batch fails its callers, not the worker
            return [(t.future, None, exc) for t in batch]
        answers: list[Answer] = []
        for t, outcome in zip(batch, outcomes):
            assert t.request is not None
            if stopped(t.request):  # asked before the device is freed, which forgets who was stopped
                answers.append((t.future, None, cancelled(t.request.request_id)))
            elif isinstance(outcome, BaseException):
                answers.append((t.future, None, outcome))
            else:
                answers.append((t.future, outcome, None))
        return answers


#: A future and what it is to be answered: a result, or an error (not None).
Answer = tuple[Future[Any], Any, BaseException | None]


def _quietly(fut: Future[Any]) -> None:
    """Wait for ``fut``; its outcome is its owner's to report."""
    try:
        fut.result()
    except BaseException:
        pass


def _answer(fut: Future[Any], fn: Callable[[], Any]) -> Answer:
    """``fn``'s outcome for ``fut``, to be set once the device is free."""
    try:
        return fut, fn(), None
    except BaseException as exc:
        return fut, None, exc
