"""alignd against TRL's PPO trainer, side by side in one run (issue 8).

    .venv/bin/python bench/ppo_vs_trl.py [--models tiny,smollm2] [--warmup 2] [--iterations 8]
        [--out bench/results/ppo_vs_trl.json] [--quiet-wait-s 60] [--variant NAME=KEY=VALUE;KEY=VALUE ...]

For each model it runs, one after the other on the same machine:
- TRL 1.12.0's `trl.experimental.ppo.PPOTrainer` (the last release that has it), in a subprocess of its own;
- `alignd ppo` on the local stack (every role a process, real gRPC on loopback), on-policy;
- the same with `run.async_rollouts: true` (the next step's rollouts made while the learner trains, staleness 1);
with the same policy, reward model (also the value model's initialisation), prompts, batch size, minibatches,
PPO epochs, response length, temperature and KL coefficient. Both run on the CPU threads they are given (TRL
in one process, alignd's roles one thread each as in the preset), fp32.

Seconds per iteration are the median over the timed iterations (after warm-up) of the wall time from one
iteration's end to the next: TRL's `on_step_end` callback, alignd's metrics.jsonl `time`. alignd's phase
breakdown (generate, score, reference, train, sync_weights; async adds wait_rollout and wait_generation, and
its generate/score/reference overlap the previous step's train) is the median of each phase. What differs in
the work done is listed in bench/README.md (alignd pushes the weights to the policy role each iteration; TRL
does not). Besides the JSON it writes a Markdown table next to it (same name, .md), as shown in docs/benchmarks.md.

`--variant NAME=SETS` adds an alignd run with `--set` overrides of its own (`;`-separated), measured like the
others and reported as `alignd_NAME_*` (and in a second table), e.g.
`--variant "async_nostage=run.async_rollouts=true;run.stage_weights=false"`
`--variant "async_micro2=run.async_rollouts=true;run.rollout_micro_batches=2"`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _launch import alignd_argv, run_offline, set_flags  # noqa: E402
from _proc import process_ticks, system_ticks  # noqa: E402
from smollm2_timings import NCPU, Meter  # noqa: E402  (the quiet-machine gate of the other benches)


class TreeMeter(Meter):
    def snap(self):
        return time.perf_counter(), system_ticks()[0], process_ticks(reaped_children=True)


# The tiny preset's PPO shape (configs/tiny.yaml), with a reward *model* instead of its function reward:
# TRL can only score with a model.
TINY = dict(
    policy="builtin:tiny-gpt2",
    reward="builtin:tiny-gpt2-reward",
    prompts=str(ROOT / "configs" / "tiny_prompts.txt"),
    batch=16,
    minibatches=2,
    epochs=4,
    response_tokens=16,
    temperature=1.0,
    kl_coef=0.02,
    lr=5e-3,
    config=str(ROOT / "configs" / "tiny.yaml"),
)
# The real-model preset's PPO shape (configs/smollm2_pipeline.yaml), with a separate value model as TRL has:
# the policy SmolLM2-135M-Instruct (`make smollm2`), a reward model of the same backbone with a seeded head.
SMOLLM2 = dict(
    batch=16,
    minibatches=2,
    epochs=1,
    response_tokens=24,
    temperature=1.0,
    kl_coef=0.05,
    lr=4e-5,
)


def _prompt_texts(path: str) -> list[str]:
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.endswith(".jsonl"):
        return [json.loads(line)["prompt"] for line in lines]
    return [line.strip() for line in lines]


def smollm2_spec(work_root: Path) -> dict:
    """The SmolLM2 models and prompts (`make smollm2` first), a reward model built once, and a PPO job config."""
    import torch
    import yaml
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignd import assets

    policy = assets.ensure_smollm2()
    prompts = assets.ensure_prompt_corpus()
    rm = assets.default_cache_dir() / "bench" / "smollm2-135m-rm"
    if not (rm / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(policy))
        model.config.pad_token_id = tok.pad_token_id
        tmp = rm.with_name(rm.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, rm)
    stack = yaml.safe_load((ROOT / "configs" / "smollm2_pipeline.yaml").read_text())["stack"]
    job = work_root / "smollm2_ppo.yaml"
    job.write_text(yaml.safe_dump({"stack": stack, "run": {"prompts": {"path": str(prompts)}}}))
    return {**SMOLLM2, "policy": str(policy), "reward": str(rm), "prompts": str(prompts), "config": str(job)}


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _deltas(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


# -- TRL, in a process of its own ---------------------------------------------------------------------
def trl_worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    torch.set_num_threads(spec["threads"])
    tok = AutoTokenizer.from_pretrained(spec["policy"])
    tok.padding_side = "left"
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in _prompt_texts(spec["prompts"])]
    data = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
    n_iter = spec["warmup"] + spec["iterations"]
    cfg = PPOConfig(
        output_dir=spec["out_dir"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        num_mini_batches=spec["minibatches"],
        num_ppo_epochs=spec["epochs"],
        response_length=spec["response_tokens"],
        temperature=spec["temperature"],
        kl_coef=spec["kl_coef"],
        learning_rate=spec["lr"],
        total_episodes=n_iter * spec["batch"],
        local_rollout_forward_batch_size=spec["batch"],
        stop_token=None,
        missing_eos_penalty=None,
        num_sample_generations=0,
        lr_scheduler_type="constant",
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

    clock = Clock()
    trainer = PPOTrainer(
        args=cfg,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=data,
        eval_dataset=data,
        callbacks=[clock],
    )
    trainer.train()
    Path(spec["result"]).write_text(json.dumps({"marks": clock.marks, "threads": spec["threads"]}))
    return 0


def run_trl(spec: dict, work: Path) -> dict:
    spec = {**spec, "out_dir": str(work / "trl-out"), "result": str(work / "trl.json")}
    (work / "trl-spec.json").write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(
        [sys.executable, __file__, "--_trl-worker", str(work / "trl-spec.json")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"TRL worker failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    marks = json.loads((work / "trl.json").read_text())["marks"]
    per_iter = _deltas(marks)[spec["warmup"] :]
    return {"seconds_per_iteration": _median(per_iter), "seconds_all": per_iter}


# -- alignd ------------------------------------------------------------------------------------------
def run_alignd(
    spec: dict, work: Path, async_rollouts: bool = False, extra: tuple[str, ...] = (), name: str = ""
) -> dict:
    n_iter = spec["warmup"] + spec["iterations"]
    run_dir = work / ("alignd-" + name if name else "alignd-async" if async_rollouts else "alignd")
    sets = [
        f"run.steps={n_iter}",
        f"run.prompts_per_step={spec['batch']}",
        f"run.prompts.path={spec['prompts']}",
        f"run.sampling.max_new_tokens={spec['response_tokens']}",
        f"run.sampling.temperature={spec['temperature']}",
        "run.sampling.ignore_eos=true",
        "stack.reward.function=null",
        f"stack.reward.model.path={spec['reward']}",
        "stack.learner.value_head_on_policy=false",
        f"stack.learner.value_model.path={spec['reward']}",
        f"stack.learner.ppo.minibatches={spec['minibatches']}",
        f"stack.learner.ppo.epochs={spec['epochs']}",
        f"stack.learner.ppo.kl_coef={spec['kl_coef']}",
        f"stack.learner.optimizer.lr={spec['lr']}",
        "stack.learner.checkpoint_every_steps=0",
        f"run.async_rollouts={str(async_rollouts).lower()}",
        *extra,
    ]
    out, _ = run_offline(alignd_argv("ppo", "--config", spec["config"], "--run-dir", str(run_dir), *set_flags(sets)))
    if out.returncode != 0:
        raise RuntimeError(f"alignd ppo failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    per_iter = _deltas([r["time"] for r in rows])[spec["warmup"] - 1 :]
    timed = rows[spec["warmup"] :]
    # (stage_weights is there only in the steps whose weights were staged: the median of those)
    keys = dict.fromkeys(k for r in timed for k in r["phase_seconds"])
    phases = {k: _median([r["phase_seconds"][k] for r in timed if k in r["phase_seconds"]]) for k in keys}
    info = {
        "staleness": [r["staleness"] for r in timed],
        "old_logprobs_from_rollout": all(r["old_logprobs_from_rollout"] for r in timed if not r["staleness"]),
        "mean_score_last": rows[-1]["mean_score"],
    }
    if any(r["staleness"] for r in timed):
        info["behaviour_weight_mean"] = statistics.fmean(r["behaviour_weight_mean"] for r in timed)
        info["behaviour_truncated_fraction"] = statistics.fmean(r["behaviour_truncated_fraction"] for r in timed)
    info["staged_steps"] = sum(1 for r in timed if "stage_weights" in r["phase_seconds"])
    if extra:
        info["overrides"] = list(extra)
    return {"seconds_per_iteration": _median(per_iter), "seconds_all": per_iter, "phase_seconds": phases, **info}


PHASE_COLUMNS = ("generate", "score", "reference", "rollout", "train", "stage_weights", "sync_weights")


def markdown(results: dict) -> str:
    """docs/benchmarks.md's table: seconds per iteration (median), tokens/s and ratios, then alignd's phases."""
    m = results["machine"]
    lines = [
        f"Measured {results['date']} on {m['cpus']} CPU cores ({m['processor']}), torch {m['torch']}, "
        f"transformers {m['transformers']}, TRL {m['trl']}; `bench/ppo_vs_trl.py`, median of the timed iterations.",
        "",
        "| model | TRL s/iter | alignd on-policy s/iter | alignd async s/iter | on-policy / TRL | async / TRL "
        "| TRL tok/s | on-policy tok/s | async tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["models"].items():

        def f(key, fmt="{:.3f}"):
            v = r.get(key)
            return fmt.format(v) if v is not None else "n/a"

        lines.append(
            f"| {name} | {f('trl_seconds_per_iteration')} | {f('alignd_onpolicy_seconds_per_iteration')} "
            f"| {f('alignd_async_seconds_per_iteration')} | {f('alignd_onpolicy_over_trl', '{:.2f}x')} "
            f"| {f('alignd_async_over_trl', '{:.2f}x')} | {f('trl_tokens_per_second', '{:.0f}')} "
            f"| {f('alignd_onpolicy_tokens_per_second', '{:.0f}')} | {f('alignd_async_tokens_per_second', '{:.0f}')} |"
        )
    lines += [
        "",
        "alignd's phases, median seconds (async: generate, score and reference overlap the previous step's "
        "train; wait_rollout is the time the learner waited for them):",
        "",
        "| model | mode | " + " | ".join(PHASE_COLUMNS) + " | wait_rollout |",
        "|---|---|" + "---|" * (len(PHASE_COLUMNS) + 1),
    ]
    for name, r in results["models"].items():
        modes = [
            k[len("alignd_") : -len("_phase_seconds")]
            for k in r
            if k.startswith("alignd_") and k.endswith("_phase_seconds")
        ]
        for mode in modes:
            ph = r.get(f"alignd_{mode}_phase_seconds")
            if ph:
                cells = " | ".join(f"{ph[k]:.3f}" if k in ph else "" for k in (*PHASE_COLUMNS, "wait_rollout"))
                lines.append(f"| {name} | {mode} | {cells} |")
    variants = [
        (name, k[len("alignd_") : -len("_overrides")], r)
        for name, r in results["models"].items()
        for k in r
        if k.startswith("alignd_") and k.endswith("_overrides")
    ]
    if variants:
        lines += [
            "",
            "Variants (`--variant`), median s/iteration:",
            "",
            "| model | variant | overrides | s/iter | / TRL | / async |",
            "|---|---|---|---|---|---|",
        ]
        for name, v, r in variants:
            sec = r[f"alignd_{v}_seconds_per_iteration"]
            lines.append(
                f"| {name} | {v} | `{'; '.join(r[f'alignd_{v}_overrides'])}` | {sec:.3f} "
                f"| {sec / r['trl_seconds_per_iteration']:.2f}x | "
                f"{sec / r['alignd_async_seconds_per_iteration']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny", help="comma-separated: tiny, smollm2 (after `make smollm2`)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--trl-threads", type=int, default=NCPU, help="torch threads of the TRL process")
    ap.add_argument("--quiet-wait-s", type=float, default=60.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ppo_vs_trl.json"))
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE;...",
        help="one more alignd run with these --set overrides, reported as alignd_NAME_*",
    )
    ap.add_argument("--_trl-worker", dest="trl_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trl_worker:
        return trl_worker(args.trl_worker)

    import torch
    import transformers
    import trl

    from alignd.models.tiny import resolve_builtin

    results = {
        "machine": {
            "cpus": NCPU,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "processor": platform.processor() or platform.machine(),
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "models": {},
    }
    meter = TreeMeter(args.quiet_wait_s)
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="ppo-vs-trl-") as tmp:
            work = Path(tmp)
            if name == "tiny":
                spec = {**TINY, "policy": resolve_builtin(TINY["policy"]), "reward": resolve_builtin(TINY["reward"])}
            elif name == "smollm2":
                spec = smollm2_spec(work)
            else:
                raise SystemExit(f"unknown model {name!r}: tiny or smollm2")
            spec.update(warmup=args.warmup, iterations=args.iterations, threads=args.trl_threads)
            row: dict = {"settings": {k: v for k, v in spec.items() if k not in ("policy", "reward", "config")}}
            runs = [
                ("trl", run_trl),
                ("alignd_onpolicy", run_alignd),
                ("alignd_async", lambda sp, w: run_alignd(sp, w, async_rollouts=True)),
            ]
            for v in args.variant:
                vname, _, sets = v.partition("=")
                runs.append(
                    (
                        f"alignd_{vname}",
                        lambda sp, w, vname=vname, sets=sets: run_alignd(
                            sp, w, extra=tuple(x for x in sets.split(";") if x), name=vname
                        ),
                    )
                )
            for key, fn in runs:
                meter.wait_quiet()
                a = meter.snap()
                res = fn(spec, work)
                b = meter.snap()
                row[f"{key}_seconds_per_iteration"] = res["seconds_per_iteration"]
                row[f"{key}_seconds_all"] = res["seconds_all"]
                row[f"{key}_foreign_cpu"] = round(Meter.foreign(a, b), 3)
                for k, v in res.items():
                    if k not in ("seconds_per_iteration", "seconds_all"):
                        row[f"{key}_{k}"] = v
                print(
                    f"{name} {key}: {res['seconds_per_iteration']:.3f} s/iteration "
                    f"({', '.join(f'{x:.3f}' for x in res['seconds_all'])})",
                    flush=True,
                )
            tokens = spec["batch"] * spec["response_tokens"]
            for key, _ in runs:
                s = row[f"{key}_seconds_per_iteration"]
                row[f"{key}_tokens_per_second"] = tokens / s if s else None
            for mode in ("onpolicy", "async", *(v.partition("=")[0] for v in args.variant)):
                row[f"alignd_{mode}_over_trl"] = (
                    row[f"alignd_{mode}_seconds_per_iteration"] / row["trl_seconds_per_iteration"]
                )
            row["async_speedup"] = (
                row["alignd_onpolicy_seconds_per_iteration"] / row["alignd_async_seconds_per_iteration"]
            )
            results["models"][name] = row
            print(
                f"{name}: alignd on-policy / TRL = {row['alignd_onpolicy_over_trl']:.2f}x, "
                f"async / TRL = {row['alignd_async_over_trl']:.2f}x",
                flush=True,
            )
    from alignd.atomic import write_json_atomic

    write_json_atomic(Path(args.out), results)
    table = markdown(results)
    md = Path(args.out).with_suffix(".md")
    md.write_text(table)
    print(table)
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
