"""Isolation of devices: prompts on device 1 while device 0 loads, against the same load elsewhere.

Two virtual devices; device 1 holds the shipped demo group and answers ``process`` in a loop,
while device 0 loads and unloads a ~100M-parameter Llama over and over. Four phases, interleaved
in rounds so that all see the same machine, give the p99 of those prompts:
- ``thread``/``process``: the loads run on device 0 of the same manager (thread or process workers);
- ``thread_external``/``process_external``: the same loads run by a separate plain Python process
  (a manager of its own), the baseline: what the load costs through the machine alone.
Figures: ``isolation_vs_external`` (process workers: p99 with the load in the manager / with it
outside; goal <= 1.1), ``isolation_thread_vs_external`` (the same with thread workers), and
``procworker_process_overhead_ms`` (``process`` through a worker process minus through a thread,
p50 of the same tiny request to a test-sized model, alternated, no load; goal <= 0.5 ms). Every
process runs torch on one thread, as the issue measured, so what the load and the prompts share
is not the cores.

Usage: ``python bench/bench_isolation.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpugroups as gg
from bench.bench_core import PROMPT, _demo, process_overhead
from bench.bench_rest import pct

MEMBER = "pycode-tests"
DEVICES = "virtual:2x3GiB"
BIG, TINY = "isolation-big", "isolation-tiny"
#: The loader process: a manager of its own that loads ``BIG`` while its stdin says ``go``.
LOADER = """
import sys, threading
import torch
torch.set_num_threads(1)
import gpugroups as gg
m = gg.Manager(devices="virtual:3GiB", catalog=[{"group_id": sys.argv[1], "models": {sys.argv[1]: sys.argv[2]}}], progress=False)
going = threading.Event()
def loop():
    while True:
        going.wait()
        m.load_group(sys.argv[1]); m.unload_group(sys.argv[1])
        if not going.is_set():
            print("halted", flush=True)
threading.Thread(target=loop, daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    going.set() if line.strip() == "go" else going.clear()
"""


def build_models() -> dict[str, Path]:
    """A ~100M-parameter Llama (``100m``, the load) and a test-sized one (``tiny``, the tiny request),
    with their tokenizer, built once into the temp folder."""
    from tests import tinymodels

    root = Path(tempfile.gettempdir()) / "gpugroups-bench-isolation"
    models = {size: root / f"llama-{size}" for size in ("100m", "tiny")}
    for size, folder in models.items():
        if not (folder / "config.json").exists():
            tokenizer = root / "tokenizer"
            if not tokenizer.exists():
                tinymodels.build_tokenizer(tokenizer)
            tinymodels.build_causal_lm(folder, "llama", size, tokenizer_dir=tokenizer, seed=1)
    return models


class Loads:
    """Loads and unloads of ``BIG`` on device 0 of a manager, over and over while started."""

    def __init__(self, m: gg.Manager) -> None:
        self._m = m
        self._going = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self._going.wait()
            self._m.load_group(BIG, device_id=0)
            self._m.unload_group(BIG)
            if not self._going.is_set():
                self._stopped.set()

    def start(self) -> None:
        self._stopped.clear()
        self._going.set()

    def stop(self) -> None:
        self._going.clear()
        self._stopped.wait()


class External:
    """The same loads in a separate plain Python process (the baseline)."""

    def __init__(self, model: Path) -> None:
        self._p = subprocess.Popen(
            [sys.executable, "-c", LOADER, BIG, str(model)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        self._expect("ready")

    def _expect(self, word: str) -> None:
        assert self._p.stdout is not None
        line = self._p.stdout.readline().strip()
        if line != word:
            raise RuntimeError(f"the loader process said {line!r}, not {word!r}")

    def _say(self, word: str) -> None:
        assert self._p.stdin is not None
        self._p.stdin.write(word + "\n")
        self._p.stdin.flush()

    def start(self) -> None:
        self._say("go")

    def stop(self) -> None:
        self._say("halt")
        self._expect("halted")

    def close(self) -> None:
        assert self._p.stdin is not None
        self._p.stdin.close()
        self._p.wait(60)


def prompts_ms(m: gg.Manager, seconds: float) -> list[float]:
    """Milliseconds of each ``process`` on device 1, one after another for ``seconds``."""
    times = []
    end = time.perf_counter() + seconds
    while (t0 := time.perf_counter()) < end:
        m.process(MEMBER, PROMPT, 3, device_id=1)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(quick: bool = False) -> dict[str, Any]:
    """Measure and print every figure; returns them (``isolation_vs_external`` among them)."""
    import torch

    rounds, seconds, repeat = (2, 3.0, 300) if quick else (4, 8.0, 1000)
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the worker and loader processes' torch
    models = build_models()
    external = External(models["100m"])
    managers: dict[str, gg.Manager] = {}
    try:
        for kind in ("thread", "process"):
            managers[kind] = gg.Manager(devices=DEVICES, catalog=_demo(), worker=kind, progress=False)
        for m in managers.values():
            m.register_group(BIG, models={BIG: str(models["100m"])})
            m.register_group(TINY, models={TINY: str(models["tiny"])})
            m.load(MEMBER, device_id=1)
            m.load(TINY, device_id=1)
            m.load_group(BIG, device_id=0)  # warm: the worker process imports torch and transformers
            m.unload_group(BIG)
        if managers["process"].run(MEMBER, lambda model, tokenizer: torch.get_num_threads()) != 1:
            raise RuntimeError("the worker processes' torch does not run on one thread")
        loads = {kind: Loads(m) for kind, m in managers.items()}
        samples: dict[str, list[float]] = {}
        for _ in range(rounds):
            for kind, m in managers.items():
                for phase, load in ((kind, loads[kind]), (f"{kind}_external", external)):
                    load.start()
                    samples.setdefault(phase, []).extend(prompts_ms(m, seconds))
                    load.stop()
        out: dict[str, Any] = {f"isolation_{phase}_p99_ms": pct(v, 99) for phase, v in samples.items()}
        out |= {f"isolation_{phase}_p50_ms": pct(v, 50) for phase, v in samples.items()}
        out["isolation_vs_external"] = out["isolation_process_p99_ms"] / out["isolation_process_external_p99_ms"]
        out["isolation_thread_vs_external"] = out["isolation_thread_p99_ms"] / out["isolation_thread_external_p99_ms"]
        for phase, v in samples.items():
            print(f"prompts on device 1, load in {phase:<17}: p50 {pct(v, 50):7.2f} ms  p99 {pct(v, 99):7.2f} ms  ({len(v)} prompts)")
        print(f"isolation: p99 with the load in the manager / in another process: process workers "
              f"{out['isolation_vs_external']:.2f}x (goal <= 1.1), thread workers {out['isolation_thread_vs_external']:.2f}x")
        return out | process_overhead(("procworker", managers["process"]), ("threadworker", managers["thread"]), TINY, repeat, 0.5)
    finally:
        external.close()
        for m in managers.values():
            m.close()
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    run(p.parse_args().quick)


if __name__ == "__main__":
    main()
