"""A plain reference for what every rollout engine must return (the definitions in reasonrl/rollout/base.py), shared
by test_engine_semantics.py (hf, vllm) and test_server_engine.py (server): one full fp32 forward of the model per
completion, everything after it in float64."""

from __future__ import annotations

import torch

from reasonrl.rl.hapo import EntropyStats, adaptive_temperature
from reasonrl.rollout.base import AdaptiveTemperature, SamplingParams
from reasonrl.trainers.policy import completion_logprobs

ATOL = 1e-4  # the bar for "the same values on every engine"

# HAPO statistics under which h_hat saturates at +1 for every token of the near-uniform tiny models (next-token
# entropies about 4.6 nats, log H about 1.5 > 1): T_t = T0 (1 + tau) exactly. An engine that ignored T_t is caught,
# and the engines' float differences in H cannot move T_t (a per-token T_t is tested in test_adaptive_temperature).
SATURATING_STATS = EntropyStats(m=0.0, sigma=1.0, scale_pos=1.0, scale_neg=1.0)

CASES = {
    "temperature": SamplingParams(n=2, temperature=0.7, seed=3),
    "top_k_top_p": SamplingParams(n=2, temperature=0.7, top_k=16, top_p=0.9, seed=4),
    "adaptive": SamplingParams(n=2, temperature=0.7, seed=5,
                               adaptive_temperature=AdaptiveTemperature(tuple(SATURATING_STATS.to_list()), tau=0.5)),
    "greedy": SamplingParams(temperature=0.0),
}


def raw_logits(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[T, V] float64 logits that predict each completion token, from one unpadded forward."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(completion)]
    return logits.double()


def truncate(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k, then top-p over what is left (as vLLM and transformers order them): keep logits >= the k-th largest;
    then, in ascending order, drop tokens whose cumulative probability is <= 1 - top_p, always keeping the largest."""
    if top_k > 0:
        z = z.masked_fill(z < z.topk(top_k, dim=-1).values[:, -1:], -torch.inf)
    if top_p < 1.0:
        ascending, order = z.sort(dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        z = z.scatter(-1, order, ascending.masked_fill(drop, -torch.inf))
    return z


def sampling_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The logits each token was drawn from: / T (T_t under HAPO), top-k / top-p; greedy: the raw logits."""
    if params.temperature == 0:
        return logits
    temperature = torch.full((len(logits),), params.temperature, dtype=torch.float64)
    spec = params.adaptive_temperature
    if spec is not None:
        temperature = adaptive_temperature(logits, base_temperature=params.temperature, tau=spec.tau,
                                           stats=EntropyStats.from_list(list(spec.stats)),
                                           sign_mode=spec.sign_mode).double()
    return truncate(logits / temperature[:, None], params.top_k, params.top_p)


def reference(model, prompt: list[int], completion: list[int], params: SamplingParams):
    """(rollout log-probs, entropies at T = 1) of one completion, [T] each."""
    logits = raw_logits(model, prompt, completion)
    index = torch.tensor(completion)[:, None]
    logp = torch.log_softmax(sampling_logits(logits, params), -1).gather(-1, index).squeeze(-1)
    at_one = torch.log_softmax(logits, -1)
    return logp, -(at_one.exp() * at_one).sum(-1)


def row_prompts(prompts: list[list[int]], n: int, count: int) -> list[list[int]]:
    """The prompt of each completion (prompt-major, n per prompt)."""
    return [prompts[i // n] for i in range(count)]


def trainer_entropies(model, prompts: list[list[int]], out, params: SamplingParams, *, pad_id: int) -> list[list[float]]:
    """The entropies the trainer uses with the vllm / server engines: its no-grad `completion_logprobs` pass at the
    rollout temperature (greedy: 1, the trainer never trains at T = 0)."""
    ids = out.completion_ids
    width = max(len(c) for c in ids)
    padded = torch.tensor([c + [pad_id] * (width - len(c)) for c in ids])
    mask = torch.tensor([[True] * len(c) + [False] * (width - len(c)) for c in ids])
    rows = row_prompts(prompts, params.n, len(ids))
    with torch.no_grad():
        _, entropy = completion_logprobs(model, rows, padded, mask, pad_id=pad_id,
                                         temperature=params.temperature or 1.0)
    return [entropy[i, : len(c)].tolist() for i, c in enumerate(ids)]


def assert_matches_reference(model, prompts, out, params: SamplingParams, entropies: list[list[float]]) -> None:
    """Every completion's rollout log-probs and entropies equal the reference to ATOL."""
    assert any(out.completion_ids), "nothing was generated: the test would check nothing"
    for prompt, ids, logp, entropy in zip(row_prompts(prompts, params.n, len(out.completion_ids)),
                                          out.completion_ids, out.logprobs, entropies, strict=True):
        want_logp, want_entropy = reference(model, prompt, ids, params)
        torch.testing.assert_close(torch.tensor(logp, dtype=torch.float64), want_logp, atol=ATOL, rtol=0)
        torch.testing.assert_close(torch.tensor(entropy, dtype=torch.float64), want_entropy, atol=ATOL, rtol=0)
