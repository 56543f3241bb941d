"""The contract between the trainer and any generation engine (transformers, vLLM, a vLLM server).

Every engine returns the same quantities for the same tokens, so nothing downstream (HAPO statistics, D3S scores, the
importance-sampling correction) depends on which engine sampled:

- **Rollout log-probs** (`RolloutOutput.logprobs`, the behaviour policy of the IS correction): the log-probability of
  each sampled token under the distribution it was drawn from, as vLLM's ``logprobs_mode="processed_logprobs"``
  defines it: log_softmax of the logits after the logits processors (HAPO's adaptive temperature, CyclicReflex),
  divided by the temperature (T_t per token under HAPO), with the entries outside top-k / top-p set to -inf (so the
  kept ones are renormalised). Greedy decoding: log_softmax of the processed logits, undivided. `hf` reads
  `generate`'s processed ``scores``, `vllm` and `server` run vLLM with ``processed_logprobs``.
- **Entropies** H_t: the entropy of softmax(raw logits) at temperature 1 (algorithms.md, Notation), whatever
  `rollout.temperature` is. `hf` returns them (`RolloutOutput.entropies`, when asked); for the others the trainer
  computes them with `reasonrl.trainers.policy.completion_logprobs`, which gives the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class AdaptiveTemperature:
    """HAPO adaptive temperature sampling: T_t = temperature * (1 + tau * h_hat(entropy of the token's logits)),
    with h_hat from the previous step's entropy statistics (`reasonrl.rl.hapo.EntropyStats.to_list()`)."""

    stats: tuple[float, ...]
    tau: float
    sign_mode: str = "paper"


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt, returned consecutively
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    adaptive_temperature: AdaptiveTemperature | None = None
    stop: tuple[str, ...] = ()  # stop strings: a completion ends after the token whose text completes one (kept)

    def request_seed(self, prompt_index: int) -> int | None:
        """Seed of prompt ``prompt_index``'s request in the vLLM engines, which give its j-th of n children
        ``seed + j``: offsetting by ``prompt_index * n`` gives every completion of a call its own stream, so identical
        prompts in one batch still get different samples, and the same call is reproducible."""
        return None if self.seed is None else self.seed + prompt_index * self.n


@dataclass
class RolloutOutput:
    """One entry per completion (prompt-major, n consecutive completions per prompt)."""

    completion_ids: list[list[int]]
    logprobs: list[list[float]]  # log-prob of each sampled token under the distribution it was drawn from (module doc)
    finish_reasons: list[str]  # "stop" (EOS) or "length" (hit its max_new_tokens)
    entropies: list[list[float]] | None = None  # per-token entropy at T=1 of the raw logits, if the engine has it
    versions: list[list[int]] | None = None  # per-token policy version that sampled it, if the engine tracks them

    def append_empty(self, n: int) -> None:
        """``n`` empty completions (a prompt with no token budget)."""
        for _ in range(n):
            self.completion_ids.append([])
            self.logprobs.append([])
            self.finish_reasons.append("length")
            if self.versions is not None:
                self.versions.append([])


@runtime_checkable
class RolloutEngine(Protocol):
    """``generate`` returns ``params.n`` completions per prompt (prompt-major), each ending at EOS (kept), a stop
    string (kept) or its own ``max_new_tokens``, with log-probs as defined in the module docstring;
    ``load_weights`` takes ``(hf_name, tensor)`` pairs of the trainer's policy."""

    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        max_new_tokens: list[int],
        logits_processors: list | None = None,
    ) -> RolloutOutput: ...

    def load_weights(self, named_tensors) -> None: ...
