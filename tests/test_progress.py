"""The run's progress display (alignd.progress): plain lines without carriage returns when the output is not a
terminal, tqdm bars on one; 80 columns either way."""

from __future__ import annotations

import io
import re

from alignd.progress import WIDTH, RunProgress
from alignd.v1 import coordinator_pb2 as cpb


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def pipeline_runs(clock: Clock, steps: int = 40):
    """The Runs a pipeline's GetRun returns, polled once a simulated second: sft, rm, ppo, evaluate, report."""

    def run(stage, **kw):
        return cpb.Run(run_id="p", state=cpb.RUN_STATE_RUNNING, stage=stage, total_steps=steps, **kw)

    for i in range(10):
        clock.t += 1
        yield run("sft", stage_fraction=0.0 if i < 8 else 0.8, stage_detail="training" if i < 8 else "loading")
    for i in range(20):
        clock.t += 1
        yield run("rm", stage_fraction=0.2 + 0.02 * i, stage_detail="round 0: ranking 192 tasks")
    for step in range(steps + 1):
        clock.t += 1
        m = {"mean_score": 0.1 * step, "reference_kl": 0.01 * step, "tokens_per_second": 1000.0}
        yield run("ppo", step=step, latest_metrics=m)
    clock.t += 1
    yield run("evaluate", stage_fraction=0.0, stage_detail="sampling held-out prompts " + "x" * 100)
    clock.t += 1
    yield run("report", stage_fraction=0.0)


def test_piped_output_is_lines_without_carriage_returns_each_within_80_columns():
    clock, out = Clock(), io.StringIO()
    progress = RunProgress(stream=out, clock=clock, every_seconds=10)
    assert not progress.tty  # a StringIO is not a terminal, like a pipe
    for run in pipeline_runs(clock):
        progress.update(run)
    progress.close(finished=True)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert all(len(line) <= WIDTH for line in lines), max(lines, key=len)
    # A line when each stage starts and when what it does changes; ends with the stage's time.
    assert lines[0] == "[    1s] sft   0%: training"
    assert "[    9s] sft  80% eta 2s: loading" in lines  # 8 s for 80%: 2 s left
    assert [x.split("] ")[1].split()[0] for x in lines if " done in " in x] == [
        "sft",
        "rm",
        "ppo",
        "evaluate",
        "report",
    ]
    # PPO's steps at most every 10 s (41 polls one second apart), each with reward, KL and ETA.
    ppo = [x for x in lines if re.match(r"\[ *[\dm]+s\] ppo +\d+%", x)]
    assert 4 <= len(ppo) <= 6, ppo
    assert ppo[1].endswith("step 10/40 reward +1.000 kl 0.100 tok/s 1000") and " eta 30s:" in ppo[1]
    assert any(x.startswith("[ 1m12s] evaluate   0%: sampling held-out prompts xxx") for x in lines)


def test_a_failed_run_ends_its_stage_without_saying_done():
    clock, out = Clock(), io.StringIO()
    progress = RunProgress(stream=out, clock=clock)
    progress.update(cpb.Run(stage="rm", stage_fraction=0.4, stage_detail="round 0: training the reward model"))
    clock.t = 65
    progress.close(finished=False)
    assert out.getvalue().splitlines()[-1] == "[ 1m05s] rm ended in 1m05s"


def test_a_terminal_gets_a_bar_per_stage_within_80_columns():
    clock, out = Clock(), io.StringIO()
    progress = RunProgress(stream=out, tty=True, clock=clock)
    for run in pipeline_runs(clock):
        progress.update(run)
    progress.close(finished=True)
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    frames = [f for f in re.split(r"[\r\n]", text) if f.strip()]
    assert all(len(f) <= WIDTH for f in frames), max(frames, key=len)
    finals = text.split("\n")[:-1]  # each stage's bar, left on its own line when the stage ended
    last = [f.split("\r")[-1] for f in finals]
    assert [x.split()[0] for x in last] == ["sft", "rm", "ppo", "evaluate", "report"]
    assert all(" 100%|" in x for x in last)  # every stage finished
    assert "step 40/40 reward +4.000" in last[2]


def test_the_eta_of_a_stage_entered_again_comes_from_its_rate_since_then():
    """The pipeline's ppo stage resumes after an RM round at step 20 of 40: its ETA is that of the steps since."""
    clock, out = Clock(), io.StringIO()
    progress = RunProgress(stream=out, clock=clock, every_seconds=10)
    m = {"mean_score": 1.0, "reference_kl": 0.1, "tokens_per_second": 900.0}
    for t, stage, step in ((1, "ppo", 0), (21, "ppo", 20), (22, "rm", 20), (31, "ppo", 20), (41, "ppo", 30)):
        clock.t = t
        progress.update(cpb.Run(stage=stage, step=step, total_steps=40, latest_metrics=m))
    lines = out.getvalue().splitlines()
    assert lines[-2] == "[   31s] ppo  50%: step 20/40 reward +1.000 kl 0.100 tok/s 900"  # no rate yet
    assert lines[-1] == "[   41s] ppo  75% eta 10s: step 30/40 reward +1.000 kl 0.100 tok/s 900"
