"""scripts/plot_episodes.py: metrics read per step (a resumed run's repeated step: the last value) and a PNG."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_episodes.py"


def load_script():
    spec = importlib.util.spec_from_file_location("plot_episodes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_episodes(tmp_path):
    script = load_script()
    rows = [{"step": 0, "eval/accuracy": 0.0, "eval/tool_call_rate": 1.0},
            {"step": 1, "reward/accuracy": 0.1, "episode/tool_call_rate": 0.8, "note": "text"},
            {"step": 2, "reward/accuracy": 0.5, "episode/tool_call_rate": 0.9},
            {"step": 2, "reward/accuracy": 0.6, "episode/tool_call_rate": 1.0}]  # resumed: step 2 again
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    series = script.read_metrics(tmp_path / "metrics.jsonl")
    assert series["reward/accuracy"] == [(1, 0.1), (2, 0.6)]
    assert series["eval/accuracy"] == [(0, 0.0)] and "note" not in series
    assert script.main([str(tmp_path)]) == 0
    png = (tmp_path / "episodes.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
