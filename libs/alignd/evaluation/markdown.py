"""report.md: the run report for people (`render_markdown`), with the paper's figures beside ours."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from alignd.evaluation.report import _check_relative_path
from alignd.evaluation.stats import _count

# Paper figures (Ouyang et al. 2022) shown next to ours in the Markdown report.
PAPER_RM_ACCURACY = 0.724  # training labelers (69.6% held-out labelers)
PAPER_LABELER_AGREEMENT = 0.73

# Alt text of the run's PNG plots (alignd.plots writes them into plots/) in report.md,
# by file name; another file's alt text is its name without the suffix.
PLOT_TITLES = {
    "reward_kl.png": "reward and KL",
    "win_rates.png": "win rates",
    "rm_accuracy.png": "RM accuracy",
    "phase_seconds.png": "phase seconds",
}


# --- report.md ---------------------------------------------------------------------------


def _pct(x: Any, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * float(x):.{digits}f}%"


def _num(x: Any, fmt: str = ".4g") -> str:
    return "n/a" if x is None else format(float(x), fmt)


def _signed(x: Any, fmt: str = ".4g") -> str:
    return "n/a" if x is None else format(float(x), "+" + fmt)


def _cell(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _fmt_win_rate(w: Mapping[str, Any]) -> str:
    conf = w.get("confidence") or 0.95
    ci = f"{round(100 * conf)}% CI {_pct(w['lower'])} to {_pct(w['upper'])}"
    return f"{_pct(w['rate'])} ({ci}, n={w['n']}, {w['method']})"


def _fmt_mean(m: Mapping[str, Any] | None) -> str:
    if not m:
        return "n/a"
    s = _num(m.get("mean"))
    if m.get("lower") is not None and m.get("upper") is not None:
        s += f" [{_num(m['lower'])}, {_num(m['upper'])}]"
    if m.get("n") is not None:
        s += f" (n={m['n']})"
    return s


def _fmt_tax(t: Mapping[str, Any] | None) -> str:
    if not t:
        return "n/a"
    s = f"{_signed(t['absolute'])} nats/token ({_num(t['before'])} -> {_num(t['after'])}"
    if t.get("relative") is not None:
        s += f", {_signed(100 * t['relative'], '.2f')}%"
    return s + ")"


def _fence(text: str) -> list[str]:
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]


def _clip(text: Any, limit: int) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[: max(0, limit - 3)].rstrip() + "..."


def _plot_lines(plots: Sequence[str | os.PathLike[str]], skip: Iterable[str] = ()) -> list[str]:
    skip = set(skip)
    lines: list[str] = []
    for p in plots:
        rel = _check_relative_path("plot", p)
        if rel in skip:
            continue
        skip.add(rel)
        name = rel.rsplit("/", 1)[-1]
        alt = PLOT_TITLES.get(name, name.rsplit(".", 1)[0].replace("_", " "))
        lines += [f"![{_cell(alt)}]({rel})", ""]
    return ["## Plots", ""] + lines if lines else []


def plots_markdown(plots: Sequence[str | os.PathLike[str]]) -> str:
    """The "## Plots" section of report.md embedding images by path relative to the report.

    Alt text from PLOT_TITLES by file name. Empty when `plots` is.
    """
    return "\n".join(_plot_lines(plots)).rstrip() + "\n" if plots else ""


def _meta_lines(report: Mapping[str, Any]) -> list[str]:
    """The run's metadata as one "key: value" line under the title (none when the report has no meta)."""
    meta = report.get("meta") or {}
    if not meta:
        return []
    return [", ".join(f"{k}: {json.dumps(v) if not isinstance(v, str) else v}" for k, v in meta.items()), ""]


def _by_primary_first(judges: Iterable[str], primary: str) -> list[str]:
    """Judges sorted by name with the acceptance's primary judge first."""
    return sorted(judges, key=lambda j: (j != primary, j))


def _headline_section(report: Mapping[str, Any], primary: str) -> list[str]:
    """ "## Headline": one row per number the report has (win rates, last RM round, agreement, KL, ...)."""
    win_rates: Mapping[str, Any] = report.get("win_rates") or {}
    acc: Mapping[str, Any] = report.get("acceptance") or {}
    rounds: Sequence[Mapping[str, Any]] = report.get("rm_accuracy_per_round") or []
    agreement = report.get("labeler_agreement")
    kl = report.get("kl_to_reference")
    reward = report.get("reward") or {}
    taxes = report.get("alignment_tax") or {}
    stages: Mapping[str, float] = report.get("wall_seconds_per_stage") or {}
    rows: list[list[str]] = []
    for judge in _by_primary_first(win_rates, primary):
        rows.append([f"Win rate vs SFT ({judge})", _fmt_win_rate(win_rates[judge])])
    if rounds:
        last = rounds[-1]
        rows.append(
            [
                f"RM accuracy (round {last['round']}, held-out)",
                f"{_pct(last['accuracy'])} (paper {_pct(PAPER_RM_ACCURACY)})",
            ]
        )
    if agreement:
        rows.append(
            [
                "Simulated-labeler agreement",
                f"{_pct(agreement['agreement'])} (paper ~{_pct(PAPER_LABELER_AGREEMENT, 0)})",
            ]
        )
    if kl:
        rows.append(
            ["KL to reference", f"{_num(kl['per_sequence'])} nats/sequence, {_num(kl['per_token'])} nats/token"]
        )
    if reward.get("sft") or reward.get("final"):
        rows.append(["Reward (SFT -> final)", f"{_fmt_mean(reward.get('sft'))} -> {_fmt_mean(reward.get('final'))}"])
    for key, label in (("without_ptx", "PPO"), ("with_ptx", "PPO-ptx")):
        if taxes.get(key):
            rows.append([f"Alignment tax ({label})", _fmt_tax(taxes[key])])
    if stages:
        rows.append(["Wall time, all stages", f"{sum(stages.values()):.1f} s"])
    if acc:
        rows.append(["Acceptance", "PASS" if acc.get("passed") else "FAIL"])
    return ["## Headline", ""] + _table(["metric", "value"], rows) + [""]


def _acceptance_bar(acc: Mapping[str, Any], primary: str) -> str:
    """The acceptance bar in words, each part followed by whether this run met it."""
    others = ", ".join(f"{j}: {'met' if ok else 'not met'}" for j, ok in (acc.get("secondary_ok") or {}).items())
    return (
        f"Bar: {primary} win rate >= {_pct(acc.get('min_rate'), 0)} with the lower bound above "
        f"{_pct(acc.get('min_lower'), 0)} ({'met' if acc.get('primary_ok') else 'not met'}); every other judge "
        f">= {_pct(acc.get('secondary_min_rate'), 0)} (" + (others or "no other judge") + ")."
    )


def _win_rates_section(report: Mapping[str, Any], primary: str) -> list[str]:
    """ "## Win rates against the SFT policy": one row per judge, then the acceptance bar when there is one."""
    win_rates: Mapping[str, Any] = report.get("win_rates") or {}
    acc: Mapping[str, Any] = report.get("acceptance") or {}
    out = ["## Win rates against the SFT policy", ""]
    if not win_rates:
        return out + ["n/a", ""]
    out += _table(
        ["judge", "win rate", "CI", "wins", "ties", "losses", "n", "interval"],
        [
            [
                j,
                _pct(w["rate"]),
                f"{_pct(w['lower'])} to {_pct(w['upper'])}",
                _count(w["wins"]),
                _count(w["ties"]),
                _count(w["losses"]),
                w["n"],
                f"{round(100 * (w.get('confidence') or 0.95))}% {w['method']}",
            ]
            for j, w in ((j, win_rates[j]) for j in _by_primary_first(win_rates, primary))
        ],
    )
    out += ["", "Ties count as half a win; n is the number of held-out prompts."]
    if acc:
        out += ["", _acceptance_bar(acc, primary)]
    return out + [""]


# Rows of the "where the RM errs" table: the key in a round's breakdown and its label.
RM_BREAKDOWN_ROWS = (
    ("rm_vs_labeler", "RM vs the labels it trained on, all pairs"),
    ("rm_vs_labeler_gold_untied", "... pairs the gold judge orders"),
    ("rm_vs_labeler_gold_tied", "... pairs the gold judge ties (coin flips for the labelers)"),
    ("rm_vs_labeler_when_labelers_agree", "... pairs the labelers agree on"),
    ("gold_vs_labeler", "the gold judge vs the same labels (an RM's ceiling)"),
    ("rm_vs_gold", "RM vs the gold judge, pairs it orders"),
    ("labeler_vs_gold", "labeler vs the gold judge, pairs it orders"),
    ("labelers_agreement", "labelers with each other"),
)


def _rm_breakdown_table(broken: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where the RM errs: one column per round that has a breakdown, one row per kind of pair."""
    return ["", "Where the RM errs (held-out pairs; alignd.rm_breakdown):", ""] + _table(
        ["pairs"] + [f"round {r['round']}" for r in broken],
        [
            [text] + [f"{_pct(r['breakdown'][key]['accuracy'])} (n = {r['breakdown'][key]['n']})" for r in broken]
            for key, text in RM_BREAKDOWN_ROWS
        ]
        + [["gold ties, share of pairs"] + [_pct(r["breakdown"]["gold_tie_fraction"]) for r in broken]],
    )


def _rm_accuracy_section(report: Mapping[str, Any]) -> list[str]:
    """ "## Reward model accuracy on held-out comparisons": one row per round, then the breakdown if any."""
    rounds: Sequence[Mapping[str, Any]] = report.get("rm_accuracy_per_round") or []
    out = ["## Reward model accuracy on held-out comparisons", ""]
    if not rounds:
        return out + ["n/a", ""]
    out += _table(
        ["round", "accuracy", "95% CI", "n"],
        [
            [
                r["round"],
                _pct(r["accuracy"]),
                "n/a" if r.get("lower") is None else f"{_pct(r['lower'])} to {_pct(r['upper'])}",
                r.get("n") or "n/a",
            ]
            for r in rounds
        ],
    )
    broken = [r for r in rounds if r.get("breakdown")]
    if broken:
        out += _rm_breakdown_table(broken)
    return out + [""]


def _fmt_agreement(agreement: Mapping[str, Any] | None) -> str:
    """The simulated labelers' agreement with its standard error and temperature when known."""
    if not agreement:
        return "n/a"
    return (
        _pct(agreement["agreement"])
        + ("" if agreement.get("stderr") is None else f" +- {_pct(agreement['stderr'])}")
        + ("" if agreement.get("temperature") is None else f" at T={_num(agreement['temperature'])}")
    )


def _kl_reward_tax_section(report: Mapping[str, Any]) -> list[str]:
    """ "## KL, reward and alignment tax": every quantity, "n/a" where the report lacks it."""
    kl = report.get("kl_to_reference")
    reward = report.get("reward") or {}
    taxes = report.get("alignment_tax") or {}
    out = ["## KL, reward and alignment tax", ""]
    out += _table(
        ["quantity", "value"],
        [
            ["KL to reference per sequence", _num(kl["per_sequence"]) if kl else "n/a"],
            ["KL to reference per token", _num(kl["per_token"]) if kl else "n/a"],
            ["Reward, SFT policy", _fmt_mean(reward.get("sft"))],
            ["Reward, final policy", _fmt_mean(reward.get("final"))],
            ["Alignment tax, PPO", _fmt_tax(taxes.get("without_ptx"))],
            ["Alignment tax, PPO-ptx", _fmt_tax(taxes.get("with_ptx"))],
            ["Simulated-labeler agreement", _fmt_agreement(report.get("labeler_agreement"))],
        ],
    )
    return out + ["", "Alignment tax: LM loss on held-out plain text after PPO minus before (positive: worse).", ""]


def _wall_time_section(report: Mapping[str, Any]) -> list[str]:
    """ "## Wall time per stage" with the total (none when the report has no stage times)."""
    stages: Mapping[str, float] = report.get("wall_seconds_per_stage") or {}
    if not stages:
        return []
    return (
        ["## Wall time per stage", ""]
        + _table(
            ["stage", "seconds"],
            [[s, f"{v:.1f}"] for s, v in stages.items()] + [["total", f"{sum(stages.values()):.1f}"]],
        )
        + [""]
    )


def _figures_section(figures: Mapping[str, str]) -> list[str]:
    """ "## Figures": the report's own figures by title (none when it has none)."""
    if not figures:
        return []
    out = ["## Figures", ""]
    for t, p in figures.items():
        out += [f"![{_cell(t)}]({_check_relative_path(t, p)})", ""]
    return out


def _sample_lines(i: int, s: Mapping[str, Any], max_chars: int) -> list[str]:
    """One "### Sample i": the prompt, the SFT and final responses with each judge's score, the image if any."""
    out = [f"### Sample {i}", "", "**Prompt**", ""] + _fence(_clip(s.get("prompt"), max_chars)) + [""]
    scores: Mapping[str, Mapping[str, Any]] = s.get("scores") or {}
    for key, label in (("sft", "SFT policy"), ("final", "final policy")):
        judged = ", ".join(f"{j}: {_num(sc.get(key))}" for j, sc in scores.items() if sc.get(key) is not None)
        out += [f"**{label}**" + (f" ({judged})" if judged else ""), ""] + _fence(_clip(s.get(key), max_chars)) + [""]
    if s.get("image"):
        out += [f"![sample {i}]({_check_relative_path(f'sample {i}', s['image'])})", ""]
    return out


def _samples_section(samples: Sequence[Mapping[str, Any]] | None, *, max_samples: int, max_chars: int) -> list[str]:
    """ "## Samples (shown of all)": the first `max_samples` samples (none without samples)."""
    if not samples:
        return []
    shown = list(samples)[: max(0, max_samples)]
    out = [f"## Samples ({len(shown)} of {len(samples)})", ""]
    for i, s in enumerate(shown, 1):
        out += _sample_lines(i, s, max_chars)
    return out


def render_markdown(
    report: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]] | None = None,
    *,
    title: str = "alignd run report",
    max_samples: int = 5,
    max_chars: int = 800,
    plots: Sequence[str | os.PathLike[str]] | None = None,
) -> str:
    """A readable Markdown report from a `build_report_json` dict (text only; images by relative path).

    samples: dicts {"prompt", "sft", "final", "scores": {judge: {"sft": x, "final": y}},
    "image": optional relative path}: the SFT policy's and the final policy's responses to
    a held-out prompt with each judge's scores. The first `max_samples` are shown, each text
    cut to `max_chars` characters. Sections that the report does not have read "n/a".
    plots: image paths relative to the report (as `alignd.plots.render_plots` writes them,
    e.g. "plots/reward_kl.png"), shown in a "## Plots" section before the samples; a path
    already among the report's figures is not shown twice.
    """
    primary = (report.get("acceptance") or {}).get("primary_judge", "gold")
    figures: Mapping[str, str] = report.get("figures") or {}
    out: list[str] = [f"# {title}", ""] + _meta_lines(report)
    out += _headline_section(report, primary)
    out += _win_rates_section(report, primary)
    out += _rm_accuracy_section(report)
    out += _kl_reward_tax_section(report)
    out += _wall_time_section(report)
    out += _figures_section(figures)
    if plots:
        out += _plot_lines(plots, skip=(_check_relative_path(t, p) for t, p in figures.items()))
    out += _samples_section(samples, max_samples=max_samples, max_chars=max_chars)
    return "\n".join(out).rstrip() + "\n"
