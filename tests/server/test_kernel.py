"""The host kernel's side of the bridge, spoken to directly: this test plays the server.

A real kernel runs ``gg.serve(m)``; the test opens the ``gpugroups.v2`` comm on a subshell with a
plain ``jupyter_client`` client and checks the wire contract: every request gets exactly one
reply, malformed ones included; everything the kernel sends on the comm is parented to the
``comm_open`` (not to a running cell); requests are answered while the main shell is busy; bridge
messages fire no IPython execute events (the ``_ipykernel`` workarounds, seen from outside).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from jupyter_client import KernelManager

from gpugroups.protocol import BRIDGE_PROTOCOL, COMM_TARGET

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def frontend(km: KernelManager) -> Any:
    """A client with a session of its own: a ``Bridge`` takes over the shared one's socket identity."""
    session = km.session.clone()
    session.session = uuid.uuid4().hex
    kc = km.client(session=session)
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return kc


class Bridge:
    """A minimal server side: one comm on one subshell, replies read off IOPub. Like the real
    bridge it has a session id of its own (the kernel hands a shared socket identity over)."""

    def __init__(self, km: KernelManager) -> None:
        self.kc = kc = frontend(km)
        kc.control_channel.send(kc.session.msg("create_subshell_request", {}))
        self.subshell_id = kc.control_channel.get_msg(timeout=10)["content"]["subshell_id"]
        self.comm_id = uuid.uuid4().hex
        self.open_msg = self.send(
            "comm_open",
            {"comm_id": self.comm_id, "target_name": COMM_TARGET, "data": {"protocol": BRIDGE_PROTOCOL}},
        )
        self.seen: list[dict[str, Any]] = []  # every message on our comm, whole

    def send(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any]:
        msg = self.kc.session.msg(msg_type, content)
        msg["header"]["subshell_id"] = self.subshell_id
        self.kc.shell_channel.send(msg)
        return msg

    def request(self, data: Any) -> None:
        self.send("comm_msg", {"comm_id": self.comm_id, "data": data})

    def items(self, timeout: float = 10) -> Iterator[dict[str, Any]]:
        """What the kernel sends on our comm, batches unpacked, until ``timeout`` passes quietly."""
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=timeout)
            except Exception:
                return
            if msg["msg_type"] == "comm_msg" and msg["content"]["comm_id"] == self.comm_id:
                self.seen.append(msg)
                data = msg["content"]["data"]
                yield from data.get("batch", [data])

    def reply(self, rid: str, timeout: float = 10) -> dict[str, Any]:
        for item in self.items(timeout):
            if item.get("id") == rid:
                return item
        raise AssertionError(f"no reply to {rid}")


@pytest.fixture(scope="module")
def kernel() -> Iterator[tuple[KernelManager, Any]]:
    km = KernelManager()
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    reply = kc.execute_interactive(
        "import gpugroups as gg\nm = gg.Manager(devices='virtual:2x512MiB', catalog=[])\nhost = gg.serve(m)",
        timeout=60,
        output_hook=lambda msg: None,
    )
    assert reply["content"]["status"] == "ok", reply["content"]
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def test_hello_then_one_reply_per_request_whatever_it_holds(kernel: tuple[KernelManager, Any]) -> None:
    bridge = Bridge(kernel[0])
    hello = next(bridge.items())
    assert hello["type"] == "hello" and hello["protocol"] == BRIDGE_PROTOCOL
    assert hello["subshell_id"] == bridge.subshell_id

    bridge.request({"id": "ok", "op": "state", "args": {}})
    state = bridge.reply("ok")
    assert state["ok"] is True and state["result"]["num_devices"] == 2
    for rid, data, code in (
        ("unknown-op", {"op": "format_disk", "args": {}}, "invalid_request"),
        ("op-not-a-string", {"op": ["state"]}, "invalid_request"),
        ("args-not-a-dict", {"op": "state", "args": [1]}, "invalid_request"),
        ("unknown-field", {"op": "load", "args": {"model_id": "x", "force": True}}, "invalid_request"),
        ("unknown-model", {"op": "load", "args": {"model_id": "no-such-model"}}, "unknown_model"),
        ("unknown-device", {"op": "clear_device", "args": {"device_id": 5}}, "unknown_device"),
    ):
        bridge.request({"id": rid, **data})
        reply = bridge.reply(rid)
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
    bridge.request("not a request")  # nobody to answer: silently dropped, the comm stays usable
    bridge.request({"id": "still-there", "op": "groups"})
    assert bridge.reply("still-there") == {"id": "still-there", "ok": True, "result": []}
    bridge.kc.stop_channels()


def test_a_busy_cell_neither_delays_nor_adopts_the_bridge_traffic(kernel: tuple[KernelManager, Any]) -> None:
    km, _ = kernel
    bridge = Bridge(km)
    next(bridge.items())
    notebook = km.client()  # a second frontend, like a notebook's, runs a long cell that changes the manager
    notebook.start_channels()
    cell = notebook.execute(
        "import time\n"
        "m.register_group('during-cell', models={'dc-model': '/nowhere/dc-model'})\n"
        "time.sleep(3)"
    )
    started = time.monotonic()
    # the change is pushed from the manager's event thread while the cell still runs
    next(
        i
        for i in bridge.items()
        if i.get("type") == "state_update" and any(g["id"] == "during-cell" for g in i["state"]["groups"])
    )
    bridge.request({"id": "while-busy", "op": "state"})
    assert bridge.reply("while-busy")["ok"] is True
    assert time.monotonic() - started < 2.0
    assert not notebook.shell_channel.msg_ready()  # the cell is still running
    assert notebook.get_shell_msg(timeout=10)["parent_header"]["msg_id"] == cell
    # nothing on the bridge's comm was parented to the cell (other frontends would file it there)
    parents = {msg["parent_header"]["msg_id"] for msg in bridge.seen}
    assert parents == {bridge.open_msg["header"]["msg_id"]}
    notebook.stop_channels()
    bridge.kc.stop_channels()


def test_bridge_messages_fire_no_ipython_execute_events(kernel: tuple[KernelManager, Any]) -> None:
    km, _ = kernel
    kc = frontend(km)

    def run(code: str) -> Any:
        reply = kc.execute_interactive(
            code, user_expressions={"out": "out"}, timeout=60, output_hook=lambda msg: None
        )
        assert reply["content"]["status"] == "ok", reply["content"]
        return reply["content"]["user_expressions"].get("out", {}).get("data", {}).get("text/plain")

    run("fired = []\nget_ipython().events.register('pre_execute', lambda: fired.append(1))\nout = 0")
    bridge = Bridge(km)
    next(bridge.items())
    for i in range(3):
        bridge.request({"id": f"quiet-{i}", "op": "state"})
        assert bridge.reply(f"quiet-{i}")["ok"] is True
    # only the cell that reads the count fired pre_execute (ipykernel's Comm.handle_msg would add 3)
    assert run("out = len(fired)") == "1"
    bridge.kc.stop_channels()
    kc.stop_channels()


def test_a_closed_manager_is_still_served_and_says_so(kernel: tuple[KernelManager, Any]) -> None:
    """A bridge that attaches after the served manager was closed gets its hello, a state that
    says ``closed`` and ops answered "the manager is closed" (no events are left to follow)."""
    km, kc = kernel[0], frontend(kernel[0])
    run = (
        "from gpugroups.localfiles import DEMO_DIR\n"
        "m2 = gg.Manager(devices='cpu', catalog=str(DEMO_DIR / 'gpugroups.toml'))\ngg.serve(m2); m2.close()"
    )
    assert kc.execute_interactive(run, timeout=60, output_hook=lambda msg: None)["content"]["status"] == "ok"
    try:
        bridge = Bridge(km)
        assert next(bridge.items())["type"] == "hello"
        bridge.request({"id": "s", "op": "state", "args": {}})
        assert bridge.reply("s")["result"]["closed"] is True
        for op, args in (("pin", {"group_id": "tinygpt2"}), ("load", {"model_id": "tinygpt2"})):
            bridge.request({"id": op, "op": op, "args": args})
            assert bridge.reply(op)["error"] == {"code": "invalid_request", "message": "the manager is closed"}
        bridge.kc.stop_channels()
    finally:
        kc.execute_interactive("gg.serve(m)", timeout=60, output_hook=lambda msg: None)
        kc.stop_channels()
