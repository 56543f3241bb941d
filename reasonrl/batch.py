"""Rollout batch container (N = P * G rows, G completions per prompt consecutive)."""

from dataclasses import dataclass

import torch


def right_padded(rows: list[list], *, width: int, fill=0, dtype=torch.long) -> torch.Tensor:
    """[len(rows), width]: each row's values from the left, then `fill`."""
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


@dataclass
class RolloutBatch:
    """One rollout step: right-padded completions with bool mask (True = real token)."""

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # bool [N, T]
    rollout_logprobs: torch.Tensor | None  # [N, T]
    finish_reasons: list[str]
    group_size: int
    loss_mask: torch.Tensor | None = None  # bool [N, T] tokens that count in the loss (None: completion_mask)
    rollout_entropy: torch.Tensor | None = None  # [N, T] entropy at T=1 of the sampling policy, when the engine has it
    ntp_mask: torch.Tensor | None = None  # bool [N, T] tokens of the next-token-prediction term (RMT dual loss)
    token_versions: torch.Tensor | None = None  # long [N, T] policy version that sampled each token (async)
    # bool [N, T] tokens the model sampled; the others are an episode's environment tokens (tool results, feedback,
    # the chat template's turn markers): context for the model, never trained on. None: every completion token.
    sampled_mask: torch.Tensor | None = None

    def model_mask(self) -> torch.Tensor:
        """The model's own tokens: the completion minus environment tokens (every token-level statistic reads
        these; completion_mask stays the model's input)."""
        return self.completion_mask if self.sampled_mask is None else self.completion_mask & self.sampled_mask

    def trained_mask(self) -> torch.Tensor:
        """Tokens whose loss counts: a subset of the model's tokens."""
        return self.model_mask() if self.loss_mask is None else self.loss_mask & self.model_mask()

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
            loss_mask=None if self.loss_mask is None else self.loss_mask[idx],
            rollout_entropy=None if self.rollout_entropy is None else self.rollout_entropy[idx],
            ntp_mask=None if self.ntp_mask is None else self.ntp_mask[idx],
            token_versions=None if self.token_versions is None else self.token_versions[idx],
            sampled_mask=None if self.sampled_mask is None else self.sampled_mask[idx],
        )


def concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    """Rows of several batches (same group size) in order; completions right-padded to the widest."""
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    width = max(b.completion_ids.shape[1] for b in batches)

    def padded(name: str, fill):
        parts = [getattr(b, name) for b in batches]
        if any(t is None for t in parts):
            return None
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) for t in parts])

    return RolloutBatch(
        prompt_ids=[p for b in batches for p in b.prompt_ids],
        completion_ids=padded("completion_ids", 0),
        completion_mask=padded("completion_mask", False),
        rollout_logprobs=padded("rollout_logprobs", 0.0),
        finish_reasons=[r for b in batches for r in b.finish_reasons],
        group_size=batches[0].group_size,
        loss_mask=padded("loss_mask", False),
        rollout_entropy=padded("rollout_entropy", 0.0),
        ntp_mask=padded("ntp_mask", False),
        token_versions=padded("token_versions", 0),
        sampled_mask=padded("sampled_mask", False),
    )
