"""Cost of a sharded group against the same model sharded by hand, measured in the same run.

A Llama of about 36M parameters (built here, fp32, ~145 MB) on two virtual devices too small for
it alone, so the manager shards it over both:
- load: ``Manager.load_group`` (placement, the layout, accelerate's map, the load, accounting)
  against plain ``from_pretrained(device_map=...)`` of the very map the manager used, plus the
  tokenizer, on the same files; run alternately so both see the same machine load (goal <= 1.05);
- process: ``Manager.process`` on the sharded group against the raw sharded model's forward +
  top-k on the same model object (p50 difference, goal <= 0.5 ms);
- reserve: each spanned device's allocation peak during a pass of the reference batch
  (``bench_memory.shard_peaks``) over the runtime reserve that device keeps (goal <= 1).

Usage: ``python bench/bench_shard.py [--devices virtual:2xNB@cuda:0] [--repeat N]``; the default
devices are two CPU-backed virtual devices of ``SLICE`` of the group's estimate each.
"""

from __future__ import annotations

import argparse
import operator
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import gpugroups as gg
from bench.bench_core import interval, on_thread_of, paired_loads, paired_ms
from bench.bench_memory import shard_peaks
from gpugroups.catalog import Catalog
from gpugroups.engine import estimate as est
from gpugroups.engine.worker import ThreadWorker
from tests import tinymodels

GROUP = "sharded"
PROMPT = "def __init__(self"
SLICE = 0.8  # each virtual device: this fraction of the group's one-device estimate


def build(root: Path) -> Path:
    """The benchmark's model: large enough that a load takes a few hundred ms on a CPU."""
    tok = tinymodels.build_tokenizer(root / "tok")
    return tinymodels.build_causal_lm(root / "llama-shard", "llama", "shard", tokenizer_dir=tok, seed=3, context=256)


def raw_load(folder: Path, device_map: dict[str, str]) -> Any:
    """The same model sharded the plain way: tokenizer and ``from_pretrained(device_map=...)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=device_map).eval()


def run(devices: str | None = None, repeat: int = 100, quick: bool = False) -> dict[str, float]:
    """Measure and print the sharded load, process and reserve figures; ``quick`` caps ``repeat`` at 30."""
    from transformers.utils import logging as hf_logging

    repeat = min(repeat, 30) if quick else repeat
    hf_logging.disable_progress_bar()  # the plain loads' bars
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp))
        cat = Catalog(roots=[tmp])
        cat.register_group(GROUP, models={GROUP: str(folder)})
        if devices is None:
            with gg.Manager(devices="virtual:64GiB", catalog=cat) as probe:
                need = next(g for g in probe.groups() if g["id"] == GROUP)["memory_estimate_bytes"]
            devices = f"virtual:2x{int(need * SLICE)}B"
        workers: list[ThreadWorker] = []
        with gg.Manager(devices=devices, catalog=cat, worker=lambda d: workers.append(ThreadWorker(d)) or workers[-1]) as m:
            on_cuda = m.devices[0].backing.startswith("cuda")
            sync = torch.cuda.synchronize if on_cuda else (lambda: None)
            span = m.load_group(GROUP)["device_ids"]
            if len(span) < 2:
                raise RuntimeError(f"the group was not sharded on {devices}: it spans {span}")
            rt = workers[span[0]].runtimes()[GROUP]
            backings = [m.devices[d].backing for d in span]
            by_backing = {name: backings[pos] for name, pos in rt.device_map.items()}
            m.unload_group(GROUP)

            loads = paired_loads(
                lambda: m.load_group(GROUP), lambda: raw_load(folder, by_backing), max(8, repeat // 2), sync,
                lambda: m.unload_group(GROUP),
            )
            out["sharded_load_manager_ms"], out["sharded_load_raw_ms"] = loads
            out.update(loads.figures("sharded_load_overhead", operator.truediv))
            print(f"sharded load   : manager {out['sharded_load_manager_ms']:.1f} ms vs from_pretrained(device_map) "
                  f"{out['sharded_load_raw_ms']:.1f} ms over {span} (ratio {interval(out, 'sharded_load_overhead')}; goal <= 1.05)")

            m.load_group(GROUP)
            rt = workers[span[0]].runtimes()[GROUP]
            member = rt.members[GROUP]
            model, tok = member.model, member.tokenizer
            first = torch.device(backings[0])
            if not on_cuda:
                out["shard_reserve_peak_ratio"] = reserve_ratio(model, rt.device_map, rt.reserves)

            def raw_process() -> list[int]:
                enc = tok(PROMPT, return_tensors="pt").to(first)
                with torch.inference_mode():
                    logits = model(**enc, logits_to_keep=1, use_cache=False).logits[0, -1]
                    return torch.topk(torch.log_softmax(logits.float(), -1), 3).indices.tolist()

            # three times the pairs: this pass takes ~30 ms, whose noise is ten times the goal
            process = paired_ms(
                on_thread_of(workers[span[0]], raw_process, sync), lambda: m.process(GROUP, PROMPT, 3), 3 * repeat, sync
            )
            out["sharded_process_raw_ms"], out["sharded_process_manager_ms"] = process
            out.update(process.excess("sharded_process_overhead_ms", of="b"))
            print(f"sharded process: manager {out['sharded_process_manager_ms']:.3f} ms vs raw forward+top-k "
                  f"{out['sharded_process_raw_ms']:.3f} ms (overhead {interval(out, 'sharded_process_overhead_ms')} ms, "
                  f"median over pairs; goal <= 0.5)")
            # what sharding itself adds (the holds on the other devices): the same group on one device
            with gg.Manager(devices=backings[0] if on_cuda else "virtual:64GiB", catalog=cat) as one:
                one.load_group(GROUP)
                whole, split = paired_ms(
                    lambda: one.process(GROUP, PROMPT, 3), lambda: m.process(GROUP, PROMPT, 3), repeat, sync
                )
            out["sharded_vs_whole_process_ms"] = split - whole
            print(f"sharded process: {split:.3f} ms vs the same group on one device {whole:.3f} ms "
                  f"(sharding adds {out['sharded_vs_whole_process_ms']:.3f} ms p50)")
    return out


def reserve_ratio(model: Any, device_map: dict[str, int], reserves: list[int]) -> float:
    """The worst device's allocation peak during a pass of the reference batch (the one the
    runtime reserve is sized for) over the reserve that device keeps."""
    seq = min(est.REFERENCE_SEQ, model.config.max_position_embeddings)
    ids = torch.randint(1, model.config.vocab_size, (est.REFERENCE_BATCH, seq))

    def reference_pass() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1)

    reference_pass()
    peaks = shard_peaks(model, device_map, len(reserves), reference_pass)
    full = est.runtime_reserve(model.config.to_dict(), "float32")
    print(f"sharded reserve: per device {[round(r / 2**20, 1) for r in reserves]} MiB (one device: {full / 2**20:.1f}), "
          f"allocation peak of a {est.REFERENCE_BATCH} x {seq} pass {[round(p / 2**20, 1) for p in peaks]} MiB")
    return max(p / r for p, r in zip(peaks, reserves, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default=None)
    p.add_argument("--repeat", type=int, default=100)
    args = p.parse_args()
    print(f"gpugroups {gg.__version__}, torch {torch.__version__}, devices {args.devices or 'two cpu-backed virtual'}")
    run(args.devices, args.repeat)


if __name__ == "__main__":
    main()
