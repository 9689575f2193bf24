"""Scenarios end to end through a real ``jupyter server`` process, real host kernels and tiny real
models: the host policy, the connection, the handlers and the kernel side together.

One server for the module (``live``): its first host kernel is started by the extension itself,
later tests make other kernels the host (``gg.serve()`` in a cell, ``POST /system/host``) and kill
one in the middle of a load. ``gg.Client`` is the HTTP and WebSocket client throughout.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gpugroups import Client, GpuGroupsError

from .conftest import HEAVY, LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

# A killed kernel stays dead here, so the host that dies mid-load is certainly replaced by a new
# one; otherwise Jupyter's restarter may restart it first, and a restarted host stays the host
# (that path: ``test_shared_server.py``'s restart mid-request). The collector setting is checked
# at the end.
LIVE_ARGS = ["--KernelManager.autorestart=False", "--GpuGroupsApp.full_gc_every=250"]


class Events:
    """Collects a client's WebSocket messages on a thread, with their arrival times."""

    def __init__(self, client: Client) -> None:
        self.stream = client.events(timeout=0.5)
        self.messages: list[tuple[float, dict[str, Any]]] = []
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                message = next(self.stream)
            except TimeoutError:
                continue
            except StopIteration:
                return
            with self._cond:
                self.messages.append((time.monotonic(), message))
                self._cond.notify_all()

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = 60, after: float = 0
    ) -> tuple[float, dict[str, Any]]:
        """The first message (arrived after ``after``) that satisfies ``pred``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, m in self.messages:
                    if t >= after and pred(m):
                        return t, m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no such event in {timeout} s; got {[m['type'] for _, m in self.messages]}"
                    )
                self._cond.wait(left)

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.stream.close()


@pytest.fixture
def events(live: LiveServer) -> Iterator[Events]:
    ev = Events(live.client())
    yield ev
    ev.close()


def resident(state: dict[str, Any], group_id: str) -> bool:
    return any(g["id"] == group_id and g["resident_on"] for g in state["groups"])


def host_kernel(live: LiveServer) -> Any:
    kernel_id = live.client().host()["kernel_id"]
    return live.kernel(kernel_id)


def test_auto_started_host_and_the_same_state_everywhere(live: LiveServer, events: Events) -> None:
    client = live.client()
    assert client.host() == {"kernel_id": None, "subshells": None, "started_by": None}
    # the socket said so too; its first answer came once the host was up
    state = client.state()
    host = client.host()
    assert host["started_by"] == "server" and host["subshells"] is True
    assert host["kernel_id"] in live.kernel_ids()  # a kernel like any other: a console can attach
    events.wait_for(lambda m: m["type"] == "system_state")

    # REST -> the kernel's own manager
    result = client.load("tiny-a")
    assert result["status"] == "loaded" and result["group_id"] == "tiny"
    kernel = host_kernel(live)
    try:
        in_kernel = kernel.run("import gpugroups as gg; out = gg.manager().state()")
        assert resident(in_kernel, "tiny") and in_kernel["version"] >= state["version"]
        # a cell -> REST and the socket
        kernel.run("gg.manager().load('tiny-gpt2')")
        assert resident(client.state(), "gpt")
        events.wait_for(lambda m: m["type"] == "state_update" and resident(m["state"], "gpt"))
    finally:
        kernel.close()
    events.wait_for(lambda m: m["type"] == "load_progress" and m["group_id"] == "tiny")

    # versions only go up between system_state messages, and get_state answers with one
    versions = [m["version"] for _, m in events.messages if m["type"] in ("state_update", "load_progress")]
    assert versions == sorted(versions)
    asked = time.monotonic()
    events.stream.get_state()
    _, fresh = events.wait_for(lambda m: m["type"] == "system_state", after=asked)
    assert fresh["version"] == client.state()["version"]


def test_predictions_and_errors_through_the_client(live: LiveServer) -> None:
    client = live.client()
    out = client.process("tiny-b", "def main(", num_predictions=4)
    assert out["model_id"] == "tiny-b" and len(out["predictions"]) == 4
    probabilities = [p["probability"] for p in out["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)
    for call, code in (
        (lambda: client.load("no-such-model"), "unknown_model"),
        (lambda: client.load_group("no-such-group"), "unknown_group"),
        (lambda: client.load("tiny-a", device_id=7), "unknown_device"),
        (lambda: client.process("tiny-a", "x", num_predictions=0), "invalid_request"),
        (lambda: client.clear_device(9), "unknown_device"),
    ):
        with pytest.raises(GpuGroupsError) as exc:
            call()
        assert exc.value.code == code, exc.value


def test_remote_code_groups_are_refused_over_rest(live: LiveServer, tiny_llama: Any) -> None:
    kernel = host_kernel(live)
    try:
        kernel.run(
            "import gpugroups as gg\n"
            "gg.manager().catalog.register_group("
            f"'rc', models={{'rc-model': {str(tiny_llama)!r}}}, trust_remote_code=True)"
        )
    finally:
        kernel.close()
    with pytest.raises(GpuGroupsError) as exc:
        live.client().load("rc-model")
    assert exc.value.code == "invalid_request" and "trust_remote_code" in exc.value.message
    assert not resident(live.client().state(), "rc")


def test_answers_while_a_cell_runs_in_the_host(live: LiveServer, events: Events) -> None:
    client = live.client()
    client.state()
    kernel = host_kernel(live)
    try:
        kernel.run("import time")
        started = time.monotonic()
        kernel.start("time.sleep(10)")
        time.sleep(0.5)
        t0 = time.monotonic()
        client.state()
        assert time.monotonic() - t0 < 1.0
        client.unload_group("gpt")
        arrived, _ = events.wait_for(
            lambda m: m["type"] == "state_update" and not resident(m["state"], "gpt"), after=t0
        )
        assert arrived - started < 5, "the update waited for the cell"
        assert kernel.kc.get_shell_msg(timeout=20)["content"]["status"] == "ok"  # the cell itself went on
    finally:
        kernel.close()


def test_a_client_that_hangs_up_mid_request_costs_nobody_else(live: LiveServer) -> None:
    client = live.client()
    client.unload_group("gpt")
    body = b'{"model_id": "tiny-gpt2"}'
    with socket.create_connection(("127.0.0.1", live.port)) as s:
        s.sendall(
            b"POST /api/v2/models/load HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Authorization: token {live.token}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
    # the load goes on without its caller, and everybody else is served meanwhile
    deadline = time.monotonic() + 60
    while not resident(client.state(), "gpt"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert client.process("tiny-gpt2", "import")["predictions"]


def test_a_notebook_becomes_the_host_with_gg_serve(
    live: LiveServer, events: Events, tiny_catalog_toml: Any
) -> None:
    client = live.client()
    before = client.host()
    kernel_id = live.start_kernel()
    kernel = live.kernel(kernel_id)
    try:
        asked = time.monotonic()
        kernel.run(
            "import gpugroups as gg\n"
            f"m = gg.Manager(devices='virtual:2x512MiB', catalog={str(tiny_catalog_toml)!r})\n"
            "gg.serve(m)"
        )
        _, announced = events.wait_for(
            lambda m: m["type"] == "system_state" and m.get("host", {}).get("kernel_id") == kernel_id,
            timeout=10,
            after=asked,
        )
        assert announced["state"]["num_devices"] == 2
        assert client.host() == {"kernel_id": kernel_id, "subshells": True, "started_by": "serve"}
        assert client.state()["num_devices"] == 2
        client.load("tiny-b", device_id=1)
        assert kernel.run("out = m.state()")["devices"][1]["resident_groups"] == ["tiny"]
        # the host serves another manager, whose versions start again: clients start from its whole state
        asked = time.monotonic()
        kernel.run(f"m2 = gg.Manager(devices='cpu', catalog={str(tiny_catalog_toml)!r})\ngg.serve(m2)")
        _, whole = events.wait_for(
            lambda m: m["type"] == "system_state" and m["state"]["num_devices"] == 1, timeout=10, after=asked
        )
        assert "host" not in whole and client.state()["num_devices"] == 1  # not the old manager's, mirrored
        client.load("tiny-gpt2")
        _, update = events.wait_for(
            lambda m: m["type"] == "state_update" and resident(m["state"], "gpt"), timeout=60, after=asked
        )
        assert update["version"] > whole["version"] and update["state"]["num_devices"] == 1
        if before["started_by"] == "server":  # exactly one host: the one the extension started is gone
            deadline = time.monotonic() + 10
            while before["kernel_id"] in live.kernel_ids():
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        kernel.close()


def test_a_kernel_that_stops_being_the_host_is_left_tidy(live: LiveServer) -> None:
    client = live.client()
    old_id = live.start_kernel()
    old = live.kernel(old_id)
    try:
        old.run("import gpugroups as gg\nm = gg.Manager(devices='cpu', catalog=[])\nh = gg.serve(m)")
        deadline = time.monotonic() + 10
        while client.host()["kernel_id"] != old_id:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert old.run("out = h.connected") == 1
        client.set_host(live.start_kernel())
        # the old host keeps its manager but no bridge: comm closed, subshell gone
        assert old.run("out = h.connected") == 0
        old.kc.control_channel.send(old.kc.session.msg("list_subshell_request", {}))
        assert old.kc.control_channel.get_msg(timeout=10)["content"]["subshell_id"] == []
    finally:
        old.close()


def test_a_kernel_that_cannot_serve_is_refused_and_left_tidy(live: LiveServer, tmp_path: Any) -> None:
    """``POST /system/host`` for a notebook whose manager cannot start (a broken catalog): 409, the
    host is unchanged, and the notebook keeps no subshell of ours."""
    client = live.client()
    before = client.host()
    kernel_id = live.start_kernel()
    kernel = live.kernel(kernel_id)
    broken = tmp_path / "broken.toml"
    broken.write_text('[groups.x]\nkind = "no-such-kind"\n')
    try:
        kernel.run(f"import os; os.environ['GPUGROUPS_CATALOG'] = {str(broken)!r}")
        with pytest.raises(GpuGroupsError) as refused:
            client.set_host(kernel_id)
        assert refused.value.code == "conflict" and "broken.toml" in refused.value.message
        assert client.host() == before
        kernel.kc.control_channel.send(kernel.kc.session.msg("list_subshell_request", {}))
        assert kernel.kc.control_channel.get_msg(timeout=10)["content"]["subshell_id"] == []
    finally:
        kernel.close()


def test_host_killed_mid_load_answers_503_then_a_new_host_serves(live: LiveServer, events: Events) -> None:
    client = live.client()
    kernel_id = live.start_kernel()
    kernel = live.kernel(kernel_id)
    pid = kernel.run("import os; out = os.getpid()")
    kernel.close()
    assert client.set_host(kernel_id) == {"kernel_id": kernel_id, "subshells": True, "started_by": "api"}

    answer: dict[str, Any] = {}

    def load() -> None:
        try:
            answer["result"] = client.load("tiny-a")
        except GpuGroupsError as exc:
            answer["error"] = exc
        answer["at"] = time.monotonic()

    caller = threading.Thread(target=load)
    caller.start()
    # the host's first load imports torch and transformers: seconds during which the load is in flight
    events.wait_for(
        lambda m: (
            m["type"] == "state_update" and any(op["group_id"] == "tiny" for op in m["state"]["operations"])
        )
    )
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    caller.join(10)
    assert "error" in answer, answer
    assert answer["error"].code == "host_unavailable"
    assert answer["at"] - killed < 2.0
    events.wait_for(lambda m: m["type"] == "error" and m["error"]["code"] == "host_unavailable", timeout=5)

    # host_kernel = "auto": the next request brings a new host up, without restarting the server
    assert not resident(client.state(), "tiny")  # a fresh manager: the killed host's load died with it
    assert client.host()["started_by"] == "server" and client.host()["kernel_id"] != kernel_id


def test_the_server_process_never_imported_torch_nor_the_kernel_side(live: LiveServer) -> None:
    live.client().state()  # at least one round trip, even when run alone
    modules = live.modules()
    assert "gpugroups.server.host" in modules  # the dump is of the right process
    assert [m for m in modules if m.split(".")[0] in HEAVY] == []
    assert "gpugroups.kernel" not in modules  # the server reads the host record from hostrecord.py


def test_the_server_runs_full_collections_as_rarely_as_configured(live: LiveServer) -> None:
    young, middle, full = live.gc_threshold()
    assert full == 250  # raised from Python's 10 by the extension, to the configured value
    assert (young, middle) == (700, 10)  # the young generations keep Python's defaults
