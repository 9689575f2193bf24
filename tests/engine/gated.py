"""A manager whose device workers can be held: the real ``ThreadWorker`` plus a gate.

Injected through ``Manager(worker=...)``, the documented seam, so tests never reach into the
manager's private fields to stall a device.
"""

from __future__ import annotations

import threading
from typing import Any

import gpugroups as gg
from gpugroups.engine.devices import Device
from gpugroups.engine.worker import ThreadWorker


class GatedWorker(ThreadWorker):
    """``ThreadWorker`` that can be told to hold: ``hold()`` queues a wait on a gate and returns it."""

    def hold(self) -> threading.Event:
        gate = threading.Event()
        self.call(gate.wait)
        return gate


def gated_manager(lend: bool | None = None, **kwargs: Any) -> tuple[gg.Manager, list[GatedWorker]]:
    """A ``Manager`` built with ``GatedWorker``s (``lend``: as ``ThreadWorker``'s), and those workers
    (one per device, in order)."""
    workers: list[GatedWorker] = []

    def make(device: Device) -> GatedWorker:
        w = GatedWorker(device, lend)
        workers.append(w)
        return w

    return gg.Manager(worker=make, **kwargs), workers

