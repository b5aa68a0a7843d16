"""DynamicBatcher with a fake `process`: batching, limits, errors, deadlines, close.

The batcher is the unit under test, so `process` is a recording fake. No
sleeps are used for synchronisation: the first batch blocks on an Event until
the test has queued what it needs, which makes the batch composition exact.
"""

from __future__ import annotations

import threading

import pytest

from alignd.runtime.batching import BatchInfo, DynamicBatcher, per_request
from alignd.runtime.errors import DeadlineExceeded, ResourceExhausted, Unavailable

WAIT = 10.0  # upper bound for any Event wait; never reached when the code is right


class Gate:
    """A `process` that records every batch and holds the first one until `release`."""

    def __init__(self, fail_on: object = None) -> None:
        self.batches: list[list] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, requests):
        self.batches.append(list(requests))
        if len(self.batches) == 1:
            self.entered.set()
            if not self.release.wait(WAIT):
                raise TimeoutError("test never released the first batch")
        if self.fail_on is not None and self.fail_on in requests:
            raise ValueError(f"cannot process {self.fail_on!r}")
        return [f"done:{r}" for r in requests]


@pytest.fixture
def make_batcher():
    made: list[tuple[DynamicBatcher, Gate]] = []

    def make(gate: Gate | None = None, **kw) -> tuple[DynamicBatcher, Gate]:
        gate = gate or Gate()
        opts = dict(max_batch_size=8, max_wait_s=0.0, max_queue=64, name="test")
        opts.update(kw)
        b = DynamicBatcher(gate, **opts)
        made.append((b, gate))
        return b, gate

    yield make
    for b, gate in made:
        gate.release.set()
        b.close()
        assert not b._thread.is_alive(), "batcher thread still running after close()"


def block(b: DynamicBatcher, gate: Gate, request="blocker"):
    """Submits `request` and waits until the worker is inside process() with it."""
    p = b.submit(request, 1)
    assert gate.entered.wait(WAIT), "worker never started the first batch"
    return p


def result(pending):
    return pending.future.result(timeout=WAIT)


def test_requests_queued_during_a_batch_run_together_in_order(make_batcher):
    b, gate = make_batcher(max_batch_size=32)
    first = block(b, gate)
    queued = [b.submit(f"r{i}", 1) for i in range(5)]
    gate.release.set()
    assert result(first)[0] == "done:blocker"
    outs = [result(p) for p in queued]
    assert [r for r, _ in outs] == [f"done:r{i}" for i in range(5)]
    assert gate.batches == [["blocker"], ["r0", "r1", "r2", "r3", "r4"]]
    info = outs[0][1]
    assert isinstance(info, BatchInfo) and (info.size, info.requests) == (5, 5)
    assert all(i is info for _, i in outs)  # one batch, one info


def test_first_request_waits_for_company_until_the_batch_is_full(make_batcher):
    # A long max_wait: the batch is cut by size, not by time, so all three
    # requests run together however the threads interleave.
    gate = Gate()
    gate.release.set()
    b, _ = make_batcher(gate, max_batch_size=3, max_wait_s=60.0)
    ps = [b.submit(i, 1) for i in range(3)]
    assert [result(p)[0] for p in ps] == ["done:0", "done:1", "done:2"]
    assert gate.batches == [[0, 1, 2]]


def test_max_batch_size_counts_costs(make_batcher):
    b, gate = make_batcher(max_batch_size=8)
    first = block(b, gate)
    costs = {"a": 3, "b": 4, "c": 2, "d": 5, "e": 1, "f": 8, "g": 1}
    ps = {name: b.submit(name, c) for name, c in costs.items()}
    gate.release.set()
    result(first)
    infos = {name: result(p)[1] for name, p in ps.items()}
    # a+b=7 (c would make 9), c+d+e=8, f=8 alone, g.
    assert gate.batches == [["blocker"], ["a", "b"], ["c", "d", "e"], ["f"], ["g"]]
    for batch in gate.batches[1:]:
        assert sum(costs[n] for n in batch) <= 8
        assert infos[batch[0]].size == sum(costs[n] for n in batch)
        assert infos[batch[0]].requests == len(batch)


def test_request_larger_than_max_batch_runs_alone(make_batcher):
    b, gate = make_batcher(max_batch_size=4)
    first = block(b, gate)
    ps = [b.submit("small1", 1), b.submit("huge", 10), b.submit("small2", 1), b.submit("small3", 1)]
    gate.release.set()
    result(first)
    outs = [result(p) for p in ps]
    assert gate.batches == [["blocker"], ["small1"], ["huge"], ["small2", "small3"]]
    assert outs[1][0] == "done:huge"
    assert (outs[1][1].size, outs[1][1].requests) == (10, 1)


def test_cost_below_one_counts_as_one(make_batcher):
    b, gate = make_batcher(max_batch_size=2)
    first = block(b, gate)
    ps = [b.submit(n, 0) for n in ("x", "y", "z")]
    gate.release.set()
    result(first)
    [result(p) for p in ps]
    assert gate.batches == [["blocker"], ["x", "y"], ["z"]]


def test_bounded_queue_raises_resource_exhausted(make_batcher):
    depths: list[int] = []
    b, gate = make_batcher(max_queue=2, on_queue_depth=depths.append)
    first = block(b, gate)  # taken by the worker: no longer queued
    queued = [b.submit("q1", 1), b.submit("q2", 1)]
    with pytest.raises(ResourceExhausted) as info:
        b.submit("q3", 1)
    assert "queue is full" in info.value.message
    with pytest.raises(ResourceExhausted):
        b.run("q4", 1, timeout=WAIT)
    gate.release.set()
    result(first)
    assert [result(p)[0] for p in queued] == ["done:q1", "done:q2"]
    assert "q3" not in sum(gate.batches, []) and "q4" not in sum(gate.batches, [])
    assert 2 in depths  # the depth gauge saw the full queue
    # The queue drained: requests are accepted again.
    assert b.run("later", 1, timeout=WAIT)[0] == "done:later"


def test_a_failing_request_fails_alone_and_its_batch_neighbours_are_served(make_batcher):
    """One bad request in a batch: the batch runs again request by request, and only the bad one gets the error."""
    b, gate = make_batcher(Gate(fail_on="boom"))
    first = block(b, gate)
    ps = [b.submit("ok-before", 1), b.submit("boom", 1), b.submit("ok-after", 1)]
    gate.release.set()
    result(first)
    assert result(ps[0])[0] == "done:ok-before" and result(ps[2])[0] == "done:ok-after"
    with pytest.raises(ValueError, match="cannot process 'boom'"):
        result(ps[1])
    assert gate.batches[1:] == [["ok-before", "boom", "ok-after"], ["ok-before"], ["boom"], ["ok-after"]]
    assert result(ps[0])[1].requests == 1  # each was served on its own
    # Still serving.
    res, pending, info = b.run("next", 1, timeout=WAIT)
    assert res == "done:next" and pending.request == "next" and info.requests == 1


def test_a_request_failing_alone_gets_its_own_error(make_batcher):
    b, gate = make_batcher(Gate(fail_on="boom"))
    first = block(b, gate)
    p = b.submit("boom", 1)
    gate.release.set()
    result(first)
    with pytest.raises(ValueError, match="cannot process 'boom'"):
        result(p)
    assert gate.batches[1:] == [["boom"]]  # a lone request is not run twice


def test_wrong_number_of_results_is_caught_and_the_requests_rerun_alone(make_batcher):
    class OneResult(Gate):
        def __call__(self, requests):
            super().__call__(requests)
            return ["only one"]

    b, gate = make_batcher(OneResult())
    first = block(b, gate)
    ps = [b.submit("a", 1), b.submit("b", 1)]
    gate.release.set()
    assert result(first)[0] == "only one"  # one request, one result: fine
    assert [result(p)[0] for p in ps] == ["only one", "only one"]  # two requests, one result: run again alone
    assert gate.batches[1:] == [["a", "b"], ["a"], ["b"]]
    assert b.run("c", 1, timeout=WAIT)[0] == "only one"


def test_deadline_exceeded_and_cancelled_request_is_skipped(make_batcher):
    b, gate = make_batcher(max_batch_size=32)
    first = block(b, gate)
    with pytest.raises(DeadlineExceeded) as info:
        b.run("late", 1, timeout=0.05)
    assert "deadline" in info.value.message
    after = b.submit("after", 1)
    gate.release.set()
    result(first)
    assert result(after)[0] == "done:after"
    # "late" was queued with "after" but its caller gave up: never processed.
    assert gate.batches == [["blocker"], ["after"]]
    assert result(after)[1].requests == 1


def test_huge_timeout_means_no_deadline(make_batcher):
    # gRPC reports a call without a deadline as an enormous remaining time;
    # waiting on a Future with it must not overflow.
    gate = Gate()
    gate.release.set()
    b, _ = make_batcher(gate)
    assert b.run("no-deadline", 1, timeout=1e12)[0] == "done:no-deadline"
    assert b.run("none", 1, timeout=None)[0] == "done:none"


def test_close_finishes_queued_requests_then_rejects(make_batcher):
    b, gate = make_batcher()
    first = block(b, gate)
    queued = [b.submit(f"q{i}", 1) for i in range(3)]
    closer = threading.Thread(target=b.close)
    closer.start()
    # close() flags the batcher and notifies under the batcher's condition;
    # wait for that flag on the same condition (no sleep).
    with b._cv:
        assert b._cv.wait_for(lambda: b._closed, timeout=WAIT)
    with pytest.raises(Unavailable):
        b.submit("too-late", 1)
    with pytest.raises(Unavailable):
        b.run("too-late", 1, timeout=WAIT)
    assert closer.is_alive()  # close() waits for the queued work
    gate.release.set()
    closer.join(WAIT)
    assert not closer.is_alive()
    assert result(first)[0] == "done:blocker"
    assert [result(p)[0] for p in queued] == ["done:q0", "done:q1", "done:q2"]
    assert not b._thread.is_alive()
    assert "too-late" not in sum(gate.batches, [])


def test_close_of_an_idle_batcher_returns(make_batcher):
    gate = Gate()
    gate.release.set()
    b, _ = make_batcher(gate)
    assert b.run("one", 1, timeout=WAIT)[0] == "done:one"
    b.close()
    assert not b._thread.is_alive()
    with pytest.raises(Unavailable):
        b.submit("x", 1)


def test_on_batch_callback_gets_info_and_its_failure_does_not_fail_the_batch(make_batcher):
    infos: list[BatchInfo] = []

    def on_batch(info):
        infos.append(info)
        raise RuntimeError("metrics broke")

    b, gate = make_batcher(on_batch=on_batch)
    first = block(b, gate)
    ps = [b.submit("a", 2), b.submit("b", 3)]
    gate.release.set()
    result(first)
    assert [result(p)[0] for p in ps] == ["done:a", "done:b"]
    assert [(i.size, i.requests) for i in infos] == [(1, 1), (5, 2)]
    assert all(i.seconds >= 0 for i in infos)


def test_per_request_splits_results_back():
    calls = []

    def engine(flat):
        calls.append(list(flat))
        return [x * 10 for x in flat], 7

    process = per_request(engine)
    out = process([[1, 2], [3], [], [4, 5, 6]])
    assert calls == [[1, 2, 3, 4, 5, 6]]  # one engine call for the whole batch
    assert out == [([10, 20], 7), ([30], 7), ([], 7), ([40, 50, 60], 7)]


def test_per_request_through_the_batcher(make_batcher):
    calls = []
    release = threading.Event()
    entered = threading.Event()

    def engine(flat):
        calls.append(list(flat))
        if len(calls) == 1:
            entered.set()
            assert release.wait(WAIT)
        return [f"<{x}>" for x in flat], len(calls)

    b = DynamicBatcher(per_request(engine), max_batch_size=16, max_wait_s=0.0, max_queue=16, name="per-request")
    try:
        first = b.submit(["w"], 1)
        assert entered.wait(WAIT)
        reqs = [["a", "b"], ["c"], ["d", "e", "f"]]
        ps = [b.submit(r, len(r)) for r in reqs]
        release.set()
        assert result(first)[0] == (["<w>"], 1)
        outs = [result(p) for p in ps]
        assert [o[0] for o in outs] == [(["<a>", "<b>"], 2), (["<c>"], 2), (["<d>", "<e>", "<f>"], 2)]
        assert calls == [["w"], ["a", "b", "c", "d", "e", "f"]]
        assert outs[0][1].size == 6 and outs[0][1].requests == 3
    finally:
        release.set()
        b.close()


def test_invalid_max_batch_size():
    with pytest.raises(ValueError):
        DynamicBatcher(lambda r: r, max_batch_size=0, max_wait_s=0.0, max_queue=1, name="bad")


def test_token_budget_closes_a_batch(make_batcher):
    b, gate = make_batcher(max_batch_size=32, max_batch_tokens=100)
    first = block(b, gate)
    queued = [b.submit(f"t{i}", 1, tokens=40) for i in range(5)]  # 40 + 40 fit in 100, a third does not
    big = b.submit("big", 1, tokens=500)  # over the budget alone: runs alone, not refused
    gate.release.set()
    result(first)
    assert [result(p)[0] for p in queued + [big]] == [f"done:t{i}" for i in range(5)] + ["done:big"]
    assert gate.batches[1:] == [["t0", "t1"], ["t2", "t3"], ["t4"], ["big"]]


def test_expired_request_is_dropped_unrun_and_counted(make_batcher):
    import time

    dropped: list[str] = []
    b, gate = make_batcher(max_batch_size=32, on_drop=dropped.append)
    first = block(b, gate)
    # Queued behind the blocked batch with a deadline that passes before the worker reaches it.
    late = b.submit("late", 1, deadline=time.perf_counter() - 1e-3)
    on_time = b.submit("on_time", 1, deadline=time.perf_counter() + WAIT)
    gate.release.set()
    result(first)
    assert result(on_time)[0] == "done:on_time"
    with pytest.raises(DeadlineExceeded):
        result(late)
    assert all("late" not in batch for batch in gate.batches)  # never computed
    assert dropped == ["deadline"]


def test_run_with_an_exhausted_deadline_is_refused_before_queueing(make_batcher):
    b, gate = make_batcher()
    with pytest.raises(DeadlineExceeded):
        b.run("x", 1, timeout=0.0)
    assert gate.batches == []


def test_plan_chunks_against_a_naive_reference():
    import random

    from alignd.services.reward.engine import plan_chunks

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 40))]
        rows, budget = rng.randint(1, 9), rng.choice([None, 40, 100, 250])
        plan = plan_chunks(lengths, rows, budget)
        flat = sorted(i for chunk in plan for i in chunk)
        assert flat == list(range(len(lengths)))  # every row exactly once
        for chunk in plan:
            padded = len(chunk) * max(lengths[i] for i in chunk)
            assert len(chunk) <= rows
            assert budget is None or padded <= budget or len(chunk) == 1
        # Naive reference: walk the rows by length, open a new pass when the next row breaks a bound.
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        naive, cur = [], []
        for i in order:
            trial = cur + [i]
            if cur and (
                len(trial) > rows or (budget is not None and len(trial) * max(lengths[j] for j in trial) > budget)
            ):
                naive.append(cur)
                trial = [i]
            cur = trial
        naive.append(cur)
        assert plan == naive


def test_a_call_that_ends_first_withdraws_its_queued_request(make_batcher):
    """on_done (a gRPC context's add_callback): a caller that goes away (a hedge that lost) while its request is
    queued gets it dropped unrun; the callback after a normal end is harmless."""
    dropped: list[str] = []
    b, gate = make_batcher(max_batch_size=32, on_drop=dropped.append)
    first = block(b, gate)
    withdraw: list = []
    errors: list = []

    def caller():
        try:
            b.run("hedged", 1, timeout=WAIT, on_done=withdraw.append)
        except DeadlineExceeded as err:
            errors.append(err.message)

    t = threading.Thread(target=caller)
    t.start()
    while not withdraw:  # the request is queued once on_done was given its function
        t.join(0.01)
    withdraw[0]()  # the call ended (cancelled by its client)
    t.join(WAIT)
    after = b.submit("after", 1)
    gate.release.set()
    result(first)
    assert result(after)[0] == "done:after"
    assert errors and "cancelled" in errors[0]
    assert all("hedged" not in batch for batch in gate.batches) and dropped == ["cancelled"]

    done: list = []
    assert b.run("normal", 1, timeout=WAIT, on_done=done.append)[0] == "done:normal"
    assert done[0]() is False  # cancelling a finished request changes nothing
