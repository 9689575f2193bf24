"""The estimate cache: each group's ``estimate.estimate_group`` per device kind and dtype, read once.

File I/O (folder lookups, safetensors headers) happens in ``ensure``, which the manager calls
outside its lock; under the lock it only ``peek``s. A failure is cached too (a hub id that is
not in the local cache stays unresolvable) until the catalog's spec for that group changes;
a load asks again (``retry_failed``) so that a folder fixed since is seen.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..catalog import Catalog, GroupSpec
from ..errors import GpuGroupsError
from . import estimate as est
from .devices import Device

if TYPE_CHECKING:
    from .sharding import Block


def folders(catalog: Catalog, group: GroupSpec) -> dict[str, Path]:
    """Each member's local folder (``unknown_model`` if one cannot be found)."""
    found = {}
    for m in group.members:
        spec = catalog.models.get(m)
        if spec is None:  # ``unregister_group`` took it out meanwhile
            raise GpuGroupsError("unknown_group", f"group {group.id!r} left the catalog (unregister_group)")
        found[m] = catalog.local_path(spec.source)
    return found


def shard_reserve(parts: dict[str, int]) -> est.ShardReserve:
    """The group's runtime reserve by where a sharded pass needs it."""
    kv, logits = parts["kv_bytes"], parts["logits_bytes"]
    return est.ShardReserve(parts["reserve_bytes"] - kv - logits, kv, logits)


def needed_bytes(parts: dict[str, int], measured: int | None, warm: bool) -> int:
    """Bytes a group needs resident on a device: measured weights replace estimated ones once
    known, and a device whose context already exists (``warm``) needs no overhead again."""
    weights = parts["weights_bytes"] + parts["adapters_bytes"] if measured is None else measured
    return int(weights + parts["reserve_bytes"] + (0 if warm else parts["overhead_bytes"]))


@dataclass(frozen=True)
class _Entry:
    spec: GroupSpec  # the catalog's spec when this was computed
    parts: dict[str, int] | None
    error: GpuGroupsError | None


class EstimateCache:
    """Estimates of the catalog's groups for the devices of one manager."""

    def __init__(self, catalog: Catalog, dtype: str | None) -> None:
        self.catalog = catalog
        self.dtype = dtype
        self._entries: dict[tuple[str, str, str], _Entry] = {}
        self._blocks: dict[tuple[str, str], tuple[GroupSpec, list[Block] | None]] = {}
        self._lock = threading.Lock()
        #: Bumped whenever an estimate is (re)computed: the event states rebuild every group's
        #: estimate then (``engine.state.States``).
        self.revision = 0

    def dtype_for(self, group: GroupSpec, dev: Device) -> str:
        """The load dtype: the group's own, else the manager's, else the device's default."""
        return group.dtype or self.dtype or est.default_dtype(dev.kind, dev.supports_bf16)

    def ensure(self, group: GroupSpec, devices: Iterable[Device], retry_failed: bool = False) -> None:
        """Compute what is missing (or stale) for ``group`` on these devices. Does file I/O: call unlocked."""
        done: set[tuple[str, str, str]] = set()
        for dev in devices:
            key = self._key(group, dev)
            if key in done:  # devices of one kind and dtype share an estimate
                continue
            done.add(key)
            with self._lock:
                entry = self._entries.get(key)
            if entry is not None and entry.spec == group and (entry.error is None or not retry_failed):
                continue
            try:
                entry = _Entry(group, est.estimate_group(group, folders(self.catalog, group), key[2], dev.kind), None)
            except GpuGroupsError as exc:
                entry = _Entry(group, None, exc)
            with self._lock:
                self._entries[key] = entry
                self.revision += 1

    def peek(self, group: GroupSpec, dev: Device, strict: bool = False) -> dict[str, int] | None:
        """The cached parts (no I/O), or None when not computed yet or failed.

        With ``strict`` a cached failure is raised, and a missing entry is an error too.
        """
        with self._lock:
            entry = self._entries.get(self._key(group, dev))
        if entry is None or entry.spec != group:
            if strict:
                raise GpuGroupsError("invalid_request", f"no estimate for group {group.id!r} yet")
            return None
        if entry.error is not None and strict:
            raise entry.error
        return entry.parts

    def ensure_blocks(self, group: GroupSpec, dev: Device) -> None:
        """Compute the group's blocks for sharding (file I/O, a meta-device model: call unlocked).

        A group of one model object (an adapters group's base, or a single model) splits by its
        layers; a ``models`` group of several members by whole members (``kind`` ``model``: each
        member on one device). Models that cannot be built on the meta device get None.
        """
        key = (group.id, self.dtype_for(group, dev))
        with self._lock:
            cached = self._blocks.get(key)
        if cached is not None and cached[0] == group:
            return
        from . import sharding

        paths, trc = folders(self.catalog, group), group.trust_remote_code
        try:
            if group.kind == "models" and len(group.members) > 1:
                found = [sharding.Block(m, est.weight_bytes(paths[m], key[1], trc), "model") for m in group.members]
            else:
                one = group.base if group.kind == "adapters" else group.members[0]
                found = sharding.blocks(sharding.meta_model(paths[one], key[1], trc))  # type: ignore[index]
        except GpuGroupsError:
            found = None
        with self._lock:
            self._blocks[key] = (group, found)

    def blocks(self, group: GroupSpec, dev: Device) -> list[Block] | None:
        """The cached layer blocks in layer order (None: not computed, or not shardable)."""
        with self._lock:
            cached = self._blocks.get((group.id, self.dtype_for(group, dev)))
        return cached[1] if cached is not None and cached[0] == group else None

    def _key(self, group: GroupSpec, dev: Device) -> tuple[str, str, str]:
        return (group.id, dev.kind, self.dtype_for(group, dev))
