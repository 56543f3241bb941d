"""Reward shapers composed as a list: overlong (DAPO), RMT token budget, e1 effort; their checkpointed state."""

import json

import pytest
import torch

from reasonrl.rl.shapers import (
    FULL_EFFORT_KEY,
    BudgetShaper,
    EffortShaper,
    OverlongShaper,
    ShapingContext,
    apply_shapers,
    build_shaper,
)
from reasonrl.rl.shaping import overlong_penalty


def context(**overrides):
    base = {
        "rewards": torch.tensor([1.0, 0.0, 1.0, 1.0]), "correct": torch.tensor([1.0, 0.0, 1.0, 1.0]),
        "lengths": torch.tensor([10.0, 20.0, 30.0, 40.0]), "truncated": torch.tensor([False, False, False, True]),
        "prompt_keys": ["a", "a", "b", "b"], "group_size": 2, "step": 0, "total_steps": 10, "max_new_tokens": 40,
    }
    base.update(overrides)
    return ShapingContext(**base)


def test_overlong_shaper_equals_the_dapo_penalty():
    ctx = context()
    shaped, _, metrics = OverlongShaper(buffer=16, factor=1.0)(ctx)
    expected = ctx.rewards + overlong_penalty(ctx.lengths, max_len=40, buffer=16)
    assert torch.allclose(shaped, expected)
    # by hand: start = 24; l = 30 -> -(6/16) = -0.375; l = 40 -> -1
    assert shaped.tolist() == pytest.approx([1.0, 0.0, 0.625, 0.0])
    assert metrics["reward/overlong_penalty"] == pytest.approx((0 + 0 - 0.375 - 1.0) / 4)


def test_budget_shaper_by_hand_and_its_running_statistics():
    shaper = BudgetShaper(gamma=0.5, minimum=4, weight=0.5, decay=0.5)
    # step 0: B = initial = max_new_tokens = 40 for both prompts; r_len = l / 40
    shaped, _, metrics = shaper(context())
    assert shaped.tolist() == pytest.approx([1 + 0.5 * 10 / 40, 0.0, 1 + 0.5 * 30 / 40, 1 + 0.5 * 40 / 40])
    assert metrics["rmt/budget_mean"] == 40
    # the correct lengths became each prompt's B_0: a -> 10 (its only correct one), b -> max(30, 40) = 40
    assert shaper.tracker.get("a") == 10 and shaper.tracker.get("b") == 40
    # at the last step B = B_0 * gamma: a -> 5, b -> 20; the generation limit is margin * B
    assert shaper.budgets(["a", "b"], 10, 10, 40).tolist() == [5.0, 20.0]
    assert shaper.max_new_tokens(["a", "b", "new"], 10, 10, 40) == [7, 25, 25]  # ceil(1.25 * 5), ..., 40 * 0.5
    # past the budget the triangular reward falls: l = 15 with B = 10 -> 2 - 1.5 = 0.5
    later = context(lengths=torch.tensor([15.0, 20.0, 30.0, 40.0]), step=0, prompt_keys=["a", "a", "c", "c"])
    shaped, _, _ = BudgetShaper(initial=10, gamma=0.5, minimum=4, weight=1.0)(later)
    assert shaped[0].item() == pytest.approx(1.5)


def test_effort_shaper_pays_only_within_effort_times_the_mean_length():
    # group a: mean length 15 (both rows); group b: row 4 is truncated -> mean over the untruncated: 30
    ctx = context(efforts=torch.tensor([1.0, 1.0, 0.5, 0.5]))
    shaped, _, metrics = EffortShaper(mean="group")(ctx)
    # a: 10 <= 15 pays, 20 > 15 (reward 0 anyway); b: 30 > 0.5 * 30 = 15 -> 0; truncated -> 0
    assert shaped.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert metrics["effort/within_frac"] == pytest.approx(0.25)


def test_effort_full_effort_mean_follows_only_top_effort_groups():
    shaper = EffortShaper(levels=[0.5, 1.0], mean="full_effort", decay=0.5)
    # step 0, nothing seen: each group is measured against its own mean. a (effort 1): mean 15 -> 10 pays, 20 not;
    # b (effort 0.5): mean 35 -> limit 17.5, neither pays. Only a (effort 1) updates the statistics: a = 15, all = 15
    first = context(lengths=torch.tensor([10.0, 20.0, 30.0, 40.0]), efforts=torch.tensor([1.0, 1.0, 0.5, 0.5]),
                    rewards=torch.ones(4), correct=torch.ones(4), truncated=torch.zeros(4, dtype=torch.bool))
    shaped, _, _ = shaper(first)
    assert shaped.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert shaper.tracker.get("a") == 15.0 and shaper.tracker.get("b") is None
    # step 1: a (effort 0.5) against its own full-effort mean 15 -> limit 7.5: 6 pays, 8 not; new prompt c (effort
    # 0.5) against the mean over all full-effort groups, 15 -> 5 pays, 10 not. Nothing at effort 1: no update
    second = context(lengths=torch.tensor([6.0, 8.0, 5.0, 10.0]), efforts=torch.tensor([0.5, 0.5, 0.5, 0.5]),
                     rewards=torch.ones(4), correct=torch.ones(4), truncated=torch.zeros(4, dtype=torch.bool), prompt_keys=["a", "a", "c", "c"])
    shaped, _, metrics = shaper(second)
    assert shaped.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert metrics["effort/mean_length"] == 15.0 and shaper.tracker.get("a") == 15.0
    # step 2: c at effort 1 (lengths 4, 8: mean 6) updates c = 6 and the overall EMA: 0.5 * 15 + 0.5 * 6 = 10.5
    third = context(lengths=torch.tensor([4.0, 8.0, 4.0, 8.0]), efforts=torch.tensor([1.0, 1.0, 1.0, 1.0]),
                    rewards=torch.ones(4), correct=torch.ones(4), truncated=torch.zeros(4, dtype=torch.bool), prompt_keys=["c", "c", "d", "d"])
    shaper(third)
    assert shaper.tracker.get("c") == 6.0 and shaper.tracker.get("d") == 6.0
    assert shaper.tracker.get(FULL_EFFORT_KEY) == pytest.approx(0.5 * (0.5 * 15 + 0.5 * 6) + 0.5 * 6)


def test_effort_draws_are_reproducible_and_from_the_levels():
    shaper = EffortShaper(levels=[0.25, 1.0], seed=3)
    first = shaper.draw(["x", "y", "z"], step=5)
    assert first == shaper.draw(["x", "y", "z"], step=5) and set(first) <= {0.25, 1.0}
    assert any(shaper.draw(["x"], step=s)[0] != first[0] for s in range(6, 20))


def test_shapers_compose_in_order_and_state_round_trips():
    ctx = context(efforts=torch.tensor([1.0, 1.0, 1.0, 1.0]))
    overlong, effort = OverlongShaper(buffer=16), EffortShaper(mean="ema", decay=0.5)
    shaped, metrics = apply_shapers([overlong, effort], ctx)
    assert "reward/overlong_penalty" in metrics and "effort/within_frac" in metrics
    # R = R_correct * 1[l <= r T] + overlong penalty. Overlong (max 40, buffer 16): 0, 0, -0.375, -1. Effort (first
    # visit: each group's own mean; a: 15, b: 30 over the untruncated row): row 0 (10 <= 15) pays 1; row 2 (30 <= 30)
    # pays 1; row 3 is truncated: its R_correct goes, its penalty stays
    assert shaped.tolist() == pytest.approx([1.0, 0.0, 1.0 - 0.375, -1.0])
    restored = EffortShaper(mean="ema", decay=0.5)
    restored.load_state_dict(json.loads(json.dumps(effort.state_dict())))
    assert restored.tracker.get("a") == effort.tracker.get("a") == 15.0


def test_bad_shaper_names_and_arguments():
    with pytest.raises(ValueError, match="unknown reward shaper"):
        build_shaper("shorter", {})
    with pytest.raises(ValueError, match="rmt_budget"):
        build_shaper("rmt_budget", {"gama": 0.5})


def test_gates_act_on_the_correctness_term_only():
    """e1 and RMT-multiplicative gate R_correct; penalties and bonuses added before them survive (issue 20.2)."""
    lengths = torch.tensor([10.0, 40.0, 12.0, 40.0])
    ctx = context(rewards=torch.tensor([1.0, 0.0, 0.0, 1.0]), correct=torch.tensor([1.0, 0.0, 0.0, 1.0]),
                  lengths=lengths, truncated=torch.tensor([False, True, False, True]),
                  efforts=torch.tensor([0.5, 0.5, 0.5, 0.5]))
    shaped, _ = apply_shapers([OverlongShaper(buffer=8), EffortShaper(mean="group")], ctx)
    # overlong (max 40, buffer 8): 0, -1, 0, -1. Effort: a's group mean over its untruncated row: 10 -> limit 5:
    # row 0 (10 > 5) loses its 1.0; b: 12 -> limit 6, row 2 wrong anyway; truncated rows lose R_correct
    assert shaped.tolist() == pytest.approx([0.0, -1.0, 0.0, -1.0])

    weighted = context(rewards=torch.tensor([2.5, 0.5, 2.5, 0.5]), correct=torch.tensor([1.0, 0.0, 1.0, 0.0]),
                       correct_reward=torch.tensor([2.0, 0.0, 2.0, 0.0]), lengths=torch.tensor([20.0, 20.0, 60.0, 10.0]),
                       truncated=torch.zeros(4, dtype=torch.bool), max_new_tokens=80)
    budget = BudgetShaper(initial=40, gamma=0.5, minimum=4, mode="multiplicative")
    shaped, correct_reward, _ = budget(weighted)
    # B = 40 at step 0: r_len = 0.5, 0.5, 2 - 1.5 = 0.5, 0.25; R = 2 * r_len + the 0.5 of another reward
    assert shaped.tolist() == pytest.approx([1.5, 0.5, 1.5, 0.5])
    assert correct_reward.tolist() == pytest.approx([1.0, 0.0, 1.0, 0.0])
