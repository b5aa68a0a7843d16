"""The whole InstructGPT pipeline of one run: sft -> rm -> ppo -> evaluate -> report.

Every stage is resumable: its results go into the run's PipelineState (state.json, replaced atomically) and the
stage is marked done only after its effects are durable, so a restarted coordinator skips finished stages and
re-enters the unfinished one, whose own steps are idempotent:
- sft: the learner's TrainSFT is idempotent per job id; LoadWeights of the SFT policy skips replicas already at
  the version;
- rm: a labeling round and RM training (rm_rounds.py);
- ppo: the PPO steps of a `loop.RunLoop` (each step applied once), with an RM round every rm_retrain.every_steps;
- evaluate/report: recomputed from the stored samples (evaluate.py).
"""

from __future__ import annotations

import statistics
import threading
import time

import grpc

from alignd import judges
from alignd.config import PipelineConfig, PPORunConfig, build_config, dump_yaml
from alignd.data import check_pipeline_data
from alignd.runtime.logging import get_logger
from alignd.services.coordinator import evaluate, rm_rounds
from alignd.services.coordinator.clients import RoleClients
from alignd.services.coordinator.comparisons import ComparisonStore
from alignd.services.coordinator.errors import RunStopped
from alignd.services.coordinator.loop import RunLoop, RunThread
from alignd.services.coordinator.pipeline_state import PipelineState, TextLoss
from alignd.services.coordinator.rm_rounds import JOB_TIMEOUT_S, external_agreement
from alignd.services.coordinator.runs import RunRecord
from alignd.services.coordinator.weight_sync import PolicyPushPlan, WeightSync, load_weights
from alignd.v1 import learner_pb2, learner_pb2_grpc

JOB_POLL_S = 2.0  # how often a learner job's progress is asked for

__all__ = ["STAGES", "PipelineRun", "PipelineVersions", "external_agreement", "parse_run_config"]

_log = get_logger("alignd.coordinator.pipeline")

STAGES = ("sft", "rm", "ppo", "evaluate", "report")


class PipelineVersions:
    """A pipeline's weight plan: policy: the last pushed version, or the SFT policy's before PPO; reference: the
    SFT policy's; reward: the RM of the last round (0 before any: the models in the roles' configuration)."""

    def __init__(self, record: RunRecord, roles: RoleClients) -> None:
        self.record = record
        self.roles = roles

    def expected_version(self, role: str) -> int:
        st = self.record.pipeline
        if role == "policy":
            return self.record.policy_version or st.sft_version
        return st.sft_version if role == "reference" else st.rm_version

    def resync(self, role: str, replicas: list[int] | None, sync: WeightSync) -> None:
        st, roles = self.record.pipeline, self.roles
        if role == "policy" and self.record.policy_version:
            PolicyPushPlan(self.record).resync(role, replicas, sync)  # the learner pushes the current policy
        elif role == "policy":
            chosen = replicas if replicas is not None else range(len(roles.policy))
            load_weights(roles, [roles.policy[r] for r in chosen], st.sft_dir, version=st.sft_version)
        elif role == "reference":
            load_weights(roles, roles.reference, st.sft_dir, version=st.sft_version)
        else:
            load_weights(roles, roles.reward, st.rm_dir, version=st.rm_version)


class PipelineRun(RunThread):
    def __init__(self, record: RunRecord, cfg: PipelineConfig, roles: RoleClients, *, metrics) -> None:
        if record.pipeline is None:
            record.pipeline = PipelineState()
        # Every PPO step also records the gold judge's mean score of its rollouts (metrics.jsonl: gold_mean): with
        # reward_kl it traces how far the gold judge follows the RM as the policy moves away from the reference
        # (reward over-optimisation, Gao et al. 2022), which the evaluation's end point alone cannot show.
        loop = RunLoop(
            record,
            cfg.ppo,
            roles,
            metrics=metrics,
            plan=PipelineVersions(record, roles),
            skip_bad=cfg.skip_bad_lines,
            rollout_texts=True,
            step_extras=self._gold_mean,
        )
        super().__init__(loop)
        if cfg.skip_bad_lines:  # the learner's jobs skip the same lines
            cfg = cfg.model_copy(
                update={
                    "sft": cfg.sft.model_copy(update={"skip_bad_lines": True}),
                    "rm": cfg.rm.model_copy(update={"skip_bad_lines": True}),
                }
            )
        self.cfg = cfg
        self.roles = roles
        self.state: PipelineState = record.pipeline
        data_reports, self.eval_prompts_all = check_pipeline_data(cfg, loop.rollouts.prompts_report)
        if not self.state.data:
            self.state.data = data_reports
        for name, r in data_reports.items():
            if r["skipped"]:
                _log.warning(
                    "data_lines_skipped", run_id=record.run_id, file=name, path=r["path"], skipped=r["skipped"]
                )
        registry = roles.cfg.judges
        self.gold = judges.resolve(cfg.gold.name, cfg.gold.args, registry, field="gold.name")
        self.second = judges.resolve(cfg.second_judge.name, cfg.second_judge.args, registry, field="second_judge.name")
        self.labeling: tuple[int, ComparisonStore] | None = None  # the open labeling round, for the labeler RPCs
        self.launcher = None  # built on first use when rm_job: launcher

    # -- the run -----------------------------------------------------------
    def body(self) -> str:
        """Each stage not yet done, in order (RunThread.run records how the run ended)."""
        rec, st = self.record, self.state
        for stage in STAGES:
            if stage in st.done:
                continue
            if self.stop_requested.is_set():
                return "stopped"
            rec.stage, rec.stage_fraction, rec.stage_detail = stage, 0.0, ""
            rec.save()
            t0 = time.perf_counter()
            _log.info("stage_started", run_id=rec.run_id, stage=stage)
            getattr(self, f"_stage_{stage}")()
            seconds = time.perf_counter() - t0
            st.wall_seconds[stage] = st.wall_seconds.get(stage, 0.0) + seconds
            st.done.append(stage)
            rec.save()
            self.loop.tracker.stage(stage, self._stage_results(stage, seconds))
            _log.info("stage_finished", run_id=rec.run_id, stage=stage, seconds=round(seconds, 2))
        return "succeeded"

    def _stage_results(self, stage: str, seconds: float) -> dict:
        """What tracking records of a finished stage: its wall seconds, and the RM's accuracy after the rm stage."""
        out: dict = {"seconds": seconds}
        if stage == "rm" and self.state.rm_rounds:
            last = self.state.rm_rounds[-1]
            out.update(
                accuracy=last.accuracy,
                heldout_comparisons=last.n,
                train_accuracy=last.train_accuracy,
                labeler_agreement=last.labeler_agreement,
            )
        return out

    def progress(self, fraction: float, detail: str) -> None:
        """Stage progress for GetRun (and the CLI's bar); saved with the record."""
        self.record.stage_fraction, self.record.stage_detail = max(0.0, min(1.0, fraction)), detail
        self.record.save()

    def learner(self) -> learner_pb2_grpc.LearnerServiceStub:
        return learner_pb2_grpc.LearnerServiceStub(self.roles.learner)

    def learner_job(self, method: str, call, *, job_id: str, span: tuple[float, float], what: str):
        """The learner's job call (TrainSFT, TrainRewardModel: one blocking RPC), with its progress polled
        (GetJobProgress, every JOB_POLL_S) into the stage's between span[0] and span[1]."""
        done = threading.Event()
        lo, hi = span

        def poll() -> None:
            while not done.wait(JOB_POLL_S):
                try:
                    p = self.learner().GetJobProgress(learner_pb2.GetJobProgressRequest(job_id=job_id), timeout=10)
                except grpc.RpcError:
                    continue  # not started yet, over, or the learner is restarting: the call itself says
                if not p.total_steps or done.is_set():
                    continue
                where = f"epoch {p.epoch}/{p.epochs}, " if p.epochs else ""
                unit = "step" if p.phase == "training" else f"{p.phase} batch"
                # e.g. "round 0: RM epoch 2/4, step 53/144": within the CLI's 80 columns after its prefix
                self.progress(lo + (hi - lo) * p.step / p.total_steps, f"{what} {where}{unit} {p.step}/{p.total_steps}")

        poller = threading.Thread(target=poll, name=f"{job_id}-progress", daemon=True)
        poller.start()
        try:
            return self.roles.call(method, self.roles.learner, call)
        finally:
            done.set()
            poller.join()

    # -- stages ------------------------------------------------------------
    def _stage_sft(self) -> None:
        st = self.state
        self.progress(0.0, "training on the demonstrations")
        req = learner_pb2.TrainSFTRequest(
            job_id=f"{self.record.run_id}-sft",
            demonstrations_path=self.cfg.demonstrations,
            config_yaml=dump_yaml(self.cfg.sft),
            output_dir=str(self.record.path / "sft"),
        )
        resp = self.learner_job(
            "TrainSFT",
            lambda t: self.learner().TrainSFT(req, timeout=JOB_TIMEOUT_S),
            job_id=req.job_id,
            span=(0.0, 0.8),
            what="SFT",
        )
        if not st.sft_version:  # above every version served (fixed once: a restart loads the same)
            st.sft_version = (
                max(self.roles.info(ch).weight_version for ch in self.roles.policy + self.roles.reference) + 1
            )
        st.sft_dir, st.sft_best_val_loss = resp.model_dir, resp.best_val_loss
        self.record.save()
        self.progress(0.8, "loading the SFT policy")
        load_weights(self.roles, self.roles.policy + self.roles.reference, resp.model_dir, version=st.sft_version)
        # Held-out samples of the SFT policy, the baseline of the evaluation.
        evaluate.write_eval_samples(self, "sft", span=(0.8, 1.0))

    def _stage_rm(self) -> None:
        """Round 0 on samples of the SFT policy; then the learner starts PPO from SFT (value model from the RM)."""
        st = self.state
        if not st.round_done(0):
            rm_rounds.run_round(self, 0)
        req = learner_pb2.ResetPolicyRequest(
            policy_dir=st.sft_dir,
            value_model_dir=st.rm_dir if self.cfg.value_from_rm else "",
            version=st.sft_version,
        )
        self.roles.call("ResetPolicy", self.roles.learner, lambda t: self.learner().ResetPolicy(req, timeout=t))
        self.text_loss("sft")  # the learner holds the SFT policy now

    def _stage_ppo(self) -> None:
        rec = self.record
        same_tokenizer = self.loop.check_tokenizers()
        every = self.cfg.rm_retrain.every_steps
        while rec.step < rec.total_steps:
            if self.stop_requested.is_set():
                raise RunStopped("in the ppo stage")
            step = rec.step
            if every and step and step % every == 0 and not self.state.round_done(step // every):
                rec.stage = "rm"
                rec.save()
                rm_rounds.run_round(self, step // every)
                rec.stage, rec.stage_detail = "ppo", ""
                rec.save()
            # Up to the next RM round (async rollouts never cross it: they would be scored by the old RM).
            end = min(rec.total_steps, (step // every + 1) * every) if every else rec.total_steps
            if not self.loop.steps(end, same_tokenizer):
                raise RunStopped("in the ppo stage")

    def _stage_evaluate(self) -> None:
        evaluate.stage_evaluate(self)

    def _stage_report(self) -> None:
        evaluate.stage_report(self)

    # -- helpers of the stages ------------------------------------------------
    def text_loss(self, key: str) -> None:
        """The learner's current policy's LM loss on the held-out text (the alignment tax), stored under `key`."""
        ev = self.cfg.evaluation
        if not ev.heldout_text:
            return
        req = learner_pb2.EvaluateTextLossRequest(text_path=ev.heldout_text, max_tokens=ev.heldout_max_tokens)
        resp = self.roles.call(
            "EvaluateTextLoss", self.roles.learner, lambda t: self.learner().EvaluateTextLoss(req, timeout=t)
        )
        self.state.text_loss[key] = TextLoss(loss=resp.loss, tokens=resp.tokens, policy_version=resp.policy_version)
        self.record.save()

    def _gold_mean(self, samples) -> dict:
        golds = [self.gold(prompt, s.text) for prompt, s in samples]
        return {"gold_mean": statistics.fmean(golds)} if golds else {}


def parse_run_config(data: dict) -> PipelineConfig | PPORunConfig:
    """PipelineConfig when `kind: pipeline`, else the PPO run configuration."""
    if isinstance(data, dict) and data.get("kind") == "pipeline":
        return build_config(PipelineConfig, data)
    return build_config(PPORunConfig, data)
