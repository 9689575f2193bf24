"""The GPU check: what only a real CUDA device can show, in one short run (< 5 minutes).

NVML figures; estimate vs ``torch.cuda.max_memory_allocated`` after a load + one process (demo
group and a ~100M-parameter Llama built here); memory back after unload; the activation peak
of the largest request the limits admit against the runtime reserve (``bench_memory``); switch, process and
load figures from ``bench_core`` against plain transformers/PEFT; two virtual slices of the
one GPU acting as two devices. Run by ``scripts/gpu_check.sh``; record its output in
``docs/gpu-results.md``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpugroups as gg
from bench import bench_core, bench_memory
from gpugroups.catalog import Catalog

MiB = 1024**2


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


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: the GPU check needs one")
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
    print("gpu check done")


if __name__ == "__main__":
    main()
