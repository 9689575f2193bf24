"""Torch-side helpers shared by estimates and runtimes: the construction lock, the dtype table,
config readers and tensor byte counts. torch is imported inside the functions that need it, so
the header-only estimates that import this module stay light.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..localfiles import read_json

if TYPE_CHECKING:
    import torch

#: transformers builds a model by temporarily patching module globals (``torch.nn.init``
#: functions, weight tying). Two threads doing that at once leave them patched for good: later
#: loads come out untied or with uninitialised buffers. Every model construction in this
#: process (loads, meta-device estimates) holds this lock.
CONSTRUCTION_LOCK = threading.RLock()

_IMPORT_LOCK = threading.Lock()
_imports: dict[str, threading.Thread] = {}  # module -> the thread that imports it, once
_imported: set[str] = set()
_import_failed: dict[str, BaseException] = {}


def import_once(name: str) -> None:
    """Import the heavy module ``name`` (torch, transformers) the first time, in a thread of its own
    that every caller waits for: an interrupt (Ctrl-C in the kernel) stops the wait, never the
    import, which a half-imported torch would not survive. Afterwards this is one set lookup."""
    if name in _imported:
        return
    with _IMPORT_LOCK:
        if name not in _imports:
            _imports[name] = threading.Thread(
                target=_import, args=(name,), name=f"gpugroups-import-{name}", daemon=True
            )
            _imports[name].start()
    _imports[name].join()
    if name in _import_failed:
        raise ImportError(f"{name} could not be imported: {_import_failed[name]!r}") from _import_failed[name]


def _import(name: str) -> None:
    try:
        importlib.import_module(name)
    except BaseException as exc:  # said to every caller, not lost in this thread
        _import_failed[name] = exc
        return
    _imported.add(name)


def import_transformers() -> None:
    """torch, then transformers (which imports torch only when first used), each ``import_once``;
    call it before importing from either. transformers' ``__init__`` swaps the package for a lazy
    module as it ends, and a thread that imports from it meanwhile fails (``ImportError: cannot
    import name 'AutoConfig'``, seen with four threads' first loads at once on transformers 5.24)."""
    import_once("torch")
    import_once("transformers")

#: The load dtypes gpugroups supports, with their bytes per element (the names are torch's).
LOAD_ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}

#: Config keys that give a model's context length, most specific first.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
DEFAULT_CONTEXT = 2048


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a load dtype name from ``LOAD_ITEMSIZE``."""
    import torch

    if name not in LOAD_ITEMSIZE:
        raise ValueError(f"unsupported load dtype {name!r}")
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def context_length(folder: Path) -> int:
    """The context length a model folder's ``config.json`` declares (2048 when it says none)."""
    cfg = read_json(Path(folder) / "config.json")
    for key in _CONTEXT_KEYS:
        if isinstance(cfg.get(key), int) and cfg[key] > 0:
            return int(cfg[key])
    return DEFAULT_CONTEXT


def measured_bytes(model: Any) -> int:
    """Bytes held by a loaded torch model's parameters and buffers; shared tensors count once."""
    return unique_bytes(model_tensors(model), None)


def submodules(model: Any) -> list[Any]:
    """Every module of a model, itself included, each once.

    A flat walk of the module tree: ``Module.modules()`` and ``parameters()`` nest a generator
    per module and cost about 1 ms per hundred modules, on every load's path.
    """
    out: list[Any] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        out.append(module)
        stack.extend(m for m in module._modules.values() if m is not None)
    return out


def model_tensors(model: Any) -> list[torch.Tensor]:
    """A model's parameters and buffers, module by module; a tensor that several modules share
    (a tied head) comes once per module, which ``unique_bytes`` counts once."""
    return [
        t for module in submodules(model) for t in (*module._parameters.values(), *module._buffers.values())
        if t is not None
    ]


def unique_bytes(tensors: Iterable[torch.Tensor], dtype: str | None) -> int:
    """Sum of tensor sizes, each storage view counted once; floats at ``dtype`` when given."""
    itemsize = LOAD_ITEMSIZE[dtype] if dtype is not None else None
    seen: set[Any] = set()
    total = 0
    for t in tensors:
        key = id(t) if t.is_meta else (t.device, t.data_ptr(), t.dtype, t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * itemsize if itemsize is not None and t.is_floating_point() else t.nbytes
    return total
