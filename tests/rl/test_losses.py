import math

import pytest
import torch

from reasonrl.rl.losses import (
    KL_ESTIMATORS,
    LOG_RATIO_CLAMP,
    LOSS_AGGREGATIONS,
    aggregate_loss,
    aggregate_token_mean,
    clipped_surrogate,
    entropy_term,
    k3_kl,
    kl_estimate,
    policy_ratio,
    token_logprobs_and_entropy,
)


def _ref_logp_ent(logits, targets, temperature=1.0):
    lsm = torch.log_softmax(logits.float() / temperature, dim=-1)
    return lsm.gather(-1, targets[..., None]).squeeze(-1), -(lsm.exp() * lsm).sum(-1)


# ---------------------------------------------------------------- logprobs / entropy
def test_logprobs_hand():
    # logits [0, ln 3] -> p = [.25, .75]; target 1 -> logp = ln .75 = -0.287682
    # H = .25*ln4 + .75*ln(4/3) = .346574 + .215762 = .562335
    # temperature 2 with logits [0, 2 ln 3] gives the same distribution.
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 2 * math.log(3)]]])
    lp, ent = token_logprobs_and_entropy(logits[:, :1], torch.tensor([[1]]))
    torch.testing.assert_close(lp, torch.tensor([[-0.287682]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, torch.tensor([[0.562335]]), atol=1e-5, rtol=0)
    lp2, ent2 = token_logprobs_and_entropy(logits[:, 1:], torch.tensor([[1]]), temperature=2.0)
    torch.testing.assert_close(lp2, lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent2, ent, atol=1e-5, rtol=0)


def test_logprobs_naive_loop():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, 5, (2, 3), generator=gen)
    lp, ent = token_logprobs_and_entropy(logits, targets, chunk_size=4)
    for b in range(2):
        for t in range(3):
            row = logits[b, t].tolist()
            lse = math.log(sum(math.exp(x) for x in row))
            ps = [math.exp(x - lse) for x in row]
            assert lp[b, t].item() == pytest.approx(row[targets[b, t]] - lse, abs=1e-12)
            assert ent[b, t].item() == pytest.approx(-sum(p * math.log(p) for p in ps), abs=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_matches_reference_values_and_grads(chunk_size, temperature):
    gen = torch.Generator().manual_seed(chunk_size)
    base = torch.randn(3, 5, 11, generator=gen)
    targets = torch.randint(0, 11, (3, 5), generator=gen)
    w1, w2 = torch.randn(3, 5, generator=gen), torch.randn(3, 5, generator=gen)
    a = base.clone().requires_grad_(True)
    b = base.clone().requires_grad_(True)
    lp, ent = token_logprobs_and_entropy(a, targets, chunk_size=chunk_size, temperature=temperature)
    rlp, rent = _ref_logp_ent(b, targets, temperature)
    torch.testing.assert_close(lp, rlp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, rent, atol=1e-6, rtol=1e-6)
    ((lp * w1).sum() + (ent * w2).sum()).backward()
    ((rlp * w1).sum() + (rent * w2).sum()).backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    # only-logp and only-entropy paths
    a.grad = None
    b.grad = None
    token_logprobs_and_entropy(a, targets, chunk_size=chunk_size, temperature=temperature)[1].sum().backward()
    _ref_logp_ent(b, targets, temperature)[1].sum().backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_logprobs_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    tg = torch.randint(0, 4, (2, 2), generator=gen)
    assert torch.autograd.gradcheck(
        lambda z: token_logprobs_and_entropy(z, tg, chunk_size=3, temperature=0.9), (x,)
    )


def test_logprobs_bad_inputs():
    with pytest.raises(ValueError):
        token_logprobs_and_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        token_logprobs_and_entropy(torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        token_logprobs_and_entropy(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError):
        token_logprobs_and_entropy(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), temperature=0.0)


# ---------------------------------------------------------------- clipped surrogate
def _hand_case():
    # row0 A=+1, ratios [1.5, .5, 1.5(masked)]; row1 A=-1, ratios [.5, 1.5, 1.0]
    ratios = torch.tensor([[1.5, 0.5, 1.5], [0.5, 1.5, 1.0]], dtype=torch.float64)
    old = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return ratios.log(), old, torch.tensor([1.0, -1.0], dtype=torch.float64), mask


def test_clipped_surrogate_hand():
    # row0: r=1.5,A=1 -> -min(1.5, 1.2) = -1.2 (high clip); r=.5,A=1 -> -min(.5,.8) = -.5
    # row1: r=.5,A=-1 -> -min(-.5,-.8) = .8 (low clip); r=1.5,A=-1 -> -min(-1.5,-1.2) = 1.5; r=1 -> 1
    # 5 valid tokens: 1 high clip, 1 low clip -> both fractions .2 (masked r=1.5,A=1 not counted)
    logp, old, adv, mask = _hand_case()
    logp.requires_grad_(True)
    loss, m = clipped_surrogate(logp, old, adv, mask=mask)
    exp = torch.tensor([[-1.2, -0.5, -1.2], [0.8, 1.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(loss, exp)
    assert m["clip/high_frac"].item() == pytest.approx(0.2)
    assert m["clip/low_frac"].item() == pytest.approx(0.2)
    assert m["clip/low_frac"].dim() == 0 and not m["clip/low_frac"].requires_grad
    # d loss/d logp = -A*r where unclipped, 0 where clipped
    loss.sum().backward()
    exp_g = torch.tensor([[0.0, -0.5, 0.0], [0.0, 1.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, exp_g)


def test_clipped_surrogate_asymmetric_and_per_token_adv():
    # eps_high=.6: r=1.5,A=1 no longer clipped -> loss -1.5, high_frac 0
    logp, old, adv, mask = _hand_case()
    loss, m = clipped_surrogate(logp, old, adv[:, None].expand(2, 3), eps_low=0.2, eps_high=0.6, mask=mask)
    assert loss[0, 0].item() == pytest.approx(-1.5)
    assert m["clip/high_frac"].item() == 0.0
    assert m["clip/low_frac"].item() == pytest.approx(0.2)


@pytest.mark.parametrize("scale", [0.3, 40.0])  # 40: log-ratios beyond the clamp at +-20
def test_clipped_surrogate_naive_loop(scale):
    gen = torch.Generator().manual_seed(5)
    logp = torch.randn(3, 4, generator=gen, dtype=torch.float64) * scale
    old = torch.randn(3, 4, generator=gen, dtype=torch.float64) * scale
    adv = torch.randn(3, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 4, generator=gen) > 0.3
    loss, m = clipped_surrogate(logp, old, adv, eps_low=0.1, eps_high=0.25, mask=mask)
    lo = hi = n = 0
    for i in range(3):
        for t in range(4):
            d = logp[i, t].item() - old[i, t].item()
            r = math.exp(max(-LOG_RATIO_CLAMP, min(LOG_RATIO_CLAMP, d)))
            a = adv[i].item()
            exp = -min(r * a, min(max(r, 0.9), 1.25) * a)
            assert loss[i, t].item() == pytest.approx(exp, rel=1e-12, abs=1e-12)
            if mask[i, t]:
                n += 1
                lo += r < 0.9 and a < 0
                hi += r > 1.25 and a > 0
    assert m["clip/low_frac"].item() == pytest.approx(lo / n)
    assert m["clip/high_frac"].item() == pytest.approx(hi / n)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_huge_log_ratios_give_finite_loss_and_grads(dual_clip):
    # float32, log-ratios d = [+200, -200, +10] (exp(200) = inf in float32 without the clamp at 20), eps 0.2/0.2:
    # row0 A=+1: d=200  r=e^20 -> -min(e^20, 1.2) = -1.2 (high clip, grad 0)
    #            d=-200 r=e^-20 -> -e^-20 (unclipped; grad 0: the clamp is active)
    #            d=10   r=e^10 -> -1.2 (high clip, grad 0)
    # row1 A=-1: d=200  -> e^20 = 4.85e8 (unclipped; grad 0), with dual clip c=3: min(e^20, 3) = 3
    #            d=-200 -> -min(-e^-20, -0.8) = 0.8 (low clip, grad 0)
    #            d=10   -> e^10 (unclipped; grad -A r = e^10, inside the clamp), dual clip: 3 (grad 0)
    d = torch.tensor([[200.0, -200.0, 10.0], [200.0, -200.0, 10.0]])
    logp = d.clone().requires_grad_(True)
    loss, m = clipped_surrogate(logp, torch.zeros_like(d), torch.tensor([1.0, -1.0]), dual_clip=dual_clip)
    e20, e10 = math.exp(20), math.exp(10)
    row1 = [3.0, 0.8, 3.0] if dual_clip else [e20, 0.8, e10]
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -math.exp(-20), -1.2], row1]), rtol=1e-6, atol=0)
    total = aggregate_loss(loss, torch.ones_like(d, dtype=torch.bool), mode="token_mean", num_tokens=6)
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in m.values())
    grad1 = [0.0, 0.0, 0.0] if dual_clip else [0.0, 0.0, e10]
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], grad1]) / 6, rtol=1e-6, atol=0)
    assert LOG_RATIO_CLAMP == 20.0
    torch.testing.assert_close(policy_ratio(d, torch.zeros_like(d)), torch.tensor([[e20, math.exp(-20), e10]] * 2))


def test_clipped_surrogate_bad_inputs():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        clipped_surrogate(z, torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError):
        clipped_surrogate(z, z, torch.zeros(3))
    with pytest.raises(ValueError):
        clipped_surrogate(z, z, torch.zeros(2), mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        clipped_surrogate(z, z, torch.zeros(2), eps_low=-0.1)


# ---------------------------------------------------------------- k3 / aggregation
def test_k3_hand_and_nonneg():
    # logp=0, ref=ln2: d=.693147 -> 2 - .693147 - 1 = .306853
    # logp=ln2, ref=0: d=-.693147 -> .5 + .693147 - 1 = .193147; equal -> 0
    ln2 = math.log(2)
    kl = k3_kl(torch.tensor([[0.0, ln2, 0.3]]), torch.tensor([[ln2, 0.0, 0.3]]))
    torch.testing.assert_close(kl, torch.tensor([[0.306853, 0.193147, 0.0]]), atol=1e-6, rtol=0)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    assert (k3_kl(x, x.flip(0)) >= 0).all()
    with pytest.raises(ValueError):
        k3_kl(torch.zeros(2, 3), torch.zeros(2, 2))


def test_k3_clamps_huge_log_ratios():
    # d = ref - logp clamped to [-20, 20]: d=200 -> e^20 - 20 - 1, d=-200 -> e^-20 + 20 - 1 (both grad 0);
    # d=5 inside: e^5 - 6, d k3/d logp = 1 - e^5. float32: without the clamp exp(200) is inf.
    logp = torch.tensor([[-200.0, 200.0, -5.0]], requires_grad=True)
    kl = k3_kl(logp, torch.zeros(1, 3))
    exp = torch.tensor([[math.exp(20) - 21, math.exp(-20) + 19, math.exp(5) - 6]])
    torch.testing.assert_close(kl, exp, rtol=1e-6, atol=0)
    kl.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 1 - math.exp(5)]]), rtol=1e-6, atol=0)


def test_k3_naive_loop_with_clamp():
    gen = torch.Generator().manual_seed(12)
    logp = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 30
    ref = torch.randn(3, 5, generator=gen, dtype=torch.float64) * 30
    kl = kl_estimate(logp, ref, "k3")
    for i in range(3):
        for t in range(5):
            d = max(-20.0, min(20.0, ref[i, t].item() - logp[i, t].item()))
            assert kl[i, t].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-12, abs=1e-12)


def test_aggregate_hand():
    # valid entries 1, 2, 4 -> sum 7; /3 = 2.333333; /6 = 1.166667; nan in a masked slot is ignored
    pt = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert aggregate_token_mean(pt, mask, num_tokens=3).item() == pytest.approx(7 / 3)
    assert aggregate_token_mean(pt, mask, num_tokens=torch.tensor(6.0)).item() == pytest.approx(7 / 6)
    with pytest.raises(ValueError):
        aggregate_token_mean(pt, mask, num_tokens=0)
    with pytest.raises(ValueError):
        aggregate_token_mean(pt, mask[:, :2], num_tokens=3)


# ---------------------------------------------------------------- end-to-end invariances
H, V, T = 6, 9, 5


def _setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Linear(H, V)
    x = torch.randn(4, T, H, generator=gen)
    targets = torch.randint(0, V, (4, T), generator=gen)
    lengths = torch.tensor([5, 2, 4, 1])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    with torch.no_grad():
        lp0, _ = token_logprobs_and_entropy(model(x), targets)
    old = lp0 + 0.3 * torch.randn(4, T, generator=gen)
    ref = lp0 + 0.2 * torch.randn(4, T, generator=gen)
    adv = torch.randn(4, generator=gen)
    return model, x, targets, mask, old, ref, adv


def _loss(model, x, targets, mask, old, ref, adv, num_tokens, chunk_size=3):
    lp, ent = token_logprobs_and_entropy(model(x), targets, chunk_size=chunk_size)
    pg, _ = clipped_surrogate(lp, old, adv, mask=mask)
    per_token = pg + 0.05 * k3_kl(lp, ref) - 0.01 * ent
    return aggregate_token_mean(per_token, mask, num_tokens=num_tokens)


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("split", [(1, 3), (2, 2)])
def test_microbatch_accumulation_matches_full_batch(split):
    model, x, targets, mask, old, ref, adv = _setup()
    n_tok = mask.sum()
    full = _loss(model, x, targets, mask, old, ref, adv, n_tok)
    full.backward()
    g_full = _grads(model)
    model.zero_grad()
    total, s = 0.0, 0
    for size in split:
        sl = slice(s, s + size)
        part = _loss(model, x[sl], targets[sl], mask[sl], old[sl], ref[sl], adv[sl], n_tok)
        part.backward()
        total += part.item()
        s += size
    assert total == pytest.approx(full.item(), abs=1e-6)
    for a, b in zip(_grads(model), g_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_padding_extra_masked_tokens_invariant():
    model, x, targets, mask, old, ref, adv = _setup(1)
    n_tok = mask.sum()
    base = _loss(model, x, targets, mask, old, ref, adv, n_tok)
    base.backward()
    g_base = _grads(model)
    model.zero_grad()
    pad = 3
    gen = torch.Generator().manual_seed(9)
    x2 = torch.cat([x, 5 * torch.randn(4, pad, H, generator=gen)], 1)
    t2 = torch.cat([targets, torch.randint(0, V, (4, pad), generator=gen)], 1)
    m2 = torch.cat([mask, torch.zeros(4, pad, dtype=torch.bool)], 1)
    old2 = torch.cat([old, -50 * torch.ones(4, pad)], 1)  # huge ratios in the padding
    ref2 = torch.cat([ref, 30 * torch.ones(4, pad)], 1)
    padded = _loss(model, x2, t2, m2, old2, ref2, adv, m2.sum())
    padded.backward()
    torch.testing.assert_close(padded, base, atol=1e-6, rtol=0)
    for a, b in zip(_grads(model), g_base):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- dual clip
def test_dual_clip_hand_negative_side():
    # c = 3, eps 0.2/0.2. Row0 A=-1, ratios [4, 2, .5, 5(masked)]; row1 A=-2, ratios [3.5, 1, 1, 1]
    # row0: r=4: max(-A r, -A clip r) = max(4, 1.2) = 4 > -A c = 3 -> 3 (dual, no grad)
    #       r=2: max(2, 1.2) = 2 < 3 -> 2 (grad d/dlogp = -A r = 2)
    #       r=.5: max(.5, .8) = .8 (low clip, no grad);  masked r=5 -> 3 (capped but not counted)
    # row1: r=3.5: max(7, 2.4) = 7 > 6 -> 6 (dual);  r=1: 2, grad -A r = 2
    # 7 valid tokens, 2 dual-capped -> dual_frac 2/7; low clip only r=.5 -> 1/7 (r=4, 3.5 are above, not below)
    ratios = torch.tensor([[4.0, 2.0, 0.5, 5.0], [3.5, 1.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    loss, m = clipped_surrogate(logp, torch.zeros_like(logp), adv, mask=mask, dual_clip=3.0)
    exp = torch.tensor([[3.0, 2.0, 0.8, 3.0], [6.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(loss, exp)
    assert m["clip/dual_frac"].item() == pytest.approx(2 / 7)
    assert m["clip/low_frac"].item() == pytest.approx(1 / 7)
    assert m["clip/high_frac"].item() == 0.0
    assert not m["clip/dual_frac"].requires_grad and m["clip/dual_frac"].dim() == 0
    loss.sum().backward()
    exp_g = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, exp_g)
    # without dual clip: r=4 -> 4, r=3.5 -> 7, with gradients -A r = 4 and 7
    plain, pm = clipped_surrogate(ratios.log(), torch.zeros_like(ratios), adv, mask=mask)
    assert plain[0, 0].item() == pytest.approx(4.0) and plain[1, 0].item() == pytest.approx(7.0)
    assert pm["clip/dual_frac"].item() == 0.0


def test_dual_clip_hand_positive_side_untouched():
    # A=+1 with r=4 (c=3): -min(4, 1.2) = -1.2, the dual cap never applies to A >= 0; A=0 -> 0
    ratios = torch.tensor([[4.0, 0.5], [4.0, 0.5]], dtype=torch.float64)
    adv = torch.tensor([1.0, 0.0], dtype=torch.float64)
    loss, m = clipped_surrogate(ratios.log(), torch.zeros_like(ratios), adv, dual_clip=3.0)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -0.5], [0.0, 0.0]], dtype=torch.float64))
    assert m["clip/dual_frac"].item() == 0.0
    assert m["clip/high_frac"].item() == pytest.approx(0.25)
    # per-token advantages of both signs in one row: [+1, -1] at r=4 -> [-1.2, min(4, 3) = 3]
    adv_t = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    lt, mt = clipped_surrogate(torch.full((1, 2), math.log(4.0), dtype=torch.float64), torch.zeros(1, 2,
                               dtype=torch.float64), adv_t, dual_clip=3.0)
    torch.testing.assert_close(lt, torch.tensor([[-1.2, 3.0]], dtype=torch.float64))
    assert mt["clip/dual_frac"].item() == pytest.approx(0.5)


def test_dual_clip_naive_loop():
    gen = torch.Generator().manual_seed(11)
    logp = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    old = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    adv = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 6, generator=gen) > 0.2
    c, lo_e, hi_e = 2.5, 0.2, 0.28
    loss, m = clipped_surrogate(logp, old, adv, eps_low=lo_e, eps_high=hi_e, mask=mask, dual_clip=c)
    n = dual = 0
    for i in range(4):
        for t in range(6):
            r = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i, t].item()
            base = max(-a * r, -a * min(max(r, 1 - lo_e), 1 + hi_e))
            exp = min(base, -a * c) if a < 0 else base
            assert loss[i, t].item() == pytest.approx(exp, abs=1e-12)
            if mask[i, t]:
                n += 1
                dual += a < 0 and base > -a * c
    assert dual > 0
    assert m["clip/dual_frac"].item() == pytest.approx(dual / n)


# ---------------------------------------------------------------- per-token bounds
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_token_bounds_equal_float_bounds_when_constant(dtype):
    gen = torch.Generator().manual_seed(2)
    base = (torch.randn(3, 5, generator=gen) * 0.4).to(dtype)
    old = (torch.randn(3, 5, generator=gen) * 0.4).to(dtype)
    adv = torch.randn(3, generator=gen).to(dtype)
    mask = torch.rand(3, 5, generator=gen) > 0.2
    a, b = base.clone().requires_grad_(True), base.clone().requires_grad_(True)
    lf, mf = clipped_surrogate(a, old, adv, eps_low=0.2, eps_high=0.28, mask=mask, dual_clip=3.0)
    lt, mt = clipped_surrogate(b, old, adv, eps_low=torch.full((3, 5), 0.2, dtype=dtype),
                               eps_high=torch.full((3, 5), 0.28, dtype=dtype), mask=mask, dual_clip=3.0)
    assert torch.equal(lf, lt)
    for k in mf:
        assert torch.equal(mf[k], mt[k]), k
    lf.sum().backward()
    lt.sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_per_token_bounds_naive_loop_and_no_grad_into_bounds():
    gen = torch.Generator().manual_seed(4)
    logp = torch.randn(3, 4, generator=gen, dtype=torch.float64) * 0.4
    old = torch.randn(3, 4, generator=gen, dtype=torch.float64) * 0.4
    adv = torch.randn(3, generator=gen, dtype=torch.float64)
    el = (0.1 + 0.3 * torch.rand(3, 4, generator=gen, dtype=torch.float64)).requires_grad_(True)
    eh = 0.1 + 0.3 * torch.rand(3, 4, generator=gen, dtype=torch.float64)
    loss, m = clipped_surrogate(logp, old, adv, eps_low=el, eps_high=eh)
    lo = hi = 0
    for i in range(3):
        for t in range(4):
            r = math.exp(logp[i, t].item() - old[i, t].item())
            a, l_, h_ = adv[i].item(), el[i, t].item(), eh[i, t].item()
            assert loss[i, t].item() == pytest.approx(-min(r * a, min(max(r, 1 - l_), 1 + h_) * a), abs=1e-12)
            lo += r < 1 - l_ and a < 0
            hi += r > 1 + h_ and a > 0
    assert lo + hi > 0
    assert m["clip/low_frac"].item() == pytest.approx(lo / 12)
    assert m["clip/high_frac"].item() == pytest.approx(hi / 12)
    assert not loss.requires_grad  # the bounds are constants: no graph through eps_low


def test_clipped_surrogate_new_bad_inputs():
    z = torch.zeros(2, 3)
    for c in (1.0, 0.5, -2.0, float("nan")):
        with pytest.raises(ValueError, match="dual_clip"):
            clipped_surrogate(z, z, torch.zeros(2), dual_clip=c)
    with pytest.raises(ValueError, match="eps_low"):
        clipped_surrogate(z, z, torch.zeros(2), eps_low=torch.full((2, 1), 0.2))
    with pytest.raises(ValueError, match="eps_high"):
        clipped_surrogate(z, z, torch.zeros(2), eps_high=torch.tensor([[0.2, -0.1, 0.2], [0.2, 0.2, 0.2]]))
    with pytest.raises(ValueError, match="eps_high"):
        clipped_surrogate(z, z, torch.zeros(2), eps_high=torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="eps_low"):
        clipped_surrogate(z, z, torch.zeros(2), eps_low=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="eps_high"):
        clipped_surrogate(z, z, torch.zeros(2), eps_high=float("nan"))


# ---------------------------------------------------------------- KL estimators
def test_kl_estimate_hand():
    # x = logp - ref. logp=ln2, ref=0: x=.693147 -> k1 .693147, k2 .5*.480453 = .240227, k3 .5+.693147-1 = .193147
    # logp=0, ref=ln2: x=-.693147 -> k1 -.693147, k2 .240227, k3 2-.693147-1 = .306853
    ln2 = math.log(2)
    lp, ref = torch.tensor([[ln2, 0.0, 0.3]]), torch.tensor([[0.0, ln2, 0.3]])
    torch.testing.assert_close(kl_estimate(lp, ref, "k1"), torch.tensor([[0.693147, -0.693147, 0.0]]), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(kl_estimate(lp, ref, "k2"), torch.tensor([[0.240227, 0.240227, 0.0]]), atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(kl_estimate(lp, ref, "k3"), torch.tensor([[0.193147, 0.306853, 0.0]]), atol=1e-6,
                               rtol=0)
    assert torch.equal(kl_estimate(lp, ref), k3_kl(lp, ref))
    assert KL_ESTIMATORS == ("k1", "k2", "k3")


def test_kl_estimate_gradients():
    # d k1/dlogp = 1, d k2/dlogp = x, d k3/dlogp = 1 - exp(-x)
    x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    for kind, g in (("k1", torch.ones_like(x)), ("k2", x), ("k3", 1 - torch.exp(-x))):
        lp = x.clone().requires_grad_(True)
        kl_estimate(lp, torch.zeros_like(x), kind).sum().backward()
        torch.testing.assert_close(lp.grad, g)


def test_kl_estimate_bad_inputs():
    with pytest.raises(ValueError, match="kind"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 2), "k4")
    with pytest.raises(ValueError, match="shape"):
        kl_estimate(torch.zeros(1, 2), torch.zeros(1, 3), "k1")


# ---------------------------------------------------------------- aggregation modes
def _agg_case():
    # valid: row0 [1, 2] (nan masked), row1 [4], row2 none. K = 3 tokens, S = 3 rows (the fully masked one
    # included, as TRL's "grpo" / "dr_grpo"), C = 4
    pt = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 5.0, 6.0], [7.0, 7.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    return pt, mask


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("token_mean", 7 / 3),  # (1 + 2 + 4) / 3
        ("seq_mean_token_mean", 11 / 6),  # (1.5 + 4 + 0) / 3
        ("seq_mean_token_sum_norm", 1.75),  # 7 / 4 (verl: no division by S)
        ("constant", 7 / 12),  # 7 / (3 * 4)
    ],
)
def test_aggregate_loss_hand(mode, expected):
    pt, mask = _agg_case()
    out = aggregate_loss(pt, mask, mode=mode, num_tokens=3, num_sequences=3, norm_constant=4)
    assert out.item() == pytest.approx(expected)
    out_t = aggregate_loss(pt, mask, mode=mode, num_tokens=torch.tensor(3.0), num_sequences=torch.tensor(3),
                           norm_constant=torch.tensor(4.0))
    assert out_t.item() == pytest.approx(expected)
    # without num_sequences the call is the whole step: S = all 3 rows of the mask
    assert aggregate_loss(pt, mask, mode=mode, num_tokens=3, norm_constant=4).item() == pytest.approx(expected)


def test_aggregate_token_mean_is_token_mean_mode():
    pt, mask = _agg_case()
    assert aggregate_token_mean(pt, mask, num_tokens=5).item() == pytest.approx(7 / 5)
    assert torch.equal(aggregate_token_mean(pt, mask, num_tokens=5),
                       aggregate_loss(pt, mask, mode="token_mean", num_tokens=5, num_sequences=None))


def _naive_agg(pt, mask, mode, K, S, C):
    total = 0.0
    for i in range(pt.shape[0]):
        vals = [pt[i, t].item() for t in range(pt.shape[1]) if mask[i, t]]
        if mode == "token_mean":
            total += sum(vals) / K
        elif mode == "seq_mean_token_mean":
            total += (sum(vals) / len(vals) if vals else 0.0) / S
        elif mode == "seq_mean_token_sum_norm":
            total += sum(vals) / C
        else:
            total += sum(vals) / (S * C)
    return total


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_loss_naive_loop(mode):
    gen = torch.Generator().manual_seed(7)
    pt = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=gen) > 0.4
    mask[3] = False
    K, S, C = 40, 9, 11  # global counts of a larger step: this is one micro-batch of it
    out = aggregate_loss(pt, mask, mode=mode, num_tokens=K, num_sequences=S, norm_constant=C)
    assert out.item() == pytest.approx(_naive_agg(pt, mask, mode, K, S, C), abs=1e-12)
    ent = entropy_term(pt, mask, mode=mode, num_tokens=K, num_sequences=S)
    ent_mode = "seq_mean_token_mean" if mode == "seq_mean_token_mean" else "token_mean"
    assert ent.item() == pytest.approx(_naive_agg(pt, mask, ent_mode, K, S, C), abs=1e-12)
    # default S: every row of this call, the fully masked row 3 included
    out = aggregate_loss(pt, mask, mode=mode, num_tokens=K, norm_constant=C)
    assert out.item() == pytest.approx(_naive_agg(pt, mask, mode, K, 5, C), abs=1e-12)


def test_entropy_term_hand():
    # valid entropies row0 [1, 2], row1 [4], row2 none; K = 3, S = 3
    # token-weighted modes -> token mean 7/3 (not 7/C); seq_mean_token_mean -> (1.5 + 4 + 0) / 3 = 11/6
    pt, mask = _agg_case()
    for mode in ("token_mean", "seq_mean_token_sum_norm", "constant"):
        assert entropy_term(pt, mask, mode=mode, num_tokens=3, num_sequences=3).item() == pytest.approx(7 / 3)
    assert entropy_term(pt, mask, mode="seq_mean_token_mean", num_tokens=3, num_sequences=3).item() == (
        pytest.approx(11 / 6)
    )
    assert entropy_term(pt, mask, mode="seq_mean_token_mean", num_tokens=3).item() == pytest.approx(11 / 6)
    # a constant entropy h gives exactly h under every mode when the counts describe the whole batch and no row is
    # fully masked; a fully masked row counts as a sequence of entropy 0 under seq_mean_token_mean (as in the loss)
    h = torch.full((3, 3), 0.7, dtype=torch.float64)
    for mode in LOSS_AGGREGATIONS:
        assert entropy_term(h[:2], mask[:2], mode=mode, num_tokens=3, num_sequences=2).item() == pytest.approx(0.7)
    assert entropy_term(h, mask, mode="seq_mean_token_mean", num_tokens=3).item() == pytest.approx(0.7 * 2 / 3)


def test_aggregate_loss_bad_inputs():
    pt, mask = _agg_case()
    kw = {"num_tokens": 3, "num_sequences": 2, "norm_constant": 4}
    with pytest.raises(ValueError, match="mode"):
        aggregate_loss(pt, mask, mode="seq-mean-token-mean", **kw)
    with pytest.raises(ValueError, match="shape"):
        aggregate_loss(pt, mask[:, :2], mode="token_mean", **kw)
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate_loss(pt, mask, mode="token_mean", num_tokens=0, num_sequences=2)
    with pytest.raises(ValueError, match="num_tokens"):
        aggregate_loss(pt, mask, mode="token_mean", num_tokens=None, num_sequences=2)
    with pytest.raises(ValueError, match="num_sequences"):
        aggregate_loss(pt, mask, mode="seq_mean_token_mean", num_tokens=3, num_sequences=-1)
    with pytest.raises(ValueError, match="num_sequences"):
        aggregate_loss(pt, mask, mode="constant", num_tokens=3, num_sequences=0, norm_constant=4)
    for mode in ("seq_mean_token_sum_norm", "constant"):
        with pytest.raises(ValueError, match="norm_constant"):
            aggregate_loss(pt, mask, mode=mode, num_tokens=3, num_sequences=2)
        with pytest.raises(ValueError, match="norm_constant"):
            aggregate_loss(pt, mask, mode=mode, num_tokens=3, num_sequences=2, norm_constant=-1)
    with pytest.raises(ValueError, match="mode"):
        entropy_term(pt, mask, mode="dapo", num_tokens=3, num_sequences=2)
    with pytest.raises(ValueError, match="num_sequences"):
        entropy_term(pt, mask, mode="seq_mean_token_mean", num_tokens=3, num_sequences=0)


def _mode_loss(model, x, targets, mask, old, ref, adv, *, mode, K, S, C=7, kl_kind="k3", kl_coef=0.05,
               ent_coef=0.01, dual_clip=3.0):
    lp, ent = token_logprobs_and_entropy(model(x), targets, chunk_size=3)
    pg, _ = clipped_surrogate(lp, old, adv, eps_low=0.2, eps_high=0.28, mask=mask, dual_clip=dual_clip)
    per_token = pg + kl_coef * kl_estimate(lp, ref, kl_kind)
    loss = aggregate_loss(per_token, mask, mode=mode, num_tokens=K, num_sequences=S, norm_constant=C)
    return loss - ent_coef * entropy_term(ent, mask, mode=mode, num_tokens=K, num_sequences=S)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
@pytest.mark.parametrize("split", [(1, 3), (2, 2), (3, 1), (1, 1, 1, 1)])
def test_every_mode_microbatch_split_invariant(mode, split):
    model, x, targets, mask, old, ref, _ = _setup(2)
    old = old + torch.randn(old.shape, generator=torch.Generator().manual_seed(5))  # ratios far from 1
    adv = torch.tensor([0.8, -1.3, -0.6, 1.1])
    with torch.no_grad():  # the case exercises high clip, low clip and dual clip
        _, clip = clipped_surrogate(token_logprobs_and_entropy(model(x), targets)[0], old, adv, eps_low=0.2,
                                    eps_high=0.28, mask=mask, dual_clip=1.5)
    assert all(clip[k] > 0 for k in ("clip/low_frac", "clip/high_frac", "clip/dual_frac")), clip
    K, S = mask.sum(), mask.shape[0]
    full = _mode_loss(model, x, targets, mask, old, ref, adv, mode=mode, K=K, S=S, dual_clip=1.5)
    full.backward()
    g_full = _grads(model)
    model.zero_grad()
    total, s = 0.0, 0
    for size in split:
        sl = slice(s, s + size)
        part = _mode_loss(model, x[sl], targets[sl], mask[sl], old[sl], ref[sl], adv[sl], mode=mode, K=K, S=S,
                          dual_clip=1.5)
        part.backward()
        total += part.item()
        s += size
    assert total == pytest.approx(full.item(), abs=1e-6)
    for a, b in zip(_grads(model), g_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_skipping_zero_advantage_rows_keeps_loss_and_grads(mode):
    # Without KL and entropy terms, rows with A = 0 contribute nothing: a trainer may skip them, as long as the
    # global counts K and S still include them. Ragged "ranks": rank0 gets rows [0, 2], rank1 row [3] (row 1 skipped).
    model, x, targets, mask, old, ref, adv = _setup(3)
    adv = adv.clone()
    adv[1] = 0.0
    K, S = mask.sum(), mask.shape[0]
    kw = {"mode": mode, "K": K, "S": S, "kl_coef": 0.0, "ent_coef": 0.0}
    full = _mode_loss(model, x, targets, mask, old, ref, adv, **kw)
    full.backward()
    g_full = _grads(model)
    model.zero_grad()
    total = 0.0
    for rows in ([0, 2], [3]):
        idx = torch.tensor(rows)
        part = _mode_loss(model, x[idx], targets[idx], mask[idx], old[idx], ref[idx], adv[idx], **kw)
        part.backward()
        total += part.item()
    assert total == pytest.approx(full.item(), abs=1e-6)
    for a, b in zip(_grads(model), g_full):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_every_mode_padding_invariant(mode):
    # extra masked columns with absurd values change nothing (C is fixed, not the padded width)
    model, x, targets, mask, old, ref, adv = _setup(4)
    K, S = mask.sum(), mask.shape[0]
    base = _mode_loss(model, x, targets, mask, old, ref, adv, mode=mode, K=K, S=S, kl_kind="k2")
    base.backward()
    g_base = _grads(model)
    model.zero_grad()
    pad = 2
    gen = torch.Generator().manual_seed(8)
    x2 = torch.cat([x, 5 * torch.randn(4, pad, H, generator=gen)], 1)
    t2 = torch.cat([targets, torch.randint(0, V, (4, pad), generator=gen)], 1)
    m2 = torch.cat([mask, torch.zeros(4, pad, dtype=torch.bool)], 1)
    old2 = torch.cat([old, -50 * torch.ones(4, pad)], 1)
    ref2 = torch.cat([ref, 30 * torch.ones(4, pad)], 1)
    padded = _mode_loss(model, x2, t2, m2, old2, ref2, adv, mode=mode, K=K, S=S, kl_kind="k2")
    padded.backward()
    torch.testing.assert_close(padded, base, atol=1e-6, rtol=0)
    for a, b in zip(_grads(model), g_base):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
