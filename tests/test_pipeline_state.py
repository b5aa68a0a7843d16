"""A pipeline run's typed state (services/coordinator/pipeline_state.py): state.json written before it (an untyped
`artifacts` dict, schema 1) is migrated on load, nothing lost; the held-out samples of such runs are still read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from alignd.services.coordinator.evaluate import read_eval_samples, write_eval_samples
from alignd.services.coordinator.pipeline import PipelineVersions
from alignd.services.coordinator.pipeline_state import SCHEMA_VERSION, PipelineState
from alignd.services.coordinator.runs import RunRecord

# The state.json of a real tiny-preset run recorded before PipelineState (paths made relative).
V1 = Path(__file__).parent / "data" / "state_v1_pipeline.json"


@pytest.fixture
def v1_run(tmp_path) -> tuple[Path, dict]:
    old = json.loads(V1.read_text())
    old["run_dir"] = str(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps(old))
    return tmp_path, old


def test_a_v1_state_json_is_migrated_with_every_fact_kept(v1_run):
    run_dir, old = v1_run
    art = old["artifacts"]
    rec = RunRecord.load(run_dir)
    st = rec.pipeline
    assert st.schema_version == SCHEMA_VERSION == 2
    assert st.done == art["done"] == ["sft", "rm", "ppo", "evaluate", "report"]
    assert st.wall_seconds == art["wall_seconds"] and st.data == art["data"]
    assert (st.sft_dir, st.sft_version, st.sft_best_val_loss) == (
        art["sft_dir"],
        art["sft_version"],
        art["sft_best_val_loss"],
    )
    # labeler_temperature (round 0) and labeler_temperature_1 became one table per round; rm_versions' keys ints.
    assert st.labeler_temperatures == {0: art["labeler_temperature"], 1: art["labeler_temperature_1"]}
    assert st.rm_versions == {int(k): v for k, v in art["rm_versions"].items()} == {0: 1, 1: 2}
    assert (st.rm_dir, st.rm_version) == (art["rm_dir"], art["rm_version"])
    assert [r.model_dump() for r in st.rm_rounds] == art["rm_rounds"]  # what report.json is built from
    assert {k: v.model_dump() for k, v in st.text_loss.items()} == art["text_loss"]
    assert st.labeler_agreement == art["labeler_agreement"]
    # The run's own fields are untouched.
    for key in ("run_id", "state", "stage", "step", "policy_version", "sampler_epoch", "latest_metrics"):
        assert getattr(rec, key) == old[key]

    # The next save writes the new layout, which loads back to the same state.
    rec.save()
    new = json.loads((run_dir / "state.json").read_text())
    assert "artifacts" not in new and new["pipeline"]["schema_version"] == 2
    assert RunRecord.load(run_dir).pipeline == st


def test_the_migrated_state_tells_each_role_its_weight_version(v1_run):
    rec = RunRecord.load(v1_run[0])
    plan = PipelineVersions(rec, roles=None)
    assert plan.expected_version("policy") == rec.policy_version == 41
    assert plan.expected_version("reference") == rec.pipeline.sft_version == 1
    assert plan.expected_version("reward") == rec.pipeline.rm_version == 2
    rec.policy_version = 0  # before PPO: the SFT policy's
    assert plan.expected_version("policy") == 1


def test_a_run_recorded_before_rm_version_takes_the_last_rounds():
    art = json.loads(V1.read_text())["artifacts"]
    del art["rm_version"]
    assert PipelineState.from_artifacts(art).rm_version == art["rm_rounds"][-1]["reward_version"] == 2
    assert PipelineState.from_artifacts({}) == PipelineState()


def test_a_plain_ppo_run_has_no_pipeline_state(tmp_path):
    rec = RunRecord(run_id="ppo", run_dir=str(tmp_path), config_yaml="", total_steps=3)
    rec.save()
    assert json.loads((tmp_path / "state.json").read_text())["pipeline"] is None
    assert RunRecord.load(tmp_path).pipeline is None
    old = json.loads((tmp_path / "state.json").read_text())
    old.pop("pipeline")
    (tmp_path / "state.json").write_text(json.dumps({**old, "artifacts": {}}))  # a v1 PPO run
    assert RunRecord.load(tmp_path).pipeline is None


def test_an_unknown_field_is_refused_by_name(v1_run):
    run_dir, _ = v1_run
    rec = RunRecord.load(run_dir)
    rec.save()
    new = json.loads((run_dir / "state.json").read_text())
    new["pipeline"]["rm_dirs"] = []
    (run_dir / "state.json").write_text(json.dumps(new))
    with pytest.raises(ValidationError, match="rm_dirs"):
        RunRecord.load(run_dir)
    with pytest.raises(ValidationError, match="sft_version"):
        rec.pipeline.sft_version = "one"


def _fake_run(run_dir: Path) -> SimpleNamespace:
    """What write_eval_samples reads of a PipelineRun: a policy whose i-th sample of prompt p is "p i"."""

    def sample_texts(prompts, n, sampling, seed, system=None, on_progress=None):
        if on_progress:
            on_progress(len(prompts) * n, len(prompts) * n)
        return [
            [SimpleNamespace(text=f"{p} {i}", token_ids=[5, 6], prompt_token_ids=[1, 2]) for i in range(n)]
            for p in prompts
        ]

    shown = []
    return SimpleNamespace(
        shown=shown,
        progress=lambda fraction, detail: shown.append((fraction, detail)),
        record=RunRecord(run_id="r", run_dir=str(run_dir), config_yaml="", total_steps=1),
        eval_prompts_all=["a", "b\u2028c", "d"],
        cfg=SimpleNamespace(
            seed=0,
            evaluation=SimpleNamespace(
                max_prompts=2, samples_per_prompt=2, sampling=None, prompts=SimpleNamespace(system=None)
            ),
        ),
        loop=SimpleNamespace(rollouts=SimpleNamespace(sample_texts=sample_texts)),
    )


def test_eval_samples_are_jsonl_and_those_of_older_runs_still_read(tmp_path):
    run = _fake_run(tmp_path)
    write_eval_samples(run, "sft", span=(0.8, 1.0))
    assert run.shown == [
        (0.8, "sampling held-out prompts: 0/4 completions"),
        (1.0, "sampling held-out prompts: 4/4 completions"),
    ]
    lines = (tmp_path / "eval_sft.jsonl").read_text(encoding="utf-8").split("\n")
    assert len([x for x in lines if x]) == 2  # one prompt per line (max_prompts)
    rows = read_eval_samples(tmp_path, "sft")
    assert [r["prompt"] for r in rows] == ["a", "b\u2028c"]  # a U+2028 inside a text is not a line break
    assert rows[1]["responses"] == ["b\u2028c 0", "b\u2028c 1"] and rows[0]["token_ids"] == [[5, 6], [5, 6]]

    # Runs before JSONL wrote one indented object {"samples": [...]}.
    old = tmp_path / "old"
    old.mkdir()
    (old / "eval_final.jsonl").write_text(json.dumps({"samples": rows}, indent=2))
    assert read_eval_samples(old, "final") == rows
    shutil.copy(tmp_path / "eval_sft.jsonl", old / "eval_sft.jsonl")
    assert read_eval_samples(old, "sft") == rows
