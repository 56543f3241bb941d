import pytest
import torch

from reasonrl.rl.shaping import groups_with_signal, kl_reward_penalty, overlong_penalty, truncated_mask


# ------------------------------------------------------------------------------------------------ overlong penalty
def test_overlong_hand():
    # max_len 10, buffer 4 -> soft zone starts at 6: L=6 -> 0; 7 -> (6-7)/4 = -.25; 8 -> -.5; 9 -> -.75; 10 -> -1;
    # L=12 (> max_len) -> -1; with factor .5 every value halves
    lengths = torch.tensor([0, 3, 6, 7, 8, 9, 10, 12])
    exp = torch.tensor([0, 0, 0, -0.25, -0.5, -0.75, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, max_len=10, buffer=4), exp)
    torch.testing.assert_close(overlong_penalty(lengths, max_len=10, buffer=4, factor=0.5), exp / 2)
    # buffer == max_len: the soft zone is the whole range, L/max_len
    torch.testing.assert_close(overlong_penalty([0, 5, 10], max_len=10, buffer=10), torch.tensor([0, -0.5, -1.0]))


def _naive_overlong(length, max_len, buffer, factor):
    if length <= max_len - buffer:
        return 0.0
    if length <= max_len:
        return ((max_len - buffer) - length) / buffer * factor
    return -factor


@pytest.mark.parametrize(("max_len", "buffer", "factor"), [(20, 5, 1.0), (20, 20, 0.3), (7, 1, 2.0)])
def test_overlong_naive_reference(max_len, buffer, factor):
    lengths = torch.randint(0, max_len + 4, (50,), generator=torch.Generator().manual_seed(max_len + buffer))
    ref = torch.tensor([_naive_overlong(x, max_len, buffer, factor) for x in lengths.tolist()], dtype=torch.float64)
    out = overlong_penalty(lengths.double(), max_len=max_len, buffer=buffer, factor=factor)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    out32 = overlong_penalty(lengths, max_len=max_len, buffer=buffer, factor=factor)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, ref.float())
    # monotone non-increasing in length and bounded in [-factor, 0]
    sweep = overlong_penalty(torch.arange(max_len + 3), max_len=max_len, buffer=buffer, factor=factor)
    assert (sweep[1:] <= sweep[:-1]).all() and sweep.min() >= -factor and sweep.max() <= 0


def test_overlong_matches_verl_min_form():
    # verl: min(-(L - (max_len - buffer)) / buffer * factor, 0) for L <= max_len
    lengths = torch.arange(0, 33)
    verl = torch.clamp(-(lengths - (32 - 8)) / 8 * 1.5, max=0.0)
    torch.testing.assert_close(overlong_penalty(lengths, max_len=32, buffer=8, factor=1.5), verl.float())


def test_overlong_bad_args():
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.ones(2), max_len=10, buffer=0)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.ones(2), max_len=10, buffer=11)
    with pytest.raises(ValueError, match="max_len"):
        overlong_penalty(torch.ones(2), max_len=0, buffer=1)
    with pytest.raises(ValueError, match="factor"):
        overlong_penalty(torch.ones(2), max_len=10, buffer=2, factor=-1.0)
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        overlong_penalty(torch.tensor([1, -1]), max_len=10, buffer=2)
    with pytest.raises(ValueError, match="lengths must be 1-D"):
        overlong_penalty(torch.ones(2, 2), max_len=10, buffer=2)


# ------------------------------------------------------------------------------------------------ truncated mask
def test_truncated_mask():
    m = truncated_mask(["stop", "length", "stop", None, "length", "abort"])
    assert m.dtype == torch.bool
    assert m.tolist() == [False, True, False, False, True, False]
    assert truncated_mask([]).shape == (0,)
    with pytest.raises(TypeError, match="finish_reasons"):
        truncated_mask("length")


# ------------------------------------------------------------------------------------------------ groups with signal
def test_groups_with_signal_hand():
    # g0 [1,1,1] all equal -> False; g1 [1,0,1] -> True; g2 [1, nan(invalid), 0(invalid)] one valid -> False;
    # g3 [.5, .5, 2(invalid)] valid ones equal -> False; g4 [0, 0, 1e-9] differ -> True (exact comparison)
    r = torch.tensor([1.0, 1, 1, 1, 0, 1, 1, float("nan"), 0, 0.5, 0.5, 2, 0, 0, 1e-9], dtype=torch.float64)
    valid = torch.ones(15, dtype=torch.bool)
    valid[[7, 8, 11]] = False
    out = groups_with_signal(r, valid, group_size=3)
    assert out.tolist() == [False, True, False, False, True]
    # with a tolerance the 1e-9 spread no longer counts
    assert groups_with_signal(r, valid, group_size=3, atol=1e-6).tolist() == [False, True, False, False, False]
    # valid=None: all samples valid
    assert groups_with_signal(torch.tensor([1, 1, 0, 1]), None, group_size=2).tolist() == [False, True]


def _naive_signal(r, valid, g):
    out = []
    for s in range(0, len(r), g):
        vals = [r[i] for i in range(s, s + g) if valid[i]]
        out.append(len(vals) >= 2 and len(set(vals)) > 1)
    return out


@pytest.mark.parametrize("g", [1, 2, 4])
def test_groups_with_signal_naive_and_permutation(g):
    gen = torch.Generator().manual_seed(g)
    r = torch.randint(0, 2, (10 * g,), generator=gen).float()
    valid = torch.rand(10 * g, generator=gen) > 0.3
    out = groups_with_signal(r, valid, group_size=g)
    assert out.tolist() == _naive_signal(r.tolist(), valid.tolist(), g)
    perm = torch.cat([torch.randperm(g, generator=gen) + g * k for k in range(10)])
    assert torch.equal(groups_with_signal(r[perm], valid[perm], group_size=g), out)
    # invalid rewards do not matter
    r2 = torch.where(valid, r, torch.full_like(r, float("nan")))
    assert torch.equal(groups_with_signal(r2, valid, group_size=g), out)


def test_groups_with_signal_bad_args():
    with pytest.raises(ValueError, match="divisible"):
        groups_with_signal(torch.zeros(5), None, group_size=2)
    with pytest.raises(ValueError, match="valid shape"):
        groups_with_signal(torch.zeros(4), torch.ones(3, dtype=torch.bool), group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        groups_with_signal(torch.zeros(4), None, group_size=0)
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        groups_with_signal(torch.zeros(2, 2), None, group_size=2)
    with pytest.raises(ValueError, match="atol"):
        groups_with_signal(torch.zeros(4), None, group_size=2, atol=-1.0)


# ------------------------------------------------------------------------------------------------ KL in reward
def test_kl_reward_penalty_hand():
    # row0: mask [1,1,0] -> (.1 + .2) * .5 = .15 (the masked NaN is ignored); row1: (1 - .5 + 2) * .5 = 1.25
    kl = torch.tensor([[0.1, 0.2, float("nan")], [1.0, -0.5, 2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(kl_reward_penalty(kl, mask, coef=0.5), torch.tensor([0.15, 1.25]))
    torch.testing.assert_close(kl_reward_penalty(kl, mask.bool(), coef=0.0), torch.zeros(2))


def test_kl_reward_penalty_naive():
    gen = torch.Generator().manual_seed(0)
    kl = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=gen) > 0.4
    ref = torch.tensor([0.01 * sum(kl[i, t].item() for t in range(7) if mask[i, t]) for i in range(5)],
                       dtype=torch.float64)
    torch.testing.assert_close(kl_reward_penalty(kl, mask, coef=0.01), ref)
    # padding (extra masked columns) changes nothing
    padded_kl = torch.cat([kl, torch.full((5, 3), 1e9, dtype=torch.float64)], 1)
    padded_mask = torch.cat([mask, torch.zeros(5, 3, dtype=torch.bool)], 1)
    torch.testing.assert_close(kl_reward_penalty(padded_kl, padded_mask, coef=0.01), ref)


def test_kl_reward_penalty_bad_args():
    with pytest.raises(ValueError, match="per_token_kl must be 2-D"):
        kl_reward_penalty(torch.zeros(3), torch.ones(3), coef=1.0)
    with pytest.raises(ValueError, match="mask shape"):
        kl_reward_penalty(torch.zeros(2, 3), torch.ones(2, 4), coef=1.0)
    with pytest.raises(ValueError, match="coef"):
        kl_reward_penalty(torch.zeros(2, 3), torch.ones(2, 3), coef=-0.1)
