"""The whole InstructGPT pipeline of one run: sft -> rm -> ppo -> evaluate -> report.

Every stage is resumable: its results go into the run record's `artifacts`
(state.json, replaced atomically) and the stage is marked done only after
its effects are durable, so a restarted coordinator skips finished stages
and re-enters the unfinished one, whose own steps are idempotent:
- sft: the learner's TrainSFT is idempotent per job id; LoadWeights of the
  SFT policy skips replicas already at the version;
- rm: the labeling round lives in a ComparisonStore (every accepted ranking
  fsync'ed before it counts), simulated labelers are deterministic per item
  and continue where they stopped; TrainRewardModel is idempotent per job id;
- ppo: the PPO loop of `loop.RunLoop` (each step applied once);
- evaluate/report: recomputed from the stored samples.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from itertools import combinations
from pathlib import Path

from alignd import evaluation, judges, labelers, rm_breakdown
from alignd.atomic import write_bytes_atomic, write_json_atomic
from alignd.config import PipelineConfig, dump_yaml
from alignd.data import check_pipeline_data, load_comparisons, split_train_eval
from alignd.jobs import rm_response
from alignd.plots import render_plots
from alignd.runtime.logging import get_logger
from alignd.services.coordinator import launchers
from alignd.services.coordinator.comparisons import ComparisonStore, LabelError
from alignd.services.coordinator.errors import RunFailed, RunStopped
from alignd.services.coordinator.loop import RunLoop
from alignd.v1 import (
    learner_pb2,
    learner_pb2_grpc,
    model_pb2,
    model_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
)

_log = get_logger("alignd.coordinator.pipeline")

STAGES = ("sft", "rm", "ppo", "evaluate", "report")
JOB_TIMEOUT_S = 6 * 3600.0


class PipelineLoop(RunLoop):
    def __init__(self, record, cfg: PipelineConfig, roles, metrics) -> None:
        super().__init__(record, cfg.ppo, roles, metrics, skip_bad=cfg.skip_bad_lines)
        if cfg.skip_bad_lines:  # the learner's jobs skip the same lines
            cfg = cfg.model_copy(
                update={
                    "sft": cfg.sft.model_copy(update={"skip_bad_lines": True}),
                    "rm": cfg.rm.model_copy(update={"skip_bad_lines": True}),
                }
            )
        self.pcfg = cfg
        self.data_reports, self.eval_prompts_all = check_pipeline_data(
            cfg, self.prompts_report
        )  # prompts: read by RunLoop
        if "data" not in record.artifacts:
            record.artifacts["data"] = self.data_reports
        for name, r in self.data_reports.items():
            if r["skipped"]:
                _log.warning(
                    "data_lines_skipped", run_id=record.run_id, file=name, path=r["path"], skipped=r["skipped"]
                )
        registry = roles.cfg.judges
        self.gold = judges.resolve(cfg.gold.name, cfg.gold.args, registry, "gold.name")
        self.second = judges.resolve(cfg.second_judge.name, cfg.second_judge.args, registry, "second_judge.name")
        self.labeling: tuple[int, ComparisonStore] | None = None  # the open labeling round, for the labeler RPCs
        self.launcher = None  # built on first use when rm_job: launcher

    # -- plumbing ----------------------------------------------------------
    @property
    def art(self) -> dict:
        return self.record.artifacts

    def _learner(self):
        return learner_pb2_grpc.LearnerServiceStub(self.roles.learner)

    def _versions(self, channels) -> list[int]:
        return [self.roles.info(ch).weight_version for ch in channels]

    def _load_weights(self, channels, path: str, version: int) -> None:
        for ch in channels:
            stub = model_pb2_grpc.ModelServiceStub(ch)
            served = self.roles.info(ch).weight_version
            if served == version:
                continue  # already loaded before a restart
            # A replica ahead of the run serves weights the run never published: replaced, not skipped.
            req = model_pb2.LoadWeightsRequest(path=path, version=version, replace_newer=served > version)
            self.roles.call("LoadWeights", ch, lambda t: stub.LoadWeights(req, timeout=t))

    def expected_version(self, role: str) -> int:
        """policy: the last pushed version, or the SFT policy's before PPO; reference: the SFT policy's;
        reward: the RM of the last round (0 before any: the models in the roles' configuration)."""
        if role == "policy":
            return self.record.policy_version or self.art.get("sft_version", 0)
        if role == "reference":
            return self.art.get("sft_version", 0)
        return self._rm_loaded()[1]

    def _rm_loaded(self) -> tuple[str, int]:
        """(directory, version) of the RM the reward role must serve: the last round's ("", 0) before any. Runs
        recorded before rm_version existed take the version from rm_rounds."""
        rounds = self.art.get("rm_rounds", [])
        version = self.art.get("rm_version") or (rounds[-1]["reward_version"] if rounds else 0)
        return self.art.get("rm_dir", ""), version

    def resync(self, role: str, replicas: list[int] | None = None) -> None:
        if role == "policy" and self.record.policy_version:
            super().resync(role, replicas)  # the learner pushes the current policy
        elif role == "policy":
            chosen = replicas if replicas is not None else range(len(self.roles.policy))
            self._load_weights([self.roles.policy[r] for r in chosen], self.art["sft_dir"], self.art["sft_version"])
        elif role == "reference":
            self._load_weights(self.roles.reference, self.art["sft_dir"], self.art["sft_version"])
        else:
            self._load_weights(self.roles.reward, *self._rm_loaded())

    def _sample(self, prompts: list[str], n: int, sampling, seed: int) -> list[list[policy_pb2.Sample]]:
        """n samples per prompt from one policy replica in the rotation, texts included; grouped by prompt."""
        req = policy_pb2.GenerateRequest(
            prompts=[policy_pb2.Prompt(text=p) for p in prompts],
            sampling=policy_pb2.SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_new_tokens=sampling.max_new_tokens,
                stop_token_ids=sampling.stop_token_ids,
                ignore_eos=sampling.ignore_eos,
                seed=seed,
                num_samples=n,
            ),
            return_text=True,
        )
        channels = [self.roles.policy[r] for r in self.rotation.active()]

        def call():
            return self.roles.call_any(
                "Generate", channels, lambda ch, t: policy_pb2_grpc.PolicyServiceStub(ch).Generate(req, timeout=t)
            )

        resp = self._call_at_run_version(
            "policy", call, lambda r: min((s.weight_version for s in r.samples), default=1 << 62)
        )
        out: list[list] = [[] for _ in prompts]
        for s in resp.samples:
            out[s.prompt_index].append(s)
        return out

    def _progress(self, fraction: float, detail: str) -> None:
        """Stage progress for GetRun (and the CLI's bar); saved with the record."""
        self.record.stage_fraction, self.record.stage_detail = max(0.0, min(1.0, fraction)), detail
        self.record.save()

    def _done(self, stage: str) -> None:
        self.art.setdefault("done", []).append(stage)
        self.record.save()

    # -- the run -----------------------------------------------------------
    def _body(self) -> None:
        """Each stage not yet done, in order (RunLoop.run records how the run ended)."""
        rec = self.record
        for stage in STAGES:
            if stage in self.art.get("done", []):
                continue
            if self.stop_requested.is_set():
                rec.state = "stopped"
                return
            rec.stage, rec.stage_fraction, rec.stage_detail = stage, 0.0, ""
            rec.save()
            t0 = time.perf_counter()
            _log.info("stage_started", run_id=rec.run_id, stage=stage)
            getattr(self, f"_stage_{stage}")()
            seconds = time.perf_counter() - t0
            walls = self.art.setdefault("wall_seconds", {})
            walls[stage] = walls.get(stage, 0.0) + seconds
            self._done(stage)
            _log.info("stage_finished", run_id=rec.run_id, stage=stage, seconds=round(seconds, 2))
        rec.state = "succeeded"

    # -- stages ------------------------------------------------------------
    def _stage_sft(self) -> None:
        self._progress(0.0, "training on the demonstrations")
        out = str(self.record.path / "sft")
        resp = self.roles.call(
            "TrainSFT",
            self.roles.learner,
            lambda t: self._learner().TrainSFT(
                learner_pb2.TrainSFTRequest(
                    job_id=f"{self.record.run_id}-sft",
                    demonstrations_path=self.pcfg.demonstrations,
                    config_yaml=dump_yaml(self.pcfg.sft),
                    output_dir=out,
                ),
                timeout=JOB_TIMEOUT_S,
            ),
        )
        version = self.art.get("sft_version") or max(self._versions(self.roles.policy + self.roles.reference)) + 1
        self.art.update(sft_dir=resp.model_dir, sft_version=version, sft_best_val_loss=resp.best_val_loss)
        self.record.save()
        self._progress(0.8, "loading the SFT policy; sampling held-out prompts")
        self._load_weights(self.roles.policy + self.roles.reference, resp.model_dir, version)
        # Held-out samples of the SFT policy, the baseline of the evaluation.
        self._write_eval_samples("eval_sft.jsonl")

    def _eval_prompts(self) -> list[str]:
        return self.eval_prompts_all[: self.pcfg.evaluation.max_prompts]

    def _write_eval_samples(self, name: str) -> None:
        ev = self.pcfg.evaluation
        prompts = self._eval_prompts()
        groups = self._sample(prompts, ev.samples_per_prompt, ev.sampling, seed=self.pcfg.seed + 1)
        rows = [
            {
                "prompt": p,
                "responses": [s.text for s in g],
                "token_ids": [list(s.token_ids) for s in g],
                "prompt_token_ids": list(g[0].prompt_token_ids),
            }
            for p, g in zip(prompts, groups)
        ]
        write_json_atomic(self.record.path / name, {"samples": rows})

    def _stage_rm(self) -> None:
        """Round 0 on samples of the SFT policy; then the learner starts PPO from SFT (value model from the RM)."""
        if not self._round_done(0):
            self._rm_round(0)
        learner = self._learner()
        self.roles.call(
            "ResetPolicy",
            self.roles.learner,
            lambda t: learner.ResetPolicy(
                learner_pb2.ResetPolicyRequest(
                    policy_dir=self.art["sft_dir"],
                    value_model_dir=self.art["rm_dir"] if self.pcfg.value_from_rm else "",
                    version=self.art["sft_version"],
                ),
                timeout=t,
            ),
        )
        self._text_loss("sft")  # the learner holds the SFT policy now

    def _text_loss(self, key: str) -> None:
        """The learner's current policy's LM loss on the held-out text (the alignment tax), stored under `key`."""
        ev = self.pcfg.evaluation
        if not ev.heldout_text:
            return
        learner = self._learner()
        resp = self.roles.call(
            "EvaluateTextLoss",
            self.roles.learner,
            lambda t: learner.EvaluateTextLoss(
                learner_pb2.EvaluateTextLossRequest(text_path=ev.heldout_text, max_tokens=ev.heldout_max_tokens),
                timeout=t,
            ),
        )
        self.art.setdefault("text_loss", {})[key] = {
            "loss": resp.loss,
            "tokens": resp.tokens,
            "policy_version": resp.policy_version,
        }
        self.record.save()

    def _round_done(self, r: int) -> bool:
        return any(x["round"] == r for x in self.art.get("rm_rounds", []))

    def _round_tasks(self, r: int) -> list[tuple[str, list[str]]]:
        """K samples per prompt of the policy the replicas serve now, for prompts drawn afresh for round r."""
        lab = self.pcfg.labeling
        n = lab.prompts_per_round if r == 0 else (self.pcfg.rm_retrain.prompts_per_round or lab.prompts_per_round)
        prompts = list(self.prompts)
        random.Random(f"{self.pcfg.seed}:rm:{r}" if r else f"{self.pcfg.seed}:rm").shuffle(prompts)
        chosen = prompts[:n]
        groups = self._sample(chosen, lab.k, self.cfg.sampling, seed=self.pcfg.seed + 2 + 7919 * r)
        tasks = []
        for p, g in zip(chosen, groups):
            distinct = list(dict.fromkeys(s.text for s in g if s.text))
            if len(distinct) >= 2:
                tasks.append((p, distinct))
        if not tasks:
            raise RunFailed(f"rm round {r}: every prompt's samples were identical; nothing to rank")
        return tasks

    def _label(self, store: ComparisonStore, r: int) -> dict:
        """Fills the round with rankings; returns what is known of labeler agreement."""
        lab = self.pcfg.labeling
        if lab.labelers == "external":
            _log.info("labeling_round_open", run_id=self.record.run_id, round=r, tasks=store.progress().total)
            seen = None
            while not store.wait_until_done(timeout=1.0):
                if self.stop_requested.is_set():
                    raise RunStopped(f"while waiting for rankings of round {r}")
                p = store.progress()
                if (p.labelled, p.labels) != seen:
                    seen = (p.labelled, p.labels)
                    self._progress(
                        0.2 + 0.4 * p.fraction, f"round {r}: {p.labelled}/{p.total} tasks ranked by external labelers"
                    )
            return external_agreement(store)
        items = [(t.prompt, list(t.completions)) for t in store.tasks()]
        key = f"labeler_temperature_{r}" if r else "labeler_temperature"
        if key not in self.art:
            cal = labelers.calibrate_temperature(self.gold, items, target=lab.target_agreement, seeds=(1, 2))
            self.art[key] = cal.temperature
            self.record.save()
        temp = self.art[key]
        seed = self.pcfg.seed * 1000 + 10 * r
        store.label_with(labelers.SimulatedLabeler(self.gold, temp, seed=seed + 1, name="sim-a"))
        store.label_with(labelers.SimulatedLabeler(self.gold, temp, seed=seed + 2, name="sim-b"))
        agreement, pairs = store.agreement("sim-a", "sim-b")
        return {"agreement": agreement, "pairs": pairs, "temperature": temp}

    def _rm_round(self, r: int) -> None:
        """One labeling round and RM (re)training: the RM starts from the SFT model and sees the comparisons of
        rounds 0..r; the reward service loads it with a new version. Idempotent, so a restart redoes what is missing."""
        lab = self.pcfg.labeling
        round_dir = self.record.path / f"rm-round-{r}"
        simulated = lab.labelers == "simulated"
        store = ComparisonStore(round_dir, labels_per_task=2 if simulated else lab.labels_per_task)
        try:
            if not store.has_round:
                self._progress(0.0, f"round {r}: sampling {lab.k} completions per prompt")
                store.create_round(self._round_tasks(r))
            self._progress(0.2, f"round {r}: ranking {store.progress().total} tasks")
            self.labeling = (r, store)
            try:
                agreement = self._label(store, r)
            finally:
                self.labeling = None
            # Every labeler's rankings train the RM, as in the paper (each ranking of a prompt is one batch
            # element); with the simulated labelers that is two noisy rankings of each task.
            store.export_comparisons(round_dir / "comparisons.jsonl")
        finally:
            store.close()
        self._progress(0.6, f"round {r}: training the reward model")
        # The RM of round r trains on every round's comparisons so far.
        data = round_dir / "comparisons_all.jsonl"
        parts = [(self.record.path / f"rm-round-{i}" / "comparisons.jsonl").read_bytes() for i in range(r + 1)]
        write_bytes_atomic(data, b"".join(parts))
        req = dict(
            job_id=f"{self.record.run_id}-rm-{r}",
            init_model_dir=self.art["sft_dir"],
            comparisons_path=str(data),
            demonstrations_path=self.pcfg.demonstrations,
            config_yaml=dump_yaml(self.pcfg.rm),
            output_dir=str(self.record.path / f"rm-{r}"),
        )
        if self.pcfg.rm_job == "launcher":
            if self.launcher is None:
                self.launcher = launchers.make_launcher(self.roles.cfg.launcher)
            try:
                resp = rm_response(launchers.run_rm_job(self.launcher, req, JOB_TIMEOUT_S, cancel=self.stop_requested))
            except launchers.JobFailed as err:
                if self.stop_requested.is_set():  # the job was cancelled by StopRun
                    raise RunStopped(f"while the rm job of round {r} ran") from err
                raise RunFailed(f"rm round {r}: {err}") from err
        else:
            resp = self.roles.call(
                "TrainRewardModel",
                self.roles.learner,
                lambda t: self._learner().TrainRewardModel(
                    learner_pb2.TrainRewardModelRequest(**req), timeout=JOB_TIMEOUT_S
                ),
            )
        versions = self.art.setdefault("rm_versions", {})
        if str(r) not in versions:  # above every version served or recorded (a restarted replica serves 0)
            versions[str(r)] = max([*self._versions(self.roles.reward), *map(int, versions.values())]) + 1
            self.record.save()
        self._load_weights(self.roles.reward, resp.model_dir, versions[str(r)])
        if r == 0 and agreement:
            self.art["labeler_agreement"] = agreement
        self.art["rm_dir"], self.art["rm_version"] = resp.model_dir, versions[str(r)]
        breakdown = self._rm_breakdown(r, data)  # scored by the reward role, which serves this RM now
        self.art.setdefault("rm_rounds", []).append(
            {
                "round": r,
                "step": self.record.step,
                "accuracy": resp.val_accuracy,
                "n": resp.validation_comparisons,
                "train_accuracy": resp.train_accuracy,
                "comparisons": sum(1 for _ in data.open("rb")),
                "reward_version": versions[str(r)],
                "labeler_agreement": agreement.get("agreement") if agreement else None,
                "breakdown": breakdown,
            }
        )
        self.record.save()
        _log.info(
            "rm_round_finished",
            run_id=self.record.run_id,
            round=r,
            accuracy=round(resp.val_accuracy, 4),
            reward_version=versions[str(r)],
        )

    # Every PPO step also records the gold judge's mean score of its rollouts (metrics.jsonl: gold_mean): with
    # reward_kl it traces how far the gold judge follows the RM as the policy moves away from the reference
    # (reward over-optimisation, Gao et al. 2022), which the evaluation's end point alone cannot show.
    rollout_texts = True

    def _step_extras(self, samples) -> dict:
        golds = [self.gold(prompt, s.text) for prompt, s in samples]
        return {"gold_mean": statistics.fmean(golds)} if golds else {}

    def _rm_breakdown(self, r: int, comparisons: Path) -> dict | None:
        """What the RM of round r gets wrong on its held-out prompts (alignd.rm_breakdown): the prompts the learner
        held out (the same split of the same file), every labeler's rankings of them, the served RM's scores and the
        gold judge's. None with external labelers (the breakdown compares the two simulated labelers)."""
        files = [self.record.path / f"rm-round-{i}" / "comparisons.jsonl" for i in range(r + 1)]
        rm = self.pcfg.rm
        if (
            self.pcfg.labeling.labelers != "simulated"
            or rm.validation_fraction <= 0
            or not all(f.exists() for f in files)
        ):
            return None
        comps, _ = load_comparisons(comparisons, max_k=rm.max_k, skip_bad=rm.skip_bad_lines)
        _, held = split_train_eval(comps, rm.validation_fraction, rm.seed)
        held_prompts = {c.prompt for c in held}
        tasks: dict[str, dict] = {}
        for f in files:
            for rec in read_jsonl(f):
                if rec["prompt"] in held_prompts:
                    t = tasks.setdefault(
                        rec["task_id"], {"prompt": rec["prompt"], "completions": rec["completions"], "rankings": {}}
                    )
                    t["rankings"][rec["labeler"]] = rec["ranking"]
        rows = list(tasks.values())
        if not rows:
            return None
        req = reward_pb2.ScoreRequest(
            items=[
                reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt=t["prompt"], response=c))
                for t in rows
                for c in t["completions"]
            ]
        )

        def call():
            return self.roles.call_any(
                "Score", self.roles.reward, lambda ch, t: reward_pb2_grpc.RewardServiceStub(ch).Score(req, timeout=t)
            )

        scores = list(self._call_at_run_version("reward", call, lambda resp: resp.weight_version).scores)
        out, i = [], 0
        for t in rows:
            k = len(t["completions"])
            out.append(
                rm_breakdown.Task(
                    scores[i : i + k], [self.gold(t["prompt"], c) for c in t["completions"]], t["rankings"]
                )
            )
            i += k
        result = rm_breakdown.breakdown(out, labeler="sim-a")
        _log.info(
            "rm_breakdown",
            run_id=self.record.run_id,
            round=r,
            pairs=result["pairs"],
            **{
                k: round(v["accuracy"], 4)
                for k, v in result.items()
                if isinstance(v, dict) and v["accuracy"] is not None
            },
        )
        return result

    def _stage_ppo(self) -> None:
        same_tokenizer = self._check_tokenizers()
        every = self.pcfg.rm_retrain.every_steps
        while self.record.step < self.record.total_steps:
            if self.stop_requested.is_set():
                raise RunStopped("in the ppo stage")
            step = self.record.step
            if every and step and step % every == 0 and not self._round_done(step // every):
                self.record.stage = "rm"
                self.record.save()
                self._rm_round(step // every)
                self.record.stage, self.record.stage_detail = "ppo", ""
                self.record.save()
            # Up to the next RM round (async rollouts never cross it: they would be scored by the old RM).
            end = min(self.record.total_steps, (step // every + 1) * every) if every else self.record.total_steps
            if not self._steps(end, same_tokenizer):
                raise RunStopped("in the ppo stage")

    def _stage_evaluate(self) -> None:
        self._progress(0.0, "sampling held-out prompts")
        self._write_eval_samples("eval_final.jsonl")
        self._text_loss("final")
        sft = json.loads((self.record.path / "eval_sft.jsonl").read_text())["samples"]
        final = json.loads((self.record.path / "eval_final.jsonl").read_text())["samples"]
        result = {"win_rates": {}, "reward": {}}
        for name, judge in (("gold", self.gold), ("second", self.second)):
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
            req = reward_pb2.ScoreRequest(items=items)

            def call():
                return self.roles.call_any(
                    "Score",
                    self.roles.reward,
                    lambda ch, t: reward_pb2_grpc.RewardServiceStub(ch).Score(req, timeout=t),
                )

            result["reward"][key] = list(self._call_at_run_version("reward", call, lambda r: r.weight_version).scores)
        rows = self.log.read()
        result["kl_to_reference"] = rows[-1]["reference_kl"] if rows else None
        write_json_atomic(self.record.path / "evaluation.json", result)

    def _stage_report(self) -> None:
        ev = json.loads((self.record.path / "evaluation.json").read_text())
        losses = self.art.get("text_loss", {})
        tax = None
        if "sft" in losses and "final" in losses:
            ptx = any(r.get("ptx_loss") for r in self.log.read())
            tax = {"with_ptx" if ptx else "without_ptx": (losses["sft"]["loss"], losses["final"]["loss"])}
        report = evaluation.build_report_json(
            alignment_tax=tax,
            win_rates=ev["win_rates"],
            rm_accuracy_per_round=self.art.get("rm_rounds", []),
            labeler_agreement=self.art.get("labeler_agreement") or None,
            kl_to_reference={"per_token": ev["kl_to_reference"]} if ev.get("kl_to_reference") is not None else None,
            reward={"sft": ev["reward"]["sft"], "final": ev["reward"]["final"]},
            wall_seconds_per_stage=self.art.get("wall_seconds", {}),
            meta={
                "run_id": self.record.run_id,
                "ppo_steps": self.record.step,
                "rm_rounds": len(self.art.get("rm_rounds", [])),
                "labelers": self.pcfg.labeling.labelers,
                "evaluation_temperature": self.pcfg.evaluation.sampling.temperature,
                "evaluation_max_new_tokens": self.pcfg.evaluation.sampling.max_new_tokens,
                "skipped_data_lines": {k: v["skipped"] for k, v in self.art.get("data", {}).items()},
            },
        )
        write_json_atomic(self.record.path / "report.json", report)
        sft = json.loads((self.record.path / "eval_sft.jsonl").read_text())["samples"]
        final = json.loads((self.record.path / "eval_final.jsonl").read_text())["samples"]
        samples = [
            {
                "prompt": a["prompt"],
                "sft": a["responses"][0],
                "final": b["responses"][0],
                "scores": {
                    "gold": {
                        "sft": self.gold(a["prompt"], a["responses"][0]),
                        "final": self.gold(b["prompt"], b["responses"][0]),
                    }
                },
            }
            for a, b in list(zip(sft, final))[:5]
        ]
        plots = render_plots(self.record.path, report)
        md = evaluation.render_markdown(
            report, samples, plots=[p.relative_to(self.record.path).as_posix() for p in plots]
        )
        write_bytes_atomic(self.record.path / "report.md", md.encode())
        self.record.latest_metrics.update(
            {
                "gold_win_rate": report["win_rates"]["gold"]["rate"],
                "gold_win_rate_lower": report["win_rates"]["gold"]["lower"],
            }
        )


def read_jsonl(path: Path) -> list[dict]:
    """The objects of a JSONL file the run wrote. Lines end at "\n" only: str.splitlines would also split at
    U+2028 and the other Unicode line breaks, which texts (a completion, a Moby-Dick opening) carry unescaped."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


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


def parse_run_config(data: dict):
    """PipelineConfig when `kind: pipeline`, else the PPO run configuration."""
    from alignd.config import PPORunConfig, build_config

    if isinstance(data, dict) and data.get("kind") == "pipeline":
        return build_config(PipelineConfig, data)
    return build_config(PPORunConfig, data)
