"""A pipeline's last two stages: evaluate (the final policy against SFT on held-out prompts, by the gold judge, a
second judge and the RM; the alignment tax; the KL to the reference) and report (report.json, validated against
alignd.evaluation's schema, with report.md and its plots).

Held-out samples: RUN_DIR/eval_sft.jsonl (sampled after the SFT stage) and eval_final.jsonl, one prompt per line:
{"prompt", "responses", "token_ids", "prompt_token_ids"}. Both stages recompute from them, so either can run
again after a restart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from alignd import evaluation
from alignd.atomic import write_bytes_atomic, write_json_atomic
from alignd.data import write_jsonl_atomic
from alignd.plots import render_plots
from alignd.services.coordinator.rollouts import score
from alignd.services.coordinator.runs import read_jsonl
from alignd.v1 import reward_pb2

if TYPE_CHECKING:
    from alignd.services.coordinator.pipeline import PipelineRun

EVAL_FILES = {"sft": "eval_sft.jsonl", "final": "eval_final.jsonl"}


def write_eval_samples(run: PipelineRun, which: str, *, span: tuple[float, float]) -> None:
    """Samples of the policy the replicas serve now (`which`: "sft" or "final") for the held-out prompts; the
    stage's progress goes from span[0] to span[1] as they come."""
    ev = run.cfg.evaluation
    prompts = run.eval_prompts_all[: ev.max_prompts]
    lo, hi = span

    def progress(done: int, total: int) -> None:
        run.progress(lo + (hi - lo) * done / total, f"sampling held-out prompts: {done}/{total} completions")

    progress(0, len(prompts) * ev.samples_per_prompt)
    groups = run.loop.rollouts.sample_texts(
        prompts, ev.samples_per_prompt, ev.sampling, seed=run.cfg.seed + 1, system=ev.prompts.system,
        on_progress=progress,
    )  # fmt: skip
    rows = [
        {
            "prompt": p,
            "responses": [s.text for s in g],
            "token_ids": [list(s.token_ids) for s in g],
            "prompt_token_ids": list(g[0].prompt_token_ids),
        }
        for p, g in zip(prompts, groups)
    ]
    write_jsonl_atomic(run.record.path / EVAL_FILES[which], rows)


def read_eval_samples(run_dir: Path, which: str) -> list[dict]:
    """The held-out samples written by write_eval_samples (also those of runs that wrote them as one JSON object,
    {"samples": [...]}, before eval files were JSONL)."""
    path = run_dir / EVAL_FILES[which]
    try:
        whole = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:  # several lines: JSONL
        return read_jsonl(path)
    return whole["samples"] if isinstance(whole, dict) and "samples" in whole else [whole]


def stage_evaluate(run: PipelineRun) -> None:
    """evaluation.json: win rates of the final policy over SFT (gold and second judge), both judges' and the RM's
    scores, the KL to the reference at the last step."""
    write_eval_samples(run, "final", span=(0.0, 0.5))
    run.progress(0.5, "held-out text loss")
    run.text_loss("final")
    run.progress(0.7, "judging and scoring the samples")
    sft, final = read_eval_samples(run.record.path, "sft"), read_eval_samples(run.record.path, "final")
    result = {"win_rates": {}, "reward": {}}
    for name, judge in (("gold", run.gold), ("second", run.second)):
        a = [[judge(r["prompt"], x) for x in r["responses"]] for r in final]
        b = [[judge(r["prompt"], x) for x in r["responses"]] for r in sft]
        result["win_rates"][name] = evaluation.win_rate(a, b).to_dict()
        result[f"{name}_mean"] = {
            "sft": sum(map(sum, b)) / sum(map(len, b)),
            "final": sum(map(sum, a)) / sum(map(len, a)),
        }
    for key, rows in (("sft", sft), ("final", final)):
        items = [
            reward_pb2.ScoreItem(
                tokens=reward_pb2.TokenPair(prompt_token_ids=r["prompt_token_ids"], response_token_ids=t)
            )
            for r in rows
            for t in r["token_ids"]
            if t
        ]
        result["reward"][key] = score(run.roles, run.loop.sync, items)
    rows = run.loop.log.read()
    result["kl_to_reference"] = rows[-1]["reference_kl"] if rows else None
    write_json_atomic(run.record.path / "evaluation.json", result)


def stage_report(run: PipelineRun) -> None:
    """report.json (validated), report.md with the plots and the first five held-out samples of both policies."""
    path = run.record.path
    ev = json.loads((path / "evaluation.json").read_text())
    report = evaluation.build_report_json(**_report_fields(run, ev))
    write_json_atomic(path / "report.json", report)
    sft, final = read_eval_samples(path, "sft"), read_eval_samples(path, "final")
    samples = [
        {
            "prompt": a["prompt"],
            "sft": a["responses"][0],
            "final": b["responses"][0],
            "scores": {
                "gold": {
                    "sft": run.gold(a["prompt"], a["responses"][0]),
                    "final": run.gold(b["prompt"], b["responses"][0]),
                }
            },
        }
        for a, b in list(zip(sft, final))[:5]
    ]
    plots = render_plots(path, report)
    md = evaluation.render_markdown(report, samples, plots=[p.relative_to(path).as_posix() for p in plots])
    write_bytes_atomic(path / "report.md", md.encode())
    run.loop.tracker.report(report, [path / "report.json", path / "report.md", *plots])
    run.record.latest_metrics.update(
        {
            "gold_win_rate": report["win_rates"]["gold"]["rate"],
            "gold_win_rate_lower": report["win_rates"]["gold"]["lower"],
        }
    )


def _report_fields(run: PipelineRun, ev: dict) -> dict:
    """build_report_json's arguments, from evaluation.json and the run's state."""
    st = run.state
    tax = None
    if "sft" in st.text_loss and "final" in st.text_loss:
        ptx = any(r.get("ptx_loss") for r in run.loop.log.read())
        tax = {"with_ptx" if ptx else "without_ptx": (st.text_loss["sft"].loss, st.text_loss["final"].loss)}
    pol = run.roles.info(run.roles.policy[0])
    return dict(
        alignment_tax=tax,
        win_rates=ev["win_rates"],
        rm_accuracy_per_round=[r.model_dump() for r in st.rm_rounds],
        labeler_agreement=st.labeler_agreement or None,
        kl_to_reference={"per_token": ev["kl_to_reference"]} if ev.get("kl_to_reference") is not None else None,
        reward={"sft": ev["reward"]["sft"], "final": ev["reward"]["final"]},
        wall_seconds_per_stage=dict(st.wall_seconds),
        meta={
            "run_id": run.record.run_id,
            "ppo_steps": run.record.step,
            "rm_rounds": len(st.rm_rounds),
            "labelers": run.cfg.labeling.labelers,
            "evaluation_temperature": run.cfg.evaluation.sampling.temperature,
            "evaluation_max_new_tokens": run.cfg.evaluation.sampling.max_new_tokens,
            "skipped_data_lines": {k: v["skipped"] for k, v in st.data.items()},
            # How prompts reached the policy (docs/chat.md): its chat template (source and sha256) and the system
            # message of the prompts given as text.
            "chat_template": " ".join(filter(None, (pol.chat_template, pol.chat_template_sha256))) or "none",
            "system_prompt": run.cfg.ppo.prompts.system,
        },
    )
