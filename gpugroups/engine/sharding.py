"""Sharding a model over devices: its layer blocks before loading, and the device map it loads with.

Both work on the model built from its config on the meta device (no weights read). ``blocks``
feeds placement's ``Layout``; ``device_map`` turns placement's per-device shares of those same
blocks into the map ``from_pretrained`` loads with (accelerate's format), keyed by span position
so that several virtual devices on one backing (``cpu``, or slices of one GPU) stay apart in the
accounting; ``layer_split`` says where the map put the decoder layers and the head.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import GpuGroupsError
from .torchkit import CONSTRUCTION_LOCK, import_transformers, torch_dtype


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
    import_transformers()  # first: it imports torch where an interrupt cannot cut it short
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with CONSTRUCTION_LOCK, torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch_dtype(dtype))
    except Exception as exc:
        raise GpuGroupsError("invalid_model", f"cannot build {folder}/config.json on the meta device: {exc}") from None


class Block(NamedTuple):
    """An indivisible block of a model: the name a device map gives it, its weight bytes, and
    what it is (``layer``: a decoder layer, with its share of the KV cache; ``head``: the output
    head, with the logits; ``other``)."""

    name: str
    bytes: int
    kind: str


def blocks(model: Any) -> list[Block]:
    """The model's indivisible blocks with weights, in layer order (``_units``). A head tied to
    the embedding has no weights of its own and is no block."""
    return [b for b in _units(model) if b.bytes > 0]


@functools.lru_cache(maxsize=8)
def _units(model: Any) -> tuple[Block, ...]:
    """Every unit a device map places, in layer order: no-split modules (decoder layers) whole,
    other modules down to their leaves, a module's own parameters by their names."""
    from accelerate.utils import compute_module_sizes

    # accelerate counts a bool tensor at 1/8 byte per element: a fraction of a byte rounds up
    sizes = {name: math.ceil(size) for name, size in compute_module_sizes(model).items()}
    no_split = set(model._no_split_modules or ())
    head = model.get_output_embeddings()
    out: list[Block] = []

    def walk(prefix: str, module: Any) -> None:
        children = list(module.named_children())
        if type(module).__name__ in no_split or not children:
            kind = "layer" if type(module).__name__ in no_split else "head" if module is head else "other"
            out.append(Block(prefix.rstrip("."), sizes.get(prefix.rstrip("."), 0), kind))
            return
        for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            out.append(Block(f"{prefix}{n}", sizes.get(f"{prefix}{n}", 0), "other"))
        for n, child in children:
            walk(f"{prefix}{n}.", child)

    walk("", model)
    return tuple(out)


def device_map(model: Any, max_bytes: Sequence[int]) -> tuple[dict[str, int], list[int]]:
    """The map of ``model`` over the span (unit name -> span position) and the weight bytes it
    puts at each position.

    ``max_bytes`` is the weight bytes placement gave each position, from the same blocks (scaled
    for adapters or measured bytes); a block goes to the position whose part of the whole its
    middle falls in, so the map follows placement's split exactly. A unit without weights of its
    own (a head tied to the embedding) goes where the weights it shares live.
    """
    units = _units(model)
    weighed = [b for b in units if b.bytes]
    mapping = dict(zip((b.name for b in weighed), assign([b.bytes for b in weighed], max_bytes), strict=True))
    split = [0] * len(max_bytes)
    for b in weighed:
        split[mapping[b.name]] += b.bytes
    tied = _tied(model)
    for b in units:
        if not b.bytes:
            shared = [n for n, _ in model.get_submodule(b.name).named_parameters(prefix=b.name, remove_duplicate=False)]
            partners = [p for n in shared for p in tied.get(n, ()) if not p.startswith(f"{b.name}.")]
            placed = [position(mapping, p) for p in partners]
            mapping[b.name] = next((p for p in placed if p is not None), len(max_bytes) - 1)
    return mapping, split


@functools.lru_cache(maxsize=8)
def _tied(model: Any) -> dict[str, list[str]]:
    """Each tied parameter's name -> the names of the parameters it is tied with (itself among
    them). Per shared meta model, as ``_units``: a walk of every parameter, on every sharded load."""
    from accelerate.utils import find_tied_parameters

    return {name: group for group in find_tied_parameters(model) for name in group}


def assign(sizes: Sequence[int], max_bytes: Sequence[int]) -> list[int]:
    """The span position of each of ``sizes`` (blocks in order) when the span's positions take
    ``max_bytes`` of them in turn: a block goes where its middle falls, so that the same blocks
    measured a little differently (placement scales them by adapters and measured bytes) land
    where placement put them."""
    total, room = sum(sizes), sum(max_bytes) or 1
    ends, acc = [], 0
    for share in max_bytes:
        acc += share
        ends.append(total * acc / room)
    out, start = [], 0
    for size in sizes:
        middle = start + size / 2
        out.append(next((i for i, end in enumerate(ends) if middle < end), len(ends) - 1))
        start += size
    return out


def position(mapping: dict[str, int], name: str) -> int | None:
    """The span position of a module or parameter ``name`` under ``mapping`` (its closest mapped ancestor)."""
    while True:
        if name in mapping:
            return mapping[name]
        if not name:
            return None
        name = name.rpartition(".")[0]


def layer_split(model: Any, mapping: dict[str, int], positions: int) -> tuple[list[int], int | None]:
    """The decoder layers at each span position of ``mapping``, and the position of the output
    head (None when the model has none)."""
    names, head = _layer_names(model)
    layers = [0] * positions
    for name in names:
        at = position(mapping, name)
        if at is not None:
            layers[at] += 1
    return layers, (position(mapping, head) if head is not None else None)


@functools.lru_cache(maxsize=8)
def _layer_names(model: Any) -> tuple[tuple[str, ...], str | None]:
    """The names of the model's decoder layers (its no-split modules) and of its output head
    (None when it has none); per shared meta model, as ``_units``."""
    no_split = set(model._no_split_modules or ())
    head = model.get_output_embeddings()
    names: list[str] = []
    head_name = None
    for name, module in model.named_modules():
        if type(module).__name__ in no_split:
            names.append(name)
        elif module is head and head is not None:
            head_name = name
    return tuple(names), head_name
