"""Every figure ``python -m bench`` reports, with its goal: the one place goals are declared."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Goal:
    metric: str
    op: str  # "<=" or ">="
    target: float
    what: str

    def met(self, value: float | None) -> bool | None:
        if value is None:
            return None
        return value <= self.target if self.op == "<=" else value >= self.target


GOALS = [
    Goal("switch_speedup", ">=", 1000, "reload / member switch, demo group"),
    Goal("switch_cost_ms_2", "<=", 1.0, "first process after a switch minus a plain one, 2 adapters (ms)"),
    Goal("switch_cost_ms_64", "<=", 1.0, "the same, 64 adapters (ms)"),
    Goal("switch_catalog_ratio", "<=", 1.5, "switch time with 1002 groups / with 3 (state event cost)"),
    Goal("load_overhead", "<=", 1.05, "load time vs from_pretrained + PEFT, same files"),
    Goal("process_overhead_ms", "<=", 0.5, "process over the raw forward + top-k, p50 (ms)"),
    Goal("rest_overhead_ms_p50", "<=", 5.0, "REST process over in-kernel, p50 (ms)"),
    Goal("rest_overhead_ms_p99", "<=", 10.0, "REST process over in-kernel, p99 (ms)"),
    Goal("rest_state_ms_p50", "<=", 2.5, "REST GET /system/state, p50 (ms)"),
    Goal("batching_speedup", ">=", 3.0, "16 clients on mixed members, batched vs one by one"),
    Goal("ws_fanout_ms_p99", "<=", 50.0, "WebSocket fan-out to 500 clients, p99 (ms)"),
    Goal("isolation_vs_external", "<=", 1.1, "p99 on device 1 during a load on device 0, vs another process"),
    Goal("placement_vs_opt", "<=", 1.25, "loads on the reference traces vs the exact offline optimum"),
    Goal("placement_vs_lru", "<=", 1.0, "loads on the reference traces vs plain LRU"),
    Goal("placement_vs_oracle", "<=", 1.25, "the same vs the best policy that knows each trace's request frequencies "
         "(proposed: the optimum itself is out of an online policy's reach)"),
    Goal("placement_manager_vs_lru", "<=", 1.0, "loads of the real manager replaying traces vs plain LRU"),
    Goal("estimate_max_error_pct", "<=", 5.0, "weights estimate vs loaded bytes, worst architecture (%)"),
    Goal("reserve_peak_ratio", "<=", 1.0, "activation peak of the largest request / runtime reserve"),
    Goal("procworker_process_overhead_ms", "<=", 0.5, "process through a worker process over the thread worker, p50 (ms)"),
    Goal("ray_process_overhead_ms", "<=", 2.0, "process through a Ray worker over the thread worker, p50 (ms)"),
    Goal("lanes_unpin_ms_p99", "<=", 50, "REST unpin with 10 slow process calls in flight, p99 (ms)"),
    Goal("lanes_switch_ms_p99", "<=", 50, "REST member switch with 10 slow process calls in flight, p99 (ms)"),
    Goal("sharded_load_overhead", "<=", 1.05, "sharded load vs from_pretrained with the same device map"),
    Goal("shard_reserve_peak_ratio", "<=", 1.0, "a sharded pass's allocation peak per device / that device's reserve, worst"),
    Goal("sharded_process_overhead_ms", "<=", 0.5, "process on a sharded group over the raw sharded forward + top-k, p50 (ms)"),
    Goal("run_overhead_ms", "<=", 0.5, "research run over the same call made directly (ms)"),
    Goal("fair_wait_jobs_p99", "<=", 1.2, "B's 1-token p99 while A runs maximal jobs, less B alone, in A jobs"),
]
