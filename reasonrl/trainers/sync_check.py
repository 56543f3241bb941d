"""Weight-sync guard: after a push, the engine must score probe sequences like the trainer does.

The peers' most-filed rollout bug is a weight sync that silently did nothing: the engine keeps sampling from an old
policy and training goes on with wrong log-probs. After each sync we score a few of the step's own sequences with
the engine (teacher-forced, temperature 1) and with the trainer's freshly updated policy, and raise when the mean
absolute gap between their token probabilities exceeds a tolerance. It costs one short forward on each side.
"""

from __future__ import annotations

import torch

from reasonrl.trainers.step import fixed_logprobs

# Tolerance on the mean |p_engine - p_trainer| of the probe tokens. Measured on SmolLM2-135M after correct syncs
# (default task, fp32 trainer, `reasonrl serve` on CPU): fp32 engine, mean < 1e-5 and max 1e-5; bf16 engine, mean
# 0.009-0.027 and max 0.11 (log-prob gap 0.07-0.18 nats on average).
DEFAULT_TOLERANCE = {"float32": 0.002, "bfloat16": 0.05, "float16": 0.05}


class WeightSyncError(RuntimeError):
    """The rollout engine does not hold the trainer's current weights."""


def default_tolerance(engine_dtype: str) -> float:
    return DEFAULT_TOLERANCE.get(engine_dtype, DEFAULT_TOLERANCE["bfloat16"])


def probe_rows(completion_mask: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` rows with the most completion tokens (ties: lowest index), skipping empty ones."""
    lengths = completion_mask.sum(-1)
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    return torch.tensor([i for i in order[:count] if lengths[i] > 0], dtype=torch.long)


def probability_gaps(engine_logprobs: list[list[float]], trainer_logprobs: torch.Tensor) -> dict[str, float]:
    """Mean/max |p_engine - p_trainer| and mean |log p_engine - log p_trainer| over all probe tokens (row i's first
    len(engine_logprobs[i]) tokens).

    The check uses probabilities (as verl's rollout_probs_diff): a bf16 engine's log-prob error grows with how
    unlikely a token is (an error of ~0.5 nats on a token of probability 1e-4 is common), while its probability
    error stays small; a stale policy shows up in the probabilities of the likely tokens."""
    engine, trainer = [], []
    for i, scores in enumerate(engine_logprobs):
        engine.append(torch.tensor(scores, dtype=torch.float64))
        trainer.append(trainer_logprobs[i, : len(scores)].double())
    if not engine or not sum(len(x) for x in engine):
        return {"prob_gap_mean": 0.0, "prob_gap_max": 0.0, "logp_gap_mean": 0.0}
    engine_lp, trainer_lp = torch.cat(engine), torch.cat(trainer)
    prob_gap = (engine_lp.exp() - trainer_lp.exp()).abs()
    return {"prob_gap_mean": prob_gap.mean().item(), "prob_gap_max": prob_gap.max().item(),
            "logp_gap_mean": (engine_lp - trainer_lp).abs().mean().item()}


def check_weight_sync(engine, model, batch, *, pad_id: int, tolerance: float, step: int, rows: int = 2) -> dict:
    """Compare engine and trainer log-probs on ``rows`` of ``batch``; returns metrics or raises WeightSyncError."""
    idx = probe_rows(batch.completion_mask, rows)
    if idx.numel() == 0:
        return {}
    probe = batch.select_rows(idx)
    lengths = probe.completion_mask.sum(-1).tolist()
    completions = [probe.completion_ids[i, :n].tolist() for i, n in enumerate(lengths)]
    engine_lp = engine.prompt_logprobs(probe.prompt_ids, completions)
    with torch.no_grad():
        trainer_lp, _ = fixed_logprobs(model, probe, torch.arange(probe.num_rows), pad_id=pad_id, temperature=1.0,
                                       micro_batch_size=probe.num_rows)
    gaps = probability_gaps(engine_lp, trainer_lp)
    if not gaps["prob_gap_mean"] <= tolerance:  # also catches NaN
        raise WeightSyncError(
            f"after the weight sync of step {step}, the rollout engine's token probabilities differ from the "
            f"trainer's by {gaps['prob_gap_mean']:.4f} on average (max {gaps['prob_gap_max']:.4f}, tolerance "
            f"{tolerance}; log-prob gap {gaps['logp_gap_mean']:.4f}) on {probe.num_rows} probe "
            "sequences: the engine is not sampling from the current policy (a weight sync that did nothing, or a "
            "different model/dtype). rollout.sync_check_tol sets the tolerance; rollout.sync_check_every=0 turns "
            "the check off."
        )
    return {f"sync/{key}": value for key, value in gaps.items()}
