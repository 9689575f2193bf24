"""Out-of-process devices: ``ProcessWorker`` runs one device's worker in a process of its own.

Why: the interpreter lock. A load in the kernel's process (module construction, PEFT wiring,
all Python) holds it for long stretches, and prompts served by another device's thread in that
process wait for it: up to 25x at p99, against about 1.1x when the same load runs in another
process. So each device gets a process of its own (``prochost``) running its ``ThreadWorker``, which
orders and batches its calls as it would here; this side is the ``Worker`` protocol over a pipe.
Calls travel in the order made. What a call must wait for in this process (``Span.after``,
``Request.after``: holds on other devices) is waited for here, before the call is sent, by the
worker's sender thread; a pause in the worker process ends when this side sends its release.
Light: neither side imports torch until the worker process loads or predicts.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import multiprocessing
import subprocess
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..catalog import GroupSpec
from ..errors import GpuGroupsError, manager_closed
from .calls import Held, Progress, Request, Span, cancelled
from .devices import Device
from .prochost import DEVICE_FIELDS
from .remote import RemoteCalls, pack_run, result_of

#: How long a worker process may take to answer ``resident`` (it starts Python first) or to stop.
ANSWER_S = 60.0
_NO_AFTER: tuple[Future[Any], ...] = ()
#: The worker process's program: this gpugroups (``argv[2]``, where the interpreter would not find it), then serve.
_BOOT = "import sys; sys.argv[2] in sys.path or sys.path.insert(0, sys.argv[2]); import gpugroups.engine.prochost as h; h.main()"


@dataclass
class _Call:
    future: Future[Any]
    op: str
    progress: Progress | None = None


class ProcessWorker(RemoteCalls):
    """The ``Worker`` of a device whose models live in a worker process of this machine.

    The process sees every device this one does, so it can drive a group sharded over devices
    with its first device's worker while the others' processes are paused. ``run`` sends ``fn``
    and its arguments by value (cloudpickle) and brings the result back with its tensors on the
    CPU; ``use`` cannot hand out its models (``in_process`` is false).
    """

    def __init__(self, device: Device) -> None:
        super().__init__(device)
        self._conn, there = multiprocessing.Pipe()
        # A fresh interpreter (never a fork of this one, with its CUDA state and held locks), started
        # by hand rather than by multiprocessing's spawn, which would import this process's
        # ``__main__`` again there: a script without a ``__main__`` guard would run once per device.
        root = str(Path(__file__).resolve().parents[2])  # where this gpugroups is imported from
        self._proc = subprocess.Popen([sys.executable, "-c", _BOOT, str(there.fileno()), root], pass_fds=(there.fileno(),))
        there.close()
        # first message: what to serve, and where this process finds modules (fn by reference)
        self._conn.send(({f: getattr(device, f) for f in DEVICE_FIELDS}, sys.path))
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._outbox: deque[tuple[tuple[Any, ...], tuple[Future[Any], ...]]] = deque()
        self._dropped: set[int] = set()  # outbox calls cancelled before their turn
        self._out = threading.Condition()  # guards the outbox and every send on the pipe
        self._ending = False
        self._reader = threading.Thread(target=self._read, name=f"gpugroups-read-{device.device}", daemon=True)
        self._reader.start()
        threading.Thread(target=self._send_in_order, name=f"gpugroups-send-{device.device}", daemon=True).start()

    @property
    def pid(self) -> int | None:
        """The worker process's id (for monitoring)."""
        return self._proc.pid

    # ---- the Worker protocol ----------------------------------------------------------------
    def load(self, group: GroupSpec, folders: Mapping[str, Path], dtype: str, progress: Progress) -> Future[int]:
        return self._call("loading", "load", (group, dict(folders), dtype), progress=progress)

    def load_sharded(
        self, group: GroupSpec, folders: Mapping[str, Path], dtype: str, progress: Progress, span: Span
    ) -> Future[list[tuple[int, int]]]:
        there = dataclasses.replace(span, after=())
        return self._call("loading", "load_sharded", (group, dict(folders), dtype, there), span.after, progress)

    def pause(self, release: Future[Any], ended: Future[None] | None = None) -> Future[None]:
        call_id = next(self._ids)
        begun = self._call("busy", "pause", (), call_id=call_id)
        held = self._track("busy")  # the pause's call ends as it begins: the device shows busy until its release

        def let_go(_: Future[Any]) -> None:
            # overtakes the queue (what waits behind the pause must not wait for its release)
            self._send_now((call_id, "release", ()))
            self._settle(held, ("ok", None))
            if ended is not None:
                ended.set_result(None)

        release.add_done_callback(let_go)
        return begun

    def unload(self, group_id: str) -> Future[None]:
        return self._call("unloading", "unload", (group_id,))

    def process(self, group_id: str, request: Request) -> Future[dict[str, Any]]:
        there = dataclasses.replace(request, after=()) if request.after else request
        return self._call("busy", "process", (group_id, there), request.after)

    def run(
        self, group_id: str, member_id: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
        after: tuple[Future[None], ...] = (),
    ) -> Future[Any]:
        blob = pack_run(fn, args, kwargs)
        if isinstance(blob, Future):
            return blob
        return self._call("busy", "run", (group_id, member_id, blob), after)

    def cancel(self, request_id: str) -> None:
        """Drop the request if it still waits here (behind a hold on another device), else ask the
        worker process to drop it from its queue or stop it between generation steps."""
        with self._out:
            for (call_id, op, args), _ in self._outbox:
                if op == "process" and args[1].request_id == request_id:
                    self._dropped.add(call_id)  # the sender skips it when its turn comes
                    return
            self._send((0, "cancel", (request_id,)), None)

    def resident(self) -> dict[str, Held]:
        try:
            held: dict[str, Held] = self._call("idle", "resident", ()).result(timeout=ANSWER_S)
        except TimeoutError:
            self._proc.kill()  # it does not answer: lost (the reader sees the pipe close)
            return {}
        except GpuGroupsError:
            return {}  # lost or stopped: nothing held
        return held

    def stop(self) -> None:
        """Finish what is queued, then end the worker process and wait for it (no zombie)."""
        done = self._call("idle", "stop", ())
        with self._lock:
            self._closed = True
        try:
            done.result(timeout=ANSWER_S)
        except TimeoutError:
            self._proc.kill()  # stuck (a run that never returns): end it
        except Exception:
            pass  # lost or stopped already: the reader has ended it
        self._reader.join()  # it closes the pipe and reaps the process
        with self._out:
            self._ending = True
            self._out.notify()

    # ---- plumbing ---------------------------------------------------------------------------
    def _unavailable(self, cause: BaseException | None = None) -> GpuGroupsError:
        d, code = self.device, self._proc.returncode
        return GpuGroupsError(
            "host_unavailable", f"the worker process of device {d.device_id} ({d.device}) ended (exit code {code})",
            {"device_id": d.device_id, "exitcode": code},
        )

    def _call(
        self,
        status: str,
        op: str,
        args: tuple[Any, ...],
        after: tuple[Future[Any], ...] = _NO_AFTER,
        progress: Progress | None = None,
        call_id: int | None = None,
    ) -> Future[Any]:
        """Track a call and send it after what is queued, once ``after`` is done."""
        fut = self._track(status)
        if fut.done():
            return fut
        call_id = next(self._ids) if call_id is None else call_id
        self._calls[call_id] = _Call(fut, op, progress)
        message = (call_id, op, args)
        with self._out:
            if self._outbox or not all(f.done() for f in after):
                self._outbox.append((message, after))
                self._out.notify()
            else:
                self._send(message, call_id)
        return fut

    def _send_now(self, message: tuple[Any, ...]) -> None:
        with self._out:
            self._send(message, None)

    def _send(self, message: tuple[Any, ...], call_id: int | None) -> None:
        """Under ``_out``: put a message on the pipe; a call that cannot be sent fails."""
        try:
            self._conn.send(message)
        except Exception as exc:
            call = self._calls.pop(call_id, None) if call_id is not None else None
            if call is not None:  # a closed pipe: the process is gone; anything else: a bug of ours
                gone = isinstance(exc, (OSError, ValueError))
                self._settle(call.future, self._unavailable() if gone else GpuGroupsError(
                    "internal_error", f"cannot send {call.op} to the worker process: {type(exc).__name__}: {exc}"
                ))

    def _send_in_order(self) -> None:
        """The sender thread: sends the outbox's head once what it waits for is done."""
        while True:
            with self._out:
                while not self._outbox and not self._ending:
                    self._out.wait()
                if not self._outbox:
                    return
                message, after = self._outbox[0]
            wait(after)
            failed = next((f.exception() for f in after if f.exception() is not None), None)
            with self._out:
                self._outbox.popleft()
                if message[0] in self._dropped:
                    self._dropped.discard(message[0])
                    failed = cancelled(message[2][1].request_id)
                elif failed is None:
                    self._send(message, message[0])
            call = self._calls.pop(message[0], None) if failed is not None else None
            if failed is not None and call is not None:  # cancelled, or a hold on another device failed
                self._settle(call.future, failed)

    def _read(self) -> None:
        """The reader thread: settles calls from the worker process's answers, in order, until the
        answer to ``stop`` or until the pipe closes (the process died: the device is lost)."""
        try:
            while True:
                kind, call_id, *rest = self._conn.recv()
                if kind == "progress":
                    self._report(call_id, *rest)
                    continue
                if kind == "warning":
                    _warn(*rest)
                    continue
                call = self._calls.pop(call_id, None)
                if call is not None:
                    self._settle(call.future, result_of(*rest[0]) if call.op == "run" else rest[0])
                    if call.op == "stop":
                        break
        except (EOFError, OSError):
            pass
        with self._out:
            self._conn.close()  # after ``stop`` the worker process reads the end of its pipe and exits
        try:
            self._proc.wait(timeout=ANSWER_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._lose()
        self._fail_pending(manager_closed())

    def _report(self, call_id: int, fraction: float, stage: str) -> None:
        call = self._calls.get(call_id)
        if call is None or call.progress is None:
            return
        try:
            call.progress(fraction, stage)
        except Exception:
            pass  # a failing progress display must not stop this device's answers


def _warn(module: str, name: str, text: str) -> None:
    """Warn here what the worker process showed: in its category where this process can import
    it, else as a ``UserWarning``."""
    try:
        category = getattr(importlib.import_module(module), name)
    except Exception:
        category = None
    if not (isinstance(category, type) and issubclass(category, Warning)):
        category = UserWarning
    warnings.warn(text, category, stacklevel=1)
