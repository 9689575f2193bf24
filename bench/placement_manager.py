"""The placement policy inside the real manager: reference-style traces replayed as ``process`` calls.

``placement_trace`` replays the policy alone (pure: ``place`` fed a ``Ledger``). This replays the
same kind of trace through a real ``gg.Manager``: 8 tiny Llamas whose layer counts follow the
reference traces' group sizes (1, 1, 2, 2, 3, 3, 4, 5), two virtual devices that together hold two
thirds of them (about 3 groups each), and one ``process`` call per request, with no device named,
so the manager places, evicts and loads as it does for a user. A request whose group is not
resident when it is made is a load. The manager's loads are compared with the pure policy's on the
same trace with the same sizes (each group's bytes as the manager accounts them, read from its
state after a first load), with plain LRU, and with the exact offline optimum
(``placement_trace.optimum``).

Usage: ``python bench/placement_manager.py [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpugroups as gg
from bench.placement_trace import SIZES, Trace, optimum, simulate, zipf_trace

#: Layers per unit of size of the reference traces (16 MiB of weights): enough that weights, not
#: the runtime reserve every group also needs, set the groups' sizes apart.
LAYERS_PER_UNIT = 4


def build_models(root: Path | None = None, layers_per_unit: int = LAYERS_PER_UNIT, hidden: int = 256) -> dict[str, Path]:
    """The 8 groups' models (``g0`` ... ``g7``, as in the traces), built once into ``root`` (default:
    the temp folder): Llamas of ``layers_per_unit`` layers per unit of the trace's sizes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests import tinymodels

    root = root or Path(tempfile.gettempdir()) / f"gpugroups-bench-placement-{layers_per_unit}x{hidden}"
    tokenizer = root / "tokenizer"
    if not tokenizer.exists():
        tinymodels.build_tokenizer(tokenizer)
    models = {}
    for i, units in enumerate(SIZES):
        folder = models[f"g{i}"] = root / f"g{i}-{units}u"
        if (folder / "config.json").exists():
            continue
        torch.manual_seed(i)
        config = LlamaConfig(
            vocab_size=768, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=units * layers_per_unit,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        for f in tokenizer.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    return models


def catalog(models: dict[str, Path]) -> list[dict[str, object]]:
    return [{"group_id": gid, "models": {gid: str(folder)}} for gid, folder in models.items()]


def sizes(models: dict[str, Path]) -> dict[str, int]:
    """Each group's bytes as a manager accounts them once it has loaded the group (measured weights
    plus the runtime reserve), read from the state of a manager with room for all of them."""
    with gg.Manager(devices="virtual:16GiB", catalog=catalog(models), progress=False) as m:
        for gid in models:
            m.load(gid)
        return {g["id"]: g["memory_estimate_bytes"] for g in m.state()["groups"]}


def replay(trace: Trace, models: dict[str, Path]) -> int:
    """Loads the manager makes serving ``trace`` with one ``process`` per request."""
    room = trace.devices[0]
    loads = 0
    with gg.Manager(devices=f"virtual:2x{room}B", catalog=catalog(models), progress=False) as m:
        for gid in trace.requests:
            status = next(g["status"] for g in m.state()["groups"] if g["id"] == gid)
            loads += status != "resident"
            m.process(gid, "def f(", 1)
    return loads


def run(quick: bool = False) -> dict[str, float]:
    """Replay traces through the manager and the pure policy; returns the manager's worst ratios."""
    models = build_models()
    need = sizes(models)
    room = sum(need.values()) // 3  # two devices holding two thirds of the groups' bytes, as in the traces
    traces = [(0, 1.0, 0)] if quick else [(0, 1.0, 0), (1, 0.8, 0), (2, 1.0, 100)]
    worst_opt = worst_lru = 0.0
    print(f"group bytes: {', '.join(f'{g} {b / 2**20:.1f} MiB' for g, b in need.items())}; devices 2 x {room / 2**20:.1f} MiB")
    print(f"{'trace':<28}{'manager':>8}{'policy':>7}{'lru':>7}{'opt':>7}{'/opt':>7}{'/lru':>7}")
    for seed, skew, scan in traces:
        shape = zipf_trace(seed, skew, n=400 if quick else 1000, scan_every=scan)
        trace = Trace(shape.name, shape.requests, need, (room, room))
        t0 = time.perf_counter()
        manager = replay(trace, models)
        took = time.perf_counter() - t0
        policy, lru, opt = simulate(trace, "policy"), simulate(trace, "lru"), optimum(trace)
        worst_opt, worst_lru = max(worst_opt, manager / opt), max(worst_lru, manager / lru)
        print(f"{trace.name:<28}{manager:>8}{policy:>7}{lru:>7}{opt:>7}{manager / opt:>7.2f}{manager / lru:>7.2f}"
              f"   ({len(trace.requests)} requests in {took:.0f} s)")  # fmt: skip
    print(f"worst: manager/opt {worst_opt:.2f}, manager/lru {worst_lru:.2f} (goal <= 1.0)")
    return {"placement_manager_vs_opt": worst_opt, "placement_manager_vs_lru": worst_lru}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one shorter trace")
    run(p.parse_args().quick)


if __name__ == "__main__":
    main()
