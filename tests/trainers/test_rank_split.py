"""Every token-level component gives the same update on 2 ranks (1 row per micro-batch) as on 1 rank (3 rows per
micro-batch): D3S's batch-level token threshold and HAPO's entropy statistics are gathered across ranks, and the
loss normalizers are global."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from split_worker import configurations, run_all

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_two_ranks_give_the_single_process_update(tmp_path):
    reference = run_all(Accelerator(cpu=True), micro=3)
    out = tmp_path / "two_ranks.pt"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(HERE / "split_worker.py"),
           str(out)]
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two_ranks = torch.load(out)
    assert set(two_ranks) == set(reference) == set(configurations())
    for config, deltas in reference.items():
        assert any(d.abs().max() > 0 for d in deltas.values()), f"{config}: the step changed nothing"
        for name, delta in deltas.items():
            torch.testing.assert_close(two_ranks[config][name], delta, atol=1e-6, rtol=1e-4,
                                       msg=f"{config}: {name}")
