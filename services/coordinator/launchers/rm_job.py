"""`run_rm_job`: the reward-model training job (`alignd job train-rm`) through any launcher.

The request goes into a file next to the output directory (work_dir), the
job runs through the launcher, and the result is read back from the output
directory, where the job publishes it (services/learner/jobs.py). The job is
idempotent by job id: a published result is returned without running
anything.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from google.protobuf import json_format

from alignd.atomic import write_json_atomic
from alignd.jobs import response_to_dict, rm_request, stored_response
from alignd.runtime.logging import get_logger
from alignd.services.coordinator.launchers.base import JobFailed, JobLauncher, JobResult, JobSpec, job_name
from alignd.v1 import learner_pb2

_log = get_logger("alignd.coordinator.launchers")


def run_rm_job(
    launcher: JobLauncher,
    request: dict,
    timeout: float,
    *,
    cancel: threading.Event | None = None,
    work_dir: str | os.PathLike | None = None,
) -> dict:
    """Trains a reward model with `alignd job train-rm` through `launcher`; returns the TrainRewardModelResponse as a
    dict (proto field names; `rm_response` makes it the message). `request` has the fields of
    TrainRewardModelRequest. The request file (and, locally, the job's log) go to work_dir, default
    <parent of output_dir>/jobs. A result already published in output_dir for this job id is returned (replayed)
    without running anything. Raises JobFailed (`.invalid_request` when the job refused the request), ValueError for
    a request missing job_id or output_dir, LauncherError when the launcher cannot work."""
    req = rm_request(request)
    for key in ("job_id", "output_dir"):
        if not getattr(req, key):
            raise ValueError(f"{key}: must not be empty")
    output_dir = Path(req.output_dir)
    done = stored_response(output_dir, req.job_id, learner_pb2.TrainRewardModelResponse)
    if done is not None:
        done = response_to_dict(done)
        _log.info("job_replayed", job_id=req.job_id, output_dir=str(output_dir))
        return done
    work = Path(work_dir) if work_dir else output_dir.parent / "jobs"
    slug = job_name(f"rm-{req.job_id}")
    request_file = work / f"{slug}.request.json"
    check = getattr(launcher, "check_shared_path", None)
    if check is not None:
        check(request_file)
        check(output_dir)
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(request_file, json_format.MessageToDict(req, preserving_proto_field_name=True))
    spec = JobSpec(
        name=f"rm-{req.job_id}",
        args=["job", "train-rm", "--request", str(request_file)],
        resources=launcher.rm_resources,
        labels={"alignd.io/job-kind": "train-rm"},
        log_path=str(work / f"{slug}.log"),
    )
    result = launcher.run(spec, timeout, cancel=cancel)
    if not result.succeeded:
        raise JobFailed(result)
    resp = stored_response(output_dir, req.job_id, learner_pb2.TrainRewardModelResponse)
    if resp is None:
        raise JobFailed(
            JobResult(
                spec.name,
                False,
                exit_code=result.exit_code,
                reason=f"it succeeded but published no result in {output_dir}",
                duration_seconds=result.duration_seconds,
            )
        )
    resp.replayed = False  # the job just published it
    return response_to_dict(resp)
