"""The pipeline presets over several seeds: the figures the README reports, measured, with their spread (issue 18).

    .venv/bin/python bench/presets.py --preset tiny --seeds 0,1,2       # ~1 min a seed
    .venv/bin/python bench/presets.py --preset smollm2 --seeds 0,1,2    # up to 20 min a seed (after `make smollm2`)
    .venv/bin/python bench/presets.py --readme                          # README tables from the results file
    .venv/bin/python bench/presets.py --preset smollm2 --plot 0         # the README's plot, from a --keep run
    .venv/bin/python bench/presets.py --preset smollm2 --seeds 0 --merge  # one seed again, the others kept

Each seed is one `alignd run --preset NAME --set pipeline.seed=S` as a user runs it (the pipeline's seed drives
every stage's: SFT and RM shuffling, labeling, PPO prompts and sampling, the learner's minibatches, evaluation),
in a run directory of its own. Per seed the results file keeps the report's headline figures (win rates with
their 95% intervals, the acceptance verdict, RM accuracy and the labelers' agreement, KL to the reference,
reward and alignment tax), the stage times and the command's wall time; per preset the mean, standard deviation,
minimum and maximum over the seeds, the commit measured (and whether the tree had uncommitted changes), the
machine's cores, and whether every seed passed the preset's bar. A run of one preset replaces that preset's entry
and keeps the others.

`--readme` rewrites the README's tables between `<!-- presets:NAME:begin -->` and `<!-- presets:NAME:end -->`
from the results file; tests/test_bench_presets.py checks that the committed README matches the committed file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "presets.json"
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT / "libs"))  # alignd.atomic without an installed alignd (the --readme path)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()


def headline(report: dict, wall: float) -> dict:
    """The figures of one run's report.json that the README reports."""
    wr = report["win_rates"]
    acc = report["acceptance"]
    second = next((j for j in wr if j != acc["primary_judge"]), None)

    def rate(j):
        w = wr[j]
        return {k: w[k] for k in ("rate", "lower", "upper", "wins", "losses", "ties", "n")}

    tax = report["alignment_tax"]["with_ptx"] or report["alignment_tax"]["without_ptx"]
    kl = report["kl_to_reference"]
    rounds = report["rm_accuracy_per_round"]
    return {
        "gold": rate(acc["primary_judge"]),
        "second": rate(second) if second else None,
        "judges": {"gold": acc["primary_judge"], "second": second},
        "passed": acc["passed"],
        "bar": {k: acc[k] for k in ("min_rate", "min_lower", "secondary_min_rate")},
        "rm_accuracy": [{k: r.get(k) for k in ("accuracy", "n", "lower", "upper", "breakdown")} for r in rounds],
        "labeler_agreement": (report["labeler_agreement"] or {}).get("agreement"),
        "kl_per_token": kl["per_token"] if kl else None,
        "reward": {k: (v["mean"] if v else None) for k, v in report["reward"].items()},
        "reward_std": {k: (v["std"] if v else None) for k, v in report["reward"].items()},  # the RM's scale
        "alignment_tax": {k: tax[k] for k in ("before", "after", "absolute")} if tax else None,
        "ppo_steps": report["meta"].get("ppo_steps"),
        # How prompts reached the policy: its chat template (source and sha256, or "none") and system message.
        "chat_template": report["meta"].get("chat_template"),
        "system_prompt": report["meta"].get("system_prompt"),
        "stage_seconds": report["wall_seconds_per_stage"],
        "wall_seconds": wall,
    }


def run_seed(preset: str, seed: int, base: Path, extra: list[str]) -> dict:
    run_dir = base / f"{preset}-seed{seed}"
    from _launch import preset_argv, run_offline  # (here: the tests load this file without bench/ on sys.path)

    args = preset_argv(preset, run_dir, [f"pipeline.seed={seed}", *extra])
    print(f"{preset} seed {seed}: {' '.join(args[2:])}", flush=True)
    out, wall = run_offline(args)
    report_path = run_dir / "report.json"
    if out.returncode != 0 or not report_path.exists():
        raise RuntimeError(f"alignd run failed (exit {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    row = {"seed": seed, **headline(json.loads(report_path.read_text()), wall), "run_dir": str(run_dir)}
    g = row["gold"]
    print(
        f"  gold {g['rate']:.3f} [{g['lower']:.3f}, {g['upper']:.3f}]"
        + (f", second {row['second']['rate']:.3f}" if row["second"] else "")
        + f", passed {row['passed']}, {wall:.0f} s",
        flush=True,
    )
    return row


def spread(values: list[float]) -> dict | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


BREAKDOWN_KEYS = ("rm_vs_labeler_gold_untied", "rm_vs_labeler_when_labelers_agree", "rm_vs_gold", "gold_vs_labeler")


def _breakdown(row: dict, key: str) -> float | None:
    """The first RM round's accuracy `key` (alignd.rm_breakdown), None where the run has none."""
    b = row["rm_accuracy"][0].get("breakdown") if row["rm_accuracy"] else None
    return b[key]["accuracy"] if b else None


def summarise(rows: list[dict]) -> dict:
    def pick(f):
        return spread([f(r) for r in rows])

    return {
        "gold_rate": pick(lambda r: r["gold"]["rate"]),
        "gold_lower": pick(lambda r: r["gold"]["lower"]),
        "second_rate": pick(lambda r: r["second"]["rate"] if r["second"] else None),
        "rm_accuracy_first": pick(lambda r: r["rm_accuracy"][0]["accuracy"] if r["rm_accuracy"] else None),
        "rm_accuracy_last": pick(lambda r: r["rm_accuracy"][-1]["accuracy"] if r["rm_accuracy"] else None),
        "labeler_agreement": pick(lambda r: r["labeler_agreement"]),
        **{f"rm_breakdown_first.{k}": pick(lambda r, k=k: _breakdown(r, k)) for k in BREAKDOWN_KEYS},
        "kl_per_token": pick(lambda r: r["kl_per_token"]),
        "reward_sft": pick(lambda r: r["reward"].get("sft")),
        "reward_final": pick(lambda r: r["reward"].get("final")),
        "alignment_tax": pick(lambda r: r["alignment_tax"]["absolute"] if r["alignment_tax"] else None),
        "wall_seconds": pick(lambda r: r["wall_seconds"]),
        **{
            f"stage_seconds.{s}": pick(lambda r, s=s: r["stage_seconds"].get(s))
            for s in sorted({s for r in rows for s in r["stage_seconds"]})
        },
        "all_passed": all(r["passed"] for r in rows),
    }


def measure(preset: str, seeds: list[int], extra: list[str], keep: str | None, *, merge: bool = False) -> None:
    """Runs the seeds and writes the preset's entry; with merge, the seeds replace their rows of the entry there is
    (the others kept, each row with the commit it ran at) and the summary is made again over all of them."""
    # The results file itself does not count: the run of another preset just before rewrote it.
    dirty = bool(
        git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){RESULTS.relative_to(ROOT)}")
    )
    base = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=f"alignd-presets-{preset}-"))
    base.mkdir(parents=True, exist_ok=True)
    commit = git("rev-parse", "HEAD")
    rows = [{**run_seed(preset, s, base, extra), "commit": commit, "dirty": dirty} for s in seeds]
    if not keep:
        for r in rows:
            r.pop("run_dir")
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"schema_version": 1, "presets": {}}
    if merge and preset in data["presets"]:
        old = data["presets"][preset]
        kept = [{"commit": old["commit"], "dirty": old["dirty"], **r} for r in old["seeds"] if r["seed"] not in seeds]
        rows = sorted(kept + rows, key=lambda r: r["seed"])
    commits = list(dict.fromkeys(r["commit"] for r in rows))
    entry = {
        "commit": commits[-1] if len(commits) == 1 else commit,
        "commits": commits,  # every commit a row of this entry ran at (each row says its own)
        "dirty": any(r["dirty"] for r in rows),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "command": f"alignd run --preset {preset} --set pipeline.seed=S" + "".join(f" --set {kv}" for kv in extra),
        "seeds": rows,
        "summary": summarise(rows),
    }
    from alignd.atomic import write_json_atomic

    plot_kept = merge and data["presets"].get(preset, {}).get("readme_plot")
    if plot_kept and plot_kept["seed"] not in seeds:  # the README's plot is still that run's
        entry["readme_plot"] = plot_kept
    data["presets"][preset] = entry
    write_json_atomic(RESULTS, data)
    s = entry["summary"]
    print(
        f"{preset}: gold {s['gold_rate']['mean']:.3f} +- {s['gold_rate']['std']:.3f} over seeds {seeds}; "
        f"all passed: {s['all_passed']}; wrote {RESULTS}"
    )


# -- the README's tables ---------------------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def minsec(s: float) -> str:
    return f"{int(s // 60)} min {int(round(s % 60)):02d} s"


def render(preset: str, entry: dict) -> str:
    """The README's Markdown for one preset: a row per seed and the mean +- standard deviation."""
    rows = entry["seeds"]
    j = rows[0]["judges"]
    template = rows[0].get("chat_template")
    how = ""
    source, _, digest = (template or "none").partition(" ")
    if source != "none" and digest and digest != "(none)":  # "model (none)": a model without a template, plain text
        how = f" Prompts in the policy's chat template ({source}, sha256 `{digest[:12]}`)" + (
            f', system prompt "{rows[0]["system_prompt"]}".' if rows[0].get("system_prompt") else "."
        )
    commits = entry.get("commits") or [entry["commit"]]
    at = f"commit `{commits[0][:7]}`" if len(commits) == 1 else "commits " + ", ".join(f"`{c[:7]}`" for c in commits)
    per_seed = (
        " (seed by seed: " + ", ".join(f"{r['seed']} at `{r['commit'][:7]}`" for r in rows) + ")"
        if len(commits) > 1
        else ""
    )
    lines = [
        f"Measured at {at}{per_seed}{' (with uncommitted changes)' if entry['dirty'] else ''} on "
        f"{entry['machine']['cpus']} cores, {entry['date']} (`bench/presets.py --preset {preset}`; "
        f"`bench/results/presets.json`).{how}",
        "",
        f"| seed | win rate vs SFT, gold ({j['gold']}), 95% CI | second judge ({j['second']}) | bar | RM accuracy "
        "(labelers agree) | RM vs gold / gold vs labels | KL to reference, nats/token | alignment tax, nats/token | "
        "wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, sec = r["gold"], r["second"]
        rm = " / ".join(pct(x["accuracy"]) for x in r["rm_accuracy"]) or "n/a"
        tax = r["alignment_tax"]
        lines.append(
            f"| {r['seed']} | {pct(g['rate'])} [{pct(g['lower'])}, {pct(g['upper'])}] "
            f"({g['wins']} W / {g['losses']} L / {g['ties']} T, n = {g['n']}) | {pct(sec['rate']) if sec else 'n/a'} | "
            f"{'PASS' if r['passed'] else 'FAIL'} | {rm} ({pct(r['labeler_agreement'])}) | "
            f"{pct(_breakdown(r, 'rm_vs_gold'))} / {pct(_breakdown(r, 'gold_vs_labeler'))} | "
            f"{'n/a' if r['kl_per_token'] is None else format(r['kl_per_token'], '.3f')} | "
            f"{'n/a' if tax is None else format(tax['absolute'], '+.3f')} | {minsec(r['wall_seconds'])} |"
        )
    s = entry["summary"]

    def ms(key: str, fmt) -> str:
        v = s.get(key)
        return "n/a" if v is None else f"{fmt(v['mean'])} +- {fmt(v['std'])}"

    f3 = lambda x: format(x, ".3f")  # noqa: E731
    lines.append(
        f"| mean +- sd | {ms('gold_rate', pct)} | {ms('second_rate', pct)} | "
        f"{'all PASS' if s['all_passed'] else 'not all PASS'} | {ms('rm_accuracy_last', pct)} "
        f"({ms('labeler_agreement', pct)}) | {ms('rm_breakdown_first.rm_vs_gold', pct)} / "
        f"{ms('rm_breakdown_first.gold_vs_labeler', pct)} | {ms('kl_per_token', f3)} | "
        f"{ms('alignment_tax', lambda x: format(x, '+.3f'))} | "
        f"{ms('wall_seconds', minsec)} |"
    )
    stages = sorted(k.split(".", 1)[1] for k in s if k.startswith("stage_seconds."))
    if stages:
        lines += [
            "",
            "Stage times, mean over seeds: "
            + ", ".join(f"{st} {s['stage_seconds.' + st]['mean']:.0f} s" for st in stages)
            + ".",
        ]
    return "\n".join(lines)


def rewrite_readme(text: str, data: dict) -> str:
    """README text with every presets block replaced by its rendering; a block whose preset is missing raises."""

    def sub(m: re.Match) -> str:
        name = m.group(1)
        if name not in data["presets"]:
            raise KeyError(f"README block presets:{name}: no such preset in {RESULTS.relative_to(ROOT)}")
        return f"<!-- presets:{name}:begin -->\n{render(name, data['presets'][name])}\n<!-- presets:{name}:end -->"

    return re.sub(r"<!-- presets:([\w-]+):begin -->.*?<!-- presets:\1:end -->", sub, text, flags=re.S)


def plot(preset: str, seed: int) -> None:
    """Copies the reward/KL plot of a kept seed's run (bench/presets.py --keep) to docs/images/ for the README and
    records which run it is (the preset's entry: readme_plot, with its SHA-256, checked by the README's test)."""
    import hashlib
    import shutil

    from alignd.atomic import write_json_atomic

    data = json.loads(RESULTS.read_text())
    entry = data["presets"][preset]
    (row,) = [r for r in entry["seeds"] if r["seed"] == seed]
    if "run_dir" not in row:
        raise SystemExit(f"{preset} seed {seed}: its run directory was not kept (measure with --keep DIR)")
    src = Path(row["run_dir"]) / "plots" / "reward_kl.png"
    dst = ROOT / "docs" / "images" / f"{preset}-reward-kl.png"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    entry["readme_plot"] = {
        "seed": seed,
        "file": str(dst.relative_to(ROOT)),
        "sha256": hashlib.sha256(dst.read_bytes()).hexdigest(),
    }
    write_json_atomic(RESULTS, data)
    print(f"copied {src} to {dst.relative_to(ROOT)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=("tiny", "smollm2"))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", help="extra overrides for every run")
    ap.add_argument("--keep", metavar="DIR", help="keep the run directories under DIR (default: a temporary directory)")
    ap.add_argument("--readme", action="store_true", help="rewrite the README's preset tables from the results file")
    ap.add_argument("--merge", action="store_true", help="replace only these seeds' rows of the preset's entry")
    ap.add_argument("--plot", metavar="SEED", type=int, help="copy a kept seed's reward/KL plot for the README")
    args = ap.parse_args()
    if args.plot is not None:
        if not args.preset:
            ap.error("--plot needs --preset")
        plot(args.preset, args.plot)
    elif args.preset:
        measure(args.preset, [int(s) for s in args.seeds.split(",")], args.set, args.keep, merge=args.merge)
    if args.readme:
        data = json.loads(RESULTS.read_text())
        README.write_text(rewrite_readme(README.read_text(), data))
        print(f"rewrote {README.relative_to(ROOT)} from {RESULTS.relative_to(ROOT)}")
    if not (args.preset or args.readme):
        ap.error("give --preset and/or --readme")


if __name__ == "__main__":
    main()
