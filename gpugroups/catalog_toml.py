"""TOML catalog files: a file's ``roots`` and ``[groups.<id>]`` tables registered into a ``Catalog``
(``Catalog.load_toml``), every error an ``invalid_catalog`` naming the file and line. Light (no torch).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import GpuGroupsError

if TYPE_CHECKING:
    from .catalog import Catalog, GroupSpec

_GROUP_KEYS = {"kind", "name", "base", "base_id", "adapters", "models", "dtype", "trust_remote_code"}
_TOP_KEYS = {"roots", "groups"}


def load_toml(catalog: Catalog, path: str | os.PathLike[str]) -> list[GroupSpec]:
    """Add the groups of a TOML catalog file to ``catalog`` (see ``Catalog.load_toml``): all of
    them or, on an error, none; the file's folder and its ``roots`` become allowed roots."""
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise GpuGroupsError("invalid_catalog", f"cannot read catalog {path}: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # "msg (at line L, column C)" becomes "file:L: msg (column C)", like every other catalog error.
        found = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(exc), re.S)
        at = f"{path}:{found[2]}: {found[1]} (column {found[3]})" if found else f"{path}: {exc}"
        raise GpuGroupsError("invalid_catalog", at) from None

    def where(key: str, section: str | None = None) -> str:
        return f"{path}:{_line_of(text, key, section)}"

    for key in data:
        if key not in _TOP_KEYS:
            raise GpuGroupsError("invalid_catalog", f"{where(key)}: unknown key {key!r} (expected {sorted(_TOP_KEYS)})")
    roots = data.get("roots", [])
    if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
        raise GpuGroupsError("invalid_catalog", f"{where('roots')}: roots must be a list of paths")
    groups = data.get("groups", {})
    if not isinstance(groups, dict):
        raise GpuGroupsError("invalid_catalog", f"{where('groups')}: groups must be a table of groups")
    with catalog._lock:  # the file's groups appear (or roll back) as one step for other threads
        added: list[GroupSpec] = []
        try:
            for gid, g in groups.items():
                added.append(_group(catalog, gid, g, where, path.parent))
        except GpuGroupsError:
            for group in added:  # a broken file adds nothing, so fixing it and loading again works
                catalog._remove_group(group.id)
            raise
        catalog.add_roots([path.parent, *[(path.parent / Path(r).expanduser()) for r in roots]])
        return added


def _group(catalog: Catalog, gid: str, g: Any, where: Callable[..., str], folder: Path) -> GroupSpec:
    """Register one ``[groups.<gid>]`` table, errors naming its line."""
    if not isinstance(g, dict):
        raise GpuGroupsError("invalid_catalog", f"{where(gid)}: group {gid!r} must be a table")
    for key in g:
        if key not in _GROUP_KEYS:
            raise GpuGroupsError(
                "invalid_catalog",
                f"{where(key, gid)}: unknown key {key!r} in group {gid!r} (expected {sorted(_GROUP_KEYS)})",
            )
    kind = g.get("kind", "adapters" if "base" in g else "models")
    if kind not in ("adapters", "models"):
        raise GpuGroupsError("invalid_catalog", f"{where('kind', gid)}: kind must be 'adapters' or 'models', got {kind!r}")
    if (kind == "adapters") != ("base" in g):
        raise GpuGroupsError("invalid_catalog", f"{where(gid)}: an adapters group needs 'base' and a models group 'models'")
    try:
        return catalog.register_group(
            gid, base=g.get("base"), adapters=g.get("adapters"), models=g.get("models"),
            name=g.get("name"), dtype=g.get("dtype"), base_id=g.get("base_id"),
            trust_remote_code=g.get("trust_remote_code", False), relative_to=folder,
        )
    except GpuGroupsError as exc:
        raise GpuGroupsError("invalid_catalog", f"{where(gid)}: {exc.message}") from None


def _line_of(text: str, key: str, section: str | None = None) -> int:
    """Best-effort line number of ``key`` (within ``[groups.<section>]`` when given)."""
    lines = text.splitlines()
    start = 0
    if section is not None:
        for i, line in enumerate(lines):
            if re.match(rf"\s*\[\s*groups\.\"?{re.escape(section)}\"?\s*\]", line):
                start = i
                break
    pat = re.compile(rf"\s*(\[\s*groups\.)?\"?{re.escape(key)}\"?\s*(=|\])")
    for i in range(start, len(lines)):
        if pat.match(lines[i]):
            return i + 1
    return start + 1
