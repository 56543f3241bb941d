"""Worked examples: solved conversations before the question (few-shot), with real tool calls in them.

An environment writes a worked example in the standard chat-messages form that chat templates render: an
assistant message with `tool_calls`, the tool's answer as a `tool` message, then the assistant's final answer
(`worked_example`). With a template that has a tool format (hermes) the runner hands these messages to the
template as they are; with the text format (`<tool>...</tool>`, reasonrl/envs/tools.py) `inline_tool_turns`
writes each call and its result into one assistant message, exactly as an episode of that format reads (the
model's call, the `<result>` the runner appends, the rest of the model's turn).
"""

from __future__ import annotations

from collections.abc import Sequence

from reasonrl.data.prompts import build_prompt
from reasonrl.envs.tools import Tool, render_text_call, render_text_result

__all__ = ["inline_tool_turns", "worked_example"]


def worked_example(question: str, template: str, tool: Tool, arguments: dict, result: str, answer: str) -> list[dict]:
    """The messages of one solved problem: the question (as the data template asks it), one call of `tool`, its
    result and the final answer."""
    call = {"type": "function", "function": {"name": tool.name, "arguments": arguments}}
    return [
        *build_prompt(question, template),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": tool.name, "content": result},
        {"role": "assistant", "content": answer},
    ]


def inline_tool_turns(messages: Sequence[dict], tools: Sequence[Tool]) -> list[dict]:
    """The messages in the text tool format: each assistant message with `tool_calls`, the `tool` messages that
    answer it and the assistant message after them become one assistant message (call, `<result>`, the rest).
    Messages without tool calls pass through unchanged."""
    by_name = {t.name: t for t in tools}
    out: list[dict] = []
    i = 0
    while i < len(messages):
        message = messages[i]
        if message["role"] != "assistant" or not message.get("tool_calls"):
            out.append(dict(message))
            i += 1
            continue
        text = message.get("content") or ""
        for call in message["tool_calls"]:
            function = call["function"]
            if function["name"] not in by_name:
                raise ValueError(f"a worked example calls {function['name']!r}, which is not one of the tools "
                                 f"{sorted(by_name)}")
            text += render_text_call(by_name[function["name"]], function["arguments"])
        i += 1
        while i < len(messages) and messages[i]["role"] == "tool":
            text += render_text_result(messages[i]["content"])
            i += 1
        if i < len(messages) and messages[i]["role"] == "assistant" and not messages[i].get("tool_calls"):
            text += messages[i]["content"]
            i += 1
        out.append({"role": "assistant", "content": text})
    return out
