"""`alignd runs` and the coordinator's GetRunFiles: a run's outputs fetched over gRPC, nothing else of its directory.

The fast tests run a real coordinator role over a run directory laid out as a finished pipeline leaves it (plus
what must never be handed out: credentials, a model, a symlink out); the slow one starts the tiny preset's stack with
`alignd up`, runs the preset through `alignd runs start/watch/report` and compares the files with `alignd run`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path, PurePosixPath

import grpc
import pytest
import yaml

from alignd import evaluation
from alignd.config import ConfigError
from alignd.runs_client import RunsClient, RunsClientError
from alignd.runtime.errors import InvalidArgument, NotFound
from alignd.services.coordinator import run_files
from alignd.services.coordinator.runs import RunRecord

from conftest import start_role, stop_role, token_of
from helpers import alignd_argv, wait_until

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


def _report() -> dict:
    prefs = evaluation.win_rate_from_preferences([1.0] * 70 + [0.0] * 20 + [0.5] * 10)
    return evaluation.build_report_json(
        win_rates={"gold": prefs, "second": prefs},
        rm_accuracy_per_round=[{"round": 0, "accuracy": 0.75, "n": 40}],
        labeler_agreement=0.72,
        kl_to_reference={"per_token": 0.05},
        reward={"sft": [0.1, 0.2], "final": [0.5, 0.6]},
        alignment_tax={"without_ptx": (5.0, 5.25)},
        wall_seconds_per_stage={"sft": 10.0, "ppo": 20.0},
        primary_judge="gold",
        meta={"ppo_steps": 4},
    )


def lay_out_run(run_dir: Path, outside: Path, *, state: str = "succeeded", error: str = "") -> dict[str, bytes]:
    """A finished pipeline's directory; returns the report files (what GetRunFiles sends by default)."""
    (run_dir / "plots").mkdir(parents=True)
    report = {
        "report.md": b"# Report\n\n![reward](plots/reward_kl.png)\n",
        "report.json": json.dumps(_report()).encode(),
        "evaluation.json": b'{"n": 3}\n',
        "metrics.jsonl": b"".join(json.dumps({"step": i, "mean_score": i / 10}).encode() + b"\n" for i in (1, 2, 3)),
        "plots/reward_kl.png": PNG * 700,  # ~1.4 MB: more than one chunk
        "plots/win_rates.png": PNG,
    }
    for rel, data in report.items():
        (run_dir / rel).write_bytes(data)
    (run_dir / "eval_final.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    (run_dir / "rm-round-0").mkdir()
    (run_dir / "rm-round-0" / "comparisons.jsonl").write_text('{"k": 2}\n')
    # Never handed out: the local stack's credentials, a model, a symlink to a file outside the run directory.
    (run_dir / "auth").mkdir()
    (run_dir / "auth" / "tokens.yaml").write_text("operator: secret\n")
    (run_dir / "sft").mkdir()
    (run_dir / "sft" / "model.safetensors").write_bytes(b"weights")
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(b"not yours")
    (run_dir / "plots" / "leak.png").symlink_to(outside / "secret.png")
    RunRecord(
        run_id=run_dir.name,
        run_dir=str(run_dir),
        config_yaml="kind: pipeline\n",
        total_steps=4,
        state=state,
        stage="report" if state == "succeeded" else "ppo",
        step=4,
        error=error,
    ).save()
    return report


# -- which files, in which chunks (no gRPC) ------------------------------------------------------------------------


def test_select_hands_out_outputs_only(tmp_path):
    run = tmp_path / "run"
    report = lay_out_run(run, tmp_path / "outside")
    assert [str(p) for p in run_files.select(run, [])] == sorted(report)  # no symlink, no credentials
    assert [str(p) for p in run_files.select(run, ["eval_*.jsonl", "rm-round-*/*.jsonl", "plots/*"])] == [
        "eval_final.jsonl",
        "plots/reward_kl.png",
        "plots/win_rates.png",
        "rm-round-0/comparisons.jsonl",
    ]
    assert run_files.select(run, ["tensorboard/*"]) == []  # a pattern may match nothing
    with pytest.raises(NotFound, match=r"paths\[1\].*tracking.json"):
        run_files.select(run, ["report.md", "tracking.json"])  # a name without a wildcard must exist
    # Wildcards reach outputs only: never the credentials, the model or the symlink out.
    assert [str(p) for p in run_files.select(run, ["*/*"])] == [
        "plots/reward_kl.png",
        "plots/win_rates.png",
        "rm-round-0/comparisons.jsonl",
    ]
    for i, bad in enumerate(["auth/tokens.yaml", "sft/model.safetensors", "auth/*", "a/b/c", "../outside/secret.png"]):
        with pytest.raises(InvalidArgument) as err:
            run_files.select(run, ["report.md", bad])
        assert err.value.field == "paths[1]", (i, bad, err.value)
    for bad in ["/etc/passwd", "plots/../auth/tokens.yaml", "./report.md", "plots//x.png", ""]:
        with pytest.raises(InvalidArgument):
            run_files.check_pattern(bad, 0)
    with pytest.raises(InvalidArgument, match="at most"):
        run_files.select(run, ["report.md"] * (run_files.MAX_PATHS + 1))


def test_chunks_reassemble_each_file_with_its_digest(tmp_path):
    run = tmp_path / "run"
    report = lay_out_run(run, tmp_path / "outside")
    (run / "metrics.jsonl").write_bytes(b"")  # an empty file is one chunk
    report["metrics.jsonl"] = b""
    files = run_files.read(run, run_files.select(run, []))
    got: dict[str, bytearray] = {}
    digests = {}
    for path, offset, data, size, sha in run_files.chunks(files, chunk_bytes=1000):
        buf = got.setdefault(path, bytearray())
        assert offset == len(buf) and len(data) <= 1000
        buf += data
        if sha:
            assert len(buf) == size
            digests[path] = sha
    assert {k: bytes(v) for k, v in got.items()} == report
    assert digests == {k: hashlib.sha256(v).hexdigest() for k, v in report.items()}
    with pytest.raises(Exception, match="more than 100 bytes"):
        run_files.read(run, [PurePosixPath("plots/reward_kl.png")], max_bytes=100)


# -- a real coordinator ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs-cli")
    runs_dir = base / "coordinator-run" / "runs"
    report = lay_out_run(runs_dir / "done", base / "outside")
    lay_out_run(runs_dir / "broken", base / "outside2", state="failed", error="learner: out of memory")
    cfg = {
        "policy_addresses": ["127.0.0.1:1"],
        "reward_addresses": ["127.0.0.1:1"],
        "reference_addresses": ["127.0.0.1:1"],
        "learner_address": "127.0.0.1:1",
        "recovery_timeout_seconds": 1,
    }
    server = start_role("coordinator", cfg, base / "coordinator-run")
    yield server, report, base
    assert stop_role(server) == 0, server.log()[-2000:]


def _client(address: str, name: str = "operator") -> RunsClient:
    return RunsClient(address, token=token_of(name), timeout=30)


def test_get_run_files_streams_the_report_checked_and_written_atomically(coordinator, tmp_path):
    server, report, _ = coordinator
    with _client(server.address) as client:
        written = client.fetch_files("done", tmp_path / "out")
        assert sorted(str(p.relative_to(tmp_path / "out")) for p in written) == sorted(report)
        assert {k: (tmp_path / "out" / k).read_bytes() for k in report} == report
        assert [f for f in os.listdir(tmp_path / "out") if f.startswith(".")] == []  # no temporary left behind
        # Errors name the field; a caller without the runs scope gets nothing.
        with pytest.raises(RunsClientError) as err:
            client.fetch_files("done", tmp_path / "x", ["auth/tokens.yaml"])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "paths[0]" in err.value.details
        with pytest.raises(RunsClientError) as err:
            client.fetch_files("nope", tmp_path / "x")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
    with _client(server.address, "scorer") as client, pytest.raises(RunsClientError) as err:
        list(client.iter_files("done"))
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "'runs' scope" in err.value.details
    assert not (tmp_path / "x").exists()


def _runs(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(alignd_argv("runs", *args), capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def test_runs_commands_list_watch_and_report(coordinator, tmp_path):
    server, report, _ = coordinator
    env = dict(os.environ, ALIGND_COORDINATOR=server.address, ALIGND_TOKEN=token_of("operator"))
    out = _runs("list", env=env)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()[1:]}
    assert rows == {"done": "succeeded", "broken": "failed"}

    out = _runs("watch", "done", env=env)  # already over: the headline at once
    assert out.returncode == 0, out.stderr
    assert "run done succeeded" in out.stdout and "win rate vs SFT (gold): 0.750" in out.stdout
    out = _runs("watch", "broken", env=env)
    assert out.returncode == 1 and "run broken failed: learner: out of memory" in out.stderr

    out = _runs("report", "done", "--out", str(tmp_path / "rep"), env=env)
    assert out.returncode == 0, out.stderr
    assert f"fetched {len(report)} files" in out.stdout and "RM held-out accuracy: round 0 0.750" in out.stdout
    assert (tmp_path / "rep" / "plots" / "reward_kl.png").read_bytes() == report["plots/reward_kl.png"]
    out = _runs("report", "done", "--out", str(tmp_path / "rep2"), "--path", "rm-round-*/*.jsonl", env=env)
    assert out.returncode == 0 and os.listdir(tmp_path / "rep2") == ["rm-round-0"], out.stderr

    # Bad arguments exit 2, refusals 1, each with the reason on stderr; no token: UNAUTHENTICATED.
    out = _runs("report", "done", "--path", "auth/tokens.yaml", env=env)
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr and "paths[0]" in out.stderr
    out = _runs("list", env={k: v for k, v in env.items() if k != "ALIGND_COORDINATOR"})
    assert out.returncode == 2 and "--address" in out.stderr
    out = _runs("list", env={k: v for k, v in env.items() if k != "ALIGND_TOKEN"})
    assert out.returncode == 1 and "UNAUTHENTICATED" in out.stderr
    out = _runs("start", "--preset", "tiny", "--config", "x.yaml", env=env)
    assert out.returncode == 2 and "one of them" in out.stderr
    out = _runs("stop", "nope", env=env)
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr


def test_start_sends_the_job_files_pipeline_with_prefixes_left_to_the_coordinator(tmp_path):
    from alignd.runs_cli import run_config_yaml

    job = tmp_path / "job.yaml"
    tiny = yaml.safe_load((ROOT / "configs" / "tiny_pipeline.yaml").read_text())
    tiny["pipeline"]["ppo"]["prompts"]["path"] = "mine.txt"  # relative: the job file's directory, resolved here
    job.write_text(yaml.safe_dump(tiny))
    sent = yaml.safe_load(run_config_yaml(str(job), ["pipeline.ppo.steps=7"]))
    assert "stack" not in sent and sent["ppo"]["steps"] == 7
    assert sent["ppo"]["prompts"]["path"] == str(tmp_path / "mine.txt")
    assert sent["demonstrations"] == "preset:tiny_demos.jsonl"  # the coordinator's installation resolves it
    ppo_job = tmp_path / "ppo.yaml"
    ppo_job.write_text(yaml.safe_dump({"run": {"steps": 2, "prompts": {"path": "preset:tiny_prompts.txt"}}}))
    assert yaml.safe_load(run_config_yaml(str(ppo_job), None))["prompts"]["path"] == "preset:tiny_prompts.txt"
    (tmp_path / "bare.yaml").write_text("steps: 2\n")
    with pytest.raises(ConfigError, match="a `pipeline:` or a `run:` section"):
        run_config_yaml(str(tmp_path / "bare.yaml"), None)


# -- the tiny preset through `alignd up` + `alignd runs`, against `alignd run` ---------------------------------------


def _same_report(a: dict, b: dict) -> None:
    """Two report.json of the same preset and seed: the same figures (wall seconds and paths aside)."""

    def strip(r: dict) -> dict:
        r = json.loads(json.dumps(r))
        r.pop("wall_seconds_per_stage", None)
        r["meta"].pop("run_id")
        return r

    assert strip(a) == strip(b)


@pytest.mark.slow
def test_runs_start_watch_report_against_alignd_up_match_alignd_run(tmp_path):
    env = dict(os.environ, ALIGND_CACHE=str(tmp_path / "cache"))
    up_dir = tmp_path / "up"
    up = subprocess.Popen(
        alignd_argv("up", "--preset", "tiny", "--run-dir", str(up_dir)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,  # not the checkout: the preset's data comes from the installation (preset: paths)
        env=env,
    )
    try:

        def alive():
            assert up.poll() is None, f"alignd up exited with {up.returncode}"

        wait_until("alignd up's stack.json", lambda: (up_dir / "stack.json").exists(), 300, alive=alive)
        stack = ("--stack", str(up_dir / "stack.json"))
        out = _runs("start", *stack, "--preset", "tiny", "--run-id", "tiny-remote", "--watch", env=env)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "started run tiny-remote" in out.stdout and "run tiny-remote succeeded" in out.stdout
        assert "\r" not in out.stdout and " done in " in out.stdout  # plain progress lines through a pipe
        fetched = tmp_path / "fetched"
        out = _runs("report", *stack, "tiny-remote", "--out", str(fetched), env=env)
        assert out.returncode == 0, out.stderr
    finally:
        up.terminate()
        assert up.wait(timeout=120) == 0

    local = tmp_path / "local"
    t0 = time.monotonic()
    done = subprocess.run(
        alignd_argv("run", "--preset", "tiny", "--run-dir", str(local)), capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert time.monotonic() - t0 < 900
    names = sorted(str(p.relative_to(fetched)) for p in fetched.rglob("*") if p.is_file())
    assert names == sorted(
        ["report.md", "report.json", "evaluation.json", "metrics.jsonl"]
        + [f"plots/{p.name}" for p in (local / "plots").iterdir()]
    )
    _same_report(json.loads((fetched / "report.json").read_text()), json.loads((local / "report.json").read_text()))
    for name in ("evaluation.json",):
        assert json.loads((fetched / name).read_text()) == json.loads((local / name).read_text())
    steps = lambda d: [  # noqa: E731 -- the figures of every step, its timings aside
        {k: v for k, v in json.loads(line).items() if k != "time" and "second" not in k}
        for line in (d / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps(fetched) == steps(local)

    def md(d: Path) -> list[str]:  # the report's text, its run id and wall times aside
        text = (d / "report.md").read_text().replace("run_id: tiny-remote", "run_id: pipeline")
        timing = re.compile(r"^\| (Wall time.*|sft|rm|ppo|evaluate|report|total) \| [\d.]+( s)? \|$")
        return [line for line in text.splitlines() if not timing.match(line)]

    assert md(fetched) == md(local)
