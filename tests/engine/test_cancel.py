"""Runaway requests on real tiny models: the per-request work budget, and cancellation of a request
whose caller went away (queued: it leaves the queue; running: it stops between generation steps)."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

import gpugroups as gg
from gpugroups.errors import GpuGroupsError
from gpugroups.protocol import MAX_REQUEST_WORK, request_work
from tests.engine.gated import gated_manager
from tests.waiting import wait_for

PROMPT = "def __init__(self"


def test_the_default_budget_is_the_reference_batch_of_the_memory_reserve() -> None:
    from gpugroups.engine.estimate import REFERENCE_BATCH, REFERENCE_SEQ

    assert MAX_REQUEST_WORK == REFERENCE_BATCH * REFERENCE_SEQ
    assert request_work(10, 100, 0) == 10  # no generation: the one pass over the prompt
    assert request_work(10, 3, 5) == 10 + 3 * 15


def test_a_request_over_the_budget_is_refused_naming_the_limit_and_its_cost(m: gg.Manager) -> None:
    with pytest.raises(GpuGroupsError) as e:
        m.process("tiny-gpt2", "hello " * 50, num_predictions=100, max_new_tokens=256)
    assert e.value.code == "invalid_request"
    assert "max_request_work" in e.value.message and str(MAX_REQUEST_WORK) in e.value.message
    assert e.value.details["work"] > MAX_REQUEST_WORK == e.value.details["max_request_work"]
    # over the limit even for a one-token prompt: refused before its group was loaded
    assert "at least" in e.value.message and all(not d["resident_groups"] for d in m.state()["devices"])
    assert m.process("tiny-gpt2", PROMPT, num_predictions=3, max_new_tokens=4)["predictions"][0]["text"]


def test_the_budget_is_configurable_and_refuses_one_request_of_a_batch_only(tiny_catalog_toml: Path) -> None:
    with pytest.raises(GpuGroupsError):
        gg.Manager(devices="cpu", catalog=tiny_catalog_toml, max_request_work=0)
    m, workers = gated_manager(devices="cpu", catalog=tiny_catalog_toml, max_request_work=12)
    try:
        m.load("tiny-gpt2")
        outcomes: dict[str, Any] = {}

        def call(name: str, prompt: str) -> None:
            try:
                outcomes[name] = m.process("tiny-gpt2", prompt)
            except GpuGroupsError as exc:
                outcomes[name] = exc

        gate = workers[0].hold()
        threads = [threading.Thread(target=call, args=a) for a in (("short", PROMPT), ("long", "x = 1\n" * 40))]
        for t in threads:
            t.start()
        assert wait_for(lambda: workers[0].queue_depth == 3)  # both share one batch once the gate opens
        gate.set()
        for t in threads:
            t.join(60)
        assert outcomes["short"]["predictions"]
        assert isinstance(outcomes["long"], GpuGroupsError) and outcomes["long"].details["max_request_work"] == 12
    finally:
        m.close()


def count_forward_calls(m: gg.Manager, model_id: str, on_call: Any = None) -> tuple[list[int], Any]:
    """A forward hook on the model of ``model_id`` (through ``m.run``) counting its calls: one per
    generation step. ``on_call(n)`` runs on the worker thread after each."""
    calls = [0]

    def hook(*_: Any) -> None:
        calls[0] += 1
        if on_call is not None:
            on_call(calls[0])

    handle = m.run(model_id, lambda model, tok: model.register_forward_hook(hook))
    return calls, handle


def test_a_running_generation_stops_between_steps_when_cancelled(m: gg.Manager) -> None:
    m.load("tiny-gpt2")
    calls, handle = count_forward_calls(m, "tiny-gpt2", lambda n: n == 5 and m.cancel("long-job"))
    try:
        with pytest.raises(GpuGroupsError) as e:
            m.process("tiny-gpt2", PROMPT, num_predictions=1, max_new_tokens=256, request_id="long-job")
        assert e.value.code == "cancelled"
        assert calls[0] <= 6  # the step after the cancel saw it; 256 steps otherwise
        assert m.process("tiny-gpt2", PROMPT, num_predictions=1)["predictions"]
    finally:
        handle.remove()


@pytest.mark.parametrize("awaited", [False, True])
def test_a_queued_request_leaves_the_queue_when_cancelled(held: tuple[gg.Manager, Any], awaited: bool) -> None:
    m, worker = held
    m.load("tiny-gpt2")
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            if awaited:
                outcome["result"] = asyncio.run(m.aprocess("tiny-gpt2", PROMPT, request_id="queued"))
            else:
                outcome["result"] = m.process("tiny-gpt2", PROMPT, request_id="queued")
        except GpuGroupsError as exc:
            outcome["error"] = exc

    gate = worker.hold()
    caller = threading.Thread(target=call)
    caller.start()
    assert wait_for(lambda: worker.queue_depth == 2)
    m.cancel("queued")
    caller.join(30)
    assert outcome["error"].code == "cancelled"
    assert worker.queue_depth == 1  # only the gate: the request never ran
    gate.set()
    m.cancel("queued")  # finished or unknown: nothing happens
    m.cancel("never-made")
    assert m.process("tiny-gpt2", PROMPT)["predictions"]


def test_a_request_cancelled_before_it_reaches_the_device_never_starts(held: tuple[gg.Manager, Any]) -> None:
    m, worker = held
    m.cancel("early")  # e.g. its caller timed out while the request waited for the host's lane
    with pytest.raises(GpuGroupsError) as e:
        m.process("tiny-gpt2", PROMPT, request_id="early")
    assert e.value.code == "cancelled" and worker.queue_depth == 0


def test_an_interrupted_caller_cancels_its_request(m: gg.Manager) -> None:
    m.load("tiny-gpt2")
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()
    calls, handle = count_forward_calls(m, "tiny-gpt2", lambda n: n == 5 and signal.pthread_kill(main, signal.SIGINT))
    try:
        with pytest.raises(KeyboardInterrupt):
            m.process("tiny-gpt2", PROMPT, num_predictions=1, max_new_tokens=256)
        assert wait_for(lambda: m.state()["devices"][0]["queue_depth"] == 0, timeout=60)
        assert calls[0] < 200  # stopped early, not run to its 256 steps
    finally:
        handle.remove()
