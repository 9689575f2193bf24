"""A device's queue: a lone request is taken at once; requests that arrive together are gathered
into one pass while callers on their way keep reaching the queue."""

from __future__ import annotations

from concurrent.futures import Future

from gpugroups.engine.calls import Request
from gpugroups.engine.turns import MAX_BATCH, Task, Turns


def _request(member: str = "m", new_tokens: int = 0) -> Task:
    return Task(Future(), group_id="g", request=Request(member, "x", 1, new_tokens))


def _any_rows(group_id: str, a: str, b: str) -> bool:
    return True


class Arrivals:
    """The yield ``Turns.take`` makes for callers on their way: during each, the next caller of
    ``waiting`` (if any) reaches the queue, as another thread would while the lock is handed over."""

    def __init__(self) -> None:
        self.turns = Turns(self.arrive)
        self.waiting: list[Task] = []
        self.yields = 0

    def arrive(self) -> None:
        self.yields += 1
        if self.waiting:
            self.turns.put(self.waiting.pop(0))


def test_a_lone_request_is_taken_without_a_yield():
    q = Arrivals()
    q.waiting = [_request()]  # would join if the queue yielded
    q.turns.put(first := _request())
    assert q.turns.take(_any_rows) == [first]
    assert q.yields == 0 and len(q.waiting) == 1


def test_requests_arriving_together_are_gathered_into_one_batch():
    q = Arrivals()
    queued = [_request() for _ in range(2)]
    q.waiting = [_request() for _ in range(5)]
    later = list(q.waiting)
    for t in queued:
        q.turns.put(t)
    batch = q.turns.take(_any_rows)
    assert batch == queued + later
    assert q.yields == len(later) + 1  # the last yield brought nobody: the batch is made


def test_gathering_stops_at_a_full_batch_and_never_for_a_request_that_runs_alone():
    q = Arrivals()
    for _ in range(MAX_BATCH):
        q.turns.put(_request())
    q.waiting = [_request()]
    assert len(q.turns.take(_any_rows)) == MAX_BATCH and q.yields == 0

    q = Arrivals()
    q.turns.put(generating := _request(new_tokens=4))
    q.turns.put(_request())
    q.waiting = [_request()]
    assert q.turns.take(_any_rows) == [generating] and q.yields == 0
