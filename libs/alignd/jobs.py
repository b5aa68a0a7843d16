"""The wire format of alignd's training jobs, shared by the learner (which runs them) and the coordinator (which
launches them as processes or Kubernetes Jobs): torch-free, so the coordinator can import it.

A job is one request message (TrainRewardModelRequest) given as a JSON object (`alignd job train-rm --request
FILE.json`). Its result is the response message, published inside the job's output directory as JOB_FILE
({"job_id", "response": base64 of the serialised message}) with the model it describes, and printed as one JSON
line (proto field names, every field present). A repeated job id finds the published result and replays it.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from google.protobuf import json_format

from alignd.v1 import learner_pb2

JOB_FILE = "alignd_job.json"  # the result a job publishes inside its output directory
EXIT_INVALID = 2  # `alignd job ...`: the request is invalid (the message names the field)
RM_REQUEST_FIELDS = tuple(learner_pb2.TrainRewardModelRequest.DESCRIPTOR.fields_by_name)


def response_to_dict(resp) -> dict:
    """A job's response message as JSON-ready data (proto field names, every field present)."""
    return json_format.MessageToDict(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def rm_response(data: dict) -> learner_pb2.TrainRewardModelResponse:
    """A job result dict (what `alignd job train-rm` prints) as the learner RPC's response message."""
    return json_format.ParseDict(data, learner_pb2.TrainRewardModelResponse())


def rm_request(data: dict) -> learner_pb2.TrainRewardModelRequest:
    """A request dict (or the JSON of `alignd job train-rm --request`) as the message; ValueError names a bad field."""
    if not isinstance(data, dict):
        raise ValueError("request: must be a JSON object")
    unknown = sorted(set(data) - set(RM_REQUEST_FIELDS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown field (fields: {', '.join(RM_REQUEST_FIELDS)})")
    for k, v in data.items():
        if not isinstance(v, str):
            raise ValueError(f"{k}: must be a string")
    try:
        return json_format.ParseDict(data, learner_pb2.TrainRewardModelRequest())
    except json_format.ParseError as err:
        raise ValueError(str(err)) from None


def result_record(job_id: str, resp) -> bytes:
    """The JOB_FILE content that publishes `resp` as the result of `job_id`."""
    return json.dumps({"job_id": job_id, "response": base64.b64encode(resp.SerializeToString()).decode()}).encode()


def stored_response(output_dir: str | os.PathLike, job_id: str, response_type):
    """The response of type `response_type` that the job `job_id` published in output_dir, marked replayed; None
    when there is none (no file, another job's, or not a result alignd wrote)."""
    try:
        stored = json.loads((Path(output_dir) / JOB_FILE).read_text())
        if not isinstance(stored, dict) or stored.get("job_id") != job_id:
            return None
        resp = response_type.FromString(base64.b64decode(stored["response"]))
    except Exception:  # noqa: BLE001 - anything unreadable is not a published result: the job runs
        return None
    resp.replayed = True
    return resp
