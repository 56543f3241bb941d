import json
import math

import pytest
import torch

from reasonrl.rl.length_control import (
    PromptLengthTracker,
    budget_length_reward,
    combine_length_reward,
    concise_correct_reward,
    correct_length_budget,
    curriculum_target,
    curriculum_weights,
    dual_loss,
    effort_reward,
    entropy_quantiles,
    group_mean_length,
    linear_schedule,
    ntp_token_loss,
    rmt_budget,
    select_curriculum_tokens,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ rmt budget
def test_rmt_budget_hand():
    kw = {"initial": 1000, "gamma": 0.5, "minimum": 100}
    assert rmt_budget(0, 10, **kw) == 1000.0  # gamma ** 0 = 1
    assert rmt_budget(5, 10, **kw) == pytest.approx(1000 * 0.5**0.5)  # 707.107
    assert rmt_budget(10, 10, **kw) == pytest.approx(500.0)  # t = T -> B_0 * gamma
    assert rmt_budget(25, 10, **kw) == pytest.approx(500.0)  # t clamped to T
    # ratio_pow, k = 2, t/T = .5: exponent .25 -> 1000 * .5 ** .25 = 840.896
    assert rmt_budget(5, 10, k=2.0, **kw) == pytest.approx(840.8964152537145)
    # literal, k = 2: exponent t / T^2 = 5/100 = .05 -> 965.936; at t = T: 10/100 = .1 -> 933.033
    assert rmt_budget(5, 10, k=2.0, variant="literal", **kw) == pytest.approx(1000 * 0.5**0.05)
    assert rmt_budget(10, 10, k=2.0, variant="literal", **kw) == pytest.approx(1000 * 0.5**0.1)
    # k = 1: both variants are B_0 * gamma ** (t / T)
    assert rmt_budget(3, 10, variant="literal", **kw) == pytest.approx(rmt_budget(3, 10, **kw))
    # B_min: 1000 * .01 = 10 < 100 -> 100; gamma = 1 -> constant
    assert rmt_budget(10, 10, initial=1000, gamma=0.01, minimum=100) == 100.0
    assert rmt_budget(7, 10, initial=640, gamma=1.0, minimum=1) == 640.0


def test_rmt_budget_tensor_initial():
    # per-prompt B_0 = [1000, 200], t = T, gamma .5 -> [500, 100] -> floor at B_min 150 -> [500, 150]
    out = rmt_budget(10, 10, initial=torch.tensor([1000.0, 200.0]), gamma=0.5, minimum=150)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([500.0, 150.0]))
    b0 = torch.tensor([[300.0, 40.0]], dtype=torch.float64)
    out0 = rmt_budget(0, 7, initial=b0, gamma=0.3, minimum=1)
    assert out0.dtype == torch.float64 and out0.shape == (1, 2)
    torch.testing.assert_close(out0, b0)  # t = 0 gives the initial budgets
    for t in range(12):  # tensor path agrees with the float path element-wise
        vals = rmt_budget(t, 9, initial=b0, gamma=0.3, minimum=50, k=1.7)
        ref = [rmt_budget(t, 9, initial=float(x), gamma=0.3, minimum=50, k=1.7) for x in b0.flatten().tolist()]
        torch.testing.assert_close(vals.flatten(), torch.tensor(ref, dtype=torch.float64))


def test_rmt_budget_monotone_non_increasing():
    for variant in ("ratio_pow", "literal"):
        seq = [rmt_budget(t, 50, initial=4096, gamma=0.25, minimum=256, k=0.5, variant=variant) for t in range(60)]
        assert all(b >= a for a, b in zip(seq[1:], seq[:-1])) and min(seq) >= 256


def test_rmt_budget_bad_args():
    kw = {"initial": 100, "gamma": 0.5, "minimum": 1}
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            rmt_budget(1, 10, **{**kw, "gamma": bad})
    with pytest.raises(ValueError, match="minimum"):
        rmt_budget(1, 10, **{**kw, "minimum": 0.5})
    with pytest.raises(ValueError, match="step"):
        rmt_budget(-1, 10, **kw)
    with pytest.raises(ValueError, match="total_steps"):
        rmt_budget(1, 0, **kw)
    with pytest.raises(ValueError, match="k must"):
        rmt_budget(1, 10, k=0.0, **kw)
    with pytest.raises(ValueError, match="variant"):
        rmt_budget(1, 10, variant="pow", **kw)
    with pytest.raises(ValueError, match="initial"):
        rmt_budget(1, 10, initial=0, gamma=0.5, minimum=1)
    with pytest.raises(ValueError, match="initial"):
        rmt_budget(1, 10, initial=torch.tensor([10.0, -1.0]), gamma=0.5, minimum=1)
    with pytest.raises(ValueError, match="step"):
        rmt_budget(True, 10, **kw)


# ------------------------------------------------------------------------------------------------ length reward
def test_budget_length_reward_hand():
    # B = 10: 0/10 = 0, 5/10 = .5, 10/10 = 1, 2 - 15/10 = .5, 2 - 20/10 = 0, 25 > 2B -> 0
    lengths = torch.tensor([0, 5, 10, 15, 20, 25])
    exp = torch.tensor([0.0, 0.5, 1.0, 0.5, 0.0, 0.0])
    torch.testing.assert_close(budget_length_reward(lengths, 10), exp)
    torch.testing.assert_close(budget_length_reward(lengths, 10, shape="peak"), exp)
    # per-row budgets [4, 8]: 2/4 = .5; 2 - 12/8 = .5
    torch.testing.assert_close(budget_length_reward([2, 12], torch.tensor([4.0, 8.0])), torch.tensor([0.5, 0.5]))


def _naive_rise_fall(length, budget):
    if length <= budget:
        return length / budget
    if length <= 2 * budget:
        return max(0.0, 2 - length / budget)
    return 0.0


def test_budget_length_reward_naive_reference():
    g = _gen(0)
    lengths = torch.randint(0, 400, (200,), generator=g).double()
    budgets = torch.rand(200, generator=g, dtype=torch.float64) * 150 + 1
    ref = torch.tensor([_naive_rise_fall(x, b) for x, b in zip(lengths.tolist(), budgets.tolist())], dtype=torch.float64)
    out = budget_length_reward(lengths, budgets)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    # the "peak" reading, 1 - |l - B| / B clipped at 0, is the same function
    peak = [max(0.0, 1 - abs(x - b) / b) for x, b in zip(lengths.tolist(), budgets.tolist())]
    peak = torch.tensor(peak, dtype=torch.float64)
    torch.testing.assert_close(budget_length_reward(lengths, budgets, shape="peak"), peak, atol=1e-12, rtol=0)


def test_budget_length_reward_bad_args():
    with pytest.raises(ValueError, match="budget"):
        budget_length_reward([1, 2], 0)
    with pytest.raises(ValueError, match="budget"):
        budget_length_reward([1, 2], torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="budget shape"):
        budget_length_reward([1, 2], torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        budget_length_reward([1, -2], 5)
    with pytest.raises(ValueError, match="shape must be"):
        budget_length_reward([1, 2], 5, shape="triangle")


# ------------------------------------------------------------------------------------------------ combination
def test_combine_length_reward_hand():
    correct = torch.tensor([True, False, True, False])
    r_len = torch.tensor([0.5, 0.8, 1.0, 0.2])
    # additive, only when correct: 1 + .5*.5 = 1.25; 0 (zeroed); 1 + .5*1 = 1.5; 0
    torch.testing.assert_close(combine_length_reward(correct, r_len), torch.tensor([1.25, 0.0, 1.5, 0.0]))
    # additive, always: 1.25; 0 + .5*.8 = .4; 1.5; 0 + .5*.2 = .1
    torch.testing.assert_close(
        combine_length_reward(correct, r_len, only_when_correct=False), torch.tensor([1.25, 0.4, 1.5, 0.1])
    )
    # multiplicative: c * r_len (weight unused)
    torch.testing.assert_close(
        combine_length_reward(correct, r_len, mode="multiplicative", weight=3.0), torch.tensor([0.5, 0.0, 1.0, 0.0])
    )


def test_combine_length_reward_naive_reference():
    g = _gen(1)
    correct = (torch.rand(64, generator=g) < 0.5).float()
    r_len = torch.rand(64, generator=g)
    for only in (True, False):
        ref = [c + 0.3 * (r if (c > 0 or not only) else 0.0) for c, r in zip(correct.tolist(), r_len.tolist())]
        out = combine_length_reward(correct, r_len, weight=0.3, only_when_correct=only)
        torch.testing.assert_close(out, torch.tensor(ref))
    ref = [c * r for c, r in zip(correct.tolist(), r_len.tolist())]
    torch.testing.assert_close(combine_length_reward(correct, r_len, mode="multiplicative"), torch.tensor(ref))


def test_combine_length_reward_bad_args():
    with pytest.raises(ValueError, match="mode"):
        combine_length_reward([1.0], [0.5], mode="max")
    with pytest.raises(ValueError, match="weight"):
        combine_length_reward([1.0], [0.5], weight=-1)
    with pytest.raises(ValueError, match="correct shape"):
        combine_length_reward([1.0, 0.0], [0.5])


# ------------------------------------------------------------------------------------------------ correct-length budget
def test_correct_length_budget_hand():
    # G = 3. g0 lengths [10, 20, 30], correct [1, 0, 1] -> {10, 30}: max 30, median (10 + 30) / 2 = 20
    # g1 none correct -> fallback 99. g2 [8, 4, 2] all correct: max 8, median 4
    lengths = torch.tensor([10, 20, 30, 5, 6, 7, 8, 4, 2])
    correct = torch.tensor([1, 0, 1, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    torch.testing.assert_close(correct_length_budget(lengths, correct, 3, fallback=99.0), torch.tensor([30.0, 99, 8]))
    torch.testing.assert_close(
        correct_length_budget(lengths, correct, 3, quantile=0.5, fallback=99.0), torch.tensor([20.0, 99, 4])
    )
    # quantile .25 of {10, 30}: position .25 * 1 -> 10 + .25 * 20 = 15; of {2, 4, 8}: position .5 -> 2 + .5 * 2 = 3
    torch.testing.assert_close(
        correct_length_budget(lengths, correct, 3, quantile=0.25, fallback=1.0), torch.tensor([15.0, 1, 3])
    )


def _naive_quantile(values, q):
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@pytest.mark.parametrize("quantile", [0.0, 0.3, 0.9, 1.0])
def test_correct_length_budget_naive_reference(quantile):
    g = _gen(2)
    group_size, groups = 6, 40
    lengths = torch.randint(1, 500, (groups * group_size,), generator=g).double()
    correct = torch.rand(groups * group_size, generator=g) < 0.3
    ref = []
    for p in range(groups):
        rows = range(p * group_size, (p + 1) * group_size)
        vals = [lengths[i].item() for i in rows if correct[i]]
        ref.append(_naive_quantile(vals, quantile) if vals else 123.0)
    out = correct_length_budget(lengths, correct, group_size, quantile=quantile, fallback=123.0)
    assert out.dtype == torch.float64 and out.shape == (groups,)
    torch.testing.assert_close(out, torch.tensor(ref, dtype=torch.float64))


def test_correct_length_budget_bad_args():
    with pytest.raises(ValueError, match="divisible"):
        correct_length_budget([1, 2, 3], [1, 1, 1], 2, fallback=1.0)
    with pytest.raises(ValueError, match="quantile"):
        correct_length_budget([1, 2], [1, 1], 2, quantile=1.5, fallback=1.0)
    with pytest.raises(ValueError, match="fallback"):
        correct_length_budget([1, 2], [1, 1], 2, fallback=0.0)
    with pytest.raises(ValueError, match="group_size"):
        correct_length_budget([1, 2], [1, 1], 0, fallback=1.0)
    with pytest.raises(TypeError):
        correct_length_budget([1, 2], [1, 1], 2)  # fallback is required


# ------------------------------------------------------------------------------------------------ e1 effort reward
def test_effort_reward_hand():
    # effort .5, mean 100 -> tau = 50; band .2 -> zero at (.5 + .2) * 100 = 70
    lengths = torch.tensor([40.0, 50, 60, 70, 80])
    ones = torch.ones(5)
    effort, mean = torch.full((5,), 0.5), torch.full((5,), 100.0)
    torch.testing.assert_close(effort_reward(ones, lengths, effort, mean), torch.tensor([1.0, 1, 0, 0, 0]))
    # band .2: 60 -> (70 - 60) / (.2 * 100) = .5; 70 -> 0
    torch.testing.assert_close(effort_reward(ones, lengths, effort, mean, band=0.2), torch.tensor([1.0, 1, 0.5, 0, 0]))
    # incorrect row 1 and truncated row 0 -> 0
    correct = torch.tensor([True, False, True, True, True])
    truncated = torch.tensor([True, False, False, False, False])
    out = effort_reward(correct, lengths, effort, mean, band=0.2, truncated=truncated)
    torch.testing.assert_close(out, torch.tensor([0.0, 0, 0.5, 0, 0]))
    # scalar effort / mean broadcast; mean 0 rewards only l = 0 (no NaN from the band)
    torch.testing.assert_close(effort_reward(ones[:2], [0, 3], 1.0, 0.0, band=0.5), torch.tensor([1.0, 0.0]))


def _naive_effort(c, length, r, mean, band, trunc):
    if trunc:
        return 0.0
    tau = r * mean
    if length <= tau:
        return c
    if band > 0 and length <= (r + band) * mean:
        return c * ((r + band) * mean - length) / (band * mean)
    return 0.0


@pytest.mark.parametrize("band", [0.0, 0.1, 0.5])
def test_effort_reward_naive_reference(band):
    g = _gen(3)
    n, group_size = 48, 4
    lengths = torch.randint(0, 800, (n,), generator=g).double()
    correct = (torch.rand(n, generator=g) < 0.6).double()
    effort = torch.tensor([0.125, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)[torch.randint(0, 5, (n // group_size,),
                                                                                          generator=g)]
    effort = effort.repeat_interleave(group_size)  # per prompt, broadcast to its rows
    mean = group_mean_length(lengths, group_size).repeat_interleave(group_size)
    truncated = torch.rand(n, generator=g) < 0.1
    ref = [
        _naive_effort(*args, band, t)
        for *args, t in zip(correct.tolist(), lengths.tolist(), effort.tolist(), mean.tolist(), truncated.tolist())
    ]
    out = effort_reward(correct, lengths, effort, mean, band=band, truncated=truncated)
    torch.testing.assert_close(out, torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=0)
    assert ((out >= 0) & (out <= 1)).all()


def test_effort_reward_band_zero_vs_band():
    # the smooth variant is >= the indicator everywhere and equal outside the band
    lengths = torch.arange(0, 200).float()
    hard = effort_reward(torch.ones(200), lengths, 0.5, 200.0)
    smooth = effort_reward(torch.ones(200), lengths, 0.5, 200.0, band=0.25)
    assert (smooth >= hard).all()
    outside = (lengths <= 100) | (lengths >= 150)
    torch.testing.assert_close(smooth[outside], hard[outside])
    assert ((smooth[(lengths > 100) & (lengths < 150)] > 0) & (smooth[(lengths > 100) & (lengths < 150)] < 1)).all()


def test_effort_reward_bad_args():
    with pytest.raises(ValueError, match="effort"):
        effort_reward([1.0], [1.0], 0.0, 10.0)
    with pytest.raises(ValueError, match="effort"):
        effort_reward([1.0], [1.0], 1.5, 10.0)
    with pytest.raises(ValueError, match="mean_length"):
        effort_reward([1.0], [1.0], 0.5, -1.0)
    with pytest.raises(ValueError, match="band"):
        effort_reward([1.0], [1.0], 0.5, 10.0, band=-0.1)
    with pytest.raises(ValueError, match="truncated shape"):
        effort_reward([1.0], [1.0], 0.5, 10.0, truncated=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="think_lengths"):
        effort_reward([1.0], [-1.0], 0.5, 10.0)


# ------------------------------------------------------------------------------------------------ group mean length
def test_group_mean_length_hand():
    lengths = torch.tensor([10, 20, 30, 5, 7, 9, 100, 200, 300])
    # no truncation: (10+20+30)/3 = 20, (5+7+9)/3 = 7, 200
    torch.testing.assert_close(group_mean_length(lengths, 3), torch.tensor([20.0, 7, 200]))
    # row 2 truncated -> (10+20)/2 = 15; group 2 all truncated -> cap 512
    truncated = torch.tensor([0, 0, 1, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    torch.testing.assert_close(group_mean_length(lengths, 3, truncated=truncated, cap=512), torch.tensor([15.0, 7, 512]))
    with pytest.raises(ValueError, match="cap"):
        group_mean_length(lengths, 3, truncated=truncated)


def test_group_mean_length_naive_reference():
    g = _gen(4)
    group_size, groups = 5, 30
    lengths = torch.randint(0, 1000, (group_size * groups,), generator=g).double()
    truncated = torch.rand(group_size * groups, generator=g) < 0.4
    truncated[:group_size] = True  # at least one fully truncated group
    ref = []
    for p in range(groups):
        kept = [lengths[i].item() for i in range(p * group_size, (p + 1) * group_size) if not truncated[i]]
        ref.append(sum(kept) / len(kept) if kept else 4096.0)
    out = group_mean_length(lengths, group_size, truncated=truncated, cap=4096)
    torch.testing.assert_close(out, torch.tensor(ref, dtype=torch.float64))


def test_group_mean_length_bad_args():
    with pytest.raises(ValueError, match="divisible"):
        group_mean_length([1, 2, 3], 2)
    with pytest.raises(ValueError, match="cap"):
        group_mean_length([1, 2], 2, cap=0)
    with pytest.raises(ValueError, match="lengths must be 1-D"):
        group_mean_length(torch.ones(2, 2), 2)


# ------------------------------------------------------------------------------------------------ prompt length tracker
def test_prompt_length_tracker_ema():
    tr = PromptLengthTracker(decay=0.9)
    tr.update(["a"], [100.0])
    assert tr.get("a") == 100.0  # first value taken as is
    tr.update(["a", "b"], [200.0, 10.0])
    assert tr.get("a") == pytest.approx(110.0)  # .9 * 100 + .1 * 200
    tr.update(["a"], [0.0])
    assert tr.get("a") == pytest.approx(99.0)  # .9 * 110 + .1 * 0
    tr.update(["b", "b"], [20.0, 30.0])  # in order: .9*10 + .1*20 = 11, then .9*11 + .1*30 = 12.9
    assert tr.get("b") == pytest.approx(12.9)
    assert tr.get("missing") is None and tr.get("missing", 7.0) == 7.0
    assert "a" in tr and "c" not in tr and len(tr) == 2
    tr.update(["c"], torch.tensor([5.0]))  # tensors of values work too
    assert tr.get("c") == 5.0
    zero = PromptLengthTracker(decay=0.0)  # decay 0 keeps the latest value
    zero.update(["x", "x"], [1.0, 3.0])
    assert zero.get("x") == 3.0


def test_prompt_length_tracker_state_round_trip():
    tr = PromptLengthTracker(decay=0.8)
    tr.update(["p1", "p2", "p1"], [100.0, 50.0, 200.0])
    state = json.loads(json.dumps(tr.state_dict()))
    other = PromptLengthTracker(decay=0.8)
    other.load_state_dict(state)
    assert other.state_dict() == tr.state_dict()
    assert other.get("p1") == pytest.approx(0.8 * 100 + 0.2 * 200)
    other.update(["p1"], [0.0])
    tr.update(["p1"], [0.0])
    assert other.get("p1") == tr.get("p1")
    # load replaces, and keeps the constructor's decay
    third = PromptLengthTracker(decay=0.5)
    third.update(["old"], [1.0])
    third.load_state_dict(state)
    assert "old" not in third and third.decay == 0.5


def test_prompt_length_tracker_bad_args():
    with pytest.raises(ValueError, match="decay"):
        PromptLengthTracker(decay=1.0)
    tr = PromptLengthTracker()
    with pytest.raises(ValueError, match="keys"):
        tr.update(["a", "b"], [1.0])
    with pytest.raises(TypeError, match="strings"):
        tr.update([3], [1.0])
    with pytest.raises(ValueError, match="finite"):
        tr.update(["a", "b"], [1.0, float("inf")])
    with pytest.raises(ValueError, match="NaN"):
        tr.update(["a"], [float("nan")])
    assert len(tr) == 0  # a rejected update changes nothing
    with pytest.raises(TypeError, match="means"):
        tr.load_state_dict({"decay": 0.9})
    with pytest.raises(ValueError, match="means"):
        tr.load_state_dict({"means": {"a": "x"}})


# ------------------------------------------------------------------------------------------------ DRQA concise reward
def test_concise_correct_reward_hand():
    # lam .5: l 50 / ref 100 -> 1 + .5 * .5 = 1.25; l = ref -> 1; l > ref -> 1 (bonus clipped at 0);
    # incorrect -> 0; ref 0 and ref NaN -> no reference -> c = 1
    correct = torch.tensor([1, 1, 1, 0, 1, 1])
    lengths = torch.tensor([50, 100, 150, 50, 50, 50])
    ref = torch.tensor([100, 100, 100, 100, 0, float("nan")])
    torch.testing.assert_close(concise_correct_reward(correct, lengths, ref), torch.tensor([1.25, 1, 1, 0, 1, 1]))
    # lam 0 -> the correctness reward itself; l = 0 -> full bonus 1 + lam
    torch.testing.assert_close(concise_correct_reward(correct, lengths, ref, lam=0.0), correct.float())
    torch.testing.assert_close(concise_correct_reward([1.0], [0.0], 10.0, lam=2.0), torch.tensor([3.0]))


def test_concise_correct_reward_naive_reference():
    g = _gen(5)
    n = 100
    correct = (torch.rand(n, generator=g) < 0.5).double()
    lengths = torch.randint(0, 300, (n,), generator=g).double()
    ref = torch.randint(-20, 300, (n,), generator=g).double()
    ref[::7] = float("nan")
    expected = []
    for c, length, r in zip(correct.tolist(), lengths.tolist(), ref.tolist()):
        has_ref = not math.isnan(r) and r > 0
        expected.append(c * (1 + 0.7 * max(0.0, 1 - length / r)) if has_ref else c)
    out = concise_correct_reward(correct, lengths, ref, lam=0.7)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)


def test_concise_correct_reward_bad_args():
    with pytest.raises(ValueError, match="lam"):
        concise_correct_reward([1.0], [1.0], [1.0], lam=-0.5)
    with pytest.raises(ValueError, match="inf"):
        concise_correct_reward([1.0], [1.0], [float("inf")])
    with pytest.raises(ValueError, match="ref_lengths shape"):
        concise_correct_reward([1.0], [1.0], [1.0, 2.0])


# ------------------------------------------------------------------------------------------------ curriculum
def test_curriculum_target_endpoints():
    assert curriculum_target(0.0) == 0.2  # start exactly
    assert curriculum_target(1.0) == 0.9  # end exactly
    assert curriculum_target(0.5) == pytest.approx(0.55)  # .2 + .5 * .7
    assert curriculum_target(2.0) == 0.9 and curriculum_target(-1.0) == 0.2  # clamped
    assert curriculum_target(0.25, start=0.0, end=1.0) == 0.25
    with pytest.raises(ValueError, match="start"):
        curriculum_target(0.5, start=-0.1)
    with pytest.raises(ValueError, match="progress"):
        curriculum_target(float("nan"))


def test_entropy_quantiles_hand():
    # masked values [.3, .1, .5, .1] (M = 4, sorted .1 .1 .3 .5): .1 -> ranks 0,1 averaged .5 -> .5/3 = 1/6;
    # .3 -> rank 2 -> 2/3; .5 -> rank 3 -> 1; unmasked -> 0 (even NaN)
    entropy = torch.tensor([[0.3, 0.1, 0.5], [0.1, 9.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    exp = torch.tensor([[2 / 3, 1 / 6, 1.0], [1 / 6, 0.0, 0.0]])
    torch.testing.assert_close(entropy_quantiles(entropy, mask), exp)
    # all tied -> .5; a single masked token -> .5; nothing masked -> zeros
    torch.testing.assert_close(entropy_quantiles(torch.ones(2, 2), torch.ones(2, 2)), torch.full((2, 2), 0.5))
    torch.testing.assert_close(entropy_quantiles(torch.tensor([[4.0, 1.0]]), torch.tensor([[0, 1]])),
                               torch.tensor([[0.0, 0.5]]))
    torch.testing.assert_close(entropy_quantiles(torch.ones(2, 3), torch.zeros(2, 3)), torch.zeros(2, 3))


def test_entropy_quantiles_naive_reference():
    g = _gen(6)
    entropy = torch.randint(0, 12, (6, 9), generator=g).double() / 4  # many ties
    mask = torch.rand(6, 9, generator=g) < 0.7
    vals = entropy[mask].tolist()
    m = len(vals)
    exp = torch.zeros(6, 9, dtype=torch.float64)
    for i in range(6):
        for j in range(9):
            if mask[i, j]:
                h = entropy[i, j].item()
                below = sum(v < h for v in vals)
                equal = sum(v == h for v in vals)
                exp[i, j] = (below + (equal - 1) / 2) / (m - 1)
    out = entropy_quantiles(entropy, mask)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, exp, atol=1e-12, rtol=0)
    assert out[mask].min() >= 0 and out[mask].max() <= 1


def test_entropy_quantiles_bad_args():
    with pytest.raises(ValueError, match="mask shape"):
        entropy_quantiles(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        entropy_quantiles(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2))


def test_curriculum_weights_hand():
    # progress 0 -> mu .2, width .15 (2 s^2 = .045): q = .2 -> 1; q = .35 -> exp(-.0225/.045) = exp(-.5);
    # q = .05 -> exp(-.5); unmasked -> 0
    q = torch.tensor([[0.2, 0.35, 0.05, 0.9]])
    mask = torch.tensor([[1, 1, 1, 0]])
    e = math.exp(-0.5)
    torch.testing.assert_close(curriculum_weights(q, mask, 0.0), torch.tensor([[1.0, e, e, 0.0]]))
    # progress 1 -> mu .9: q = .9 -> 1
    w1 = curriculum_weights(q, torch.ones(1, 4), 1.0)
    assert w1[0, 3] == 1.0 and w1[0, 0] == pytest.approx(math.exp(-0.49 / 0.045))
    with pytest.raises(ValueError, match="width"):
        curriculum_weights(q, mask, 0.0, width=0.0)


def test_curriculum_weights_naive_reference():
    g = _gen(7)
    q = torch.rand(5, 11, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 11, generator=g) < 0.6
    progress, width = 0.37, 0.2
    mu = 0.2 + 0.37 * 0.7
    exp = torch.tensor([[math.exp(-((q[i, j].item() - mu) ** 2) / (2 * width**2)) if mask[i, j] else 0.0
                         for j in range(11)] for i in range(5)], dtype=torch.float64)
    torch.testing.assert_close(curriculum_weights(q, mask, progress, width=width), exp)


def test_select_curriculum_tokens_counts():
    g = _gen(8)
    entropy = torch.rand(4, 10, generator=g)
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[0, 5:] = False  # M = 35
    full = select_curriculum_tokens(entropy, mask, 0.3, fraction=1.0)
    assert torch.equal(full, mask)  # fraction 1 keeps every masked token
    half = select_curriculum_tokens(entropy, mask, 0.3, fraction=0.5, generator=_gen(0))
    assert int(half.sum()) == 18  # floor(17.5 + .5) = 18
    assert not (half & ~mask).any()  # only masked tokens
    tiny = select_curriculum_tokens(entropy, mask, 0.3, fraction=0.001, generator=_gen(0))
    assert int(tiny.sum()) == 1  # round(.035) = 0 -> at least one
    none = select_curriculum_tokens(entropy, torch.zeros_like(mask), 0.3, fraction=0.5)
    assert not none.any()
    # same generator seed -> same selection
    again = select_curriculum_tokens(entropy, mask, 0.3, fraction=0.5, generator=_gen(0))
    assert torch.equal(again, half)
    with pytest.raises(ValueError, match="fraction"):
        select_curriculum_tokens(entropy, mask, 0.3, fraction=0.0)


def test_select_curriculum_tokens_moves_easy_to_hard():
    entropy = torch.randperm(2000, generator=_gen(9)).float().view(20, 100)  # distinct: quantile = value / 1999
    mask = torch.ones(20, 100, dtype=torch.bool)
    q = entropy / 1999
    early = select_curriculum_tokens(entropy, mask, 0.0, fraction=0.1, generator=_gen(1))
    late = select_curriculum_tokens(entropy, mask, 1.0, fraction=0.1, generator=_gen(1))
    assert int(early.sum()) == int(late.sum()) == 200
    assert 0.15 < q[early].mean() < 0.3  # around mu_0 = .2
    assert 0.75 < q[late].mean() < 0.9  # around mu_1 = .9 (pulled down by the edge at 1)


def test_select_curriculum_tokens_tiny_width():
    # q = 0, .1, ..., 1 and mu = .2: with width 1e-3 every other weight underflows; the q = .2 token (weight 1)
    # must come first, the rest are drawn among the floored weights instead of failing
    entropy = torch.arange(11.0).view(1, 11)
    mask = torch.ones(1, 11, dtype=torch.bool)
    for seed in range(5):
        sel = select_curriculum_tokens(entropy, mask, 0.0, fraction=3 / 11, width=1e-3, generator=_gen(seed))
        assert int(sel.sum()) == 3 and bool(sel[0, 2])


# ------------------------------------------------------------------------------------------------ dual loss
def test_ntp_token_loss_hand():
    # chosen log-probs -1, -2, -3 -> NLL mean (1 + 2 + 3) / 3 = 2; unmasked NaN / -inf ignored
    logp = torch.tensor([[-1.0, -2.0, float("nan")], [-3.0, -float("inf"), -5.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    loss = ntp_token_loss(logp, mask)
    torch.testing.assert_close(loss, torch.tensor(2.0))
    loss.backward()
    exp_grad = torch.where(mask, torch.full((2, 3), -1 / 3), torch.zeros(2, 3))
    torch.testing.assert_close(logp.grad, exp_grad)
    empty = ntp_token_loss(logp, torch.zeros_like(mask))
    assert empty.item() == 0.0 and empty.requires_grad


def test_ntp_token_loss_naive_reference():
    g = _gen(10)
    logp = -torch.rand(7, 13, generator=g, dtype=torch.float64) * 5
    mask = torch.rand(7, 13, generator=g) < 0.5
    chosen = [-logp[i, j].item() for i in range(7) for j in range(13) if mask[i, j]]
    torch.testing.assert_close(ntp_token_loss(logp, mask), torch.tensor(sum(chosen) / len(chosen), dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        ntp_token_loss(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="mask shape"):
        ntp_token_loss(torch.ones(2, 3), torch.ones(3, 2))


def test_ntp_token_loss_micro_batches_add_up_with_the_global_count():
    g = _gen(11)
    logp = -torch.rand(6, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 5, generator=g) < 0.6
    whole = ntp_token_loss(logp, mask)
    parts = sum(ntp_token_loss(logp[k : k + 2], mask[k : k + 2], num_tokens=mask.sum()) for k in range(0, 6, 2))
    torch.testing.assert_close(parts, whole)


def test_dual_loss():
    rl = torch.tensor(0.7, requires_grad=True)
    logp = torch.tensor([[-1.0, -2.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True]])
    ntp = ntp_token_loss(logp, mask)  # (1 + 4) / 2 = 2.5
    assert dual_loss(rl, ntp).item() == pytest.approx(3.2)  # .7 + 2.5
    assert dual_loss(rl, ntp, rl_weight=2.0, ntp_weight=0.5).item() == pytest.approx(2.65)  # 1.4 + 1.25
    # ntp_weight = 0: exactly the RL loss, even with a NaN NTP term, and no gradient reaches the NTP inputs
    only_rl = dual_loss(rl, torch.tensor(float("nan")), ntp_weight=0.0)
    assert torch.equal(only_rl, rl)
    # rl_weight = 0: exactly the NTP loss on the chosen tokens
    only_ntp = dual_loss(torch.tensor(float("nan")), ntp, rl_weight=0.0)
    assert torch.equal(only_ntp, ntp) and only_ntp.item() == 2.5
    only_ntp.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 0.0, -0.5]]))
    with pytest.raises(ValueError, match="both"):
        dual_loss(rl, ntp, rl_weight=0.0, ntp_weight=0.0)
    with pytest.raises(ValueError, match="ntp_weight"):
        dual_loss(rl, ntp, ntp_weight=-1.0)


def test_linear_schedule():
    assert linear_schedule(0, 10, start=0.1, end=0.3) == 0.1  # exact start
    assert linear_schedule(10, 10, start=0.1, end=0.3) == 0.3  # exact end (0.1 + 0.2 * 1 would be 0.30000000000000004)
    assert linear_schedule(15, 10, start=0.1, end=0.3) == 0.3  # clamped past T
    assert linear_schedule(5, 10, start=1.0, end=0.0) == pytest.approx(0.5)
    assert linear_schedule(3, 4, start=-2.0, end=2.0) == pytest.approx(1.0)  # -2 + .75 * 4
    with pytest.raises(ValueError, match="step"):
        linear_schedule(-1, 10, start=0.0, end=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        linear_schedule(1, 0.5, start=0.0, end=1.0)
    with pytest.raises(ValueError, match="end"):
        linear_schedule(1, 10, start=0.0, end=float("inf"))
