"""Sharding a model over devices: its layer blocks before loading, and accelerate's device map.

Both work on the model built from its config on the meta device (no weights read). ``blocks``
feeds placement's ``Layout``; ``device_map`` turns placement's per-device shares into the map
``from_pretrained`` loads with, keyed by span position so that several virtual devices on one
backing (``cpu``, or slices of one GPU) stay apart in the accounting.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import GpuGroupsError
from .torchkit import CONSTRUCTION_LOCK, torch_dtype


def meta_model(folder: Path, dtype: str, trust_remote_code: bool = False) -> Any:
    """The causal LM of ``folder/config.json`` on the meta device, in ``dtype``.

    Shared, read-only, and remembered per config file (its path and modification time): building
    it costs about as much as loading a small model's weights, and every sharded load of the
    group needs it again for its device map.
    """
    config = Path(folder) / "config.json"
    try:
        stamp = config.stat().st_mtime_ns
    except OSError as exc:
        raise GpuGroupsError("invalid_model", f"cannot read {config}: {exc}") from None
    return _meta_model(str(config.parent.resolve()), stamp, dtype, trust_remote_code)


@functools.lru_cache(maxsize=8)
def _meta_model(folder: str, stamp: int, dtype: str, trust_remote_code: bool) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with CONSTRUCTION_LOCK, torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch_dtype(dtype))
    except Exception as exc:
        raise GpuGroupsError("invalid_model", f"cannot build {folder}/config.json on the meta device: {exc}") from None


def blocks(model: Any) -> list[int]:
    """Bytes of the model's indivisible blocks in layer order: no-split modules (decoder layers)
    whole, other modules down to their own parameters, as accelerate splits them."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model)
    no_split = set(model._no_split_modules or ())
    out: list[int] = []

    def walk(name: str, module: Any) -> None:
        children = list(module.named_children())
        own = sum(sizes.get(f"{name}{n}", 0) for n, _ in module.named_parameters(recurse=False))
        if type(module).__name__ in no_split or not children:
            out.append(sizes.get(name.rstrip("."), 0))
            return
        if own:
            out.append(own)
        for n, child in children:
            walk(f"{name}{n}.", child)

    walk("", model)
    return [b for b in out if b > 0]


def device_map(model: Any, max_bytes: Sequence[int], dtype: str) -> tuple[dict[str, int], list[int]]:
    """accelerate's map of ``model`` over the span (module name -> span position) and the
    weight bytes it puts at each position.

    ``max_bytes`` is each position's room for weights; the last position takes whatever the
    others leave (placement sized the span for the whole model, and the manager checks each
    device's measured share against its budget), so nothing is ever offloaded. accelerate keeps
    room for the largest layer on its main device (position 0) for offloading, which a group
    never does, so that room is added back there. Remembered per model and rooms: a group
    reloaded with the same split skips accelerate's search (a tenth of a small model's load).
    """
    mapping, split = _device_map(model, tuple(int(b) for b in max_bytes[:-1]), len(max_bytes), dtype)
    return dict(mapping), list(split)


@functools.lru_cache(maxsize=32)
def _device_map(model: Any, rooms: tuple[int, ...], positions: int, dtype: str) -> tuple[dict[str, int], tuple[int, ...]]:
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes, get_max_layer_size

    sizes = compute_module_sizes(model)
    no_split = list(model._no_split_modules or ())
    largest, _ = get_max_layer_size([(n, m) for n, m in model.named_children()], sizes, no_split)
    room = {i: b + (largest if i == 0 else 0) for i, b in enumerate(rooms)}
    room[positions - 1] = sizes[""]
    with _quiet_accelerate():
        mapping = infer_auto_device_map(model, max_memory=room, no_split_module_classes=no_split, dtype=torch_dtype(dtype))
    split = [0] * positions
    for name, pos in mapping.items():
        split[pos] += sizes[name]
    return mapping, tuple(split)


@contextlib.contextmanager
def _quiet_accelerate() -> Iterator[None]:
    """accelerate logs "Device N is not available" for span positions with no CUDA device behind
    them (virtual devices on cpu); the positions are ours, not CUDA ordinals."""
    log = logging.getLogger("accelerate.utils.modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
