"""EpisodeRunner outcomes with a scripted engine (no model): every failure of a tool or an environment is a counted
outcome of its episode, never a crash; the limits hold; episodes run concurrently with their tools. Then the
trajectories' batch and metrics."""

from __future__ import annotations

import math
import threading
import time
from typing import ClassVar

import pytest
import torch

from reasonrl.envs.base import Environment, EpisodeState
from reasonrl.envs.calculator import CalculatorEnv
from reasonrl.envs.episodes import Episode, EpisodeLimits, EpisodeRunner
from reasonrl.envs.tito import encode_text
from reasonrl.envs.tools import Tool, render_text_result
from reasonrl.envs.trajectories import EPISODE_SUMS, episode_batch, episode_metrics, episode_sums
from reasonrl.rollout.base import RolloutOutput, SamplingParams

PARAMS = SamplingParams(seed=0)
ROW = {"question": "What is 6 * 7?", "answer": "42"}


@pytest.fixture(scope="module")
def tok():
    from reasonrl.models import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path("smollm2-135m-instruct"))


class PolicyEngine:
    """Each completion is `policy(text of the prompt so far)`, tokenised, cut at a stop string and at the call's
    max_new_tokens ("length"). Records (time, prompt texts, budgets) per call."""

    def __init__(self, tokenizer, policy):
        self.tokenizer, self.policy = tokenizer, policy
        self.calls: list[tuple[float, list[str], list[int]]] = []

    def generate(self, prompt_ids, params, max_new_tokens, logits_processors=None):
        texts = [self.tokenizer.decode(p, skip_special_tokens=False) for p in prompt_ids]
        self.calls.append((time.perf_counter(), texts, list(max_new_tokens)))
        out = RolloutOutput([], [], [])
        for text, budget in zip(texts, max_new_tokens):
            reply = self.policy(text)
            for stop in params.stop:
                if stop in reply:
                    reply = reply[:reply.index(stop) + len(stop)]
            ids = encode_text(self.tokenizer, reply)
            finish = "stop"
            if len(ids) > budget:
                ids, finish = ids[:budget], "length"
            out.completion_ids.append(ids)
            out.logprobs.append([-0.5] * len(ids))
            out.finish_reasons.append(finish)
        return out


def turn_of(text: str) -> int:
    """How many tool results the text format's (single) assistant turn holds so far."""
    return text.rsplit("<|im_start|>assistant\n", 1)[1].count("<result>")


def run(tok, env, policy, *, rows=(ROW,), group_size=1, **limits):
    engine = PolicyEngine(tok, policy)
    runner = EpisodeRunner(env, tok, limits=EpisodeLimits(**limits), template="{question}",
                           eos_ids={tok.convert_tokens_to_ids("<|im_end|>")})
    try:
        episodes = runner.run(engine, list(rows), PARAMS, group_size=group_size)
    finally:
        runner.close()
    return episodes, engine


def env_with(*funcs, respond=None, score=None) -> Environment:
    class Env(Environment):
        tools: ClassVar[list] = [Tool.of(f) for f in funcs]

    env = Env()
    if respond is not None:
        env.respond = respond
    if score is not None:
        env.score = score
    return env


def boom(x: str) -> str:
    """Always raises.

    Args:
        x: Anything.
    """
    raise RuntimeError("kaboom")


def hang(x: str) -> str:
    """Sleeps for 3 s.

    Args:
        x: Anything.
    """
    time.sleep(3.0)
    return "late"


def flood(x: str) -> str:
    """Returns a 1 MB string.

    Args:
        x: Anything.
    """
    return "x" * 1_000_000


def one_call_then_answer(name):
    return lambda text: f"<tool>{name}: a</tool>" if turn_of(text) == 0 else " The answer is 42.<|im_end|>"


def env_runs(tok, episode) -> list[str]:
    runs, current = [], []
    for t, s in zip(episode.ids, episode.sampled):
        if not s:
            current.append(t)
        elif current:
            runs.append(tok.decode(current, skip_special_tokens=False))
            current = []
    if current:
        runs.append(tok.decode(current, skip_special_tokens=False))
    return runs


def test_tool_that_raises(tok):
    [e], _engine = run(tok, env_with(boom), one_call_then_answer("boom"))
    assert e.done and e.finish_reason == "stop" and e.env_errors == 0
    assert e.state.tool_calls == 1 and e.state.tool_errors == 1 and e.state.turns == 2
    assert env_runs(tok, e) == [render_text_result("error: RuntimeError: kaboom")]


def test_tool_that_hangs_times_out(tok):
    start = time.perf_counter()
    [e], _ = run(tok, env_with(hang), one_call_then_answer("hang"), tool_timeout_s=0.3)
    assert time.perf_counter() - start < 2.0
    assert e.done and e.state.tool_calls == 1 and e.state.tool_errors == 1
    assert env_runs(tok, e) == [render_text_result("error: the tool timed out after 0.3s")]


def test_tool_that_floods_is_cut(tok):
    [e], _ = run(tok, env_with(flood), one_call_then_answer("flood"), max_result_chars=100,
                 max_episode_tokens=4096)
    assert e.state.tool_errors == 0
    [result] = [m["content"] for m in e.state.messages if m["role"] == "tool"]
    assert result == "x" * 100 + f"... [truncated {1_000_000 - 100} chars]"
    assert env_runs(tok, e) == [render_text_result(result)]


def test_respond_that_raises(tok):
    def respond(state, text):
        raise ValueError("bad env")

    [e], engine = run(tok, env_with(respond=respond), lambda text: "42<|im_end|>")
    assert e.env_errors == 1 and e.done and e.state.turns == 1 and len(engine.calls) == 1
    assert e.reward is None  # the default score: graded by the recipe's rewards


def test_score_that_raises(tok):
    def score(state):
        raise ZeroDivisionError("no score")

    [e], _ = run(tok, env_with(score=score), lambda text: "42<|im_end|>")
    assert e.env_errors == 1 and math.isnan(e.reward)


def test_model_that_never_calls_the_tool(tok):
    [e], engine = run(tok, CalculatorEnv(), lambda text: "The answer is 42.<|im_end|>")
    assert e.state.tool_calls == 0 and e.state.tool_errors == 0 and e.state.turns == 1
    assert e.env_tokens == 0 and e.finish_reason == "stop" and not e.turn_limit and len(engine.calls) == 1


def test_model_that_calls_the_tool_forever(tok):
    calls = []
    # a model that would call the tool 100 times in a row: bounded by max_turns and max_tool_calls
    policy = lambda text: "<tool>calculator: 1 + 1</tool>" * 100
    [e], engine = run(tok, CalculatorEnv(), lambda text: calls.append(1) or policy(text), max_turns=5,
                      max_tool_calls=3, max_episode_tokens=4096)
    assert len(engine.calls) == len(calls) == 5 and e.state.turns == 5
    assert e.turn_limit and e.done and e.finish_reason == "stop"
    assert e.state.tool_calls == 4 and e.state.tool_errors == 1  # the 4th is over the limit; the 5th turn not run
    results = [m["content"] for m in e.state.messages if m["role"] == "tool"]
    assert results[:3] == ["2"] * 3 and results[3].startswith("error: no more tool calls")


def test_episode_token_budget_truncates(tok):
    budget = 40
    policy = lambda text: "Let me compute this step by step carefully. <tool>calculator: 1 + 1</tool>"
    [e], engine = run(tok, CalculatorEnv(), policy, max_turns=10, max_episode_tokens=budget)
    assert e.finish_reason == "length" and len(e.ids) <= budget
    assert all(b <= budget for _, _, bs in engine.calls for b in bs)


def test_group_size_episodes_per_row(tok):
    rows = [{"question": "What is 1 + 1?", "answer": "2"}, {"question": "What is 2 + 2?", "answer": "4"}]
    episodes, engine = run(tok, CalculatorEnv(), lambda text: "Done.<|im_end|>", rows=rows, group_size=3)
    assert len(episodes) == 6 and [e.state.row for e in episodes] == [rows[0]] * 3 + [rows[1]] * 3
    assert len(engine.calls) == 1 and len(engine.calls[0][1]) == 6  # one batched call for all ready episodes
    assert all(e.done and e.state.turns == 1 for e in episodes)


def test_episodes_decode_while_a_tool_runs(tok):
    finished = {}

    def work(x: str) -> str:
        """Slow when asked.

        Args:
            x: slow or fast.
        """
        if x == "slow":
            time.sleep(0.5)
            finished["slow"] = time.perf_counter()
        return x

    def policy(text):
        kind = "slow" if "Question slow" in text else "fast"
        n = turn_of(text)
        return f"<tool>work: {kind}</tool>" if n < (1 if kind == "slow" else 3) else " end<|im_end|>"

    rows = [{"question": "Question slow", "answer": "0"}, {"question": "Question fast", "answer": "0"}]
    (slow, fast), engine = run(tok, env_with(work), policy, rows=rows, max_turns=6, max_episode_tokens=4096)
    assert slow.done and fast.done and slow.state.turns == 2 and fast.state.turns == 4
    # after the first (joint) call, the fast episode got engine calls on its own before the slow tool finished
    early = [texts for at, texts, _ in engine.calls[1:] if at < finished["slow"]]
    assert early and all(len(texts) == 1 and "Question fast" in texts[0] for texts in early)
    assert threading.active_count() < 50


# ----------------------------------------------------------------------------------------------- trajectories


def hand_episode(ids, sampled, *, finish="stop", entropies=True) -> Episode:
    e = Episode(prompt_ids=[1, 2, 3], state=EpisodeState(row={}, messages=[]))
    e.ids, e.sampled = list(ids), list(sampled)
    e.logprobs = [-0.1 if s else 0.0 for s in sampled]
    e.versions = [7] * len(ids)
    e.entropies = [0.3 if s else 0.0 for s in sampled] if entropies else None
    e.finish_reason = finish
    return e


def test_episode_batch_shapes_and_masks():
    episodes = [hand_episode([10, 11, 12, 13, 14], [True, True, False, False, True]),
                hand_episode([20, 21], [True, True], finish="length"),
                hand_episode([30, 31, 32], [True, False, True])]
    batch = episode_batch(episodes, pad_id=0, group_size=3)
    assert batch.completion_ids.shape == (3, 5) and batch.sampled_mask.shape == (3, 5)
    assert batch.completion_ids[1].tolist() == [20, 21, 0, 0, 0]
    assert batch.completion_mask.sum(1).tolist() == [5, 2, 3]
    assert batch.sampled_mask.tolist() == [[True, True, False, False, True], [True, True, False, False, False],
                                           [True, False, True, False, False]]
    assert batch.model_mask().sum(1).tolist() == [3, 2, 2]
    assert not (batch.sampled_mask & ~batch.completion_mask).any()
    assert batch.rollout_logprobs[0].tolist() == pytest.approx([-0.1, -0.1, 0.0, 0.0, -0.1])
    assert batch.token_versions[0].tolist() == [7] * 5 and batch.token_versions[1].tolist() == [7, 7, 0, 0, 0]
    assert batch.rollout_entropy is not None and batch.rollout_entropy.shape == (3, 5)
    assert batch.finish_reasons == ["stop", "length", "stop"] and batch.group_size == 3
    assert batch.prompt_ids == [[1, 2, 3]] * 3


def test_episode_batch_without_entropies():
    batch = episode_batch([hand_episode([1], [True]), hand_episode([2], [True], entropies=False)], pad_id=0,
                          group_size=2)
    assert batch.rollout_entropy is None


def record(turns, tool_calls, tool_errors, env_errors, model_tokens, env_tokens, truncated, turn_limit):
    return {"turns": turns, "tool_calls": tool_calls, "tool_errors": tool_errors, "env_errors": env_errors,
            "model_tokens": model_tokens, "env_tokens": env_tokens, "truncated": truncated,
            "turn_limit": turn_limit, "transcript": ""}


def test_episode_sums_and_metrics():
    records = [record(3, 2, 1, 0, 30, 10, False, False),
               record(1, 0, 0, 1, 20, 0, True, False),
               record(4, 5, 0, 0, 50, 40, True, True)]
    sums = episode_sums(records)
    assert sums.dtype == torch.float64 and sums.shape == (len(EPISODE_SUMS) + 1,)
    assert sums.tolist() == [8, 7, 1, 1, 100, 50, 2, 1, 2, 3]
    m = episode_metrics(sums)
    assert m["episode/turns_mean"] == pytest.approx(8 / 3)
    assert m["episode/tool_calls_mean"] == pytest.approx(7 / 3)
    assert m["episode/tool_call_rate"] == pytest.approx(2 / 3)
    assert m["episode/tool_error_rate"] == pytest.approx(1 / 7)
    assert m["episode/env_errors"] == 1
    assert m["episode/env_token_share"] == pytest.approx(50 / 150)
    assert m["episode/model_token_share"] == pytest.approx(100 / 150)
    assert m["episode/truncated_frac"] == pytest.approx(2 / 3)
    assert m["episode/turn_limit_frac"] == pytest.approx(1 / 3)
    # ranks add their sums before dividing: two halves give the same metrics as the whole
    assert episode_metrics(episode_sums(records[:1]) + episode_sums(records[1:])) == pytest.approx(m)


def test_episode_sums_empty():
    sums = episode_sums([])
    assert sums.shape == (len(EPISODE_SUMS) + 1,) and sums.sum() == 0
    m = episode_metrics(sums)
    assert m["episode/turns_mean"] == 0.0 and m["episode/tool_error_rate"] == 0.0
