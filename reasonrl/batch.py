"""Rollout batch container (N = P * G rows, G completions per prompt consecutive)."""

from dataclasses import dataclass

import torch


@dataclass
class RolloutBatch:
    """One rollout step: right-padded completions with bool mask (True = real token)."""

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # bool [N, T]
    rollout_logprobs: torch.Tensor | None  # [N, T]
    finish_reasons: list[str]
    group_size: int

    @property
    def num_rows(self) -> int:
        return self.completion_ids.shape[0]

    def select_rows(self, idx: torch.Tensor) -> "RolloutBatch":
        """Sub-batch of rows ``idx`` (long indices or bool mask); group_size is kept as is."""
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().squeeze(-1)
        rows = idx.tolist()
        dev = self.completion_ids.device
        idx = idx.to(dev)
        return RolloutBatch(
            prompt_ids=[self.prompt_ids[i] for i in rows],
            completion_ids=self.completion_ids[idx],
            completion_mask=self.completion_mask[idx],
            rollout_logprobs=None if self.rollout_logprobs is None else self.rollout_logprobs[idx],
            finish_reasons=[self.finish_reasons[i] for i in rows],
            group_size=self.group_size,
        )
