"""Sequence parallelism in the trainer: every sequence split across 2 ranks (striped blocks, sparse ring attention)
trains exactly like one process running the same sparse attention on whole sequences."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reasonrl.config import ConfigError, load_config
from reasonrl.trainers.grpo import validate

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
