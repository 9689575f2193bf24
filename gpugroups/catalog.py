"""Groups and models: where they come from (TOML, Python dicts, the HF cache, folders, the demo).

Every model belongs to exactly one group. A loadable id that no group names (a local folder
under an allowed root, or a hub id present in the local Hugging Face cache) becomes the
single-model group ``single:<id>`` when it is first loaded (a folder by its resolved path, so
every spelling is one group; a bounded number of them). Local paths outside the allowed roots are
``unknown_model``: an id from a REST client never makes the kernel read an arbitrary file.
TOML catalog files are read by ``catalog_toml`` (``Catalog.load_toml``).
Light on purpose (no torch): the Jupyter server may import it.
"""

from __future__ import annotations

import difflib
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from . import catalog_toml, localfiles
from .errors import GpuGroupsError
from .localfiles import DEMO_DIR, default_roots, hf_hub_cache, read_json
from .protocol import MAX_ID_CHARS

#: A model's source as a caller may give it: a hub id or folder, or a folder as a ``Path``.
PathArg = str | os.PathLike[str]


def _fspath(path: Any) -> Any:
    """A path given as ``os.PathLike`` (a ``Path``) as its string; anything else as it came (checked later)."""
    return os.fspath(path) if isinstance(path, os.PathLike) else path

GROUP_KINDS = ("adapters", "models", "single")
DTYPES = ("float32", "float16", "bfloat16")
#: The names people write for them: Hugging Face's and PyTorch's (``torch.float16`` too), the short ones.
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


@dataclass
class ModelSpec:
    """A model: its id, its group, where its files are (absolute local path or hub id), its role."""

    id: str
    group_id: str
    source: str
    role: str  # "base" | "adapter" | "model"


@dataclass
class GroupSpec:
    """A group: the unit of placement. ``members`` lists model ids, the base first for adapters."""

    id: str
    kind: str
    name: str
    members: list[str]
    base: str | None = None  # model id of the bare base (adapters groups)
    dtype: str | None = None
    trust_remote_code: bool = False

    def to_json(self) -> dict[str, Any]:
        """The catalog part of this group's JSON (the manager adds live fields)."""
        return {"id": self.id, "name": self.name, "kind": self.kind, "models": list(self.members)}


@dataclass
class Catalog:
    """A registry of groups and models, with the roots local paths must lie under.

    Thread-safe: the manager, a panel and the bridge may register and resolve at once.
    """

    roots: list[Path] = field(default_factory=lambda: default_roots())
    groups: dict[str, GroupSpec] = field(default_factory=dict)
    models: dict[str, ModelSpec] = field(default_factory=dict)

    #: Most ad-hoc ``single:`` groups kept (each adds to the state JSON every client receives).
    max_adhoc_groups: int = 64

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._adhoc: dict[str, None] = {}  # ad-hoc group ids, oldest first
        #: Bumped by every change of ``groups`` or ``models``: the manager's event states walk the
        #: catalog again only when it moved (``engine.state.States``).
        self.revision = 0
        self.roots = [Path(r).expanduser().resolve() for r in self.roots]

    # ---- building -----------------------------------------------------------------------
    def add_group(self, group: GroupSpec, models: Iterable[ModelSpec]) -> GroupSpec:
        """Register a group and its member models; ids must be new (``invalid_catalog`` else)."""
        models = list(models)
        with self._lock:
            if group.id in self.groups:
                raise GpuGroupsError("invalid_catalog", f"duplicate group id {group.id!r}")
            seen: set[str] = set()
            for m in models:
                if m.id in self.models or m.id in seen:
                    other = self.models[m.id].group_id if m.id in self.models else group.id
                    raise GpuGroupsError(
                        "invalid_catalog",
                        f"duplicate model id {m.id!r} (in groups {other!r} and {group.id!r})",
                    )
                seen.add(m.id)
            self.groups[group.id] = group
            for m in models:
                self.models[m.id] = m
            self.revision += 1
            return group

    def _remove_group(self, group_id: str) -> None:
        """Drop a group and its member models (a forgotten ad-hoc group, a TOML file rolled back)."""
        with self._lock:
            group = self.groups.pop(group_id)
            for mid in group.members:
                self.models.pop(mid, None)
            self.revision += 1

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
        relative_to: Path | None = None,
    ) -> GroupSpec:
        """Register an ``adapters`` group (``base`` + ``adapters``) or a ``models`` group.

        ``base``/paths are hub ids or local folders (strings or ``Path``s). A relative path that names an existing
        folder resolves against ``relative_to`` (a TOML file's folder), else against the working
        directory, as ``m.load("models/my-ckpt")`` does; one starting with ``.`` or ``~`` is
        always local. Anything else is a hub id. The bare base is a member with id ``base_id``
        (default: ``base`` as given).
        """
        if not isinstance(group_id, str) or not group_id:
            raise GpuGroupsError("invalid_catalog", "group id must be a non-empty string")
        dtype = canonical_dtype(dtype, "invalid_catalog", f"group {group_id!r}: ")
        typed = (("name", name, str), ("base_id", base_id, str), ("trust_remote_code", trust_remote_code, bool))
        for key, value, want in typed:
            if value is not None and not isinstance(value, want):
                raise GpuGroupsError(
                    "invalid_catalog", f"group {group_id!r}: {key} must be a {want.__name__}, got {type(value).__name__}"
                )
        source: str | None = _fspath(base)  # strings from here on, whatever was given
        if isinstance(adapters, Mapping):
            adapters = {mid: _fspath(p) for mid, p in adapters.items()}
        if isinstance(models, (str, os.PathLike)):  # one id, not an iterable of its characters
            models = [os.fspath(models)]
        elif isinstance(models, Mapping):
            models = {mid: _fspath(p) for mid, p in models.items()}
        elif isinstance(models, (list, tuple)):
            models = [_fspath(p) for p in models]
        if (source is None) == (models is None):
            raise GpuGroupsError(
                "invalid_catalog",
                f"group {group_id!r}: give either base (+ adapters) or models, not both or neither",
            )
        if source is None and adapters:
            raise GpuGroupsError("invalid_catalog", f"group {group_id!r}: adapters go with a base, not with models")
        if not isinstance(adapters, (Mapping, type(None))) or not isinstance(
            models, (Mapping, list, tuple, str, type(None))
        ):
            raise GpuGroupsError(
                "invalid_catalog",
                f"group {group_id!r}: adapters must be a {{member: path}} dict, models one too or a list of paths",
            )

        def src(mid: Any, path: Any) -> str:
            if not all(isinstance(s, str) and s for s in (mid, path)):
                raise GpuGroupsError(
                    "invalid_catalog",
                    f"group {group_id!r}: model ids and paths must be non-empty strings, got {mid!r}: {path!r}",
                )
            return self._source(path, relative_to, group_id)

        if source is not None:
            bid = base_id or source
            specs = [ModelSpec(bid, group_id, src(bid, source), "base")]
            specs += [ModelSpec(mid, group_id, src(mid, p), "adapter") for mid, p in (adapters or {}).items()]
            kind, gbase = "adapters", bid
        else:
            items = models.items() if isinstance(models, Mapping) else [(m, m) for m in models or ()]
            specs = [ModelSpec(mid, group_id, src(mid, p), "model") for mid, p in items]
            if not specs:
                raise GpuGroupsError("invalid_catalog", f"group {group_id!r} has no models")
            kind, gbase = "models", None
        group = GroupSpec(group_id, kind, name or group_id, [s.id for s in specs], gbase, dtype, trust_remote_code)
        return self.add_group(group, specs)

    def load_toml(self, path: str | os.PathLike[str]) -> list[GroupSpec]:
        """Add the groups of a TOML catalog file (see docs/catalog.md for the format).

        Relative paths resolve against the file's folder, which becomes an allowed root.
        Unknown keys and duplicate ids are ``invalid_catalog`` errors naming the line.
        """
        return catalog_toml.load_toml(self, path)

    def add_demo(self) -> list[GroupSpec]:
        """Add the shipped demo groups (``pycode`` adapters group and its neighbour)."""
        return self.load_toml(DEMO_DIR / "gpugroups.toml")

    def add_roots(self, roots: Iterable[str | os.PathLike[str]]) -> None:
        """Allow local model folders under these roots too."""
        with self._lock:
            for r in roots:
                p = Path(r).expanduser().resolve()
                if p not in self.roots:
                    self.roots.append(p)

    def discover(self) -> list[str]:
        """Loadable ids that no group names yet (``Manager.discover``): the Hugging Face cache's
        model repos, then the model folders under the allowed roots."""
        known = {m.source for m in self.models.values()} | set(self.models)
        found = localfiles.scan_hf_cache() + localfiles.scan_folders(self.roots)
        return [i for i in dict.fromkeys(found) if i not in known]

    def group(self, group_id: str) -> GroupSpec:
        """The group called ``group_id`` (``unknown_group`` if none); ``single:<id>`` of a loadable
        id that no group names yet is its single group, not registered (see ``group_of``)."""
        _check_id("group_id", group_id)
        with self._lock:
            if group_id in self.groups:
                return self.groups[group_id]
            if group_id.startswith("single:"):
                return self.group_of(group_id[len("single:"):])
        raise GpuGroupsError("unknown_group", f"unknown group {group_id!r}{self._hint(group_id, 'groups')}")

    def model(self, model_id: str) -> ModelSpec:
        """The model called ``model_id`` (any spelling of a local folder), registered or ad hoc."""
        return self.resolve(model_id)[0]

    def group_of(self, model_id: str) -> GroupSpec:
        """The group that holds ``model_id``. An unknown but loadable id gets its single group,
        which is registered only by ``adopt`` (a successful load), so asking never grows the catalog."""
        return self.resolve(model_id)[1]

    def resolve(self, model_id: str) -> tuple[ModelSpec, GroupSpec]:
        """``model_id``'s model and group. A local folder is known by its canonical id, the resolved
        absolute path (symlinks followed), so every spelling of one folder is one model."""
        _check_id("model_id", model_id)
        with self._lock:
            if model_id in self.models:
                spec = self.models[model_id]
                return spec, self.groups[spec.group_id]
            try:
                source = self._adhoc_source(model_id)
            except GpuGroupsError as exc:
                if exc.code != "unknown_model":
                    raise
                raise GpuGroupsError("unknown_model", exc.message + self._hint(model_id, "models")) from None
            local = Path(source).is_absolute()
            canonical = source if local else model_id
            for spec in self.models.values():  # a folder some group names already, by another id
                if spec.id == canonical or (local and spec.source == source):
                    return spec, self.groups[spec.group_id]
            gid = f"single:{canonical}"
            return ModelSpec(canonical, gid, source, "model"), GroupSpec(gid, "single", canonical, [canonical])

    def adopt(self, group: GroupSpec, in_use: Callable[[str], bool] = lambda _gid: False) -> tuple[GroupSpec, list[str]]:
        """Register an ad-hoc single group (from ``group_of``) as it is being loaded; a registered
        group is returned as it is. At most ``max_adhoc_groups`` stay: the oldest not ``in_use``
        are forgotten first. Returns the registered group and the ids forgotten."""
        with self._lock:
            if group.id in self.groups:
                registered = self.groups[group.id]
                if group.id in self._adhoc:
                    self._adhoc[group.id] = self._adhoc.pop(group.id)  # the newest again
                return registered, []
            spec, _ = self.resolve(group.members[0])
            self.add_group(group, [spec])
            self._adhoc[group.id] = None
            forgotten = []
            for gid in list(self._adhoc):
                if len(self._adhoc) <= self.max_adhoc_groups:
                    break
                if gid != group.id and not in_use(gid):
                    self.forget(gid)
                    forgotten.append(gid)
            return group, forgotten

    def forget(self, group_id: str, unless: Callable[[str], bool] = lambda _gid: False) -> None:
        """Drop an ad-hoc single group again (a failed first load, or too many of them), unless
        ``unless(group_id)`` (asked under this catalog's lock, which is always taken first)."""
        with self._lock:
            if group_id not in self._adhoc or unless(group_id):
                return
            del self._adhoc[group_id]
            self._remove_group(group_id)

    def unregister(self, group_id: str, unless: Callable[[str], bool]) -> GroupSpec:
        """Drop a registered group and its members (``Manager.unregister_group``); ``conflict`` if
        ``unless(group_id)`` (asked under this catalog's lock: it is loaded, loading or pinned)."""
        with self._lock:
            group = self.group(group_id)
            if group.id not in self.groups:  # a ``single:`` id that nothing registered
                raise GpuGroupsError("unknown_group", f"unknown group {group_id!r}{self._hint(group_id, 'groups')}")
            if unless(group.id):
                raise GpuGroupsError(
                    "conflict", f"group {group.id!r} is loaded, loading or pinned: m.unload_group({group.id!r}) first"
                )
            self._adhoc.pop(group.id, None)
            self._remove_group(group.id)
            return group

    def local_path(self, source: str) -> Path:
        """The local folder of a model source: the path itself, or the hub id's cached snapshot."""
        p = Path(source)
        if p.is_absolute():
            if not p.is_dir():
                what = "is a file, not a model folder" if p.exists() else "does not exist"
                raise GpuGroupsError("unknown_model", f"model folder {source} {what}")
            return p
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(source, local_files_only=True, cache_dir=hf_hub_cache()))
        except Exception:
            raise GpuGroupsError(
                "unknown_model",
                f"{source!r} is neither a model folder (a relative path resolves when its group is"
                " registered: against the TOML file's folder, else the working directory) nor in the local"
                " Hugging Face cache (no hub is reached at load time)",
            ) from None

    def under_roots(self, path: Path) -> bool:
        """Whether ``path`` (resolved, links followed) lies under an allowed root."""
        real = path.resolve()
        return any(real == r or r in real.parents for r in self.roots)

    def to_json(self) -> dict[str, Any]:
        """``{"groups": [...], "models": [...]}`` with catalog fields only."""
        with self._lock:
            return {
                "groups": [g.to_json() for g in self.groups.values()],
                "models": [
                    {"id": m.id, "group_id": m.group_id, "role": m.role} for m in self.models.values()
                ],
            }

    # ---- internals ----------------------------------------------------------------------
    def _hint(self, name: Any, kind: str) -> str:
        """What to add to an unknown id's message: close ids of ``kind`` and how to list them all."""
        known = list(self.groups if kind == "groups" else self.models)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6) if isinstance(name, str) else []
        guess = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        if kind == "groups":
            where = "m.state()['groups'] or GET /api/v2/groups"
        else:
            where = "m.state()['models'] or GET /api/v2/models; m.discover() lists the ids no group names yet"
        return f".{guess} The {kind} that exist: {where}."

    def _source(self, s: Any, relative_to: Path | None, group_id: str) -> str:
        if not isinstance(s, str) or not s:
            raise GpuGroupsError("invalid_catalog", f"group {group_id!r}: model paths must be non-empty strings")
        p = (relative_to or Path.cwd()) / Path(s).expanduser()  # an absolute path stays itself
        if Path(s).is_absolute() or s.startswith((".", "~")) or p.exists():
            return str(p.resolve())
        return s  # a hub id, resolved from the local cache at load time

    def _adhoc_source(self, model_id: str) -> str:
        """Where an id no group names lives; ``unknown_model`` for anything the system cannot even
        look up (``~nosuchuser``, a path part over 255 bytes, a NUL): never an ``OSError``."""
        try:
            return self._lookup(model_id)
        except (OSError, RuntimeError, ValueError) as exc:
            raise GpuGroupsError(
                "unknown_model", f"unknown model {model_id!r}: the system cannot look it up ({exc})"
            ) from None

    def _lookup(self, model_id: str) -> str:
        p = Path(model_id).expanduser()
        looks_local = p.is_absolute() or model_id.startswith((".", "~")) or p.exists()
        if looks_local:
            # The roots are checked before anything else so an id from a client never makes
            # the kernel look into a folder outside them.
            if not (self.under_roots(p) and p.is_dir()):
                raise GpuGroupsError(
                    "unknown_model",
                    f"unknown model {model_id!r}: not in the catalog, and not a model folder under the allowed roots",
                )
            if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
                base = read_json(p / "adapter_config.json").get("base_model_name_or_path")
                raise GpuGroupsError(
                    "invalid_model",
                    f"{model_id!r} is a PEFT adapter (base: {base!r}), not a model: load it in an adapters group, "
                    "m.register_group('<group>', base='<base folder or id>', "
                    f"adapters={{'<member>': {model_id!r}}})",
                )
            if not (p / "config.json").is_file():
                raise GpuGroupsError("invalid_model", f"model folder {model_id!r} has no config.json")
            return str(p.resolve())
        if re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", model_id):
            try:
                self.local_path(model_id)
            except GpuGroupsError:
                raise GpuGroupsError(
                    "unknown_model",
                    f"unknown model {model_id!r}: not in the catalog, and not in the local Hugging Face cache"
                    " (no hub is reached at load time)",
                ) from None
            return model_id
        raise GpuGroupsError("unknown_model", f"unknown model {model_id!r}")


def canonical_dtype(value: Any, code: str, context: str = "") -> str | None:
    """``value`` (a name of ``DTYPE_NAMES``, a ``torch.dtype``, ``"auto"`` or None: the default) as
    one of ``DTYPES`` or None; an error with ``code`` for anything else."""
    name = str(value).removeprefix("torch.") if value is not None else "auto"
    if name == "auto":
        return None
    if name not in DTYPE_NAMES:
        aliases = ", ".join(n for n in DTYPE_NAMES if n not in DTYPES)
        raise GpuGroupsError(
            code, f"{context}dtype must be one of {DTYPES} (or {aliases}, 'auto', None), got {value!r}"
        )
    return DTYPE_NAMES[name]


def _check_id(name: str, value: Any) -> None:
    """``invalid_request`` unless ``value`` can be an id at all (a non-empty string of at most
    ``MAX_ID_CHARS``), as over REST."""
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS:
        return
    got = type(value).__name__ if not isinstance(value, str) else f"{len(value)} characters" if value else "''"
    raise GpuGroupsError(
        "invalid_request", f"{name} must be a non-empty string of at most {MAX_ID_CHARS} characters, got {got}"
    )
