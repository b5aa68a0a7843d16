"""The README's generation table is bench/generation.py's rendering of the committed results file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import generation  # noqa: E402


def test_readme_table_is_the_results_files():
    data = json.loads(generation.RESULTS.read_text())
    readme = generation.README.read_text()
    assert generation.rewrite_readme(readme, data) == readme, "run: .venv/bin/python bench/generation.py --readme"
    # Every engine and case measured, each with a ratio to model.generate, and both engines' update latencies.
    assert {m["model"] for m in data["results"]} == {"tiny", "smollm2"}
    for m in data["results"]:
        assert [c["case"] for c in m["cases"]] == [label for label, _, _ in generation.CASES]
        for c in m["cases"]:
            for engine in ("transformers", "vllm"):
                assert c[engine]["vs_generate"] == c["generate"]["seconds"] / c[engine]["seconds"]
        assert set(m["weight_update_seconds"]) == {"transformers", "vllm"}


def test_render_puts_each_figure_in_its_column():
    case = lambda s: {"seconds": s, "tokens_per_second": 100 / s, "vs_generate": 2.0 / s}  # noqa: E731
    data = {
        "commit": "abc1234",
        "machine": {"cpus": 2},
        "results": [
            {
                "model": "tiny",
                "weight_update_seconds": {"transformers": 0.5, "vllm": 1.25},
                "cases": [
                    {"case": "PPO step", "prompts": 16, "new_tokens": 24, "generate": case(2.0)}
                    | {"transformers": case(1.0), "vllm": case(4.0)}
                ],
            }
        ],
    }
    row = generation.render(data).splitlines()[-1]
    assert row == "| tiny | PPO step (16 x 24) | 50 | 100 (2.00x) | 25 (0.50x) | 0.500 s / 1.250 s |"
