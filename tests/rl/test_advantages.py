import statistics

import pytest
import torch

from reasonrl.rl.advantages import grpo_advantages


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
        m = sum(grp) / g
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
    a = grpo_advantages(r, group_size=g, eps=1e-4, unbiased_std=unbiased, scale=scale)
    torch.testing.assert_close(a, _naive(r, g, 1e-4, unbiased, scale), atol=1e-9, rtol=1e-9)


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
