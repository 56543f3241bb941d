"""scripts/length_accuracy.py end to end on the tiny model: budgets + efforts -> JSON rows and a PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "length_accuracy.py"


def test_length_accuracy_script(tiny_model_dir, tmp_path):
    png = tmp_path / "x.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", f"tiny={tiny_model_dir}", "--n", "4", "--budgets", "4,8",
         "--efforts", "0.5,1.0", "--batch-size", "4", "--json", "--png", str(png)],
        check=False, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "| model | setting | accuracy | mean length |" in lines
    result = json.loads(lines[-1])
    rows = result["rows"]
    assert [r["setting"] for r in rows] == ["budget 4", "budget 8", "effort 0.5", "effort 1"]
    assert [r["max_new_tokens"] for r in rows] == [4, 8, 8, 8]
    assert [r["effort"] for r in rows] == [None, None, 0.5, 1.0]
    for r in rows:
        assert r["model"] == "tiny" and r["n"] == 4
        assert 0.0 <= r["accuracy"] <= 1.0
        assert 0.0 <= r["mean_length"] <= r["max_new_tokens"]
    assert result["png"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the saved output joins a new plot and table without re-evaluating; coincident points share one label
    saved = tmp_path / "first.log"
    saved.write_text(proc.stdout)
    png2 = tmp_path / "y.png"
    again = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(saved), "--json", "--png", str(png2)],
                           check=False, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["rows"] == rows
    assert png2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_length_accuracy_script_on_the_vllm_engine(vllm_module, vllm_tiny_model_dir, tmp_path):
    """The vllm engine is built from the typed RolloutConfig (a hand-built Namespace once crashed here)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB: vLLM's CPU default would take 0.3 of the RAM
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", f"tiny={vllm_tiny_model_dir}", "--n", "3", "--budgets", "4,8",
         "--efforts", "0.5", "--engine", "vllm", "--json", "--png", str(tmp_path / "v.png")],
        check=False, capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert [(r["setting"], r["max_new_tokens"], r["effort"]) for r in rows] == [
        ("budget 4", 4, None), ("budget 8", 8, None), ("effort 0.5", 8, 0.5)]
    for r in rows:
        assert r["engine"] == "vllm" and r["model"] == "tiny" and r["n"] == 3
        assert 0.0 <= r["accuracy"] <= 1.0
        assert 0.0 < r["mean_length"] <= r["max_new_tokens"]


def test_point_labels_join_coincident_settings():
    sys.path.insert(0, str(SCRIPT.parent))
    from length_accuracy import point_labels

    labels = point_labels([(11.62, 0.3, "budget 16"), (11.62, 0.3, "budget 32"), (20.0, 0.1, "effort 0.5")])
    assert labels == {(11.6, 0.3): "16,32", (20.0, 0.1): "r=0.5"}


def test_from_json_without_rows_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.log"
    bad.write_text("no json here\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--from-json", str(bad)], check=False,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "no JSON line" in proc.stderr
