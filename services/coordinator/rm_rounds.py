"""A pipeline's labeling rounds and reward-model (re)training (InstructGPT step 2, repeated with fresh comparisons).

Round r: K samples per prompt of the policy the replicas serve now, for prompts drawn afresh; the labelers rank
them (the simulated ones, calibrated to the configured agreement, or people through the labeling RPCs); the RM
of round r starts from the SFT model and trains on the comparisons of rounds 0..r; the reward role loads it with a
new weight version. Every step is idempotent, so a restarted coordinator redoes only what is missing: the
ComparisonStore keeps every accepted ranking (fsync'ed before it counts), the simulated labelers are
deterministic per item, and the training job is idempotent per job id.
"""

from __future__ import annotations

import random
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

from alignd import labelers, rm_breakdown
from alignd.atomic import write_bytes_atomic
from alignd.config import dump_yaml
from alignd.conversations import chat_score_item
from alignd.data import load_comparisons, split_train_eval
from alignd.data.writing import prompt_key
from alignd.jobs import rm_response
from alignd.runtime.logging import get_logger
from alignd.services.coordinator import launchers
from alignd.services.coordinator.comparisons import ComparisonStore, LabelError
from alignd.services.coordinator.errors import RunFailed, RunStopped
from alignd.services.coordinator.pipeline_state import RMRound
from alignd.services.coordinator.rollouts import score
from alignd.services.coordinator.runs import read_jsonl
from alignd.services.coordinator.weight_sync import load_weights
from alignd.v1 import learner_pb2

if TYPE_CHECKING:
    from alignd.services.coordinator.pipeline import PipelineRun

_log = get_logger("alignd.coordinator.rm_rounds")

JOB_TIMEOUT_S = 6 * 3600.0


def run_round(run: PipelineRun, r: int) -> None:
    """One labeling round and RM (re)training: the RM starts from the SFT model and sees the comparisons of
    rounds 0..r; the reward service loads it with a new version."""
    st = run.state
    round_dir = run.record.path / f"rm-round-{r}"
    agreement = _label_round(run, r, round_dir)
    run.progress(0.6, f"round {r}: training the reward model")
    # The RM of round r trains on every round's comparisons so far.
    data = round_dir / "comparisons_all.jsonl"
    parts = [(run.record.path / f"rm-round-{i}" / "comparisons.jsonl").read_bytes() for i in range(r + 1)]
    write_bytes_atomic(data, b"".join(parts))
    resp = _train(run, r, data)
    if r not in st.rm_versions:  # above every version served or recorded (a restarted replica serves 0)
        served = [run.roles.info(ch).weight_version for ch in run.roles.reward]
        st.rm_versions[r] = max([*served, *st.rm_versions.values()]) + 1
        run.record.save()
    version = st.rm_versions[r]
    load_weights(run.roles, run.roles.reward, resp.model_dir, version=version)
    if r == 0 and agreement:
        st.labeler_agreement = agreement
    st.rm_dir, st.rm_version = resp.model_dir, version
    breakdown = _breakdown(run, r, data)  # scored by the reward role, which serves this RM now
    st.rm_rounds.append(
        RMRound(
            round=r,
            step=run.record.step,
            accuracy=resp.val_accuracy,
            n=resp.validation_comparisons,
            train_accuracy=resp.train_accuracy,
            comparisons=sum(1 for _ in data.open("rb")),
            reward_version=version,
            labeler_agreement=agreement.get("agreement") if agreement else None,
            breakdown=breakdown,
        )
    )
    run.record.save()
    _log.info(
        "rm_round_finished",
        run_id=run.record.run_id,
        round=r,
        accuracy=round(resp.val_accuracy, 4),
        reward_version=version,
    )


def _label_round(run: PipelineRun, r: int, round_dir: Path) -> dict:
    """The round's tasks ranked (round_dir/comparisons.jsonl); returns what is known of labeler agreement."""
    lab = run.cfg.labeling
    simulated = lab.labelers == "simulated"
    store = ComparisonStore(round_dir, labels_per_task=2 if simulated else lab.labels_per_task)
    try:
        if not store.has_round:
            run.progress(0.0, f"round {r}: sampling {lab.k} completions per prompt")
            store.create_round(_tasks(run, r))
        run.progress(0.2, f"round {r}: ranking {store.progress().total} tasks")
        run.labeling = (r, store)
        try:
            agreement = _label(run, store, r)
        finally:
            run.labeling = None
        # Every labeler's rankings train the RM, as in the paper (each ranking of a prompt is one batch
        # element); with the simulated labelers that is two noisy rankings of each task.
        store.export_comparisons(round_dir / "comparisons.jsonl")
    finally:
        store.close()
    return agreement


def _tasks(run: PipelineRun, r: int) -> list[tuple[str, list[str]]]:
    """K samples per prompt of the policy the replicas serve now, for prompts drawn afresh for round r."""
    cfg = run.cfg
    lab = cfg.labeling
    n = lab.prompts_per_round if r == 0 else (cfg.rm_retrain.prompts_per_round or lab.prompts_per_round)
    prompts = list(run.loop.rollouts.prompts)
    random.Random(f"{cfg.seed}:rm:{r}" if r else f"{cfg.seed}:rm").shuffle(prompts)
    chosen = prompts[:n]

    def progress(done: int, total: int) -> None:
        run.progress(0.2 * done / total, f"round {r}: sampled {done}/{total} completions")

    groups = run.loop.rollouts.sample_texts(
        chosen, lab.k, cfg.ppo.sampling, seed=cfg.seed + 2 + 7919 * r, system=cfg.ppo.prompts.system,
        on_progress=progress,
    )  # fmt: skip
    tasks = []
    for p, g in zip(chosen, groups):
        distinct = list(dict.fromkeys(s.text for s in g if s.text))
        if len(distinct) >= 2:
            tasks.append((p, distinct))
    if not tasks:
        raise RunFailed(f"rm round {r}: every prompt's samples were identical; nothing to rank")
    return tasks


def _label(run: PipelineRun, store: ComparisonStore, r: int) -> dict:
    """Fills the round with rankings; returns what is known of labeler agreement."""
    lab = run.cfg.labeling
    if lab.labelers == "external":
        _log.info("labeling_round_open", run_id=run.record.run_id, round=r, tasks=store.progress().total)
        seen = None
        while not store.wait_until_done(timeout=1.0):
            if run.stop_requested.is_set():
                raise RunStopped(f"while waiting for rankings of round {r}")
            p = store.progress()
            if (p.labelled, p.labels) != seen:
                seen = (p.labelled, p.labels)
                run.progress(
                    0.2 + 0.4 * p.fraction, f"round {r}: {p.labelled}/{p.total} tasks ranked by external labelers"
                )
        return external_agreement(store)
    items = [(t.prompt, list(t.completions)) for t in store.tasks()]
    temps = run.state.labeler_temperatures
    if r not in temps:
        temps[r] = labelers.calibrate_temperature(
            run.gold, items, target=lab.target_agreement, seeds=(1, 2)
        ).temperature
        run.record.save()
    seed = run.cfg.seed * 1000 + 10 * r
    store.label_with(labelers.SimulatedLabeler(run.gold, temps[r], seed=seed + 1, name="sim-a"))
    store.label_with(labelers.SimulatedLabeler(run.gold, temps[r], seed=seed + 2, name="sim-b"))
    agreement, pairs = store.agreement("sim-a", "sim-b")
    return {"agreement": agreement, "pairs": pairs, "temperature": temps[r]}


def _train(run: PipelineRun, r: int, data: Path):
    """The RM of round r, trained by a launched job (pipeline.rm_job: launcher) or by the learner role."""
    req = dict(
        job_id=f"{run.record.run_id}-rm-{r}",
        init_model_dir=run.state.sft_dir,
        comparisons_path=str(data),
        demonstrations_path=run.cfg.demonstrations,
        config_yaml=dump_yaml(run.cfg.rm),
        output_dir=str(run.record.path / f"rm-{r}"),
    )
    if run.cfg.rm_job != "launcher":
        return run.learner_job(
            "TrainRewardModel",
            lambda t: run.learner().TrainRewardModel(learner_pb2.TrainRewardModelRequest(**req), timeout=JOB_TIMEOUT_S),
            job_id=req["job_id"],
            span=(0.6, 1.0),
            what=f"round {r}: RM",
        )
    if run.launcher is None:
        run.launcher = launchers.make_launcher(run.roles.cfg.launcher)
    try:
        return rm_response(launchers.run_rm_job(run.launcher, req, JOB_TIMEOUT_S, cancel=run.stop_requested))
    except launchers.JobFailed as err:
        if run.stop_requested.is_set():  # the job was cancelled by StopRun
            raise RunStopped(f"while the rm job of round {r} ran") from err
        raise RunFailed(f"rm round {r}: {err}") from err


def _breakdown(run: PipelineRun, r: int, comparisons: Path) -> dict | None:
    """What the RM of round r gets wrong on its held-out prompts (alignd.rm_breakdown): the prompts the learner
    held out (the same split of the same file), every labeler's rankings of them, the served RM's scores and the
    gold judge's. None with external labelers (the breakdown compares the two simulated labelers)."""
    files = [run.record.path / f"rm-round-{i}" / "comparisons.jsonl" for i in range(r + 1)]
    rm = run.cfg.rm
    if run.cfg.labeling.labelers != "simulated" or rm.validation_fraction <= 0 or not all(f.exists() for f in files):
        return None
    comps, _ = load_comparisons(comparisons, max_k=rm.max_k, skip_bad=rm.skip_bad_lines)
    _, held = split_train_eval(comps, rm.validation_fraction, rm.seed)
    held_prompts = {prompt_key(c.prompt) for c in held}
    tasks: dict[str, dict] = {}
    for f in files:
        for rec in read_jsonl(f):
            if prompt_key(rec["prompt"]) in held_prompts:
                t = tasks.setdefault(
                    rec["task_id"], {"prompt": rec["prompt"], "completions": rec["completions"], "rankings": {}}
                )
                t["rankings"][rec["labeler"]] = rec["ranking"]
    rows = list(tasks.values())
    if not rows:
        return None
    items = [chat_score_item(t["prompt"], c, run.cfg.ppo.prompts.system) for t in rows for c in t["completions"]]
    scores = score(run.roles, run.loop.sync, items)
    out, i = [], 0
    for t in rows:
        k = len(t["completions"])
        golds = [run.gold(t["prompt"], c) for c in t["completions"]]
        out.append(rm_breakdown.Task(scores[i : i + k], golds, t["rankings"]))
        i += k
    result = rm_breakdown.breakdown(out, labeler="sim-a")
    accuracies = {
        k: round(v["accuracy"], 4) for k, v in result.items() if isinstance(v, dict) and v["accuracy"] is not None
    }
    _log.info("rm_breakdown", run_id=run.record.run_id, round=r, pairs=result["pairs"], **accuracies)
    return result


def external_agreement(store: ComparisonStore) -> dict:
    """Pooled pairwise agreement between every two labelers who ranked the same task ({} with one label per task)."""
    agreed = total = 0.0
    for a, b in combinations(store.labelers(), 2):
        try:
            rate, pairs = store.agreement(a, b)
        except LabelError:  # no task in common
            continue
        agreed, total = agreed + rate * pairs, total + pairs
    return {"agreement": agreed / total, "pairs": int(total)} if total else {}
