import math

import pytest
import torch

from reasonrl.rl.losses import aggregate_token_mean, clipped_surrogate, k3_kl, token_logprobs_and_entropy


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


def test_clipped_surrogate_naive_loop():
    gen = torch.Generator().manual_seed(5)
    logp = torch.randn(3, 4, generator=gen, dtype=torch.float64) * 0.3
    old = torch.randn(3, 4, generator=gen, dtype=torch.float64) * 0.3
    adv = torch.randn(3, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 4, generator=gen) > 0.3
    loss, m = clipped_surrogate(logp, old, adv, eps_low=0.1, eps_high=0.25, mask=mask)
    lo = hi = n = 0
    for i in range(3):
        for t in range(4):
            r = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            exp = -min(r * a, min(max(r, 0.9), 1.25) * a)
            assert loss[i, t].item() == pytest.approx(exp, abs=1e-12)
            if mask[i, t]:
                n += 1
                lo += r < 0.9 and a < 0
                hi += r > 1.25 and a > 0
    assert m["clip/low_frac"].item() == pytest.approx(lo / n)
    assert m["clip/high_frac"].item() == pytest.approx(hi / n)


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
