"""The device worker: the Worker protocol, ordered calls, batching of queued process requests."""

from __future__ import annotations

import threading

import pytest

from gpugroups.engine.calls import Request, Worker
from gpugroups.engine.devices import Device, detect
from gpugroups.engine.worker import ThreadWorker, lends
from gpugroups.errors import GpuGroupsError
from tests.engine.gated import gated_manager
from tests.waiting import wait_for

PROMPT = "def __init__(self"


def test_thread_worker_satisfies_the_worker_protocol():
    """Every member the protocol names exists on ThreadWorker with the same parameters."""
    import inspect

    w = ThreadWorker(detect("cpu")[0])
    try:
        for name in ("load", "unload", "process", "run", "stop", "resident", "keep"):
            assert list(inspect.signature(getattr(w, name)).parameters) == \
                list(inspect.signature(getattr(Worker, name)).parameters)[1:], name
        assert w.status == "idle" and w.queue_depth == 0 and w.in_process is True
    finally:
        w.stop()


def test_calls_run_in_order_and_a_stopped_worker_refuses():
    w = ThreadWorker(detect("cpu")[0])
    order: list[int] = []
    futs = [w.call(lambda i=i: order.append(i)) for i in range(20)]
    for f in futs:
        f.result(10)
    assert order == list(range(20))
    w.stop()
    with pytest.raises(GpuGroupsError) as e:
        w.unload("x").result(10)
    assert e.value.code == "invalid_request"


def test_process_of_a_group_not_loaded_fails_that_call_only():
    w = ThreadWorker(detect("cpu")[0])
    try:
        with pytest.raises(GpuGroupsError):
            w.process("nothing", Request("m", PROMPT, 3)).result(10)
        assert w.call(lambda: 42).result(10) == 42
    finally:
        w.stop()


def test_the_worker_keeps_a_pin_with_its_group_until_unpinned_or_unloaded(held):
    """``resident`` says which held groups the manager pinned (a manager that adopts them, after a
    kernel restart on Ray, pins them again); an unpin or an unload forgets it."""
    m, worker = held
    m.pin("tiny")
    assert worker.resident()["tiny"].pinned
    m.unpin("tiny")
    assert not worker.resident()["tiny"].pinned
    m.pin("tiny")
    m.unload_group("tiny")
    m.load_group("tiny")
    assert not worker.resident()["tiny"].pinned


def test_concurrent_requests_are_batched_and_equal_unbatched(held):
    m, worker = held
    m.load_group("tiny")
    prompts = ["import os\nimport", "class Foo(", "    return self.", PROMPT, "for i in range("]
    members = ["tiny-base", "tiny-a", "tiny-b", "tiny-a", "tiny-base"]
    alone = [m.process(mid, p, num_predictions=4) for mid, p in zip(members, prompts)]
    results: list = [None] * len(prompts)

    def run(i):
        results[i] = m.process(members[i], prompts[i], num_predictions=4)

    # Block the device worker so the requests queue up and must share a forward pass.
    gate = worker.hold()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    assert wait_for(lambda: worker.queue_depth >= len(prompts) + 1)
    gate.set()
    for t in threads:
        t.join(30)
    assert max(r["timing"]["batch_size"] for r in results) == len(prompts)
    for a, b in zip(alone, results):
        assert [p["token_id"] for p in a["predictions"]] == [p["token_id"] for p in b["predictions"]]
        assert [p["logprob"] for p in b["predictions"]] == pytest.approx([p["logprob"] for p in a["predictions"]], abs=1e-5)


def _queue(worker, order: list[str], label: str, group: str, member: str, new_tokens: int = 1):
    fut = worker.process(group, Request(member, PROMPT, 1, new_tokens))
    fut.add_done_callback(lambda f: order.append(f"{label}:{f.result()['timing']['batch_size']}"))
    return fut


def test_groups_take_turns_so_a_backlog_does_not_starve_another_group(held):
    """Group tiny has three generating requests queued before one of gpt: gpt's runs second."""
    m, worker = held
    m.load_group("tiny")
    m.load_group("gpt")
    order: list[str] = []
    gate = worker.hold()
    futs = [_queue(worker, order, f"A{i}", "tiny", "tiny-a") for i in range(3)]
    futs.append(_queue(worker, order, "B", "gpt", "tiny-gpt2"))
    gate.set()
    for f in futs:
        f.result(60)
    assert order == ["A0:1", "B:1", "A1:1", "A2:1"]


def test_turns_keep_batching_and_never_pass_a_call(held):
    """Requests that do not generate still share a pass per group; a call (here a marker, as a
    load or unload would be) runs in its place, after the requests queued before it; after it, the
    group served longest ago (tiny) goes first although gpt's request is older."""
    m, worker = held
    m.load_group("tiny")
    m.load_group("gpt")
    order: list[str] = []
    gate = worker.hold()
    futs = [_queue(worker, order, "A", "tiny", member, 0) for member in ("tiny-a", "tiny-b", "tiny-base")]
    futs.append(_queue(worker, order, "B", "gpt", "tiny-gpt2", 0))
    futs.append(worker.call(lambda: order.append("call")))
    futs.append(_queue(worker, order, "C", "gpt", "tiny-gpt2", 0))
    futs.append(_queue(worker, order, "D", "tiny", "tiny-a", 0))
    gate.set()
    for f in futs:
        f.result(60)
    assert order == ["A:3", "A:3", "A:3", "B:1", "call", "D:1", "C:1"]


@pytest.fixture
def lending(tiny_catalog_toml):
    """A cpu manager whose one worker lends its passes to callers' threads (``lend=True``) and can be held."""
    m, workers = gated_manager(lend=True, devices="cpu", catalog=tiny_catalog_toml, progress=False)
    yield m, workers[0]
    m.close()


def test_process_here_lends_the_callers_thread_only_on_an_idle_device(lending):
    """On an idle device the request takes the device and its pass runs in the caller's thread; a
    call queued meanwhile waits for that pass. On a busy device the request is queued as usual."""
    m, worker = lending
    m.load_group("tiny")
    order: list[str] = []
    me = threading.current_thread()
    fut, here = worker.process_here("tiny", Request("tiny-a", PROMPT, 2))
    assert here is not None and not fut.done() and worker.status == "busy" and worker.queue_depth == 1
    later = worker.call(lambda: order.append("call"))
    fut.add_done_callback(lambda f: order.append(f"pass in {'caller' if threading.current_thread() is me else 'other'}"))
    here()
    later.result(10)
    assert order == ["pass in caller", "call"] and worker.queue_depth == 0
    gate = worker.hold()
    queued, none = worker.process_here("tiny", Request("tiny-a", PROMPT, 2))
    assert none is None
    gate.set()
    assert queued.result(30)["predictions"] == fut.result()["predictions"]


def test_process_here_queues_where_passes_must_stay_on_the_devices_thread(held):
    """A CPU device whose torch runs on several threads (the default) never lends its pass to a
    caller's thread: a second thread running torch would slow both (docs/engine.md)."""
    m, worker = held
    m.load_group("tiny")
    fut, here = worker.process_here("tiny", Request("tiny-a", PROMPT, 2))
    assert (here is None) is not lends(worker.device)
    if here is not None:
        here()
    assert fut.result(30)["predictions"]


def test_passes_may_run_on_any_thread_of_a_cuda_device_or_where_torch_has_one_thread(monkeypatch):
    cpu = detect("cpu")[0]
    cuda = Device(0, "cuda:0", "cuda", "a CUDA device's record", 1 << 30, 1 << 30, "cuda:0")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert lends(cuda) and not lends(cpu)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert not lends(cpu)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert lends(cpu)


def test_a_pause_holds_an_idle_device_at_once_and_a_busy_one_after_its_queue():
    """On an idle device the pause has begun when it returns, without the device's thread: the
    device reads busy and a call queued behind it waits for the release. On a busy device the
    pause begins after what is queued, and the device is free again after each release."""
    from concurrent.futures import Future

    w = ThreadWorker(detect("cpu")[0])
    try:
        release: Future[None] = Future()
        begun = w.pause(release)
        assert begun.done() and w.status == "busy"
        behind = w.call(lambda: threading.current_thread().name)
        assert not behind.done() and w.queue_depth == 2
        release.set_result(None)
        assert behind.result(10) == w._thread.name and wait_for(lambda: w.status == "idle")

        gate, first = threading.Event(), w.call(lambda: gate.wait(10))
        second: Future[None] = Future()
        queued = w.pause(second)
        assert not queued.done()
        gate.set()
        queued.result(10)
        assert w.status == "busy" and first.done()
        second.set_result(None)
        assert w.call(lambda: 7).result(10) == 7 and wait_for(lambda: w.status == "idle")
    finally:
        w.stop()
