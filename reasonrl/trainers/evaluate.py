"""Greedy accuracy on held-out problems, shared by the trainer's periodic eval and `reasonrl eval`."""

from __future__ import annotations

from reasonrl.data.effort import with_effort
from reasonrl.data.prompts import encode_prompt
from reasonrl.rewards.math import accuracy_reward
from reasonrl.rollout.base import SamplingParams


def greedy_accuracy(
    engine, tokenizer, rows: list[dict], *, template: str, max_new_tokens: int, answer_mode: str = "lenient",
    num_scored: int | None = None, effort: float | None = None,
) -> dict:
    """Returns {"correct", "n", "tokens", "samples"}: counts, so ranks can sum them before dividing.

    num_scored: count only the first rows (the rest only keep ranks that generate in lockstep, ZeRO-3, in step).
    effort: e1 effort r in (0, 1]; each question gets the effort line (`with_effort`) before the template. None: none.
    """
    if not rows:
        return {"correct": 0.0, "n": 0.0, "tokens": 0.0, "samples": []}
    prompts = [encode_prompt(tokenizer, with_effort(row["question"], effort), template) for row in rows]
    out = engine.generate(prompts, SamplingParams(n=1, temperature=0.0), [max_new_tokens] * len(prompts))
    if num_scored is not None:
        rows, out.completion_ids = rows[:num_scored], out.completion_ids[:num_scored]
    texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
    scores = accuracy_reward(texts, [row["answer"] for row in rows], mode=answer_mode)
    samples = [
        {"question": row["question"], "answer": row["answer"], "completion": text, "correct": score}
        for row, text, score in zip(rows, texts, scores)
    ]
    return {
        "correct": float(sum(scores)),
        "n": float(len(rows)),
        "tokens": float(sum(len(ids) for ids in out.completion_ids)),
        "samples": samples,
    }


def episode_accuracy(runner, engine, tokenizer, rows: list[dict], *, answer_mode: str = "lenient",
                     num_scored: int | None = None) -> dict:
    """Greedy episodes with the environment (reasonrl/envs), one per row; the same counts as `greedy_accuracy`
    plus tool calls and turns, and the scored episodes themselves ("episodes", aligned with "samples"). An episode
    is right when the environment's own score is > 0 or, for an environment that does not score, when the model's
    answer is (the accuracy reward on its text)."""
    if not rows:
        return {"correct": 0.0, "n": 0.0, "tokens": 0.0, "tool_calls": 0.0, "with_tool": 0.0, "turns": 0.0,
                "samples": [], "episodes": []}
    episodes = runner.run(engine, rows, SamplingParams(n=1, temperature=0.0), group_size=1)
    if num_scored is not None:
        rows, episodes = rows[:num_scored], episodes[:num_scored]
    texts = [e.model_text() for e in episodes]
    graded = accuracy_reward(texts, [row["answer"] for row in rows], mode=answer_mode)
    scores = [float(e.reward > 0) if e.reward is not None else g for e, g in zip(episodes, graded)]
    samples = [
        {"question": row["question"], "answer": row["answer"], "completion": tokenizer.decode(e.ids),
         "correct": score, "turns": e.state.turns, "tool_calls": e.state.tool_calls}
        for row, e, score in zip(rows, episodes, scores)
    ]
    return {
        "correct": float(sum(scores)), "n": float(len(rows)), "tokens": float(sum(e.model_tokens for e in episodes)),
        "tool_calls": float(sum(e.state.tool_calls for e in episodes)),
        "with_tool": float(sum(e.state.tool_calls > 0 for e in episodes)),
        "turns": float(sum(e.state.turns for e in episodes)), "samples": samples, "episodes": episodes,
    }
