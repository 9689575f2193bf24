"""Speed of the manager against plain transformers/PEFT, measured in the same run.

Prints, for the shipped demo ``pycode`` group (base + two LoRA adapters) on one device:
- load: ``Manager.load_group`` vs ``from_pretrained`` + ``PeftModel`` of the same weights, alternated;
- switch: making another member current vs reloading the group, and the device's used bytes
  before/after a switch (unchanged: a switch moves no memory);
- process: ``Manager.process`` vs the raw model's forward + top-k (the median of each pair's difference).

Each comparison comes with its 95 % bootstrap interval (``Paired``). The goals of these figures
are in ``bench/goals.py``.

Usage: ``python bench/bench_core.py [--devices cpu|cuda:0|virtual:...] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import gc
import operator
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

import gpugroups as gg
from gpugroups.catalog import Catalog
from gpugroups.engine.estimate import default_dtype
from gpugroups.engine.estimates import folders as estimate_folders
from gpugroups.engine.torchkit import torch_dtype
from gpugroups.engine.worker import ThreadWorker

GROUP, BASE, ADAPTERS = "pycode", "pycode-base", ("pycode-tests", "pycode-docs")
PROMPT = "def __init__(self"
_BOOTSTRAP = 2000  # resamples for a figure's interval


def median_ms(fn: Callable[[], Any], repeat: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``fn`` in milliseconds over ``repeat`` runs (after one warm-up)."""
    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class Paired:
    """Two ways of doing the same thing, timed alternately so that both meet the same machine: the
    ms of each call. It unpacks as the two medians. On a shared machine single calls vary by a
    quarter or more, so a figure comparing the two comes with its 95 % bootstrap interval (how
    far it moves with which calls were drawn): it says whether a goal is within noise."""

    a: list[float]
    b: list[float]

    def __iter__(self) -> Iterator[float]:
        return iter((self.a_ms, self.b_ms))

    @property
    def a_ms(self) -> float:
        return statistics.median(self.a)

    @property
    def b_ms(self) -> float:
        return statistics.median(self.b)

    def figures(self, name: str, compare: Callable[[float, float], float]) -> dict[str, float]:
        """``{name}``: ``compare(median a, median b)``; ``{name}_low`` / ``{name}_high``: its interval."""
        return _bootstrapped(name, lambda rng: compare(_median_of(rng, self.a), _median_of(rng, self.b)),
                             compare(self.a_ms, self.b_ms))

    def excess(self, name: str, of: Literal["a", "b"]) -> dict[str, float]:
        """``{name}``: the median over the pairs of how many ms ``of``'s call took beyond the other's,
        and its interval (pairs resampled). The two calls of a pair run back to back and meet
        the same moment of the machine, so this is about twice as tight as a difference of medians."""
        gaps = [(x - y) if of == "a" else (y - x) for x, y in zip(self.a, self.b, strict=True)]
        return _bootstrapped(name, lambda rng: _median_of(rng, gaps), statistics.median(gaps))


def _median_of(rng: random.Random, values: list[float]) -> float:
    """The median of a resample (with replacement) of ``values``."""
    return statistics.median(rng.choices(values, k=len(values)))


def _bootstrapped(name: str, resampled: Callable[[random.Random], float], value: float) -> dict[str, float]:
    """``{name}``: ``value``; ``{name}_low`` / ``{name}_high``: the 95 % interval of ``_BOOTSTRAP``
    draws of ``resampled`` (seeded, so a run's figures can be recomputed)."""
    rng = random.Random(0)
    values = sorted(resampled(rng) for _ in range(_BOOTSTRAP))
    return {name: value, f"{name}_low": values[_BOOTSTRAP // 40], f"{name}_high": values[-_BOOTSTRAP // 40 - 1]}


def interval(figures: dict[str, float], name: str) -> str:
    """``figures[name]`` with its interval, for a printed line."""
    return f"{figures[name]:.3f}, 95 % interval {figures[name + '_low']:.3f} to {figures[name + '_high']:.3f}"


class Elapsed(float):
    """What a call that timed itself returns: its own ms, which ``paired_ms`` records instead of
    the wall time around the call."""


def on_thread_of(worker: ThreadWorker, fn: Callable[[], Any], sync: Callable[[], None]) -> Callable[[], Elapsed]:
    """``fn`` run and timed on ``worker``'s thread: the baseline of a comparison with the
    manager's ``process``, whose pass runs there. torch gives every thread that runs it a pool of
    threads (OpenMP) as large as the cores, and two pools on the same cores slow each other, while
    the scheduler keeps a thread on its core, whose speed drifts on a shared machine: a baseline
    on the caller's thread made the process overhead come out anywhere from -0.2 to +1.0 ms in four
    runs here. On the worker's thread the baseline computes with the same pool on the same core as
    the manager's pass, and every bit of the manager's own work, the two thread hand-offs
    included, stays on the manager's side."""
    def timed() -> Elapsed:
        t0 = time.perf_counter()
        fn()
        sync()
        return Elapsed((time.perf_counter() - t0) * 1e3)

    return lambda: worker.call(timed).result()


def paired_ms(a: Callable[[], Any], b: Callable[[], Any], repeat: int, sync: Callable[[], None]) -> Paired:
    """``a`` and ``b`` run alternately, ``repeat`` times each (after one warm-up call each), each
    timed around the call unless it times itself (``Elapsed``)."""
    ta: list[float] = []
    tb: list[float] = []
    a(), b()
    for _ in range(repeat):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            result = fn()
            sync()
            times.append(result if isinstance(result, Elapsed) else (time.perf_counter() - t0) * 1e3)
    return Paired(ta, tb)


def paired_loads(
    a: Callable[[], Any], b: Callable[[], Any], pairs: int, sync: Callable[[], None], after: Callable[[], None]
) -> Paired:
    """Two ways of loading the same thing, alternated A B B A so that neither always follows the
    other (a load after a load of the other kind pays for what that one left behind).

    As ``timeit`` does, each timed call runs with the garbage collector off, after an untimed full
    collection: a generation-2 collection costs ~200 ms in a process that imported transformers,
    several times a ~90 ms load, and fell on one side or the other by chance. ``after`` runs
    untimed after each ``a`` (the manager's unload); what ``b`` returns is dropped untimed.
    """
    ta: list[float] = []
    tb: list[float] = []

    def timed(fn: Callable[[], Any], times: list[float]) -> None:
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            result = fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        finally:
            gc.enable()
        del result
        if fn is a:
            after()

    timed(a, [])  # warm-up: imports and first-call setup of both paths
    timed(b, [])
    for i in range(pairs):
        for fn, times in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            timed(fn, times)
    return Paired(ta, tb)


def process_overhead(
    far: tuple[str, gg.Manager], near: tuple[str, gg.Manager], model_id: str, repeat: int, goal_ms: float
) -> dict[str, float]:
    """The same ``process`` request on two managers (named), alternated: the median ms of each,
    ``{name}_process_ms``, and ``{far}_process_overhead_ms``, far's excess over near's (``Paired.excess``)."""
    (far_name, far_m), (near_name, near_m) = far, near
    a, b = f"{far_name}_process_ms", f"{near_name}_process_ms"
    pair = paired_ms(
        lambda: far_m.process(model_id, PROMPT, 3), lambda: near_m.process(model_id, PROMPT, 3), repeat, lambda: None
    )
    overhead = f"{far_name}_process_overhead_ms"
    out = {a: pair.a_ms, b: pair.b_ms, **pair.excess(overhead, of="a")}
    print(f"process: {far_name} {out[a]:.3f} ms vs {near_name} {out[b]:.3f} ms "
          f"(overhead {interval(out, overhead)} ms, median over pairs; goal <= {goal_ms:g} ms)")
    return out


def raw_load(folders: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    """The same group loaded the plain way: tokenizer, ``from_pretrained``, ``PeftModel``, ``load_adapter``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(folders[BASE])
    kw: dict[str, Any] = {"dtype": dtype}
    if device != "cpu":
        kw["device_map"] = {"": device}
    base = AutoModelForCausalLM.from_pretrained(folders[BASE], **kw).eval()
    model = PeftModel.from_pretrained(base, folders[ADAPTERS[0]], adapter_name=ADAPTERS[0])
    model.load_adapter(folders[ADAPTERS[1]], adapter_name=ADAPTERS[1])
    return model.eval()


def run(devices: str = "cpu", repeat: int = 200, quick: bool = False) -> dict[str, float]:
    """Measure and print every figure; returns them for callers such as ``python -m bench`` and
    the GPU check. ``quick`` caps ``repeat`` at 50."""
    repeat = min(repeat, 50) if quick else repeat
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the plain loads' bars: drawing them would slow the baseline

    workers: list[ThreadWorker] = []  # the worker seam: keep the workers to reach the model they hold
    m = gg.Manager(devices=devices, catalog=_demo(), worker=lambda d: workers.append(ThreadWorker(d)) or workers[-1])
    dev = m.devices[0]
    on_cuda = dev.backing.startswith("cuda")
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    group = m.catalog.group(GROUP)
    dtype = torch_dtype(group.dtype or default_dtype(dev.kind, dev.supports_bf16))
    folders = estimate_folders(m.catalog, group)
    out: dict[str, float] = {}

    # Manager loads alternate with plain loads of the same files, so that both see the same load
    # on the machine and the same warm page cache; the plain model is dropped before the next.
    unloads: list[float] = []

    def unload() -> None:
        t0 = time.perf_counter()
        m.unload_group(GROUP)
        sync()
        unloads.append((time.perf_counter() - t0) * 1e3)

    loads = paired_loads(
        lambda: m.load_group(GROUP, device_id=0), lambda: raw_load(folders, dev.backing, dtype),
        max(10, repeat // 2), sync, unload,
    )
    out["load_manager_ms"], out["load_raw_ms"] = loads
    out.update(loads.figures("load_overhead", operator.truediv))
    out["unload_ms"] = statistics.median(unloads)
    m.load_group(GROUP, device_id=0)
    print(f"load   : manager {out['load_manager_ms']:.1f} ms vs raw from_pretrained+PEFT {out['load_raw_ms']:.1f} ms "
          f"(ratio {interval(out, 'load_overhead')}); unload {out['unload_ms']:.1f} ms")

    members = [BASE, *ADAPTERS]
    i = iter(range(10**9))
    used_before = m.state()["devices"][0]["memory"]["used_bytes"]
    out["switch_ms"] = median_ms(lambda: m.load(members[next(i) % 3]), repeat, sync)
    used_after = m.state()["devices"][0]["memory"]["used_bytes"]
    out["reload_ms"] = out["load_manager_ms"] + out["unload_ms"]
    out["switch_speedup"] = out["reload_ms"] / out["switch_ms"]
    print(f"switch : {out['switch_ms']:.3f} ms vs reload {out['reload_ms']:.1f} ms "
          f"(reload/switch {out['reload_ms'] / out['switch_ms']:.0f}x); "
          f"device used bytes before/after switching: {used_before} / {used_after}")

    # The baseline runs the very model object the manager holds (same weights, same memory) on
    # the thread where the manager runs it (``on_thread_of``), so the difference is the manager's
    # own work: validation, hand-offs to the device's thread and back, padding, bookkeeping.
    m.load(ADAPTERS[0])
    peft_model = workers[0].runtimes()[GROUP].members[ADAPTERS[0]].model
    tok = AutoTokenizer.from_pretrained(folders[BASE])
    target = torch.device(dev.backing)

    def raw_process() -> list[int]:
        enc = tok(PROMPT, return_tensors="pt").to(target)
        with torch.inference_mode():
            logits = peft_model(**enc, logits_to_keep=1, use_cache=False).logits[0, -1]
            lp = torch.log_softmax(logits.float(), -1)
            return torch.topk(lp, 3).indices.tolist()

    process = paired_ms(on_thread_of(workers[0], raw_process, sync), lambda: m.process(ADAPTERS[0], PROMPT, 3), repeat, sync)
    out["process_raw_ms"], out["process_manager_ms"] = process
    out.update(process.excess("process_overhead_ms", of="b"))
    print(f"process: manager {out['process_manager_ms']:.3f} ms vs raw forward+top-k {out['process_raw_ms']:.3f} ms "
          f"(overhead {interval(out, 'process_overhead_ms')} ms, median over pairs)")
    out["batching_speedup"] = batching_speedup(m, max(8, repeat // 25))
    print(f"batching: {CLIENTS} clients on mixed members, concurrent vs one after another: "
          f"{out['batching_speedup']:.2f}x")
    m.close()
    return out


CLIENTS = 16


def batching_speedup(m: gg.Manager, rounds: int) -> float:
    """Time of ``CLIENTS`` prompts on mixed members one after another, over the same prompts sent
    at once by ``CLIENTS`` threads (the worker batches them), alternating, after one round untimed
    (torch's first pass at each batch shape pays for its own set-up); answers must be equal."""
    from concurrent.futures import ThreadPoolExecutor

    members = [BASE, *ADAPTERS]
    calls = [(members[i % len(members)], f"{PROMPT} {i}") for i in range(CLIENTS)]
    seq_s, par_s = [], []
    with ThreadPoolExecutor(CLIENTS) as pool:
        for _ in range(rounds + 1):
            t0 = time.perf_counter()
            one_by_one = [m.process(mid, p, 3)["predictions"] for mid, p in calls]
            t1 = time.perf_counter()
            together = [r["predictions"] for r in pool.map(lambda c: m.process(c[0], c[1], 3), calls)]
            t2 = time.perf_counter()
            if [[x["token_id"] for x in r] for r in one_by_one] != [[x["token_id"] for x in r] for r in together]:
                raise RuntimeError("batched answers differ from one-by-one answers")
            seq_s.append(t1 - t0)
            par_s.append(t2 - t1)
    return statistics.median(seq_s[1:]) / statistics.median(par_s[1:])


def _demo() -> Catalog:
    cat = Catalog()
    cat.add_demo()
    return cat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cpu")
    p.add_argument("--repeat", type=int, default=200)
    args = p.parse_args()
    print(f"gpugroups {gg.__version__}, torch {torch.__version__}, devices {args.devices}")
    run(args.devices, args.repeat)


if __name__ == "__main__":
    main()
