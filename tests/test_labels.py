"""Labeling rounds of the coordinator: pending tasks, durable rankings, leases, export, crash recovery."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from alignd.data import DataError, load_comparisons
from alignd.labelers import SimulatedLabeler
from alignd.services.coordinator.comparisons import (
    ComparisonStore,
    Label,
    LabelError,
    StoreBusyError,
    Task,
    UnknownTaskError,
    task_id_for,
)

_RNG = random.Random(99)
VOCAB = [f"w{i}" for i in range(40)]
WEIGHTS = {w: _RNG.gauss(0.0, 1.0) for w in VOCAB}


def gold(prompt: str, completion: str) -> float:
    words = completion.split()
    return sum(WEIGHTS[w] for w in words) / max(1, len(words)) ** 0.5


def make_tasks(n: int, seed: int = 0, k: tuple[int, int] = (2, 6)) -> list[Task]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        comps: list[str] = []
        want = rng.randint(*k)
        while len(comps) < want:
            c = " ".join(rng.choice(VOCAB) for _ in range(rng.randint(2, 8)))
            if c not in comps:
                comps.append(c)
        out.append(Task(f"task-{i:04d}", f"prompt {seed}-{i}", tuple(comps)))
    return out


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def line_count(path) -> int:
    return sum(1 for line in path.read_bytes().split(b"\n") if line.strip())


# --- round trip ------------------------------------------------------------------------


def test_round_trip_and_export_loads(tmp_path):
    tasks = make_tasks(6)
    with ComparisonStore(tmp_path / "round") as store:
        assert not store.has_round
        assert store.create_round(tasks) is True
        assert store.progress().total == 6 and store.progress().labelled == 0 and not store.progress().done
        assert [t.task_id for t in store.pending()] == [t.task_id for t in tasks]
        rankings = {}
        for t in tasks[:4]:
            r = list(reversed(range(t.k)))
            rankings[t.task_id] = r
            lab = store.submit(t.task_id, r, "alice")
            assert isinstance(lab, Label) and lab.ranking == tuple(r) and lab.labeler == "alice"
            assert lab.prompt == t.prompt and lab.completions == t.completions
        p = store.progress()
        assert (p.labelled, p.total, p.labels) == (4, 6, 4) and p.fraction == pytest.approx(4 / 6)
        assert [t.task_id for t in store.pending()] == [t.task_id for t in tasks[4:]]
        for t in tasks[4:]:
            rankings[t.task_id] = list(range(t.k))
            store.submit(t.task_id, list(range(t.k)), "alice")
        assert store.progress().done and store.pending() == []
        assert [lab.task_id for lab in store.labels()] == [t.task_id for t in tasks]
        out = tmp_path / "rm" / "comparisons.jsonl"
        assert store.export_comparisons(out) == 6

    comps, report = load_comparisons(out)
    assert report.format == "rankings" and report.loaded == 6
    for t, c in zip(tasks, comps):
        assert c.prompt == t.prompt and c.completions == list(t.completions) and c.ranking == rankings[t.task_id]
    # labels.jsonl itself is a rankings file too
    direct, _ = load_comparisons(tmp_path / "round" / "labels.jsonl")
    assert [c.ranking for c in direct] == [rankings[t.task_id] for t in tasks]
    rows = [json.loads(line) for line in (tmp_path / "round" / "labels.jsonl").read_text().splitlines()]
    assert {"task_id", "labeler", "prompt", "completions", "ranking", "time"} <= set(rows[0])


def test_create_round_is_idempotent_and_validated(tmp_path):
    tasks = make_tasks(5)
    with ComparisonStore(tmp_path) as store:
        assert store.create_round(tasks)
        store.submit(tasks[0].task_id, [1, 0] + list(range(2, tasks[0].k)), "a")
        before = (tmp_path / "tasks.jsonl").stat()
        assert store.create_round(list(reversed(tasks))) is False  # same tasks, any order: kept
        assert (tmp_path / "tasks.jsonl").stat().st_ino == before.st_ino
        with pytest.raises(LabelError, match="other task ids") as e:
            store.create_round(tasks[:4])
        assert e.value.code == "failed_precondition"
        changed = [Task(tasks[0].task_id, "another prompt", tasks[0].completions), *tasks[1:]]
        with pytest.raises(LabelError, match="another prompt or completions"):
            store.create_round(changed)
        assert len(store.labels()) == 1
    with ComparisonStore(tmp_path) as store:  # and after a restart
        assert store.create_round(tasks) is False and len(store.labels()) == 1

    with ComparisonStore(tmp_path / "v") as store:
        for bad, fld in [
            ([], "tasks"),
            ([Task("x", "p", ("a",))], "tasks[0].completions"),
            ([Task("x", "p", ("a", "a"))], "tasks[0].completions"),
            ([Task("x", "p", tuple("abcdefghij"))], "tasks[0].completions"),  # K = 10 > max_k
            ([Task("x", "p", ("a", "b")), Task("x", "q", ("a", "b"))], "tasks[1].task_id"),
            ([{"prompt": " ", "completions": ["a", "b"]}], "tasks[0].prompt"),
            ([("p", "ab")], "tasks[0].completions"),
        ]:
            with pytest.raises(LabelError) as e:
                store.create_round(bad)
            assert e.value.field == fld, (bad, e.value)
        assert not store.has_round and not (tmp_path / "v" / "tasks.jsonl").exists()
        # (prompt, completions) pairs and dicts without ids get content-derived ids
        assert store.create_round([("p1", ["a", "b"]), {"prompt": "p2", "completions": ["c", "d", "e"]}])
        assert [t.task_id for t in store.tasks()] == [task_id_for("p1", ["a", "b"]), task_id_for("p2", ["c", "d", "e"])]


# --- durability ------------------------------------------------------------------------


def test_reopened_store_sees_every_accepted_label(tmp_path):
    tasks = make_tasks(20)
    accepted = []
    with ComparisonStore(tmp_path, labels_per_task=2) as store:
        store.create_round(tasks)
        for i, t in enumerate(tasks):
            accepted.append(store.submit(t.task_id, list(range(t.k))[::-1], "a"))
            if i % 3 == 0:
                accepted.append(store.submit(t.task_id, list(range(t.k)), "b"))
        progress = store.progress()
    with ComparisonStore(tmp_path, labels_per_task=2) as again:
        assert again.labels() == accepted
        assert again.progress() == progress
        assert again.dropped_tail_bytes == 0
        assert again.labels(labeler="b") == [lab for lab in accepted if lab.labeler == "b"]
        assert again.labels(task_id=tasks[0].task_id) == accepted[:2]
        assert again.labelers() == ["a", "b"]
        # a task needs two labels: pending for "b" = the tasks "b" has not ranked
        assert len(again.pending(labeler="b", lease_s=0)) == 20 - 7 and again.pending(labeler="a", lease_s=0) == []


@pytest.mark.parametrize(
    "tail", [b'{"task_id": "task-0003", "labeler": "a", "prom', b"\x00\x00\x00\x00\n", b"\x00" * 7]
)
def test_torn_last_line_is_dropped_and_logged(tmp_path, caplog, tail):
    tasks = make_tasks(5)
    with ComparisonStore(tmp_path) as store:
        store.create_round(tasks)
        accepted = [store.submit(t.task_id, list(range(t.k)), "a") for t in tasks[:3]]
    path = tmp_path / "labels.jsonl"
    good = path.read_bytes()
    with open(path, "ab") as f:  # a crash in the middle of an append
        f.write(tail)
    with caplog.at_level(logging.WARNING, logger="alignd.coordinator.comparisons"):
        store = ComparisonStore(tmp_path)
    with store:
        assert store.labels() == accepted
        assert store.dropped_tail_bytes == len(tail)
        assert path.read_bytes() == good  # truncated away on disk
        assert any("torn" in r.getMessage() and str(len(tail)) in r.getMessage() for r in caplog.records)
        store.submit(tasks[3].task_id, list(range(tasks[3].k)), "a")  # appends cleanly after the cut
    comps, _ = load_comparisons(path)
    assert len(comps) == 4


def test_corruption_before_the_last_line_refuses_to_open(tmp_path):
    tasks = make_tasks(4)
    with ComparisonStore(tmp_path) as store:
        store.create_round(tasks)
        for t in tasks[:3]:
            store.submit(t.task_id, list(range(t.k)), "a")
    path = tmp_path / "labels.jsonl"
    lines = path.read_bytes().split(b"\n")
    lines[1] = b"{not json"
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"labels\.jsonl:2: corrupt label record"):
        ComparisonStore(tmp_path)
    # a well-formed line for a task that is not in the round is corruption, not a torn append
    lines[1] = json.dumps(
        {"task_id": "nope", "labeler": "a", "prompt": "p", "completions": ["a", "b"], "ranking": [0, 1], "time": 1.0}
    ).encode()
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match="not in tasks.jsonl"):
        ComparisonStore(tmp_path)


def test_one_writer_per_round(tmp_path):
    with ComparisonStore(tmp_path):
        with pytest.raises(StoreBusyError):
            ComparisonStore(tmp_path)
    ComparisonStore(tmp_path).close()  # released on close


# --- validation and idempotence ------------------------------------------------------------


def test_bad_submissions_raise_label_error_naming_the_field(tmp_path):
    tasks = make_tasks(3, k=(4, 4))
    with ComparisonStore(tmp_path / "empty") as empty:
        with pytest.raises(UnknownTaskError, match="no labeling round"):
            empty.submit("task-0000", [0, 1, 2, 3], "a")
    with ComparisonStore(tmp_path) as store:
        store.create_round(tasks)
        tid = tasks[0].task_id
        with pytest.raises(UnknownTaskError) as e:
            store.submit("task-9999", [0, 1, 2, 3], "a")
        assert isinstance(e.value, LabelError) and isinstance(e.value, KeyError)
        assert e.value.field == "task_id" and e.value.code == "not_found"
        assert str(e.value) == "task_id: unknown task 'task-9999': not in this labeling round"
        for ranking in (
            [0, 1, 2],
            [0, 1, 2, 3, 4],
            [0, 0, 1, 2],
            [1, 2, 3, 4],
            ["0", "1", "2", "3"],
            [True, False, 2, 3],
            "0123",
            None,
            [0.0, 1, 2, 3],
        ):
            with pytest.raises(LabelError) as e:
                store.submit(tid, ranking, "a")
            assert e.value.field == "ranking" and e.value.code == "invalid_argument", ranking
            assert str(e.value).startswith("ranking: ")
        for who in ("", "  ", None, 7, "x" * 300):
            with pytest.raises(LabelError) as e:
                store.submit(tid, [0, 1, 2, 3], who)
            assert e.value.field == "labeler"
        with pytest.raises(LabelError) as e:
            store.submit(None, [0, 1, 2, 3], "a")
        assert e.value.field == "task_id"
        with pytest.raises(LabelError) as e:
            store.pending(0)
        assert e.value.field == "limit"
        assert store.labels() == [] and not (tmp_path / "labels.jsonl").exists()
        store.submit(tid, (3, 1, 2, 0), "a")  # a tuple is fine


def test_resubmission_is_idempotent_and_conflicts_are_refused(tmp_path):
    tasks = make_tasks(2, k=(3, 3))
    with ComparisonStore(tmp_path, wall_clock=iter(range(100, 200)).__next__) as store:
        store.create_round(tasks)
        tid = tasks[0].task_id
        first = store.submit(tid, [2, 0, 1], "alice")
        assert first.time == 100.0
        assert store.submit(tid, [2, 0, 1], "alice") == first  # the stored record, not a new one
        assert line_count(tmp_path / "labels.jsonl") == 1
        with pytest.raises(LabelError) as e:
            store.submit(tid, [0, 1, 2], "alice")
        assert e.value.code == "already_exists" and e.value.field == "ranking" and "[2, 0, 1]" in str(e.value)
        # another labeler may rank the same task (agreement data)
        store.submit(tid, [0, 1, 2], "bob")
        store.submit(tasks[1].task_id, [0, 1, 2], "bob")
        assert line_count(tmp_path / "labels.jsonl") == 3
        assert store.progress().labelled == 2 and store.progress().labels == 3
        assert store.agreement("alice", "bob") == (pytest.approx(1 / 3), 3)  # (2,0,1) vs (0,1,2): only 0 > 1 agrees

        all_out, bob_out = tmp_path / "all.jsonl", tmp_path / "bob.jsonl"
        assert store.export_comparisons(all_out) == 3
        assert [json.loads(x)["labeler"] for x in all_out.read_text().splitlines()] == ["alice", "bob", "bob"]
        assert store.export_comparisons(bob_out, labeler="bob") == 2
        assert store.export_comparisons(tmp_path / "a.jsonl", labeler=["alice"]) == 1
        assert [c.ranking for c in load_comparisons(bob_out)[0]] == [[0, 1, 2], [0, 1, 2]]
        with pytest.raises(LabelError, match="no accepted rankings") as e:
            store.export_comparisons(tmp_path / "none.jsonl", labeler="carol")
        assert e.value.code == "failed_precondition" and not (tmp_path / "none.jsonl").exists()
    with ComparisonStore(tmp_path) as again:  # the conflict check survives a restart
        with pytest.raises(LabelError, match="already ranked"):
            again.submit(tid, [0, 1, 2], "alice")
        assert again.submit(tid, [2, 0, 1], "alice") == first


# --- leases ------------------------------------------------------------------------


def test_leases_keep_labelers_apart_and_expire(tmp_path):
    clock = FakeClock()
    tasks = make_tasks(6)
    ids = [t.task_id for t in tasks]
    with ComparisonStore(tmp_path, lease_s=60, clock=clock) as store:
        store.create_round(tasks)
        a = [t.task_id for t in store.pending(2, "a")]
        b = [t.task_id for t in store.pending(2, "b")]
        assert a == ids[:2] and b == ids[2:4]
        assert [t.task_id for t in store.pending(2, "a")] == ids[:2]  # own leases come back (and are renewed)
        assert [t.task_id for t in store.pending(labeler=None)] == ids[4:]  # a peek leases nothing
        assert [t.task_id for t in store.pending(labeler="c")] == ids[4:]
        assert store.pending(labeler="d") == []
        assert store.progress().leased == 6

        store.submit(ids[0], list(range(tasks[0].k)), "a")  # submitting ends the lease
        assert store.release(ids[1], "a") is True and store.release(ids[1], "a") is False
        assert [t.task_id for t in store.pending(labeler="d")] == [ids[1]]

        clock.t += 59.0
        assert store.pending(labeler="e") == []
        clock.t += 2.0  # b's and c's leases (taken at t) expired; d's (also at t) too
        assert [t.task_id for t in store.pending(labeler="e", lease_s=0)] == ids[1:]
        assert store.progress().leased == 0
        # leases are advisory: b may still submit a task it lost, and a leased task can be labelled by anyone
        store.pending(1, "f")
        store.submit(ids[1], list(range(tasks[1].k)), "b")
        assert store.progress().labelled == 2
        with pytest.raises(LabelError) as e:
            store.pending(1, "a", lease_s=-1)
        assert e.value.field == "lease_s"


def test_multiple_labels_per_task_hand_a_task_to_several_labelers(tmp_path):
    tasks = make_tasks(3)
    with ComparisonStore(tmp_path, labels_per_task=2, clock=FakeClock()) as store:
        store.create_round(tasks)
        assert [t.task_id for t in store.pending(1, "a")] == [tasks[0].task_id]
        assert [t.task_id for t in store.pending(1, "b")] == [tasks[0].task_id]  # a second slot
        assert [t.task_id for t in store.pending(1, "c")] == [tasks[1].task_id]  # both slots leased
        store.submit(tasks[0].task_id, list(range(tasks[0].k)), "a")
        assert store.progress().labelled == 0
        assert tasks[0].task_id not in [t.task_id for t in store.pending(labeler="a", lease_s=0)]
        store.submit(tasks[0].task_id, list(range(tasks[0].k)), "b")
        assert store.progress().labelled == 1


# --- programmatic labelers ---------------------------------------------------------------


class Interrupting:
    """A labeler that fails after `n` rankings (a crash in the middle of label_with)."""

    def __init__(self, inner, n: int) -> None:
        self.inner, self.n, self.name = inner, n, inner.name

    def rank(self, prompt, completions):
        if self.n == 0:
            raise KeyboardInterrupt("interrupted")
        self.n -= 1
        return self.inner.rank(prompt, completions)


def test_label_with_resumes_where_it_stopped(tmp_path):
    tasks = make_tasks(40, seed=3, k=(4, 9))
    sim = SimulatedLabeler(gold, temperature=0.5, seed=7, name="sim-7")

    with ComparisonStore(tmp_path / "straight") as store:
        store.create_round(tasks)
        assert store.label_with(sim, batch=8) == 40
        assert store.label_with(sim, batch=8) == 0
        straight = [(lab.task_id, lab.ranking) for lab in store.labels()]
        store.export_comparisons(tmp_path / "straight.jsonl")

    with ComparisonStore(tmp_path / "resumed", clock=FakeClock()) as store:
        store.create_round(tasks)
        with pytest.raises(KeyboardInterrupt):
            store.label_with(Interrupting(sim, 13), batch=8)
        assert len(store.labels()) == 13
        assert store.progress().leased == 0  # leases of the unfinished batch were released
    with ComparisonStore(tmp_path / "resumed") as store:
        assert store.create_round(tasks) is False
        assert store.label_with(sim, batch=8, limit=7) == 7
    with ComparisonStore(tmp_path / "resumed") as store:
        assert store.label_with(sim, batch=8) == 20
        assert store.progress().done
        assert [(lab.task_id, lab.ranking) for lab in store.labels()] == straight
        store.export_comparisons(tmp_path / "resumed.jsonl")
    assert (tmp_path / "resumed.jsonl").read_bytes() == (tmp_path / "straight.jsonl").read_bytes()
    for t, (_tid, ranking) in zip(tasks, straight):
        assert list(ranking) == sim.rank(t.prompt, list(t.completions))


def test_two_simulated_labelers_measure_agreement(tmp_path):
    tasks = make_tasks(30, seed=5, k=(4, 6))
    a = SimulatedLabeler(gold, temperature=0.3, seed=1, name="a")
    b = SimulatedLabeler(gold, temperature=0.3, seed=2, name="b")
    with ComparisonStore(tmp_path, labels_per_task=2) as store:
        store.create_round(tasks)
        store.label_with(a)
        assert store.progress().labelled == 0
        store.label_with(b)
        assert store.progress().done
        value, pairs = store.agreement("a", "b")
    from alignd.labelers import agreement

    assert pairs == sum(t.k * (t.k - 1) // 2 for t in tasks)
    assert value == pytest.approx(agreement(a, b, [(t.prompt, list(t.completions)) for t in tasks]))


def test_concurrent_submits_from_threads(tmp_path):
    tasks = make_tasks(120, seed=8)
    with ComparisonStore(tmp_path) as store:
        store.create_round(tasks)

        def work(who: str) -> None:
            while batch := store.pending(5, who):
                for t in batch:
                    store.submit(t.task_id, list(range(t.k)), who)

        threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert store.progress().done and store.progress().labels == 120  # leases: no task labelled twice
    with ComparisonStore(tmp_path) as again:
        assert len(again.labels()) == 120 and line_count(tmp_path / "labels.jsonl") == 120


# --- SIGKILL in the middle of submits ------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys
    from alignd.services.coordinator.comparisons import ComparisonStore

    store = ComparisonStore(sys.argv[1])
    print("ready", flush=True)
    while True:
        batch = store.pending(16, "external")
        if not batch:
            break
        for t in batch:
            store.submit(t.task_id, list(range(t.k))[::-1], "external")
            print(t.task_id.ljust(100), flush=True)  # only after submit returned; long lines fill the pipe
    print("done", flush=True)
    """
)


def test_sigkill_loses_no_accepted_ranking(tmp_path):
    tasks = make_tasks(4000, seed=11)  # the pipe holds ~650 reported ids: the child blocks long before the end
    with ComparisonStore(tmp_path) as store:
        store.create_round(tasks)
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        printed = []
        while len(printed) < 150:
            line = proc.stdout.readline()
            assert line and line.strip() != "done", f"child ended early: {proc.stderr.read()}"
            printed.append(line.strip())
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()  # everything printed before the kill
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "done" not in rest, "the child finished before it was killed"
    printed += rest.split()
    print(f"child killed after {len(printed)} reported submits")

    with ComparisonStore(tmp_path) as store:
        got = {lab.task_id for lab in store.labels()}
        assert set(printed) <= got  # every submit that returned is on disk
        assert len(got) - len(printed) in (0, 1)  # at most the submit in flight, not yet reported
        assert all(lab.ranking == tuple(range(len(lab.completions)))[::-1] for lab in store.labels())
        # the round carries on after the crash
        left = store.pending(labeler="after", lease_s=0)
        assert len(left) == 4000 - len(got)
        store.submit(left[0].task_id, list(range(left[0].k)), "after")


def test_external_agreement_pools_every_pair_of_labelers(tmp_path):
    from alignd.services.coordinator.rm_rounds import external_agreement

    with ComparisonStore(tmp_path / "r", labels_per_task=2) as s:
        s.create_round([("p", ["a", "b", "c"]), ("q", ["x", "y"])])
        t0, t1 = s.tasks()
        assert external_agreement(s) == {}  # nobody ranked yet
        s.submit(t0.task_id, [0, 1, 2], "u")
        s.submit(t0.task_id, [0, 2, 1], "v")  # agrees with u on 2 of 3 pairs
        s.submit(t1.task_id, [0, 1], "u")
        s.submit(t1.task_id, [0, 1], "w")  # agrees on its 1 pair; v and w share no task
        assert external_agreement(s) == {"agreement": 0.75, "pairs": 4}
