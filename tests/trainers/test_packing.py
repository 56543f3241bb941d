"""Memory-lean training: the padding-free (packed) forward, token-budget micro-batches and gradient checkpointing
give the same log-probs, entropies, losses and gradients as the padded forward and a naive per-sequence loop."""

import random

import pytest
import torch
from accelerate import Accelerator
from test_step import PAD, make_batch, naive_grads, tiny_model, with_environment_tokens

from reasonrl.config import AlgorithmConfig, ConfigError, OptimConfig, load_config
from reasonrl.models import load_model
from reasonrl.trainers import grpo, validation
from reasonrl.trainers.policy import (
    completion_logprobs,
    full_sequence_completion_logprobs,
    packed_completion_logprobs,
)
from reasonrl.trainers.step import (
    fixed_logprobs,
    micro_batches,
    row_tokens,
    split_by_token_budget,
    train_on_batch,
)

# rows: shared prompts (GRPO groups), prompts of 2..7 tokens, completions of 1..6 tokens, right-padded
PROMPTS = [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9], [3, 4, 5, 6, 7, 8, 9], [11, 12, 13, 14]]
COMPLETIONS = torch.tensor([
    [1, 2, 3, 4, 0, 0],
    [4, 5, 0, 0, 0, 0],
    [6, 0, 0, 0, 0, 0],  # a single token
    [7, 8, 9, 10, 11, 12],
    [13, 14, 15, 0, 0, 0],
    [16, 17, 18, 19, 20, 0],
])


def naive_row(model, prompt, completion, temperature):
    """One sequence alone, unpadded, full log-softmax: (logp at the temperature, entropy at T = 1) of its
    completion tokens."""
    seq = torch.tensor([prompt + completion])
    logits = model(input_ids=seq).logits[0, len(prompt) - 1 : -1].float()
    lsm, at_one = torch.log_softmax(logits / temperature, -1), torch.log_softmax(logits, -1)
    return lsm.gather(-1, seq[0, len(prompt) :, None]).squeeze(-1), -(at_one.exp() * at_one).sum(-1)


def surrogate(logp, ent, mask):
    """A loss touching log-probs and entropies with token-dependent weights (as the policy loss does)."""
    w = torch.linspace(-1.0, 1.0, logp.numel()).view_as(logp)
    return ((w * logp + 0.1 * ent) * mask).sum() / mask.sum()


def grads_of(model, fn):
    model.zero_grad()
    fn().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(params=["sdpa", "eager", "tiny_model_dir"])
def model(request):
    if request.param == "tiny_model_dir":
        m = load_model(request.getfixturevalue("tiny_model_dir"))
        vocab = m.config.vocab_size
        assert vocab > 40
    else:
        m = tiny_model()
        m.config._attn_implementation = request.param
    return m.float()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_packed_equals_padded_and_a_per_sequence_loop(model, temperature):
    mask = COMPLETIONS != PAD
    packed = packed_completion_logprobs(model, PROMPTS, COMPLETIONS, mask, pad_id=PAD, temperature=temperature)
    padded = completion_logprobs(model, PROMPTS, COMPLETIONS, mask, pad_id=PAD, temperature=temperature)
    full = full_sequence_completion_logprobs(model, PROMPTS, COMPLETIONS, mask, pad_id=PAD, temperature=temperature)
    for i, prompt in enumerate(PROMPTS):
        n = int(mask[i].sum())
        ref_logp, ref_ent = naive_row(model, prompt, COMPLETIONS[i, :n].tolist(), temperature)
        for got in (packed, padded, full):
            torch.testing.assert_close(got[0][i, :n], ref_logp, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[1][i, :n], ref_ent, atol=1e-5, rtol=1e-5)
    assert not packed[0][~mask].any() and not packed[1][~mask].any()  # zeros where the mask is 0


def test_packed_loss_and_gradients_equal_padded_and_the_loop(model):
    mask = COMPLETIONS != PAD
    kw = {"pad_id": PAD, "temperature": 0.8}
    packed = grads_of(model, lambda: surrogate(*packed_completion_logprobs(model, PROMPTS, COMPLETIONS, mask, **kw),
                                               mask))
    padded = grads_of(model, lambda: surrogate(*completion_logprobs(model, PROMPTS, COMPLETIONS, mask, **kw), mask))
    full = grads_of(model, lambda: surrogate(*full_sequence_completion_logprobs(model, PROMPTS, COMPLETIONS, mask,
                                                                                **kw), mask))

    def loop_loss():
        logp, ent = torch.zeros(mask.shape), torch.zeros(mask.shape)
        for i, prompt in enumerate(PROMPTS):
            n = int(mask[i].sum())
            lp, h = naive_row(model, prompt, COMPLETIONS[i, :n].tolist(), 0.8)
            logp = logp.index_put((torch.full((n,), i), torch.arange(n)), lp)
            ent = ent.index_put((torch.full((n,), i), torch.arange(n)), h)
        return surrogate(logp, ent, mask)

    loop = grads_of(model, loop_loss)
    with torch.no_grad():
        losses = [surrogate(*f(model, PROMPTS, COMPLETIONS, mask, **kw), mask)
                  for f in (packed_completion_logprobs, completion_logprobs)]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    assert packed.keys() == loop.keys() == padded.keys() == full.keys()
    for name in loop:
        for got in (packed, padded, full):
            torch.testing.assert_close(got[name], loop[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_forward_really_isolates_sequences():
    """A packed row must not attend to the row before it: changing row 0's tokens leaves row 1 unchanged."""
    model = tiny_model()
    mask = torch.ones(2, 3, dtype=torch.bool)
    a = packed_completion_logprobs(model, [[1, 2], [3, 4]], torch.tensor([[5, 6, 7], [8, 9, 10]]), mask, pad_id=PAD)
    b = packed_completion_logprobs(model, [[11, 12], [3, 4]], torch.tensor([[13, 14, 15], [8, 9, 10]]), mask,
                                   pad_id=PAD)
    torch.testing.assert_close(a[0][1], b[0][1])
    assert not torch.allclose(a[0][0], b[0][0])


def test_packed_all_empty_rows_give_zeros_with_a_graph():
    model = tiny_model()
    logp, ent = packed_completion_logprobs(model, [[1, 2]], torch.tensor([[PAD]]), torch.tensor([[False]]),
                                           pad_id=PAD)
    assert logp.tolist() == [[0.0]] and ent.tolist() == [[0.0]] and logp.requires_grad
    (logp.sum() + ent.sum()).backward()  # an empty micro-batch of a rank with fewer rows still runs backward


# ------------------------------------------------------------------ token-budget micro-batches
def chunk_lists(chunks):
    return [c.tolist() for c in chunks]


def test_split_by_token_budget_hand_computed():
    rows = torch.tensor([10, 11, 12, 13, 14])
    lengths = torch.tensor([4, 3, 9, 2, 2])
    # packed cost = sum: [4+3] | [9] (alone: over 7 with anything) | [2+2]
    assert chunk_lists(split_by_token_budget(rows, lengths, 8)) == [[10, 11], [12], [13, 14]]
    # a row longer than the budget gets its own chunk
    assert chunk_lists(split_by_token_budget(rows, lengths, 5)) == [[10], [11], [12], [13, 14]]
    # padded cost = rows x longest: [4,3] -> 8 <= 8 | [9] | [2,2] -> 4
    assert chunk_lists(split_by_token_budget(rows, lengths, 8, padded=True)) == [[10, 11], [12], [13, 14]]
    # [4,3] costs 8 > 7 padded but 7 packed
    assert chunk_lists(split_by_token_budget(rows, lengths, 7, padded=True)) == [[10], [11], [12], [13, 14]]
    assert chunk_lists(split_by_token_budget(rows, lengths, 7)) == [[10, 11], [12], [13, 14]]
    # padded: [2, 2, 9] would cost 27 although the sum is 13
    assert chunk_lists(split_by_token_budget(rows[[3, 4, 2]], lengths[[3, 4, 2]], 13, padded=True)) == [[13, 14],
                                                                                                       [12]]
    assert chunk_lists(split_by_token_budget(rows, lengths, 1000)) == [[10, 11, 12, 13, 14]]
    assert split_by_token_budget(rows[:0], lengths[:0], 8) == []
    with pytest.raises(ValueError, match="budget"):
        split_by_token_budget(rows, lengths, 0)


def naive_token_split(lengths: list[int], budget: int, padded: bool) -> list[list[int]]:
    """From each chunk start, the longest run of rows whose cost fits (at least one row)."""
    def cost(run):
        return len(run) * max(run) if padded else sum(run)

    out, i = [], 0
    while i < len(lengths):
        j = i + 1
        while j < len(lengths) and cost(lengths[i : j + 1]) <= budget:
            j += 1
        out.append(list(range(i, j)))
        i = j
    return out


def test_split_by_token_budget_matches_a_naive_split():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(0, 12)
        lengths = [rng.randint(1, 20) for _ in range(n)]
        budget, padded = rng.randint(1, 60), rng.random() < 0.5
        rows = torch.arange(n) * 3 + 1  # row ids are carried, not positions
        got = split_by_token_budget(rows, torch.tensor(lengths, dtype=torch.long), budget, padded=padded)
        want = naive_token_split(lengths, budget, padded)
        assert chunk_lists(got) == [[3 * k + 1 for k in chunk] for chunk in want], (lengths, budget, padded)
        for chunk in want:  # invariants: within budget unless alone, and order kept
            run = [lengths[k] for k in chunk]
            assert len(chunk) == 1 or (len(run) * max(run) if padded else sum(run)) <= budget


def test_micro_batches_by_rows_or_tokens():
    batch = make_batch()
    rows = torch.tensor([0, 1, 4, 5])
    tokens = row_tokens(batch, rows)
    assert tokens.tolist() == [len(batch.prompt_ids[i]) + int(batch.completion_mask[i].sum()) for i in (0, 1, 4, 5)]
    assert chunk_lists(micro_batches(batch, rows, size=3)) == [[0, 1, 4], [5]]
    assert chunk_lists(micro_batches(batch, rows, size=3, token_budget=10_000, packed=True)) == [[0, 1, 4, 5]]
    assert chunk_lists(micro_batches(batch, rows, size=3, token_budget=1)) == [[0], [1], [4], [5]]


# ------------------------------------------------------------------ a whole step: rows vs tokens, packed vs padded
ADV = torch.tensor([1.0, -1.0, 0.0, 0.0, 0.5, -0.5])  # a zero-advantage group is skipped


def step_grads(*, micro=6, tokens=None, packing=False, checkpointing=False, algo=None, ref=None, acc=None, seed=0,
               batch=None):
    model = tiny_model()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    batch = make_batch(seed=seed) if batch is None else batch
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    optim = OptimConfig(micro_batch_size=micro, micro_batch_tokens=tokens, packing=packing, max_grad_norm=1e9)
    metrics = train_on_batch(model, opt, sched, acc or Accelerator(cpu=True), batch, ADV,
                             algo=algo or AlgorithmConfig(), optim=optim, pad_id=PAD, temperature=0.7, ref_model=ref)
    return {name: before[name] - p.detach() for name, p in model.named_parameters()}, metrics


def assert_same(got, want, atol=2e-6):
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("micro, tokens", [(1, None), (2, None), (6, None), (6, 1), (6, 12), (6, 20), (6, 10_000)])
def test_step_gradient_is_the_same_for_rows_or_token_budgets(micro, tokens, packing):
    batch = make_batch()
    reference = naive_grads(tiny_model(), batch, ADV, temperature=0.7)
    got, metrics = step_grads(micro=micro, tokens=tokens, packing=packing)
    assert_same(got, reference)
    assert metrics["train/tokens"] == float(batch.completion_mask[[0, 1, 4, 5]].sum())


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("micro, tokens", [(1, None), (6, 12), (6, 10_000)])
def test_episode_steps_are_the_same_for_rows_token_budgets_and_packing(micro, tokens, packing):
    """Episodes (environment tokens in the completion, input only) split and pack exactly like completions."""
    batch = with_environment_tokens(make_batch())
    reference = naive_grads(tiny_model(), batch, ADV, temperature=0.7)
    got, metrics = step_grads(micro=micro, tokens=tokens, packing=packing, batch=batch)
    assert_same(got, reference)
    assert metrics["train/tokens"] == float(batch.model_mask()[[0, 1, 4, 5]].sum())


@pytest.mark.parametrize("tokens", [None, 15])
def test_kl_and_multi_iteration_passes_are_packed_too(tokens):
    """The frozen passes (reference and sampling policy) use the same micro-batches and forward as training."""
    ref = tiny_model(seed=1).eval()
    algo = AlgorithmConfig(kl_coef=0.1, num_iterations=2)
    padded, _ = step_grads(micro=2, algo=algo, ref=ref, seed=3)
    packed, _ = step_grads(micro=2, tokens=tokens, packing=True, algo=algo, ref=ref, seed=3)
    assert_same(packed, padded, atol=5e-6)
    batch, rows = make_batch(seed=3), torch.arange(6)
    a = fixed_logprobs(ref, batch, rows, pad_id=PAD, temperature=1.0, micro_batch_size=6)
    b = fixed_logprobs(ref, batch, rows, pad_id=PAD, temperature=1.0, micro_batch_size=6, token_budget=9, packed=True)
    m = batch.completion_mask
    torch.testing.assert_close(a[0] * m, b[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1] * m, b[1], atol=1e-5, rtol=1e-5)


class MoreChunksElsewhere:
    """An accelerator whose other (imagined) rank needs `extra` more micro-batches: this rank pads with empty ones."""

    def __init__(self, extra):
        self.acc, self.extra, self.agreed = Accelerator(cpu=True), extra, None

    def __getattr__(self, name):
        return getattr(self.acc, name)

    def reduce(self, tensor, reduction="sum"):
        if reduction == "max" and tensor.dim() == 0 and not tensor.is_floating_point():
            self.agreed = tensor + self.extra
            return self.agreed
        return self.acc.reduce(tensor, reduction=reduction)


@pytest.mark.parametrize("packing", [False, True])
def test_token_budget_chunk_count_is_agreed_and_padded(packing):
    acc = MoreChunksElsewhere(extra=2)
    got, _ = step_grads(tokens=12, packing=packing, acc=acc)
    assert_same(got, step_grads()[0])
    assert int(acc.agreed) == 2 + len(micro_batches(make_batch(), torch.tensor([0, 1, 4, 5]), size=6, token_budget=12,
                                                     packed=packing))


# ------------------------------------------------------------------ gradient checkpointing
@pytest.mark.parametrize("packing, tokens", [(False, None), (True, None), (False, 20), (True, 20)])
def test_gradient_checkpointing_step_equals_the_plain_step(packing, tokens):
    plain, _ = step_grads(micro=2)
    with_gc, _ = step_grads(micro=2, tokens=tokens, packing=packing, checkpointing=True)
    assert_same(with_gc, plain)


def test_gradient_checkpointing_runs_whole_sequences_without_the_prompt_cache():
    """Under checkpointing transformers drops the KV cache in training mode, so the shared-prompt forward would lose
    the prompt; completion_logprobs then runs each full sequence instead, with the same result."""
    model = tiny_model()
    mask = COMPLETIONS != PAD
    want = completion_logprobs(model, PROMPTS, COMPLETIONS, mask, pad_id=PAD)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    got = completion_logprobs(model, PROMPTS, COMPLETIONS, mask, pad_id=PAD)
    for g, w in zip(got, want):
        torch.testing.assert_close(g * mask, w * mask, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ config
def test_memory_keys_load_and_validate():
    cfg = load_config(None, ["optim.packing=true", "optim.micro_batch_tokens=4096", "model.gradient_checkpointing=true"])
    assert cfg.optim.packing and cfg.optim.micro_batch_tokens == 4096 and cfg.model.gradient_checkpointing
    validation.validate(cfg, world_size=1)
    defaults = load_config(None, [])
    assert not defaults.optim.packing and defaults.optim.micro_batch_tokens is None
    assert not defaults.model.gradient_checkpointing
    with pytest.raises(ConfigError, match="optim.micro_batch_tokens"):
        validation.validate(load_config(None, ["optim.micro_batch_tokens=0"]), world_size=1)


def test_trainer_runs_with_checkpointing_packing_and_a_token_budget(tiny_model_dir, tmp_path, monkeypatch):
    import transformers.modeling_utils
    from test_e2e import history, overrides

    calls = []
    checkpoint = transformers.modeling_utils.checkpoint
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    extra = {"model.gradient_checkpointing": "true", "optim.packing": "true", "optim.micro_batch_tokens": 80}
    assert grpo.main(overrides(tiny_model_dir, tmp_path, 2, **extra)) == 0
    rows = history(tmp_path)
    assert set(rows) == {0, 1, 2} and all(r["train/loss_tokens"] > 0 for r in (rows[1], rows[2]))
    assert calls  # the decoder layers ran under activation checkpointing
