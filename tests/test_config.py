"""Role and stack configuration: strict keys, --set overrides, clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alignd.config import (
    ConfigError,
    LearnerConfig,
    PolicyConfig,
    RewardConfig,
    StackConfig,
    build_config,
    dump_yaml,
    load_config,
    load_yaml,
)


def base() -> dict:
    """A minimal valid role config, fresh each call (see test_build_config_does_not_mutate_its_input)."""
    return {"model": {"path": "/models/tiny"}}


def stack_data() -> dict:
    return {role: {"model": {"path": f"/models/{role}"}} for role in ("policy", "reward", "reference", "learner")}


def config_error(fn, *needles: str) -> str:
    with pytest.raises(ConfigError) as info:
        fn()
    msg = str(info.value)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# -- unknown keys ------------------------------------------------------------


def test_unknown_top_level_key_is_named():
    config_error(lambda: build_config(PolicyConfig, {**base(), "polcy": {}}), "PolicyConfig", "polcy: unknown key")


def test_unknown_nested_key_is_named_with_dotted_path():
    config_error(
        lambda: build_config(PolicyConfig, {**base(), "batching": {"max_batchsize": 64}}),
        "batching.max_batchsize: unknown key",
    )
    config_error(
        lambda: build_config(PolicyConfig, {"model": {"path": "/m", "dtyp": "float32"}}), "model.dtyp: unknown key"
    )


def test_unknown_key_in_stack_config_is_named_with_full_dotted_path():
    data = stack_data()
    data["policy"]["batching"] = {"max_batchsize": 64}
    msg = config_error(lambda: build_config(StackConfig, data), "policy.batching.max_batchsize: unknown key")
    # Only the bad key is reported.
    assert msg.count("unknown key") == 1, msg


def test_unknown_key_from_override_is_named():
    config_error(
        lambda: build_config(StackConfig, stack_data(), ["policy.batching.max_batchsize=64"]),
        "policy.batching.max_batchsize: unknown key",
    )


def test_several_errors_are_all_reported():
    msg = config_error(
        lambda: build_config(PolicyConfig, {**base(), "extra": 1, "server": {"port": 70000}}),
        "extra: unknown key",
        "server.port",
    )
    assert "; " in msg


# -- overrides ---------------------------------------------------------------


def test_set_parses_yaml_scalars_and_reaches_nested_fields():
    cfg = build_config(
        PolicyConfig,
        base(),
        [
            "batching.max_batch_size=64",
            "batching.max_wait_ms=2.5",
            "model.trust_remote_code=true",
            "server.port=50051",
            "model.name=my-model",
            "log_level=debug",
        ],
    )
    assert cfg.batching.max_batch_size == 64 and isinstance(cfg.batching.max_batch_size, int)
    assert cfg.batching.max_wait_ms == 2.5
    assert cfg.model.trust_remote_code is True
    assert cfg.server.port == 50051
    assert cfg.model.name == "my-model"
    assert cfg.log_level == "debug"
    assert cfg.model.path == "/models/tiny"  # untouched siblings stay


def test_set_parses_lists():
    cfg = build_config(LearnerConfig, base(), ['policy_addresses=["127.0.0.1:50051", "127.0.0.1:50052"]'])
    assert cfg.policy_addresses == ["127.0.0.1:50051", "127.0.0.1:50052"]
    cfg = build_config(LearnerConfig, base(), ["policy_addresses=[]"])
    assert cfg.policy_addresses == []


def test_set_overrides_file_values_and_creates_missing_sections(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text("model:\n  path: /from/file\nbatching:\n  max_batch_size: 8\n")
    cfg = load_config(PolicyConfig, p, ["batching.max_batch_size=16", "server.metrics_port=-1"])
    assert cfg.batching.max_batch_size == 16
    assert cfg.server.metrics_port == -1
    assert cfg.model.path == "/from/file"
    # A role's whole config can come from overrides alone.
    cfg = load_config(PolicyConfig, None, ["model.path=/only/override"])
    assert cfg.model.path == "/only/override"


def test_set_into_the_stack():
    cfg = build_config(StackConfig, stack_data(), ["policy.batching.max_batch_size=4", "reward.allow_new_head=yes"])
    assert cfg.policy.batching.max_batch_size == 4
    assert cfg.reward.allow_new_head is True
    assert cfg.reference.batching.max_batch_size == 32  # other roles keep the default


def test_set_value_with_equals_sign_and_empty_value():
    cfg = build_config(PolicyConfig, base(), ["model.name=a=b", "model.device="])
    assert cfg.model.name == "a=b"
    assert cfg.model.device == ""


def test_set_type_errors_name_the_key():
    config_error(
        lambda: build_config(PolicyConfig, base(), ["batching.max_batch_size=lots"]), "batching.max_batch_size"
    )
    config_error(lambda: build_config(PolicyConfig, base(), ["batching.max_batch_size=0"]), "batching.max_batch_size")
    config_error(lambda: build_config(PolicyConfig, base(), ["model.dtype=float8"]), "model.dtype")


@pytest.mark.parametrize(
    "override, needles",
    [
        ("no_equals_sign", ("no_equals_sign", "expected key=value")),
        ("=5", ("empty key",)),
        ("batching..max_batch_size=5", ("batching..max_batch_size", "empty key")),
        ("model.path.deeper=5", ("model.path.deeper", "model.path is not a section")),
    ],
)
def test_malformed_overrides(override, needles):
    config_error(lambda: build_config(PolicyConfig, base(), [override]), "--set", *needles)


def test_set_value_that_is_not_valid_yaml_is_a_config_error():
    # `--set model.name=[oops` must be reported like any other bad value
    # (ConfigError naming the key), not escape as a yaml.ParserError.
    config_error(lambda: build_config(PolicyConfig, base(), ["model.name=[oops"]), "model.name")


def test_model_path_expands_home_and_env_vars(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGND_TEST_MODELS", str(tmp_path))
    monkeypatch.setenv("HOME", "/home/tester")
    assert build_config(PolicyConfig, {}, ["model.path=$ALIGND_TEST_MODELS/lm"]).model.path == f"{tmp_path}/lm"
    assert build_config(PolicyConfig, {"model": {"path": "~/lm"}}).model.path == "/home/tester/lm"


def test_default_sections_are_not_shared_between_configs():
    a = build_config(PolicyConfig, base())
    b = build_config(PolicyConfig, base())
    a.batching.max_batch_size = 1
    assert b.batching.max_batch_size == 32
    assert PolicyConfig.model_fields["batching"].default_factory().max_batch_size == 32


def test_build_config_does_not_mutate_its_input():
    # Overrides must apply to a copy: today build_config copies only the top
    # level, so `--set model.name=x` writes into the caller's nested dict.
    data = {"model": {"path": "/m"}, "batching": {"max_batch_size": 8}}
    cfg = build_config(PolicyConfig, data, ["model.name=x", "batching.max_batch_size=4", "log_level=debug"])
    assert cfg.model.name == "x" and cfg.batching.max_batch_size == 4
    assert data == {"model": {"path": "/m"}, "batching": {"max_batch_size": 8}}


# -- required fields ---------------------------------------------------------


def test_missing_required_model_path_is_named():
    config_error(lambda: build_config(PolicyConfig, {"model": {}}), "model.path", "Field required")
    config_error(lambda: build_config(PolicyConfig, {}), "model", "Field required")
    config_error(lambda: build_config(RewardConfig, {"model": {"name": "rm"}}), "model.path")
    data = stack_data()
    del data["learner"]["model"]["path"]
    config_error(lambda: build_config(StackConfig, data), "learner.model.path")


# -- files -------------------------------------------------------------------


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  path: [unclosed\n")
    config_error(lambda: load_yaml(p), str(p), "not valid YAML")


def test_non_mapping_file(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    config_error(lambda: load_yaml(p), str(p), "top level must be a mapping")
    p.write_text("just a string\n")
    config_error(lambda: load_config(PolicyConfig, p), "top level must be a mapping")


def test_empty_file_is_an_empty_mapping(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing\n")
    assert load_yaml(p) == {}
    assert load_config(PolicyConfig, p, ["model.path=/m"]).model.path == "/m"


def test_missing_file(tmp_path):
    config_error(lambda: load_yaml(tmp_path / "nope.yaml"), "cannot read config", "nope.yaml")
    config_error(lambda: load_yaml(tmp_path), "cannot read config")  # a directory


def test_non_utf8_file_is_a_config_error(tmp_path):
    # A binary or Latin-1 file must give a ConfigError naming the file, not a
    # UnicodeDecodeError traceback from the CLI.
    p = tmp_path / "binary.yaml"
    p.write_bytes(b"\xff\xfe\x00model: caf\xe9\n")
    config_error(lambda: load_yaml(p), str(p))


def test_dump_round_trips():
    cfg = build_config(StackConfig, stack_data(), ["policy.batching.max_batch_size=4"])
    import yaml

    assert build_config(StackConfig, yaml.safe_load(dump_yaml(cfg))) == cfg


def test_the_pipeline_seed_seeds_every_stage_not_set_itself():
    """pipeline.seed reaches sft, rm, ppo and the learner unless one of them sets its own (bench/presets.py relies on
    one number changing every stage's randomness); the seeds survive the trip to the coordinator (dump -> load)."""
    from pathlib import Path

    import yaml

    from alignd.config import PipelineConfig, PipelineJobConfig, PPOJobConfig

    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny_pipeline.yaml"
    cfg = load_config(PipelineJobConfig, tiny, ["pipeline.seed=3"])
    p = cfg.pipeline
    assert (p.sft.seed, p.rm.seed, p.ppo.seed, cfg.stack.learner.seed) == (3, 3, 3, 3)
    cfg = load_config(PipelineJobConfig, tiny, ["pipeline.seed=3", "pipeline.rm.seed=9", "stack.learner.seed=1"])
    p = cfg.pipeline
    assert (p.sft.seed, p.rm.seed, p.ppo.seed, cfg.stack.learner.seed) == (3, 9, 3, 1)
    sent = build_config(PipelineConfig, yaml.safe_load(dump_yaml(p)))
    assert (sent.seed, sent.sft.seed, sent.rm.seed, sent.ppo.seed) == (3, 3, 9, 3)
    default = load_config(PipelineJobConfig, tiny)
    assert (default.pipeline.sft.seed, default.pipeline.ppo.seed, default.stack.learner.seed) == (0, 0, 0)
    ppo = load_config(PPOJobConfig, Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml", ["run.seed=5"])
    assert ppo.stack.learner.seed == 5


# -- CLI ---------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alignd.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_cli_serve_with_unknown_key_exits_2_and_names_it(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text("model:\n  path: /nowhere\nbatching:\n  max_batchsize: 64\n")
    proc = run_cli("serve", "policy", "--config", str(p))
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "batching.max_batchsize" in proc.stderr, proc.stderr
    assert "unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_cli_serve_with_unknown_override_exits_2_and_names_it(tmp_path):
    p = tmp_path / "policy.yaml"
    p.write_text("model:\n  path: /nowhere\n")
    proc = run_cli("serve", "policy", "--config", str(p), "--set", "server.prot=1")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "server.prot" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("cls, wait_ms", [("RewardConfig", 0.0), ("PolicyConfig", 20.0), ("ReferenceConfig", 0.0)])
def test_partial_batching_section_keeps_the_roles_defaults(cls, wait_ms):
    import alignd.config as config

    model = getattr(config, cls)
    partial = config.build_config(model, {"model": {"path": "x"}, "batching": {"max_queue": 512}})
    assert partial.batching.max_queue == 512
    assert partial.batching.max_wait_ms == wait_ms  # the role's default, not BatchingConfig's 5 ms
    assert config.build_config(model, {"model": {"path": "x"}}).batching.max_wait_ms == wait_ms


def test_restart_backoff_doubles_up_to_its_cap():
    from alignd.config import RestartConfig

    policy = RestartConfig(backoff_initial_seconds=1.5, backoff_max_seconds=10)
    assert [policy.backoff(n) for n in range(6)] == [1.5, 3.0, 6.0, 10, 10, 10]
    assert RestartConfig().policy == "on_failure" and RestartConfig().max_restarts == 5
