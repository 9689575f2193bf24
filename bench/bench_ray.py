"""A Ray device against a local one: the same demo group, the same code, one actor round trip apart.

Prints, for the shipped demo ``pycode`` group on a ``ray:virtual`` device and on a local
``virtual`` device of the same size, in the same run:
- process: ``Manager.process`` over Ray vs locally, torch on as many threads locally as the actor
  has (goal in ``bench/goals.py``);
- load: ``load_group`` over Ray vs locally (each after one warm-up load, so the actor's torch
  import is not counted);
- Ray's own share: a call to a bare actor method that does nothing, alternated with the same local
  passes (``ray_bare_call_ms``, no goal): what any Ray actor call costs here, below which no Ray
  device can go.

Without ``--address`` it starts a one-node Ray on loopback in this process (one logical GPU).
Usage: ``python bench/bench_ray.py [--address HOST:PORT] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import uuid
from typing import Any

# Read when Ray is imported: loopback only, no auth token for the local test cluster.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import torch

import gpugroups as gg
from bench.bench_core import GROUP, PROMPT, _demo, paired_ms, process_overhead

SIZE = "2GiB"


def load_s(m: gg.Manager) -> float:
    """Seconds of a load of the demo group after a warm-up load and unload."""
    m.load_group(GROUP, device_id=0)
    m.unload_group(GROUP)
    seconds: float = m.load_group(GROUP, device_id=0)["seconds"]
    return seconds


class _Bare:
    """An actor with one method that does nothing: Ray's round trip and nothing of ours."""

    def call(self, payload: bytes) -> bytes:
        return payload


def bare_call_ms(local: gg.Manager, member: str, repeat: int) -> float:
    """The median ms of a bare actor call, each after a local pass (as ``process_overhead``
    alternates them), so the call meets the machine as the Ray device's calls do."""
    actor = ray.remote(_Bare).options(num_cpus=0).remote()
    try:
        ray.get(actor.call.remote(b""))
        bare, _ = paired_ms(lambda: ray.get(actor.call.remote(b"x" * 200)), lambda: local.process(member, PROMPT, 3),
                            repeat, lambda: None)
    finally:
        ray.kill(actor)
    print(f"of which Ray's own: a bare actor call {bare:.3f} ms median")
    return bare


def _torch_threads(model: Any, tokenizer: Any) -> int:
    """How many threads torch uses where the model lives (sent to the Ray node by ``run``)."""
    import torch

    return torch.get_num_threads()


def run(repeat: int = 200, address: str | None = None) -> dict[str, Any]:
    """Measure and print every figure; returns them (``ray_process_overhead_ms`` among them)."""
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="gg-bench-", dir="/tmp"))
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False,
                     object_store_memory=80 * 1024**2, log_to_driver=False)
    remote = gg.Manager(devices=f"ray:virtual:{SIZE}", catalog=_demo(), ray_namespace=f"gg-bench-{uuid.uuid4().hex[:8]}")
    local = gg.Manager(devices=f"virtual:{SIZE}", catalog=_demo())
    try:
        out: dict[str, Any] = {"ray_load_s": load_s(remote), "local_load_s": load_s(local)}
        print(f"load: over Ray {out['ray_load_s']:.3f} s vs local {out['local_load_s']:.3f} s")
        member = local.catalog.group(GROUP).members[1]
        # The actor's torch runs on as many threads as Ray gives it (one, for an actor that asks
        # for no CPU); the local forward pass gets the same, so that only the trip is compared.
        threads, before = remote.run(member, _torch_threads), torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out |= process_overhead(("ray", remote), ("local", local), member, repeat, 2.0)
            out["ray_bare_call_ms"] = bare_call_ms(local, member, repeat)
            return out
        finally:
            torch.set_num_threads(before)
    finally:
        remote.close()
        local.close()
        if started:
            ray.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=None, help="a running Ray cluster (default: start one here)")
    p.add_argument("--repeat", type=int, default=200)
    args = p.parse_args()
    run(args.repeat, args.address)


if __name__ == "__main__":
    main()
