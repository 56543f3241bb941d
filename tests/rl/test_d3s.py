import itertools
import math

import pytest
import torch

from reasonrl.rl.d3s import (
    SAMPLE_SCOPES,
    SCHEDULE_SHAPES,
    TOKEN_SCOPES,
    keep_fraction_at,
    max_variance_subset,
    select_rollouts,
    select_tokens,
    token_score_threshold,
    tokens_at_or_above,
)


def pvar(xs):
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)


def brute_best_var(values, k):
    return max(pvar([values[i] for i in c]) for c in itertools.combinations(range(len(values)), k))


# ------------------------------------------------------------------------------------------ max_variance_subset
def test_hand_max_variance_subset():
    # sorted: -9(5) -1(1) 1(3) 2(6) 3(0) 4(2) 5(4); k=3 candidates (j largest + 3-j smallest):
    #   j=0 {-9,-1,1}: mean -3, var (36+4+16)/3 = 18.67      j=1 {-9,-1,5}: var 32.89
    #   j=2 {-9,4,5}: mean 0, var (81+16+25)/3 = 40.67       j=3 {3,4,5}: var 0.67   -> j=2, indices {5,2,4}
    v = torch.tensor([3.0, -1, 4, 1, 5, -9, 2])
    idx = max_variance_subset(v, 3)
    assert idx.dtype == torch.long
    assert idx.tolist() == [2, 4, 5]
    assert pvar(v[idx].tolist()) == pytest.approx(122 / 3)
    # the two extremes: {0, 10}, var 25
    assert max_variance_subset(torch.tensor([0.0, 1, 2, 3, 10]), 2).tolist() == [0, 4]


def test_hand_tie_breaking():
    # binary [1,1,0,0,0,0], k=4: j=2, 3 and 4 all give two 1s and two 0s (var .25); smallest j=2 wins:
    # top 2 of the stable ascending order are idx 0,1; bottom 2 are the zeros with the lowest indices, 2,3
    assert max_variance_subset(torch.tensor([1.0, 1, 0, 0, 0, 0]), 4).tolist() == [0, 1, 2, 3]
    # constant input: every candidate has var 0 -> j=0 -> the first k entries
    assert max_variance_subset(torch.full((5,), 7.0), 3).tolist() == [0, 1, 2]
    # [0,5,5], k=2, stable order 0@0 5@1 5@2: j=0 (bottom 2) = {0@0, 5@1} and j=1 (top 1 = the higher index 5@2,
    # bottom 1 = 0@0) both have var 6.25, j=2 {5,5} has 0 -> smallest j=0 -> indices 0 and 1
    assert max_variance_subset(torch.tensor([0.0, 5, 5]), 2).tolist() == [0, 1]


def test_edge_k():
    v = torch.tensor([2.0, -1.0, 0.5])
    assert max_variance_subset(v, 0).tolist() == []
    assert max_variance_subset(v, 3).tolist() == [0, 1, 2]
    assert max_variance_subset(v, 1).numel() == 1


@pytest.mark.parametrize("kind", ["normal", "ints", "binary", "ties"])
def test_brute_force(kind):
    gen = torch.Generator().manual_seed({"normal": 0, "ints": 1, "binary": 2, "ties": 3}[kind])
    for trial in range(150):
        n = int(torch.randint(1, 9, (1,), generator=gen))
        if kind == "normal":
            v = torch.randn(n, generator=gen, dtype=torch.float64) * 3
        elif kind == "ints":
            v = torch.randint(-4, 5, (n,), generator=gen).double()
        elif kind == "binary":
            v = torch.randint(0, 2, (n,), generator=gen).double()
        else:  # few distinct values, many repeats, including a float32 input
            v = torch.tensor([-1.5, 0.25, 0.25, 2.0])[torch.randint(0, 4, (n,), generator=gen)]
        for k in range(1, n + 1):
            idx = max_variance_subset(v, k)
            assert idx.numel() == k and idx.unique().numel() == k
            assert idx.tolist() == sorted(idx.tolist())
            got = pvar(v.double()[idx].tolist())
            assert got == pytest.approx(brute_best_var(v.double().tolist(), k), abs=1e-9), (trial, v, k)


def test_deterministic_and_device_dtype():
    v = torch.randn(50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(max_variance_subset(v, 17), max_variance_subset(v.clone(), 17))
    assert torch.equal(max_variance_subset(v, 17), max_variance_subset(v.double(), 17))


def test_max_variance_subset_errors():
    with pytest.raises(ValueError, match="values"):
        max_variance_subset(torch.zeros(2, 2), 1)
    with pytest.raises(ValueError, match="k"):
        max_variance_subset(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="k"):
        max_variance_subset(torch.zeros(3), -1)
    with pytest.raises(ValueError, match="NaN"):
        max_variance_subset(torch.tensor([1.0, float("nan")]), 1)


# ------------------------------------------------------------------------------------------ select_rollouts
A8 = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.866, 0.866, -0.866, -0.866])


def test_hand_intra():
    # rho=.5, G=4 -> k=2 per group. group1: {1.5, -.5} var 1 (best); the -.5 with the lowest index (1) is kept.
    # group2: one +.866 and one -.866 (var .75); top pick = highest index of the +.866 tie (5), bottom = 6
    keep = select_rollouts(A8, group_size=4, keep_fraction=0.5)
    assert keep.dtype == torch.bool
    assert keep.nonzero().squeeze(-1).tolist() == [0, 1, 5, 6]


def test_hand_cross():
    # rho=.25 of N=8 -> K=2 pooled: {1.5, -.866} var ((1.5+.866)/2)^2 = 1.40 beats {1.5,-.5} (1.0) -> rows 0, 6
    keep = select_rollouts(A8, group_size=4, keep_fraction=0.25, scope="cross")
    assert keep.nonzero().squeeze(-1).tolist() == [0, 6]


def test_zero_group():
    a = torch.tensor([0.0, 0, 0, 0, 1, -1, 1, -1])
    # intra: the flat group keeps its first k=2 rows (A=0, no signal); the other keeps one +1 and one -1
    assert select_rollouts(a, group_size=4, keep_fraction=0.5).tolist() == [1, 1, 0, 0, 0, 1, 1, 0]
    # cross: K=4 -> both +1 and both -1 (var 1); the zero group disappears
    assert select_rollouts(a, group_size=4, keep_fraction=0.5, scope="cross").tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_counts_min_keep_and_rounding():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(40, generator=gen)
    # rho*G = .3*10 = 3.0000000000000004 in floats: still k=3
    assert select_rollouts(a, group_size=10, keep_fraction=0.3).view(4, 10).sum(1).tolist() == [3] * 4
    # ceil(.1*8)=1 < min_keep=2 -> 2 per group; min_keep=3 -> 3
    assert select_rollouts(a, group_size=8, keep_fraction=0.1).view(5, 8).sum(1).tolist() == [2] * 5
    assert select_rollouts(a, group_size=8, keep_fraction=0.1, min_keep=3).view(5, 8).sum(1).tolist() == [3] * 5
    # capped at G
    assert select_rollouts(a, group_size=1, keep_fraction=0.5).all()
    assert int(select_rollouts(a, group_size=8, keep_fraction=0.33, scope="cross").sum()) == math.ceil(0.33 * 40)


@pytest.mark.parametrize("scope", SAMPLE_SCOPES)
def test_keep_all_is_identity(scope):
    a = torch.randn(12, generator=torch.Generator().manual_seed(1))
    assert select_rollouts(a, group_size=4, keep_fraction=1.0, scope=scope).all()
    assert select_rollouts(a, group_size=4, keep_fraction=0.99, scope=scope).all()  # ceil(.99*4)=4
    assert select_rollouts(torch.zeros(0), group_size=4, keep_fraction=0.5, scope=scope).numel() == 0


def test_intra_matches_brute_force_per_group():
    gen = torch.Generator().manual_seed(5)
    g = 6
    a = torch.randint(0, 2, (8 * g,), generator=gen).float() - torch.rand(8 * g, generator=gen).round() * 0.5
    keep = select_rollouts(a, group_size=g, keep_fraction=0.5)
    for grp, kg in zip(a.view(-1, g).tolist(), keep.view(-1, g)):
        chosen = [x for x, kk in zip(grp, kg.tolist()) if kk]
        assert len(chosen) == 3
        assert pvar(chosen) == pytest.approx(brute_best_var(grp, 3), abs=1e-9)


def test_binary_balanced():
    # 3 correct / 5 wrong, k=4 -> 2 and 2 (as balanced as possible)
    r = torch.tensor([1.0, 0, 0, 1, 0, 0, 1, 0])
    adv = r - r.mean()
    keep = select_rollouts(adv, group_size=8, keep_fraction=0.5)
    assert int(r[keep].sum()) == 2 and int(keep.sum()) == 4


@pytest.mark.parametrize("scope", SAMPLE_SCOPES)
def test_order_within_group_invariance(scope):
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(5 * 6, generator=gen)  # distinct values: the optimum is unique
    keep = select_rollouts(a, group_size=6, keep_fraction=0.5, scope=scope)
    perm = torch.cat([torch.randperm(6, generator=gen) + 6 * i for i in range(5)])
    keep_p = select_rollouts(a[perm], group_size=6, keep_fraction=0.5, scope=scope)
    assert torch.equal(keep_p, keep[perm])


def test_select_rollouts_errors():
    a = torch.zeros(8)
    with pytest.raises(ValueError, match="scope"):
        select_rollouts(a, group_size=4, keep_fraction=0.5, scope="global")
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="keep_fraction"):
            select_rollouts(a, group_size=4, keep_fraction=bad)
    with pytest.raises(ValueError, match="group_size"):
        select_rollouts(a, group_size=0, keep_fraction=0.5)
    with pytest.raises(ValueError, match="divisible"):
        select_rollouts(a, group_size=3, keep_fraction=0.5)
    with pytest.raises(ValueError, match="min_keep"):
        select_rollouts(a, group_size=4, keep_fraction=0.5, min_keep=0)
    with pytest.raises(ValueError, match="advantages"):
        select_rollouts(torch.zeros(2, 4), group_size=4, keep_fraction=0.5)
    with pytest.raises(ValueError, match="NaN"):
        select_rollouts(torch.tensor([0.0, float("nan")]), group_size=2, keep_fraction=0.5)


# ------------------------------------------------------------------------------------------ select_tokens
S = torch.tensor([[0.9, 0.1, 0.5, 0.0], [0.3, 0.5, 0.7, 9.9]])
M = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)


def test_hand_batch():
    # 7 valid scores .9 .1 .5 0 | .3 .5 .7 (9.9 is padding). rho=.5 -> k=ceil(3.5)=4 -> 4th largest .5
    exp = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(select_tokens(S, M, keep_fraction=0.5), exp)
    assert token_score_threshold(S[M], 0.5) == pytest.approx(0.5)
    # rho=.3 -> k=ceil(2.1)=3 -> 3rd largest .5: both .5 tie at the cut and are kept (4 tokens)
    assert torch.equal(select_tokens(S, M, keep_fraction=0.3), exp)
    # rho=.99 -> k=7 -> cut 0: the zero score is still dropped (6 tokens)
    exp99 = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(select_tokens(S, M, keep_fraction=0.99), exp99)
    # rho=.1 -> k=1 -> only .9
    assert select_tokens(S, M, keep_fraction=0.1).nonzero().tolist() == [[0, 0]]


def test_hand_sequence():
    # row0: 4 valid, k=ceil(2)=2 -> .9, .5; row1: 3 valid, k=ceil(1.5)=2 -> .7, .5
    exp = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(select_tokens(S, M, keep_fraction=0.5, scope="sequence"), exp)
    # rho=.25: row0 k=1 -> .9; row1 k=ceil(.75)=1 -> .7
    exp = torch.tensor([[1, 0, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    assert torch.equal(select_tokens(S, M, keep_fraction=0.25, scope="sequence"), exp)


@pytest.mark.parametrize("scope", TOKEN_SCOPES)
def test_keep_all_tokens_is_identity(scope):
    out = select_tokens(S, M.long(), keep_fraction=1.0, scope=scope)
    assert out.dtype == torch.bool and torch.equal(out, M)  # zero-score token kept too
    assert token_score_threshold(S[M], 1.0) == float("-inf")
    assert torch.equal(tokens_at_or_above(S, M, float("-inf")), M)


def _naive_tokens(scores, mask, rho, scope):
    out = torch.zeros_like(mask)
    groups = [list(range(scores.shape[0]))] if scope == "batch" else [[i] for i in range(scores.shape[0])]
    for rows in groups:
        cells = [(i, t) for i in rows for t in range(scores.shape[1]) if mask[i, t]]
        if not cells:
            continue
        vals = sorted((float(scores[c]) for c in cells), reverse=True)
        cut = vals[math.ceil(rho * len(cells) - 1e-9) - 1]
        for c in cells:
            if float(scores[c]) >= cut and float(scores[c]) > 0:
                out[c] = True
    return out


@pytest.mark.parametrize("scope", TOKEN_SCOPES)
@pytest.mark.parametrize("rho", [0.05, 0.2, 0.5, 0.77])
def test_tokens_naive_reference(scope, rho):
    gen = torch.Generator().manual_seed(int(rho * 100))
    scores = (torch.rand(6, 9, generator=gen) * 4).round() / 4  # many ties and zeros
    lengths = torch.randint(0, 10, (6,), generator=gen)
    mask = torch.arange(9)[None] < lengths[:, None]
    assert torch.equal(select_tokens(scores, mask, keep_fraction=rho, scope=scope),
                       _naive_tokens(scores, mask, rho, scope))


@pytest.mark.parametrize("scope", TOKEN_SCOPES)
def test_exact_count_with_distinct_scores(scope):
    gen = torch.Generator().manual_seed(11)
    scores = torch.rand(5, 20, generator=gen) + 0.01
    mask = torch.arange(20)[None] < torch.tensor([20, 13, 7, 1, 0])[:, None]
    out = select_tokens(scores, mask, keep_fraction=0.3, scope=scope)
    assert not (out & ~mask).any()
    if scope == "batch":
        assert int(out.sum()) == math.ceil(0.3 * 41)
    else:
        assert out.sum(1).tolist() == [6, 4, 3, 1, 0]


@pytest.mark.parametrize("scope", TOKEN_SCOPES)
def test_padding_columns_and_row_order_invariance(scope):
    gen = torch.Generator().manual_seed(2)
    scores = torch.rand(4, 6, generator=gen)
    mask = torch.rand(4, 6, generator=gen) > 0.3
    out = select_tokens(scores, mask, keep_fraction=0.4, scope=scope)
    wide_s = torch.cat([scores, torch.rand(4, 3, generator=gen) * 100], dim=1)
    wide_m = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    assert torch.equal(select_tokens(wide_s, wide_m, keep_fraction=0.4, scope=scope)[:, :6], out)
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(select_tokens(scores[perm], mask[perm], keep_fraction=0.4, scope=scope), out[perm])


def test_multi_rank_threshold_equals_single_batch():
    gen = torch.Generator().manual_seed(9)
    scores = (torch.rand(8, 7, generator=gen) * 5).floor()  # integer scores: ties at the cut
    mask = torch.rand(8, 7, generator=gen) > 0.25
    for rho in (0.1, 0.35, 0.6, 1.0):
        ranks = [(scores[:3], mask[:3]), (scores[3:], mask[3:])]
        thr = token_score_threshold(torch.cat([s[m] for s, m in ranks]), rho)  # all-gather of valid scores
        local = torch.cat([tokens_at_or_above(s, m, thr) for s, m in ranks])
        assert torch.equal(local, select_tokens(scores, mask, keep_fraction=rho))


def test_no_valid_tokens():
    s, m = torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool)
    assert token_score_threshold(s[m], 0.5) == float("inf")
    for scope in TOKEN_SCOPES:
        assert not select_tokens(s, m, keep_fraction=0.5, scope=scope).any()
    assert select_tokens(torch.zeros(2, 0), torch.zeros(2, 0), keep_fraction=0.5, scope="sequence").shape == (2, 0)


def test_select_tokens_errors():
    with pytest.raises(ValueError, match="scope"):
        select_tokens(S, M, keep_fraction=0.5, scope="group")
    with pytest.raises(ValueError, match="keep_fraction"):
        select_tokens(S, M, keep_fraction=0.0)
    with pytest.raises(ValueError, match="mask shape"):
        select_tokens(S, M[:, :3], keep_fraction=0.5)
    with pytest.raises(ValueError, match="scores"):
        select_tokens(S[0], M[0], keep_fraction=0.5)
    with pytest.raises(ValueError, match=">= 0"):
        select_tokens(-S, M, keep_fraction=0.5)
    with pytest.raises(ValueError, match="valid_scores"):
        token_score_threshold(S, 0.5)
    with pytest.raises(ValueError, match="keep_fraction"):
        token_score_threshold(S[M], 2.0)
    with pytest.raises(ValueError, match="threshold"):
        tokens_at_or_above(S, M, float("nan"))


# ------------------------------------------------------------------------------------------ keep_fraction_at
def test_schedule_hand_values():
    kw = {"start": 0.2, "end": 1.0, "ramp_fraction": 0.5}
    # ramp = 50 steps
    assert keep_fraction_at(0, 100, **kw) == pytest.approx(0.2)
    assert keep_fraction_at(25, 100, **kw) == pytest.approx(0.6)  # linear: .2 + .8 * .5
    assert keep_fraction_at(50, 100, **kw) == pytest.approx(1.0)
    assert keep_fraction_at(80, 100, **kw) == pytest.approx(1.0)
    # cosine at p=.2: (1 - cos(.2 pi))/2 = (1 - .809017)/2 = .0954915 -> .2 + .8 * .0954915 = .276393
    assert keep_fraction_at(10, 100, shape="cosine", **kw) == pytest.approx(0.276393, abs=1e-6)
    assert keep_fraction_at(25, 100, shape="cosine", **kw) == pytest.approx(0.6)
    assert keep_fraction_at(49, 100, shape="step", **kw) == pytest.approx(0.2)
    assert keep_fraction_at(50, 100, shape="step", **kw) == pytest.approx(1.0)
    assert keep_fraction_at(0, 100, start=0.5, ramp_fraction=0.0) == 1.0  # no ramp: held at end


@pytest.mark.parametrize("shape", SCHEDULE_SHAPES)
def test_schedule_endpoints_monotone(shape):
    vals = [keep_fraction_at(s, 40, start=0.3, end=0.9, ramp_fraction=0.25, shape=shape) for s in range(60)]
    assert vals[0] == pytest.approx(0.3)
    assert all(v == pytest.approx(0.9) for v in vals[10:])
    assert all(b >= a for a, b in itertools.pairwise(vals))
    assert all(0.3 <= v <= 0.9 + 1e-12 for v in vals)


def test_schedule_errors():
    with pytest.raises(ValueError, match="shape"):
        keep_fraction_at(0, 10, start=0.5, shape="exp")
    with pytest.raises(ValueError, match="start"):
        keep_fraction_at(0, 10, start=0.0)
    with pytest.raises(ValueError, match="end"):
        keep_fraction_at(0, 10, start=0.5, end=1.2)
    with pytest.raises(ValueError, match="total_steps"):
        keep_fraction_at(0, 0, start=0.5)
    with pytest.raises(ValueError, match="step"):
        keep_fraction_at(-1, 10, start=0.5)
    with pytest.raises(ValueError, match="ramp_fraction"):
        keep_fraction_at(0, 10, start=0.5, ramp_fraction=1.5)
