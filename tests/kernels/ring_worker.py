"""One rank of the ring-attention checks (gloo, CPU). Launched by tests/kernels/test_ring.py with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set; every rank builds the same full tensors from a fixed seed, runs the distributed
code on its striped share and the single-process reference on the full tensors, and writes its measured differences
to OUT_DIR/rank{R}.json (the test holds the tolerances).

Usage: ring_worker.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from reasonrl.kernels.pattern import PatternConfig, dense_pattern, estimate_pattern, pattern_mask
from reasonrl.kernels.reference import reference_sparse_attention
from reasonrl.kernels.ring import (
    estimate_pattern_distributed,
    patterns_agree,
    ring_sparse_attention,
    stripe,
    unstripe,
)

B, H, HK, N, G, D = 1, 4, 2, 128, 16, 16
CONFIGS = {  # sparse enough that the patterns drop about a third to a half of the causal pairs (see `density`)
    "topk": PatternConfig(block_size=G, last_q=16, vertical_size=4, slash_size=3, sink=2, local_window=2),
    "mass": PatternConfig(block_size=G, last_q=24, mode="mass", mass=0.2, max_vertical=40, max_slash=40),
    "topk_logits": PatternConfig(block_size=G, last_q=16, vertical_size=4, slash_size=3, sink=2, local_window=2,
                                 normalize="logits"),
}


def full_inputs(seed: int, dtype=torch.float32):
    """q, k, v and an output gradient; a few strong key columns and a sharp q make the estimated patterns uneven."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g) * 2
    k = torch.randn(B, HK, N, D, generator=g)
    k[:, :, [5, 37, 90]] *= 3
    v = torch.randn(B, HK, N, D, generator=g)
    d_out = torch.randn(B, H, N, D, generator=g)
    return [t.to(dtype) for t in (q, k, v, d_out)]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_ring(q, k, v, d_out, pattern, group, rank, world, **ring_kwargs) -> list[torch.Tensor]:
    """This rank's ring output and q/k/v gradients (loss = sum(out * d_out)) from the full tensors' shares."""
    share = lambda t: stripe(t, 2, G, rank, world)
    local = [share(t).detach().requires_grad_() for t in (q, k, v)]
    out = ring_sparse_attention(*local, pattern, group, **ring_kwargs)
    (out.float() * share(d_out).float()).sum().backward()  # a scalar loss: backward(grad) would import sympy (slow)
    return [out.detach(), *(t.grad for t in local)]


def compare_attention(pattern, group, rank, world, seed, layouts: dict, dtype=torch.float32) -> dict:
    """For each layout (name -> ring keyword arguments; the first is the reference layout): the ring output and
    q/k/v gradients on this rank's share vs the single-process reference on the full tensors (float32, on the same,
    possibly bf16-rounded, inputs), and vs the first layout."""
    q, k, v, d_out = full_inputs(seed, dtype)
    full = [t.float().requires_grad_() for t in (q, k, v)]
    ref = reference_sparse_attention(*full, pattern)
    (ref * d_out.float()).sum().backward()
    expected = [stripe(t, 2, G, rank, world) for t in (ref.detach(), *(t.grad for t in full))]
    scale = max(t.abs().max().item() for t in (ref, *(t.grad for t in full)))
    results, first = {}, None
    for name, kwargs in layouts.items():
        got = run_ring(q, k, v, d_out, pattern, group, rank, world, **kwargs)
        gathered = [torch.empty_like(got[0]) for _ in range(world)]
        dist.all_gather(gathered, got[0].contiguous(), group=group)
        first = got if first is None else first
        result = {key: max_diff(a, b) for key, a, b in zip(("out", "dq", "dk", "dv"), got, expected, strict=True)}
        result.update(out_unstriped=max_diff(unstripe(gathered, 2, G), ref), scale=scale,
                      vs_first_layout=max(max_diff(a, b) for a, b in zip(got, first, strict=True)),
                      dtype_kept=all(t.dtype == dtype for t in got))
        results[name] = result
    return results


def density(pattern) -> float:
    """Share of the causal (query, key) pairs the pattern keeps."""
    return (pattern_mask(pattern).sum() / (pattern.vertical.numel() * (N + 1) / 2)).item()


def estimation_checks(group, rank, world, seed) -> dict:
    q, k, _, _ = full_inputs(seed)
    results = {}
    for name, config in CONFIGS.items():
        single = estimate_pattern(q, k, config)
        ours = estimate_pattern_distributed(stripe(q, 2, G, rank, world), stripe(k, 2, G, rank, world), config, group)
        results[name] = {
            "equal": torch.equal(ours.vertical, single.vertical) and torch.equal(ours.slash_blocks, single.slash_blocks),
            "agree": patterns_agree(ours, group),
            "density": density(single),
        }
    # a sequence of V real tokens padded at the end to N: scoring uses the last real queries, and the pattern on the
    # real tokens equals the single-process one of the unpadded sequence
    valid = N - 21
    for name in ("topk", "topk_logits"):  # (mass keeps > 80% of this shorter sequence: a weak check)
        config = CONFIGS[name]
        single = estimate_pattern(q[:, :, :valid], k[:, :, :valid], config)
        padded = estimate_pattern_distributed(stripe(q, 2, G, rank, world), stripe(k, 2, G, rank, world), config,
                                              group, valid_len=valid)
        kept = pattern_mask(single)
        results[f"{name}_valid_len"] = {"equal": torch.equal(pattern_mask(padded)[..., :valid, :valid], kept),
                                        "agree": patterns_agree(padded, group),
                                        "density": (kept.sum() / (H * valid * (valid + 1) / 2)).item()}
    return results


def run_checks(group, rank, world, seed, hierarchical_sizes=()) -> dict:
    """Estimation, then the ring on the estimated (top-k, mass) and dense patterns; optional hierarchical layouts."""
    q, k, _, _ = full_inputs(seed)
    results = {"estimation": estimation_checks(group, rank, world, seed)}
    patterns = {name: estimate_pattern_distributed(stripe(q, 2, G, rank, world), stripe(k, 2, G, rank, world),
                                                   CONFIGS[name], group) for name in ("topk", "mass")}
    patterns["dense"] = dense_pattern(B, H, N, G)
    layouts = {"flat": {}} | {f"hierarchical{size}": {"hierarchical": True, "local_world_size": size}
                              for size in hierarchical_sizes}
    for name, pattern in patterns.items():
        for layout, result in compare_attention(pattern, group, rank, world, seed, layouts).items():
            results[f"{layout}/{name}"] = result
    bf16 = compare_attention(patterns["topk"], group, rank, world, seed, {"flat": {}}, dtype=torch.bfloat16)
    results["flat/topk_bf16"] = bf16["flat"]
    return results


def main(out_dir: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results = {"world": world, "whole": run_checks(None, rank, world, seed=0, hierarchical_sizes=(1, 2))}
    # sub-groups: group ranks differ from global ranks (e.g. global 2, 3 are ranks 0, 1 of their pair)
    if world > 2:
        pairs = [dist.new_group(list(range(start, start + 2))) for start in range(0, world, 2)]
        mine = pairs[rank // 2]
        results["pair"] = run_checks(mine, dist.get_rank(mine), 2, seed=1 + rank // 2)
    dist.barrier()
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
