"""Ray devices on a real local Ray cluster: two nodes of two simulated GPUs each, all on 127.0.0.1.

The session's cluster (``ray_cluster``, ``tests/raycluster.py``) serves these tests and the
server's; each manager uses its own namespace and is closed before the next starts, since every
manager holds every GPU resource. The node-loss test removes a node it added itself.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gpugroups as gg
from gpugroups.errors import GpuGroupsError
from gpugroups.kernelenv import RAY_ADDRESS_ENV
from gpugroups.server.openapi import build_spec
from tests import tinymodels
from tests.contract import check
from tests.raycluster import SPEC, RayCluster, actors_in, namespace
from tests.waiting import wait_for

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(240)]


def in_subprocess(cluster: RayCluster, catalog: Path, ns: str, body: str, idle_s: float = 1800.0) -> str:
    """Run ``body`` with a manager ``m`` on the cluster in another process that then dies abruptly."""
    code = textwrap.dedent(f"""
        import os, signal, gpugroups as gg
        m = gg.Manager(devices={SPEC!r}, catalog={str(catalog)!r}, ray_namespace={ns!r}, ray_idle_timeout_s={idle_s})
    """) + textwrap.dedent(body) + "\nprint('done', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n"
    env = {**os.environ, RAY_ADDRESS_ENV: cluster.address, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180)
    assert "done" in out.stdout, out.stderr[-3000:]
    return out.stdout


class TestOneManager:
    """One manager over the four devices, for the tests that only read or load."""

    @pytest.fixture(scope="class")
    @classmethod
    def rm(cls, ray_cluster: RayCluster, tiny_catalog_toml: Path) -> Iterator[gg.Manager]:
        ns = namespace()
        m = gg.Manager(devices=SPEC, catalog=tiny_catalog_toml, ray_namespace=ns)
        yield m
        m.close()
        assert actors_in(ns) == []  # close() leaves no actor behind

    def test_four_devices_over_two_nodes_in_one_state(self, rm: gg.Manager, ray_cluster: RayCluster) -> None:
        state = rm.state()
        check(build_spec("/"), "State", state)
        devices = state["devices"]
        assert [d["device"] for d in devices] == ["ray:0", "ray:1", "ray:2", "ray:3"]
        assert {d["kind"] for d in devices} == {"virtual"}
        assert {d["host"] for d in devices} == {"127.0.0.1"}
        nodes = [d["node"] for d in devices]
        assert len(set(nodes)) == 2 and nodes.count(nodes[0]) == 2
        assert ray_cluster.second.node_id in nodes
        assert all(d["memory"]["budget_bytes"] == 512 * 1024**2 for d in devices)

    def test_placement_across_nodes_and_results_equal_a_local_device(self, rm: gg.Manager, tiny_catalog_toml: Path) -> None:
        nodes = [d["node"] for d in rm.state()["devices"]]
        far = next(i for i, n in enumerate(nodes) if n != nodes[0])
        assert rm.load("tiny-a", device_id=0)["status"] == "loaded"
        assert rm.load_group("gpt", device_id=far)["status"] == "loaded"
        state = rm.state()
        on = {g["id"]: g["resident_on"] for g in state["groups"]}
        assert {nodes[on["tiny"][0]], nodes[on["gpt"][0]]} == set(nodes)
        with gg.Manager(devices="virtual:512MiB", catalog=tiny_catalog_toml) as local:
            for mid in ("tiny-a", "tiny-base", "tiny-gpt2"):
                remote, here = rm.process(mid, "hello world", 5), local.process(mid, "hello world", 5)
                assert [p["token_id"] for p in remote["predictions"]] == [p["token_id"] for p in here["predictions"]]
                assert [p["probability"] for p in remote["predictions"]] == pytest.approx(
                    [p["probability"] for p in here["predictions"]], rel=1e-4
                )
            assert rm.process("tiny-b", "hi", 2, max_new_tokens=3)["predictions"] == local.process(
                "tiny-b", "hi", 2, max_new_tokens=3
            )["predictions"]

    def test_mixed_adapters_batch_on_a_ray_device(self, rm: gg.Manager) -> None:
        members = ["tiny-a", "tiny-b", "tiny-base"] * 6
        alone = {mid: rm.process(mid, "the cat", 3)["predictions"] for mid in set(members)}
        results: list[dict[str, Any]] = []
        threads = [threading.Thread(target=lambda mid=mid: results.append(rm.process(mid, "the cat", 3))) for mid in members]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == len(members)
        assert max(r["timing"]["batch_size"] for r in results) > 1
        for r in results:
            assert [p["token_id"] for p in r["predictions"]] == [p["token_id"] for p in alone[r["model_id"]]]

    def test_load_progress_events_come_from_the_remote_device(self, rm: gg.Manager) -> None:
        events: list[dict[str, Any]] = []
        unsubscribe = rm.subscribe(events.append)
        rm.unload_group("gpt")
        assert rm.load_group("gpt", device_id=3)["status"] == "loaded"
        assert wait_for(lambda: any(
            g["id"] == "gpt" and g["status"] == "resident"
            for e in events if e["type"] == "state_update" for g in e["state"]["groups"]
        ), 10)
        unsubscribe()
        progress = [e for e in events if e["type"] == "load_progress"]
        assert progress and {e["device_id"] for e in progress} == {3} and {e["group_id"] for e in progress} == {"gpt"}
        assert [e["progress"] for e in progress] == sorted(e["progress"] for e in progress)

    def test_a_node_without_the_files_answers_load_failed_naming_it(self, rm: gg.Manager, tiny_gpt2: Path) -> None:
        folder = Path(tempfile.mkdtemp(prefix="gg-gone-")) / "model"
        shutil.copytree(tiny_gpt2, folder)
        rm.register_group("gone", models={"gone-gpt2": str(folder)})
        for weights in folder.glob("*.safetensors"):
            weights.unlink()  # estimated here, then missing when the node reads it
        with pytest.raises(GpuGroupsError) as err:
            rm.load("gone-gpt2", device_id=1)
        node = rm.state()["devices"][1]["node"]
        shutil.rmtree(folder.parent)
        assert err.value.code == "load_failed" and "127.0.0.1" in err.value.message and node[:8] in err.value.message
        assert err.value.details["node"] == node


    def test_run_on_a_ray_device_brings_results_back_on_the_cpu(self, rm: gg.Manager, tiny_catalog_toml: Path) -> None:
        def last_hidden(model: Any, tokenizer: Any, text: str) -> Any:
            import torch

            with torch.no_grad():
                out = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True)
            return {"hidden": out.hidden_states[-1], "device": str(out.hidden_states[-1].device)}

        remote = rm.run("tiny-a", last_hidden, "the cat")
        with gg.Manager(devices="virtual:512MiB", catalog=tiny_catalog_toml) as local:
            here = local.run("tiny-a", last_hidden, "the cat")
        assert remote["hidden"].device.type == "cpu"
        assert remote["hidden"].shape == here["hidden"].shape
        assert (remote["hidden"] - here["hidden"]).abs().max().item() < 1e-5

        def boom(model: Any, tokenizer: Any) -> None:
            raise KeyError("from the node")

        with pytest.raises(KeyError):
            rm.run("tiny-a", boom)
        assert rm.process("tiny-a", "the cat", 2)["predictions"]  # the device still answers

    def test_a_run_the_node_cannot_rebuild_is_refused_there_and_later_calls_still_pass(
        self, rm: gg.Manager, tmp_path: Path
    ) -> None:
        """fn comes from a module only this process can import: the node fails to rebuild it, as our
        error, in its turn among the device's calls, so the calls after it still reach the device."""
        (tmp_path / "gg_only_here.py").write_text("def fn(model, tokenizer):\n    return 1\n")
        sys.path.insert(0, str(tmp_path))
        try:
            fn = importlib.import_module("gg_only_here").fn  # pickled by reference: the node must import it
            with pytest.raises(GpuGroupsError) as err:
                rm.run("tiny-a", fn)
        finally:
            sys.path.remove(str(tmp_path))
            sys.modules.pop("gg_only_here", None)
        assert err.value.code == "invalid_request" and "cannot be unpickled" in err.value.message
        assert rm.process("tiny-a", "the cat", 2)["predictions"]

    def test_a_cancel_reaches_the_request_on_the_node(self, rm: gg.Manager) -> None:
        device = rm.load("tiny-gpt2")["device_id"]
        outcomes: dict[str, Any] = {}

        def call(rid: str) -> None:
            try:
                outcomes[rid] = rm.process("tiny-gpt2", "def f(", 1, max_new_tokens=256, request_id=rid)
            except GpuGroupsError as exc:
                outcomes[rid] = exc

        callers = [threading.Thread(target=call, args=(rid,)) for rid in ("first", "second")]
        callers[0].start()
        assert wait_for(lambda: rm.state()["devices"][device]["queue_depth"] == 1)
        callers[1].start()
        assert wait_for(lambda: rm.state()["devices"][device]["queue_depth"] == 2)
        rm.cancel("second")  # queued behind the first (or, if that ended, stopped between steps)
        for c in callers:
            c.join(60)
        assert isinstance(outcomes["second"], GpuGroupsError) and outcomes["second"].code == "cancelled"
        assert wait_for(lambda: rm.state()["devices"][device]["queue_depth"] == 0)


def test_the_actor_takes_each_callers_calls_in_the_order_they_were_numbered(ray_cluster: RayCluster) -> None:
    """Ray starts a threaded actor's calls in no set order: a call numbered after one that has not
    arrived waits for it; another caller's calls do not wait."""
    from gpugroups.engine.rayactor import ACTOR_OPTIONS, DeviceActor, seal

    actor = ray.remote(**ACTOR_OPTIONS)(DeviceActor).options(num_cpus=0).remote("virtual", 2**20, 60.0)
    try:
        second = actor.cancel.remote(seal("a", 1, "no-such-request"))
        assert ray.get(actor.cancel.remote(seal("b", 0, "no-such-request")), timeout=60) is None
        assert ray.wait([second], timeout=1.0)[0] == []  # still waits for a's call 0
        first = actor.cancel.remote(seal("a", 0, "no-such-request"))
        assert ray.get([first, second], timeout=30) == [None, None]
    finally:
        ray.kill(actor, no_restart=True)


def test_the_line_and_ray_calls_share_one_numbering(ray_cluster: RayCluster) -> None:
    """A call on the direct line waits for the caller's Ray calls numbered before it, and the Ray
    calls numbered after it wait for it: one order, whichever way each call came."""
    from gpugroups.engine.rayactor import ACTOR_OPTIONS, DeviceActor, seal
    from gpugroups.engine.rayline import Line

    actor = ray.remote(**ACTOR_OPTIONS)(DeviceActor).options(num_cpus=0).remote("virtual", 2**20, 60.0)
    line = Line(ray.get(actor.info.remote(), timeout=60)["line"], "a", lambda number, answer: None, lambda: None)
    try:
        third = actor.cancel.remote(seal("a", 2, "no-such-request"))
        line.send(1, "cancel", "no-such-request")
        assert ray.wait([third], timeout=1.0)[0] == []  # waits for the line's call 1, which waits for 0
        first = actor.cancel.remote(seal("a", 0, "no-such-request"))
        assert ray.get([first, third], timeout=30) == [None, None]
    finally:
        line.close()
        ray.kill(actor, no_restart=True)


def test_without_the_key_there_is_no_line_and_prompts_go_over_ray(ray_cluster: RayCluster, tiny_catalog_toml: Path) -> None:
    """The actor's line opens only to a caller holding its key: with another key (or no listener)
    the worker has no line, and its prompts still answer, as Ray calls."""
    import functools

    from gpugroups.catalog import Catalog
    from gpugroups.engine.calls import Request
    from gpugroups.engine.estimates import folders
    from gpugroups.engine.rayline import open_line
    from gpugroups.engine.rayworker import ray_devices

    devices = [d for d in ray_devices(SPEC, namespace()) if d.remote_worker]
    host, port, key = devices[0].remote_worker.keywords["line"]  # type: ignore[union-attr]
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        nobody = closed.getsockname()[1]
    assert open_line(("127.0.0.1", nobody, key), "x", lambda n, a: None, lambda: None) is None
    wrong = bytes(b ^ 1 for b in key)
    workers = [functools.partial(d.remote_worker, line=(host, port, wrong))(d) for d in devices]  # type: ignore[misc]
    catalog = Catalog()
    catalog.load_toml(tiny_catalog_toml)
    group = catalog.group("tiny")
    try:
        w = workers[0]
        assert w._line is None
        w.load(group, folders(catalog, group), "float32", lambda fraction, stage: None).result(60)
        assert w.process("tiny", Request("tiny-a", "the cat", 2)).result(60)["predictions"]
        right = functools.partial(devices[1].remote_worker)(devices[1])  # type: ignore[misc]
        workers.append(right)
        assert right._line is not None  # the key it was given opens the line
    finally:
        for w in workers:
            w.stop()


def test_a_line_that_breaks_loses_the_device_at_once(ray_cluster: RayCluster, tiny_catalog_toml: Path) -> None:
    """The line ends without the manager hanging up (its socket reset): the device turns lost and
    its calls fail ``host_unavailable``, without waiting for the pings to notice."""
    from gpugroups.engine.calls import Request
    from gpugroups.engine.rayline import _hang_up
    from gpugroups.engine.rayworker import ray_devices

    workers = [d.remote_worker(d) for d in ray_devices(SPEC, namespace()) if d.remote_worker]
    try:
        w = workers[0]
        lost = threading.Event()
        w.on_lost(lost.set)
        _hang_up(w._line._conn)  # type: ignore[union-attr]
        assert lost.wait(10) and w.status == "lost"
        with pytest.raises(GpuGroupsError) as err:
            w.process("tiny", Request("tiny-a", "the cat", 2)).result(10)
        assert err.value.code == "host_unavailable"
    finally:
        for w in workers:
            w.stop()


def test_an_unload_sent_right_after_a_prompt_too_big_to_travel_inline_runs_after_it(
    ray_cluster: RayCluster, tiny_catalog_toml: Path
) -> None:
    """Ray passes an argument over 100 KiB through its object store and starts that call only once
    the node has fetched it, after calls sent later; the request still runs before the unload sent
    right behind it, and answers as a local device does."""
    from gpugroups.catalog import Catalog
    from gpugroups.engine.calls import Request
    from gpugroups.engine.estimates import folders
    from gpugroups.engine.rayworker import ray_devices

    prompt = "the cät sät on the mät. " * 4000  # 96,000 characters, 108,000 bytes in UTF-8
    with gg.Manager(devices="virtual:512MiB", catalog=tiny_catalog_toml) as local:
        expected = [p["token_id"] for p in local.process("tiny-a", prompt, 3)["predictions"]]
    catalog = Catalog()
    catalog.load_toml(tiny_catalog_toml)
    group = catalog.group("tiny")
    workers = [d.remote_worker(d) for d in ray_devices(SPEC, namespace()) if d.remote_worker]
    try:
        w = workers[0]
        for _ in range(5):  # Ray alone starts the unload first about half the time
            w.load(group, folders(catalog, group), "float32", lambda fraction, stage: None).result(60)
            asked = w.process("tiny", Request("tiny-a", prompt, 3))
            gone = w.unload("tiny")
            answer = asked.result(60)
            gone.result(60)
            assert answer["truncated"] and [p["token_id"] for p in answer["predictions"]] == expected
    finally:
        for w in workers:
            w.stop()


def test_a_new_manager_adopts_the_groups_of_a_killed_one(
    ray_cluster: RayCluster, tiny_catalog_toml: Path, tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """Groups whose catalog entry still says what was loaded are adopted as they are; one whose
    entry now names another model (``gpt``'s member: the Llama's folder) is unloaded, not served."""
    ns = namespace()
    out = in_subprocess(ray_cluster, tiny_catalog_toml, ns, """
        print(m.load("tiny-a", device_id=1)["status"])
        print(m.load("tiny-gpt2", device_id=0)["status"])
        print("expect", m.process("tiny-b", "adopt me", 3)["predictions"][0]["token_id"])
    """)
    assert "loaded" in out
    expected = int(out.split("expect ")[1].split()[0])
    changed = tinymodels.catalog_toml(tmp_path / "gpugroups.toml", tiny_llama, tiny_adapters, {"tiny-gpt2": tiny_llama})
    m = gg.Manager(devices=SPEC, catalog=changed, ray_namespace=ns)
    try:
        state = m.state()
        assert state["devices"][1]["resident_groups"] == ["tiny"]
        assert state["devices"][0]["resident_groups"] == []
        assert state["operations"] == []
        assert m.load("tiny-gpt2")["status"] == "loaded"  # the model its entry names now
        m.unload("tiny-gpt2")
        events: list[dict[str, Any]] = []
        m.subscribe(events.append)
        assert m.load("tiny-a")["status"] == "already_loaded"
        assert m.process("tiny-b", "adopt me", 3)["predictions"][0]["token_id"] == expected
        assert not any(e["type"] == "load_progress" for e in events)
    finally:
        m.close()
    assert wait_for(lambda: actors_in(ns) == [], 10)


def test_a_load_under_way_when_the_kernel_died_is_adopted_once_it_ends(
    ray_cluster: RayCluster, tiny_llama: Path, tmp_path: Path
) -> None:
    """The new manager's adoption waits for the work queued on each actor: a load the dead kernel
    began is adopted as it ends (it was held unaccounted, and loaded again by the next ``load``)."""
    go = tmp_path / "go"
    gated = tinymodels.build_gated(tmp_path / "gated", tiny_llama, go)
    catalog = tmp_path / "gated.toml"
    catalog.write_text(f'[groups.gated]\nkind = "models"\ntrust_remote_code = true\n'
                       f'[groups.gated.models]\n"gated-1" = {json.dumps(str(gated))}\n', encoding="utf-8")
    ns = namespace()
    in_subprocess(ray_cluster, catalog, ns, """
        import threading, time
        threading.Thread(target=m.load, args=("gated-1",), kwargs={"device_id": 0}, daemon=True).start()
        while not any(g["status"] == "loading" for g in m.state()["groups"]):
            time.sleep(0.05)
        time.sleep(1)  # on the actor, its from_pretrained waits for the file
    """)
    threading.Timer(2.0, go.touch).start()  # the load ends while the new manager attaches
    m = gg.Manager(devices=SPEC, catalog=catalog, ray_namespace=ns)
    try:
        assert m.state()["devices"][0]["resident_groups"] == ["gated"]
        assert m.state()["devices"][0]["memory"]["manager_bytes"] > 0
        assert m.load("gated-1")["status"] == "already_loaded"
    finally:
        go.touch()
        m.close()
    assert wait_for(lambda: actors_in(ns) == [], 10)


def test_one_manager_drives_a_namespace_and_the_next_one_waits_for_it_to_go(
    ray_cluster: RayCluster, tiny_catalog_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second manager on a namespace, in this process or in another live one, is refused with
    ``conflict`` naming the first, and changes nothing of the first's; once the first is gone
    (its process killed) the next one takes the namespace and adopts what it loaded, pinned as it was."""
    from gpugroups.engine import rayclaim
    from gpugroups.engine.rayworker import ray_devices

    ns = namespace()
    code = textwrap.dedent(f"""
        import sys, gpugroups as gg
        m = gg.Manager(devices={SPEC!r}, catalog={str(tiny_catalog_toml)!r}, ray_namespace={ns!r})
        m.load("tiny-a", device_id=2)
        m.pin("tiny")
        m.unpin("tiny")
        print(m.pin("gpt", device_id=0)["pinned"], flush=True)
        sys.stdin.read()  # lives until the test kills it
    """)
    env = {**os.environ, RAY_ADDRESS_ENV: ray_cluster.address, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    first = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "True"
        monkeypatch.setattr(rayclaim, "CLAIM_WAIT_S", 1.0)  # a live holder: no need to wait the full time
        with pytest.raises(GpuGroupsError) as e:
            gg.Manager(devices=SPEC, catalog=tiny_catalog_toml, ray_namespace=ns)
        assert e.value.code == "conflict" and e.value.details["holder"]["pid"] == first.pid
        assert f"process {first.pid}" in e.value.message and "ray_namespace" in e.value.message
        assert first.poll() is None and len(actors_in(ns)) == 5  # the first's claim and its four devices
    finally:
        first.kill()
        first.wait(30)
    monkeypatch.undo()
    m = gg.Manager(devices=SPEC, catalog=tiny_catalog_toml, ray_namespace=ns)  # waits for the dead one's claim
    try:
        state = m.state()
        assert state["devices"][2]["resident_groups"] == ["tiny"] and state["devices"][0]["resident_groups"] == ["gpt"]
        assert {g["id"]: g["pinned"] for g in state["groups"] if g["resident_on"]} == {"tiny": False, "gpt": True}
        with pytest.raises(GpuGroupsError) as e:
            gg.Manager(devices=SPEC, catalog=tiny_catalog_toml, ray_namespace=ns)  # this process's own: at once
        assert e.value.code == "conflict" and e.value.details["holder"]["pid"] == os.getpid()
        assert m.process("tiny-a", "the cat", 2)["predictions"]  # the refused one touched nothing
    finally:
        m.close()
    assert wait_for(lambda: actors_in(ns) == [], 10)
    gg.Manager(devices=SPEC, catalog=[], ray_namespace=ns).close()  # a closed manager's namespace is free
    ray_devices(SPEC, ns)  # devices no manager was made for, dropped: their claim goes with them
    gg.Manager(devices=SPEC, catalog=[], ray_namespace=ns).close()


def test_a_refused_manager_starts_no_actor(ray_cluster: RayCluster) -> None:
    """Options are checked before any device actor is made: a refused manager holds no GPU."""
    ns = namespace()
    bads: list[dict[str, Any]] = [
        {"devices": [SPEC, "bogus"]}, {"devices": SPEC, "worker": "fiber"}, {"devices": [SPEC, SPEC]},
        {"devices": [SPEC, "ray:virtual:256MiB"]},  # one Ray spec: each takes every GPU of the cluster
    ]
    for bad in bads:
        with pytest.raises(GpuGroupsError) as e:
            gg.Manager(catalog=[], ray_namespace=ns, **bad)
        assert e.value.code == "invalid_request", bad
    assert actors_in(ns) == []

    def failing(device: Any) -> Any:
        raise RuntimeError("no worker today")

    with pytest.raises(RuntimeError) as kept:  # after the namespace was claimed, before a Ray worker held it
        gg.Manager(devices=["virtual:512MiB", SPEC], catalog=[], ray_namespace=ns, worker=failing)
    # its traceback still alive (as IPython keeps the last one): the namespace is free all the same
    gg.Manager(devices=SPEC, catalog=[], ray_namespace=ns).close()
    assert kept.traceback and wait_for(lambda: actors_in(ns) == [], 10)


def test_a_manager_refused_at_start_leaves_no_actor_to_take_the_gpus_later(
    ray_cluster: RayCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Actors that could not start in time (another namespace's manager holds every GPU) or at all
    (``ray``, the GPUs themselves, where the nodes have none to show) are killed as the manager is
    refused: queued, they took the GPUs once the holder closed, with no manager to drive them."""
    from gpugroups.engine import rayworker

    holder, late = namespace(), namespace()
    first = gg.Manager(devices=SPEC, catalog=[], ray_namespace=holder)
    try:
        monkeypatch.setattr(rayworker, "READY_S", 3.0)
        with pytest.raises(GpuGroupsError) as refused:
            gg.Manager(devices=SPEC, catalog=[], ray_namespace=late)
        assert refused.value.code == "host_unavailable" and "did not start" in refused.value.message
        assert wait_for(lambda: actors_in(late) == [], 10)
    finally:
        first.close()
        monkeypatch.undo()
    gg.Manager(devices=SPEC, catalog=[], ray_namespace=holder).close()  # the GPUs are free to take again
    with pytest.raises(GpuGroupsError) as none:  # simulated GPUs: no CUDA device in the actors
        gg.Manager(devices="ray", catalog=[], ray_namespace=late)
    assert none.value.code == "host_unavailable" and "no Ray device actor started" in none.value.message
    assert wait_for(lambda: actors_in(late) == [], 10)


def test_actors_without_a_manager_unload_and_exit_after_the_idle_time(ray_cluster: RayCluster, tiny_catalog_toml: Path) -> None:
    ns = namespace()
    out = in_subprocess(ray_cluster, tiny_catalog_toml, ns, 'print(m.load_group("gpt")["status"])', idle_s=5)
    assert "loaded" in out  # the actors existed and held a group when their manager died
    assert wait_for(lambda: actors_in(ns) == [], 30)


def test_a_lost_node_fails_its_requests_and_its_groups_reload_elsewhere(ray_cluster: RayCluster, tiny_catalog_toml: Path) -> None:
    second = ray_cluster.add_node()  # the shared nodes stay for the tests after this one
    ns = namespace()
    m = gg.Manager(devices=SPEC, catalog=tiny_catalog_toml, ray_namespace=ns)
    try:
        lost = [d["device_id"] for d in m.state()["devices"] if d["node"] == second.node_id]
        kept = [d["device_id"] for d in m.state()["devices"] if d["node"] != second.node_id]
        m.load("tiny-a", device_id=lost[0])
        m.load_group("gpt", device_id=kept[0])
        errors: list[BaseException] = []

        def hammer() -> None:
            try:
                while True:
                    m.process("tiny-a", "keep going", 2)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=hammer, daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        ray_cluster.cluster.remove_node(second, allow_graceful=False)
        assert wait_for(lambda: all(m.state()["devices"][i]["status"] == "lost" for i in lost), 10)
        for t in threads:
            t.join(30)
        assert len(errors) == len(threads)  # nothing hangs
        for e in errors:
            assert isinstance(e, GpuGroupsError) and e.code == "host_unavailable", repr(e)
            assert second.node_id[:8] in e.message and e.details["node"] == second.node_id
        state = m.state()
        assert all(state["devices"][i]["resident_groups"] == [] for i in lost)
        assert m.process("tiny-gpt2", "still here", 2)["device_id"] == kept[0]  # the rest kept answering
        assert m.load("tiny-a")["device_id"] in kept  # reloads on a surviving device
        assert m.process("tiny-a", "again", 2)["predictions"]
        with pytest.raises(GpuGroupsError) as refused:  # its claim on the namespace is on its own node
            gg.Manager(devices=SPEC, catalog=[], ray_namespace=ns)
        assert refused.value.code == "conflict"
    finally:
        m.close()
