import math

import pytest
import torch

from reasonrl.rl.hapo import (
    SIGN_MODES,
    EntropyStats,
    adaptive_clip_bounds,
    adaptive_temperature,
    entropy_stats,
    hapo_surrogate,
    logits_entropy,
    normalized_log_entropy,
    redistribute_advantages,
    temperature_from_entropy,
)
from reasonrl.rl.losses import LOG_RATIO_CLAMP, aggregate_token_mean, clipped_surrogate

SQRT3 = math.sqrt(3.0)


# ---------------------------------------------------------------- naive references (plain python, per token)
def _ref_stats(entropies, pivot):
    e = [math.log(max(h, 1e-8)) for h in entropies]
    srt = sorted(e)
    m = srt[round(pivot * (len(e) - 1))]
    sigma = max(math.sqrt(sum((x - m) ** 2 for x in e) / len(e)), 1e-4)
    h = [(x - m) / sigma for x in e]
    pos_max = max([x for x in h if x > 0], default=0.0)
    neg_min = min([x for x in h if x < 0], default=0.0)
    return m, sigma, 1.0 / max(pos_max, 1e-8), 1.0 / abs(min(neg_min, -1e-8))


def _ref_h_hat(entropy, stats, sign_mode, floor=1e-8, sigma_eps=0.0):
    h = (math.log(max(entropy, floor)) - stats.m) / (stats.sigma + sigma_eps)
    if h > 0:
        v = h * stats.scale_pos
    else:
        v = (h if sign_mode == "paper" else abs(h)) * stats.scale_neg
    return max(-1.0, min(1.0, v))


def _ref_redistribute(a, r, hh, el, eh, beta):
    in_band = 1 - el / 2 < r < 1 + eh / 2
    scaled = a * (1 + beta * hh)
    if hh > 0:
        return a if in_band else scaled
    return scaled if in_band else a


def _ref_bounds(hh, eps_low, eps_high, alpha):
    if hh <= 0:
        return eps_low * (1 - alpha * hh), eps_high
    return eps_low, eps_high * (1 + alpha * hh)


def _ref_loss(lp, old, a, hh, eps_low, eps_high, alpha, beta, c):
    r = math.exp(max(-LOG_RATIO_CLAMP, min(LOG_RATIO_CLAMP, lp - old)))
    el, eh = _ref_bounds(hh, eps_low, eps_high, alpha)
    a2 = _ref_redistribute(a, r, hh, el, eh, beta)
    clipped = min(max(r, 1 - el), 1 + eh)
    loss = -min(r * a2, clipped * a2)
    if c is not None and a2 < 0:
        loss = min(loss, -c * a2)
    return loss


# ---------------------------------------------------------------- EntropyStats
def test_entropy_stats_roundtrip_and_validation():
    s = EntropyStats(m=0.5, sigma=1.5, scale_pos=2.0, scale_neg=0.25)
    assert s.to_list() == [0.5, 1.5, 2.0, 0.25]
    assert EntropyStats.from_list(s.to_list()) == s
    assert EntropyStats.from_list(torch.tensor(s.to_list(), dtype=torch.float64)) == s
    assert EntropyStats.from_list(torch.tensor(s.to_list())) == s  # all four values are exact in float32
    assert hash(s) == hash(EntropyStats(0.5, 1.5, 2.0, 0.25))  # frozen: usable as a key
    assert EntropyStats.neutral().is_neutral and not s.is_neutral
    with pytest.raises(ValueError, match="values"):
        EntropyStats.from_list([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="sigma"):
        EntropyStats(m=0.0, sigma=0.0, scale_pos=1.0, scale_neg=1.0)
    with pytest.raises(ValueError, match="scale_pos"):
        EntropyStats(m=0.0, sigma=1.0, scale_pos=-1.0, scale_neg=1.0)
    with pytest.raises(ValueError, match="EntropyStats.m"):
        EntropyStats(m=float("nan"), sigma=1.0, scale_pos=1.0, scale_neg=1.0)


def test_entropy_stats_hand():
    # H = exp(x) for x = -2..2 -> e = [-2,-1,0,1,2]; pivot 0.8: rank round(0.8*4) = 3 -> m = 1
    # h = e - m = [-3,-2,-1,0,1]; sigma = sqrt((9+4+1+0+1)/5) = sqrt(3); h/sigma = [-sqrt3, -2/sqrt3, -1/sqrt3, 0, 1/sqrt3]
    # pos_max = 1/sqrt3 -> scale_pos = sqrt3; neg_min = -sqrt3 -> scale_neg = 1/sqrt3
    # paper h_hat = [-1, -2/3, -1/3, 0, 1]; released_code h_hat = [1, 2/3, 1/3, 0, 1]
    ent = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=torch.float64).exp()
    s = entropy_stats(ent[torch.tensor([3, 0, 4, 2, 1])])  # order does not matter
    assert s.m == pytest.approx(1.0, abs=1e-12)
    assert s.sigma == pytest.approx(SQRT3, abs=1e-12)
    assert s.scale_pos == pytest.approx(SQRT3, abs=1e-12)
    assert s.scale_neg == pytest.approx(1 / SQRT3, abs=1e-12)
    paper = normalized_log_entropy(ent, s)
    torch.testing.assert_close(paper, torch.tensor([-1, -2 / 3, -1 / 3, 0, 1], dtype=torch.float64), atol=1e-12, rtol=0)
    released = normalized_log_entropy(ent, s, sign_mode="released_code")
    torch.testing.assert_close(released, torch.tensor([1, 2 / 3, 1 / 3, 0, 1], dtype=torch.float64), atol=1e-12, rtol=0)
    # pivot 0.5: rank 2 -> m = 0, h = [-2..2], sigma = sqrt(2), scales 1/sqrt2 each -> h_hat = [-1,-.5,0,.5,1]
    s2 = entropy_stats(ent, pivot=0.5)
    assert (s2.m, s2.sigma) == (pytest.approx(0.0), pytest.approx(math.sqrt(2)))
    torch.testing.assert_close(
        normalized_log_entropy(ent, s2), torch.tensor([-1, -0.5, 0, 0.5, 1], dtype=torch.float64), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("pivot", [0.0, 0.3, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_entropy_stats_and_h_hat_match_naive_loop(pivot, n):
    gen = torch.Generator().manual_seed(n)
    ent = torch.rand(n, generator=gen, dtype=torch.float64) * 3
    ent[0] = 0.0  # hits the 1e-8 floor
    s = entropy_stats(ent, pivot=pivot)
    ref = _ref_stats(ent.tolist(), pivot)
    assert s.to_list() == pytest.approx(list(ref), rel=1e-12, abs=1e-12)
    for mode in SIGN_MODES:
        hh = normalized_log_entropy(ent, s, sign_mode=mode)
        for i in range(n):
            assert hh[i].item() == pytest.approx(_ref_h_hat(ent[i].item(), s, mode), abs=1e-12)
        # on its own batch h_hat already lies in [-1, 1]: clamping changes nothing
        torch.testing.assert_close(normalized_log_entropy(ent, s, sign_mode=mode, clamp=False), hh)


def test_quantile_is_torch_nearest():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 5, 10, 33):
        x = torch.randn(n, generator=gen, dtype=torch.float64)
        for q in (0.0, 0.1, 0.25, 0.5, 0.8, 0.9, 1.0):
            expected = torch.quantile(x, q, interpolation="nearest")
            s = entropy_stats(x.exp(), pivot=q)  # e = log(exp(x)) = x
            assert s.m == pytest.approx(expected.item(), abs=1e-12)


def test_h_hat_extremes_and_sign_modes_float32():
    gen = torch.Generator().manual_seed(1)
    ent = torch.rand(1000, generator=gen) * 4
    s = entropy_stats(ent)
    paper = normalized_log_entropy(ent, s)
    released = normalized_log_entropy(ent, s, sign_mode="released_code")
    assert paper.dtype == torch.float32 and paper.shape == ent.shape
    assert paper.max().item() == pytest.approx(1.0, abs=1e-6)
    assert paper.min().item() == pytest.approx(-1.0, abs=1e-6)
    assert (released >= 0).all()
    torch.testing.assert_close(released, paper.abs())
    frac_above = (paper > 0).float().mean().item()  # pivot 0.8: ~20% of tokens above it
    assert 0.18 <= frac_above <= 0.22
    # shape is preserved for [N, T] inputs; larger entropy -> larger h_hat (monotone)
    two_d = normalized_log_entropy(ent.view(20, 50), s)
    torch.testing.assert_close(two_d.view(-1), paper)
    order = ent.argsort()
    assert (paper[order].diff() >= 0).all()


def test_h_hat_clamps_other_entropies():
    s = entropy_stats(torch.tensor([0.5, 1.0, 2.0]))
    far = torch.tensor([1e-6, 100.0])
    torch.testing.assert_close(normalized_log_entropy(far, s), torch.tensor([-1.0, 1.0]))
    raw = normalized_log_entropy(far, s, clamp=False)
    assert raw[0] < -1 and raw[1] > 1


def test_entropy_stats_all_equal_and_empty():
    # all equal: h = 0 for every token -> h_hat = 0; sigma clamped to 1e-4, nothing on either side -> scales 1e8
    ent = torch.full((6,), 0.7)
    s = entropy_stats(ent)
    assert s.m == pytest.approx(math.log(0.7), rel=1e-6)
    assert s.sigma == pytest.approx(1e-4)
    assert s.scale_pos == pytest.approx(1e8) and s.scale_neg == pytest.approx(1e8)
    for mode in SIGN_MODES:
        assert torch.equal(normalized_log_entropy(ent, s, sign_mode=mode), torch.zeros(6))
    # empty selection -> neutral stats -> h_hat = 0 for any entropy
    n = entropy_stats(torch.empty(0))
    assert n == EntropyStats.neutral()
    assert torch.equal(normalized_log_entropy(torch.tensor([1e-9, 0.3, 5.0]), n), torch.zeros(3))


def test_entropy_stats_bad_inputs():
    with pytest.raises(ValueError, match="entropies_1d"):
        entropy_stats(torch.ones(2, 3))
    with pytest.raises(ValueError, match="pivot"):
        entropy_stats(torch.ones(3), pivot=1.5)
    with pytest.raises(ValueError, match="entropies_1d"):
        entropy_stats(torch.tensor([1.0, float("nan")]))
    s = EntropyStats.neutral()
    with pytest.raises(ValueError, match="sign_mode"):
        normalized_log_entropy(torch.ones(2), s, sign_mode="abs")
    with pytest.raises(ValueError, match="log_floor"):
        normalized_log_entropy(torch.ones(2), s, log_floor=0.0)
    with pytest.raises(TypeError, match="stats"):
        normalized_log_entropy(torch.ones(2), [0.0, 1.0, 1.0, 1.0])


# ---------------------------------------------------------------- AAC
def test_adaptive_clip_bounds_hand():
    # eps 0.2 / 0.28, alpha 1:
    # h=-1 -> low 0.2*(1+1)=0.4, high 0.28;  h=-0.5 -> low 0.3;  h=0 -> base;  h=0.5 -> high 0.28*1.5=0.42;
    # h=1 -> high 0.56
    hh = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0], dtype=torch.float64)
    low, high = adaptive_clip_bounds(hh, eps_low=0.2, eps_high=0.28, alpha=1.0)
    torch.testing.assert_close(low, torch.tensor([0.4, 0.3, 0.2, 0.2, 0.2], dtype=torch.float64))
    torch.testing.assert_close(high, torch.tensor([0.28, 0.28, 0.28, 0.42, 0.56], dtype=torch.float64))
    # alpha 0.5 at h=-1: 0.2*1.5 = 0.3
    low, _ = adaptive_clip_bounds(hh[:1], eps_low=0.2, eps_high=0.28, alpha=0.5)
    assert low.item() == pytest.approx(0.3)
    # released_code sign (h >= 0): only the upper bound ever widens
    low, high = adaptive_clip_bounds(hh.abs(), eps_low=0.2, eps_high=0.2, alpha=1.0)
    assert (low == 0.2).all() and (high >= 0.2).all()


def test_adaptive_clip_bounds_alpha_zero_is_base_and_loop():
    gen = torch.Generator().manual_seed(2)
    hh = torch.rand(3, 7, generator=gen) * 2 - 1
    low, high = adaptive_clip_bounds(hh, eps_low=0.2, eps_high=0.28, alpha=0.0)
    assert torch.equal(low, torch.full_like(hh, 0.2)) and torch.equal(high, torch.full_like(hh, 0.28))
    low, high = adaptive_clip_bounds(hh.double(), eps_low=0.2, eps_high=0.28, alpha=0.7)
    for i in range(3):
        for t in range(7):
            el, eh = _ref_bounds(hh[i, t].item(), 0.2, 0.28, 0.7)
            assert (low[i, t].item(), high[i, t].item()) == (pytest.approx(el), pytest.approx(eh))
    with pytest.raises(ValueError, match="alpha"):
        adaptive_clip_bounds(hh, eps_low=0.2, eps_high=0.2, alpha=-1.0)
    with pytest.raises(ValueError, match="eps_low"):
        adaptive_clip_bounds(hh, eps_low=-0.1, eps_high=0.2, alpha=1.0)


# ---------------------------------------------------------------- DAR
def test_redistribute_hand():
    # eps 0.2/0.2 -> band (0.9, 1.1); A = 2, beta = 1; A~ = 2 (1 + h)
    # high entropy h=.5: r=1.0 in band -> A = 2;     r=1.2 out -> A~ = 3
    # low entropy h=-.5: r=1.0 in band -> A~ = 1;    r=0.8 out -> A = 2
    # h=0 counts as low entropy: A~ = A (1 + 0) = 2
    # h=-1 in band (paper sign, beta 1): A' = 2 * 0 = 0
    # released-code sign of h=-.5 is +.5: r=1.0 in band -> A = 2 (treated as high entropy)
    hh = torch.tensor([[0.5, 0.5, -0.5, -0.5, 0.0, -1.0, 0.5]], dtype=torch.float64)
    r = torch.tensor([[1.0, 1.2, 1.0, 0.8, 1.0, 1.05, 1.0]], dtype=torch.float64)
    out = redistribute_advantages(torch.tensor([2.0], dtype=torch.float64), r, hh, eps_low_t=0.2, eps_high_t=0.2, beta=1)
    torch.testing.assert_close(out, torch.tensor([[2.0, 3.0, 1.0, 2.0, 2.0, 0.0, 2.0]], dtype=torch.float64))
    # negative advantage: h=.5 out of band -> -2 * 1.5 = -3; h=-.5 in band -> -1
    out = redistribute_advantages(torch.tensor([[-2.0, -2.0]]), torch.tensor([[1.3, 1.0]]), torch.tensor([[0.5, -0.5]]),
                                  eps_low_t=0.2, eps_high_t=0.2, beta=1.0)
    torch.testing.assert_close(out, torch.tensor([[-3.0, -1.0]]))
    # beta 0.5 at h = -1 in band: A (1 - .5) = 1
    out = redistribute_advantages(torch.tensor([2.0]), torch.tensor([[1.0]]), torch.tensor([[-1.0]]),
                                  eps_low_t=0.2, eps_high_t=0.2, beta=0.5)
    assert out.item() == pytest.approx(1.0)


def test_redistribute_band_uses_adapted_bounds_and_is_open():
    # h = -1, alpha 1: eps_low_t = 0.4 -> band lower edge 0.8, so r = 0.85 is inside (with the base 0.2 it is not)
    hh = torch.tensor([[-1.0, -1.0]])
    r = torch.tensor([[0.85, 0.85]])
    low, high = adaptive_clip_bounds(hh, eps_low=0.2, eps_high=0.2, alpha=1.0)
    out = redistribute_advantages(torch.tensor([1.0]), r, hh, eps_low_t=low, eps_high_t=high, beta=0.5)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5]]))
    out = redistribute_advantages(torch.tensor([1.0]), r, hh, eps_low_t=0.2, eps_high_t=0.2, beta=0.5)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0]]))
    # open interval: eps 0.5 -> band (0.75, 1.25) exactly representable; edges are outside
    hh = torch.tensor([[-0.5, -0.5, 0.5, 0.5]])
    r = torch.tensor([[0.75, 1.25, 0.75, 1.25]])
    out = redistribute_advantages(torch.tensor([1.0]), r, hh, eps_low_t=0.5, eps_high_t=0.5, beta=1.0)
    torch.testing.assert_close(out, torch.tensor([[1.0, 1.0, 1.5, 1.5]]))


@pytest.mark.parametrize("sign_mode", SIGN_MODES)
def test_redistribute_matches_naive_loop(sign_mode):
    gen = torch.Generator().manual_seed(3)
    n, t = 4, 9
    ent = torch.rand(n, t, generator=gen, dtype=torch.float64) * 3
    hh = normalized_log_entropy(ent, entropy_stats(ent.view(-1)), sign_mode=sign_mode)
    r = 1 + (torch.rand(n, t, generator=gen, dtype=torch.float64) - 0.5) * 0.6  # some in, some out of the band
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    low, high = adaptive_clip_bounds(hh, eps_low=0.2, eps_high=0.28, alpha=1.0)
    out = redistribute_advantages(adv, r, hh, eps_low_t=low, eps_high_t=high, beta=0.8)
    changed = 0
    for i in range(n):
        for j in range(t):
            ref = _ref_redistribute(adv[i].item(), r[i, j].item(), hh[i, j].item(), low[i, j].item(),
                                    high[i, j].item(), 0.8)
            assert out[i, j].item() == pytest.approx(ref, abs=1e-12)
            changed += ref != adv[i].item()
    assert 0 < changed < n * t


def test_redistribute_beta_zero_and_gradients():
    gen = torch.Generator().manual_seed(4)
    adv = torch.randn(3, 5, generator=gen)
    r = (1 + torch.randn(3, 5, generator=gen) * 0.2).requires_grad_(True)
    hh = torch.rand(3, 5, generator=gen) * 2 - 1
    assert torch.equal(redistribute_advantages(adv, r, hh, eps_low_t=0.2, eps_high_t=0.2, beta=0.0), adv)
    a = adv.clone().requires_grad_(True)
    out = redistribute_advantages(a, r, hh, eps_low_t=0.2, eps_high_t=0.2, beta=1.0)
    out.sum().backward()
    assert r.grad is None  # the ratio only selects the branch
    expected = torch.where(out.detach() == adv, torch.ones_like(adv), 1 + hh)
    torch.testing.assert_close(a.grad, expected)


def test_redistribute_bad_inputs():
    r = torch.ones(2, 3)
    with pytest.raises(ValueError, match="ratio"):
        redistribute_advantages(torch.ones(2), r, torch.ones(2, 4), eps_low_t=0.2, eps_high_t=0.2, beta=1.0)
    with pytest.raises(ValueError, match="advantages"):
        redistribute_advantages(torch.ones(3), r, r, eps_low_t=0.2, eps_high_t=0.2, beta=1.0)
    with pytest.raises(ValueError, match="beta"):
        redistribute_advantages(torch.ones(2), r, r, eps_low_t=0.2, eps_high_t=0.2, beta=-1.0)
    with pytest.raises(ValueError, match="eps_high_t"):
        redistribute_advantages(torch.ones(2), r, r, eps_low_t=0.2, eps_high_t=torch.ones(4), beta=1.0)


# ---------------------------------------------------------------- full HAPO surrogate
def _batch(seed, n=4, t=6, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    logp = (torch.randn(n, t, generator=gen, dtype=dtype) * 0.2 - 1.0).requires_grad_(True)
    old = logp.detach() + torch.randn(n, t, generator=gen, dtype=dtype) * 0.2
    adv = torch.randn(n, generator=gen, dtype=dtype)
    ent = torch.rand(n, t, generator=gen, dtype=dtype) * 3
    mask = torch.rand(n, t, generator=gen) > 0.2
    return logp, old, adv, ent, mask


@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.37)])
def test_hapo_alpha_beta_zero_is_exactly_ppo(eps):
    logp, old, adv, ent, mask = _batch(5)
    hh = normalized_log_entropy(ent, entropy_stats(ent[mask]))
    a = logp.detach().clone().requires_grad_(True)
    b = logp.detach().clone().requires_grad_(True)
    ours, om = hapo_surrogate(a, old, adv, hh, eps_low=eps[0], eps_high=eps[1], alpha=0.0, beta=0.0, mask=mask)
    ref, rm = clipped_surrogate(b, old, adv, eps_low=eps[0], eps_high=eps[1], mask=mask)
    assert torch.equal(ours, ref)
    assert (ours != 0).any()
    aggregate_token_mean(ours, mask, num_tokens=mask.sum()).backward()
    aggregate_token_mean(ref, mask, num_tokens=mask.sum()).backward()
    assert torch.equal(a.grad, b.grad)
    assert torch.equal(om["clip/low_frac"], rm["clip/low_frac"])
    assert torch.equal(om["clip/high_frac"], rm["clip/high_frac"])
    assert om["hapo/adv_changed_frac"].item() == 0.0
    # neutral stats (h_hat = 0) reduce to PPO as well, whatever alpha and beta
    zero = normalized_log_entropy(ent, EntropyStats.neutral())
    ours, _ = hapo_surrogate(logp, old, adv, zero, eps_low=eps[0], eps_high=eps[1], alpha=1.0, beta=1.0)
    assert torch.equal(ours, clipped_surrogate(logp, old, adv, eps_low=eps[0], eps_high=eps[1])[0])


@pytest.mark.parametrize("sign_mode", SIGN_MODES)
@pytest.mark.parametrize("clip_ratio_c", [None, 3.0])
def test_hapo_surrogate_matches_naive_loop(sign_mode, clip_ratio_c):
    logp, old, adv, ent, mask = _batch(6, dtype=torch.float64)
    old = old.clone()
    old[0, 0] = logp[0, 0].detach() + 2.0  # ratio e^-2 = 0.135: far below any lower bound
    old[1, 1] = logp[1, 1].detach() - 2.0  # ratio e^2 = 7.4 ...
    adv = adv.clone()
    adv[1] = -abs(adv[1]) - 0.5  # ... with A < 0: the dual clip (c = 3) caps this token
    old[2, 2] = logp[2, 2].detach() + 100.0  # log-ratios beyond the clamp at +-20
    old[3, 3] = logp[3, 3].detach() - 100.0
    hh = normalized_log_entropy(ent, entropy_stats(ent[mask]), sign_mode=sign_mode)
    loss, metrics = hapo_surrogate(logp, old, adv, hh, eps_low=0.2, eps_high=0.28, alpha=1.0, beta=1.0,
                                   clip_ratio_c=clip_ratio_c, mask=mask)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            ref = _ref_loss(logp[i, t].item(), old[i, t].item(), adv[i].item(), hh[i, t].item(), 0.2, 0.28, 1.0,
                            1.0, clip_ratio_c)
            assert loss[i, t].item() == pytest.approx(ref, rel=1e-12, abs=1e-12)
    if clip_ratio_c is not None:
        assert metrics["clip/dual_frac"].item() > 0
    assert 0 < metrics["hapo/adv_changed_frac"].item() < 1
    if sign_mode == "released_code":
        assert metrics["hapo/eps_low_mean"].item() == pytest.approx(0.2)


def test_hapo_hand_token():
    # one token: r = 1.3, A = 1, h_hat = 0.5, eps .2/.2, alpha = beta = 1
    # AAC: eps_high_t = 0.2 * 1.5 = 0.3 -> clip range [0.8, 1.3]
    # DAR: band (0.9, 1.15), r = 1.3 outside, high entropy -> A' = 1 * 1.5 = 1.5
    # loss = -min(1.3 * 1.5, clip(1.3) * 1.5) = -1.95
    logp = torch.tensor([[math.log(1.3)]], dtype=torch.float64)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, _ = hapo_surrogate(logp, old, torch.tensor([1.0], dtype=torch.float64), torch.tensor([[0.5]]),
                             eps_low=0.2, eps_high=0.2, alpha=1.0, beta=1.0)
    assert loss.item() == pytest.approx(-1.95)
    # same token, A = -1, dual clip c = 1.2: A' = -1.5, PPO loss = max(1.3*1.5, 1.3*1.5) = 1.95, capped at 1.2*1.5 = 1.8
    loss, m = hapo_surrogate(logp, old, torch.tensor([-1.0], dtype=torch.float64), torch.tensor([[0.5]]),
                             eps_low=0.2, eps_high=0.2, alpha=1.0, beta=1.0, clip_ratio_c=1.2)
    assert loss.item() == pytest.approx(1.8)
    assert m["clip/dual_frac"].item() == 1.0


@pytest.mark.parametrize("clip_ratio_c", [None, 3.0])
def test_hapo_huge_log_ratios_give_finite_loss_and_grads(clip_ratio_c):
    # float32, log-ratios +-200 (exp(200) = inf without the clamp) on tokens of both entropy sides, A = +-1.
    # With h_hat = 0 (alpha, beta have no effect) the loss is PPO's on r = e^+-20: row0 A=+1 -> [-1.2, -e^-20],
    # row1 A=-1 -> [e^20 (or 3 with the dual clip), 0.8]; no gradient anywhere (clipped or clamped).
    d = torch.tensor([[200.0, -200.0], [200.0, -200.0]])
    logp = d.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0])
    loss, m = hapo_surrogate(logp, torch.zeros_like(d), adv, torch.zeros_like(d), clip_ratio_c=clip_ratio_c)
    row1 = [3.0 if clip_ratio_c else math.exp(20), 0.8]
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -math.exp(-20)], row1]), rtol=1e-6, atol=0)
    aggregate_token_mean(loss, torch.ones_like(d, dtype=torch.bool), num_tokens=4).backward()
    assert torch.equal(logp.grad, torch.zeros_like(d))
    assert all(torch.isfinite(v) for v in m.values())
    # with adaptive terms on (h_hat = +-1) the loss and gradients stay finite
    logp2 = d.clone().requires_grad_(True)
    h_hat = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    loss2, m2 = hapo_surrogate(logp2, torch.zeros_like(d), adv, h_hat, clip_ratio_c=clip_ratio_c)
    loss2.sum().backward()
    assert torch.isfinite(loss2).all() and torch.isfinite(logp2.grad).all()
    assert all(torch.isfinite(v) for v in m2.values())


def test_hapo_loss_independent_of_micro_batch_split():
    # batch-global stats: the token-mean loss summed over micro-batches equals the full-batch loss
    logp, old, adv, ent, mask = _batch(7, n=6, t=5, dtype=torch.float64)
    stats = entropy_stats(ent[mask])
    total = mask.sum()

    def loss_of(rows):
        hh = normalized_log_entropy(ent[rows], stats)
        per_tok, _ = hapo_surrogate(logp[rows], old[rows], adv[rows], hh, mask=mask[rows], clip_ratio_c=3.0)
        return aggregate_token_mean(per_tok, mask[rows], num_tokens=total)

    full = loss_of(slice(0, 6))
    split = loss_of(slice(0, 1)) + loss_of(slice(1, 4)) + loss_of(slice(4, 6))
    torch.testing.assert_close(split, full, atol=1e-12, rtol=0)


def test_hapo_surrogate_bad_inputs():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="h_hat"):
        hapo_surrogate(x, x, torch.ones(2), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="clip_ratio_c"):
        hapo_surrogate(x, x, torch.ones(2), x, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="advantages"):
        hapo_surrogate(x, x, torch.ones(3), x)
    with pytest.raises(ValueError, match="mask"):
        hapo_surrogate(x, x, torch.ones(2), x, mask=torch.ones(3, 2))


# ---------------------------------------------------------------- ATS
def test_logits_entropy_matches_loop_and_handles_minus_inf():
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    logits[1, 2:] = float("-inf")
    ent = logits_entropy(logits)
    for b in range(3):
        row = [v for v in logits[b].tolist() if v != float("-inf")]
        lse = math.log(sum(math.exp(v) for v in row))
        assert ent[b].item() == pytest.approx(-sum(math.exp(v - lse) * (v - lse) for v in row), abs=1e-12)
    assert logits_entropy(torch.zeros(2, 4, dtype=torch.bfloat16)).dtype == torch.float32


# Stats for the hand case: m = log(ln 2) = -0.366513, sigma = 0.5, scale_pos = 0.5, scale_neg = 0.4; T0 0.8, tau 0.1.
# h = (log(max(H, 1e-6)) - m) / (0.5 + 1e-6)
#   uniform over 4: H = ln 4,   h = 0.693147 / 0.500001 = 1.386292, h_hat = 0.693146 -> T = 0.8 * 1.0693146 = 0.855452
#   uniform over 2: H = ln 2,   h = 0 -> T = 0.8
#   p = (.25,.75):  H = 0.562335, h = (-0.575657 + 0.366513) / 0.500001 = -0.418288, h_hat = -0.167315
#                   -> paper T = 0.8 * (1 - 0.0167315) = 0.786615; released T = 0.8 * 1.0167315 = 0.813385
#   [20, 0, 0, 0]:  H = 1.3e-7 -> floor 1e-6, h = -26.898, h_hat clamps to -1 (paper) / +1 (released)
#                   -> T = 0.72 / 0.88
HAND_STATS = EntropyStats(m=math.log(math.log(2)), sigma=0.5, scale_pos=0.5, scale_neg=0.4)
HAND_LOGITS = torch.tensor(
    [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -math.inf, -math.inf], [0.0, math.log(3), -math.inf, -math.inf],
     [20.0, 0.0, 0.0, 0.0]]
)


@pytest.mark.parametrize(
    "sign_mode, expected",
    [("paper", [0.855452, 0.8, 0.786615, 0.72]), ("released_code", [0.855452, 0.8, 0.813385, 0.88])],
)
def test_adaptive_temperature_hand(sign_mode, expected):
    temps = adaptive_temperature(HAND_LOGITS, base_temperature=0.8, stats=HAND_STATS, tau=0.1, sign_mode=sign_mode)
    assert temps.dtype == torch.float32 and temps.shape == (4,)
    torch.testing.assert_close(temps, torch.tensor(expected), atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    "sign_mode, expected",
    [("paper", [0.855452, 0.8, 0.786615, 0.72]), ("released_code", [0.855452, 0.8, 0.813385, 0.88])],
)
def test_temperature_from_entropy_hand(sign_mode, expected):
    """The same hand case from the entropies (ln 4, ln 2, H(.25,.75), ~0) laid out as [2, 2]."""
    entropy = torch.tensor([[math.log(4), math.log(2)], [0.562335, 1.3e-7]])
    temps = temperature_from_entropy(entropy, base_temperature=0.8, stats=HAND_STATS, tau=0.1, sign_mode=sign_mode)
    torch.testing.assert_close(temps.flatten(), torch.tensor(expected), atol=2e-6, rtol=0)


@pytest.mark.parametrize("sign_mode", SIGN_MODES)
def test_adaptive_temperature_matches_naive_loop(sign_mode):
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(6, 11, generator=gen) * torch.tensor([0.1, 0.5, 1, 2, 4, 8])[:, None]
    stats = entropy_stats(logits_entropy(torch.randn(50, 11, generator=gen) * 2))
    temps = adaptive_temperature(logits, base_temperature=1.0, stats=stats, tau=0.05, sign_mode=sign_mode)
    for b in range(6):
        row = logits[b].double().tolist()
        lse = math.log(sum(math.exp(v) for v in row))
        ent = -sum(math.exp(v - lse) * (v - lse) for v in row)
        hh = _ref_h_hat(ent, stats, sign_mode, floor=1e-6, sigma_eps=1e-6)
        assert temps[b].item() == pytest.approx(1.0 * (1 + 0.05 * hh), abs=1e-6)
    assert temps.min() >= 0.95 - 1e-6 and temps.max() <= 1.05 + 1e-6
    assert len(set(temps.tolist())) > 1


def test_adaptive_temperature_reductions_and_errors():
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(5, 9, generator=gen) * 3
    for stats in (HAND_STATS, None, EntropyStats.neutral()):
        temps = adaptive_temperature(logits, base_temperature=0.7, stats=stats, tau=0.0)
        assert torch.equal(temps, torch.full((5,), 0.7))
    assert torch.equal(adaptive_temperature(logits, base_temperature=0.7, stats=None, tau=0.3), torch.full((5,), 0.7))
    torch.testing.assert_close(  # neutral stats: h_hat = 0 -> T0 whatever tau
        adaptive_temperature(logits, base_temperature=0.7, stats=EntropyStats.neutral(), tau=0.3),
        torch.full((5,), 0.7),
    )
    with pytest.raises(ValueError, match="logits"):
        adaptive_temperature(logits[0], base_temperature=1.0, stats=HAND_STATS, tau=0.1)
    with pytest.raises(ValueError, match="base_temperature"):
        adaptive_temperature(logits, base_temperature=0.0, stats=HAND_STATS, tau=0.1)
    with pytest.raises(ValueError, match="tau"):
        adaptive_temperature(logits, base_temperature=1.0, stats=HAND_STATS, tau=1.0)
    with pytest.raises(ValueError, match="sign_mode"):
        adaptive_temperature(logits, base_temperature=1.0, stats=HAND_STATS, tau=0.1, sign_mode="x")
    with pytest.raises(ValueError, match="stats"):
        adaptive_temperature(logits, base_temperature=1.0, stats=[0, 1, 1, 1], tau=0.1)
