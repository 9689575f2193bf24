"""The GPU check: what only a real CUDA device can show, in one short run (< 5 minutes).

NVML figures; estimate vs ``torch.cuda.max_memory_allocated`` after a load + one process (demo
group and a ~100M-parameter Llama built here); memory back after unload; the activation peak
of the largest request the limits admit against the runtime reserve (``bench_memory``); switch, process and
load figures from ``bench_core`` against plain transformers/PEFT; two virtual slices of the
one GPU acting as two devices; a group that fits neither slice sharded over both (and, with two
GPUs, over cuda:0 + cuda:1), whose answers must equal the same group loaded whole within 1e-5.
Run by ``scripts/gpu_check.sh``; record its output in ``docs/gpu-results.md``. Without a CUDA
device it says so and exits 0; ``--cpu`` runs the one part that needs none (the sharding check
on CPU-backed virtual devices).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpugroups as gg
from bench import bench_core, bench_memory
from gpugroups.catalog import Catalog

MiB = 1024**2
PROMPTS = ("def __init__(self", "import os\nimport", "for i in range(")
TOLERANCE = 1e-5  # fp32 probabilities: a sharded pass computes what the whole model does


def nvml_figures() -> None:
    import pynvml

    pynvml.nvmlInit()
    print(f"NVML driver {pynvml.nvmlSystemGetDriverVersion()}, {pynvml.nvmlDeviceGetCount()} device(s)")
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        print(f"  [{i}] {pynvml.nvmlDeviceGetName(h)}: total {mem.total / MiB:.0f} MiB, used {mem.used / MiB:.0f} MiB, free {mem.free / MiB:.0f} MiB")


def estimate_vs_peak(catalog: Catalog, group: str, member: str) -> None:
    """Estimate vs peak allocated bytes for load + one process, and memory back after unload."""
    torch.cuda.synchronize()
    base_alloc = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with gg.Manager(devices="cuda:0", catalog=catalog) as m:
        est = next(g for g in m.groups() if g["id"] == group)["memory_estimate_bytes"]
        t0 = time.perf_counter()
        m.load_group(group)
        load_s = time.perf_counter() - t0
        m.process(member, "def __init__(self", 5)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base_alloc
        measured = next(g for g in m.groups() if g["id"] == group)["measured_bytes"]
        nvml = m.state()["devices"][0]["memory"]
        m.unload_group(group)
        torch.cuda.synchronize()
        back = torch.cuda.memory_allocated() - base_alloc
    print(f"{group}: estimate {est / MiB:.1f} MiB, measured weights {measured / MiB:.1f} MiB, "
          f"peak allocated (load + process) {peak / MiB:.1f} MiB -> estimate/peak {est / max(peak, 1):.2f}; "
          f"load {load_s:.2f} s; NVML used while loaded {nvml['used_bytes'] / MiB:.0f} MiB; "
          f"allocated after unload {back / MiB:.2f} MiB (goal 0)")


def virtual_slices() -> None:
    """Two virtual devices backed by cuda:0: placement treats them as two GPUs."""
    free = torch.cuda.mem_get_info()[0]
    half = int(free * 0.4)
    with gg.Manager(devices=f"virtual:2x{half}B@cuda:0", catalog=bench_core._demo()) as m:
        a = m.load("pycode-tests")
        b = m.load("tinygpt2", device_id=1)
        pa = m.process("pycode-tests", "import os\nimport", 3)["predictions"]
        pb = m.process("tinygpt2", "import os\nimport", 3)["predictions"]
        s = m.state()
        print(f"virtual slices of cuda:0 ({half / 2**30:.1f} GiB each): pycode on {a['device_id']}, tinygpt2 on {b['device_id']}; "
              f"resident {[d['resident_groups'] for d in s['devices']]}; "
              f"top-1 {pa[0]['token']!r} / {pb[0]['token']!r}")


def sharded_equals_whole(
    catalog: Catalog, group: str, member: str, whole: str | Sequence[str], split: str | Sequence[str],
    device_ids: list[int] | None = None,
) -> dict[str, Any]:
    """Answers of ``member`` with ``group`` loaded on the one device ``whole`` and sharded on
    ``split`` (by placement, or over ``device_ids``): the span and the largest probability gap.

    Raises ``RuntimeError`` when the group did not shard, or when any prompt's top tokens or
    probabilities (beyond ``TOLERANCE``) differ.
    """
    answers = []
    span: list[int] = []
    for devices, ids in ((whole, None), (split, device_ids)):
        with gg.Manager(devices=devices, catalog=catalog) as m:
            span = m.load_group(group, device_ids=ids)["device_ids"]
            answers.append([m.process(member, p, 5)["predictions"] for p in PROMPTS])
    if len(span) < 2:
        raise RuntimeError(f"group {group!r} was not sharded on {split}: it spans {span}")
    gap = 0.0
    for prompt, a, b in zip(PROMPTS, *answers):
        if [x["token_id"] for x in a] != [x["token_id"] for x in b]:
            raise RuntimeError(f"{prompt!r}: sharded top tokens {[x['token'] for x in b]} != whole {[x['token'] for x in a]}")
        gap = max(gap, *(abs(x["probability"] - y["probability"]) for x, y in zip(a, b)))
    if gap > TOLERANCE:
        raise RuntimeError(f"sharded probabilities differ from the whole group's by {gap:.2e} (> {TOLERANCE:g})")
    return {"span": span, "max_gap": gap}


def sharding(root: Path, backing: str) -> None:
    """A fp32 Llama that fits neither of two virtual slices of ``backing`` sharded over both,
    against the same group loaded whole; with two GPUs, the same over cuda:0 + cuda:1."""
    from tests import tinymodels

    tok = tinymodels.build_tokenizer(root / "tok")
    folder = tinymodels.build_causal_lm(root / "deep", "llama", "deep", tokenizer_dir=tok, seed=7, context=32)
    cat = Catalog(roots=[root])
    cat.register_group("deep", models={"deep": str(folder)}, dtype="float32")
    with gg.Manager(devices="virtual:64GiB", catalog=cat) as probe:
        need = next(g for g in probe.groups() if g["id"] == "deep")["memory_estimate_bytes"]
    slices = f"virtual:2x{int(need * 0.8)}B@{backing}"
    out = sharded_equals_whole(cat, "deep", "deep", backing, slices)
    print(f"sharded over two virtual slices of {backing} ({need * 0.8 / MiB:.1f} MiB each, group {need / MiB:.1f} MiB): "
          f"span {out['span']}, answers equal the whole group's (largest probability gap {out['max_gap']:.1e})")
    if backing.startswith("cuda") and torch.cuda.device_count() >= 2:
        out = sharded_equals_whole(cat, "deep", "deep", "cuda:0", ["cuda:0", "cuda:1"], device_ids=[0, 1])
        print(f"sharded over cuda:0 + cuda:1: span {out['span']}, largest probability gap {out['max_gap']:.1e}")
    elif backing.startswith("cuda"):
        print("one GPU: the check across two GPUs is skipped")


def main(argv: Sequence[str] = ()) -> None:
    if "--cpu" in argv:
        with tempfile.TemporaryDirectory() as tmp:
            sharding(Path(tmp), "cpu")
        return
    if not torch.cuda.is_available():
        print("gpu check skipped: no CUDA device (torch.cuda.is_available() is False); "
              "`scripts/gpu_check.sh --cpu` runs its sharding check on CPU-backed virtual devices")
        return
    print(f"gpugroups {gg.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    nvml_figures()
    estimate_vs_peak(bench_core._demo(), "pycode", "pycode-tests")
    from tests import tinymodels

    with tempfile.TemporaryDirectory() as tmp:
        tok = tinymodels.build_tokenizer(Path(tmp) / "tok", vocab_size=4096)
        big = tinymodels.build_causal_lm(Path(tmp) / "llama100m", "llama", "100m", tokenizer_dir=tok)
        cat = Catalog(roots=[tmp])
        cat.register_group("llama100m", models={"llama100m": str(big)})
        estimate_vs_peak(cat, "llama100m", "llama100m")
    bench_core.run("cuda:0", 200)
    bench_memory.run(device="cuda:0")  # activation peak of the largest request vs the reserve
    virtual_slices()
    with tempfile.TemporaryDirectory() as tmp:
        sharding(Path(tmp), "cuda:0")
    print("gpu check done")


if __name__ == "__main__":
    main(sys.argv[1:])
