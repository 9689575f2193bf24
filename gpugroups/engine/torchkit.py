"""Torch-side helpers shared by estimates and runtimes: the construction lock, the dtype table,
config readers and tensor byte counts. torch is imported inside the functions that need it, so
the header-only estimates that import this module stay light.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GpuGroupsError
from ..localfiles import read_json

if TYPE_CHECKING:
    import torch

#: transformers builds a model by temporarily patching module globals (``torch.nn.init``
#: functions, weight tying). Two threads doing that at once leave them patched for good: later
#: loads come out untied or with uninitialised buffers. Every model construction in this
#: process (loads, meta-device estimates) holds this lock.
CONSTRUCTION_LOCK = threading.RLock()

_IMPORT_LOCK = threading.Lock()
_RETRY_AFTER_S = 0.5  # a failed import is tried once more after this (another thread's import of it ends)
_imports: dict[str, _Import] = {}  # module -> the import under way, or done
_imported: set[str] = set()


class _Import:
    """One attempt to import a module, in a thread of its own; ``error`` is what it raised."""

    def __init__(self, name: str) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(name,), name=f"gpugroups-import-{name}", daemon=True)

    def _run(self, name: str) -> None:
        try:
            try:
                importlib.import_module(name)
            except ImportError:  # perhaps half-imported by another thread just now: once more, after it
                time.sleep(_RETRY_AFTER_S)
                importlib.import_module(name)
        except BaseException as exc:  # said to every caller, not lost in this thread
            self.error = exc
            with _IMPORT_LOCK:  # the next caller tries again: a race with another thread's import passes
                if _imports.get(name) is self:
                    del _imports[name]
            return
        _imported.add(name)


def import_once(name: str) -> None:
    """Import the heavy module ``name`` (torch, transformers) the first time, in a thread of its own
    that every caller waits for: an interrupt (Ctrl-C in the kernel) stops the wait, never the
    import, which a half-imported torch would not survive. Afterwards this is one set lookup.

    A failed import fails its callers and is tried again by the next one: it may have failed only
    because another thread imported the same package at that moment (transformers' lazy module
    is not safe to import from two threads at once), which a later attempt finds complete.
    """
    if name in _imported:
        return
    with _IMPORT_LOCK:
        attempt = _imports.get(name)
        if attempt is None:
            attempt = _imports[name] = _Import(name)
            attempt.thread.start()
    attempt.thread.join()
    if attempt.error is not None:
        raise ImportError(f"{name} could not be imported: {attempt.error!r}") from attempt.error


def import_transformers() -> None:
    """torch, then transformers (which imports torch only when first used), each ``import_once``;
    call it before importing from either. transformers' ``__init__`` swaps the package for a lazy
    module as it ends, and a thread that imports from it meanwhile fails (``ImportError: cannot
    import name 'AutoConfig'``, seen with four threads' first loads at once on transformers 5.24)."""
    import_once("torch")
    import_once("transformers")

#: The load dtypes gpugroups supports, with their bytes per element (the names are torch's).
LOAD_ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}

#: Config keys that give a model's context length, most specific first (``max_seq_len``: MPT).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "max_seq_len", "n_ctx")
DEFAULT_CONTEXT = 2048


def check_causal_lm(folder: Path, trust_remote_code: bool) -> None:
    """Raise ``invalid_model`` unless ``folder/config.json`` declares a model that transformers loads
    as a causal language model, the kind gpugroups answers with next-token predictions.

    ``AutoModelForCausalLM`` loads some other kinds without complaint (a BERT masked LM as
    ``BertLMHeadModel``, a BART as ``BartForCausalLM`` with its embeddings at random) and refuses
    the rest with a list of every config class; here the folder's declared architecture decides,
    in one sentence. A remote-code model that maps ``AutoModelForCausalLM`` is taken at its word.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal

    cfg = read_json(Path(folder) / "config.json")
    if trust_remote_code and "AutoModelForCausalLM" in (cfg.get("auto_map") or {}):
        return
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    names = {n for v in causal.values() for n in ((v,) if isinstance(v, str) else v)}
    kind = archs[0] if archs else f"model of type {cfg.get('model_type')!r}"
    if cfg.get("model_type") not in causal or (archs and not any(a in names for a in archs)):
        raise GpuGroupsError(
            "invalid_model",
            f"{folder} holds a {kind}, not a causal language model: gpugroups answers next-token "
            "predictions of models that transformers loads with AutoModelForCausalLM",
        )


def check_complete(folder: Path, info: dict[str, Any]) -> None:
    """Raise ``invalid_model`` if loading ``folder`` left weights missing (``from_pretrained``'s
    ``output_loading_info``): transformers starts them at random and only logs it, and such a
    model answers differently on every load."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise GpuGroupsError(
            "invalid_model",
            f"{folder}: the checkpoint lacks {len(missing)} weight(s) the model needs ({shown}); "
            "transformers would start them at random",
        )


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a load dtype name from ``LOAD_ITEMSIZE``."""
    import torch

    if name not in LOAD_ITEMSIZE:
        raise ValueError(f"unsupported load dtype {name!r}")
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language-model part of a config (multimodal configs nest it in ``text_config``)."""
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else config


def declared_context(config: Mapping[str, Any]) -> int | None:
    """The context length a config declares (its language model's, for a multimodal one), or None."""
    c = text_config(config)
    for key in _CONTEXT_KEYS:
        value = c.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def context_length(folder: Path) -> int:
    """The context length a model folder's ``config.json`` declares (2048 when it says none)."""
    return declared_context(read_json(Path(folder) / "config.json")) or DEFAULT_CONTEXT


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


def release_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing where
    there is none). A model loaded on the CPU in another dtype than it is stored in lives on the
    heap, in pieces glibc keeps for reuse after they are freed: an unloaded 400 MB model kept
    160-290 MB of the process's memory, and a 1.4 GB one up to 1.8 GB, all of which counts as
    the machine's memory in use (the cpu device's ``other_bytes``)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return None  # not glibc (macOS, musl): its allocator is its own business
