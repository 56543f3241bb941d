"""Episodes on the real engines: the vllm engine (in this process) and the server engine (`reasonrl serve` in its own
process) continue every episode from its token prefix.

Three-turn episodes (an environment that always answers) run through the EpisodeRunner with greedy sampling, on the
tiny model (its greedy turns copy the last token, so a stop string ends them) and, opt-in (slow), on SmolLM2-135M
(real sentences ending with EOS, a BPE tokenizer). For every episode:
(a) each engine call got exactly the episode's prompt and tokens so far, and each model turn equals what the same
    engine generates when given that prefix of ids directly, in another batch (continuation from the token prefix,
    no re-tokenisation);
(b) each environment run of tokens is exactly the chat template's delta (its own render difference, tokenised);
(c) every model token has its log-prob, equal to a teacher-forced fp32 forward of the whole trajectory; environment
    tokens have 0.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_tito import expected_chat_delta, segments

from reasonrl.envs.base import Environment
from reasonrl.envs.episodes import EpisodeLimits, EpisodeRunner
from reasonrl.rollout.base import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rollout"))
from engine_reference import ATOL, raw_logits
from serve_helpers import LOGP_ATOL, kill_server, start_server

TURNS = 3
TOKEN = "engine-episodes-weight-token"
MAX_MODEL_LEN = 512  # the tiny model's context; longer than any episode here


class AlwaysAnswers(Environment):
    """Feedback after every turn: the episode ends at `max_turns` only."""

    def respond(self, state, text):
        return [{"role": "user", "content": f"Turn {state.turns} heard. Say it again in one short sentence."}]


@dataclass
class Model:
    name: str
    path: str
    tokenizer: object
    hf: torch.nn.Module
    eos_ids: list[int]
    stop: tuple[str, ...]  # stop strings that end the greedy turns before their budget
    turn_tokens: int  # max_turn_tokens
    atol: float  # log-prob tolerance of the other engine tests on this model
    questions: tuple[str, ...] = ("Name a color.", "What is 2 + 2?", "Name a fruit.")


@pytest.fixture(scope="module", params=["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def model(request, vllm_tiny_model_dir) -> Model:
    from reasonrl.models import load_model, load_tokenizer, resolve_model_path
    from reasonrl.rollout.factory import eos_token_ids

    if request.param == "tiny":  # greedy repeats "\n" after the assistant header: four of them end a turn
        path, stop, turn_tokens, atol = vllm_tiny_model_dir, ("\n\n\n\n",), 8, ATOL
    else:  # test_vllm_engine's tolerance for SmolLM2 in fp32
        path, stop, turn_tokens, atol = resolve_model_path("smollm2-135m-instruct"), (), 48, LOGP_ATOL
    tokenizer = load_tokenizer(path)
    hf = load_model(path, dtype="float32").eval()
    return Model(request.param, path, tokenizer, hf, eos_token_ids(tokenizer, path), stop, turn_tokens, atol)


@pytest.fixture(params=["vllm", "server"])
def engine(request, model, vllm_module, tmp_path, free_port):
    if request.param == "vllm":
        from reasonrl.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(model.path, dtype="float32", kv_cache_memory_bytes=1 << 28, max_model_len=MAX_MODEL_LEN,
                            eos_token_ids=model.eos_ids)
        yield engine
        engine.close()
        return
    from reasonrl.rollout.server_engine import ServerEngine

    proc, url, _ = start_server(model.path, tmp_path, free_port(), token=TOKEN,
                                vllm_args=("--max-model-len", str(MAX_MODEL_LEN)))
    try:
        yield ServerEngine(url, eos_token_ids=model.eos_ids, tokenizer=model.tokenizer, timeout_s=120)
    finally:
        kill_server(proc)


class Recording:
    """The engine, with the prompts and budgets of every call kept (the runner's side of the contract)."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompt_ids, params, max_new_tokens, logits_processors=None):
        self.calls.append(([list(p) for p in prompt_ids], list(max_new_tokens)))
        return self.engine.generate(prompt_ids, params, max_new_tokens, logits_processors)


def run_episodes(model: Model, engine) -> tuple[list, Recording]:
    limits = EpisodeLimits(max_turns=TURNS, max_turn_tokens=model.turn_tokens, max_episode_tokens=MAX_MODEL_LEN // 2)
    runner = EpisodeRunner(AlwaysAnswers(), model.tokenizer, limits=limits, template="{question}",
                           eos_ids=set(model.eos_ids))
    recording = Recording(engine)
    rows = [{"question": q, "answer": "0"} for q in model.questions]
    try:
        episodes = runner.run(recording, rows, SamplingParams(temperature=0.0, stop=model.stop), group_size=1)
    finally:
        runner.close()
    return episodes, recording


def model_turn_spans(episode) -> list[tuple[int, int]]:
    """(start, end) in `episode.ids` of each model turn."""
    spans, at = [], 0
    for sampled, ids in segments(episode):
        if sampled:
            spans.append((at, at + len(ids)))
        at += len(ids)
    return spans


def check_continues_from_prefix(model: Model, engine, episodes, recording: Recording) -> None:
    """(a): the runner handed the engine each episode's own ids, and a direct call on those ids gives each turn."""
    spans = [model_turn_spans(e) for e in episodes]
    assert [len(s) for s in spans] == [TURNS] * len(episodes)
    assert len(recording.calls) == TURNS  # every round is one batched call over all episodes
    for k, (prompts, _) in enumerate(recording.calls):
        assert prompts == [e.prompt_ids + e.ids[:s[k][0]] for e, s in zip(episodes, spans)]
    prefixes = [p for prompts, _ in recording.calls for p in prompts]
    budgets = [b for _, call_budgets in recording.calls for b in call_budgets]
    want = [e.ids[s[k][0]:s[k][1]] for k in range(TURNS) for e, s in zip(episodes, spans)]
    want_logps = [e.logprobs[s[k][0]:s[k][1]] for k in range(TURNS) for e, s in zip(episodes, spans)]
    direct = engine.generate(prefixes, SamplingParams(n=1, temperature=0.0, stop=model.stop), budgets)
    assert direct.completion_ids == want
    assert direct.finish_reasons == ["stop"] * len(want)
    for got, expected in zip(direct.logprobs, want_logps, strict=True):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                                   atol=model.atol, rtol=0)


def check_env_deltas(model: Model, episode) -> None:
    """(b): each environment run is the template's render difference after the turn before it."""
    tokenizer, messages = model.tokenizer, episode.state.messages
    assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    runs = segments(episode)
    env_runs = [ids for sampled, ids in runs if not sampled]
    model_runs = [ids for sampled, ids in runs if sampled]
    assert len(env_runs) == TURNS - 1 and runs[0][0] and runs[-1][0]  # model, env, model, env, model
    for k, run in enumerate(env_runs):
        history, replies = messages[:assistant_at[k] + 1], messages[assistant_at[k] + 1:assistant_at[k + 1]]
        ended_by_eos = model_runs[k][-1] in model.eos_ids
        sampled_end = tokenizer.decode(model_runs[k][-1:], skip_special_tokens=False) if ended_by_eos else ""
        assert run == expected_chat_delta(tokenizer, history, replies, None, sampled_end)
        assert replies[0]["content"] in tokenizer.decode(run, skip_special_tokens=False)


def check_logprobs(model: Model, episode) -> None:
    """(c): a log-prob per token; the model's equal teacher forcing of the whole trajectory, the environment's 0."""
    assert len(episode.logprobs) == len(episode.ids) == len(episode.sampled)
    logits = raw_logits(model.hf, episode.prompt_ids, episode.ids)  # [T, V]
    teacher = torch.log_softmax(logits, -1).gather(-1, torch.tensor(episode.ids)[:, None]).squeeze(-1)  # [T]
    sampled = torch.tensor(episode.sampled)
    got = torch.tensor(episode.logprobs, dtype=torch.float64)
    assert all(math.isfinite(lp) and lp <= 0.0 for lp in got[sampled].tolist())
    torch.testing.assert_close(got[sampled], teacher[sampled], atol=model.atol, rtol=0)
    assert (got[~sampled] == 0.0).all()


def test_episodes_continue_from_their_token_prefix(model, engine):
    episodes, recording = run_episodes(model, engine)
    for episode in episodes:
        assert episode.state.turns == TURNS and episode.finish_reason == "stop" and episode.env_errors == 0
        assert episode.model_tokens > TURNS and episode.env_tokens > 0
    check_continues_from_prefix(model, engine, episodes, recording)
    for episode in episodes:
        check_env_deltas(model, episode)
        check_logprobs(model, episode)
