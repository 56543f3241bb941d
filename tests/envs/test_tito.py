"""Token-in-token-out with real tokenizers (no model): the episode keeps the model's sampled ids exactly, every
environment delta is the chat template's own render difference, and re-tokenising the conversation would not
give the same tokens.

The scripted engine samples ids that are NOT what re-tokenising their text gives (a word split into two tokens),
so any re-tokenisation in the runner would show up as a mismatch."""

from __future__ import annotations

import copy
import math

import pytest

from reasonrl.envs.calculator import CalculatorEnv
from reasonrl.envs.episodes import EpisodeLimits, EpisodeRunner
from reasonrl.envs.retry import RETRY_MESSAGE, RetryEnv
from reasonrl.envs.tito import encode_text, render
from reasonrl.envs.tools import render_text_result
from reasonrl.rollout.base import RolloutOutput, SamplingParams

# A Qwen2.5-style chatml template: default system message, tools in the system message inside <tools></tools>,
# tool results as a user turn of <tool_response> blocks (consecutive ones grouped), assistant turns as given.
QWEN_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- else %}"
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PARAMS = SamplingParams(temperature=1.0, seed=0)


@pytest.fixture(scope="module")
def smol():
    from reasonrl.models import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def qwen(smol):
    tokenizer = copy.deepcopy(smol)
    tokenizer.chat_template = QWEN_TEMPLATE
    return tokenizer


class ScriptedEngine:
    """Returns pre-chosen token ids (and log-probs) per call; records every call's prompts."""

    def __init__(self, turns: list[list[int]]):
        self.turns = [list(t) for t in turns]
        self.logprobs = [[-0.01 * (k + 1) - 0.001 * j for j in range(len(t))] for k, t in enumerate(turns)]
        self.calls: list[list[list[int]]] = []

    def generate(self, prompt_ids, params, max_new_tokens, logits_processors=None):
        assert len(prompt_ids) == 1, "one episode: one prompt per call"
        k = len(self.calls)
        self.calls.append([list(p) for p in prompt_ids])
        ids, lps = self.turns[k], self.logprobs[k]
        assert len(ids) <= max_new_tokens[0]
        return RolloutOutput(completion_ids=[list(ids)], logprobs=[list(lps)], finish_reasons=["stop"])


def split_ids(tokenizer, *pieces: str) -> list[int]:
    """The ids of each piece tokenised on its own, joined: not what the joined text tokenises to."""
    return [i for piece in pieces for i in encode_text(tokenizer, piece)]


def split_word(text: str, cut: str) -> tuple[str, str]:
    """`text` in two pieces, the first ending with `cut` (inside a word)."""
    at = text.index(cut) + len(cut)
    return text[:at], text[at:]


def im_end(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def segments(episode) -> list[tuple[bool, list[int]]]:
    """The episode's ids as runs of (sampled, ids)."""
    runs: list[tuple[bool, list[int]]] = []
    for token, sampled in zip(episode.ids, episode.sampled):
        if runs and runs[-1][0] == sampled:
            runs[-1][1].append(token)
        else:
            runs.append((sampled, [token]))
    return runs


def expected_chat_delta(tokenizer, history, replies, tools, sampled_end: str) -> list[int]:
    """The template's own render difference: the conversation rendered with the replies (and the next assistant
    header), the text after the model's last turn, less the end-of-turn token the model sampled itself."""
    full = render(tokenizer, [*history, *replies], tools=tools, generation_prompt=True)
    before = render(tokenizer, history, tools=tools, generation_prompt=False)
    assert full.startswith(before), "the test templates are append-only"
    last = history[-1]["content"]
    at = full.rfind(last, 0, len(before))
    assert at >= 0
    after = full[at + len(last):]
    assert after.startswith(sampled_end)
    return encode_text(tokenizer, after[len(sampled_end):])


def check_model_tokens(episode, engine):
    """(a) + (d): sampled positions hold exactly the scripted ids, in order, with their scripted log-probs; every
    environment token has log-prob 0."""
    sampled = [t for t, s in zip(episode.ids, episode.sampled) if s]
    assert sampled == [t for turn in engine.turns[:len(engine.calls)] for t in turn]
    model_runs = [ids for s, ids in segments(episode) if s]
    assert model_runs == engine.turns[:len(engine.calls)]
    assert len(episode.sampled) == len(episode.ids) == len(episode.logprobs)
    model_lps = [lp for lp, s in zip(episode.logprobs, episode.sampled) if s]
    assert model_lps == [lp for lps in engine.logprobs[:len(engine.calls)] for lp in lps]
    assert all(lp == 0.0 for lp, s in zip(episode.logprobs, episode.sampled) if not s)
    assert all(not math.isnan(lp) for lp in episode.logprobs)
    # the engine saw the episode's own tokens as its prompts, never a re-rendered conversation
    for k, (prompt,) in enumerate(engine.calls):
        assert prompt == episode.prompt_ids + episode.ids[:len(prompt) - len(episode.prompt_ids)]
        assert len(prompt) - len(episode.prompt_ids) == sum(
            len(ids) for ids in [r for _, r in segments(episode)][:2 * k])


def check_chat_deltas(tokenizer, episode, tools):
    """(b) for chat replies: each environment run equals the template's render difference, tokenised."""
    messages = episode.state.messages
    assistant_at = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    env_runs = [ids for s, ids in segments(episode) if not s]
    assert len(env_runs) == len(assistant_at) - 1
    for k, run in enumerate(env_runs):
        start, stop = assistant_at[k], assistant_at[k + 1]
        history, replies = messages[:start + 1], messages[start + 1:stop]
        assert replies
        assert run == expected_chat_delta(tokenizer, history, replies, tools, "<|im_end|>")


def check_naive_differs(tokenizer, episode, tools):
    """(c): re-rendering the conversation (with the decoded assistant texts) and tokenising it gives other tokens,
    though the same text: the runner's tokens could not have come from re-tokenisation."""
    kwargs = {"tools": tools} if tools else {}
    naive = tokenizer.apply_chat_template(episode.state.messages, tokenize=True, add_generation_prompt=False,
                                          return_dict=False, **kwargs)
    if isinstance(naive, dict):
        naive = naive["input_ids"]
    ours = episode.prompt_ids + episode.ids
    assert list(naive) != ours
    assert list(naive[:len(ours)]) != ours
    # the same text: only the tokenisation differs
    naive_text = render(tokenizer, episode.state.messages, tools=tools, generation_prompt=False)
    assert naive_text.startswith(tokenizer.decode(ours, skip_special_tokens=False))


def run_one(env, tokenizer, engine, *, max_turns: int, question: str, tool_format: str = "text"):
    """The one episode of `question` (answer 42) with `env`, the runner closed after it."""
    runner = EpisodeRunner(env, tokenizer, limits=EpisodeLimits(max_turns=max_turns, tool_format=tool_format),
                           template="{question}", eos_ids={im_end(tokenizer)})
    try:
        [episode] = runner.run(engine, [{"question": question, "answer": "42"}], PARAMS, group_size=1)
    finally:
        runner.close()
    return episode, runner


def test_split_pieces_are_not_canonical(smol):
    assert split_ids(smol, " ans", "wer") != encode_text(smol, " answer")
    assert split_ids(smol, "calc", "ulator") != encode_text(smol, "calculator")
    assert smol.decode(split_ids(smol, " ans", "wer")) == " answer"


def test_retry_chat_turns_smollm(smol):
    eos = im_end(smol)
    turns = [split_ids(smol, "The", " ans", "wer", " is", " 41", ".") + [eos],
             split_ids(smol, "Let me re", "think: the ans", "wer is 40.") + [eos],
             split_ids(smol, "The final ans", "wer is", " 42", ".") + [eos]]
    engine = ScriptedEngine(turns)
    episode, _ = run_one(RetryEnv(max_tries=5), smol, engine, max_turns=5, question="What is 6 * 7?")
    assert len(engine.calls) == 3 and episode.state.turns == 3
    assert episode.reward == pytest.approx(0.25)
    assert episode.finish_reason == "stop" and not episode.turn_limit
    assert [m["content"] for m in episode.state.messages if m["role"] == "user"][1:] == [RETRY_MESSAGE] * 2
    check_model_tokens(episode, engine)
    check_chat_deltas(smol, episode, None)
    check_naive_differs(smol, episode, None)


def test_retry_chat_turns_qwen_template(qwen):
    eos = im_end(qwen)
    turns = [split_ids(qwen, "ans", "wer: 4", "1") + [eos],
             split_ids(qwen, "ans", "wer: 43") + [eos],
             split_ids(qwen, "My ans", "wer: 42") + [eos]]
    engine = ScriptedEngine(turns)
    episode, _ = run_one(RetryEnv(max_tries=3), qwen, engine, max_turns=3, question="What is 6 * 7?")
    assert len(engine.calls) == 3
    assert episode.prompt_ids[:len(encode_text(qwen, "<|im_start|>system\nYou are Qwen"))] == encode_text(
        qwen, "<|im_start|>system\nYou are Qwen")
    check_model_tokens(episode, engine)
    check_chat_deltas(qwen, episode, None)
    check_naive_differs(qwen, episode, None)


def test_text_format_tool_turns_smollm(smol):
    """The text tool format: turns end with the stop string </tool>, the result continues the model's turn."""
    eos = im_end(smol)
    turns = [split_ids(smol, "First ", "<tool>calc", "ulator: 1", "2 * 3</tool>"),
             split_ids(smol, " and ", "<tool>calc", "ulator: 36 + ", "6</tool>"),
             split_ids(smol, " So the ans", "wer is 42.") + [eos]]
    engine = ScriptedEngine(turns)
    episode, _ = run_one(CalculatorEnv(), smol, engine, max_turns=5, question="What is 12 * 3 + 6?")
    assert len(engine.calls) == 3
    assert episode.state.tool_calls == 2 and episode.state.tool_errors == 0
    check_model_tokens(episode, engine)
    env_runs = [ids for s, ids in segments(episode) if not s]
    assert env_runs == [encode_text(smol, render_text_result("36")), encode_text(smol, render_text_result("42"))]
    assert smol.decode(episode.ids, skip_special_tokens=False) == (
        "First <tool>calculator: 12 * 3</tool><result>36</result> and <tool>calculator: 36 + 6</tool>"
        "<result>42</result> So the answer is 42.<|im_end|>")


def test_hermes_tool_turns_qwen_template(qwen):
    """Hermes tool calls with the Qwen-style template: the tools' schemas in the system message, each tool result
    as the template's <tool_response> user turn."""
    eos = im_end(qwen)
    call = '<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{}"}}}}\n</tool_call>'
    first, second = call.format("12 * 3"), call.format("36 + 6")
    turns = [split_ids(qwen, *split_word(first, "calc")) + [eos],
             split_ids(qwen, "Now: ", *split_word(second, "calc")) + [eos],
             split_ids(qwen, "The ans", "wer is 4", "2.") + [eos]]
    assert qwen.decode(turns[0][:-1]) == first
    engine = ScriptedEngine(turns)
    episode, runner = run_one(CalculatorEnv(), qwen, engine, max_turns=5, question="What is 12 * 3 + 6?",
                              tool_format="hermes")
    tools = runner.schemas
    assert tools and tools[0]["function"]["name"] == "calculator"
    prompt_text = qwen.decode(episode.prompt_ids, skip_special_tokens=False)
    assert "<tools>\n" in prompt_text and '"name": "calculator"' in prompt_text
    assert len(engine.calls) == 3
    assert episode.state.tool_calls == 2 and episode.state.tool_errors == 0
    assert [m["content"] for m in episode.state.messages if m["role"] == "tool"] == ["36", "42"]
    check_model_tokens(episode, engine)
    check_chat_deltas(qwen, episode, tools)
    env_text = qwen.decode(next(ids for s, ids in segments(episode) if not s), skip_special_tokens=False)
    assert env_text == "\n<|im_start|>user\n<tool_response>\n36\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    check_naive_differs(qwen, episode, tools)
