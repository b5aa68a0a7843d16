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
import time
from pathlib import Path


from alignd import evaluation, judges, labelers
from alignd.config import PipelineConfig, dump_yaml
from alignd.data import load_prompts
from alignd.runtime.logging import get_logger
from alignd.runtime.role import write_json_atomic
from alignd.services.coordinator.labels import ComparisonStore
from alignd.services.coordinator.loop import RunFailed, RunLoop
from alignd.v1 import learner_pb2, learner_pb2_grpc, model_pb2, model_pb2_grpc, policy_pb2, policy_pb2_grpc, reward_pb2, reward_pb2_grpc

_log = get_logger("alignd.coordinator.pipeline")

STAGES = ("sft", "rm", "ppo", "evaluate", "report")
JOB_TIMEOUT_S = 6 * 3600.0


class PipelineLoop(RunLoop):
    def __init__(self, record, cfg: PipelineConfig, roles, metrics) -> None:
        super().__init__(record, cfg.ppo, roles, metrics)
        self.pcfg = cfg
        self.gold = judges.resolve(cfg.gold.name, cfg.gold.args)
        self.second = judges.resolve(cfg.second_judge.name, cfg.second_judge.args)

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
            if self.roles.info(ch).weight_version >= version:
                continue  # already loaded before a restart
            self.roles.call("LoadWeights", ch, lambda t: stub.LoadWeights(model_pb2.LoadWeightsRequest(path=path, version=version), timeout=t))

    def _sample(self, prompts: list[str], n: int, sampling, seed: int) -> list[list[policy_pb2.Sample]]:
        """n samples per prompt from the first policy replica, texts included; grouped by prompt."""
        ch = self.roles.policy[0]
        stub = policy_pb2_grpc.PolicyServiceStub(ch)
        req = policy_pb2.GenerateRequest(
            prompts=[policy_pb2.Prompt(text=p) for p in prompts],
            sampling=policy_pb2.SamplingParams(
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                max_new_tokens=sampling.max_new_tokens, stop_token_ids=sampling.stop_token_ids,
                ignore_eos=sampling.ignore_eos, seed=seed, num_samples=n,
            ),
            return_text=True,
        )
        resp = self.roles.call("Generate", ch, lambda t: stub.Generate(req, timeout=t))
        out: list[list] = [[] for _ in prompts]
        for s in resp.samples:
            out[s.prompt_index].append(s)
        return out

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
            rec.stage = stage
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
        out = str(self.record.path / "sft")
        resp = self.roles.call("TrainSFT", self.roles.learner, lambda t: self._learner().TrainSFT(
            learner_pb2.TrainSFTRequest(
                job_id=f"{self.record.run_id}-sft", demonstrations_path=self.pcfg.demonstrations,
                config_yaml=dump_yaml(self.pcfg.sft), output_dir=out,
            ), timeout=JOB_TIMEOUT_S))
        version = self.art.get("sft_version") or max(self._versions(self.roles.policy + self.roles.reference)) + 1
        self.art.update(sft_dir=resp.model_dir, sft_version=version, sft_best_val_loss=resp.best_val_loss)
        self.record.save()
        self._load_weights(self.roles.policy + self.roles.reference, resp.model_dir, version)
        # Held-out samples of the SFT policy, the baseline of the evaluation.
        self._write_eval_samples("eval_sft.jsonl")

    def _eval_prompts(self) -> list[str]:
        ev = self.pcfg.evaluation
        prompts, _ = load_prompts(ev.prompts.path, field=ev.prompts.field)
        return prompts[: ev.max_prompts]

    def _write_eval_samples(self, name: str) -> None:
        ev = self.pcfg.evaluation
        prompts = self._eval_prompts()
        groups = self._sample(prompts, ev.samples_per_prompt, ev.sampling, seed=self.pcfg.seed + 1)
        rows = [{"prompt": p, "responses": [s.text for s in g], "token_ids": [list(s.token_ids) for s in g],
                 "prompt_token_ids": list(g[0].prompt_token_ids)} for p, g in zip(prompts, groups)]
        write_json_atomic(self.record.path / name, {"samples": rows})

    def _stage_rm(self) -> None:
        lab = self.pcfg.labeling
        round_dir = self.record.path / "rm-round-0"
        store = ComparisonStore(round_dir, labels_per_task=2)
        try:
            if not store.has_round:
                prompts = list(self.prompts)
                random.Random(f"{self.pcfg.seed}:rm").shuffle(prompts)
                chosen = prompts[: lab.prompts_per_round]
                groups = self._sample(chosen, lab.k, self.cfg.sampling, seed=self.pcfg.seed + 2)
                tasks = []
                for p, g in zip(chosen, groups):
                    distinct = list(dict.fromkeys(s.text for s in g if s.text))
                    if len(distinct) >= 2:
                        tasks.append((p, distinct))
                if not tasks:
                    raise RunFailed("rm: every prompt's samples were identical; nothing to rank")
                store.create_round(tasks)
            items = [(t.prompt, list(t.completions)) for t in store.tasks()]
            if "labeler_temperature" not in self.art:
                cal = labelers.calibrate_temperature(self.gold, items, target=lab.target_agreement, seeds=(1, 2))
                self.art["labeler_temperature"] = cal.temperature
                self.record.save()
            temp = self.art["labeler_temperature"]
            a = labelers.SimulatedLabeler(self.gold, temp, seed=self.pcfg.seed * 1000 + 1, name="sim-a")
            b = labelers.SimulatedLabeler(self.gold, temp, seed=self.pcfg.seed * 1000 + 2, name="sim-b")
            store.label_with(a)
            store.label_with(b)
            agreement, pairs = store.agreement("sim-a", "sim-b")
            comparisons = round_dir / "comparisons.jsonl"
            store.export_comparisons(comparisons, labeler="sim-a")
        finally:
            store.close()
        resp = self.roles.call("TrainRewardModel", self.roles.learner, lambda t: self._learner().TrainRewardModel(
            learner_pb2.TrainRewardModelRequest(
                job_id=f"{self.record.run_id}-rm-0", init_model_dir=self.art["sft_dir"], comparisons_path=str(comparisons),
                demonstrations_path=self.pcfg.demonstrations, config_yaml=dump_yaml(self.pcfg.rm),
                output_dir=str(self.record.path / "rm-0"),
            ), timeout=JOB_TIMEOUT_S))
        self.art.update(rm_dir=resp.model_dir, labeler_agreement={"agreement": agreement, "pairs": pairs, "temperature": temp},
                        rm_rounds=[{"round": 0, "accuracy": resp.val_accuracy, "n": resp.validation_comparisons,
                                    "train_accuracy": resp.train_accuracy}])
        rm_version = self.art.get("rm_version") or max(self._versions(self.roles.reward)) + 1
        self.art["rm_version"] = rm_version
        self.record.save()
        self._load_weights(self.roles.reward, resp.model_dir, rm_version)
        learner = self._learner()
        self.roles.call("ResetPolicy", self.roles.learner, lambda t: learner.ResetPolicy(learner_pb2.ResetPolicyRequest(
            policy_dir=self.art["sft_dir"], value_model_dir=resp.model_dir if self.pcfg.value_from_rm else "",
            version=self.art["sft_version"]), timeout=t))

    def _stage_ppo(self) -> None:
        same_tokenizer = self._check_tokenizers()
        while self.record.step < self.record.total_steps:
            if self.stop_requested.is_set():
                raise RunFailed("stopped")
            self._iteration(self.record.step + 1, same_tokenizer)

    def _stage_evaluate(self) -> None:
        self._write_eval_samples("eval_final.jsonl")
        sft = json.loads((self.record.path / "eval_sft.jsonl").read_text())["samples"]
        final = json.loads((self.record.path / "eval_final.jsonl").read_text())["samples"]
        result = {"win_rates": {}, "reward": {}}
        for name, judge in (("gold", self.gold), ("second", self.second)):
            a = [[judge(r["prompt"], x) for x in r["responses"]] for r in final]
            b = [[judge(r["prompt"], x) for x in r["responses"]] for r in sft]
            result["win_rates"][name] = evaluation.win_rate(a, b).to_dict()
            result[f"{name}_mean"] = {"sft": sum(map(sum, b)) / sum(map(len, b)), "final": sum(map(sum, a)) / sum(map(len, a))}
        ch = self.roles.reward[0]
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        for key, rows in (("sft", sft), ("final", final)):
            items = [reward_pb2.ScoreItem(tokens=reward_pb2.TokenPair(prompt_token_ids=r["prompt_token_ids"], response_token_ids=t))
                     for r in rows for t in r["token_ids"] if t]
            scores = list(self.roles.call("Score", ch, lambda t: stub.Score(reward_pb2.ScoreRequest(items=items), timeout=t)).scores)
            result["reward"][key] = scores
        rows = self.log.read()
        result["kl_to_reference"] = rows[-1]["reference_kl"] if rows else None
        write_json_atomic(self.record.path / "evaluation.json", result)

    def _stage_report(self) -> None:
        ev = json.loads((self.record.path / "evaluation.json").read_text())
        report = evaluation.build_report_json(
            win_rates=ev["win_rates"],
            rm_accuracy_per_round=self.art.get("rm_rounds", []),
            labeler_agreement=self.art.get("labeler_agreement", {}).get("agreement"),
            kl_to_reference={"per_token": ev["kl_to_reference"]} if ev.get("kl_to_reference") is not None else None,
            reward={"sft": ev["reward"]["sft"], "final": ev["reward"]["final"]},
            wall_seconds_per_stage=self.art.get("wall_seconds", {}),
            meta={"run_id": self.record.run_id, "ppo_steps": self.record.step},
        )
        write_json_atomic(self.record.path / "report.json", report)
        sft = json.loads((self.record.path / "eval_sft.jsonl").read_text())["samples"]
        final = json.loads((self.record.path / "eval_final.jsonl").read_text())["samples"]
        samples = [
            {"prompt": a["prompt"], "sft": a["responses"][0], "final": b["responses"][0],
             "scores": {"gold": {"sft": self.gold(a["prompt"], a["responses"][0]), "final": self.gold(b["prompt"], b["responses"][0])}}}
            for a, b in list(zip(sft, final))[:5]
        ]
        md = evaluation.render_markdown(report, samples)
        tmp = self.record.path / ".report.md.tmp"
        tmp.write_text(md)
        tmp.replace(self.record.path / "report.md")
        self.record.latest_metrics.update({
            "gold_win_rate": report["win_rates"]["gold"]["rate"],
            "gold_win_rate_lower": report["win_rates"]["gold"]["lower"],
        })


def parse_run_config(data: dict):
    """PipelineConfig when `kind: pipeline`, else the PPO run configuration."""
    from alignd.config import PPORunConfig, build_config

    if isinstance(data, dict) and data.get("kind") == "pipeline":
        return build_config(PipelineConfig, data)
    return build_config(PPORunConfig, data)


