"""Memory estimates: how many bytes a group will hold on a device, known before loading it.

Weights come from safetensors headers (shapes and dtypes; no tensor data is read) converted
to the load dtype; folders without safetensors fall back to the config instantiated on the
meta device. Adapters add their own weights, a runtime reserve covers KV cache, activations
and logits of a reference batch (derived from the config), and a device-kind overhead covers
what the device spends beyond tensors. After a load, ``torchkit.measured_bytes`` gives the real figure.
torch and transformers are imported only by the two functions that need a model object, so
reading headers stays light.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ..catalog import GroupSpec
from ..errors import GpuGroupsError
from ..localfiles import read_json
from .torchkit import (
    CONSTRUCTION_LOCK,
    LOAD_ITEMSIZE,
    declared_context,
    import_transformers,
    model_tensors,
    text_config,
    unique_bytes,
)

PathLike = str | os.PathLike[str]

MiB = 1024**2

#: Bytes per element of each safetensors dtype with a whole-byte element.
SAFETENSORS_ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
#: Stored dtypes that ``from_pretrained(dtype=...)`` converts to the load dtype. Quantised
#: (F8, integer) tensors keep their stored size.
_CONVERTED = {"F64", "F32", "F16", "BF16"}

#: Bytes a device spends beyond the tensors of a group, by device kind.
#: cuda: the CUDA context of this process on that device (about 300-500 MiB on recent GPUs
#: with lazy module loading, more with eager loading), cuBLAS workspaces and the caching
#: allocator's block rounding. NVML's free figure shows none of it until the first kernel
#: runs there, so the first group must leave room for it; 512 MiB covers the context plus
#: the workspaces with a margin. cpu and virtual devices: no context to pay for.
DEVICE_OVERHEAD: dict[str, int] = {"cuda": 512 * MiB, "cpu": 0, "virtual": 0}

#: A reference batch for the runtime reserve: gpugroups batches pending prompts of a group.
REFERENCE_BATCH = 8
REFERENCE_SEQ = 512

_MAX_HEADER = 100 * MiB  # safetensors itself refuses larger headers
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
_ADAPTER_PREFIX = "base_model.model."


class TensorInfo(NamedTuple):
    """One tensor of a safetensors header: its stored dtype, shape and stored size in bytes."""

    dtype: str
    shape: list[int]
    nbytes: int

    def bytes_as(self, dtype: str, convert: bool = True) -> int:
        """Bytes once loaded as ``dtype`` (float tensors converted; others keep their size)."""
        if convert and self.dtype in _CONVERTED:
            return _numel(self.shape) * LOAD_ITEMSIZE[dtype]
        return self.nbytes


# ---- headers ---------------------------------------------------------------------------
def read_safetensors_header(path: PathLike) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file (name -> dtype, shape, bytes), read from its header only.

    A file whose header is cut short, absurdly long, not JSON, or whose offsets do not fit
    the file is ``invalid_model`` naming the file. Tensor data is never read.
    """
    path = Path(path)

    def bad(why: str) -> GpuGroupsError:
        return GpuGroupsError("invalid_model", f"{path}: not a valid safetensors file ({why})")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("shorter than its 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER or length > size - 8:
                raise bad(f"header length {length} exceeds the file size {size} or the 100 MiB limit")
            raw = f.read(length)
    except OSError as exc:
        raise GpuGroupsError("invalid_model", f"cannot read {path}: {exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_len = size - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in [*shape, begin, end])
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise bad(f"malformed entry for tensor {name!r}")
        if not begin <= end <= data_len:
            raise bad(f"tensor {name!r} lies at bytes {begin}..{end} but the data holds {data_len}; truncated?")
        itemsize = SAFETENSORS_ITEMSIZE.get(dtype)
        if itemsize is not None and _numel(shape) * itemsize != end - begin:
            raise bad(f"tensor {name!r}: {dtype}{shape} needs {_numel(shape) * itemsize} bytes, offsets give {end - begin}")
        tensors[name] = TensorInfo(dtype, list(shape), end - begin)
    return tensors


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files that hold a model's weights (the index's shards when present)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise GpuGroupsError("invalid_model", f"{index} has no weight_map")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise GpuGroupsError("invalid_model", f"{index} names missing shards: {', '.join(missing)}")
        return files
    # A single model.safetensors wins over other files some repos ship beside it
    # (e.g. consolidated.safetensors in the original-format layout).
    single = folder / "model.safetensors"
    return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))


def _model_header(folder: Path) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for f in _weight_files(folder):
        tensors.update(read_safetensors_header(f))
    return tensors


#: How checkpoints name the input embedding that a tied output head (``lm_head``) shares.
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


def config_of(folder: Path) -> dict[str, Any]:
    """A model folder's ``config.json`` (``invalid_model`` if it has none)."""
    if not (folder / "config.json").is_file():
        raise GpuGroupsError("invalid_model", f"model folder {folder} has no config.json")
    return read_json(folder / "config.json")


# ---- weights ---------------------------------------------------------------------------
def weight_bytes(folder: PathLike, dtype: str, trust_remote_code: bool = False) -> int:
    """Bytes of a model's weights once loaded as ``dtype``.

    From the safetensors headers (sharded or not); a tied output head stored beside its
    embedding counts once. Without safetensors (``pytorch_model.bin`` only, or a config
    alone) the model is built from its config on the meta device and counted there.
    """
    folder = Path(folder)
    config = config_of(folder)
    tensors = _model_header(folder)
    if not tensors:
        return meta_bytes(folder, dtype, trust_remote_code)
    if text_config(config).get("tie_word_embeddings", config.get("tie_word_embeddings")) is True:
        head = tensors.get("lm_head.weight")
        if head is not None and any(
            name.endswith(_EMBEDDINGS) and t.shape == head.shape
            for name, t in tensors.items()
        ):
            del tensors["lm_head.weight"]
    return sum(t.bytes_as(dtype) for t in tensors.values())


def meta_bytes(folder: PathLike, dtype: str, trust_remote_code: bool = False) -> int:
    """Bytes of the model described by ``folder/config.json``, built on the meta device (no weights)."""
    import_transformers()  # first: it imports torch where an interrupt cannot cut it short
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    folder = Path(folder)
    config_of(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        # torch's meta-device context rather than accelerate's init_empty_weights: under the
        # latter transformers 5 leaves tied output heads untied, counting them twice.
        with CONSTRUCTION_LOCK, torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
            except ValueError:  # not a causal LM architecture: its bare model still has the weights
                model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise GpuGroupsError("invalid_model", f"cannot build {folder / 'config.json'} on the meta device: {exc}") from None
    return unique_bytes(model_tensors(model), dtype)


# ---- adapters --------------------------------------------------------------------------
def adapter_bytes(adapter_folder: PathLike, dtype: str) -> int:
    """Bytes a PEFT adapter adds to a base loaded as ``dtype``.

    PEFT upcasts float16/bfloat16 adapter weights to float32 when it loads them (its
    ``autocast_adapter_dtype`` default), so adapter floats count at float32 on any dtype.
    Without ``adapter_model.safetensors`` the size of ``adapter_model.bin`` stands in.
    """
    folder = Path(adapter_folder)
    weights = folder / _ADAPTER_WEIGHTS
    if weights.is_file():
        return sum(t.bytes_as("float32") for t in read_safetensors_header(weights).values())
    legacy = folder / "adapter_model.bin"
    if legacy.is_file():
        return legacy.stat().st_size
    raise GpuGroupsError("invalid_model", f"adapter folder {folder} has no {_ADAPTER_WEIGHTS} or adapter_model.bin")


def check_adapter_matches_base(adapter_folder: PathLike, base_folder: PathLike) -> None:
    """Raise ``invalid_model`` unless every LoRA matrix of the adapter fits its module in the base.

    ``lora_A`` is ``[r, in]`` and ``lora_B`` ``[out, r]``; the base module's weight is
    ``[out, in]``, or ``[in, out]`` for GPT-2's Conv1D (PEFT decides by the module's type, not by
    the adapter's ``fan_in_fan_out``, so either fits); embeddings pair ``lora_embedding_A [r, num]``
    with a ``[num, dim]`` weight. A tied output head, stored only as the input embedding, has that
    shape. Only safetensors headers are read; adapters without safetensors are not checked here
    (the load itself will then catch a mismatch).
    """
    adapter_folder, base_folder = Path(adapter_folder), Path(base_folder)
    weights = adapter_folder / _ADAPTER_WEIGHTS
    if not weights.is_file():
        return
    base = {name: t.shape for name, t in _model_header(base_folder).items()}
    if not base:
        return  # no base header to compare with (weights in .bin only)
    for module, (in_dim, out_dim, embedding) in _lora_modules(read_safetensors_header(weights)).items():
        shape = _find_weight(base, module)
        if shape is None and module.rsplit(".", 1)[-1] == "lm_head":  # tied: stored as the embedding only
            shape = next((s for name, s in base.items() if name.endswith(_EMBEDDINGS)), None)
        if shape is None:
            raise GpuGroupsError(
                "invalid_model",
                f"adapter {adapter_folder} targets module {module!r}, which base {base_folder} does not have",
            )
        wants = [(in_dim, out_dim)] if embedding else [(out_dim, in_dim), (in_dim, out_dim)]
        if len(shape) != 2 or not any(all(w is None or w == s for w, s in zip(want, shape)) for want in wants):
            raise GpuGroupsError(
                "invalid_model",
                f"adapter {adapter_folder} does not fit base {base_folder}: module {module!r} has weight "
                f"{shape} but the adapter's LoRA matrices need in={in_dim}, out={out_dim}",
            )


def _lora_modules(tensors: Mapping[str, TensorInfo]) -> dict[str, tuple[int | None, int | None, bool]]:
    """Module path -> (in features, out features, is embedding) from an adapter's LoRA matrices."""
    found: dict[str, list[Any]] = {}
    for name, t in tensors.items():
        for marker, side, embedding in (
            (".lora_A.weight", "A", False), (".lora_B.weight", "B", False),
            (".lora_embedding_A", "A", True), (".lora_embedding_B", "B", True),
        ):
            if name.endswith(marker) and len(t.shape) == 2:
                module = name[: -len(marker)].removeprefix(_ADAPTER_PREFIX)
                entry = found.setdefault(module, [None, None, embedding])
                # lora_A [r, in] gives "in"; lora_B [out, r] gives "out" (embedding B is [dim, r]).
                if side == "A":
                    entry[0] = t.shape[1]
                else:
                    entry[1] = t.shape[0]
    return {m: (e[0], e[1], e[2]) for m, e in found.items()}


def _find_weight(base: Mapping[str, list[int]], module: str) -> list[int] | None:
    """The base weight of ``module``, allowing checkpoints that drop or add a leading prefix."""
    exact = base.get(f"{module}.weight")
    if exact is not None:
        return exact
    parts = module.split(".")
    for i in range(1, len(parts)):
        suffix = "." + ".".join(parts[i:]) + ".weight"
        hits = [shape for name, shape in base.items() if name.endswith(suffix) or name == suffix[1:]]
        if len(hits) == 1:
            return hits[0]
    return None


# ---- runtime reserve -------------------------------------------------------------------
#: Hidden- and intermediate-sized tensors per token alive at once in an inference forward pass:
#: residual, normed input (and its fp32 upcast), q/k/v, rotated q/k, attention output and its
#: contiguous copy, the output projection; the MLP's gate, up, activation and product (GELU's
#: tanh form makes as many temporaries), with room for the allocator's slack; checked against
#: the allocator peak of 8 architectures (bench/bench_memory.py: peak / reserve 0.52-0.82).
HIDDEN_LIVE, INTER_LIVE = 16, 4


def runtime_reserve(
    config: Mapping[str, Any], dtype: str, batch: int = REFERENCE_BATCH, seq: int | None = None,
    new_tokens: int = 0, attention: str | None = None,
) -> int:
    """Bytes a forward pass of ``batch`` rows of ``seq`` tokens needs beyond the weights: the sum
    of ``reserve_parts``."""
    return sum(reserve_parts(config, dtype, batch, seq, new_tokens, attention))


class ShardReserve(NamedTuple):
    """A runtime reserve by where a sharded pass needs it (``reserve_parts``): ``each`` on every
    device (a layer's activations and attention run on the layer's device), ``kv`` split by
    decoder layers, ``logits`` on the device of the output head."""

    each: int
    kv: int
    logits: int

    def on(self, layers: int, total_layers: int, head: bool) -> int:
        """Bytes a device holding ``layers`` of ``total_layers`` decoder layers (and the head or not) needs."""
        kv = -(-self.kv * layers // total_layers) if total_layers else self.kv
        return self.each + kv + (self.logits if head else 0)


def reserve_parts(
    config: Mapping[str, Any], dtype: str, batch: int = REFERENCE_BATCH, seq: int | None = None,
    new_tokens: int = 0, attention: str | None = None,
) -> ShardReserve:
    """The runtime reserve of a forward pass of ``batch`` rows of ``seq`` tokens, by where it lives.

    KV cache (``2 x layers x batch x (seq + new_tokens) x kv_heads x head_dim``: a greedy
    continuation keeps growing it), live activations (``HIDDEN_LIVE`` hidden-sized and
    ``INTER_LIVE`` intermediate-sized tensors per token), attention (``eager`` materialises
    ``batch x heads x seq^2`` scores, their masked copy and an fp32 softmax, plus the additive
    mask; ``sdpa`` only a boolean ``batch x seq^2`` mask) and the last-token logits in float32.
    ``seq`` defaults to 512 capped by the model's context length; ``attention`` to the config's
    ``_attn_implementation``, else ``sdpa`` (what transformers picks where the model supports it).
    """
    c = text_config(config)
    hidden = _first(c, "hidden_size", "n_embd", "d_model", default=0)
    layers = _first(c, "num_hidden_layers", "n_layer", "num_layers", "n_layers", default=0)
    heads = _first(c, "num_attention_heads", "n_head", "n_heads", default=1) or 1
    kv_heads = _first(c, "num_key_value_heads", "num_kv_heads", default=None)
    if kv_heads is None:
        kv_heads = 1 if c.get("multi_query") else heads
    head_dim = c.get("head_dim") or (hidden // heads)
    inter = _first(c, "intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * hidden
    vocab = c.get("vocab_size") or 0
    context = declared_context(config)
    seq = seq or min(REFERENCE_SEQ, context or REFERENCE_SEQ)
    attention = attention or _first(c, "_attn_implementation", "attn_implementation", default=None) or "sdpa"
    size = LOAD_ITEMSIZE[dtype]
    kv = 2 * layers * batch * (seq + new_tokens) * kv_heads * head_dim * size
    activations = batch * seq * (HIDDEN_LIVE * hidden + INTER_LIVE * inter) * size
    if attention == "eager":
        scores = batch * heads * seq * seq * (2 * size + 4) + batch * seq * seq * size
    else:
        scores = batch * seq * seq
    logits = batch * vocab * 4
    return ShardReserve(int(activations + scores), int(kv), int(logits))


def group_reserve(group: GroupSpec, paths: Mapping[str, Path], dtype: str) -> ShardReserve:
    """The runtime reserve of ``group`` (member id -> folder), by part: its base's, or its
    largest member's (a device runs one forward pass at a time)."""
    if group.kind == "adapters":
        return reserve_parts(config_of(Path(paths[group.base])), dtype)  # type: ignore[index]
    return max((reserve_parts(config_of(Path(p)), dtype) for p in paths.values()), key=sum)


def _first(c: Mapping[str, Any], *keys: str, default: Any) -> Any:
    for k in keys:
        if c.get(k) is not None:
            return c[k]
    return default


# ---- groups ----------------------------------------------------------------------------
def default_dtype(device_kind: str, supports_bf16: bool) -> str:
    """The load dtype when the catalog names none: bfloat16 on GPUs with it, float16 on older
    GPUs, float32 on cpu and virtual devices (CPU matmuls in half precision are slow)."""
    if device_kind == "cuda":
        return "bfloat16" if supports_bf16 else "float16"
    return "float32"


def estimate_group(
    group: GroupSpec, folders: Mapping[str, PathLike], dtype: str, device_kind: str
) -> dict[str, int]:
    """Bytes ``group`` needs on a device of ``device_kind`` when loaded as ``dtype``.

    ``folders`` maps each member id to its local folder. Adapters are checked against the
    base first (a mismatch is ``invalid_model`` before anything loads). The reserve is the
    largest member's: a device runs one forward pass at a time.
    Returns ``weights_bytes``, ``adapters_bytes``, ``reserve_bytes``, ``overhead_bytes`` and
    their sum ``total_bytes``; ``kv_bytes`` and ``logits_bytes`` say how much of the reserve is
    KV cache and logits (``ShardReserve``).
    """
    if dtype not in LOAD_ITEMSIZE:
        raise GpuGroupsError("invalid_request", f"dtype must be one of {sorted(LOAD_ITEMSIZE)}, got {dtype!r}")
    trc = group.trust_remote_code
    paths = {m: Path(folders[m]) for m in group.members}
    if group.kind == "adapters":
        base = paths[group.base]  # type: ignore[index]
        adapters = [p for m, p in paths.items() if m != group.base]
        for a in adapters:
            check_adapter_matches_base(a, base)
        weights = weight_bytes(base, dtype, trc)
        extra = sum(adapter_bytes(a, dtype) for a in adapters)
    else:
        weights = sum(weight_bytes(p, dtype, trc) for p in paths.values())
        extra = 0
    parts = group_reserve(group, paths, dtype)
    reserve = sum(parts)
    overhead = DEVICE_OVERHEAD.get(device_kind, 0)
    return {
        "weights_bytes": weights,
        "adapters_bytes": extra,
        "reserve_bytes": reserve,
        "kv_bytes": parts.kv,  # of reserve_bytes: split by layers over a sharded group's devices
        "logits_bytes": parts.logits,  # of reserve_bytes: on a sharded group's head device only
        "overhead_bytes": overhead,
        "total_bytes": weights + extra + reserve + overhead,
    }


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
