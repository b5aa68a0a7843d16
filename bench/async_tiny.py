"""Does the async mode learn as well as on-policy? The tiny preset's whole pipeline, both ways (issue 8).

    .venv/bin/python bench/async_tiny.py [--seeds 0,1] [--ppo-steps N] [--out bench/results/async_tiny.json]

For each seed it runs `alignd run --preset tiny` (SFT, RM, 40 PPO steps with RM retraining, evaluation against
the gold judge) twice: as configured (on-policy) and with `pipeline.ppo.async_rollouts=true` (staleness 1). It
reports each run's gold win rate against the SFT policy with its 95% Wilson interval, the PPO stage's wall time,
the mean reward of the last 5 steps and the staleness of every step, and whether the async win rate is within
the noise of the on-policy one: at most half the width of the on-policy run's 95% interval away (the criterion
of tests/test_chaos.py), and a two-proportion z-test. With the preset's 40 steps both modes reach the ceiling
(a win rate near 1); `--ppo-steps 10` compares them where the policy is still learning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

from _launch import preset_argv, run_offline

ROOT = Path(__file__).resolve().parents[1]


def run(run_dir: Path, seed: int, async_rollouts: bool, ppo_steps: int | None) -> dict:
    overrides = [f"pipeline.seed={seed}", f"pipeline.ppo.async_rollouts={str(async_rollouts).lower()}"]
    if ppo_steps:
        overrides.append(f"pipeline.ppo.steps={ppo_steps}")
    out, wall = run_offline(preset_argv("tiny", run_dir, overrides))
    if out.returncode != 0:
        raise RuntimeError(f"alignd run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {
        "gold": report["win_rates"]["gold"],
        "wall_seconds": wall,
        "ppo_stage_seconds": report["wall_seconds_per_stage"].get("ppo"),
        "ppo_iteration_seconds_median": statistics.median(r["iteration_seconds"] for r in rows),
        "mean_score_last5": statistics.fmean(r["mean_score"] for r in rows[-5:]),
        "mean_score_per_step": [round(r["mean_score"], 4) for r in rows],
        "staleness": [r["staleness"] for r in rows],
    }


def compare(on: dict, asy: dict) -> dict:
    a, b = on["gold"], asy["gold"]
    tolerance = (a["upper"] - a["lower"]) / 2
    # Two-proportion z-test (ties count half, as in the win rate).
    p = (a["rate"] * a["n"] + b["rate"] * b["n"]) / (a["n"] + b["n"])
    se = math.sqrt(max(p * (1 - p) * (1 / a["n"] + 1 / b["n"]), 1e-12))
    z = (b["rate"] - a["rate"]) / se
    return {
        "difference": b["rate"] - a["rate"],
        "tolerance": tolerance,
        "within_tolerance": abs(b["rate"] - a["rate"]) <= tolerance,
        "z": z,
        "p_value_two_sided": math.erfc(abs(z) / math.sqrt(2)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--ppo-steps", type=int, default=None, help="PPO steps (default: the preset's)")
    ap.add_argument("--out", default=None, help="default: bench/results/async_tiny[_<N>steps].json")
    args = ap.parse_args(argv)
    suffix = f"_{args.ppo_steps}steps" if args.ppo_steps else ""
    out_path = Path(args.out or ROOT / "bench" / "results" / f"async_tiny{suffix}.json")
    results = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "ppo_steps": args.ppo_steps or "preset",
        "seeds": {},
    }
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory(prefix="async-tiny-") as tmp:
            on = run(Path(tmp) / "onpolicy", seed, False, args.ppo_steps)
            asy = run(Path(tmp) / "async", seed, True, args.ppo_steps)
        cmp = compare(on, asy)
        results["seeds"][str(seed)] = {"onpolicy": on, "async": asy, "comparison": cmp}
        for name, r in (("on-policy", on), ("async", asy)):
            g = r["gold"]
            print(
                f"seed {seed} {name}: gold win rate {g['rate']:.3f} [{g['lower']:.3f}, {g['upper']:.3f}] (n={g['n']}), "
                f"PPO stage {r['ppo_stage_seconds']:.1f} s, iteration {r['ppo_iteration_seconds_median']:.3f} s, "
                f"max staleness {max(r['staleness'])}",
                flush=True,
            )
        print(
            f"seed {seed}: difference {cmp['difference']:+.3f} (tolerance {cmp['tolerance']:.3f}: "
            f"{'within' if cmp['within_tolerance'] else 'OUTSIDE'}), z {cmp['z']:+.2f}, p "
            f"{cmp['p_value_two_sided']:.2f}",
            flush=True,
        )
    from alignd.atomic import write_json_atomic

    write_json_atomic(out_path, results)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
