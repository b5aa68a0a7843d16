"""PNG plots for the run report: what a run's numbers look like over steps and rounds.

`render_plots(run_dir, report)` reads the run directory's `metrics.jsonl` (one
JSON object per PPO step, as the coordinator's loop appends it) and a
`report.json` dict (`alignd.evaluation.build_report_json`) and writes up to
four PNGs into `run_dir/plots/`:

* reward_kl.png: the batch's mean reward and the KL to the reference policy
  per PPO step (two panels sharing the step axis);
* win_rates.png: the final policy's win rate against the SFT policy per
  judge, with its interval as error bars, the 50% line (no preference) and
  the primary judge's bar from the report's `acceptance` block;
* rm_accuracy.png: the reward model's held-out accuracy per round, with its
  Wilson interval where the round's n is known, the 50% chance line and the
  simulated labelers' agreement when the report has it;
* phase_seconds.png: the seconds of each phase of a PPO step (generate,
  score, reference, train, sync_weights) per step, as lines rather than
  stacked bars since score and reference run concurrently, and the wall time
  of each pipeline stage.

A plot whose data the run does not have (no metrics rows, no RM rounds, ...)
is skipped; the paths of the PNGs written are returned. matplotlib is an
optional dependency (the `report` extra: the coordinator's base install has no
plotting): without it `render_plots` logs "plots_skipped" and returns [].
Figures use matplotlib's object API (`matplotlib.figure.Figure`, rendered by
Agg), so nothing touches pyplot's global state or needs a display, and each
PNG is written atomically (temp file, fsync, rename).

`markdown_links(paths, run_dir)` is the "## Plots" section of report.md for
those PNGs; `alignd.evaluation.render_markdown(report, plots=...)` writes the
same section into the report.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignd.atomic import write_bytes_atomic
from alignd.evaluation import PAPER_RM_ACCURACY, plots_markdown
from alignd.runtime.logging import get_logger

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PHASES", "PLOTS_DIR", "markdown_links", "read_metrics", "render_plots"]

_log = get_logger("alignd.plots")

PLOTS_DIR = "plots"
DPI = 100  # figure sizes below are in inches: pixels = inches * DPI

# The phases of a PPO step as the coordinator's loop times them, in order.
PHASES = ("generate", "score", "reference", "train", "sync_weights")

_MARKERS_UP_TO = 60  # draw point markers on step curves up to this many steps


# --- inputs ----------------------------------------------------------------------------


def read_metrics(run_dir: Path | str) -> list[dict[str, Any]]:
    """The rows of run_dir/metrics.jsonl sorted by step, one per step (the last line of a step wins).

    A missing file gives []; a line that is not a JSON object with a "step" (say, torn by a
    crash mid-append) is skipped with a warning.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step: dict[Any, dict[str, Any]] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not _is_number(row.get("step")):
            _log.warning("metrics_line_skipped", path=str(path), line=lineno)
            continue
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _value(x: Any) -> float:
    """A float for plotting; NaN (a gap in the curve) for None, non-numbers and non-finite values."""
    if not _is_number(x) or not math.isfinite(x):
        return math.nan
    return float(x)


def _has_values(values: Iterable[float]) -> bool:
    return any(not math.isnan(v) for v in values)


# --- the plots -------------------------------------------------------------------------


def _reward_kl(fig_cls: type[Figure], rows: Sequence[Mapping[str, Any]], report: Mapping[str, Any]) -> Figure | None:
    steps = [float(r["step"]) for r in rows]
    reward = [_value(r.get("mean_score")) for r in rows]
    kl = [_value(r.get("reference_kl")) for r in rows]
    if not steps or not (_has_values(reward) or _has_values(kl)):
        return None
    marker = "o" if len(steps) <= _MARKERS_UP_TO else None
    fig = fig_cls(figsize=(8.0, 6.0), dpi=DPI, layout="constrained")
    ax_r, ax_k = fig.subplots(2, 1, sharex=True)
    ax_r.plot(steps, reward, color="tab:blue", marker=marker, markersize=3)
    ax_r.set_ylabel("mean reward (RM score)")
    ax_r.set_title("Reward and KL to the reference policy per PPO step")
    ax_k.plot(steps, kl, color="tab:red", marker=marker, markersize=3)
    ax_k.set_ylabel("KL to reference (nats/token)")
    ax_k.set_xlabel("PPO step")
    for ax in (ax_r, ax_k):
        ax.grid(True, alpha=0.3)
    return fig


def _ordered_judges(win_rates: Mapping[str, Any], primary: str) -> list[str]:
    return sorted(win_rates, key=lambda j: (j != primary, j))


def _win_rates(fig_cls: type[Figure], rows: Sequence[Mapping[str, Any]], report: Mapping[str, Any]) -> Figure | None:
    win_rates: Mapping[str, Mapping[str, Any]] = report.get("win_rates") or {}
    judges = [j for j in _ordered_judges(win_rates, _primary(report)) if _is_number(win_rates[j].get("rate"))]
    if not judges:
        return None
    acc: Mapping[str, Any] = report.get("acceptance") or {}
    primary = _primary(report)
    rates = [float(win_rates[j]["rate"]) for j in judges]
    lower = [_value(win_rates[j].get("lower")) for j in judges]
    upper = [_value(win_rates[j].get("upper")) for j in judges]
    yerr = [
        [0.0 if math.isnan(lo) else max(0.0, r - lo) for r, lo in zip(rates, lower)],
        [0.0 if math.isnan(hi) else max(0.0, hi - r) for r, hi in zip(rates, upper)],
    ]
    confidence = win_rates[judges[0]].get("confidence") or 0.95
    colors = ["tab:blue" if j == primary else "tab:gray" for j in judges]
    labels = [f"{j}\n(n={win_rates[j].get('n', '?')})" for j in judges]

    fig = fig_cls(figsize=(8.0, 4.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    x = list(range(len(judges)))
    ax.bar(x, rates, yerr=yerr, capsize=6, color=colors, width=0.6, error_kw={"elinewidth": 1.5})
    for xi, r, hi in zip(x, rates, upper):
        top = r if math.isnan(hi) else max(r, hi)
        ax.annotate(f"{100 * r:.1f}%", (xi, top), xytext=(0, 4), textcoords="offset points", ha="center", va="bottom")
    ax.axhline(0.5, color="black", linestyle="--", linewidth=1, label="50% (no preference)")
    if _is_number(acc.get("min_rate")) and primary in win_rates:
        ax.axhline(
            acc["min_rate"],
            color="tab:green",
            linestyle=":",
            linewidth=1.2,
            label=f"bar for {primary}: {100 * acc['min_rate']:.0f}%",
        )
    ax.set_xticks(x, labels)
    ax.set_xlim(-0.6, len(judges) - 0.4)
    ax.set_ylim(0.0, 1.1)
    ax.yaxis.set_major_formatter(_percent_formatter())
    ax.set_ylabel("win rate against SFT")
    ax.set_title(f"Final policy vs SFT policy, win rate per judge ({round(100 * confidence)}% interval)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def _rm_accuracy(fig_cls: type[Figure], rows: Sequence[Mapping[str, Any]], report: Mapping[str, Any]) -> Figure | None:
    rounds = [r for r in report.get("rm_accuracy_per_round") or [] if _is_number(r.get("accuracy"))]
    if not rounds:
        return None
    x = list(range(len(rounds)))
    accuracy = [float(r["accuracy"]) for r in rounds]
    fig = fig_cls(figsize=(8.0, 4.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.plot(x, accuracy, color="tab:blue", marker="o", label="held-out accuracy")
    with_ci = [i for i, r in enumerate(rounds) if _is_number(r.get("lower")) and _is_number(r.get("upper"))]
    if with_ci:
        ax.errorbar(
            [x[i] for i in with_ci],
            [accuracy[i] for i in with_ci],
            yerr=[
                [max(0.0, accuracy[i] - rounds[i]["lower"]) for i in with_ci],
                [max(0.0, rounds[i]["upper"] - accuracy[i]) for i in with_ci],
            ],
            fmt="none",
            ecolor="tab:blue",
            capsize=5,
            label="95% Wilson interval",
        )
    agreement = (report.get("labeler_agreement") or {}).get("agreement")
    if _is_number(agreement):
        ax.axhline(
            agreement,
            color="tab:green",
            linestyle="-.",
            linewidth=1.2,
            label=f"labeler agreement {100 * agreement:.1f}%",
        )
    ax.axhline(
        PAPER_RM_ACCURACY, color="tab:purple", linestyle=":", linewidth=1, label=f"paper {100 * PAPER_RM_ACCURACY:.1f}%"
    )
    ax.axhline(0.5, color="black", linestyle="--", linewidth=1, label="50% (chance)")
    ax.set_xticks(x, [str(r.get("round", i)) for i, r in enumerate(rounds)])
    ax.set_xlim(-0.5, len(rounds) - 0.5)
    ax.set_ylim(0.0, 1.05)
    ax.yaxis.set_major_formatter(_percent_formatter())
    ax.set_xlabel("RM round")
    ax.set_ylabel("accuracy on held-out comparisons")
    ax.set_title("Reward model accuracy per round")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def _phase_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        phases = r.get("phase_seconds")
        if isinstance(phases, Mapping):
            seen.update(dict.fromkeys(str(p) for p in phases))
    return [p for p in PHASES if p in seen] + [p for p in seen if p not in PHASES]


def _phase_seconds(
    fig_cls: type[Figure], rows: Sequence[Mapping[str, Any]], report: Mapping[str, Any]
) -> Figure | None:
    phases = _phase_names(rows)
    stages = {str(s): float(v) for s, v in (report.get("wall_seconds_per_stage") or {}).items() if _is_number(v)}
    if not phases and not stages:
        return None
    fig = fig_cls(figsize=(12.0, 4.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2 if phases and stages else 1, squeeze=False)[0]
    if phases:
        ax = axes[0]
        steps = [float(r["step"]) for r in rows]
        marker = "o" if len(steps) <= _MARKERS_UP_TO else None
        for phase in phases:
            secs = [_value((r.get("phase_seconds") or {}).get(phase)) for r in rows]
            ax.plot(steps, secs, marker=marker, markersize=3, label=phase)
        ax.set_xlabel("PPO step")
        ax.set_ylabel("seconds")
        ax.set_ylim(bottom=0.0)
        ax.set_title("Seconds per phase of a PPO step (score and reference overlap)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if stages:
        ax = axes[-1]
        names = list(stages)
        y = list(range(len(names)))
        ax.barh(y, [stages[s] for s in names], color="tab:orange")
        for yi, s in zip(y, names):
            ax.annotate(
                f"{stages[s]:.1f} s",
                (stages[s], yi),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize="small",
            )
        ax.set_yticks(y, names)
        ax.invert_yaxis()  # pipeline order, top to bottom
        ax.set_xlim(0.0, 1.15 * max(max(stages.values()), 1e-9))
        ax.set_xlabel("seconds")
        ax.set_title(f"Wall time per stage (total {sum(stages.values()):.1f} s)")
        ax.grid(True, axis="x", alpha=0.3)
    return fig


def _primary(report: Mapping[str, Any]) -> str:
    return (report.get("acceptance") or {}).get("primary_judge") or "gold"


def _percent_formatter() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=0)


_PlotFn = Callable[[Any, Sequence[Mapping[str, Any]], Mapping[str, Any]], Any]

_PLOTS: tuple[tuple[str, _PlotFn], ...] = (
    ("reward_kl.png", _reward_kl),
    ("win_rates.png", _win_rates),
    ("rm_accuracy.png", _rm_accuracy),
    ("phase_seconds.png", _phase_seconds),
)


# --- entry points ----------------------------------------------------------------------


def _png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        fig.clear()  # no pyplot registry to close from; drop the artists now
    return buf.getvalue()


def render_plots(run_dir: Path | str, report: Mapping[str, Any]) -> list[Path]:
    """Writes the run's PNG plots into run_dir/plots/ and returns their paths, in a fixed order.

    report: a `build_report_json` dict. A plot without data is skipped; one that fails to
    render is logged ("plot_failed") and skipped, so the report stage never fails on a plot.
    Without matplotlib, logs "plots_skipped" and returns [].
    """
    try:
        import matplotlib  # noqa: F401  (fails first when matplotlib is missing)
        from matplotlib.figure import Figure
    except ImportError as e:
        _log.warning("plots_skipped", reason="matplotlib is not installed (pip install 'alignd[report]')", error=str(e))
        return []

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    out_dir = run_dir / PLOTS_DIR
    written: list[Path] = []
    for name, plot in _PLOTS:
        try:
            fig = plot(Figure, rows, report)
            if fig is None:
                _log.info("plot_skipped", plot=name, reason="no data")
                continue
            data = _png_bytes(fig)
        except Exception:  # noqa: BLE001 - a plot that fails is logged and skipped; the report goes on
            _log.exception("plot_failed", plot=name)
            continue
        path = out_dir / name
        write_bytes_atomic(path, data)
        written.append(path)
    _log.info("plots_written", dir=str(out_dir), plots=[p.name for p in written], metrics_rows=len(rows))
    return written


def markdown_links(paths: Iterable[Path | str], run_dir: Path | str) -> str:
    """The "## Plots" Markdown section embedding `paths` relative to run_dir (where report.md lives).

    Empty when `paths` is. `alignd.evaluation.render_markdown(report, plots=...)` with the
    same relative paths writes the same section into the report.
    """
    return plots_markdown([Path(os.path.relpath(p, run_dir)).as_posix() for p in paths])
