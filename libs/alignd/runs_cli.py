"""`alignd runs`: runs on a coordinator anywhere (a cluster's, or `alignd up`'s on this machine).

  alignd runs start  (--preset NAME | --config JOB.yaml) [--set k=v ...] [--run-id ID] [--watch]
  alignd runs list
  alignd runs watch  RUN_ID
  alignd runs stop   RUN_ID
  alignd runs report RUN_ID [--out DIR] [--path P ...]

Every command takes the coordinator as --address HOST:PORT (default $ALIGND_COORDINATOR) or --stack stack.json
(`alignd up`'s, whose operator token it uses), the bearer token from --token-file or $ALIGND_TOKEN (never the
command line, where `ps` shows it), and TLS as `alignd reward score` takes it. Exit status: 0 done (watch: the run
succeeded), 1 the coordinator refused or the run did not succeed (the reason on stderr), 2 bad arguments.

The configuration `start` sends is the job file's `pipeline:` (or `run:`) section with --set applied; relative data
paths are resolved against the job file here, while `preset:` and `cache:` paths are left for the coordinator to
resolve against its own installation (alignd.datapaths). Its `stack:` section is not sent: the coordinator drives
the roles it was deployed with.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from alignd.config import ConfigError, dump_yaml

EXIT_FAILED, EXIT_INVALID = 1, 2
ADDRESS_ENV, TOKEN_ENV = "ALIGND_COORDINATOR", "ALIGND_TOKEN"


class _Failure(Exception):
    def __init__(self, message: str, code: int = EXIT_INVALID) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def _target(args) -> tuple[str, str | None]:
    """The coordinator's address and the stack's operator token (with --stack)."""
    if args.stack:
        try:
            stack = json.loads(Path(args.stack).read_text())
            address = stack["services"]["coordinator"]["address"]
            tokens_file = (stack.get("auth") or {}).get("tokens_file")
        except OSError as err:
            raise _Failure(f"--stack {args.stack}: {err.strerror}") from None
        except (ValueError, KeyError, TypeError):
            raise _Failure(f"--stack {args.stack}: not a stack.json of `alignd up` with a coordinator") from None
        token = None
        if tokens_file:
            from alignd.runtime.auth import read_token_entry
            from alignd.runtime.tokens import OPERATOR

            token = read_token_entry(tokens_file, OPERATOR)
        return address, token
    address = args.address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise _Failure(f"give the coordinator: --address HOST:PORT, --stack stack.json or ${ADDRESS_ENV}")
    return address, None


def _client(args):
    from alignd.cli import client_options
    from alignd.runs_client import RunsClient

    address, stack_token = _target(args)
    try:
        return RunsClient(address, **client_options(args, os.environ.get(TOKEN_ENV) or stack_token))
    except ValueError as err:
        raise _Failure(str(err)) from None


def run_config_yaml(config: str, overrides: list[str] | None) -> str:
    """The run configuration of a job file, as StartRun takes it: its `pipeline:` (or PPO `run:`) section with the
    overrides (keys of that section: pipeline.* or run.*), relative data paths resolved against the file. A
    `stack:` section may be there or not: it is not sent."""
    import yaml

    from alignd.config import PipelineConfig, PPORunConfig, build_config
    from alignd.datapaths import resolve_run_paths

    try:
        data = yaml.safe_load(Path(config).read_text())
    except OSError as err:
        raise ConfigError(f"--config {config}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {config}: not YAML: {err}") from None
    section = next((k for k in ("pipeline", "run") if isinstance(data, dict) and k in data), None)
    if section is None:
        raise ConfigError(
            f"--config {config}: a job file with a `pipeline:` or a `run:` section (docs/configuration.md)"
        )
    keys = []
    for kv in overrides or []:
        if not kv.startswith(f"{section}."):
            raise ConfigError(f"--set {kv}: the coordinator takes the {section} only; give {section}.KEY=VALUE")
        keys.append(kv[len(section) + 1 :])
    model = PipelineConfig if section == "pipeline" else PPORunConfig
    try:
        run_cfg = build_config(model, data[section], keys)
    except ConfigError as err:
        raise ConfigError(f"--config {config}, {section}: {err}") from None
    resolve_run_paths(run_cfg, base=Path(config).resolve().parent, prefixes=False)
    return dump_yaml(run_cfg)


def _print_run(run) -> None:
    from alignd.runs_client import state_name

    where = f"step {run.step}/{run.total_steps}" if run.stage == "ppo" else f"{run.stage_fraction:.0%}"
    print(f"{run.run_id}: {state_name(run.state)}, stage {run.stage} ({where})")


def cmd_start(args) -> int:
    from alignd.cli import preset_path

    if bool(args.config) == bool(args.preset):
        raise _Failure("give --preset NAME or --config JOB.yaml (one of them)")
    config = args.config or str(preset_path(args.preset))
    run_yaml = run_config_yaml(config, args.set)
    with _client(args) as client:
        run = client.start(run_yaml, run_id=args.run_id or "")
        print(f"started run {run.run_id} on {client.address}; its directory there: {run.run_dir}", flush=True)
        if args.watch:
            return _watch(client, run.run_id)
    return 0


def cmd_list(args) -> int:
    from alignd.runs_client import state_name

    with _client(args) as client:
        runs = client.list()
    print(f"{'RUN':24s} {'STATE':10s} {'STAGE':9s} {'PROGRESS':>9s}  CREATED (UTC)")
    for r in runs:
        progress = f"{r.step}/{r.total_steps}" if r.stage == "ppo" else f"{r.stage_fraction:.0%}"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created_unix_seconds))
        print(f"{r.run_id:24s} {state_name(r.state):10s} {r.stage:9s} {progress:>9s}  {created}")
    return 0


def _watch(client, run_id: str) -> int:
    from alignd.progress import RunProgress
    from alignd.runs_client import TERMINAL

    progress = RunProgress()
    run = None
    try:
        run = client.watch(run_id, on_update=progress.update)
    finally:
        progress.close(finished=run is not None and TERMINAL.get(run.state) == "succeeded")
    state = TERMINAL[run.state]
    if state != "succeeded":
        print(f"run {run_id} {state}" + (f": {run.error}" if run.error else ""), file=sys.stderr)
        return EXIT_FAILED
    print(f"run {run_id} succeeded", flush=True)
    _print_headline(client, run_id)
    return 0


def _print_headline(client, run_id: str) -> None:
    """The report's headline (a pipeline's), fetched without writing anything."""
    from alignd.ppo_cli import report_summary
    from alignd.runs_client import RunsClientError

    try:
        files = dict(client.iter_files(run_id, ["report.json"]))
    except RunsClientError:
        return  # a PPO run writes no report
    for line in report_summary(json.loads(files["report.json"])):
        print(line)
    print(f"fetch the report and plots: alignd runs report {run_id}")


def cmd_watch(args) -> int:
    with _client(args) as client:
        return _watch(client, args.run_id)


def cmd_stop(args) -> int:
    with _client(args) as client:
        run = client.stop(args.run_id)
    print("stop requested; the run ends after its current phase", flush=True)
    _print_run(run)
    return 0


def cmd_report(args) -> int:
    from alignd.ppo_cli import report_summary

    out = Path(args.out or args.run_id)
    with _client(args) as client:
        written = client.fetch_files(args.run_id, out, args.path or ())
    size = sum(p.stat().st_size for p in written)
    print(f"fetched {len(written)} files ({size / 1024:.0f} KiB) into {out}")
    report = out / "report.json"
    if report in written:
        for line in report_summary(json.loads(report.read_text())):
            print(line)
    if (out / "report.md") in written:
        print(f"report: {out / 'report.md'}")
    return 0


def main(args) -> int:
    """Runs one `alignd runs` command: its exit status."""
    from alignd.runs_client import RunsClientError
    from alignd.runtime.logging import configure_logging

    configure_logging("warning", role="runs-client", stream=sys.stderr)
    try:
        return args.runs_func(args)
    except _Failure as failure:
        print(f"alignd runs: {failure.message}", file=sys.stderr)
        return failure.code
    except RunsClientError as err:
        print(f"alignd runs {args.runs_command}: {err.code.name}: {err.details}", file=sys.stderr)
        return EXIT_FAILED


def register(sub) -> None:
    """`alignd runs` and its commands, on the top-level subparsers."""
    from alignd.cli import add_client_options

    p = sub.add_parser(
        "runs",
        help="start, list, watch and stop runs on a coordinator, and fetch their reports",
        description=(__doc__ or "").split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    runs = p.add_subparsers(dest="runs_command", required=True)

    def command(name: str, func, help: str):
        c = runs.add_parser(name, help=help)
        target = c.add_mutually_exclusive_group()
        target.add_argument("--address", metavar="HOST:PORT", help=f"the coordinator (default ${ADDRESS_ENV})")
        target.add_argument("--stack", metavar="stack.json", help="the stack.json of `alignd up`: its coordinator")
        add_client_options(c, token_env=TOKEN_ENV, timeout=60.0, timeout_help="deadline of each call")
        c.set_defaults(func=main, runs_func=func)
        return c

    c = command("start", cmd_start, "start a run from a preset or a job file; prints its id")
    c.add_argument("--preset", metavar="NAME", help="a preset of alignd run (tiny, smollm2)")
    c.add_argument("--config", metavar="JOB.yaml", help="a job file: its pipeline: (or run:) section is sent")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of the job file")
    c.add_argument("--run-id", metavar="ID", help="the run's id (1-63 of a-z 0-9 _ . -); default: made up")
    c.add_argument("--watch", action="store_true", help="then follow it as `alignd runs watch` does")
    command("list", cmd_list, "every run of the coordinator, newest first")
    for name, func, help in (
        ("watch", cmd_watch, "follow a run's progress until it ends; exit 0 when it succeeded"),
        ("stop", cmd_stop, "stop a run after its current phase"),
    ):
        command(name, func, help).add_argument("run_id", metavar="RUN_ID")
    c = command("report", cmd_report, "fetch a run's report, plots, evaluation and metrics into a directory")
    c.add_argument("run_id", metavar="RUN_ID")
    c.add_argument("--out", metavar="DIR", help="where to write them (default ./RUN_ID)")
    c.add_argument(
        "--path",
        action="append",
        metavar="P",
        help="a file or pattern of the run's outputs (repeatable; e.g. 'tensorboard/*'); default: the report's files",
    )
