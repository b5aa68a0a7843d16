"""The learner's commands of the `alignd` CLI (registered through the `alignd.commands` entry point):

alignd job train-rm --request FILE.json    the reward-model job in its own process (what the coordinator's
                                           job launchers start, locally or as a Kubernetes Job)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignd.jobs import EXIT_INVALID, response_to_dict, rm_request


def register(sub) -> None:
    p = sub.add_parser("job", help="run one training job standalone (what the coordinator's job launchers start)")
    jobs = p.add_subparsers(dest="job", required=True)
    j = jobs.add_parser(
        "train-rm",
        help="train a reward model from a JSON request (the fields of TrainRewardModelRequest); "
        "publishes output_dir, prints the response as JSON; exit 2 on an invalid request",
    )
    j.add_argument("--request", required=True, metavar="FILE.json", help="the request: a JSON object")
    j.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="level of the JSON log on stderr",
    )
    j.set_defaults(func=cmd_job_train_rm)


def cmd_job_train_rm(args) -> int:
    """The learner's reward-model job in its own process: the request is a JSON object with the fields of
    TrainRewardModelRequest; the result is published in its output_dir (a repeated job id returns the stored
    result) and printed as one JSON line (alignd.jobs). Exit 2: invalid request, the message names the field."""
    from alignd.runtime.logging import configure_logging

    configure_logging(args.log_level, role="job", stream=sys.stderr)
    try:
        req = rm_request(json.loads(Path(args.request).read_text()))
    except OSError as err:
        print(f"alignd: job train-rm: --request {args.request}: {err.strerror}", file=sys.stderr)
        return EXIT_INVALID
    except ValueError as err:  # JSON syntax, not an object, unknown field, wrong type
        print(f"alignd: job train-rm: {args.request}: {err}", file=sys.stderr)
        return EXIT_INVALID
    from alignd.runtime.errors import InvalidArgument
    from alignd.services.learner.jobs import train_reward_model  # torch: only once the request is valid

    try:
        resp = train_reward_model(req)
    except InvalidArgument as err:
        print(f"alignd: job train-rm: {err}", file=sys.stderr)
        return EXIT_INVALID
    print(json.dumps(response_to_dict(resp)), flush=True)
    return 0
