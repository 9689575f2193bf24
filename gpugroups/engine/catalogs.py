"""What ``Manager(catalog=...)`` accepts, turned into a ``Catalog``: a catalog, a TOML path, a list
of ``register_group`` dicts, or None for the shipped demo plus ``$GPUGROUPS_CATALOG`` / ``./gpugroups.toml``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..catalog import Catalog
from ..errors import GpuGroupsError

CATALOG_ENV = "GPUGROUPS_CATALOG"


def make_catalog(catalog: Any) -> Catalog:
    """A ``Catalog`` from what ``Manager(catalog=...)`` accepts (see ``Manager``)."""
    if isinstance(catalog, Catalog):
        return catalog
    cat = Catalog()
    if catalog is None:
        cat.add_demo()
        path = os.environ.get(CATALOG_ENV) or ("gpugroups.toml" if Path("gpugroups.toml").is_file() else None)
        if path:
            cat.load_toml(path)
    elif isinstance(catalog, (str, os.PathLike)):
        cat.load_toml(catalog)
    elif isinstance(catalog, Iterable) and not isinstance(catalog, (bytes, Mapping)):
        allowed = set(inspect.signature(Catalog.register_group).parameters) - {"self", "relative_to"}
        for spec in catalog:
            if not isinstance(spec, Mapping) or "group_id" not in spec:
                raise GpuGroupsError("invalid_catalog", f"catalog entries must be dicts with a group_id, got {spec!r}")
            unknown = sorted(set(spec) - allowed)
            if unknown:
                raise GpuGroupsError(
                    "invalid_catalog",
                    f"catalog entry {spec['group_id']!r}: unknown key(s) {unknown}; known: {sorted(allowed)}",
                )
            cat.register_group(**spec)
    else:
        raise GpuGroupsError(
            "invalid_catalog",
            f"catalog: a Catalog, a TOML path, a list of group dicts or None, not {type(catalog).__name__}",
        )
    return cat
