"""Striped sparse ring attention: the striped layout helpers, and real gloo process groups (2 and 4 CPU processes
running tests/kernels/ring_worker.py) whose distributed estimation, forward and gradients match one process.

Tolerances: float32, differences measured against the largest magnitude among the reference output and gradients
("scale", about 10 here): the ring merges partial softmaxes and sums gradients in another order than the dense
reference, so they agree to about 1e-6 relative (measured <= 2e-6); bf16 inputs agree to bf16 rounding. The
hierarchical schedules are also compared with the flat ring ("vs_first_layout"), same tolerance.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reasonrl.kernels.ring import check_striped_length, stripe, striped_positions, unstripe

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = str(HERE / "ring_worker.py")


# ---------------------------------------------------------------------------------------------------------------
# pure layout helpers


def test_striped_positions_by_hand():
    # N = 64, G = 8, W = 2: 8 blocks, even blocks on rank 0, odd blocks on rank 1
    rank0 = [*range(8), *range(16, 24), *range(32, 40), *range(48, 56)]
    rank1 = [*range(8, 16), *range(24, 32), *range(40, 48), *range(56, 64)]
    assert striped_positions(64, 8, 0, 2).tolist() == rank0
    assert striped_positions(64, 8, 1, 2).tolist() == rank1
    assert striped_positions(64, 8, 0, 1).tolist() == list(range(64))


@pytest.mark.parametrize("world, block", [(1, 4), (2, 8), (3, 4), (4, 2), (4, 1)])
def test_stripe_round_trip_and_positions(world, block):
    n = world * block * 3
    x = torch.randn(2, n, 5)
    shares = [stripe(x, 1, block, r, world) for r in range(world)]
    assert all(s.shape == (2, n // world, 5) for s in shares)
    for r, share in enumerate(shares):
        assert torch.equal(share, x[:, striped_positions(n, block, r, world)])
    assert torch.equal(unstripe(shares, 1, block), x)
    assert torch.equal(unstripe([stripe(x, -2, block, r, world) for r in range(world)], -2, block), x)
    everyone = torch.cat([striped_positions(n, block, r, world) for r in range(world)])
    assert sorted(everyone.tolist()) == list(range(n))  # a partition of the sequence


def test_stripe_balances_causal_work():
    """Every rank holds the same number of tokens, and (the point of striping) about the same causal work."""
    n, block, world = 4096, 16, 4
    work = [int((striped_positions(n, block, r, world) + 1).sum()) for r in range(world)]
    assert max(work) / min(work) < 1.03  # contiguous chunks: the last rank would do 7x the work of the first


def test_lengths_that_do_not_stripe_raise_with_the_fix():
    with pytest.raises(ValueError, match="pad the sequence"):
        check_striped_length(100, 16, 2)
    with pytest.raises(ValueError, match=r"2 \* 16 = 32"):
        stripe(torch.zeros(1, 48), 1, 16, 0, 2)
    with pytest.raises(ValueError, match="outside"):
        striped_positions(64, 8, 2, 2)
    with pytest.raises(ValueError, match="same shape"):
        unstripe([torch.zeros(8), torch.zeros(16)], 0, 8)


# ---------------------------------------------------------------------------------------------------------------
# real process groups


def _launch(world: int, port: int, out_dir: Path) -> list[dict]:
    """Start `world` ranks of ring_worker.py on loopback; return each rank's results."""
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, WORKER, str(out_dir)], cwd=REPO, env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(world)]
    failures = []
    for rank, proc in enumerate(procs):
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0:
            failures.append(f"rank {rank} exited with {proc.returncode}:\n{err[-3000:]}")
    assert not failures, "\n".join(failures)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)]


def _check_results(results: dict, where: str) -> None:
    for name, est in results["estimation"].items():
        assert est["equal"], f"{where}: distributed {name} estimation differs from one process"
        assert est["agree"], f"{where}: ranks hold different {name} patterns"
        assert est["density"] < 0.8, f"{where}: the {name} pattern is nearly dense, the test would prove little"
    cases = {k: v for k, v in results.items() if k != "estimation"}
    assert {"flat/topk", "flat/mass", "flat/dense", "flat/topk_bf16"} <= cases.keys()
    for case, diffs in cases.items():
        tolerance = (2e-2 if case.endswith("bf16") else 1e-5) * diffs["scale"]
        assert diffs["dtype_kept"], f"{where} {case}: output or gradient dtype changed"
        for key in ("out", "out_unstriped", "dq", "dk", "dv", "vs_first_layout"):
            assert diffs[key] <= tolerance, f"{where} {case}: {key} differs by {diffs[key]:.3g} > {tolerance:.3g}"


def test_two_ranks_match_one_process(tmp_path, free_port):
    """Distributed estimation (top-k softmax/logits, mass) is exact; the striped ring (flat, and the two-level
    schedule as 2 nodes x 1 and 1 node x 2) gives the reference output and q/k/v gradients, GQA H=4, Hk=2."""
    ranks = _launch(2, free_port(), tmp_path)
    for rank, results in enumerate(ranks):
        assert results["world"] == 2
        _check_results(results["whole"], f"rank {rank}")
        assert {"hierarchical1/topk", "hierarchical2/dense"} <= results["whole"].keys()


def test_four_ranks_hierarchical_and_subgroups_match_one_process(tmp_path, free_port):
    """4 ranks: the flat ring, the hierarchical ring as 2 nodes x 2 ranks (and 4 x 1), and 2-rank sub-groups whose
    group ranks differ from the global ranks (global 2, 3 are ranks 0, 1 of their pair)."""
    ranks = _launch(4, free_port(), tmp_path)
    for rank, results in enumerate(ranks):
        assert results["world"] == 4
        _check_results(results["whole"], f"rank {rank}")
        assert {"hierarchical2/topk", "hierarchical2/mass", "hierarchical2/dense"} <= results["whole"].keys()
        _check_results(results["pair"], f"rank {rank} (pair sub-group)")
