"""Research access: your own code on a resident model, where it lives (``m.run``, ``m.use``).

Both hold the group (``Residency.hold``: in use, never evicted, unloads and loads that need its
room wait) and make the requested member active through the worker's ``run``, the one way a member
is activated outside the manager's own forward passes. Kernel-only: no op of the ops table reaches
this room, since it runs arbitrary code.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Any, NoReturn

from ..catalog import Catalog
from ..errors import GpuGroupsError
from .calls import Worker
from .residency import Residency
from .slot import Slot


@dataclass(frozen=True)
class Handle:
    """What ``with m.use(model_id) as h`` gives: the member's model object (its adapter active),
    its tokenizer, and the torch device its tensors live on (``inputs.to(h.device)``)."""

    model: Any
    tokenizer: Any
    device: str
    device_id: int
    model_id: str
    group_id: str


class Research:
    """``run`` and ``use`` over one manager's residency and workers."""

    def __init__(self, catalog: Catalog, res: Residency, workers: list[Worker]) -> None:
        self._catalog, self._res, self._workers = catalog, res, workers

    def run(self, model_id: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """``fn(model, tokenizer, *args, **kwargs)`` on the device's worker; see ``Manager.run``."""
        if not callable(fn):
            raise GpuGroupsError("invalid_request", f"run: fn must be callable, got {type(fn).__name__}")
        slot, fut = self._start(model_id, fn, args, kwargs, holder=None)  # its hold ends when fn ends
        try:
            return fut.result()
        except Exception as exc:  # fn's own error, as itself; the note says where it ran
            exc.add_note(self._where(model_id, slot))
            raise

    @contextlib.contextmanager
    def use(self, model_id: str) -> Iterator[Handle]:
        """Hold the device's worker and hand its model to this thread; see ``Manager.use``."""
        release = threading.Event()
        handed: Future[Handle] = Future()
        me = threading.get_ident()

        def hand_over(model: Any, tokenizer: Any, slot: Slot) -> None:
            # Runs on the worker, inside the member's activation; keeps the worker until released.
            if release.is_set():  # the caller left (an interrupt) before the worker got here
                return
            backing = str(getattr(model, "device", self._workers[slot.device_id].device.backing))  # a member's own device
            handed.set_result(Handle(model, tokenizer, backing, slot.device_id, model_id, slot.group.id))
            release.wait()

        try:
            slot, held = self._start(model_id, hand_over, (), {}, holder=me, in_process=True)
        except BaseException:
            release.set()  # a hand-over queued before an interrupt returns at once
            raise
        try:
            wait([handed, held], return_when=FIRST_COMPLETED)
            if not handed.done():
                held.result()  # the worker failed before handing over: raise why
            yield handed.result()
        finally:
            # Work queued after this block runs after the hand-over returns, so the group needs
            # no protection past this point, even if the hand-over has not started yet.
            release.set()
            self._res.unhold(slot, me)

    def _start(
        self,
        model_id: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        holder: int | None,
        in_process: bool = False,
    ) -> tuple[Slot, Future[Any]]:
        """Get the group resident, hold it and queue ``fn`` on its worker. A ``run``'s hold (no
        ``holder``) ends when ``fn`` ends, as arranged where it is queued, under the lock (where no
        interrupt comes between); a ``use``'s caller ends its own. If this raises (an interrupt
        included), the hold it took ends here, or once ``fn`` ends.

        ``in_process`` (``use``): the worker must share this process, and ``fn`` also receives the slot.
        """
        group = self._catalog.group_of(model_id)
        held: list[Slot] = []
        queued: list[Future[Any]] = []
        if in_process and not any(w.in_process for w in self._workers):  # refused before any load
            self._not_here(model_id, None)

        def queue(slot: Slot) -> Future[Any]:
            worker = self._workers[slot.device_id]
            if in_process and not worker.in_process:
                self._not_here(model_id, slot.device_id)
            for d in slot.device_ids:
                self._res.guard(d)
            call_args = (*args, slot) if in_process else args
            self._res.hold(slot, holder, held)
            queued.append(self._res.on_span(slot, lambda after: worker.run(
                group.id, model_id, fn, call_args, kwargs, after)))
            if holder is None:
                queued[0].add_done_callback(lambda _: self._res.unhold(slot))
            return queued[0]

        try:
            slot, _, fut = self._res.ensure(group, None, queue)
        except BaseException:
            if held and not queued:
                self._res.unhold(held[0], holder)
            elif held and holder is not None:  # a run's hold ends with fn already
                queued[0].add_done_callback(lambda _: self._res.unhold(held[0], holder))
            raise
        return slot, fut

    def _not_here(self, model_id: str, device_id: int | None) -> NoReturn:
        """``use`` where the model lives in another process (a worker process, a Ray device)."""
        where = (
            "every device" if device_id is None else f"device {device_id} ({self._workers[device_id].device.device})"
        )
        raise GpuGroupsError(
            "invalid_request",
            f"{where} runs its models in another process, so `use` cannot hand them to this one; "
            f"call m.run({model_id!r}, fn) to run fn where they live",
        )

    def _where(self, model_id: str, slot: Slot) -> str:
        dev = self._workers[slot.device_id].device
        return f"in m.run({model_id!r}) on device {slot.device_id} ({dev.device})"
