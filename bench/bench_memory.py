"""Memory estimates against what tiny models built here really take, on CPU.

- weights: ``estimate.weight_bytes`` against the loaded model's measured bytes, every tiny
  architecture of ``tests/tinymodels.py`` (goal: within 5 %);
- activation reserve: the peak of the bytes torch holds allocated while a forward pass of the
  largest request the limits admit (``MAX_BATCH`` rows of the model's whole context) runs, above
  what it held before, against ``runtime_reserve`` for that request (goal: ratio <= 1, the reserve
  covers it). On the CPU the allocations and frees come from torch's profiler (``alloc_peak_during``),
  the same quantity ``torch.cuda.max_memory_allocated`` gives on a GPU (``bench/gpu_check.py``).
  The process's RSS is not used: the C allocator's arenas make it jump by several MiB between two
  runs of the same pass (0.6-1.3x the reserve for one model), which says nothing of the tensors;
- per device of a sharded pass (``shard_peaks``): torch's profiler reports every CPU allocation
  and free; each is charged to the span position whose modules were running when it was made,
  which is the device it would be on, and the peak of each position's live bytes is its need.

Usage: ``python bench/bench_memory.py``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from gpugroups.engine import estimate as est
from gpugroups.engine.torchkit import measured_bytes
from gpugroups.engine.turns import MAX_BATCH
from tests import tinymodels

CONTEXT = 256  # positions of the models built here: the largest prompt the limits admit
#: (architecture, size, attention): every tiny architecture, two wider ones (more heads per
#: token) with transformers' default attention (sdpa), and eager attention (seq^2 scores).
CASES = [
    *((arch, "tiny", "sdpa") for arch in tinymodels.ARCHS),
    ("llama", "small", "sdpa"), ("gpt2", "small", "sdpa"), ("llama", "small", "eager"),
]


def alloc_peak_during(model: object, fn: object) -> int:
    """Peak bytes of CPU tensors allocated while ``fn()`` runs ``model`` and still live at that point."""
    return shard_peaks(model, {}, 1, fn)[0]


def cuda_peak_during(fn: object) -> int:
    """Bytes CUDA's allocator held above its level before ``fn()`` at its highest while ``fn`` ran."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def shard_peaks(model: object, mapping: dict[str, int], positions: int, fn: object) -> list[int]:
    """Peak live bytes each span position of ``mapping`` (module name -> position) allocates while
    ``fn()`` runs ``model`` on the CPU: an allocation belongs to the position whose mapped module
    is running (before the first, position 0; after one ends, the last position seen), and its
    free is matched by address. The input of a position's first module is the previous device's
    output here; on real devices a copy of it (one hidden state) also lives on the new device."""
    from torch.profiler import ProfilerActivity, profile, record_function

    modules = dict(model.named_modules())  # type: ignore[attr-defined]
    open_ranges: list[object] = []
    handles = []
    for name, pos in mapping.items():
        def enter(_m: object, _a: object, pos: int = pos) -> None:
            r = record_function(f"gpugroups-shard-{pos}")
            r.__enter__()
            open_ranges.append(r)

        def leave(_m: object, _a: object, _o: object) -> None:
            open_ranges.pop().__exit__(None, None, None)  # type: ignore[attr-defined]

        handles += [modules[name].register_forward_pre_hook(enter), modules[name].register_forward_hook(leave)]
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()  # type: ignore[operator]
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())
    finally:
        for h in handles:
            h.remove()
    events = events["traceEvents"] if isinstance(events, dict) else events
    ranges = sorted(
        (e["ts"], e["ts"] + e["dur"], int(e["name"].rsplit("-", 1)[1]))
        for e in events if str(e.get("name", "")).startswith("gpugroups-shard-") and "dur" in e
    )
    live, peak, owner = [0] * positions, [0] * positions, {}
    for e in sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0), key=lambda e: e["ts"]):
        nbytes, addr = e["args"]["Bytes"], e["args"]["Addr"]
        if nbytes > 0:
            pos = next((p for a, b, p in reversed(ranges) if a <= e["ts"]), 0)
            owner[addr] = (pos, nbytes)
            live[pos] += nbytes
            peak[pos] = max(peak[pos], live[pos])
        elif addr in owner:
            pos, n = owner.pop(addr)
            live[pos] -= n
    return peak


def measure(folder: Path, batch: int, device: str = "cpu", attention: str = "sdpa") -> tuple[float, float]:
    """(weights estimate error in %, activation peak / reserve) for one model on ``device``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention)
    model = model.to(device).eval()
    error = abs(est.weight_bytes(folder, "float32") - measured_bytes(model)) / measured_bytes(model) * 100
    ids = torch.randint(1, model.config.vocab_size, (batch, CONTEXT), device=device)

    def forward() -> None:
        with torch.inference_mode():
            model(input_ids=ids, logits_to_keep=1)

    forward()  # warm: one-time allocations are not the request's
    if device.startswith("cuda"):
        peak = min(cuda_peak_during(forward) for _ in range(2))
    else:
        peak = alloc_peak_during(model, forward)
    reserve = est.runtime_reserve(model.config.to_dict(), "float32", batch=batch, seq=CONTEXT, attention=attention)
    return error, peak / reserve


def run(device: str = "cpu") -> dict[str, float]:
    """Every case on ``device``; the worst figures. Always the largest request the limits admit,
    which is what the goal is about (a few seconds here): on a small request the RSS sampling's
    few MiB of noise weigh more than the formula's error."""
    batch = MAX_BATCH
    worst_error = worst_ratio = 0.0
    best_ratio = float("inf")
    torch.set_num_threads(1)  # one thread: the peak of one pass, not of racing workers
    with tempfile.TemporaryDirectory() as tmp:
        tok = tinymodels.build_tokenizer(Path(tmp) / "tok")
        for arch, size, attention in CASES:
            folder = tinymodels.build_causal_lm(Path(tmp) / f"{arch}-{size}", arch, size, tok, context=CONTEXT)
            error, ratio = measure(folder, batch, device, attention)
            worst_error, worst_ratio = max(worst_error, error), max(worst_ratio, ratio)
            best_ratio = min(best_ratio, ratio)
            print(f"{arch + ' ' + size + ' ' + attention:<20} weights estimate error {error:6.3f} %   activation peak / reserve {ratio:5.2f} "
                  f"({batch} x {CONTEXT} tokens, {device})")
    print(f"activation peak / reserve: {best_ratio:.2f} to {worst_ratio:.2f}")
    return {"estimate_max_error_pct": worst_error, "reserve_peak_ratio": worst_ratio}


if __name__ == "__main__":
    run()
