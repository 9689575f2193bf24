"""A group's place in residency: its ``Slot`` (bytes per device, state, holds) and the ``Operation``
a load shows in the state JSON. Plain data, changed only under the manager's lock.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from ..catalog import GroupSpec


@dataclass
class Slot:
    """A group's place: its bytes on each device it spans (in layer order); loading, resident or unloading."""

    group: GroupSpec
    shares: dict[int, int]
    weights: dict[int, int] = field(default_factory=dict)  # placement's layer bytes per device (sharded only)
    state: str = "loading"  # "loading" | "resident" | "unloading"
    last_used: float = field(default_factory=time.monotonic)
    inflight: int = 0
    in_use: int = 0  # ``run`` calls and ``use`` blocks holding it
    holders: list[int] = field(default_factory=list)  # threads inside a ``use`` block on it
    done: Future[Slot] = field(default_factory=Future)  # loaded (result) or failed (exception)
    gone: Future[None] = field(default_factory=Future)  # set once unloaded

    @property
    def device_id(self) -> int:
        """The first device: the one whose worker holds the group."""
        return next(iter(self.shares))

    @property
    def device_ids(self) -> list[int]:
        """Every device the group spans, in layer order."""
        return list(self.shares)

    @property
    def bytes(self) -> int:
        return sum(self.shares.values())

    def shares_json(self) -> list[dict[str, int]]:
        """``[{"device_id", "bytes"}]`` in layer order (the state JSON's ``shards``)."""
        return [{"device_id": d, "bytes": b} for d, b in self.shares.items()]

    @property
    def busy(self) -> bool:
        """Serving requests or held by ``run``/``use``: not to be evicted now."""
        return self.inflight > 0 or self.in_use > 0


@dataclass
class Operation:
    """A long-running operation shown in the state JSON."""

    id: str
    op: str
    group_id: str
    device_id: int
    progress: float = 0.0
    stage: str = "queued"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "op": self.op, "group_id": self.group_id, "device_id": self.device_id,
            "progress": round(self.progress, 4), "stage": self.stage,
        }
