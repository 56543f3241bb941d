"""Finished episodes -> the trainer's batch: an episode is a completion whose environment tokens are context only.

The completion of an episode is every token after its prompt, the model's and the environment's, in order; the
batch's `sampled_mask` marks the model's, so the loss, the advantages' length terms, the entropy statistics, D3S
token selection, the IS correction and the KL read the model's tokens only, while the forward sees the whole
trajectory. Per-episode records carry the metrics (turns, tool calls, token shares) and the transcript;
`episode_transcript` adds the conversation and the per-turn metrics (`reasonrl eval --env`, `reasonrl generate --env`).
"""

from __future__ import annotations

import functools
import math

import torch

from reasonrl.batch import RolloutBatch, right_padded
from reasonrl.envs.episodes import Episode


def episode_batch(episodes: list[Episode], *, pad_id: int, group_size: int) -> RolloutBatch:
    """Right-padded [N, T] tensors of the episodes (prompt-major, G consecutive episodes per prompt)."""
    width = max(1, max(len(e.ids) for e in episodes))
    pad = functools.partial(right_padded, width=width)
    with_entropy = all(e.entropies is not None for e in episodes)
    ids = pad([e.ids for e in episodes], fill=pad_id)
    mask = pad([[True] * len(e.ids) for e in episodes], fill=False, dtype=torch.bool)
    sampled = pad([e.sampled for e in episodes], fill=False, dtype=torch.bool)
    logps = pad([e.logprobs for e in episodes], fill=0.0, dtype=torch.float32)
    versions = pad([e.versions for e in episodes])
    entropy = pad([e.entropies for e in episodes], fill=0.0, dtype=torch.float32) if with_entropy else None
    return RolloutBatch(
        prompt_ids=[e.prompt_ids for e in episodes], completion_ids=ids, completion_mask=mask, rollout_logprobs=logps,
        finish_reasons=[e.finish_reason for e in episodes], group_size=group_size, rollout_entropy=entropy,
        token_versions=versions, sampled_mask=sampled,
    )


def episode_record(episode: Episode, tokenizer) -> dict:
    """What the metrics and the sample table read about one episode."""
    s = episode.state
    return {
        "turns": s.turns, "tool_calls": s.tool_calls, "tool_errors": s.tool_errors, "env_errors": episode.env_errors,
        "model_tokens": episode.model_tokens, "env_tokens": episode.env_tokens,
        "truncated": episode.finish_reason == "length", "turn_limit": episode.turn_limit,
        "transcript": tokenizer.decode(episode.ids, skip_special_tokens=False),
    }


def turn_token_counts(episode: Episode) -> list[int] | None:
    """The tokens the model sampled in each of its turns: the runs of sampled tokens (an environment turn, which
    always adds tokens, lies between two model turns). None when the runs do not match the turns: a turn in which
    the engine returned no token leaves no run."""
    runs: list[int] = []
    previous = False
    for sampled in episode.sampled:
        if sampled and not previous:
            runs.append(0)
        if sampled:
            runs[-1] += 1
        previous = sampled
    return runs if len(runs) == episode.state.turns else None


def model_turn_starts(episode: Episode) -> list[int]:
    """The indices in `state.messages` of the model's assistant turns: the last `state.turns` assistant messages
    (the prompt's own assistant messages, such as worked examples, come before them)."""
    assistant = [i for i, m in enumerate(episode.state.messages) if m["role"] == "assistant"]
    return assistant[len(assistant) - episode.state.turns:] if episode.state.turns else []


def episode_turns(episode: Episode) -> list[dict]:
    """Per assistant turn of the model: its number, the tokens the model sampled in it (None: unknown, see
    `turn_token_counts`) and its tool calls (the tool results that answer it; the runner adds one per call)."""
    tokens = turn_token_counts(episode)
    messages, starts = episode.state.messages, model_turn_starts(episode)
    turns: list[dict] = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(messages)
        calls = sum(m["role"] == "tool" for m in messages[start + 1:end])
        turns.append({"turn": k + 1, "tokens": None if tokens is None else tokens[k], "tool_calls": calls})
    return turns


def episode_transcript(episode: Episode, tokenizer) -> dict:
    """An episode as the command line shows it: its record (`episode_record`), finish reason and reward (None: not
    scored, or the score raised, which `env_errors` counts), the conversation (role and content of every message:
    the prompt, the assistant turns, tool results and the environment's replies) and the per-turn metrics."""
    reward = episode.reward
    return {
        **episode_record(episode, tokenizer), "finish_reason": episode.finish_reason,
        "reward": reward if reward is not None and math.isfinite(reward) else None,
        "messages": [{"role": m["role"], "content": m["content"]} for m in episode.state.messages],
        "per_turn": episode_turns(episode),
    }


EPISODE_SUMS = ("turns", "tool_calls", "tool_errors", "env_errors", "model_tokens", "env_tokens", "truncated",
                "turn_limit", "with_tool_call")


def episode_sums(records: list[dict]) -> torch.Tensor:
    """[len(EPISODE_SUMS) + 1] sums over the records, then their count (ranks add them up before dividing)."""
    rows = [[float(r[k]) for k in EPISODE_SUMS[:-1]] + [float(r["tool_calls"] > 0)] for r in records]
    sums = torch.tensor(rows, dtype=torch.float64).sum(0) if rows else torch.zeros(len(EPISODE_SUMS), dtype=torch.float64)
    return torch.cat([sums, torch.tensor([float(len(records))], dtype=torch.float64)])


def episode_metrics(sums: torch.Tensor) -> dict[str, float]:
    """Per-episode means and shares from `episode_sums` (added over ranks)."""
    total = dict(zip(EPISODE_SUMS, sums[:-1].tolist()))
    count = max(float(sums[-1]), 1.0)
    tokens = max(total["model_tokens"] + total["env_tokens"], 1.0)
    return {
        "episode/turns_mean": total["turns"] / count,
        "episode/tool_calls_mean": total["tool_calls"] / count,
        "episode/tool_call_rate": total["with_tool_call"] / count,
        "episode/tool_error_rate": total["tool_errors"] / max(total["tool_calls"], 1.0),
        "episode/env_errors": total["env_errors"],
        "episode/env_token_share": total["env_tokens"] / tokens,
        "episode/model_token_share": total["model_tokens"] / tokens,
        "episode/truncated_frac": total["truncated"] / count,
        "episode/turn_limit_frac": total["turn_limit"] / count,
    }
