"""The `alignd` command line.

  alignd up    [--config stack.yaml | --preset NAME] [--set k=v ...] [--run-dir DIR]
                                                                       every role, local processes
  alignd serve ROLE --config FILE [--set k=v ...] [--run-dir DIR]      one role (what a container runs)
  alignd demo  [--run-dir DIR]                                         the local stack, one call per role
  alignd ppo   --config JOB.yaml [--set k=v ...] [--run-dir DIR]        a PPO run on the local stack
  alignd run   [--preset NAME | --config JOB.yaml] [--set k=v ...] [--run-dir DIR]
                                                                       the whole pipeline on the local stack
  alignd tiny-model DIR [--kind causal_lm|reward] [--arch gpt2|llama]  save a tiny random model
  alignd job train-rm --request FILE.json                               one reward-model training job, standalone
  alignd reward score (--address HOST:PORT | --stack stack.json) (--prompt P --response R | --file in.jsonl)
                                                                       score pairs with a reward service
  alignd runs start|list|watch|stop|report ...                          runs on a coordinator (alignd.runs_cli)

Every command that runs something keeps its logs and outputs in --run-dir
(default: a new directory under ./runs).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from alignd import __version__
from alignd.config import ROLE_CONFIGS, ROLES, ConfigError, load_config

ROLE_APPS = {role: f"alignd.services.{role}.app:create" for role in ROLES}
# Commands a role adds to `alignd` (e.g. the learner's `alignd job train-rm`): entry points of this group, each a
# function that registers its subcommands on the top-level subparsers. The CLI itself knows no role's commands.
COMMANDS_GROUP = "alignd.commands"
EXIT_INVALID = 2  # bad arguments or input; the message names them


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
    from alignd.local_stack import default_stack_config, run_stack

    if args.config and args.preset:
        raise ConfigError("give --preset or --config, not both")
    data_dirs: list[str] = []
    if args.preset:
        # The preset's stack (its `stack:` section; --set keys are the stack's), with its data readable by every role.
        from alignd.ppo_cli import data_dirs as job_data_dirs
        from alignd.ppo_cli import load_pipeline_job

        job = load_pipeline_job(str(preset_path(args.preset)), [f"stack.{kv}" for kv in args.set])
        cfg, data_dirs = job.stack, job_data_dirs(job, True)
    elif args.config:
        cfg = load_config(StackConfig, args.config, args.set)
    else:
        cfg = default_stack_config(args.set)
    run_dir = resolve_run_dir(args.run_dir, "up")
    log_to_run_dir(run_dir)
    return run_stack(cfg, run_dir, data_dirs=data_dirs)


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
    """$ALIGND_CONFIGS, else the presets installed with alignd (alignd.presets: configs/ of a checkout)."""
    env = os.environ.get("ALIGND_CONFIGS")
    if env:
        return Path(env)
    from alignd.datapaths import presets_dir

    return presets_dir()


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    path = configs_dir() / PRESETS[name]
    if not path.exists():
        raise ConfigError(
            f"--preset {name}: {path} not found (set ALIGND_CONFIGS to the directory holding {PRESETS[name]})"
        )
    return path


def cmd_run(args) -> int:
    from alignd.ppo_cli import run_pipeline

    if args.config and args.preset:
        raise ConfigError("give --preset or --config, not both")
    config = args.config or str(preset_path(args.preset or "tiny"))
    run_dir = resolve_run_dir(args.run_dir, "run")
    log_to_run_dir(run_dir)
    return run_pipeline(config, args.set, run_dir)


def cmd_tiny_model(args) -> int:
    from alignd.models.tiny import build_tiny_model

    out = build_tiny_model(args.dir, arch=args.arch, kind=args.kind, seed=args.seed)
    print(out)
    return 0


class _ScoreFailure(Exception):
    """`alignd reward score` stops: `message` goes to stderr, `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_INVALID) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def _stack_reward_target(stack_file: str) -> tuple[str, str | None]:
    """The reward role's address in an `alignd up` stack.json, and the stack's scoring token when it has auth."""
    import json

    try:
        stack = json.loads(Path(stack_file).read_text())
        address = stack["services"]["reward"]["address"]
        auth = stack.get("auth") or {}
        stack_token = None
        if auth.get("tokens_file"):  # the stack's scoring client (alignd.runtime.tokens)
            from alignd.runtime.auth import read_token_entry

            stack_token = read_token_entry(auth["tokens_file"], "scorer")
    except OSError as err:
        raise _ScoreFailure(f"--stack {stack_file}: {err.strerror}") from err
    except (ValueError, KeyError, TypeError) as err:
        raise _ScoreFailure(
            f"--stack {stack_file}: not a stack.json of `alignd up` with a reward role "
            '({"services": {"reward": {"address": ...}}})'
        ) from err
    if not isinstance(address, str):
        raise _ScoreFailure(f"--stack {stack_file}: services.reward.address is not a string")
    return address, stack_token


def _score_record(name: str, lineno: int, line: bytes) -> dict | None:
    """One line of --file as {"prompt", "response", "id"?}; None for a blank line; _ScoreFailure naming file:line."""
    import json

    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise _ScoreFailure(f"{name}:{lineno}: not UTF-8") from None
    if not text.strip():
        return None  # blank lines carry no pair
    try:
        obj = json.loads(text)
    except ValueError as err:
        raise _ScoreFailure(f"{name}:{lineno}: not JSON: {err}") from None
    if not isinstance(obj, dict):
        raise _ScoreFailure(
            f'{name}:{lineno}: expected a JSON object with "prompt" and "response", got {type(obj).__name__}'
        )
    for key in ("prompt", "response"):
        if key not in obj:
            raise _ScoreFailure(f'{name}:{lineno}: missing "{key}"')
        if not isinstance(obj[key], str):
            raise _ScoreFailure(f'{name}:{lineno}: "{key}" must be a string, got {type(obj[key]).__name__}')
    if not obj["response"]:
        raise _ScoreFailure(f'{name}:{lineno}: "response" must not be empty')
    return obj


def _score_records(args) -> list[dict]:
    """The pairs to score: --prompt/--response, or each non-blank line of --file (- = stdin)."""
    if args.file is None:
        return [{"prompt": args.prompt or "", "response": args.response}]
    name = "<stdin>" if args.file == "-" else args.file
    try:
        raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    except OSError as err:
        raise _ScoreFailure(f"--file {args.file}: {err.strerror}") from None
    records = (_score_record(name, lineno, line) for lineno, line in enumerate(raw.splitlines(), 1))
    return [r for r in records if r is not None]


def _score(args, *, address: str, stack_token: str | None, records: list[dict]):
    """The reward service's scores of `records` (a RewardClient from the TLS and token arguments)."""
    from alignd.reward_client import RewardClient, RewardClientError

    env_token = os.environ.get("ALIGND_REWARD_TOKEN") or stack_token
    try:
        client = RewardClient(address, **client_options(args, env_token))
    except ValueError as err:
        raise _ScoreFailure(str(err)) from None
    try:
        with client:
            return client.score_many(records, batch_size=args.batch_size, max_in_flight=args.max_in_flight)
    except RewardClientError as err:
        raise _ScoreFailure(f"{address}: {err.code.name}: {err.details}", 1) from None
    except ValueError as err:  # --batch-size / --max-in-flight out of range
        raise _ScoreFailure(str(err)) from None


def client_options(args, env_token: str | None) -> dict:
    """The keyword arguments of a client SDK (RewardClient, RunsClient) from add_client_options' arguments: the
    token from --token-file, else `env_token` (the environment's, or an `alignd up` stack's)."""
    return dict(
        token=None if args.token_file else env_token,
        token_file=args.token_file,
        tls=args.tls,
        root_certificates_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        server_name_override=args.server_name,
        timeout=args.timeout,
    )


def add_client_options(p: argparse.ArgumentParser, *, token_env: str, timeout: float, timeout_help: str) -> None:
    """--token-file, TLS and --timeout: how a command reaches a service (alignd reward score, alignd runs)."""
    p.add_argument("--token-file", metavar="F", help=f"file holding the bearer token (default: ${token_env})")
    p.add_argument("--tls", action="store_true", help="use TLS (implied by --ca-file, --cert-file, --key-file)")
    p.add_argument("--ca-file", metavar="F", help="PEM CA bundle for the server's certificate (default: system roots)")
    p.add_argument("--cert-file", metavar="F", help="PEM client certificate (mutual TLS; with --key-file)")
    p.add_argument("--key-file", metavar="F", help="PEM client private key (mutual TLS; with --cert-file)")
    p.add_argument("--server-name", metavar="NAME", help="check the server's certificate against NAME")
    p.add_argument("--timeout", type=float, default=timeout, metavar="S", help=f"{timeout_help} (default {timeout:g})")


def _write_scores(out_path: str | None, records: list[dict], result) -> None:
    """One JSON line {"id"?, "score", "weight_version"} per record, to stdout or atomically to --out."""
    import json

    from alignd.atomic import write_bytes_atomic

    lines = []
    for rec, score, version in zip(records, result.scores, result.weight_versions):
        out = {"id": rec["id"]} if "id" in rec else {}
        out.update(score=score, weight_version=version)
        lines.append(json.dumps(out, ensure_ascii=False) + "\n")
    data = "".join(lines)
    if out_path is None or out_path == "-":
        sys.stdout.write(data)
        sys.stdout.flush()
        return
    try:
        write_bytes_atomic(out_path, data.encode("utf-8"))
    except OSError as err:
        raise _ScoreFailure(f"--out {out_path}: {err.strerror}") from None


def cmd_reward_score(args) -> int:
    """Scores --prompt/--response, or every line of --file (JSON objects: "prompt", "response", optional "id"), with
    the reward service at --address (or the reward role of an `alignd up` stack.json); one JSON line per input
    line on stdout or --out: {"id"?, "score", "weight_version"}. Exit 2: bad arguments or input (file:line:
    message); exit 1: the service refused or failed (status code and details on stderr)."""
    from alignd.runtime.logging import configure_logging

    configure_logging("warning", role="reward-client", stream=sys.stderr)
    try:
        if args.file is not None and (args.prompt is not None or args.response is not None):
            raise _ScoreFailure("give --file or --prompt/--response, not both")
        if args.file is None and args.response is None:
            raise _ScoreFailure("give --response (and --prompt) or --file")
        address, stack_token = args.address, None
        if args.stack is not None:
            address, stack_token = _stack_reward_target(args.stack)
        records = _score_records(args)
        result = _score(args, address=address, stack_token=stack_token, records=records)
        _write_scores(args.out, records, result)
    except _ScoreFailure as failure:
        print(f"alignd: reward score: {failure.message}", file=sys.stderr)
        return failure.code
    return 0


def _add_run_options(p: argparse.ArgumentParser, *, config_required: bool = False) -> None:
    """--config, --set and --run-dir: the options of every command that runs something."""
    p.add_argument("--config", required=config_required, help="YAML configuration file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a configuration key (dotted path; value parsed as YAML); repeatable",
    )
    p.add_argument("--run-dir", help="directory for logs and outputs (default: a new one under ./runs)")


def _add_run_commands(sub) -> None:
    """serve, up, demo, ppo and run: the commands that start roles and keep their outputs in --run-dir."""
    p = sub.add_parser("serve", help="run one role (what a container runs)")
    p.add_argument("role", choices=ROLES)
    _add_run_options(p, config_required=True)
    p.add_argument("--endpoint-file", help="write {address, metrics_url, pid} here once the ports are bound")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("up", help="start every role as a local process on loopback")
    p.add_argument(
        "--preset", metavar="NAME", help="the stack a preset runs on (then: alignd runs start --preset NAME)"
    )
    _add_run_options(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("demo", help="start the local stack and call every role once")
    _add_run_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ppo", help="run PPO on the local stack (a job file: stack + run)")
    _add_run_options(p, config_required=True)
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser(
        "run",
        help="the whole pipeline (SFT, RM, PPO, evaluation, report) on the local stack; "
        "run it again with the same --run-dir to resume",
    )
    _add_run_options(p)
    p.add_argument("--preset", help=f"a pipeline preset of configs/ ({', '.join(sorted(PRESETS))}; default tiny)")
    p.set_defaults(func=cmd_run)


def _add_tiny_model_command(sub) -> None:
    """tiny-model: save a tiny random model."""
    p = sub.add_parser("tiny-model", help="save a tiny random model (tests, demos)")
    p.add_argument("dir")
    p.add_argument("--kind", choices=["causal_lm", "reward"], default="causal_lm")
    p.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)


def _add_reward_commands(sub) -> None:
    """reward score: score pairs with a reward service, its target, input, output, TLS and batching options."""
    p = sub.add_parser("reward", help="call a reward service (alignd.v1.RewardService)")
    reward = p.add_subparsers(dest="reward_command", required=True)
    r = reward.add_parser(
        "score",
        help='score --prompt/--response or a JSONL file of {"prompt", "response", "id"?} objects; '
        'prints one JSON line per input line: {"id"?, "score", "weight_version"}; exit 2 on bad input, 1 on a service '
        "error",
        description="The bearer token comes from --token-file or the environment variable ALIGND_REWARD_TOKEN "
        "(never from the command line, where `ps` would show it).",
    )
    target = r.add_mutually_exclusive_group(required=True)
    target.add_argument("--address", metavar="HOST:PORT", help="a reward replica")
    target.add_argument("--stack", metavar="stack.json", help="the stack.json of `alignd up`: its reward role")
    r.add_argument("--prompt", help="the prompt (default empty); with --response")
    r.add_argument("--response", help="the response to score")
    r.add_argument(
        "--file", metavar="in.jsonl", help='one JSON object per line: "prompt", "response", optional "id"; - = stdin'
    )
    r.add_argument("--out", metavar="out.jsonl", help="write the results here (atomically) instead of stdout")
    add_client_options(
        r, token_env="ALIGND_REWARD_TOKEN", timeout=30.0, timeout_help="deadline of each request, retries included"
    )
    r.add_argument("--batch-size", type=int, default=64, metavar="N", help="pairs per request (default 64)")
    r.add_argument("--max-in-flight", type=int, default=4, metavar="N", help="requests at once (default 4)")
    r.set_defaults(func=cmd_reward_score)


def cmd_probe(args) -> int:
    from alignd import probe

    return probe.run(load_config(probe.ProbeConfig, args.config))


def _add_probe_command(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="check that a deployment serves: every role's gRPC health and the reward role's /get_reward (what "
        "`helm test` runs); exit 0 when all pass",
    )
    p.add_argument("--config", required=True, metavar="probe.yaml", help="the roles and how to reach them")
    p.set_defaults(func=cmd_probe)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignd", description="RLHF as gRPC microservices.")
    parser.add_argument("--version", action="version", version=f"alignd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_tiny_model_command(sub)
    for entry in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        entry.load()(sub)  # a role's own commands (pyproject.toml [project.entry-points."alignd.commands"])
    _add_reward_commands(sub)
    _add_probe_command(sub)
    from alignd.runs_cli import register as add_runs_commands

    add_runs_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from alignd.local_stack import die_with_parent
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
