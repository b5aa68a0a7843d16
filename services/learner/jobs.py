"""SFT and reward-model training jobs of the learner (LearnerService.TrainSFT / TrainRewardModel).

A job reads its data with `alignd.data` (malformed lines are INVALID_ARGUMENT
naming file and line), trains a copy of a model with
`services/learner/supervised.py`, and saves the result as a save_pretrained
directory: written under a temporary name with the job's result file
(`alignd_job.json`) inside, fsync'ed, then renamed into place, so a
directory that exists is complete. A repeated call with the same job id
returns the stored result (replayed) without training; one job runs at a
time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from alignd import data
from alignd.atomic import publish_dir
from alignd.chat import ChatFormat
from alignd.config import (
    ConfigError,
    LearnerConfig,
    ModelConfig,
    OptimizerConfig,
    RMTrainConfig,
    SFTConfig,
    build_config,
)
from alignd.jobs import JOB_FILE, result_record, stored_response
from alignd.models.handle import load_causal_lm, load_scalar_head_model, load_tokenizer
from alignd.models.scoring import SCORE_POOLING_KEY
from alignd.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from alignd.runtime.logging import get_logger
from alignd.runtime.paths import is_owned, mark_owned
from alignd.services.learner import supervised
from alignd.v1 import learner_pb2

_log = get_logger("alignd.learner.jobs")


def job_chat_format(mcfg: ModelConfig, cfg) -> ChatFormat:
    """The job's tokenizer with the chat format its model will be served with (cfg: an SFT or RM job's config);
    it stands in for the tokenizer in the training code (alignd.chat)."""
    return ChatFormat.resolve(load_tokenizer(mcfg), cfg.chat_template).with_system(cfg.system_prompt)


def _config(model, text: str, field: str = "config_yaml"):
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as err:
        raise InvalidArgument(field, f"not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise InvalidArgument(field, "must be a YAML mapping")
    try:
        return build_config(model, raw)
    except ConfigError as err:
        raise InvalidArgument(field, str(err)) from None


def _load(fn, path: str, field: str, **kw):
    if not path:
        raise InvalidArgument(field, "must not be empty")
    try:
        records, report = fn(path, **kw)
    except data.DataError as err:
        raise InvalidArgument(field, str(err)) from None
    return records, report


def _records_and_validation(load, *, path: str, field: str, validation_path: str, skip_bad: bool, **kw):
    """(records of `path`, records of the validation file: [] when validation_path is empty), both read with
    `load` (InvalidArgument naming the field of a file that is missing or malformed)."""
    records, _ = _load(load, path, field, skip_bad=skip_bad, **kw)
    val = _load(load, validation_path, "validation_path", skip_bad=skip_bad, **kw)[0] if validation_path else []
    return records, val


def _owned(directory: Path) -> bool:
    """A directory alignd made: it carries the ownership marker, or a job result (directories of older versions)."""
    return is_owned(directory) or (directory / JOB_FILE).is_file()


def _check_output(output_dir: str) -> Path:
    """The job's output directory: refused when something that alignd did not make is there (InvalidArgument)."""
    if not output_dir:
        raise InvalidArgument("output_dir", "must not be empty")
    final = Path(output_dir)
    if final.is_symlink() or (final.exists() and not (final.is_dir() and _owned(final))):
        raise InvalidArgument(
            "output_dir",
            "exists and was not made by an alignd job; a job replaces only its own outputs: choose a new directory",
        )
    return final


def _publish(tmp: Path, output_dir: str, job_id: str, *, resp) -> None:
    (tmp / JOB_FILE).write_bytes(result_record(job_id, resp))
    final = _check_output(output_dir)  # again: the directory may have appeared while the job trained
    publish_dir(tmp, final, replace=True)  # an earlier result of alignd's (a job of another id) is replaced


def _tmp_dir(output_dir: str) -> Path:
    """A fresh, marked working directory next to the output (call with the job lock held: a job of the same
    process may be using the previous one)."""
    final = _check_output(output_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists() and not tmp.is_symlink() and _owned(tmp):
        shutil.rmtree(tmp, ignore_errors=True)  # left by a job of this pid that died (the lock is ours now)
    elif tmp.exists() or tmp.is_symlink():
        raise InvalidArgument("output_dir", f"{tmp.name} next to it exists and was not made by alignd")
    tmp.mkdir()
    mark_owned(tmp)
    return tmp


def _split(records, validation, *, fraction: float, seed: int, what: str):
    if validation:
        return records, validation
    if fraction <= 0:
        return records, []
    train, val = data.split_train_eval(records, fraction, seed)
    if not train:
        raise InvalidArgument(
            what, "too few examples to hold some out; lower validation_fraction or pass a validation file"
        )
    return train, val


def run_job(
    *,
    job_id: str,
    output_dir: str,
    response_type,
    prepare: Callable[[], Any],
    train: Callable[[Any, Path], Any],
    claim: Callable[[], contextlib.AbstractContextManager],
):
    """The skeleton of every training job (SFT, RM, and later ones):

    1. the stored result of the same job id in output_dir, replayed without training;
    2. `prepare()`: the request's configuration and data, validated (InvalidArgument naming the field) before
       anything is locked or written;
    3. under `claim()` (the learner's one-job-at-a-time lock), a fresh working directory next to the output
       (only once the lock is held: a job of the same process may still be using the previous one);
    4. `train(prepared, tmp)`: trains, saves the model into tmp and returns the response;
    5. the response, with model_dir and duration_seconds, published with the model (fsync, rename) and returned.
    The working directory is removed whatever happens."""
    done = stored_response(output_dir, job_id, response_type)
    if done is not None:
        return done
    prepared = prepare()
    _check_output(output_dir)
    with claim():
        tmp = _tmp_dir(output_dir)
        try:
            t0 = time.perf_counter()
            resp = train(prepared, tmp)
            resp.model_dir = str(Path(output_dir).resolve())
            resp.duration_seconds = time.perf_counter() - t0
            _publish(tmp, output_dir, job_id, resp=resp)
            return resp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _required(**fields: str) -> None:
    for name, value in fields.items():
        if not value:
            raise InvalidArgument(name, "must not be empty")


class JobProgress:
    """How far each running job has come (LearnerService.GetJobProgress), from its training loop's on_step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, learner_pb2.GetJobProgressResponse] = {}

    @contextlib.contextmanager
    def tracking(self, job_id: str):
        with self._lock:
            self._jobs[job_id] = learner_pb2.GetJobProgressResponse(job_id=job_id, phase="loading")
        try:
            yield
        finally:
            with self._lock:
                self._jobs.pop(job_id, None)

    def on_step(self, job_id: str, *, epochs: int) -> Callable[[dict], None]:
        """The on_step of a training loop of `epochs` epochs (alignd.services.learner.supervised)."""

        def report(row: dict) -> None:
            phase = row.get("phase", "training")
            step, total = int(row["step"]), int(row["total_steps"])
            epoch = min(epochs, -(-step * epochs // max(1, total))) if phase == "training" and epochs else 0
            msg = learner_pb2.GetJobProgressResponse(
                job_id=job_id, phase=phase, epoch=epoch, epochs=epochs if epoch else 0, step=step, total_steps=total
            )
            with self._lock:
                if job_id in self._jobs:
                    self._jobs[job_id] = msg

        return report

    def get(self, job_id: str) -> learner_pb2.GetJobProgressResponse:
        with self._lock:
            msg = self._jobs.get(job_id)
        if msg is None:
            raise NotFound(f"job_id: no job {job_id[:128]!r} is running")
        return msg


class Jobs:
    def __init__(self, cfg: LearnerConfig) -> None:
        self.cfg = cfg
        self._busy = threading.Lock()
        self.progress = JobProgress()

    @contextlib.contextmanager
    def _claim(self):
        if not self._busy.acquire(blocking=False):
            raise FailedPrecondition("the learner is running another training job")
        try:
            yield
        finally:
            self._busy.release()

    def sft(self, req: learner_pb2.TrainSFTRequest) -> learner_pb2.TrainSFTResponse:
        _required(job_id=req.job_id)

        def prepare():
            cfg: SFTConfig = _config(SFTConfig, req.config_yaml)
            demos, val = _records_and_validation(
                data.load_demonstrations,
                path=req.demonstrations_path,
                field="demonstrations_path",
                validation_path=req.validation_path,
                skip_bad=cfg.skip_bad_lines,
            )
            return cfg, *_split(demos, val, fraction=cfg.validation_fraction, seed=cfg.seed, what="demonstrations_path")

        def train(prepared, tmp: Path) -> learner_pb2.TrainSFTResponse:
            cfg, train, val = prepared
            mcfg = ModelConfig(path=req.init_model_dir or self.cfg.model.path, chat_template=cfg.chat_template)
            model, tok = load_causal_lm(mcfg), job_chat_format(mcfg, cfg)
            _log.info("sft_started", job_id=req.job_id, train=len(train), validation=len(val), epochs=cfg.epochs)
            res = supervised.train_sft(
                model,
                tok,
                [(d.prompt, d.completion) for d in train],
                val=[(d.prompt, d.completion) for d in val],
                epochs=cfg.epochs,
                lr=cfg.lr,
                batch_size=cfg.batch_size,
                max_tokens=cfg.max_tokens,
                residual_dropout=cfg.residual_dropout,
                select=cfg.select if val else "last",
                warmup_steps=cfg.warmup_steps,
                betas=tuple(self.cfg.optimizer.betas),
                seed=cfg.seed,
                on_step=self.progress.on_step(req.job_id, epochs=cfg.epochs),
            )
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            return learner_pb2.TrainSFTResponse(
                best_epoch=res.best_epoch,
                best_val_loss=min((r["val_loss"] for r in res.history), default=float("nan")) if val else float("nan"),
                history=[
                    learner_pb2.EpochStats(
                        epoch=r["epoch"], step=r["step"], train_loss=r["train_loss"], val_loss=r["val_loss"]
                    )
                    for r in res.history
                ],
                train_examples=len(train),
                validation_examples=len(val),
            )

        with self.progress.tracking(req.job_id):
            resp = run_job(
                job_id=req.job_id,
                output_dir=req.output_dir,
                response_type=learner_pb2.TrainSFTResponse,
                prepare=prepare,
                train=train,
                claim=self._claim,
            )
        if not resp.replayed:
            _log.info(
                "sft_finished", job_id=req.job_id, best_epoch=resp.best_epoch, seconds=round(resp.duration_seconds, 2)
            )
        return resp

    def reward_model(self, req: learner_pb2.TrainRewardModelRequest) -> learner_pb2.TrainRewardModelResponse:
        with self.progress.tracking(req.job_id):
            return train_reward_model(
                req, betas=tuple(self.cfg.optimizer.betas), claim=self._claim, progress=self.progress
            )


def train_reward_model(
    req: learner_pb2.TrainRewardModelRequest,
    *,
    betas: tuple[float, float] = tuple(OptimizerConfig().betas),
    claim: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    progress: JobProgress | None = None,
) -> learner_pb2.TrainRewardModelResponse:
    """The reward-model training job (LearnerService.TrainRewardModel, and `alignd job train-rm` standalone).

    Validates the request (InvalidArgument naming the field), replays the result stored in output_dir
    for the same job id, else trains and publishes output_dir atomically with the result inside (run_job).
    `claim` is entered around the training (the learner's one-job-at-a-time lock)."""
    _required(job_id=req.job_id)
    if not req.init_model_dir:
        raise InvalidArgument("init_model_dir", "must not be empty (the SFT model, or a reward model to continue)")
    _required(output_dir=req.output_dir)

    def prepare():
        cfg: RMTrainConfig = _config(RMTrainConfig, req.config_yaml)
        skip = cfg.skip_bad_lines
        comps, val = _records_and_validation(
            data.load_comparisons,
            path=req.comparisons_path,
            field="comparisons_path",
            validation_path=req.validation_path,
            skip_bad=skip,
            max_k=cfg.max_k,
        )
        demos = (
            _load(data.load_demonstrations, req.demonstrations_path, "demonstrations_path", skip_bad=skip)[0]
            if req.demonstrations_path
            else []
        )
        return cfg, demos, *_split(comps, val, fraction=cfg.validation_fraction, seed=cfg.seed, what="comparisons_path")

    resp = run_job(
        job_id=req.job_id,
        output_dir=req.output_dir,
        response_type=learner_pb2.TrainRewardModelResponse,
        prepare=prepare,
        train=lambda prepared, tmp: _train_rm(req, prepared, tmp, betas=betas, progress=progress),
        claim=claim,
    )
    if not resp.replayed:
        _log.info(
            "rm_finished",
            job_id=req.job_id,
            val_accuracy=round(resp.val_accuracy, 4),
            seconds=round(resp.duration_seconds, 2),
        )
    return resp


def _train_rm(
    req: learner_pb2.TrainRewardModelRequest,
    prepared,
    tmp: Path,
    *,
    betas: tuple[float, float],
    progress: JobProgress | None = None,
) -> learner_pb2.TrainRewardModelResponse:
    """Trains the reward model of a prepared RM job, saves it into tmp and returns the response."""
    cfg, demos, train, val = prepared
    mcfg = ModelConfig(path=req.init_model_dir, chat_template=cfg.chat_template)
    model, tok = load_scalar_head_model(mcfg, allow_new_head=True), job_chat_format(mcfg, cfg)
    if tok.pad_token_id is not None:
        model.config.pad_token_id = tok.pad_token_id
    blocks = supervised.truncate_layers(model, cfg.layers) if cfg.layers else None
    setattr(model.config, SCORE_POOLING_KEY, cfg.pooling)
    _log.info(
        "rm_started",
        job_id=req.job_id,
        train=len(train),
        validation=len(val),
        mode=cfg.train,
        pooling=cfg.pooling,
        layers=model.config.num_hidden_layers,
        init_layers=blocks,
    )
    on_step = progress.on_step(req.job_id, epochs=cfg.epochs if cfg.train != "head" else 0) if progress else None
    res = _fit_rm(model, tok, cfg, train=train, val=val, demos=demos, betas=betas, on_step=on_step)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return learner_pb2.TrainRewardModelResponse(
        val_accuracy_before=res.extra["val_accuracy_before"],
        val_accuracy=res.extra["val_accuracy"],
        train_accuracy=res.extra["train_accuracy"],
        score_bias=res.extra["score_bias"],
        history=[
            learner_pb2.EpochStats(epoch=r["epoch"], step=r["step"], val_accuracy=r["val_accuracy"])
            for r in res.history
        ],
        train_comparisons=len(train),
        validation_comparisons=len(val),
    )


def _fit_rm(model, tok, cfg: RMTrainConfig, *, train, val, demos, betas: tuple[float, float], on_step=None):
    """Fits the reward model on the comparisons: its head alone (train: head) or the whole model (train: full)."""
    triple = lambda c: (c.prompt, list(c.completions), list(c.ranking))  # noqa: E731
    demo_pairs = [(d.prompt, d.completion) for d in demos]
    if cfg.train == "head":
        return supervised.fit_rm_head(
            model,
            tok,
            [triple(c) for c in train],
            val=[triple(c) for c in val],
            l2=cfg.head_l2,
            max_tokens=cfg.max_tokens,
            demonstrations=demo_pairs,
            unit_std=cfg.score_scale == "unit_std",
            on_step=on_step,
        )
    return supervised.train_rm(
        model,
        tok,
        [triple(c) for c in train],
        val=[triple(c) for c in val],
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        max_tokens=cfg.max_tokens,
        epochs=cfg.epochs,
        warmup_steps=cfg.warmup_steps,
        betas=tuple(betas),
        seed=cfg.seed,
        demonstrations=demo_pairs,
        unit_std=cfg.score_scale == "unit_std",
        on_step=on_step,
    )
