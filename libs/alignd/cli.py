"""The `alignd` command line.

  alignd up    [--config stack.yaml] [--set k=v ...] [--run-dir DIR]   every role, local processes
  alignd serve ROLE --config FILE [--set k=v ...] [--run-dir DIR]      one role (what a container runs)
  alignd demo  [--run-dir DIR]                                         the local stack, one call per role
  alignd ppo   --config JOB.yaml [--set k=v ...] [--run-dir DIR]        a PPO run on the local stack
  alignd run   [--preset NAME | --config JOB.yaml] [--set k=v ...] [--run-dir DIR]
                                                                       the whole pipeline on the local stack
  alignd tiny-model DIR [--kind causal_lm|reward] [--arch gpt2|llama]  save a tiny random model
  alignd job train-rm --request FILE.json                               one reward-model training job, standalone

Every command that runs something keeps its logs and outputs in --run-dir
(default: a new directory under ./runs).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from alignd import __version__
from alignd.config import ROLE_CONFIGS, ROLES, ConfigError, load_config

ROLE_APPS = {role: f"alignd.services.{role}.app:create" for role in ROLES}


def new_run_dir(kind: str, base: str | os.PathLike = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(base) / f"{kind}-{stamp}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def resolve_run_dir(arg: str | None, kind: str) -> Path:
    if arg:
        p = Path(arg)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return new_run_dir(kind)


def create_app(role: str, cfg, run_dir: Path | None = None):
    module, func = ROLE_APPS[role].split(":")
    return getattr(importlib.import_module(module), func)(cfg, run_dir)


def cmd_serve(args) -> int:
    from alignd.runtime.logging import configure_logging
    from alignd.runtime.role import run_role
    from alignd.runtime.server import ServiceHost

    cfg = load_config(ROLE_CONFIGS[args.role], args.config, args.set)
    configure_logging(cfg.log_level, role=args.role)
    run_dir = resolve_run_dir(args.run_dir, f"serve-{args.role}")
    app = create_app(args.role, cfg, run_dir)
    endpoint = Path(args.endpoint_file) if args.endpoint_file else run_dir / f"{args.role}.endpoint.json"
    if getattr(app, "follows_rank0", False):
        # A learner rank > 0 under torchrun serves no API: it runs rank 0's commands (services/learner/ranks.py).
        return app.follow(endpoint)
    host = ServiceHost(args.role, cfg.server, app.service_names)
    return run_role(app, host, endpoint)


def log_to_run_dir(run_dir: Path) -> None:
    """The launcher's own JSON events go to run_dir/logs/launcher.log; stdout stays readable."""
    from alignd.runtime.logging import configure_logging

    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    configure_logging("info", role="launcher", stream=open(run_dir / "logs" / "launcher.log", "a", buffering=1))


def cmd_up(args) -> int:
    from alignd.config import StackConfig
    from alignd.launcher import default_stack_config, run_stack

    run_dir = resolve_run_dir(args.run_dir, "up")
    log_to_run_dir(run_dir)
    if args.config:
        cfg = load_config(StackConfig, args.config, args.set)
    else:
        cfg = default_stack_config(args.set)
    return run_stack(cfg, run_dir)


def cmd_demo(args) -> int:
    from alignd.demo import run_demo

    run_dir = resolve_run_dir(args.run_dir, "demo")
    log_to_run_dir(run_dir)
    return run_demo(run_dir, config=args.config, overrides=args.set)


def cmd_ppo(args) -> int:
    from alignd.ppo_cli import run_ppo

    run_dir = resolve_run_dir(args.run_dir, "ppo")
    log_to_run_dir(run_dir)
    return run_ppo(args.config, args.set, run_dir)


# Pipeline presets: name -> job file in the configs directory.
PRESETS = {"tiny": "tiny_pipeline.yaml", "smollm2": "smollm2_pipeline.yaml"}


def configs_dir() -> Path:
    """$ALIGND_CONFIGS, else ./configs, else the configs/ of the source tree alignd runs from."""
    env = os.environ.get("ALIGND_CONFIGS")
    if env:
        return Path(env)
    here = Path("configs")
    if all((here / f).exists() for f in PRESETS.values()):
        return here
    return Path(__file__).resolve().parents[2] / "configs"


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    path = configs_dir() / PRESETS[name]
    if not path.exists():
        raise ConfigError(f"--preset {name}: {path} not found (set ALIGND_CONFIGS to the directory holding {PRESETS[name]})")
    return path


def cmd_run(args) -> int:
    from alignd.ppo_cli import run_ppo

    if args.config and args.preset:
        raise ConfigError("give --preset or --config, not both")
    config = args.config or str(preset_path(args.preset or "tiny"))
    run_dir = resolve_run_dir(args.run_dir, "run")
    log_to_run_dir(run_dir)
    return run_ppo(config, args.set, run_dir, pipeline=True)


def cmd_tiny_model(args) -> int:
    from alignd.models.tiny import build_tiny_model

    out = build_tiny_model(args.dir, arch=args.arch, kind=args.kind, seed=args.seed)
    print(out)
    return 0


EXIT_INVALID = 2


def cmd_job_train_rm(args) -> int:
    """The learner's reward-model job in its own process (what the coordinator's job launchers run): the request is a
    JSON object with the fields of TrainRewardModelRequest; the result is published in its output_dir (a repeated
    job id returns the stored result) and printed as one JSON line. Exit 2: invalid request, the message names the field."""
    import json

    from alignd.runtime.logging import configure_logging
    from alignd.services.coordinator.launchers import response_to_dict, rm_request

    configure_logging(args.log_level, role="job", stream=sys.stderr)
    try:
        raw = json.loads(Path(args.request).read_text())
        req = rm_request(raw)
    except OSError as err:
        print(f"alignd: job train-rm: --request {args.request}: {err.strerror}", file=sys.stderr)
        return EXIT_INVALID
    except ValueError as err:  # JSON syntax, not an object, unknown field, wrong type
        print(f"alignd: job train-rm: {args.request}: {err}", file=sys.stderr)
        return EXIT_INVALID
    from alignd.runtime.errors import InvalidArgument
    from alignd.services.learner.jobs import train_reward_model

    try:
        resp = train_reward_model(req)
    except InvalidArgument as err:
        print(f"alignd: job train-rm: {err}", file=sys.stderr)
        return EXIT_INVALID
    print(json.dumps(response_to_dict(resp)), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignd", description="RLHF as gRPC microservices.")
    parser.add_argument("--version", action="version", version=f"alignd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, config_required: bool = False):
        p.add_argument("--config", required=config_required, help="YAML configuration file")
        p.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE",
            help="override a configuration key (dotted path; value parsed as YAML); repeatable",
        )
        p.add_argument("--run-dir", help="directory for logs and outputs (default: a new one under ./runs)")

    p = sub.add_parser("serve", help="run one role (what a container runs)")
    p.add_argument("role", choices=ROLES)
    common(p, config_required=True)
    p.add_argument("--endpoint-file", help="write {address, metrics_url, pid} here once the ports are bound")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("up", help="start every role as a local process on loopback")
    common(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("demo", help="start the local stack and call every role once")
    common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ppo", help="run PPO on the local stack (a job file: stack + run)")
    common(p, config_required=True)
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser(
        "run", help="the whole pipeline (SFT, RM, PPO, evaluation, report) on the local stack; "
        "run it again with the same --run-dir to resume",
    )
    common(p)
    p.add_argument("--preset", help=f"a pipeline preset of configs/ ({', '.join(sorted(PRESETS))}; default tiny)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tiny-model", help="save a tiny random model (tests, demos)")
    p.add_argument("dir")
    p.add_argument("--kind", choices=["causal_lm", "reward"], default="causal_lm")
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("job", help="run one training job standalone (what the coordinator's job launchers start)")
    jobs = p.add_subparsers(dest="job", required=True)
    j = jobs.add_parser(
        "train-rm", help="train a reward model from a JSON request (the fields of TrainRewardModelRequest); "
        "publishes output_dir, prints the response as JSON; exit 2 on an invalid request",
    )
    j.add_argument("--request", required=True, metavar="FILE.json", help="the request: a JSON object")
    j.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                   help="level of the JSON log on stderr")
    j.set_defaults(func=cmd_job_train_rm)
    return parser


def main(argv: list[str] | None = None) -> int:
    from alignd.launcher import die_with_parent
    from alignd.runtime.malloc import tune_malloc

    die_with_parent()  # a child of `alignd up` or of a test: go when the parent goes
    tune_malloc()  # large weight/batch buffers: see runtime/malloc.py
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"alignd: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
