"""Presets of `alignd run`, the real-model preset's judges and the passage splitting of its assets (no models)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from alignd import assets, judges

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "alignd.cli", "run", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )


def test_unknown_preset_names_the_known_ones(tmp_path):
    out = _run("--preset", "nope", "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and "unknown preset 'nope'" in out.stderr and "smollm2, tiny" in out.stderr


def test_preset_and_config_are_exclusive(tmp_path):
    out = _run(
        "--preset", "tiny", "--config", str(ROOT / "configs" / "tiny_pipeline.yaml"), "--run-dir", str(tmp_path / "r")
    )
    assert out.returncode == 2 and "not both" in out.stderr


def test_real_model_preset_without_its_assets_says_how_to_prepare_them(tmp_path):
    env = dict(os.environ, ALIGND_CACHE=str(tmp_path / "empty-cache"))
    out = _run("--preset", "smollm2", "--run-dir", str(tmp_path / "run"), env=env)
    assert out.returncode == 2, out.stderr
    assert "python -m alignd.assets" in out.stderr and str(tmp_path / "empty-cache") in out.stderr
    assert not (tmp_path / "run" / "stack.json").exists()  # refused before any role started


@pytest.mark.parametrize("name", ["vader", "textblob"])
def test_sentiment_judges_score_the_completion(name):
    judge = judges.resolve(name)
    good = judge("The sea was", " calm and beautiful, and we were happy and glad to be home.")
    bad = judge("The sea was", " cruel and terrible, and we were miserable, afraid and sad.")
    neutral = judge("The sea was", " grey.")
    assert -1 <= bad < neutral < good <= 1
    # The prompt is not judged: only the completion.
    assert judge("What a horrible, awful, hateful day", " it was.") == judge("", " it was.")


def test_passage_pairs_split_sentences_into_opening_and_melvilles_continuation():
    text = (
        "Call me Ishmael, for that is what my friends, my family and my shipmates have always called me when at sea, "
        "in port or ashore. "
        "Some years ago, never mind how long precisely, having little or no money in my purse, I thought I would sail "
        "about.\n"
        "“A quoted sentence is skipped because it starts inside a quotation, however long it is.”"
    )
    pairs = assets.passage_pairs(text, random.Random(0))
    assert len(pairs) == 2
    for opening, rest in pairs:
        assert rest[0] in " ,;:" and len(rest.split()) >= 4
        assert (opening + rest) in text.replace("\n", " ")  # nothing lost between the two
        assert opening[-1] not in ",;:"
        assert assets.PROMPT_MIN_WORDS <= len(opening.split()) <= assets.PROMPT_MAX_WORDS
    assert [o for o, _ in pairs] == assets.passage_openings(text, random.Random(0))
