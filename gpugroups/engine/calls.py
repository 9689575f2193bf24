"""What crosses the worker seam: the ``Worker`` protocol and the data of its calls.

``Request`` (a ``process`` call), ``Span`` (where a sharded load's layers go), ``Held`` (what a
worker holds, for adoption), the progress callback's shape, request ids, and the errors a worker
answers with. Light (no torch): the manager, a worker process and the Ray actor all import it.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from ..catalog import GroupSpec
from ..errors import GpuGroupsError
from .devices import Device
from .estimate import ShardReserve

#: ``progress(fraction, stage)``: how far a load has come, called from the worker.
Progress = Callable[[float, str], None]


_PREFIX, _NUMBERS = uuid.uuid4().hex[:16], itertools.count()


def _new_prefix() -> None:
    """A forked child numbers its requests apart from its parent."""
    global _PREFIX, _NUMBERS
    _PREFIX, _NUMBERS = uuid.uuid4().hex[:16], itertools.count()


os.register_at_fork(after_in_child=_new_prefix)


def new_request_id() -> str:
    """A fresh request id: a random prefix per process and a counter, unique as a uuid4 is and
    without its system call on every request (about 25 microseconds right after a forward pass)."""
    return f"{_PREFIX}{next(_NUMBERS):x}"


@dataclass
class Request:
    """One ``process`` call as the worker sees it: which member, which prompt, how many predictions.

    ``request_id`` is unique and names the request to ``Worker.cancel``; ``max_work`` is the most
    work (``protocol.request_work``) it may cost, checked once its prompt is tokenized.
    """

    member: str
    prompt: str
    num_predictions: int
    max_new_tokens: int = 0
    notes: list[str] = field(default_factory=list)
    #: A sharded group's forward pass starts once these are done: the holds on its other devices.
    after: tuple[Future[None], ...] = ()
    request_id: str = field(default_factory=new_request_id)
    max_work: int | None = None


def cancelled(request_id: str) -> GpuGroupsError:
    """What the future of a cancelled request fails with."""
    return GpuGroupsError("cancelled", f"request {request_id} was cancelled (its caller went away)")


@dataclass(frozen=True)
class Span:
    """Where a sharded group's layers go, in layer order: each device's tensor backing and the
    weight bytes placement gave it. ``after``: the holds on the other devices, to wait for first;
    ``reserve``: the group's runtime reserve, which the load splits as its map puts the layers."""

    backings: tuple[str, ...]
    weight_bytes: tuple[int, ...]
    reserve: ShardReserve
    after: tuple[Future[None], ...] = ()


class Held(NamedTuple):
    """A group a worker holds (``Worker.resident``): its measured bytes, and what was loaded."""

    bytes: int
    loaded_as: str  # ``loaded_as`` of the load that made it
    pinned: bool = False  # pinned by the manager that loaded it (``Worker.keep``)


def loaded_as(group: GroupSpec, folders: Mapping[str, Path], dtype: str) -> str:
    """What a load loads, as one comparable string: the group's members and makeup, their folders,
    the dtype. A new manager adopts a held group only if its catalog entry still says the same."""
    spec = {k: v for k, v in dataclasses.asdict(group).items() if k != "name"}
    return json.dumps([spec, {m: str(p) for m, p in folders.items()}, dtype], sort_keys=True)


class OutOfMemory(Exception):
    """The device could not hold the group (a worker raises it for its device's own OOM error)."""


class Worker(Protocol):
    """What the manager needs from a device's worker. Calls on one worker run in the order made.

    ``load`` answers the bytes the loaded group really holds on the device (weights and buffers),
    or fails with ``OutOfMemory`` (the device ran out), ``GpuGroupsError`` or any other
    exception; a failed load leaves nothing behind. ``unload`` runs after every request queued
    before it and is a no-op for a group not loaded. ``process`` answers
    ``{"predictions", "prompt_tokens", "truncated", "notes", "timing"}`` for one request; a
    worker may serve queued requests of one group in one forward pass (``timing.batch_size``).
    A sharded group is driven by the worker of its first device: ``load_sharded`` lays it out
    over the ``Span`` and answers each device's weight bytes and runtime reserve; ``pause`` holds the other devices' workers
    meanwhile, so nothing else runs on them between a sharded load or forward pass's start and end.
    ``cancel`` takes a queued request out of the queue, or stops a running one between generation
    steps; its future then fails with ``cancelled`` (``worker.cancelled``). Queued requests of
    different groups are served in turn, so one group's backlog does not starve another's request.

    ``run`` calls ``fn(model, tokenizer, *args, **kwargs)`` where the group lives, with
    ``member_id`` active (its adapter on, or adapters disabled for the bare base) for the duration
    and restored after; it answers what ``fn`` returns, or fails with what ``fn`` raised. A worker in
    this process calls ``fn`` directly and ``in_process`` is true. A worker in another process or on
    a Ray node sends ``fn``, ``args`` and ``kwargs`` by pickling (cloudpickle, as Ray does), sends the
    result back the same way with its tensors moved to the CPU, and fails with ``invalid_request``
    naming what could not be pickled; ``in_process`` is false there (the manager's ``use`` needs
    the model object in the caller's process and refuses such workers).
    """

    device: Device
    in_process: bool

    @property
    def status(self) -> str:
        """``"idle"``, ``"busy"``, ``"loading"``, ``"unloading"``, or ``"lost"`` (a worker in another
        process or on a Ray node that can no longer be reached): what the worker does now."""
        ...

    @property
    def queue_depth(self) -> int:
        """Calls waiting or running."""
        ...

    def load(self, group: GroupSpec, folders: Mapping[str, Path], dtype: str, progress: Progress) -> Future[int]: ...

    def load_sharded(
        self, group: GroupSpec, folders: Mapping[str, Path], dtype: str, progress: Progress, span: Span
    ) -> Future[list[tuple[int, int]]]: ...

    def pause(self, release: Future[Any], ended: Future[None] | None = None) -> Future[None]:
        """Pause this worker after what is queued until ``release`` is done; the answer is done
        once the pause has begun (or failed, when the worker is stopped). ``ended``, if given, is
        set once the pause is over (or never began) and the worker shows the device free again,
        so that the state made then shows it idle."""
        ...

    def unload(self, group_id: str) -> Future[None]: ...

    def process(self, group_id: str, request: Request) -> Future[dict[str, Any]]: ...

    def cancel(self, request_id: str) -> None:
        """Cancel the ``process`` request with this ``request_id``: out of the queue if it has not
        started, stopped between generation steps if it runs; a no-op if unknown or finished."""
        ...

    def run(
        self, group_id: str, member_id: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
        after: tuple[Future[None], ...] = (),
    ) -> Future[Any]:
        """``fn(model, tokenizer, *args, **kwargs)`` with ``member_id`` active, once ``after`` (holds
        on the other devices a sharded group spans) have begun."""
        ...

    def stop(self) -> None:
        """Finish what is queued, then end; later calls fail with ``invalid_request``."""
        ...

    def resident(self) -> dict[str, Held]:
        """The groups the device holds now, their measured bytes, what was loaded and whether it is
        pinned (a new manager adopts them as they are)."""
        ...

    def keep(self, group_id: str, pinned: bool) -> None:
        """Note, after the calls made before it, that the manager pinned or unpinned a group held
        here, for ``resident`` to say (an unload forgets it). Only a worker that can outlive its
        manager (a Ray device) needs to keep it."""
        ...

    def on_lost(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once if the device becomes unreachable (status ``"lost"``); its calls
        then fail with ``host_unavailable``. A device in this process is never lost."""
        ...
