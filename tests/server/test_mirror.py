"""The server's state mirror: reads from events, never older than the client's own writes."""

from __future__ import annotations

from gpugroups.server.mirror import StateMirror


def state(version: int) -> dict:
    return {"version": version, "models": [version], "groups": [-version]}


def test_no_answer_until_the_kernel_was_read_then_events_keep_it_current():
    m = StateMirror()
    m.heard({"type": "state_update", "version": 3, "state": state(3)})
    assert m.answer("state") is None  # heard before any read: could predate the host
    m.read(state(4), m.ticket())
    assert m.answer("state")["version"] == 4
    m.heard({"type": "state_update", "version": 3, "state": state(3)})  # older: ignored
    m.heard({"type": "load_progress", "version": 5})
    assert m.answer("state")["version"] == 4
    m.heard({"type": "state_update", "version": 6, "state": state(6)})
    assert m.answer("models") == [6] and m.answer("groups") == [-6]
    assert m.answer("process") is None


def test_a_whole_state_of_another_manager_clears_the_mirror():
    m = StateMirror()
    m.read(state(9), m.ticket())
    ticket = m.ticket()  # a read on its way when the host starts serving another manager
    m.heard({"type": "system_state", "version": 0, "state": state(0)})
    assert m.answer("state") is None  # not the old manager's v9: the kernel answers
    m.read(state(9), ticket)  # the old read comes back: too old to keep
    assert m.answer("state") is None
    m.read(state(1), m.ticket())
    assert m.answer("state")["version"] == 1


def test_a_write_sends_reads_to_the_kernel_until_one_is_read_after_it():
    m = StateMirror()
    m.read(state(1), m.ticket())
    m.started()
    assert m.answer("state") is None
    early = m.ticket()
    m.heard({"type": "state_update", "version": 2, "state": state(2)})
    m.finished()
    m.heard({"type": "state_update", "version": 3, "state": state(3)})
    assert m.answer("state") is None
    m.read(state(3), early)  # sent before the write was answered: may miss its effects
    assert m.answer("state") is None
    m.read(state(4), m.ticket())
    assert m.answer("state")["version"] == 4


def test_stale_or_cleared_mirror_does_not_answer():
    m = StateMirror(max_age=0.0)
    m.read(state(1), m.ticket())
    assert m.answer("state") is None
    m = StateMirror()
    m.read(state(1), m.ticket())
    m.clear()
    assert m.answer("state") is None
