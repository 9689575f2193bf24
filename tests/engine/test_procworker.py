"""A worker process per device (``worker="process"``): the thread worker's answers over a pipe,
sharding across worker processes, a killed worker process, and no process left after ``close``.

Worker processes import torch on their first load (seconds here), so one pair of managers on the
same virtual devices, one with process workers and one with thread workers, serves most tests.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import pytest

import gpugroups as gg
from gpugroups.engine.calls import Request, Worker
from gpugroups.engine.devices import Device, detect
from gpugroups.engine.procworker import ProcessWorker
from gpugroups.engine.worker import ThreadWorker, worker_factory
from gpugroups.errors import GpuGroupsError
from tests.waiting import wait_for

DEVICES = "virtual:2x512MiB"
PROMPTS = ["def add(a, b):", "import os\nimport", "class Foo("]
pytestmark = pytest.mark.timeout(300)


def collecting(into: list[ProcessWorker]) -> Any:
    """A worker factory that makes ``ProcessWorker``s and keeps them (to reach their processes)."""

    def make(device: Device) -> ProcessWorker:
        into.append(ProcessWorker(device))
        return into[-1]

    return make


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def pair(tiny_catalog_toml: Path, deep_llama: tuple[Path, Path]) -> Iterator[tuple[gg.Manager, gg.Manager, list[ProcessWorker]]]:
    """(process-worker manager, thread-worker manager, the process workers), each with the
    tiny catalog plus the adapters group ``big`` (``big-base``, ``big-a``) for sharding."""
    workers: list[ProcessWorker] = []
    pm = gg.Manager(devices=DEVICES, catalog=tiny_catalog_toml, worker=collecting(workers), progress=False)
    tm = gg.Manager(devices=DEVICES, catalog=tiny_catalog_toml, worker="thread", progress=False)
    base, adapter = deep_llama
    for m in (pm, tm):
        m.register_group("big", base=str(base), adapters={"big-a": str(adapter)}, base_id="big-base")
        m.load_group("tiny", device_id=0)
        m.load_group("gpt", device_id=1)
    yield pm, tm, workers
    pm.close()
    tm.close()


def same_predictions(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert [p["token_id"] for p in a["predictions"]] == [p["token_id"] for p in b["predictions"]]
    assert [p["probability"] for p in a["predictions"]] == pytest.approx(
        [p["probability"] for p in b["predictions"]], abs=1e-6
    )


def test_the_process_worker_has_every_member_of_the_worker_protocol(pair) -> None:
    _, _, workers = pair
    w = workers[0]
    for name in ("load", "load_sharded", "pause", "unload", "process", "run", "stop", "resident", "on_lost"):
        assert list(inspect.signature(getattr(w, name)).parameters) == \
            list(inspect.signature(getattr(Worker, name)).parameters)[1:], name
    assert w.in_process is False and w.status == "idle" and w.queue_depth == 0
    assert w.pid in children()


def test_answers_equal_the_thread_workers(pair) -> None:
    pm, tm, _ = pair
    for model in ("tiny-base", "tiny-a", "tiny-b", "tiny-gpt2"):
        for prompt in PROMPTS:
            a, b = pm.process(model, prompt, 5), tm.process(model, prompt, 5)
            assert a["device_id"] == b["device_id"]
            same_predictions(a, b)
    assert pm.process("tiny-b", "hi", 2, max_new_tokens=4)["predictions"] == tm.process(
        "tiny-b", "hi", 2, max_new_tokens=4
    )["predictions"]


def test_load_progress_comes_in_the_thread_workers_order(pair) -> None:
    seen: dict[str, list[tuple[float, str]]] = {}
    for name, m in zip(("process", "thread"), pair[:2]):
        events: list[tuple[float, str]] = []
        unsubscribe = m.subscribe(
            lambda e, into=events: into.append((e["progress"], e["stage"])) if e["type"] == "load_progress" else None
        )
        m.unload_group("tiny")
        assert m.load_group("tiny", device_id=0)["status"] == "loaded"
        assert wait_for(lambda into=events: into and into[-1][1] == "ready")
        unsubscribe()
        seen[name] = events
    assert seen["process"] == seen["thread"]
    assert [s for _, s in seen["process"]][:2] == ["loading base tiny-base", "loaded base tiny-base"]


def test_queued_requests_of_mixed_members_share_a_forward_pass(pair, tmp_path: Path) -> None:
    pm, tm, workers = pair
    members = ["tiny-a", "tiny-b", "tiny-base", "tiny-a", "tiny-base", "tiny-b"]
    gate = tmp_path / "open"

    def wait_for_gate(model: Any, tokenizer: Any, path: str) -> None:
        import os
        import time

        while not os.path.exists(path):
            time.sleep(0.005)

    # A run that waits keeps device 0's worker process busy, so the requests queue up there.
    holder = threading.Thread(target=pm.run, args=("tiny-a", wait_for_gate, str(gate)))
    holder.start()
    results: list[Any] = [None] * len(members)

    def ask(i: int) -> None:
        results[i] = pm.process(members[i], PROMPTS[i % 3], 4)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(members))]
    for t in threads:
        t.start()
    assert wait_for(lambda: workers[0].queue_depth >= len(members) + 1, 30)
    gate.touch()
    for t in threads + [holder]:
        t.join(60)
    assert max(r["timing"]["batch_size"] for r in results) > 1
    for i, r in enumerate(results):
        same_predictions(r, tm.process(members[i], PROMPTS[i % 3], 4))


def test_run_sends_fn_by_value_and_brings_tensors_back_on_the_cpu(pair) -> None:
    pm, tm, _ = pair

    def last_hidden(model: Any, tokenizer: Any, text: str) -> Any:
        import torch

        with torch.no_grad():
            return model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states[-1]

    there, here = pm.run("tiny-a", last_hidden, "the cat"), tm.run("tiny-a", last_hidden, "the cat")
    assert there.device.type == "cpu" and there.shape == here.shape
    assert (there - here).abs().max().item() < 1e-6

    def boom(model: Any, tokenizer: Any) -> None:
        raise KeyError("from the worker process")

    with pytest.raises(KeyError, match="from the worker process") as raised:
        pm.run("tiny-a", boom)
    notes = "\n".join(raised.value.__notes__)  # fn's own frames travel as text
    assert "Traceback where fn ran" in notes and "in boom" in notes


Pair = collections.namedtuple("Pair", "a b")


@dataclasses.dataclass
class Res:
    x: Any
    y: Any = dataclasses.field(default=None, init=False)  # set after construction: must come back too


def test_run_brings_back_results_as_the_types_they_are_and_always_answers(pair) -> None:
    """Named tuples, a model's ``ModelOutput`` and dataclasses come back as themselves, their tensors
    detached on the CPU; a result that cannot be rebuilt is an error, never a call that hangs."""
    pm, _, _ = pair

    def shapes(model: Any, tokenizer: Any) -> Any:
        import torch

        out = model(**tokenizer("the cat", return_tensors="pt"))
        res = Res(torch.ones(2, requires_grad=True) * 2)
        res.y = torch.zeros(1)
        return Pair(torch.ones(2), out), res

    (pair_, res) = pm.run("tiny-a", shapes)
    assert type(pair_).__name__ == "Pair" and pair_.a.tolist() == [1.0, 1.0]
    assert type(pair_.b).__name__ == "CausalLMOutputWithPast" and pair_.b.logits.device.type == "cpu"
    assert type(res).__name__ == "Res" and not res.x.requires_grad and res.x.tolist() == [2.0, 2.0]
    assert res.y.tolist() == [0.0]

    def unbuildable(model: Any, tokenizer: Any) -> Any:
        import collections

        import torch

        class Strict(collections.namedtuple("Strict", "a b")):  # takes no positional fields
            def __new__(cls, **kw: Any) -> Any:
                return super().__new__(cls, kw["a"], kw["b"])

        return Strict(a=torch.ones(1), b=2)

    with pytest.raises(GpuGroupsError) as e:
        pm.run("tiny-a", unbuildable)
    assert e.value.code == "invalid_request" and "cannot be brought back" in e.value.message
    assert pm.run("tiny-a", lambda model, tokenizer: 7) == 7  # and the device is free again


def test_run_refuses_what_cannot_be_pickled_and_use_points_to_run(pair) -> None:
    pm, _, _ = pair
    lock = threading.Lock()
    with pytest.raises(GpuGroupsError) as sent:
        pm.run("tiny-a", lambda model, tokenizer: lock.locked())
    assert sent.value.code == "invalid_request" and "fn or its arguments cannot be pickled" in sent.value.message
    assert "cannot use the manager" in sent.value.message
    with pytest.raises(GpuGroupsError) as back:
        pm.run("tiny-a", lambda model, tokenizer: __import__("threading").Lock())
    assert back.value.code == "invalid_request" and "fn's result cannot be pickled" in back.value.message

    class Holds(Exception):  # an exception that cannot travel back: what it says does
        def __init__(self) -> None:
            super().__init__("weird")
            self.lock = threading.Lock()

    def raises_it(model: Any, tokenizer: Any) -> None:
        raise Holds()

    with pytest.raises(GpuGroupsError) as odd:
        pm.run("tiny-a", raises_it)
    assert "fn raised" in odd.value.message and "Holds: weird" in odd.value.message and "in raises_it" in odd.value.message
    with pytest.raises(GpuGroupsError) as used, pm.use("tiny-a"):
        pass
    assert used.value.code == "invalid_request" and "m.run" in used.value.message
    assert pm.process("tiny-a", "still here", 2)["predictions"]


def test_unload_frees_the_group_in_the_worker_process(pair) -> None:
    pm, _, workers = pair
    assert set(workers[1].resident()) == {"gpt"}
    pm.unload_group("gpt")
    assert workers[1].resident() == {}
    assert pm.load_group("gpt", device_id=1)["status"] == "loaded"
    assert set(workers[1].resident()) == {"gpt"}


def test_a_group_sharded_over_two_worker_processes_equals_it_unsharded(pair) -> None:
    pm, tm, workers = pair
    assert pm.load_group("big", device_ids=[0, 1])["device_ids"] == [0, 1]
    assert tm.load_group("big", device_id=1)["device_ids"] == [1]
    shards = {g["id"]: g for g in pm.groups()}["big"]["shards"]
    assert [s["device_id"] for s in shards] == [0, 1] and all(s["bytes"] > 0 for s in shards)
    assert "big" in workers[0].resident() and "big" not in workers[1].resident()  # driven by its first device
    try:
        for model in ("big-base", "big-a", "big-base"):
            for prompt in PROMPTS:
                a = pm.process(model, prompt, 5)
                assert a["device_ids"] == [0, 1]
                same_predictions(a, tm.process(model, prompt, 5))
        assert pm.process("tiny-gpt2", "def", 2)["device_id"] == 1  # device 1's own work goes on between passes
    finally:
        pm.unload_group("big")
        tm.unload_group("big")
    assert "big" not in workers[0].resident()


def test_pauses_and_holds_on_other_devices_keep_the_calls_in_order(pair) -> None:
    pm, _, workers = pair
    pm.load_group("gpt", device_id=1)
    w = workers[1]
    release: Future[None] = Future()
    begun = w.pause(release)
    behind = w.unload("not-loaded")
    begun.result(30)
    with pytest.raises(TimeoutError):
        behind.result(0.3)  # the worker process is paused until the release
    release.set_result(None)
    behind.result(30)
    early: Future[None] = Future()
    early.set_result(None)  # a release sent before its pause: the pause ends as it begins
    w.pause(early).result(30)
    hold: Future[None] = Future()  # a hold on another device, as a sharded pass waits for
    first = w.process("gpt", Request("tiny-gpt2", "def", 2, after=(hold,)))
    second = w.unload("not-loaded")
    with pytest.raises(TimeoutError):
        second.result(0.3)  # sent only after the call ahead of it
    hold.set_result(None)
    assert first.result(30)["predictions"] and second.result(30) is None


def test_a_cancelled_request_leaves_the_queue_here_or_in_the_worker_process(pair) -> None:
    pm, _, workers = pair
    pm.load_group("gpt", device_id=1)
    w = workers[1]
    hold: Future[None] = Future()  # a hold on another device: the request waits here, unsent
    waiting = w.process("gpt", Request("tiny-gpt2", "def", 2, after=(hold,), request_id="here"))
    behind = w.unload("not-loaded")
    w.cancel("here")
    hold.set_result(None)
    with pytest.raises(GpuGroupsError) as e:
        waiting.result(30)
    assert e.value.code == "cancelled" and behind.result(30) is None
    release: Future[None] = Future()  # the worker process paused: the request waits in its queue
    w.pause(release).result(30)
    queued = w.process("gpt", Request("tiny-gpt2", "def", 2, request_id="there"))
    w.cancel("there")
    with pytest.raises(GpuGroupsError) as e:
        queued.result(30)
    assert e.value.code == "cancelled"
    release.set_result(None)
    assert w.process("gpt", Request("tiny-gpt2", "def", 2)).result(30)["predictions"]


def test_a_killed_worker_process_loses_its_device_and_close_leaves_no_process(tiny_catalog_toml: Path) -> None:
    workers: list[ProcessWorker] = []
    m = gg.Manager(devices=DEVICES, catalog=tiny_catalog_toml, worker=collecting(workers), progress=False)
    pids = [w.pid for w in workers]
    try:
        lost: list[int] = []
        workers[0].on_lost(lambda: lost.append(1))
        m.load("tiny-a", device_id=0)
        m.load("tiny-gpt2", device_id=1)
        os.kill(pids[1], signal.SIGINT)  # an interrupt is for the kernel, not its worker processes
        assert m.process("tiny-gpt2", "def", 2)["device_id"] == 1

        def sleep_long(model: Any, tokenizer: Any) -> None:
            import time

            time.sleep(600)

        failure: list[BaseException] = []
        t = threading.Thread(target=lambda: failure.extend(_raised(lambda: m.run("tiny-a", sleep_long))))
        t.start()
        assert wait_for(lambda: workers[0].queue_depth == 1)
        os.kill(pids[0], signal.SIGKILL)
        t.join(30)
        assert not t.is_alive()  # the pending call failed: nothing hangs
        assert isinstance(failure[0], GpuGroupsError) and failure[0].code == "host_unavailable"
        assert failure[0].details == {"device_id": 0, "exitcode": -signal.SIGKILL}
        state = m.state()
        assert state["devices"][0]["status"] == "lost" and state["devices"][0]["resident_groups"] == []
        assert lost == [1]
        with pytest.raises(GpuGroupsError) as nowhere:  # the lost device is named, not just "0 MiB free"
            m.load("tiny-a", device_id=0)
        assert nowhere.value.code == "insufficient_memory" and nowhere.value.details["lost_devices"] == [0]
        assert pids[0] not in children()  # reaped: no zombie
        assert m.process("tiny-a", "again", 2)["device_id"] == 1  # reloads on the device that is left
    finally:
        m.close()
    assert not set(pids) & children()
    assert not [n for n in os.listdir("/dev/shm") if any(n.startswith(f"torch_{p}_") for p in pids)]
    with pytest.raises(GpuGroupsError) as refused:
        workers[1].unload("tiny").result(10)
    assert refused.value.code == "invalid_request"


def test_a_sharded_group_that_loses_a_device_is_freed_on_its_first_one(tiny_catalog_toml: Path) -> None:
    """The process of a sharded group's first device holds the whole model: when another device it
    spans is lost, the group leaves the state and that process frees it too (no memory kept unseen)."""
    workers: list[ProcessWorker] = []
    m = gg.Manager(devices=DEVICES, catalog=tiny_catalog_toml, worker=collecting(workers), progress=False)
    try:
        assert m.load("tiny-a", device_ids=[0, 1])["device_ids"] == [0, 1]
        assert "tiny" in workers[0].resident()
        os.kill(workers[1].pid, signal.SIGKILL)
        assert wait_for(lambda: m.state()["devices"][1]["status"] == "lost")
        assert m.state()["devices"][0]["resident_groups"] == []
        assert wait_for(lambda: workers[0].resident() == {})
        assert m.load("tiny-a")["device_ids"] == [0]
    finally:
        m.close()


def _raised(call: Any) -> list[BaseException]:
    try:
        call()
    except BaseException as exc:
        return [exc]
    return []


def test_worker_process_by_name_and_close_ends_them(tiny_catalog_toml: Path) -> None:
    before = children()
    m = gg.Manager(devices=DEVICES, catalog=tiny_catalog_toml, worker="process", progress=False)
    started = children() - before
    assert len(started) == 2
    assert m.state()["devices"][1]["status"] == "idle"
    m.close()
    assert not started & children()


def test_auto_chooses_processes_for_two_or_more_cuda_devices_only() -> None:
    def gpu(i: int) -> Device:
        return Device(i, f"cuda:{i}", "cuda", "a GPU", 2**34, 2**34, f"cuda:{i}")

    assert worker_factory("auto", [gpu(0), gpu(1)]) is ProcessWorker
    assert worker_factory("auto", [gpu(0)]) is ThreadWorker
    assert worker_factory("auto", detect("virtual:2x512MiB")) is ThreadWorker
    assert worker_factory("auto", detect("cpu")) is ThreadWorker
    assert worker_factory("process", detect("cpu")) is ProcessWorker
    assert worker_factory("thread", [gpu(0), gpu(1)]) is ThreadWorker
    with pytest.raises(GpuGroupsError) as bad:
        gg.Manager(devices="cpu", worker="threads")  # type: ignore[arg-type]
    assert bad.value.code == "invalid_request" and "'threads'" in bad.value.message


def _answer(conn: Any, call_id: int) -> Any:
    """The outcome of call ``call_id`` from a worker host's pipe (progress messages skipped)."""
    while True:
        kind, cid, *rest = conn.recv()
        if kind == "done" and cid == call_id:
            return rest[0]


@pytest.mark.parametrize("lend", [True, False])
def test_a_pass_runs_in_the_thread_that_read_it_only_where_passes_may_run_anywhere(lend: bool, tiny_catalog_toml: Path) -> None:
    """The far side of a worker process, served in this process over a pipe: with ``lend`` (a CUDA
    device, or torch on one thread) a request for an idle device is answered by a reading thread,
    without waking the worker's thread; without it, by the worker's thread, as every request was."""
    from gpugroups.catalog import Catalog
    from gpugroups.engine.estimates import folders
    from gpugroups.engine.prochost import _Host

    near, far = multiprocessing.Pipe()
    device = detect("virtual:512MiB")[0]
    host = _Host(far, device, lend)
    senders: list[str] = []
    send = host._send

    def noting(message: tuple[Any, ...]) -> None:
        if message[0] == "done":
            senders.append(threading.current_thread().name)
        send(message)

    host._send = noting  # type: ignore[method-assign]
    serving = threading.Thread(target=host.serve, name="serving", daemon=True)
    serving.start()
    try:
        catalog = Catalog()
        catalog.load_toml(tiny_catalog_toml)
        group = catalog.group("gpt")
        near.send((1, "load", (group, folders(catalog, group), "float32")))
        assert _answer(near, 1)[0] == "ok"  # answered once its device is free: the next request may have it
        near.send((2, "process", ("gpt", Request("tiny-gpt2", "def add(a, b):", 3))))
        kind, result = _answer(near, 2)
        assert kind == "ok" and len(result["predictions"]) == 3
        worker_thread = f"gpugroups-{device.device}"
        assert (senders[-1] != worker_thread) is lend and senders[-1] in {worker_thread, "serving", "gpugroups-read"}
        near.send((3, "stop", ()))
        assert _answer(near, 3) == ("ok", None)
    finally:
        near.close()
        serving.join(30)
    assert not serving.is_alive()


def test_worker_processes_whose_torch_runs_on_one_thread_answer_as_the_thread_workers(
    pair, tiny_catalog_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``OMP_NUM_THREADS=1`` (inherited) a worker process runs a request for an idle device in
    the thread that read it: answers, concurrent requests (queued meanwhile, batched) and a
    generation come out as the thread worker's."""
    from concurrent.futures import ThreadPoolExecutor

    _, tm, _ = pair
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with gg.Manager(devices=DEVICES, catalog=tiny_catalog_toml, worker="process", progress=False) as one:
        one.load_group("tiny", device_id=0)
        for prompt in PROMPTS:
            same_predictions(one.process("tiny-a", prompt, 5), tm.process("tiny-a", prompt, 5))
        calls = [("tiny-a", "tiny-b", "tiny-base")[i % 3] for i in range(12)]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda model: one.process(model, PROMPTS[0], 3), calls))
        for model, answer in zip(calls, answers):
            same_predictions(answer, tm.process(model, PROMPTS[0], 3))
        assert max(a["timing"]["batch_size"] for a in answers) > 1
        assert one.process("tiny-b", "hi", 2, max_new_tokens=4)["predictions"] == tm.process(
            "tiny-b", "hi", 2, max_new_tokens=4
        )["predictions"]
