import math
import statistics

import pytest
import torch

from reasonrl.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    grpo_advantages,
    rloo_advantages,
    token_group_average_advantages,
)


def test_hand_group_unbiased():
    # group1 [1,0,0,0]: mean .25, dev [.75,-.25,-.25,-.25], var=(.5625+3*.0625)/3=.25, std=.5
    #   -> A = [1.5, -.5, -.5, -.5]
    # group2 [1,1,0,0]: mean .5, dev +-.5, var=1/3, std=.577350 -> A = +-.866025
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    a = grpo_advantages(r, group_size=4, eps=0.0)
    exp = torch.tensor([1.5, -0.5, -0.5, -0.5, 0.866025, 0.866025, -0.866025, -0.866025])
    torch.testing.assert_close(a, exp, atol=1e-5, rtol=0)


def test_hand_group_biased():
    # [1,0,0,0]: var=.75/4=.1875, std=.433013 -> A = [.75/.433013=1.732051, -.25/.433013=-.577350]
    a = grpo_advantages(torch.tensor([1.0, 0, 0, 0]), group_size=4, eps=0.0, unbiased_std=False)
    torch.testing.assert_close(a, torch.tensor([1.732051, -0.577350, -0.577350, -0.577350]), atol=1e-5, rtol=0)


def test_hand_batch_scale():
    # batch mean 3/8=.375; ss = 3*.625^2 + 5*.375^2 = 1.875; var=1.875/7=.267857; std=.517549
    # A = (r - group mean)/.517549: .75->1.449138, -.25->-.483046, +-.5->+-.966092
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    a = grpo_advantages(r, group_size=4, eps=0.0, scale="batch")
    exp = torch.tensor([1.449138, -0.483046, -0.483046, -0.483046, 0.966092, 0.966092, -0.966092, -0.966092])
    torch.testing.assert_close(a, exp, atol=1e-5, rtol=0)


def test_hand_valid_mask():
    # valid rewards [1,0,0] (5 and nan excluded): mean 1/3, dev [2/3,-1/3,-1/3], var=(6/9)/2=1/3, std=.577350
    # -> A = [1.154701, -.577350, 0 (invalid), -.577350]; group2 only one valid -> std 0 -> A = 0
    r = torch.tensor([1.0, 0, 5.0, 0, float("nan"), 3.0, float("nan"), float("nan")])
    valid = torch.tensor([True, True, False, True, False, True, False, False])
    a = grpo_advantages(r, group_size=4, eps=0.0 + 1e-12, valid=valid)
    torch.testing.assert_close(a, torch.tensor([1.154701, -0.577350, 0, -0.577350, 0, 0, 0, 0]), atol=1e-5, rtol=0)
    assert torch.isfinite(a).all()


def test_group_size_one_is_zero_and_ints():
    a = grpo_advantages(torch.tensor([3, 7, 1]), group_size=1)
    assert a.dtype == torch.float32
    assert torch.equal(a, torch.zeros(3))


def _naive(r, g, eps, unbiased, scale):
    out = []
    rs = r.tolist()
    allstd = (statistics.stdev(rs) if unbiased else statistics.pstdev(rs)) if len(rs) > 1 else 0.0
    for s in range(0, len(rs), g):
        grp = rs[s : s + g]
        m = statistics.mean(grp)  # exact (fractions): an all-equal group gives exactly 0
        if g > 1:
            sd = statistics.stdev(grp) if unbiased else statistics.pstdev(grp)
        else:
            sd = 0.0
        for x in grp:
            if scale == "none":
                out.append(x - m)
            else:
                out.append((x - m) / ((sd if scale == "group" else allstd) + eps))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("g", [1, 3, 4])
def test_naive_reference(scale, unbiased, g):
    gen = torch.Generator().manual_seed(g)
    r = torch.randn(5 * g, generator=gen, dtype=torch.float64)
    r[g : 2 * g] = 0.7  # an all-equal group (float64 r - mean leaves 1e-16 for g = 3)
    a = grpo_advantages(r, group_size=g, eps=1e-4, unbiased_std=unbiased, scale=scale)
    ref = _naive(r, g, 1e-4, unbiased, scale)
    torch.testing.assert_close(a, ref, atol=1e-9, rtol=1e-9)
    assert torch.equal(a[g : 2 * g], ref[g : 2 * g]) and torch.equal(ref[g : 2 * g], torch.zeros(g, dtype=r.dtype))


def test_permutation_within_group():
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(12, generator=gen)
    a = grpo_advantages(r, group_size=4)
    perm = torch.cat([torch.randperm(4, generator=gen) + 4 * k for k in range(3)])
    torch.testing.assert_close(grpo_advantages(r[perm], group_size=4), a[perm])


def test_dr_grpo_equals_grpo_without_std():
    r = torch.rand(8, generator=torch.Generator().manual_seed(1))
    means = r.view(2, 4).mean(-1, keepdim=True)
    torch.testing.assert_close(grpo_advantages(r, group_size=4, scale="none"), (r.view(2, 4) - means).view(-1))
    # GRPO times its (std + eps) denominator recovers Dr.GRPO
    std = r.view(2, 4).std(-1, keepdim=True)
    a_g = grpo_advantages(r, group_size=4, eps=1e-4).view(2, 4)
    torch.testing.assert_close((a_g * (std + 1e-4)).view(-1), grpo_advantages(r, group_size=4, scale="none"))


def test_bad_inputs():
    with pytest.raises(ValueError, match="divisible"):
        grpo_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="unknown scale"):
        grpo_advantages(torch.zeros(4), group_size=2, scale="bogus")
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(2, 2), group_size=2)
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(4), group_size=2, valid=torch.ones(3, dtype=torch.bool))



def _within_group_perm(n_groups, g, gen):
    return torch.cat([torch.randperm(g, generator=gen) + g * k for k in range(n_groups)])


def _random_valid(n, gen, p_invalid=0.25):
    return torch.rand(n, generator=gen) >= p_invalid


# ---------------------------------------------------------------------------------------------------------- RLOO
def test_rloo_hand():
    # group1 [1,0,0,0]: S=1, c=4 -> A_0 = 1 - 0/3 = 1, A_j = 0 - 1/3 = -1/3
    # group2 [1,1,0,0]: S=2 -> ones: 1 - 1/3 = 2/3, zeros: 0 - 2/3 = -2/3
    a = rloo_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0]), group_size=4)
    exp = torch.tensor([1, -1 / 3, -1 / 3, -1 / 3, 2 / 3, 2 / 3, -2 / 3, -2 / 3])
    torch.testing.assert_close(a, exp, atol=1e-6, rtol=0)


def test_rloo_hand_valid_mask():
    # group1 [1, 0, (nan), 2] valid [T,T,F,T]: S=3, c=3 -> 1-(0+2)/2=0, 0-(1+2)/2=-1.5, 0 (invalid), 2-(1+0)/2=1.5
    # group2: a single valid sample -> 0; group3: all equal valid rewards [.1,.1,.1] (+ invalid 9) -> exactly 0
    r = torch.tensor([1.0, 0, float("nan"), 2, 5, float("nan"), 7, 1, 0.1, 0.1, 9, 0.1])
    valid = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    a = rloo_advantages(r, group_size=4, valid=valid)
    torch.testing.assert_close(a, torch.tensor([0, -1.5, 0, 1.5, 0, 0, 0, 0, 0, 0, 0, 0]), atol=1e-6, rtol=0)
    assert torch.equal(a[4:], torch.zeros(8))


def _naive_rloo(r, valid, g):
    out = []
    for s in range(0, len(r), g):
        idx = [i for i in range(s, s + g) if valid[i]]
        for i in range(s, s + g):
            others = [r[j] for j in idx if j != i]
            out.append(r[i] - sum(others) / len(others) if valid[i] and len(idx) >= 2 else 0.0)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("g", [1, 2, 5])
def test_rloo_naive_reference(g):
    gen = torch.Generator().manual_seed(10 + g)
    r = torch.randn(6 * g, generator=gen, dtype=torch.float64)
    valid = _random_valid(6 * g, gen)
    a = rloo_advantages(r, group_size=g, valid=valid)
    torch.testing.assert_close(a, _naive_rloo(r.tolist(), valid.tolist(), g), atol=1e-12, rtol=0)


def test_rloo_permutation_and_invalid_values_ignored():
    gen = torch.Generator().manual_seed(3)
    r, valid = torch.rand(20, generator=gen), _random_valid(20, gen)
    a = rloo_advantages(r, group_size=5, valid=valid)
    perm = _within_group_perm(4, 5, gen)
    torch.testing.assert_close(rloo_advantages(r[perm], group_size=5, valid=valid[perm]), a[perm])
    r2 = torch.where(valid, r, torch.full_like(r, float("nan")))
    torch.testing.assert_close(rloo_advantages(r2, group_size=5, valid=valid), a)
    assert torch.equal(a[~valid], torch.zeros(int((~valid).sum())))


def test_rloo_is_scaled_dr_grpo():
    # r_i - (S - r_i)/(c-1) = c/(c-1) * (r_i - mean)
    r = torch.rand(12, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(r, group_size=4), 4 / 3 * grpo_advantages(r, group_size=4, scale="none"))


def test_rloo_dtypes():
    assert rloo_advantages(torch.tensor([1, 0, 0, 1]), group_size=2).dtype == torch.float32
    assert rloo_advantages(torch.zeros(4, dtype=torch.float64), group_size=2).dtype == torch.float64
    assert rloo_advantages(torch.zeros(4, dtype=torch.bfloat16), group_size=2).dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------- HAPO (TLGA)
def test_tlga_hand_length_weighting():
    # group1 R=[1,0], L=[1,3]: tokens [1,0,0,0] -> mu=1/4=.25, sigma^2=(1*.75^2 + 3*.25^2)/4=.1875, sigma=.433013
    #   -> A = [.75/.433013, -.25/.433013] = [1.732051, -.577350]   (plain GRPO would give +-.707107 / +-1)
    # group2 R=[2,2] -> all equal -> exactly 0
    a, nfb = token_group_average_advantages(
        torch.tensor([1.0, 0, 2, 2]), torch.tensor([1, 3, 5, 7]), group_size=2, eps=0.0
    )
    torch.testing.assert_close(a, torch.tensor([1.732051, -0.577350, 0, 0]), atol=1e-5, rtol=0)
    assert nfb == 0
    assert torch.equal(a[2:], torch.zeros(2))


def test_tlga_hand_no_std_valid_and_zero_length():
    # R=[1, 0, (nan, invalid), 3], L=[2, 1, 9, 0]: the length-0 sample has no tokens -> tokens = [1,1,0]
    #   -> mu = 2/3; A = R - mu = [1/3, -2/3, 0 (invalid), 0 (no tokens)]
    r = torch.tensor([1.0, 0, float("nan"), 3])
    valid = torch.tensor([True, True, False, True])
    a, nfb = token_group_average_advantages(r, torch.tensor([2, 1, 9, 0]), group_size=4, valid=valid,
                                            normalize_std=False)
    torch.testing.assert_close(a, torch.tensor([1 / 3, -2 / 3, 0, 0]), atol=1e-6, rtol=0)
    assert nfb == 0


def test_tlga_worked_example_fallback():
    # algorithms.md 1.2: 1 correct (R=+1, 100 tokens) and 15 wrong (R=-1, 10k tokens each).
    #   p = 100/150100 token share of the correct one; mu = 2p - 1 = -149900/150100 = -0.998668
    #   sigma = 2 sqrt(p(1-p)) = 0.051605; A_correct = (1-mu)/sigma = sqrt((1-p)/p) = sqrt(1500) = 38.73 >= 5
    #   -> fallback to GRPO: mean = (1-15)/16 = -.875; dev = [1.875, -.125 x15]; ss = 3.515625 + 15*.015625 = 3.75
    #      unbiased var = 3.75/15 = .25, std = .5 -> A = [1.875/.500001, -.125/.500001] = [3.749993, -.2499995]
    # group2 (no fallback): R alternating +-1, all 50 tokens -> mu=0, sigma=1 -> A = +-1/(1+1e-6)
    r = torch.tensor([1.0] + [-1.0] * 15 + [1.0, -1.0] * 8, dtype=torch.float64)
    lengths = torch.tensor([100] + [10000] * 15 + [50] * 16)
    a, nfb = token_group_average_advantages(r, lengths, group_size=16)
    assert nfb == 1
    exp = torch.tensor([3.749992500015] + [-0.249999500001] * 15 + [1 / (1 + 1e-6), -1 / (1 + 1e-6)] * 8,
                       dtype=torch.float64)
    torch.testing.assert_close(a, exp, atol=1e-9, rtol=0)
    # without the safeguard the TLGA value is kept
    a_raw, nfb_raw = token_group_average_advantages(r, lengths, group_size=16, fallback_threshold=None)
    assert nfb_raw == 0
    assert a_raw[0].item() == pytest.approx(math.sqrt(1500) * 0.051605374366521205 / (0.051605374366521205 + 1e-6))
    # a threshold above 38.73 does not trigger either
    assert token_group_average_advantages(r, lengths, group_size=16, fallback_threshold=40.0)[1] == 0
    # the check is |A| >= threshold: the group-2 value 1/(1+1e-6) < 1 does not trigger at threshold 1.0
    assert token_group_average_advantages(r[16:], lengths[16:], group_size=16, fallback_threshold=1.0)[1] == 0


def _naive_tlga(r, lengths, valid, g, eps, normalize_std, thr):
    out, nfb = [], 0
    for s in range(0, len(r), g):
        idx = [i for i in range(s, s + g) if valid[i]]
        tok = [i for i in idx if lengths[i] > 0]
        w = sum(lengths[i] for i in tok)
        adv = {}
        if tok and len({r[i] for i in tok}) > 1:
            mu = sum(lengths[i] * r[i] for i in tok) / w
            sd = math.sqrt(sum(lengths[i] * (r[i] - mu) ** 2 for i in tok) / w)
            adv = {i: ((r[i] - mu) / (sd + eps) if normalize_std else r[i] - mu) for i in tok}
        if thr is not None and any(abs(x) >= thr for x in adv.values()):
            nfb += 1
            vals = [r[i] for i in idx]
            m, sd = (0.0, 1.0) if len(vals) == 1 else (statistics.mean(vals), statistics.stdev(vals))
            adv = {i: ((r[i] - m) / (sd + eps) if normalize_std else r[i] - m) for i in tok}
        out += [adv.get(i, 0.0) for i in range(s, s + g)]
    return torch.tensor(out, dtype=torch.float64), nfb


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("thr", [None, 1.5, 5.0])
@pytest.mark.parametrize("g", [1, 3, 6])
def test_tlga_naive_reference(g, thr, normalize_std):
    gen = torch.Generator().manual_seed(100 * g + (0 if thr is None else int(10 * thr)) + normalize_std)
    n = 8 * g
    r = torch.randint(0, 3, (n,), generator=gen).double() + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    r[: 2 * g] = 1.0  # two constant groups
    lengths = torch.randint(0, 40, (n,), generator=gen)
    lengths[torch.rand(n, generator=gen) < 0.15] = 0
    lengths[-g:] = torch.tensor([2000] + [3] * (g - 1))[:g]  # one very unbalanced group
    valid = _random_valid(n, gen, 0.2)
    a, nfb = token_group_average_advantages(r, lengths, group_size=g, valid=valid, eps=1e-6,
                                            normalize_std=normalize_std, fallback_threshold=thr)
    ref, ref_nfb = _naive_tlga(r.tolist(), lengths.tolist(), valid.tolist(), g, 1e-6, normalize_std, thr)
    torch.testing.assert_close(a, ref, atol=1e-9, rtol=1e-9)
    assert nfb == ref_nfb


def test_tlga_naive_reference_hits_fallback():
    # make sure the random reference above exercises both branches on at least one configuration
    gen = torch.Generator().manual_seed(7)
    r = torch.randint(0, 2, (64,), generator=gen).double()
    lengths = torch.randint(1, 2000, (64,), generator=gen)
    a, nfb = token_group_average_advantages(r, lengths, group_size=8, fallback_threshold=2.0)
    ref, ref_nfb = _naive_tlga(r.tolist(), lengths.tolist(), [True] * 64, 8, 1e-6, True, 2.0)
    assert 0 < nfb < 8 and nfb == ref_nfb
    torch.testing.assert_close(a, ref, atol=1e-9, rtol=1e-9)


def test_tlga_permutation_and_invalid_values_ignored():
    gen = torch.Generator().manual_seed(5)
    r, lengths, valid = torch.rand(24, generator=gen), torch.randint(0, 50, (24,), generator=gen), _random_valid(24, gen)
    a, nfb = token_group_average_advantages(r, lengths, group_size=6, valid=valid, fallback_threshold=2.0)
    perm = _within_group_perm(4, 6, gen)
    a_p, nfb_p = token_group_average_advantages(r[perm], lengths[perm], group_size=6, valid=valid[perm],
                                                fallback_threshold=2.0)
    torch.testing.assert_close(a_p, a[perm])
    assert nfb_p == nfb
    # invalid samples: their reward (even NaN) and length do not matter, and they get 0
    r2 = torch.where(valid, r, torch.full_like(r, float("nan")))
    l2 = torch.where(valid, lengths, torch.full_like(lengths, 10**6))
    a2, nfb2 = token_group_average_advantages(r2, l2, group_size=6, valid=valid, fallback_threshold=2.0)
    torch.testing.assert_close(a2, a)
    assert nfb2 == nfb
    assert torch.equal(a[~valid], torch.zeros(int((~valid).sum())))


def test_tlga_reduces_to_population_grpo_with_equal_lengths():
    # equal lengths: mu_g = sample mean, sigma_g = population std -> GRPO(unbiased_std=False, same eps), and
    # without std -> Dr.GRPO. (Safeguard off: population-std GRPO can exceed |A| = 5 only for large groups.)
    gen = torch.Generator().manual_seed(6)
    r, valid = torch.randn(40, generator=gen, dtype=torch.float64), _random_valid(40, gen)
    lengths = torch.full((40,), 17)
    a, _ = token_group_average_advantages(r, lengths, group_size=8, valid=valid, eps=1e-6, fallback_threshold=None)
    torch.testing.assert_close(a, grpo_advantages(r, group_size=8, valid=valid, eps=1e-6, unbiased_std=False))
    a0, _ = token_group_average_advantages(r, lengths, group_size=8, valid=valid, normalize_std=False)
    torch.testing.assert_close(a0, grpo_advantages(r, group_size=8, valid=valid, scale="none"))


def test_tlga_equals_population_grpo_on_token_expanded_group():
    # integer lengths: TLGA == population-std GRPO over the group expanded to one "sample" per token
    gen = torch.Generator().manual_seed(8)
    r, lengths = torch.randn(6, generator=gen, dtype=torch.float64), torch.randint(1, 6, (6,), generator=gen)
    a, _ = token_group_average_advantages(r, lengths, group_size=6, eps=1e-6, fallback_threshold=None)
    expanded = r.repeat_interleave(lengths)
    a_tok = grpo_advantages(expanded, group_size=expanded.numel(), eps=1e-6, unbiased_std=False)
    starts = torch.cumsum(lengths, 0) - lengths
    torch.testing.assert_close(a, a_tok[starts])
    # and a common scale of the lengths changes nothing
    torch.testing.assert_close(token_group_average_advantages(r, lengths * 7, group_size=6, fallback_threshold=None)[0],
                               token_group_average_advantages(r, lengths, group_size=6, fallback_threshold=None)[0])


def test_tlga_full_fallback_equals_grpo_unbiased():
    # a tiny threshold makes every group with differing rewards fall back -> verl-style GRPO (unbiased std, eps)
    gen = torch.Generator().manual_seed(9)
    r = torch.randint(0, 3, (30,), generator=gen).double()
    r[:5] = 2.0  # one constant group: stays 0 and does not fall back
    lengths, valid = torch.randint(1, 30, (30,), generator=gen), _random_valid(30, gen, 0.1)
    valid[:5] = True
    a, nfb = token_group_average_advantages(r, lengths, group_size=5, valid=valid, eps=1e-6, fallback_threshold=1e-9)
    exp = grpo_advantages(r, group_size=5, valid=valid, eps=1e-6, unbiased_std=True)
    torch.testing.assert_close(a, exp)
    assert nfb == 6 - 1
    assert torch.equal(a[:5], torch.zeros(5))


def test_tlga_edge_cases():
    # group_size 1 -> 0 everywhere, no fallback; all-zero lengths -> 0; eps=0 with equal rewards stays finite
    a, nfb = token_group_average_advantages(torch.tensor([3.0, -2.0]), torch.tensor([5, 5]), group_size=1)
    assert torch.equal(a, torch.zeros(2)) and nfb == 0
    a, nfb = token_group_average_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), group_size=2, eps=0.0)
    assert torch.equal(a, torch.zeros(2)) and nfb == 0
    a, _ = token_group_average_advantages(torch.full((3,), 0.1, dtype=torch.float64), torch.tensor([1, 7, 13]),
                                          group_size=3, eps=0.0)
    assert torch.equal(a, torch.zeros(3, dtype=torch.float64))
    # dtypes: int rewards -> float32; list lengths accepted
    a, _ = token_group_average_advantages(torch.tensor([1, 0]), [3, 1], group_size=2)
    assert a.dtype == torch.float32


# ------------------------------------------------------------------------------------ rules shared by all estimators
ESTIMATOR_CONFIGS = [  # (estimator, scale): every estimator and every scale it accepts
    ("grpo", "group"), ("grpo", "batch"), ("grpo", "none"), ("dr_grpo", "group"), ("rloo", "group"),
    ("hapo", "group"), ("hapo", "none"),
]


def _advantages(r, config, *, group_size, valid=None, lengths=None, fallback_threshold=5.0):
    estimator, scale = config
    if lengths is None:
        lengths = torch.arange(r.numel()) % 7 + 1
    adv, metrics = compute_advantages(r, estimator=estimator, group_size=group_size, valid=valid, lengths=lengths,
                                      eps=1e-4, unbiased_std=True, scale=scale, fallback_threshold=fallback_threshold)
    return adv, metrics


@pytest.mark.parametrize("config", ESTIMATOR_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value, g", [(0.1, 4), (0.7, 3), (0.3, 6), (0.1, 8), (0.7, 16)])
def test_all_equal_float_groups_are_exactly_zero(config, dtype, value, g):
    # r - mean leaves rounding residue on these (float32 0.3 x 6: 3e-8, which GRPO's / (0 + eps) made 3e-4);
    # the spec says exactly 0. Group 0 all equal; group 1 has an invalid sample with another value; group 2 varies.
    r = torch.cat([torch.full((g,), value), torch.full((g,), value), torch.linspace(0, 1, g)]).to(dtype)
    valid = torch.ones(3 * g, dtype=torch.bool)
    r[g], valid[g] = 5.0, False
    adv, _ = _advantages(r, config, group_size=g, valid=valid)
    assert (adv[: 2 * g] == 0).all(), adv[: 2 * g]
    assert (adv[2 * g :] != 0).any()


@pytest.mark.parametrize("config", ESTIMATOR_CONFIGS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_one_policy_for_non_finite_rewards(config, bad):
    # group0: a non-finite reward on a VALID sample (row 1) and an invalid sample (row 3);
    # group1: a non-finite reward on an INVALID sample (row 5); group2: clean.
    # Every estimator: the valid rows of group0 are NaN, invalid rows are 0, groups 1 and 2 are unaffected
    # (as if group0 were not there); with scale="batch" (the std spans the batch) every valid row is NaN.
    r = torch.tensor([1.0, bad, 0.0, 5.0, 1.0, bad, 0.0, 0.5, 0.0, 1.0, 1.0, 0.25])
    valid = torch.tensor([1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1, 1], dtype=torch.bool)
    lengths = torch.tensor([3, 5, 2, 4, 6, 1, 2, 8, 3, 3, 7, 2])
    adv, metrics = _advantages(r, config, group_size=4, valid=valid, lengths=lengths, fallback_threshold=1e-9)
    nan_rows = valid.clone() if config[1] == "batch" else torch.tensor([1, 1, 1] + [0] * 9, dtype=torch.bool)
    assert torch.equal(adv.isnan(), nan_rows), adv
    assert torch.equal(adv[~valid], torch.zeros(int((~valid).sum())))
    if config[1] != "batch":
        clean, clean_metrics = _advantages(r[4:], config, group_size=4, valid=valid[4:], lengths=lengths[4:],
                                           fallback_threshold=1e-9)
        assert torch.equal(adv[4:], clean) and torch.isfinite(clean).all() and (clean != 0).any()
        assert metrics == clean_metrics  # hapo: the NaN group is not counted as a fallback group
    # an invalid sample's reward never matters, even a non-finite one: the same input with row 1 invalid is finite
    valid[1] = False
    adv_invalid, _ = _advantages(r, config, group_size=4, valid=valid, lengths=lengths)
    assert torch.isfinite(adv_invalid).all() and adv_invalid[1] == 0


# ------------------------------------------------------------------------------------------------- dispatcher
def test_estimator_names():
    assert ADVANTAGE_ESTIMATORS == ("grpo", "dr_grpo", "rloo", "hapo")


def test_compute_advantages_dispatch():
    gen = torch.Generator().manual_seed(11)
    r, valid = torch.rand(16, generator=gen), _random_valid(16, gen)
    lengths = torch.randint(1, 100, (16,), generator=gen)
    kw = {"group_size": 4, "valid": valid, "eps": 1e-4, "unbiased_std": True, "scale": "group"}
    a, m = compute_advantages(r, estimator="grpo", **kw)
    torch.testing.assert_close(a, grpo_advantages(r, group_size=4, valid=valid))
    assert m == {}
    a, _ = compute_advantages(r, estimator="grpo", **{**kw, "scale": "batch", "unbiased_std": False})
    torch.testing.assert_close(a, grpo_advantages(r, group_size=4, valid=valid, scale="batch", unbiased_std=False))
    # dr_grpo == grpo with scale "none", whatever scale/eps are passed
    a, m = compute_advantages(r, estimator="dr_grpo", **kw)
    torch.testing.assert_close(a, grpo_advantages(r, group_size=4, valid=valid, scale="none"))
    assert m == {}
    a, _ = compute_advantages(r, estimator="rloo", **kw)
    torch.testing.assert_close(a, rloo_advantages(r, group_size=4, valid=valid))
    a, m = compute_advantages(r, estimator="hapo", lengths=lengths, **{**kw, "eps": 1e-6})
    exp, nfb = token_group_average_advantages(r, lengths, group_size=4, valid=valid, eps=1e-6)
    torch.testing.assert_close(a, exp)
    assert m == {"adv/fallback_groups": nfb}
    a, m = compute_advantages(r, estimator="hapo", lengths=lengths, fallback_threshold=1e-9, **{**kw, "scale": "none"})
    exp, nfb = token_group_average_advantages(r, lengths, group_size=4, valid=valid, normalize_std=False,
                                              eps=1e-4, fallback_threshold=1e-9)
    torch.testing.assert_close(a, exp)
    assert m == {"adv/fallback_groups": nfb} and nfb > 0


def test_new_bad_inputs():
    kw = {"group_size": 2, "eps": 1e-4, "unbiased_std": True, "scale": "group"}
    with pytest.raises(ValueError, match="unknown estimator 'ppo'.*grpo.*dr_grpo.*rloo.*hapo"):
        compute_advantages(torch.zeros(4), estimator="ppo", **kw)
    with pytest.raises(ValueError, match="needs lengths"):
        compute_advantages(torch.zeros(4), estimator="hapo", **kw)
    with pytest.raises(ValueError, match="'batch' is not supported"):
        compute_advantages(torch.zeros(4), estimator="hapo", lengths=torch.ones(4), **{**kw, "scale": "batch"})
    with pytest.raises(ValueError, match="unknown scale"):
        compute_advantages(torch.zeros(4), estimator="rloo", **{**kw, "scale": "bogus"})
    with pytest.raises(ValueError, match="divisible"):
        rloo_advantages(torch.zeros(5), group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(torch.zeros(4), group_size=0)
    with pytest.raises(ValueError, match="valid shape"):
        rloo_advantages(torch.zeros(4), group_size=2, valid=torch.ones(3, dtype=torch.bool))
    tlga = token_group_average_advantages
    with pytest.raises(ValueError, match="lengths shape"):
        tlga(torch.zeros(4), torch.ones(3), group_size=2)
    with pytest.raises(ValueError, match="lengths must be finite and >= 0"):
        tlga(torch.zeros(4), torch.tensor([1, -1, 2, 2]), group_size=2)
    with pytest.raises(ValueError, match="eps"):
        tlga(torch.zeros(4), torch.ones(4), group_size=2, eps=-1.0)
    with pytest.raises(ValueError, match="fallback_threshold"):
        tlga(torch.zeros(4), torch.ones(4), group_size=2, fallback_threshold=0.0)
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        tlga(torch.zeros(2, 2), torch.ones(2, 2), group_size=2)
