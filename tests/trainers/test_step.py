"""train_on_batch against a naive per-row loop, for several micro-batch sizes, with and without a KL term."""


import math

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from reasonrl.batch import RolloutBatch
from reasonrl.config import AlgorithmConfig, OptimConfig
from reasonrl.trainers.step import group_stats, split_micro_batches, train_on_batch, trainable_rows

PAD = 0


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=PAD)
    return LlamaForCausalLM(cfg)


def make_batch(seed=0, rows=6, width=5):
    g = torch.Generator().manual_seed(seed)
    groups = [torch.randint(1, 40, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (rows // 2,), generator=g)]
    prompts = [p for p in groups for _ in range(2)]  # two samples per prompt, as GRPO groups share prompts
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    ids = torch.randint(1, 40, (rows, width), generator=g)
    mask = torch.arange(width)[None] < lengths[:, None]
    return RolloutBatch(prompt_ids=prompts, completion_ids=ids.masked_fill(~mask, PAD), completion_mask=mask,
                        rollout_logprobs=None, finish_reasons=["stop"] * rows, group_size=2)


def naive_grads(model, batch, adv, *, temperature, kl_coef=0.0, ref=None):
    """Per row: unpadded forward, full log-softmax; loss = sum_t(-A * ratio + kl_coef * k3) / all trained tokens
    (the model's tokens: an episode's environment tokens are input only)."""
    trained = batch.completion_mask if batch.sampled_mask is None else batch.completion_mask & batch.sampled_mask
    total = trained.sum()
    model.zero_grad()
    for i in range(batch.num_rows):
        n = int(batch.completion_mask[i].sum())
        seq = torch.tensor(batch.prompt_ids[i] + batch.completion_ids[i, :n].tolist())[None]
        p = len(batch.prompt_ids[i])
        logits = model(input_ids=seq).logits[0, p - 1 : p - 1 + n] / temperature
        logp = torch.log_softmax(logits, -1).gather(-1, seq[0, p:, None]).squeeze(-1)
        logp = logp[trained[i, :n]] if kl_coef == 0 else logp
        loss = -(adv[i] * torch.exp(logp - logp.detach())).sum()
        if kl_coef:
            with torch.no_grad():
                ref_logits = ref(input_ids=seq).logits[0, p - 1 : p - 1 + n] / temperature
                ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, seq[0, p:, None]).squeeze(-1)
            d = ref_logp - logp
            loss = loss + kl_coef * (torch.exp(d) - d - 1).sum()
        (loss / total).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def step_with_sgd(model, batch, adv, *, micro, temperature, kl_coef=0.0, ref=None, algo=None, **extra):
    """One train_on_batch call with SGD(lr=1) and no clipping: the parameter change is minus the gradient."""
    acc = Accelerator(cpu=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    metrics = train_on_batch(
        model, opt, sched, acc, batch, adv, algo=algo or AlgorithmConfig(kl_coef=kl_coef),
        optim=OptimConfig(micro_batch_size=micro, max_grad_norm=1e9), pad_id=PAD, temperature=temperature,
        ref_model=ref, **extra,
    )
    return {name: before[name] - p.detach() for name, p in model.named_parameters()}, metrics


def with_environment_tokens(batch):
    """The batch as episodes: in every row with 4+ tokens, its 2nd and 3rd tokens came from the environment."""
    sampled = batch.completion_mask.clone()
    long_rows = batch.completion_mask.sum(-1) >= 4
    sampled[long_rows, 1:3] = False
    batch.sampled_mask = sampled
    return batch


@pytest.mark.parametrize("micro", [1, 2, 6])
def test_episode_environment_tokens_are_context_and_never_trained(micro):
    batch = with_environment_tokens(make_batch(seed=5))
    assert (batch.model_mask() != batch.completion_mask).any()  # some tokens are the environment's
    adv = torch.tensor([1.0, -1.0, 0.7, -0.7, 0.5, -0.5])
    reference = naive_grads(tiny_model(), batch, adv, temperature=0.7)
    got, metrics = step_with_sgd(tiny_model(), batch, adv, micro=micro, temperature=0.7)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], atol=2e-6, rtol=1e-4, msg=name)
    assert metrics["train/tokens"] == float(batch.model_mask().sum())
    plain, _ = step_with_sgd(tiny_model(), make_batch(seed=5), adv, micro=micro, temperature=0.7)
    assert any((plain[n] - got[n]).abs().max() > 1e-6 for n in got)  # the mask changed the update


@pytest.mark.parametrize("micro", [1, 2, 6])
def test_gradient_matches_a_naive_loop_for_any_micro_batch_size(micro):
    batch = make_batch()
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.5, -0.5])  # a zero-advantage group is skipped, not lost
    reference = naive_grads(tiny_model(), batch, adv, temperature=0.7)
    got, metrics = step_with_sgd(tiny_model(), batch, adv, micro=micro, temperature=0.7)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], atol=2e-6, rtol=1e-4, msg=name)
    assert metrics["train/tokens"] == float(batch.completion_mask[[0, 1, 4, 5]].sum())


def test_kl_term_matches_a_naive_loop():
    batch = make_batch(seed=3)
    adv = torch.tensor([0.3, -0.3, 0.0, 0.0, 1.0, -1.0])
    ref = tiny_model(seed=1).eval()
    reference = naive_grads(tiny_model(), batch, adv, temperature=1.0, kl_coef=0.1, ref=ref)
    got, metrics = step_with_sgd(tiny_model(), batch, adv, micro=4, temperature=1.0, kl_coef=0.1, ref=ref)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], atol=2e-6, rtol=1e-4, msg=name)
    assert metrics["policy/kl"] > 0  # every row is trained when a KL term is on


def test_all_zero_advantages_skip_the_optimizer_step():
    batch = make_batch()
    got, metrics = step_with_sgd(tiny_model(), batch, torch.zeros(6), micro=2, temperature=1.0)
    assert metrics["train/skipped"] == 1.0
    assert all(torch.count_nonzero(delta) == 0 for delta in got.values())


def test_nan_advantage_raises_a_clear_error():
    batch = make_batch()
    adv = torch.tensor([float("nan"), 1.0, 0.0, 0.0, 0.0, 0.0])
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        step_with_sgd(tiny_model(), batch, adv, micro=6, temperature=1.0)


def test_trainable_rows_and_split():
    adv = torch.tensor([1.0, 0.0, -1.0, 2.0])
    mask = torch.tensor([[True], [True], [False], [True]])
    assert trainable_rows(adv, mask, all_rows=False).tolist() == [0, 3]
    assert trainable_rows(adv, mask, all_rows=True).tolist() == [0, 1, 3]
    chunks = split_micro_batches(torch.tensor([0, 3, 5]), 2, 3)
    assert [c.tolist() for c in chunks] == [[0, 3], [5], []]


def test_group_stats_hand_computed():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])
    stats = group_stats(rewards, torch.ones(4, dtype=torch.bool), 2)
    assert stats["reward/mean"] == 0.75 and stats["reward/zero_std_frac"] == 0.5
    stats = group_stats(rewards, torch.tensor([True, True, False, True]), 2)  # group 2 has one valid sample
    assert stats["reward/mean"] == 1.0 and stats["reward/zero_std_frac"] == 1.0


# ------------------------------------------------------------------ general per-token reference
def naive_general_grads(model, batch, adv, *, mode, eps_low, eps_high, norm_constant=None, old=None, dual=None,
                        h_hat=None, alpha=0.0, beta=0.0, entropy_coef=0.0):
    """Python-scalar loop over rows and tokens, written from the formulas (algorithms.md 0, 1.3-1.5; peers.md 2):
    ratio, HAPO bounds and redistribution, clipping, dual clip, then the aggregation of `mode` over the tokens of
    batch.trained_mask() (the model still reads every completion token)."""
    loss_mask = batch.trained_mask()
    k_tokens = float(loss_mask.sum())
    s_seqs = float(loss_mask.shape[0])
    model.zero_grad()
    total = 0.0
    for i in range(batch.num_rows):
        n = int(batch.completion_mask[i].sum())
        seq = torch.tensor(batch.prompt_ids[i] + batch.completion_ids[i, :n].tolist())[None]
        p = len(batch.prompt_ids[i])
        lsm = torch.log_softmax(model(input_ids=seq).logits[0, p - 1 : p - 1 + n], -1)
        terms, ents = [], []
        for t in range(n):
            if not loss_mask[i, t]:
                continue
            lp = lsm[t, seq[0, p + t]]
            o = lp.detach() if old is None else old[i, t]
            r = torch.exp(lp - o)
            a, el, eh = float(adv[i]), eps_low, eps_high
            if h_hat is not None:
                h = float(h_hat[i, t])
                if h <= 0:
                    el = eps_low * (1 - alpha * h)
                else:
                    eh = eps_high * (1 + alpha * h)
                in_band = 1 - el / 2 < float(r) < 1 + eh / 2
                if (h > 0 and not in_band) or (h <= 0 and in_band):
                    a = a * (1 + beta * h)
            term = torch.maximum(-a * r, -a * r.clamp(1 - el, 1 + eh))
            if dual is not None and a < 0:
                term = torch.minimum(term, torch.tensor(-a * dual))
            terms.append(term)
            ents.append(-(lsm[t].exp() * lsm[t]).sum())
        if not terms:
            continue
        row_sum, ent_sum = torch.stack(terms).sum(), torch.stack(ents).sum()
        if mode == "token_mean":
            loss = row_sum / k_tokens
        elif mode == "seq_mean_token_mean":
            loss = row_sum / len(terms) / s_seqs
        elif mode == "seq_mean_token_sum_norm":
            loss = row_sum / norm_constant
        else:
            loss = row_sum / (s_seqs * norm_constant)
        ent_weight = 1 / len(terms) / s_seqs if mode == "seq_mean_token_mean" else 1 / k_tokens
        loss = loss - entropy_coef * ent_sum * ent_weight
        loss.backward()
        total += float(loss.detach())
    return {name: p.grad.clone() for name, p in model.named_parameters()}, total


def with_loss_mask_holes(batch, seed=0):
    """Drops some tokens from the loss (as D3S token selection does) without changing the model input."""
    g = torch.Generator().manual_seed(seed)
    batch.loss_mask = batch.completion_mask & (torch.rand(batch.completion_mask.shape, generator=g) > 0.3)
    return batch


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "constant"])
@pytest.mark.parametrize("micro", [1, 4])
def test_aggregation_modes_match_a_naive_loop_with_token_selection(mode, micro):
    batch = with_loss_mask_holes(make_batch(seed=5))
    adv = torch.tensor([0.8, -0.8, 0.0, 0.0, 1.5, -0.4])
    algo = AlgorithmConfig(loss_agg=mode)
    ref, _ = naive_general_grads(tiny_model(), batch, adv, mode=mode, eps_low=0.2, eps_high=0.28, norm_constant=7)
    got, metrics = step_with_sgd(tiny_model(), batch, adv, micro=micro, temperature=1.0, algo=algo, norm_constant=7)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=2e-6, rtol=1e-4, msg=name)
    assert metrics["train/tokens"] == float(batch.trained_mask()[[0, 1, 4, 5]].sum())


def old_logprobs_off_policy(model, batch, shift_seed=1):
    """Log-probs of a slightly different policy, so ratios leave 1 and clipping is exercised."""
    from reasonrl.trainers.step import fixed_logprobs

    rows = torch.arange(batch.num_rows)
    logp, _ = fixed_logprobs(model, batch, rows, pad_id=PAD, temperature=1.0, micro_batch_size=6)
    g = torch.Generator().manual_seed(shift_seed)
    return logp + 0.4 * torch.randn(logp.shape, generator=g)


@pytest.mark.parametrize("micro", [1, 3])
def test_dual_clip_and_hapo_terms_match_a_naive_loop(micro):
    batch = make_batch(seed=7)
    adv = torch.tensor([1.2, -1.2, -0.7, 0.7, 0.3, -2.0])
    old = old_logprobs_off_policy(tiny_model(), batch)
    g = torch.Generator().manual_seed(2)
    h_hat = (torch.rand(batch.completion_ids.shape, generator=g) * 2 - 1)  # both entropy sides
    algo = AlgorithmConfig(eps_low=0.2, eps_high=0.2, dual_clip=1.5)
    algo.hapo.adaptive_clip, algo.hapo.redistribution = True, True
    ref, _ = naive_general_grads(tiny_model(), batch, adv, mode="token_mean", eps_low=0.2, eps_high=0.2, old=old,
                                 dual=1.5, h_hat=h_hat, alpha=1.0, beta=1.0)
    got, metrics = step_with_sgd(tiny_model(), batch, adv, micro=micro, temperature=1.0, algo=algo, old_logp=old,
                                 h_hat=h_hat)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=2e-6, rtol=1e-4, msg=name)
    assert metrics["clip/dual_frac"] > 0 and metrics["hapo/adv_changed_frac"] > 0


def test_hapo_with_adaptive_terms_off_is_ppo_clipping():
    batch = make_batch(seed=7)
    adv = torch.tensor([1.2, -1.2, -0.7, 0.7, 0.3, -2.0])
    old = old_logprobs_off_policy(tiny_model(), batch)
    h_hat = torch.rand(batch.completion_ids.shape) * 2 - 1
    hapo_off = AlgorithmConfig()
    hapo_off.hapo.clip_alpha, hapo_off.hapo.adv_beta = 0.0, 0.0
    hapo_off.hapo.adaptive_clip, hapo_off.hapo.redistribution = True, True
    plain, _ = step_with_sgd(tiny_model(), batch, adv, micro=2, temperature=1.0, algo=AlgorithmConfig(), old_logp=old)
    hapo, _ = step_with_sgd(tiny_model(), batch, adv, micro=2, temperature=1.0, algo=hapo_off, old_logp=old,
                            h_hat=h_hat)
    for name in plain:
        torch.testing.assert_close(hapo[name], plain[name], atol=1e-7, rtol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_entropy_bonus_matches_a_naive_loop(mode):
    batch = make_batch(seed=9)
    adv = torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0, 0.0])  # entropy trains the zero-advantage rows too
    algo = AlgorithmConfig(loss_agg=mode, entropy_coef=0.05)
    ref, _ = naive_general_grads(tiny_model(), batch, adv, mode=mode, eps_low=0.2, eps_high=0.28, entropy_coef=0.05)
    got, _ = step_with_sgd(tiny_model(), batch, adv, micro=2, temperature=1.0, algo=algo)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=2e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("cap, factor", [(3.0, 2.0), (1.5, 1.5)])
def test_rollout_importance_weights_scale_the_policy_gradient(cap, factor):
    """Engine log-probs ln 2 below the trainer's: every weight is 2 (or the cap), so the gradient scales by it."""
    from reasonrl.trainers.step import fixed_logprobs

    batch = make_batch(seed=4)
    adv = torch.tensor([0.8, -0.8, 0.0, 0.0, 1.5, -0.4])
    plain, _ = step_with_sgd(tiny_model(), batch, adv, micro=2, temperature=1.0)
    logp, _ = fixed_logprobs(tiny_model(), batch, torch.arange(6), pad_id=PAD, temperature=1.0, micro_batch_size=6)
    batch.rollout_logprobs = logp - math.log(2.0)
    got, metrics = step_with_sgd(tiny_model(), batch, adv, micro=2, temperature=1.0,
                                 rollout_is={"level": "token", "mode": "truncate", "cap": cap, "floor": 0.0})
    for name in plain:
        torch.testing.assert_close(got[name], factor * plain[name], atol=2e-6, rtol=1e-4, msg=name)
    assert metrics["sampling/logp_diff_max"] == pytest.approx(math.log(2.0), abs=1e-5)
    assert metrics["sampling/is_ratio_min"] == pytest.approx(2.0, rel=1e-5)
    assert metrics["sampling/is_ratio_max"] == pytest.approx(2.0, rel=1e-5)


def naive_ntp_grads(model, batch, ntp_mask, *, temperature):
    """Per row: -sum of the chosen tokens' log-probs / number of chosen tokens in the batch (token mean)."""
    total = ntp_mask.sum()
    model.zero_grad()
    for i in range(batch.num_rows):
        n = int(batch.completion_mask[i].sum())
        if not ntp_mask[i].any():
            continue
        seq = torch.tensor(batch.prompt_ids[i] + batch.completion_ids[i, :n].tolist())[None]
        p = len(batch.prompt_ids[i])
        logits = model(input_ids=seq).logits[0, p - 1 : p - 1 + n] / temperature
        logp = torch.log_softmax(logits, -1).gather(-1, seq[0, p:, None]).squeeze(-1)
        (-(logp * ntp_mask[i, :n]).sum() / total).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("micro", [1, 4])
def test_dual_loss_endpoints_rl_only_and_ntp_only(micro):
    """RMT dual objective: ntp_weight = 0 is exactly the RL step; rl_weight = 0 is next-token prediction on the
    chosen tokens only (here rows 2 and 3, whose advantages are 0, so they train through the NTP term alone)."""
    batch = make_batch(seed=5)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.5, -0.5])
    ntp_mask = torch.zeros_like(batch.completion_mask)
    ntp_mask[2:4] = batch.completion_mask[2:4]
    batch.ntp_mask = ntp_mask
    plain, _ = step_with_sgd(tiny_model(), batch, adv, micro=micro, temperature=1.0)
    rl_only, _ = step_with_sgd(tiny_model(), batch, adv, micro=micro, temperature=1.0, ntp_weight=0.0)
    ntp_only, metrics = step_with_sgd(tiny_model(), batch, adv, micro=micro, temperature=1.0, rl_weight=0.0,
                                      ntp_weight=1.0)
    reference = naive_ntp_grads(tiny_model(), batch, ntp_mask, temperature=1.0)
    for name in reference:
        assert torch.equal(rl_only[name], plain[name]), name
        torch.testing.assert_close(ntp_only[name], reference[name], atol=2e-6, rtol=1e-4, msg=name)
    assert metrics["loss/ntp"] > 0
    # both terms: the sum of the two gradients (weights 1 and 0.5)
    both, _ = step_with_sgd(tiny_model(), batch, adv, micro=micro, temperature=1.0, ntp_weight=0.5)
    for name in reference:
        torch.testing.assert_close(both[name], plain[name] + 0.5 * reference[name], atol=2e-6, rtol=1e-4, msg=name)
