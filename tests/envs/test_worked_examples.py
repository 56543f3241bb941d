"""Worked examples (few-shot conversations with tool calls): their messages, the text format's inline rendering, the
calculator's `examples` argument, and the prompt an episode starts from with them (SmolLM2's template, text
format; a Qwen-style template, hermes format)."""

from __future__ import annotations

import copy

import pytest
from test_tito import QWEN_TEMPLATE  # tests/envs is on sys.path (pytest prepend import mode)

from reasonrl.envs.calculator import EXAMPLE_PROBLEMS, CalculatorEnv, calculator
from reasonrl.envs.episodes import EpisodeLimits, EpisodeRunner
from reasonrl.envs.tools import Tool, parse_text_calls, render_text_call
from reasonrl.envs.worked_examples import inline_tool_turns, worked_example

TEMPLATE = "What is {question}? Put the final answer after '####'."
ROW = {"question": "76 * 50 * 32", "answer": "121600"}
# test_tito's Qwen-style template, with Qwen2.5's rendering of an assistant message's tool_calls
PLAIN_ASSISTANT = "{{- '<|im_start|>assistant\\n' + message.content + '<|im_end|>\\n' }}"
QWEN_WITH_TOOL_CALLS = QWEN_TEMPLATE.replace(PLAIN_ASSISTANT, (
    "{%- if message.tool_calls %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}{%- set call = call.function %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.name + '\", \"arguments\": ' }}{{- call.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- else %}" + PLAIN_ASSISTANT + "{%- endif %}"))


def power(base: int, exponent: int) -> int:
    """Raises a number to a power.

    Args:
        base: The base.
        exponent: The exponent.
    """
    return base**exponent


def test_worked_example_messages():
    shot = worked_example("2 + 3", TEMPLATE, calculator, {"expression": "2 + 3"}, "5", "\n#### 5")
    assert [m["role"] for m in shot] == ["user", "assistant", "tool", "assistant"]
    assert shot[0]["content"] == "What is 2 + 3? Put the final answer after '####'."
    assert shot[1]["tool_calls"] == [{"type": "function",
                                      "function": {"name": "calculator", "arguments": {"expression": "2 + 3"}}}]
    assert shot[2] == {"role": "tool", "name": "calculator", "content": "5"}
    assert shot[3] == {"role": "assistant", "content": "\n#### 5"}


def test_inline_tool_turns_writes_the_text_format():
    shot = worked_example("2 + 3", TEMPLATE, calculator, {"expression": "2 + 3"}, "5", "\n#### 5")
    question = {"role": "user", "content": "What is 7 - 1?"}
    out = inline_tool_turns([*shot, question], [calculator])
    assert out == [shot[0], {"role": "assistant", "content": "<tool>calculator: 2 + 3</tool><result>5</result>\n#### 5"},
                   question]
    # what the model reads is what its own calls parse back to
    [call] = parse_text_calls(out[1]["content"], [calculator])
    assert (call.name, call.arguments) == ("calculator", {"expression": "2 + 3"})


def test_inline_tool_turns_several_calls_and_no_final_message():
    tools = [calculator, Tool.of(power)]
    calls = [{"type": "function", "function": {"name": "power", "arguments": {"base": 2, "exponent": 10}}},
             {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "1 + 1"}}}]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Let me see. ", "tool_calls": calls},
                {"role": "tool", "content": "1024"}, {"role": "tool", "content": "2"}]
    [_, turn] = inline_tool_turns(messages, tools)
    assert turn == {"role": "assistant", "content": 'Let me see. <tool>power: {"base": 2, "exponent": 10}</tool>'
                    "<tool>calculator: 1 + 1</tool><result>1024</result><result>2</result>"}


def test_inline_tool_turns_unknown_tool_is_an_error():
    calls = [{"type": "function", "function": {"name": "search", "arguments": {"q": "x"}}}]
    with pytest.raises(ValueError, match="'search'"):
        inline_tool_turns([{"role": "assistant", "content": "", "tool_calls": calls}], [calculator])


def test_render_text_call_non_string_single_parameter():
    def square(x: int) -> int:
        """Squares.

        Args:
            x: The number.
        """
        return x * x

    assert render_text_call(Tool.of(square), {"x": 4}) == "<tool>square: 4</tool>"


def test_calculator_examples():
    assert CalculatorEnv().start(ROW, TEMPLATE) == [{"role": "user", "content": TEMPLATE.format(question=ROW["question"])}]
    messages = CalculatorEnv(examples=2).start(ROW, TEMPLATE)
    assert len(messages) == 9 and messages[-1]["content"] == TEMPLATE.format(question=ROW["question"])
    assert [m["content"] for m in messages if m["role"] == "tool"] == ["109", "38"]  # 23 * 4 + 17, 56 - 18
    assert messages[3]["content"] == "\n#### 109"
    for bad in (-1, len(EXAMPLE_PROBLEMS) + 1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="examples"):
            CalculatorEnv(examples=bad)


def _runner(tok, tool_format: str) -> EpisodeRunner:
    limits = EpisodeLimits(tool_format=tool_format)
    return EpisodeRunner(CalculatorEnv(examples=1), tok, limits=limits, template=TEMPLATE,
                         eos_ids={tok.eos_token_id})


@pytest.fixture(scope="module")
def smol():
    from reasonrl.models import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path("smollm2-135m-instruct"))


def test_episode_prompt_with_examples_text_format(smol):
    tok = smol
    runner = _runner(tok, "text")
    try:
        episode = runner.start(ROW)
    finally:
        runner.close()
    prompt = tok.decode(episode.prompt_ids)
    shot = ("<|im_start|>user\nWhat is 23 * 4 + 17? Put the final answer after '####'.<|im_end|>\n"
            "<|im_start|>assistant\n<tool>calculator: 23 * 4 + 17</tool><result>109</result>\n#### 109<|im_end|>\n")
    assert prompt.startswith("<|im_start|>system\n") and "You can use these tools:" in prompt
    assert shot in prompt
    assert prompt.endswith("<|im_start|>user\nWhat is 76 * 50 * 32? Put the final answer after '####'.<|im_end|>\n"
                           "<|im_start|>assistant\n")


def test_episode_prompt_with_examples_hermes_format(smol):
    tok = copy.deepcopy(smol)
    assert QWEN_WITH_TOOL_CALLS != QWEN_TEMPLATE
    tok.chat_template = QWEN_WITH_TOOL_CALLS
    runner = _runner(tok, "hermes")
    try:
        prompt = tok.decode(runner.start(ROW).prompt_ids)
    finally:
        runner.close()
    assert '{"name": "calculator", "arguments": {"expression": "23 * 4 + 17"}}' in prompt
    assert "<tool_response>\n109\n</tool_response>" in prompt
    assert "<tool>" not in prompt


def test_episode_turns_skip_the_worked_examples(smol):
    from test_episodes import PolicyEngine, turn_of

    from reasonrl.envs.trajectories import episode_transcript, episode_turns
    from reasonrl.rollout.base import SamplingParams

    def policy(text):
        return "<tool>calculator: 2 + 3</tool>" if turn_of(text) == 0 else "\n#### 5<|im_end|>"

    runner = EpisodeRunner(CalculatorEnv(examples=2), smol, limits=EpisodeLimits(tool_format="text"),
                           template=TEMPLATE, eos_ids={smol.convert_tokens_to_ids("<|im_end|>")})
    try:
        [episode] = runner.run(PolicyEngine(smol, policy), [{"question": "2 + 3", "answer": "5"}],
                               SamplingParams(seed=0), group_size=1)
    finally:
        runner.close()
    turns = episode_turns(episode)
    assert [(t["turn"], t["tool_calls"]) for t in turns] == [(1, 1), (2, 0)]
    assert sum(t["tokens"] for t in turns) == episode.model_tokens
    record = episode_transcript(episode, smol)
    assert record["messages"][-1] == {"role": "assistant", "content": "\n#### 5"}
