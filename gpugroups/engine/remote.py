"""What every worker that runs elsewhere (a worker process, a Ray actor) shares with the others.

The far side answers each call as plain data, an ``Outcome`` (``outcome``, ``run_outcome``, tensors
moved to the CPU by ``on_cpu``); the near side, ``RemoteCalls``, keeps the calls pending as
``concurrent.futures.Future``s, settles them from those outcomes, and turns the device ``"lost"``
when the far side is gone. ``run``'s payloads travel by value, as cloudpickle bytes (``pack``,
``unpack``, ``result_of``). Light: torch is imported only to move a result's tensors.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import threading
import traceback
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Protocol

import cloudpickle

from ..errors import GpuGroupsError, manager_closed
from .calls import OutOfMemory
from .devices import Device

#: What one call answers: ``("ok", value)``, ``("error", GpuGroupsError JSON)``, ``("oom", message)``,
#: or for ``run`` ``("raised", exception)``: fn's own exception, handed back as itself (a ``run``
#: outcome's value travels packed: ``run_outcome`` packs it, ``result_of`` unpacks it).
Outcome = tuple[str, Any]
#: What the payload of a ``run`` outcome is, by its kind (the other kinds carry plain data).
_PACKED = {"ok": "fn's result", "raised": "fn's exception"}


class Done(Protocol):
    """A finished future (``concurrent.futures`` or ``asyncio``): all ``outcome`` reads of it."""

    def exception(self) -> BaseException | None: ...

    def result(self) -> Any: ...


def outcome(fut: Done, wrap: Callable[[BaseException], GpuGroupsError]) -> Outcome:
    """A finished call as plain data (exceptions other than ours do not travel well between
    processes): ``wrap`` turns a foreign exception into the ``GpuGroupsError`` that stands for it."""
    exc = fut.exception()
    if exc is None:
        return ("ok", fut.result())
    if isinstance(exc, OutOfMemory):
        return ("oom", str(exc))
    return ("error", (exc if isinstance(exc, GpuGroupsError) else wrap(exc)).to_json())


def run_outcome(fut: Done) -> Outcome:
    """A finished ``run``: its result with tensors on the CPU, or fn's own exception, packed
    (``result_of`` unpacks them); our error as JSON, also when the payload cannot be pickled."""
    exc = fut.exception()
    if isinstance(exc, GpuGroupsError):
        return ("error", exc.to_json())
    if exc is not None:  # its frames do not travel with it: their text does
        where = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
        exc.add_note(f"Traceback where fn ran (most recent call last):\n{where}")
    try:
        kind, value = ("ok", on_cpu(fut.result())) if exc is None else ("raised", exc)
        return (kind, pack(value, _PACKED[kind]))
    except Exception as failed:  # never no answer: the caller waits for one
        err = failed if isinstance(failed, GpuGroupsError) else GpuGroupsError(
            "invalid_request", f"run: fn's result cannot be brought back ({type(failed).__name__}: {failed})"
        )
        if exc is not None:  # the exception itself cannot travel: what it says can
            said = "\n".join([f"{type(exc).__qualname__}: {exc}", *getattr(exc, "__notes__", [])])
            err = GpuGroupsError(err.code, f"{err.message}; fn raised {said}")
        return ("error", err.to_json())


def result_of(kind: str, value: Any) -> Outcome:
    """A ``run`` outcome as ``run_outcome`` made it, its payload unpacked in this process."""
    if kind in _PACKED:
        try:
            return (kind, unpack(value, _PACKED[kind]))
        except GpuGroupsError as exc:
            return ("error", exc.to_json())
    return (kind, value)


def pack(value: Any, what: str) -> bytes:
    """``run``'s fn and arguments, or its result, as bytes for the other side. By value through
    cloudpickle: fn may be a lambda or a notebook function, and tensors travel as bytes (a pipe's
    own pickler would hand them over in shared memory). Bytes also pass a transport untouched, so
    a payload that cannot be rebuilt there fails in ``unpack``, as our error, not in the transport.
    ``invalid_request`` naming ``what`` if it cannot be pickled."""
    try:
        blob: bytes = cloudpickle.dumps(value)
    except Exception as exc:
        raise GpuGroupsError("invalid_request", f"run: {what} cannot be pickled ({type(exc).__name__}: {exc})") from None
    return blob


def pack_run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Any) -> bytes | Future[Any]:
    """``run``'s payload as bytes (``pack``), or a future already failed with why it cannot travel."""
    try:
        return pack((fn, args, dict(kwargs)), "fn or its arguments")
    except GpuGroupsError as exc:
        refused: Future[Any] = Future()
        refused.set_exception(GpuGroupsError(exc.code, f"{exc.message}. It runs in another process: what it "
                                             "refers to travels there by value, so it cannot use the manager "
                                             "(or a lock, a file, a socket); pass it what it needs instead"))
        return refused


def unpack(blob: bytes, what: str) -> Any:
    """What ``pack`` sent; ``invalid_request`` naming ``what`` if this process cannot rebuild it."""
    try:
        return pickle.loads(blob)
    except Exception as exc:
        raise GpuGroupsError(
            "invalid_request", f"run: {what} cannot be unpickled in this process ({type(exc).__name__}: {exc})"
        ) from None


def on_cpu(value: Any) -> Any:
    """``value`` with every torch tensor in it moved to the CPU and detached, each container kept
    as the type it is: lists, tuples (named ones too), dicts (transformers' ``ModelOutput`` too) and
    dataclasses; tensors inside other objects travel as they are."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        try:
            moved: Any = copy.copy(value)  # a ``ModelOutput`` keeps its attributes in step with its items
            for k, v in value.items():
                moved[k] = on_cpu(v)
        except TypeError:  # a mapping that cannot be copied or written: its items as a dict
            return {k: on_cpu(v) for k, v in value.items()}
        return moved
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(on_cpu(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = copy.copy(value)  # not through ``__init__``: fields it does not take keep their values
        for f in dataclasses.fields(value):
            if hasattr(value, f.name):
                object.__setattr__(moved, f.name, on_cpu(getattr(value, f.name)))  # frozen ones too
        return moved
    return value


class RemoteCalls:
    """The near side of a worker that runs elsewhere: its pending calls, their outcomes, its loss.

    A subclass sends the calls and says what an unreachable far side is (``_unavailable``); this
    answers ``status``, ``queue_depth`` and ``on_lost`` of the ``Worker`` protocol from the calls
    it tracks.
    """

    in_process = False

    def __init__(self, device: Device) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._pending: dict[Future[Any], str] = {}  # call -> status it stands for, oldest first
        self._lost: GpuGroupsError | None = None
        self._closed = False
        self._callbacks: list[Callable[[], None]] = []

    @property
    def status(self) -> str:
        if self._lost is not None:
            return "lost"
        with self._lock:
            return next(iter(self._pending.values()), "idle")

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    def keep(self, group_id: str, pinned: bool) -> None:
        """Nothing to keep: a worker process ends with its manager (``RayWorker`` overrides it)."""

    def on_lost(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def _unavailable(self, cause: BaseException | None = None) -> GpuGroupsError:
        """The ``host_unavailable`` error of this device's calls once its far side is gone."""
        raise NotImplementedError

    def _track(self, status: str, fut: Future[Any] | None = None) -> Future[Any]:
        """A new pending call standing for ``status`` (``fut``, else a plain future); failed at
        once if closed or lost."""
        fut = Future() if fut is None else fut
        with self._lock:
            if self._closed:
                fut.set_exception(manager_closed())
            elif self._lost is not None:
                fut.set_exception(self._lost)
            else:
                self._pending[fut] = status
        return fut

    def _settle(self, fut: Future[Any], result: Outcome | BaseException) -> None:
        """Answer a call from the far side's outcome, or from the exception that replaced it."""
        with self._lock:
            if self._pending.pop(fut, None) is None:
                return  # failed already (lost)
        if isinstance(result, BaseException):
            fut.set_exception(result)
        elif result[0] == "ok":
            fut.set_result(result[1])
        elif result[0] == "raised":
            fut.set_exception(result[1])
        elif result[0] == "oom":
            fut.set_exception(OutOfMemory(result[1]))
        else:
            fut.set_exception(GpuGroupsError.from_json(result[1]))

    def _fail_pending(self, err: GpuGroupsError) -> None:
        """Fail every pending call with ``err`` (the far side will not answer them)."""
        with self._lock:
            pending, self._pending = list(self._pending), {}
        for fut in pending:
            fut.set_exception(err)

    def _lose(self) -> None:
        """The far side is gone: fail what is pending, turn ``"lost"``, tell the callbacks once."""
        err = self._unavailable()
        with self._lock:
            if self._closed or self._lost is not None:
                return
            self._lost = err
        self._fail_pending(err)
        for cb in self._callbacks:
            cb()
