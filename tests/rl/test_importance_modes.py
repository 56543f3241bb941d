"""rollout_correction's levels (token, sequence, geometric) and modes (truncate, mask, seq_mask) against naive loops,
and the trainer's per-token loss against AReaL's decoupled PPO loss on stale behaviour log-probs:

    loss_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) * w_t,   r_t = pi_theta / pi_prox,
    w_t = the IS weight of pi_prox / pi_behaviour (level and mode as rollout_correction),

with the dual clip (A < 0: the unweighted loss capped at -A c) when algorithm.dual_clip is set."""

import itertools
import math
from pathlib import Path

import pytest
import torch

from reasonrl.config import AlgorithmConfig, ConfigError, load_config
from reasonrl.rl.importance import IS_LEVELS, IS_MODES, rollout_correction
from reasonrl.trainers.step import _per_token_loss
from reasonrl.trainers.validation import validate

CLAMP = 20.0
SMOKE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_smoke.yaml"


def naive_weights(old, rollout, mask, *, level, mode, cap, floor):
    """Loops over rows and tokens: the IS weights as nested lists (0 on padding)."""
    weights = []
    for i in range(len(old)):
        deltas = [float(old[i][t]) - float(rollout[i][t]) for t in range(len(old[i])) if mask[i][t]]
        row_sum = sum(deltas)
        row_mean = row_sum / max(len(deltas), 1)
        geometric = math.exp(max(-CLAMP, min(CLAMP, row_mean)))
        row = []
        for t in range(len(old[i])):
            if not mask[i][t]:
                row.append(0.0)
                continue
            log_w = {"token": float(old[i][t]) - float(rollout[i][t]), "sequence": row_sum,
                     "geometric": row_mean}[level]
            w = math.exp(max(-CLAMP, min(CLAMP, log_w)))
            if mode == "truncate":
                row.append(min(w, cap))
            elif mode == "mask":
                row.append(w if floor <= w <= cap else 0.0)
            else:  # seq_mask
                row.append(min(w, cap) if floor <= geometric <= cap else 0.0)
        weights.append(row)
    return weights


def naive_rejected_fraction(old, rollout, mask, *, cap, floor):
    """seq_mask: rejected rows / rows with a valid token."""
    rows = [[float(old[i][t]) - float(rollout[i][t]) for t in range(len(old[i])) if mask[i][t]]
            for i in range(len(old))]
    rows = [d for d in rows if d]
    rejected = [d for d in rows if not floor <= math.exp(max(-CLAMP, min(CLAMP, sum(d) / len(d)))) <= cap]
    return len(rejected) / max(len(rows), 1)


def stale_batch(seed, n=6, t=7):
    """Proximal log-probs `old`, behaviour log-probs far from them (a stale policy), a padding mask with varied
    lengths, one of them 0."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    row_shift = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)[:, None]
    rollout = old + row_shift + 0.8 * torch.randn(n, t, generator=g, dtype=torch.float64)
    lengths = torch.tensor([t, 3, 0, 5, 1, t - 1][:n] + [t] * max(0, n - 6))
    mask = torch.arange(t)[None] < lengths[:, None]
    return old, rollout, mask


@pytest.mark.parametrize("level, mode", list(itertools.product(IS_LEVELS, IS_MODES)))
@pytest.mark.parametrize("seed", [0, 1])
def test_every_level_and_mode_matches_the_naive_loop(level, mode, seed):
    old, rollout, mask = stale_batch(seed)
    cap, floor = 1.5, 0.6
    w, metrics = rollout_correction(old.float(), rollout.float(), mask, level=level, mode=mode, cap=cap, floor=floor)
    expected = naive_weights(old.float().tolist(), rollout.float().tolist(), mask.tolist(), level=level, mode=mode,
                             cap=cap, floor=floor)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-7)
    assert bool((w[~mask] == 0).all())
    kept = w[mask]
    assert bool((kept == 0).any()) or mode == "truncate"  # the inputs exercise the masking
    assert bool((kept > 0).any())
    if mode == "seq_mask":
        frac = naive_rejected_fraction(old.float().tolist(), rollout.float().tolist(), mask.tolist(), cap=cap,
                                       floor=floor)
        assert 0 < frac < 1
        assert metrics["sampling/seq_masked_frac"].item() == pytest.approx(frac)
    else:
        assert "sampling/seq_masked_frac" not in metrics


def test_seq_mask_hand_computed():
    # cap 1.5, floor 0.6; token ratios pi_old / pi_rollout:
    #   row 0: 2, 0.5       -> geometric mean sqrt(2 * 0.5) = 1      in range: kept, truncated: 1.5, 0.5
    #   row 1: 1.2, 3, pad  -> geometric mean sqrt(3.6) = 1.897 > 1.5: every token 0
    #   row 2: 0.25, 1      -> geometric mean sqrt(0.25) = 0.5 < 0.6: every token 0
    old = torch.log(torch.tensor([[0.4, 0.1, 1.0], [0.6, 0.9, 1.0], [0.1, 0.7, 1.0]], dtype=torch.float64))
    rollout = torch.log(torch.tensor([[0.2, 0.2, 0.5], [0.5, 0.3, 0.5], [0.4, 0.7, 0.5]], dtype=torch.float64))
    mask = torch.tensor([[True, True, False], [True, True, False], [True, True, False]])
    w, metrics = rollout_correction(old, rollout, mask, level="token", mode="seq_mask", cap=1.5, floor=0.6)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                                               dtype=torch.float64))
    assert metrics["sampling/seq_masked_frac"].item() == pytest.approx(2 / 3)
    # level geometric: every kept token carries its row's geometric mean (row 0: 1)
    w, _ = rollout_correction(old, rollout, mask, level="geometric", mode="seq_mask", cap=1.5, floor=0.6)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                                               dtype=torch.float64))
    # the same rows under plain geometric truncation: 1 | min(1.897, 1.5) = 1.5 | 0.5
    w, _ = rollout_correction(old, rollout, mask, level="geometric", mode="truncate", cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 0.0], [1.5, 1.5, 0.0], [0.5, 0.5, 0.0]],
                                               dtype=torch.float64))


def test_icepop_masks_exactly_the_tokens_out_of_range():
    # level token, mode mask, cap 1.5, floor 0.6: ratios 2, 0.5, 1.2, 0.8, (pad) -> 0, 0, 1.2, 0.8, 0
    old = torch.log(torch.tensor([[0.4, 0.1, 0.6, 0.4, 0.3]], dtype=torch.float64))
    rollout = torch.log(torch.tensor([[0.2, 0.2, 0.5, 0.5, 0.9]], dtype=torch.float64))
    mask = torch.tensor([[True, True, True, True, False]])
    w, metrics = rollout_correction(old, rollout, mask, level="token", mode="mask", cap=1.5, floor=0.6)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 1.2, 0.8, 0.0]], dtype=torch.float64))
    assert metrics["sampling/is_ratio_max"].item() == pytest.approx(2.0)  # before masking
    assert metrics["sampling/is_ratio_min"].item() == pytest.approx(0.5)


def test_a_floor_is_valid_with_mask_and_seq_mask_only():
    for mode in ("mask", "seq_mask"):
        validate(load_config(SMOKE, [f"rollout.is_mode={mode}", "rollout.is_floor=0.5"]), world_size=1)
    with pytest.raises(ConfigError, match="seq_mask"):
        validate(load_config(SMOKE, ["rollout.is_mode=truncate", "rollout.is_floor=0.5"]), world_size=1)


def naive_decoupled_loss(logp, prox, adv, weights, mask, *, eps_low, eps_high, dual_clip):
    """AReaL's decoupled PPO loss per token and its derivative w.r.t. logp, by hand (loops, math module)."""
    losses, grads = [], []
    for i in range(len(logp)):
        loss_row, grad_row = [], []
        for t in range(len(logp[i])):
            if not mask[i][t]:
                loss_row.append(0.0)
                grad_row.append(0.0)
                continue
            a, w = adv[i], weights[i][t]
            r = math.exp(logp[i][t] - prox[i][t])
            unclipped, clipped = -r * a, -min(max(r, 1 - eps_low), 1 + eps_high) * a
            loss, grad = (unclipped, -r * a) if unclipped >= clipped else (clipped, 0.0)
            if dual_clip is not None and a < 0 and loss > -a * dual_clip:
                loss, grad = -a * dual_clip, 0.0
            loss_row.append(loss * w)
            grad_row.append(grad * w)
        losses.append(loss_row)
        grads.append(grad_row)
    return losses, grads


def trainer_loss_and_grad(logp, old, adv, mask, algo, rollout_logp, rollout_is):
    logp = logp.clone().requires_grad_(True)
    per_token, _, _, _ = _per_token_loss(logp, old, adv, None, mask, algo, rollout_is=rollout_is,
                                         rollout_logp=rollout_logp)
    torch.where(mask, per_token, torch.zeros_like(per_token)).sum().backward()
    return per_token.detach(), logp.grad


@pytest.mark.parametrize("level", ["token", "geometric"])
@pytest.mark.parametrize("mode", ["truncate", "mask", "seq_mask"])
@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_trainer_loss_is_the_decoupled_ppo_loss_on_stale_rollouts(level, mode, dual_clip):
    old, rollout, mask = stale_batch(seed=3)
    g = torch.Generator().manual_seed(6)
    logp = old + 0.5 * torch.randn(old.shape, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.5, 0.7, -0.4, 2.0, -1.0], dtype=torch.float64)
    algo = AlgorithmConfig(eps_low=0.2, eps_high=0.28, dual_clip=dual_clip)
    rollout_is = {"level": level, "mode": mode, "cap": 2.0, "floor": 0.5}
    assert (old - rollout)[mask].abs().max() > 1.5  # behaviour log-probs far from the proximal ones
    loss, grad = trainer_loss_and_grad(logp, old, adv, mask, algo, rollout, rollout_is)
    weights = naive_weights(old.tolist(), rollout.tolist(), mask.tolist(), level=level, mode=mode, cap=2.0,
                            floor=0.5)
    expected_loss, expected_grad = naive_decoupled_loss(
        logp.tolist(), old.tolist(), adv.tolist(), weights, mask.tolist(), eps_low=0.2, eps_high=0.28,
        dual_clip=dual_clip)
    torch.testing.assert_close(torch.where(mask, loss, torch.zeros_like(loss)), torch.tensor(expected_loss,
                                                                                             dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64))
    w = torch.tensor(weights, dtype=torch.float64)
    active = mask & (w > 0)
    assert bool((grad[active] != 0).any()) and bool((grad[active] == 0).any())  # unclipped and clipped tokens
    assert bool((w[mask] == 0).any()) or mode == "truncate"
    dual_capped = (adv[:, None] < 0) & ((logp - old).exp() > 1.5) & active
    assert bool(dual_capped.any())  # with dual_clip=1.5 their loss is -1.5 A w


def test_decoupled_loss_one_token_hand_computed():
    # pi_prox = 0.5, pi_behaviour = 0.25 -> w = 2 (under cap 3); pi_theta = 0.55 -> r = 1.1, inside [0.8, 1.28];
    # A = 2: loss = -min(1.1 * 2, 1.1 * 2) * 2 = -4.4, d loss / d logp = -A r w = -2 * 1.1 * 2 = -4.4
    logp, old, rollout = (torch.tensor([[math.log(p)]], dtype=torch.float64) for p in (0.55, 0.5, 0.25))
    adv, mask = torch.tensor([2.0], dtype=torch.float64), torch.tensor([[True]])
    algo = AlgorithmConfig(eps_low=0.2, eps_high=0.28)
    truncate = {"level": "token", "mode": "truncate", "cap": 3.0, "floor": 0.0}
    loss, grad = trainer_loss_and_grad(logp, old, adv, mask, algo, rollout, truncate)
    assert loss.item() == pytest.approx(-4.4) and grad.item() == pytest.approx(-4.4)
    # pi_theta = 0.7 -> r = 1.4, clipped at 1.28: loss = -1.28 * 2 * 2 = -5.12, no gradient
    loss, grad = trainer_loss_and_grad(torch.log(torch.tensor([[0.7]], dtype=torch.float64)), old, adv, mask, algo,
                                       rollout, truncate)
    assert loss.item() == pytest.approx(-5.12) and grad.item() == 0.0
    # cap 1.5 < w = 2: mask and seq_mask (geometric mean of one token = 2) drop the token
    for mode in ("mask", "seq_mask"):
        loss, grad = trainer_loss_and_grad(logp, old, adv, mask, algo, rollout, {**truncate, "mode": mode, "cap": 1.5})
        assert loss.item() == 0.0 and grad.item() == 0.0
