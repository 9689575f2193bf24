"""The panel's kernel side with a real Manager and real tiny models, driven like a front end would.

The widget's comm is a ``comm.BaseComm`` that records what the kernel publishes (as JSON, the
way the kernel's session would serialize it); front-end messages enter through
``comm.handle_msg``, the path ipykernel's comm manager takes. Everything behind the comm
(ipywidgets, anywidget, the manager, the models) is the real thing.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import comm
import pytest
from comm.base_comm import BaseComm

import gpugroups as gg
from gpugroups.widgets import Panel
from gpugroups.widgets.panel import CSS_PARTS, FRONT_DIR, JS_PARTS, _Relay
from tests.waiting import wait_for

PROMPT = "def __init__(self"


class FrontEnd(BaseComm):
    """The front end's end of the widget comm: records what the kernel publishes, in order."""

    def __init__(self, **kwargs: Any) -> None:
        self.published: list[tuple[str, dict[str, Any], str]] = []
        self.lock = threading.Lock()
        super().__init__(**kwargs)

    def publish_msg(
        self, msg_type: str, data: Any = None, metadata: Any = None, buffers: Any = None, **keys: Any
    ) -> None:
        with self.lock:
            self.published.append(
                (msg_type, json.loads(json.dumps(data or {})), threading.current_thread().name)
            )

    def act(self, **content: Any) -> None:
        """Send a custom message from the browser side, as ipykernel would deliver it."""
        self.handle_msg(
            {
                "content": {"comm_id": self.comm_id, "data": {"method": "custom", "content": content}},
                "buffers": [],
            }
        )

    def messages(self) -> list[tuple[str, dict[str, Any], str]]:
        with self.lock:
            return list(self.published)

    def replies(self) -> list[dict[str, Any]]:
        return [
            d["content"] for t, d, _ in self.messages() if t == "comm_msg" and d.get("method") == "custom"
        ]

    def reply(self, request_id: Any, timeout: float = 30.0) -> dict[str, Any]:
        assert wait_for(lambda: any(r.get("request_id") == request_id for r in self.replies()), timeout), (
            f"no reply to {request_id!r}; got {self.replies()}"
        )
        return next(r for r in self.replies() if r.get("request_id") == request_id)

    def seen_state(self) -> dict[str, Any]:
        """The ``state`` the browser holds now: the open message, then every update in order."""
        state: dict[str, Any] = {}
        for msg_type, data, _ in self.messages():
            if msg_type == "comm_open":
                state = data["state"].get("state", state)
            elif data.get("method") == "update" and "state" in data["state"]:
                state = data["state"]["state"]
        return state



@pytest.fixture(scope="module")
def manager(tiny_catalog_toml: Path):
    m = gg.Manager(devices="virtual:2x512MiB", catalog=tiny_catalog_toml)
    yield m
    m.close()


@pytest.fixture
def m(manager):
    """The module's manager, emptied before each test."""
    for g in manager.groups():
        if g["pinned"]:
            manager.unpin(g["id"])
        if g["resident_on"]:
            manager.unload_group(g["id"])
    return manager


@pytest.fixture
def front_ends(monkeypatch):
    """Every widget made in the test gets a recording ``FrontEnd`` as its comm."""
    monkeypatch.setattr(comm, "create_comm", FrontEnd)


@pytest.fixture
def wired(m, front_ends):
    """A panel on ``m`` and the front end of its comm."""
    panel = Panel(m)
    yield panel, panel.comm
    panel.close()


def test_panel_opens_with_the_manager_state(wired, m):
    panel, fe = wired
    assert panel.state == m.state()
    assert fe.seen_state()["version"] == m.state()["version"]
    assert {g["id"] for g in fe.seen_state()["groups"]} == {"tiny", "gpt"}


def test_load_action_reaches_the_manager_and_state_precedes_the_reply(wired, m):
    _, fe = wired
    fe.act(action="load", request_id="r1", model_id="tiny-a")
    reply = fe.reply("r1")
    assert reply["reply_to"] == "load" and reply["ok"] is True
    assert reply["result"]["status"] == "loaded" and reply["result"]["group_id"] == "tiny"
    assert m.state()["groups"][0]["resident_on"] == [reply["result"]["device_id"]]
    # The browser already holds the state that the load produced when the reply lands.
    tiny = next(g for g in fe.seen_state()["groups"] if g["id"] == "tiny")
    assert tiny["resident_on"] and tiny["current_model"] == "tiny-a"


def test_actions_run_off_the_comm_thread(wired):
    _, fe = wired
    caller = threading.current_thread().name
    fe.act(action="load_group", request_id="g", group_id="gpt")
    fe.reply("g")
    reply_threads = {name for t, d, name in fe.messages() if d.get("method") == "custom"}
    assert reply_threads and caller not in reply_threads


def test_front_end_messages_are_routed_where_they_were_sent(wired):
    # ipykernel asks the comm where an incoming message goes (default: where the comm last sent
    # from, here the panel's background threads, i.e. the main shell). The panel answers with the
    # subshell the front end addressed, so clicks do not wait for a running cell.
    panel, fe = wired
    fe.act(action="state", request_id="s")
    fe.reply("s")  # the panel has sent from its threads
    assert fe._reply_subshell_for({"method": "custom"}, "subshell-of-the-front-end") == "subshell-of-the-front-end"
    assert fe._reply_subshell_for({"method": "custom"}, None) is None


def test_switching_member_is_shown_and_process_matches_python(wired, m):
    _, fe = wired
    fe.act(action="load", request_id=1, model_id="tiny-a")
    fe.reply(1)
    fe.act(action="load", request_id=2, model_id="tiny-b")
    switched = fe.reply(2)
    assert switched["ok"] and switched["result"]["status"] == "switched"
    assert wait_for(
        lambda: next(g for g in fe.seen_state()["groups"] if g["id"] == "tiny")["current_model"] == "tiny-b"
    )

    fe.act(action="process", request_id=3, model_id="tiny-b", prompt=PROMPT, num_predictions=4)
    got = fe.reply(3)
    assert got["ok"], got
    direct = m.process("tiny-b", PROMPT, num_predictions=4)
    assert [p["token_id"] for p in got["result"]["predictions"]] == [
        p["token_id"] for p in direct["predictions"]
    ]
    assert [p["token"] for p in got["result"]["predictions"]] == [p["token"] for p in direct["predictions"]]
    assert len(got["result"]["predictions"]) == 4


@pytest.mark.parametrize(
    ("content", "code"),
    [
        ({"action": "load", "model_id": "no-such-model"}, "unknown_model"),
        ({"action": "load_group", "group_id": "no-such-group"}, "unknown_group"),
        ({"action": "clear_device", "device_id": 7}, "unknown_device"),
        (
            {"action": "process", "model_id": "tiny-a", "prompt": "x", "num_predictions": "3"},
            "invalid_request",
        ),
        ({"action": "load", "model_id": "tiny-a", "colour": "red"}, "invalid_request"),
        ({"action": "format_disk"}, "invalid_request"),
        ({}, "invalid_request"),
    ],
)
def test_errors_come_back_as_replies_with_their_code(wired, content, code, capsys):
    _, fe = wired
    fe.act(request_id="bad", **content)
    reply = fe.reply("bad")
    assert reply["ok"] is False and reply["error"]["code"] == code
    assert reply["error"]["message"]
    assert reply["reply_to"] == content.get("action")
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err


def test_a_message_that_is_not_an_object_is_answered_too(wired):
    _, fe = wired
    fe.handle_msg({"content": {"data": {"method": "custom", "content": ["load", "tiny-a"]}}, "buffers": []})
    assert wait_for(lambda: fe.replies())
    assert fe.replies()[0]["ok"] is False and fe.replies()[0]["error"]["code"] == "invalid_request"


def test_changes_from_python_reach_the_state_trait(wired, m):
    panel, fe = wired
    before = panel.state["version"]
    m.load_group("gpt", device_id=1)
    assert wait_for(lambda: 1 in next(g for g in panel.state["groups"] if g["id"] == "gpt")["resident_on"])
    assert panel.state["version"] > before
    assert wait_for(lambda: fe.seen_state() == panel.state)
    m.pin("gpt")
    assert wait_for(lambda: next(g for g in fe.seen_state()["groups"] if g["id"] == "gpt")["pinned"])


def test_loading_a_member_from_python_shows_it_current(wired, m):
    panel, _ = wired
    before = next(g for g in m.state()["groups"] if g["id"] == "tiny")["current_model"]
    member = "tiny-b" if before == "tiny-a" else "tiny-a"
    m.load(member)
    assert wait_for(
        lambda: next(g for g in panel.state["groups"] if g["id"] == "tiny")["current_model"] == member, 3
    )


def test_two_panels_see_each_others_actions(wired, m):
    _, fe = wired
    other = Panel(m)
    try:
        other.comm.act(action="load", request_id="o", model_id="tiny-base")
        assert other.comm.reply("o")["ok"]
        assert wait_for(
            lambda: next(g for g in fe.seen_state()["groups"] if g["id"] == "tiny")["resident_on"]
        )
    finally:
        other.close()


def test_close_detaches_from_the_manager(m, front_ends):
    def relays() -> int:
        return sum(t.name == "gpugroups-panel-relay" for t in threading.enumerate())

    before = {t.name for t in threading.enumerate()}
    relays_before = relays()
    panel = Panel(m)
    fe = panel.comm
    assert relays() == relays_before + 1
    panel.close()
    assert relays() == relays_before  # its relay thread ended (other tests' panels may live on)
    version = panel.state["version"]
    count = len(fe.messages())
    m.load_group("gpt")
    assert wait_for(lambda: m.state()["version"] > version)
    time.sleep(0.1)  # give a leaked subscription the chance to show itself
    assert panel.state["version"] == version
    assert len(fe.messages()) == count
    # tqdm_monitor: tqdm's own shared thread, started by any progress bar in the process
    assert {t.name for t in threading.enumerate()} - before <= {"gpugroups-events", "tqdm_monitor"}


def test_a_closed_managers_panel_says_so_and_refuses_calmly(tiny_catalog_toml, front_ends):
    """``m.close()`` ends with a last event: the panel's state says closed, with nothing loaded
    and every device idle, so the front end can turn its controls off (front/view.js: renderClosed)."""
    own = gg.Manager(devices="virtual:2x512MiB", catalog=tiny_catalog_toml)
    panel = Panel(own)
    fe = panel.comm
    try:
        own.load("tiny-a")
        assert wait_for(lambda: fe.seen_state().get("devices", [{}])[0].get("resident_groups") == ["tiny"])
        assert fe.seen_state()["closed"] is False
        own.close()
        assert wait_for(lambda: fe.seen_state().get("closed") is True)
        seen = fe.seen_state()
        assert all(d["resident_groups"] == [] and d["status"] == "idle" and d["queue_depth"] == 0
                   for d in seen["devices"])
        fe.act(action="load", request_id=1, model_id="tiny-a")
        reply = fe.reply(1)
        assert not reply["ok"] and "closed" in reply["error"]["message"]
    finally:
        panel.close()


def test_sidebar_outside_a_kernel_is_refused_and_leaves_nothing_behind(m, front_ends):
    """Plain Python has no side panel: ``gg.panel(sidebar=True)`` says so, and the half-made
    panel lets go of the manager (the side panel itself is browser-tested)."""
    def relays() -> int:
        return sum(t.name == "gpugroups-panel-relay" for t in threading.enumerate())

    relays_before = relays()
    with pytest.raises(gg.GpuGroupsError) as err:
        gg.panel(m, sidebar=True)
    assert err.value.code == "invalid_request" and "JupyterLab" in str(err.value)
    assert relays() == relays_before


def test_the_front_end_is_every_part_of_front_joined_in_order():
    """A file of ``front/`` left out of the lists would silently not reach the browser; the parts
    share one module, whose ``export default`` (what anywidget calls) is in the last part only."""
    assert sorted(JS_PARTS + CSS_PARTS) == sorted(p.name for p in FRONT_DIR.iterdir())
    for joined, parts in ((Panel._esm, JS_PARTS), (Panel._css, CSS_PARTS)):
        starts = [joined.index(f"/* {name} */\n{(FRONT_DIR / name).read_text()}") for name in parts]
        assert starts == sorted(starts)
    assert [name for name in JS_PARTS if "export default" in (FRONT_DIR / name).read_text()] == [JS_PARTS[-1]]


def test_relay_keeps_the_newest_state_and_drops_finished_progress():
    published: list[tuple[Any, dict[str, Any]]] = []
    relay = _Relay(lambda state, progress: published.append((state, progress)))
    try:
        op = {"id": "7", "op": "load", "group_id": "g", "device_id": 0, "progress": 0.0}
        relay.offer({"type": "state_update", "version": 3, "state": {"version": 3, "operations": [op]}})
        relay.offer({"type": "state_update", "version": 2, "state": {"version": 2, "operations": []}})
        relay.offer(
            {
                "type": "load_progress",
                "version": 4,
                "operation_id": "7",
                "group_id": "g",
                "device_id": 0,
                "progress": 0.5,
                "stage": "weights",
            }
        )
        relay.offer({"type": "something_else", "version": 9})
        relay.flush()
        state, progress = published[-1]
        assert state["version"] == 3
        assert progress["7"]["progress"] == 0.5 and progress["7"]["stage"] == "weights"

        relay.offer({"type": "state_update", "version": 5, "state": {"version": 5, "operations": []}})
        relay.flush()
        assert published[-1] == ({"version": 5, "operations": []}, {})
        relay.offer_snapshot({"version": 5, "operations": [], "read": "later"})
        relay.offer_snapshot({"version": 4, "operations": [], "read": "stale"})
        relay.flush()
        assert published[-1][0]["read"] == "later"
        count = len(published)
        relay.flush()  # nothing pending: nothing published
        assert len(published) == count
    finally:
        relay.stop()


def test_relay_thread_publishes_bursts_without_a_flush():
    published: list[Any] = []
    relay = _Relay(lambda state, progress: published.append(state["version"]))
    try:
        for v in range(1, 21):
            relay.offer({"type": "state_update", "version": v, "state": {"version": v, "operations": []}})
        assert wait_for(lambda: published and published[-1] == 20)
        assert published == sorted(published) and len(published) < 20
    finally:
        relay.stop()
