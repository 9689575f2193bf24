"""The far side of a ``ProcessWorker``: a process of its own that runs one device's ``ThreadWorker``.

``main`` reads calls from its pipe and hands them to the worker, which orders and batches them as
in any process; each call's outcome (``remote.Outcome``), a load's progress and the warnings shown
here go back on the same pipe. ``pause`` waits for the parent's ``release`` message, which
overtakes the queue. The process ends when the parent says ``stop`` (after everything queued) or
when its pipe closes (the parent is gone). ``run``'s payloads travel packed (``remote.pack``).

Two threads take turns at the pipe, one reading at a time. Where passes may run on either of them
(``worker.lends``: not on a CPU device whose torch runs on several threads), a ``process`` call
that finds the device idle with nothing queued runs its forward pass in the thread that read it
(``ThreadWorker.process_here``), while the other reads on, instead of waking the worker's thread
for it: one thread hand-off less on every such request. Calls read meanwhile are queued as usual
(batched, cancelled, released).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..catalog import GroupSpec
from ..errors import GpuGroupsError
from .calls import Request, Span
from .devices import Device
from .remote import outcome, run_outcome, unpack
from .worker import ThreadWorker

#: ``Device`` fields a worker process is made from (the rest belong to the parent: NVML, locks).
DEVICE_FIELDS = ("device_id", "device", "kind", "name", "total_bytes", "budget_bytes", "backing", "supports_bf16")


def main() -> None:
    """The worker process: serve calls from the pipe whose descriptor is ``argv[1]`` until ``stop``
    or until the pipe closes. Its first message says which device and the parent's ``sys.path``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an interrupt (Ctrl-C, a kernel's) is for the parent
    conn = Connection(int(sys.argv[1]))
    fields, path = conn.recv()
    sys.path[:] = path + [p for p in sys.path if p not in path]  # fn pickled by reference imports from there
    host = _Host(conn, Device(**fields))
    warnings.showwarning = host.forward_warning
    host.serve()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # everything is answered; tearing down torch's modules only makes the parent wait


class _Host:
    """One device's ``ThreadWorker`` behind a pipe: ``(call_id, op, args)`` in (a ``release`` names
    its pause's call id, a ``cancel`` none), ``("done", call_id, outcome)`` and ``("progress",
    call_id, fraction, stage)`` out."""

    def __init__(self, conn: Connection, device: Device, lend: bool | None = None) -> None:
        self._conn = conn
        self._worker = ThreadWorker(device, lend)
        self._reading = threading.Lock()  # one thread at a time reads the pipe
        self._send_lock = threading.Lock()
        self._releases: dict[int, Future[None]] = {}  # pause call id -> its release, whichever came first
        self._releases_lock = threading.Lock()
        self._where = f"in the worker process of device {device.device_id} ({device.device})"

    def serve(self) -> None:
        """Serve calls on this thread and a second one until the pipe closes."""
        other = threading.Thread(target=self._serve, name="gpugroups-read", daemon=True)
        other.start()
        self._serve()
        other.join()

    def _serve(self) -> None:
        ops: dict[str, Callable[..., Callable[[], None] | None]] = {
            "load": self._load, "load_sharded": self._load, "unload": self._unload, "process": self._process,
            "run": self._run, "pause": self._pause, "release": self._release, "resident": self._resident,
            "cancel": self._cancel, "stop": self._stop,
        }
        while True:
            with self._reading:
                try:
                    call_id, op, args = self._conn.recv()
                except (EOFError, OSError):
                    return  # the parent is gone (or closed the pipe after ``stop``): nothing to answer
                lent = ops[op](call_id, *args)
            if lent is not None:
                lent()  # the device was idle: its pass runs here while the other thread reads

    def forward_warning(self, message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
        """``warnings.showwarning`` here: a warning shown in this process (research code's own, or
        the hooks it left) is the caller's, so it goes to the parent, which warns it there, before
        the answer of the call that raised it (the pipe keeps their order)."""
        self._send(("warning", 0, category.__module__, category.__qualname__, str(message)))

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                pass  # the parent is gone; ``serve`` ends on the closed pipe

    def _answer(self, call_id: int, fut: Future[Any]) -> None:
        fut.add_done_callback(lambda f: self._send(("done", call_id, outcome(f, self._error))))

    def _error(self, exc: BaseException) -> GpuGroupsError:
        return GpuGroupsError("internal_error", f"{self._where}: {type(exc).__name__}: {exc}")

    def _load(self, call_id: int, group: GroupSpec, folders: dict[str, Path], dtype: str, span: Span | None = None) -> None:
        def progress(fraction: float, stage: str) -> None:
            self._send(("progress", call_id, fraction, stage))

        w = self._worker
        self._answer(call_id, w.load(group, folders, dtype, progress) if span is None else w.load_sharded(group, folders, dtype, progress, span))

    def _unload(self, call_id: int, group_id: str) -> None:
        self._answer(call_id, self._worker.unload(group_id))

    def _process(self, call_id: int, group_id: str, request: Request) -> Callable[[], None] | None:
        """Queue the request, or answer its pass for this thread to run (``process_here``)."""
        done, lent = self._worker.process_here(group_id, request)
        self._answer(call_id, done)
        return lent

    def _run(self, call_id: int, group_id: str, member_id: str, blob: bytes) -> None:
        def reply(f: Future[Any]) -> None:
            self._send(("done", call_id, run_outcome(f)))

        try:
            fn, args, kwargs = unpack(blob, "fn or its arguments")
        except GpuGroupsError as exc:
            self._send(("done", call_id, ("error", exc.to_json())))
            return
        self._worker.run(group_id, member_id, fn, args, kwargs).add_done_callback(reply)

    def _gate(self, pause_id: int) -> Future[None]:
        """The release of pause ``pause_id``: made by its pause or its release, whichever comes first,
        and forgotten by the other (the release overtakes the queue, so it may come first)."""
        with self._releases_lock:
            gate = self._releases.pop(pause_id, None)
            if gate is None:
                gate = self._releases[pause_id] = Future()
        return gate

    def _pause(self, call_id: int) -> None:
        self._answer(call_id, self._worker.pause(self._gate(call_id)))

    def _release(self, call_id: int) -> None:
        self._gate(call_id).set_result(None)

    def _resident(self, call_id: int) -> None:
        self._send(("done", call_id, ("ok", self._worker.resident())))

    def _cancel(self, call_id: int, request_id: str) -> None:
        self._worker.cancel(request_id)

    def _stop(self, call_id: int) -> None:
        def stop() -> None:
            self._worker.stop()  # after what is queued
            self._send(("done", call_id, ("ok", None)))

        # on its own thread: a pause still queued may wait for a release that this loop must read
        threading.Thread(target=stop, name="gpugroups-stop", daemon=True).start()
