"""Tools: plain Python functions the model may call during an episode, how their calls are parsed, run and shown.

A tool is a typed function with a Google-style docstring; `Tool.of(func)` turns it into a name, the function and
its JSON schema (the OpenAI / transformers format that chat templates render). `call_tool` runs one call in a
worker thread with a timeout and a cap on the output's length; whatever happens (a raise, a hang, wrong
arguments) it returns a `ToolResult` whose text the model reads, never an exception.

The model writes its calls in one of two formats (`detect_tool_format` picks one from the tokenizer):

"hermes": chat templates with a tool format (Qwen2.5, Qwen3, Hermes). The template renders the tools' schemas
itself; the model writes one JSON object per call, several blocks allowed in one turn:

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "12 * (3 + 4)"}}
    </tool_call>

"text": our plain format for chat templates without one (small models such as SmolLM). The tools are described
in the prompt by `text_tool_instructions`, a short paragraph such as

    You can use these tools:
    - calculator(expression: string): Evaluate an arithmetic expression.
    To use a tool, write <tool>calculator: 12 * (3 + 4)</tool>; its answer follows as <result>84</result>.

and a call is `<tool>NAME: ARGUMENT</tool>`. ARGUMENT is the raw text of the argument when the tool takes
exactly one parameter (parsed as JSON when that parameter is not a string: `<tool>square: 4</tool>`), else a
JSON object of the arguments (`<tool>power: {"base": 2, "exponent": 10}</tool>`). With exactly one tool the
`NAME:` part may be left out (`<tool>3 * (4 + 5)</tool>`). Every closed block counts, in order; a `<tool>`
without its `</tool>` is ignored. The result goes back as `<result>TEXT</result>` (`render_text_result`).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from transformers.utils import get_json_schema

__all__ = ["RESULT_CLOSE", "RESULT_OPEN", "TEXT_TOOL_CLOSE", "TEXT_TOOL_OPEN", "Tool", "ToolCall", "ToolResult",
           "as_tools", "call_tool", "detect_tool_format", "parse_hermes_calls", "parse_text_calls",
           "render_text_call", "render_text_result", "run_tool_call", "text_tool_instructions"]

TEXT_TOOL_OPEN = "<tool>"
TEXT_TOOL_CLOSE = "</tool>"
RESULT_OPEN = "<result>"
RESULT_CLOSE = "</result>"
HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"

# a closed block whose body holds no other opening tag: `<tool>a <tool>b</tool>` is one call, "b"
_TEXT_BLOCK_RE = re.compile(r"<tool>((?:(?!<tool>).)*?)</tool>", re.DOTALL)
_HERMES_BLOCK_RE = re.compile(r"<tool_call>((?:(?!<tool_call>).)*?)</tool_call>", re.DOTALL)
_NAME_PREFIX_RE = re.compile(r"([A-Za-z_][\w.-]*)\s*:(.*)", re.DOTALL)

# JSON schema types -> the Python values they accept (bool is an int in Python, but not a JSON integer)
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list, tuple), "object": (dict,), "null": (type(None),),
}


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, the function and its JSON schema.

    `example` is an optional (argument, result) pair shown in the text format's instructions, e.g.
    ("12 * (3 + 4)", "84").
    """

    name: str
    func: Callable
    schema: dict
    example: tuple[str, str] | None = None

    @classmethod
    def of(cls, func: Callable | Tool, name: str | None = None, example: tuple[str, str] | None = None) -> Tool:
        """The tool for `func` (typed arguments, a Google-style docstring), optionally under another name; a Tool
        comes back as it is (renamed if `name` is given)."""
        if isinstance(func, Tool):
            return func if name is None else func.renamed(name)
        try:
            schema = get_json_schema(func)
        except Exception as err:  # transformers raises its own parsing exceptions, all Exceptions
            fname = getattr(func, "__name__", repr(func))
            raise ValueError(f"cannot make a tool of {fname}: {err} (a tool needs type hints on every argument and "
                             "a Google-style docstring with a description and an Args: entry per argument)") from err
        tool = cls(name=schema["function"]["name"], func=func, schema=schema, example=example)
        return tool if name is None else tool.renamed(name)

    def renamed(self, name: str) -> Tool:
        """This tool under another name (in its schema too)."""
        schema = {**self.schema, "function": {**self.schema["function"], "name": name}}
        return replace(self, name=name, schema=schema)

    @property
    def description(self) -> str:
        return self.schema["function"].get("description", "")

    @property
    def parameters(self) -> dict[str, dict]:
        """Parameter name -> its JSON schema, in the function's order."""
        return self.schema["function"]["parameters"].get("properties", {})

    @property
    def required(self) -> list[str]:
        return list(self.schema["function"]["parameters"].get("required", []))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)


def as_tools(items: Sequence[Callable | Tool]) -> list[Tool]:
    """Tools from functions or tools (an environment's `tools`); names must be unique."""
    tools = [Tool.of(item) for item in items]
    names = [t.name for t in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate tool names: {', '.join(duplicates)}")
    return tools


@dataclass
class ToolResult:
    """What a tool call gave: the text the model reads and how it went.

    error: None when the call ran fine, else "raised", "timeout", "unknown_tool", "bad_arguments" or "unparsed".
    """

    text: str
    error: str | None = None
    seconds: float = 0.0
    truncated: bool = False


@dataclass
class ToolCall:
    """One call the model wrote. error is "unparsed" (with the reason in `detail`) when the block could not be
    read; `name` and `arguments` are then None or partial."""

    name: str | None
    arguments: dict | None
    raw: str  # the whole block as written, tags included
    error: str | None = None
    detail: str = ""


# ---------------------------------------------------------------------------------------------------------------
# running a call


def call_tool(tool: Tool, arguments: dict, *, timeout_s: float, max_chars: int) -> ToolResult:
    """Run `tool` on `arguments` in a worker thread and return what the model should read.

    Never raises for the tool's sake: a raise (any Exception) becomes error="raised", a call that runs past
    `timeout_s` error="timeout", arguments that do not fit the schema error="bad_arguments". A BaseException
    that is not an Exception (KeyboardInterrupt, SystemExit) is raised again here. Non-string results are shown
    with str() (JSON for dicts and lists); text over `max_chars` is cut to `max_chars` plus a marker.

    Each call gets its own daemon thread, so a hung tool never blocks other calls. Python cannot kill a thread:
    a timed-out tool keeps running in the background until it returns by itself, and its result is discarded.
    """
    start = time.perf_counter()
    problem = _argument_problem(tool, arguments)
    if problem is not None:
        return _finish(f"error: {problem}", "bad_arguments", start, max_chars)
    finished, value, exc = _run_in_thread(tool, arguments, timeout_s)
    if not finished:
        return _finish(f"error: the tool timed out after {timeout_s:g}s", "timeout", start, max_chars)
    if exc is not None:
        return _finish(f"error: {type(exc).__name__}: {exc}", "raised", start, max_chars)
    return _finish(_as_text(value), None, start, max_chars)


def run_tool_call(call: ToolCall, tools: Sequence[Tool], *, timeout_s: float, max_chars: int) -> ToolResult:
    """Run a parsed call against the known tools: unparsed calls and unknown names become error results."""
    start = time.perf_counter()
    if call.error is not None:
        reason = f": {call.detail}" if call.detail else ""
        return _finish(f"error: could not read the tool call{reason}", "unparsed", start, max_chars)
    by_name = {t.name: t for t in tools}
    if call.name not in by_name:
        known = ", ".join(by_name) or "none"
        return _finish(f"error: unknown tool {call.name!r}; the tools are: {known}", "unknown_tool", start,
                       max_chars)
    return call_tool(by_name[call.name], call.arguments or {}, timeout_s=timeout_s, max_chars=max_chars)


def _run_in_thread(tool: Tool, arguments: dict, timeout_s: float) -> tuple[bool, Any, Exception | None]:
    """(finished in time, return value, the Exception it raised)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = tool.func(**arguments)
        except Exception as exc:  # noqa: BLE001 - the model reads it
            box["exc"] = exc
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["fatal"] = exc

    thread = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return False, None, None
    if "fatal" in box:
        raise box["fatal"]
    return True, box.get("value"), box.get("exc")


def _argument_problem(tool: Tool, arguments: Any) -> str | None:
    """Why `arguments` do not fit the tool's schema, or None when they do."""
    if not isinstance(arguments, dict):
        issues = [f"the arguments must be an object, got {type(arguments).__name__}"]
    else:
        unknown = [repr(k) for k in arguments if k not in tool.parameters]
        missing = [repr(k) for k in tool.required if k not in arguments]
        issues = [f"unexpected {', '.join(unknown)}"] if unknown else []
        issues += [f"missing {', '.join(missing)}"] if missing else []
        issues += [f"{k!r} must be {_type_text(tool.parameters[k])}, got {type(v).__name__}"
                   for k, v in arguments.items() if k in tool.parameters and not _fits(v, tool.parameters[k])]
    if not issues:
        return None
    return f"bad arguments for {tool.name}: {'; '.join(issues)}; expected parameters: {_signature_text(tool)}"


def _fits(value: Any, prop: dict) -> bool:
    types = prop.get("type")
    if types is None:
        return True
    names = [types] if isinstance(types, str) else list(types)
    if prop.get("nullable"):
        names.append("null")
    for name in names:
        accepted = _JSON_TYPES.get(name)
        if accepted is None:
            return True  # a type we do not check
        if isinstance(value, accepted) and not (isinstance(value, bool) and name in ("integer", "number")):
            return True
    return False


def _type_text(prop: dict) -> str:
    types = prop.get("type", "any")
    return types if isinstance(types, str) else " or ".join(types)


def _signature_text(tool: Tool) -> str:
    """'expression (string)' or 'a (integer), b (number, optional)'; 'none' without parameters."""
    required = set(tool.required)
    parts = [f"{name} ({_type_text(prop)}{'' if name in required else ', optional'})"
             for name, prop in tool.parameters.items()]
    return ", ".join(parts) or "none"


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _finish(text: str, error: str | None, start: float, max_chars: int) -> ToolResult:
    truncated = len(text) > max_chars
    if truncated:
        text = f"{text[:max_chars]}... [truncated {len(text) - max_chars} chars]"
    return ToolResult(text=text, error=error, seconds=time.perf_counter() - start, truncated=truncated)


# ---------------------------------------------------------------------------------------------------------------
# parsing calls


def parse_hermes_calls(text: str) -> list[ToolCall]:
    """Every closed `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block in `text`, in order."""
    return [_parse_hermes_block(m.group(0), m.group(1)) for m in _HERMES_BLOCK_RE.finditer(text)]


def _parse_hermes_block(raw: str, body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as err:
        return ToolCall(None, None, raw, "unparsed", f"invalid JSON ({err.msg})")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall(None, None, raw, "unparsed", 'expected {"name": ..., "arguments": {...}}')
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(obj["name"], None, raw, "unparsed", '"arguments" must be a JSON object')
    return ToolCall(obj["name"], arguments, raw)


def parse_text_calls(text: str, tools: Sequence[Tool]) -> list[ToolCall]:
    """Every closed `<tool>NAME: ARGUMENT</tool>` block in `text`, in order (see the module docstring).

    `NAME:` counts as a name when it names one of `tools`; with exactly one tool and no such prefix the whole
    block is that tool's argument; with several tools an unknown prefix is kept as the (unknown) name.
    """
    return [_parse_text_block(m.group(0), m.group(1).strip(), tools) for m in _TEXT_BLOCK_RE.finditer(text)]


def _parse_text_block(raw: str, body: str, tools: Sequence[Tool]) -> ToolCall:
    by_name = {t.name: t for t in tools}
    prefix = _NAME_PREFIX_RE.fullmatch(body)
    if prefix and prefix.group(1) in by_name:
        return _text_arguments(raw, by_name[prefix.group(1)], prefix.group(2).strip())
    if len(tools) == 1:
        return _text_arguments(raw, tools[0], body)
    if prefix:
        return ToolCall(prefix.group(1), None, raw)  # an unknown tool: running it reports the known ones
    return ToolCall(None, None, raw, "unparsed", "write <tool>NAME: ARGUMENT</tool>")


def _text_arguments(raw: str, tool: Tool, argument: str) -> ToolCall:
    """The call's arguments from the text after `NAME:`."""
    params = list(tool.parameters.items())
    if len(params) == 1:
        name, prop = params[0]
        if prop.get("type") == "string":
            return ToolCall(tool.name, {name: argument}, raw)
        try:
            return ToolCall(tool.name, {name: json.loads(argument)}, raw)
        except json.JSONDecodeError:
            return ToolCall(tool.name, {name: argument}, raw)  # running it reports the wrong type
    if not params and not argument:
        return ToolCall(tool.name, {}, raw)
    try:
        arguments = json.loads(argument)
    except json.JSONDecodeError as err:
        return ToolCall(tool.name, None, raw, "unparsed", f"the arguments must be a JSON object ({err.msg})")
    if not isinstance(arguments, dict):
        return ToolCall(tool.name, None, raw, "unparsed", "the arguments must be a JSON object")
    return ToolCall(tool.name, arguments, raw)


# ---------------------------------------------------------------------------------------------------------------
# rendering and format detection


def render_text_result(result_text: str) -> str:
    """A tool's result as the text format shows it to the model."""
    return f"{RESULT_OPEN}{result_text}{RESULT_CLOSE}"


def render_text_call(tool: Tool, arguments: dict) -> str:
    """A call as the text format writes it (the inverse of `parse_text_calls`): `<tool>NAME: ARGUMENT</tool>`."""
    params = list(tool.parameters.items())
    if len(params) == 1:
        name, prop = params[0]
        value = arguments[name]
        body = value if prop.get("type") == "string" else json.dumps(value)
    else:
        body = json.dumps(arguments)
    return f"{TEXT_TOOL_OPEN}{tool.name}: {body}{TEXT_TOOL_CLOSE}"


def text_tool_instructions(tools: Sequence[Tool]) -> str:
    """The short paragraph that tells the model its tools and the text call syntax (see the module docstring)."""
    lines = ["You can use these tools:"]
    lines += [f"- {t.name}({_parameter_list(t)}): {t.description}" for t in tools]
    if tools:
        call, result = _example_call(tools[0])
        lines.append(f"To use a tool, write {TEXT_TOOL_OPEN}{call}{TEXT_TOOL_CLOSE}; "
                     f"its answer follows as {render_text_result(result)}.")
    return "\n".join(lines)


def _parameter_list(tool: Tool) -> str:
    return ", ".join(f"{name}: {_type_text(prop)}" for name, prop in tool.parameters.items())


def _example_call(tool: Tool) -> tuple[str, str]:
    """(the call's body, its result) for the instructions' one-line example."""
    if tool.example is not None:
        argument, result = tool.example
        return f"{tool.name}: {argument}", result
    names = list(tool.parameters)
    if len(names) == 1:
        return f"{tool.name}: {names[0].upper()}", "..."
    placeholder = json.dumps({name: "..." for name in names})
    return f"{tool.name}: {placeholder}", "..."


def detect_tool_format(tokenizer: Any) -> str:
    """"hermes" when the tokenizer's chat template has the <tool_call> tool format, else "text"."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates
        template = "\n".join(str(t) for t in template.values())
    if isinstance(template, str) and HERMES_OPEN in template and "tools" in template:
        return "hermes"
    return "text"
