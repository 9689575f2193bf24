"""The catalog side of the ``Manager``: groups registered and taken out at run time, and the
loadable ids that no group names yet.

A mixin of ``Manager`` (as ``twins.AwaitableTwins`` is): it works on the manager's catalog,
estimates and residency, under its lock, and every change bumps the manager's version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..catalog import Catalog, PathArg
from .devices import Device
from .estimates import EstimateCache
from .residency import Residency
from .shield import ShieldedLock


class Registry:
    """Mixin of ``Manager``: ``register_group``, ``unregister_group``, ``discover``."""

    # the manager's, set by its constructor
    catalog: Catalog
    devices: list[Device]
    _estimates: EstimateCache
    _lock: ShieldedLock
    _res: Residency
    _bump: Callable[[], None]

    def register_group(
        self,
        group_id: str,
        base: PathArg | None = None,
        adapters: Mapping[str, PathArg] | None = None,
        models: Mapping[str, PathArg] | Iterable[PathArg] | PathArg | None = None,
        name: str | None = None,
        dtype: str | None = None,
        base_id: str | None = None,
        trust_remote_code: bool = False,
    ) -> dict[str, Any]:
        """Add a group to the catalog: ``base`` + ``adapters`` ({member: path}) or ``models``.

        Relative paths resolve against the working directory. ``base_id`` names the bare base
        member of an adapters group (default: the base's own id or path); ``trust_remote_code``
        lets transformers run the model folder's own code, as in ``from_pretrained``. Not on a
        closed manager. A group registered wrong is taken out again with ``unregister_group``.
        """
        self._res.check_open()
        spec = self.catalog.register_group(
            group_id, base=base, adapters=adapters, models=models, name=name, dtype=dtype, base_id=base_id,
            trust_remote_code=trust_remote_code,
        )
        self._estimates.ensure(spec, self.devices)
        with self._lock:
            self._bump()
        return spec.to_json()

    def unregister_group(self, group_id: str) -> dict[str, Any]:
        """Take a group and its members out of the catalog (a TOML file's too), to register it again
        fixed, or for good; returns what it was. ``conflict`` while it is loaded, loading or pinned:
        unload it first."""
        group = self.catalog.unregister(group_id, unless=self._res.kept)
        with self._lock:
            self._res.current.pop(group.id, None)
            self._res.ledger.forget(group.id)
            self._bump()
        return group.to_json()

    def discover(self) -> list[str]:
        """Loadable ids that no group names yet: hub ids in the local Hugging Face cache and model
        folders (with ``config.json``, two levels deep) under the allowed roots. Each becomes the
        single-model group ``single:<id>`` when it is first loaded."""
        return self.catalog.discover()
