"""alignd.plots: the run report's PNGs from a synthetic run directory."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from alignd import plots
from alignd.evaluation import build_report_json, render_markdown, win_rate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# (width, height) in pixels of each plot: figure inches x 100 dpi.
EXPECTED_SIZES = {
    "reward_kl.png": (800, 600),
    "win_rates.png": (800, 450),
    "rm_accuracy.png": (800, 450),
    "phase_seconds.png": (1200, 450),
}


def metrics_row(step: int) -> dict:
    """One line of metrics.jsonl as the coordinator's loop writes it (the keys the plots read, and some others)."""
    return {
        "step": step,
        "mean_score": -0.5 + 0.1 * step + 0.02 * math.sin(step),
        "approx_kl": 0.001 * step,
        "reference_kl": 0.002 * step**1.5,
        "kl_coef": 0.02,
        "policy_loss": 0.1 / step,
        "response_tokens": 512,
        "phase_seconds": {
            "generate": 1.5 + 0.1 * step,
            "score": 0.3,
            "reference": 0.25 + 0.01 * step,
            "train": 2.0,
            "sync_weights": 0.4,
        },
        "sampler": {"epoch": 0, "position": 8 * step},
        "time": 1.7e9 + 5.0 * step,
    }


def write_metrics(run_dir: Path, rows: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_report() -> dict:
    gold = win_rate([1.0] * 30 + [0.0] * 12 + [0.5] * 8, [0.5] * 50)
    second = win_rate([1.0] * 22 + [0.0] * 20 + [0.5] * 8, [0.5] * 50, method="bootstrap")
    return build_report_json(
        win_rates={"gold": gold, "judge-2": second},
        rm_accuracy_per_round=[0.62, {"accuracy": 0.68, "n": 200}, {"accuracy": 0.71, "n": 400, "round": 2}],
        labeler_agreement=0.731,
        kl_to_reference={"per_token": 0.02, "per_sequence": 0.04, "sequences": 50, "tokens": 100},
        reward={"sft": [0.1, 0.2, 0.3], "final": [0.5, 0.6, 0.9]},
        wall_seconds_per_stage={"sft": 120.0, "rm": 300.5, "ppo": 200.0, "evaluate": 29.3},
        meta={"run_id": "test-run"},
    )


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, the first chunk after the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def pixel_variance(path: Path) -> float:
    from matplotlib.image import imread

    return float(imread(path).var())


@pytest.fixture(scope="module")
def matplotlib_installed():
    return pytest.importorskip("matplotlib")


def test_render_plots_writes_every_plot(tmp_path, matplotlib_installed):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, [metrics_row(s) for s in range(1, 13)])
    paths = plots.render_plots(run_dir, make_report())
    assert [p.name for p in paths] == list(EXPECTED_SIZES)
    for p in paths:
        assert p.parent == run_dir / "plots" and p.is_file()
        assert p.read_bytes()[:8] == PNG_SIGNATURE
        assert png_size(p) == EXPECTED_SIZES[p.name], p.name
        assert pixel_variance(p) > 0, f"{p.name} is blank"
    # Atomic writes leave no temp files behind.
    assert sorted(f.name for f in (run_dir / "plots").iterdir()) == sorted(EXPECTED_SIZES)


def test_imread_agrees_with_the_header(tmp_path, matplotlib_installed):
    from matplotlib.image import imread

    run_dir = tmp_path / "run"
    write_metrics(run_dir, [metrics_row(s) for s in range(1, 13)])
    for p in plots.render_plots(run_dir, make_report()):
        h, w = imread(p).shape[:2]
        assert (w, h) == EXPECTED_SIZES[p.name]


def test_no_metrics_rows_skips_the_step_plots(tmp_path, matplotlib_installed):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, [])
    report = make_report()
    paths = plots.render_plots(run_dir, report)
    names = [p.name for p in paths]
    assert "reward_kl.png" not in names
    assert names == ["win_rates.png", "rm_accuracy.png", "phase_seconds.png"]  # stage wall times still plotted
    assert png_size(run_dir / "plots" / "phase_seconds.png") == EXPECTED_SIZES["phase_seconds.png"]

    # No metrics.jsonl at all, and a report with nothing in it: nothing to plot, no error.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert plots.render_plots(empty, {"schema_version": 1, "win_rates": {}}) == []
    assert not (empty / "plots").exists() or not any((empty / "plots").iterdir())


def test_missing_rounds_and_phases_skip_their_plots(tmp_path, matplotlib_installed):
    run_dir = tmp_path / "run"
    rows = [{k: v for k, v in metrics_row(s).items() if k != "phase_seconds"} for s in range(1, 6)]
    write_metrics(run_dir, rows)
    report = build_report_json(win_rates={"gold": win_rate([1.0, 0.0, 1.0], [0.5, 0.5, 0.5])})
    assert [p.name for p in plots.render_plots(run_dir, report)] == ["reward_kl.png", "win_rates.png"]


def test_bad_metric_lines_and_values_do_not_crash(tmp_path, matplotlib_installed):
    run_dir = tmp_path / "run"
    rows = [metrics_row(s) for s in range(1, 5)]
    rows[1]["mean_score"] = None
    rows[2]["phase_seconds"] = {"generate": 1.0}  # a phase missing in one step
    write_metrics(run_dir, rows)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "mean_sc')  # torn by a crash mid-append
    with capture_logs() as logs:
        paths = plots.render_plots(run_dir, make_report())
    assert "reward_kl.png" in [p.name for p in paths]
    assert any(e["event"] == "metrics_line_skipped" for e in logs)
    assert not any(e["event"] == "plot_failed" for e in logs)


def test_read_metrics_orders_by_step_and_keeps_the_last_line_of_a_step(tmp_path):
    rows = [metrics_row(3), metrics_row(1), metrics_row(2), dict(metrics_row(2), mean_score=9.0)]
    write_metrics(tmp_path, rows)
    got = plots.read_metrics(tmp_path)
    assert [r["step"] for r in got] == [1, 2, 3]
    assert got[1]["mean_score"] == 9.0
    assert plots.read_metrics(tmp_path / "nowhere") == []


def test_without_matplotlib_nothing_is_written(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    write_metrics(run_dir, [metrics_row(s) for s in range(1, 4)])
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import matplotlib...` raise ImportError
    with capture_logs() as logs:
        assert plots.render_plots(run_dir, make_report()) == []
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["plots_skipped"]
    assert not (run_dir / "plots").exists()


def test_markdown_links_and_render_markdown_agree(tmp_path):
    run_dir = tmp_path / "run"
    paths = [run_dir / "plots" / n for n in EXPECTED_SIZES]
    section = plots.markdown_links(paths, run_dir)
    assert section.startswith("## Plots\n")
    assert "![reward and KL](plots/reward_kl.png)" in section
    assert "![win rates](plots/win_rates.png)" in section
    assert "![RM accuracy](plots/rm_accuracy.png)" in section
    assert "![phase seconds](plots/phase_seconds.png)" in section
    assert plots.markdown_links([], run_dir) == ""

    report = make_report()
    md = render_markdown(report, plots=[f"plots/{n}" for n in EXPECTED_SIZES])
    assert section.strip() in md
    assert md.index("## Plots") > md.index("## Win rates against the SFT policy")
    assert render_markdown(report) == render_markdown(report, plots=None) == render_markdown(report, plots=[])
    assert "## Plots" not in render_markdown(report)


def test_import_does_not_load_matplotlib():
    code = (
        "import sys, alignd.plots; "
        "print(sorted(m for m in ('matplotlib', 'numpy', 'torch', 'grpc') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
