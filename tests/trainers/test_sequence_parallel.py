"""Sequence parallelism in the trainer: every sequence split across 2 ranks (striped blocks, sparse ring attention)
trains exactly like one process running the same sparse attention on whole sequences."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reasonrl.config import ConfigError, load_config
from reasonrl.trainers.validation import validate

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = str(HERE / "sequence_parallel_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, check=False, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{what} failed:\n{done.stderr[-4000:]}"


def test_two_rank_sequence_parallel_trains_like_one_process(tiny_model_dir, tmp_path):
    """(The hierarchical ring equals the flat one: tests/kernels/test_ring.py.)"""
    single, split = tmp_path / "single.pt", tmp_path / "split.pt"
    _run([sys.executable, WORKER, tiny_model_dir, str(single), "1"], "1 process")
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/ddp.yaml",
          "--num_processes", "2", WORKER, tiny_model_dir, str(split), "2"], "sequence parallel")
    a, b = torch.load(single), torch.load(split)
    assert b["num_processes"] == 2
    for key in ("losses", "grad_norms", "entropies"):
        torch.testing.assert_close(torch.tensor(b[key]), torch.tensor(a[key]), rtol=1e-5, atol=1e-7, msg=key)
    assert a["params"].keys() == b["params"].keys()
    for name, value in a["params"].items():
        torch.testing.assert_close(b["params"][name], value, rtol=0, atol=5e-6, msg=name)


def test_sequence_parallel_config_is_checked():
    base = load_config(REPO / "recipes" / "tiny_smoke.yaml", ["model.sparse_attention.sequence_parallel=2"])
    with pytest.raises(ConfigError, match="must divide the number of processes"):
        validate(base, 3)
    with pytest.raises(ConfigError, match="attn_implementation=reasonrl_sparse"):
        validate(base, 2)
    sparse = load_config(REPO / "recipes" / "tiny_smoke.yaml", ["model.sparse_attention.sequence_parallel=2",
                                                                "model.attn_implementation=reasonrl_sparse",
                                                                "optim.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="micro_batch_size=1"):
        validate(sparse, 2)


def _history(out_dir: Path) -> dict:
    import json

    return {row["step"]: row for row in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


def test_the_trainer_with_sequence_parallelism_matches_one_process(tiny_model_dir, tmp_path):
    """The whole entry point: 2 ranks in one sequence-parallel group (one data-parallel rank: the same prompts and
    samples as one process) give the metrics of one process running sparse attention on whole sequences."""
    common = [
        "--config", "recipes/tiny_smoke.yaml", f"model.name_or_path={tiny_model_dir}",
        "rewards=[{name: 'rewards_for_tests:digit_count'}]", "model.attn_implementation=reasonrl_sparse",
        "model.sparse_attention.dense_below=0", "model.sparse_attention.block_size=4",
        "model.sparse_attention.last_q=4", "model.sparse_attention.vertical_size=2",
        "model.sparse_attention.slash_size=4", "model.sparse_attention.sink=1", "model.sparse_attention.local_window=2",
        "optim.micro_batch_size=1", "trainer.steps=2", "trainer.save_every=0", "logging.wandb_mode=disabled",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "reasonrl.trainers.grpo", *common, "optim.packing=true",
          f"trainer.output_dir={one}"], "1 process")
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/ddp.yaml",
          "--num_processes", "2", "-m", "reasonrl.trainers.grpo", *common,
          "model.sparse_attention.sequence_parallel=2", f"trainer.output_dir={two}"], "sequence parallel")
    a, b = _history(one), _history(two)
    assert a.keys() == b.keys() == {0, 1, 2}
    for step in (1, 2):
        assert b[step]["train/skipped"] == 0 and b[step]["optim/grad_norm"] > 0
        assert b[step]["reward/mean"] == a[step]["reward/mean"]  # the same samples
        for key in ("loss/policy", "optim/grad_norm", "policy/entropy", "train/tokens"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)
