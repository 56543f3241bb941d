"""The contract between the trainer and any generation engine (transformers, vLLM, a vLLM server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt, returned consecutively
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None


@dataclass
class RolloutOutput:
    """One entry per completion (prompt-major, n consecutive completions per prompt)."""

    completion_ids: list[list[int]]
    logprobs: list[list[float]]  # log-prob of each sampled token under the sampling distribution
    finish_reasons: list[str]  # "stop" (EOS) or "length" (hit its max_new_tokens)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        max_new_tokens: list[int],
        logits_processors: list | None = None,
    ) -> RolloutOutput: ...

    def load_weights(self, named_tensors) -> None: ...
