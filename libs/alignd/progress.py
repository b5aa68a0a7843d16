"""How `alignd run` and `alignd ppo` show a run's progress: a tqdm bar per stage on a terminal (rate and ETA by
tqdm), plain lines elsewhere (CI, `nohup`, pod logs, a pipe): one when a stage starts, when what it does changes,
at most every `every_seconds` while it runs and when it ends, each with the stage's ETA, never a carriage return.
Every line fits in 80 columns.

The display reads only the coordinator's Run message (GetRun): the stage, its fraction and what it is doing, PPO's
step and last metrics. It imports neither torch nor the roles.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from alignd.v1 import coordinator_pb2

__all__ = ["WIDTH", "RunProgress"]

WIDTH = 80  # columns of every line, bar or plain
PERCENT = 1000  # a fractional stage's bar counts tenths of a percent


def _fmt_seconds(s: float) -> str:
    s = max(0, round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _is_ppo_steps(run: coordinator_pb2.Run) -> bool:
    """PPO shows its steps (a pipeline's ppo stage says what else it does in stage_detail)."""
    return run.stage == "ppo" and not run.stage_detail


def _fraction(run: coordinator_pb2.Run) -> float:
    f = run.step / max(1, run.total_steps) if _is_ppo_steps(run) else run.stage_fraction
    return max(0.0, min(1.0, f))


def _what(run: coordinator_pb2.Run) -> str:
    """What the stage is doing: PPO's step with its reward, KL and throughput; else the stage's own words."""
    if not _is_ppo_steps(run):
        return run.stage_detail
    m = run.latest_metrics
    if "mean_score" not in m:  # no step yet
        return f"step {run.step}/{run.total_steps}"
    return (
        f"step {run.step}/{run.total_steps} reward {m.get('mean_score', float('nan')):+.3f} "
        f"kl {m.get('reference_kl', float('nan')):.3f} tok/s {m.get('tokens_per_second', 0.0):.0f}"
    )


class RunProgress:
    """Shows one run's progress on `stream` (stdout by default); `update` with each Run polled, `close` at the end.

    tty: bars (True) or plain lines (False); default: whether the stream is a terminal. clock: seconds, monotonic
    (injectable for tests).
    """

    def __init__(
        self, *, stream: TextIO | None = None, tty: bool | None = None, every_seconds: float = 30.0, clock=None
    ) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_seconds = every_seconds
        self.clock = clock or time.monotonic
        self.t0 = self.clock()
        self.stage = ""
        self.stage_t0 = self.t0
        self.stage_f0 = 0.0  # the stage's fraction when it was entered: its rate since then gives the ETA
        self.detail = ""
        self.last_line = float("-inf")
        self.bar: tqdm | None = None

    # -- the caller's side ---------------------------------------------------
    def update(self, run: coordinator_pb2.Run) -> None:
        if run.stage != self.stage:
            self._end_stage(finished=True)
            # (a stage may be entered again: the pipeline's ppo stage resumes after an RM round)
            self.stage, self.stage_t0, self.stage_f0, self.detail = run.stage, self.clock(), _fraction(run), None
        if self.tty:
            self._draw(run)
        else:
            self._line(run)

    def close(self, *, finished: bool) -> None:
        """The last stage ends: finished (the run succeeded) fills its bar; else it stays where it stopped."""
        self._end_stage(finished=finished)

    # -- a terminal: tqdm -------------------------------------------------------
    def _draw(self, run: coordinator_pb2.Run) -> None:
        ppo = _is_ppo_steps(run)
        total = run.total_steps if ppo else PERCENT
        if self.bar is None or self.bar.total != total:
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(
                total=total,
                desc=f"{run.stage:8s}",
                ncols=WIDTH,
                file=self.stream,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}",
                dynamic_ncols=False,
                leave=True,
                initial=run.step if ppo else round(_fraction(run) * PERCENT),  # rate and ETA from here on
            )
        n = run.step if ppo else round(_fraction(run) * PERCENT)
        room = WIDTH - 45  # the description, percentage, bar and times take the rest
        self.bar.set_postfix_str(_what(run)[:room], refresh=False)
        self.bar.update(max(0, n - self.bar.n))
        self.bar.refresh()

    # -- anything else: lines -----------------------------------------------------
    def _line(self, run: coordinator_pb2.Run) -> None:
        now = self.clock()
        detail = run.stage_detail
        if detail == self.detail and now - self.last_line < self.every_seconds:
            return
        self.detail = detail
        self.last_line = now
        fraction = _fraction(run)
        gained, spent = fraction - self.stage_f0, now - self.stage_t0
        eta = f" eta {_fmt_seconds(spent / gained * (1 - fraction))}" if gained > 0 and fraction < 1 else ""
        what = _what(run)
        line = f"[{_fmt_seconds(now - self.t0):>6s}] {run.stage} {fraction:4.0%}{eta}" + (f": {what}" if what else "")
        self._print(line[:WIDTH])

    def _end_stage(self, *, finished: bool) -> None:
        if self.bar is not None:
            if finished:
                self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None
        elif self.stage and not self.tty:
            now = self.clock()
            how = "done" if finished else "ended"
            self._print(
                f"[{_fmt_seconds(now - self.t0):>6s}] {self.stage} {how} in {_fmt_seconds(now - self.stage_t0)}"
            )

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
