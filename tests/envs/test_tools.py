"""Tools: schemas, running calls (raises, hangs, huge outputs, wrong arguments), both call formats, rendering."""

import json
import threading
import time
from types import SimpleNamespace

import pytest

from reasonrl.envs.tools import (
    RESULT_CLOSE,
    RESULT_OPEN,
    TEXT_TOOL_CLOSE,
    TEXT_TOOL_OPEN,
    Tool,
    ToolCall,
    as_tools,
    call_tool,
    detect_tool_format,
    parse_hermes_calls,
    parse_text_calls,
    render_text_result,
    run_tool_call,
    text_tool_instructions,
)

RUN = {"timeout_s": 2.0, "max_chars": 1000}


def add(a: int, b: float = 1.0) -> float:
    """Add two numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def shout(text: str) -> str:
    """Upper-case a text.

    Args:
        text: The text.
    """
    return text.upper()


def square(x: int) -> int:
    """Square a number.

    Args:
        x: The number.
    """
    return x * x


def now() -> str:
    """The time."""
    return "noon"


def fail(x: int) -> str:
    """Always fails.

    Args:
        x: Ignored.
    """
    raise RuntimeError(f"bad x {x}")


class Fatal(BaseException):
    pass


def fatal() -> str:
    """Raises a BaseException that is not an Exception."""
    raise Fatal("stop")


ADD, SHOUT, SQUARE, NOW = Tool.of(add), Tool.of(shout), Tool.of(square), Tool.of(now)


# --- Tool.of -----------------------------------------------------------------------------------------------------


def test_tool_of_builds_the_json_schema():
    assert ADD.name == "add"
    assert ADD.func is add
    assert ADD.schema["type"] == "function"
    function = ADD.schema["function"]
    assert function["name"] == "add"
    assert function["description"] == "Add two numbers."
    assert function["parameters"]["properties"] == {
        "a": {"type": "integer", "description": "The first number."},
        "b": {"type": "number", "description": "The second number."},
    }
    assert function["parameters"]["required"] == ["a"]
    assert ADD.parameters == function["parameters"]["properties"]
    assert ADD.required == ["a"]
    assert ADD.description == "Add two numbers."


def test_tool_of_renames_in_the_schema_too():
    tool = Tool.of(shout, name="loud", example=("hi", "HI"))
    assert tool.name == "loud"
    assert tool.schema["function"]["name"] == "loud"
    assert tool.example == ("hi", "HI")
    assert SHOUT.schema["function"]["name"] == "shout"  # the original is untouched


def test_tool_of_a_tool_is_that_tool():
    assert Tool.of(ADD) is ADD
    assert Tool.of(ADD, name="plus").name == "plus"


def test_tool_is_callable_and_frozen():
    assert ADD(2, b=3.0) == 5.0
    with pytest.raises(AttributeError):
        ADD.name = "other"


def test_tool_of_without_a_docstring_names_the_function():
    def nodoc(x: int) -> int:
        return x

    with pytest.raises(ValueError, match=r"nodoc.*no docstring.*Google-style docstring"):
        Tool.of(nodoc)


def test_tool_of_without_type_hints_names_the_argument():
    def untyped(x):
        """Doc.

        Args:
            x: A thing.
        """

    with pytest.raises(ValueError, match=r"untyped.*x is missing a type hint"):
        Tool.of(untyped)


def test_tool_of_without_an_argument_description():
    def undocumented(x: int) -> int:
        """Has no Args section."""
        return x

    with pytest.raises(ValueError, match=r"undocumented.*no description for the argument 'x'"):
        Tool.of(undocumented)


def test_as_tools_accepts_functions_and_tools_and_rejects_duplicates():
    tools = as_tools([add, SHOUT])
    assert [t.name for t in tools] == ["add", "shout"]
    assert tools[1] is SHOUT
    with pytest.raises(ValueError, match="duplicate tool names: add"):
        as_tools([add, ADD])


# --- call_tool ---------------------------------------------------------------------------------------------------


def test_call_tool_returns_the_text():
    result = call_tool(SHOUT, {"text": "hi"}, **RUN)
    assert result.text == "HI"
    assert result.error is None
    assert result.truncated is False
    assert 0.0 <= result.seconds < 1.0


def test_call_tool_str_of_non_strings_and_json_of_dicts_and_lists():
    assert call_tool(ADD, {"a": 2, "b": 0.5}, **RUN).text == "2.5"
    assert call_tool(SQUARE, {"x": 7}, **RUN).text == "49"

    def listing() -> list:
        """A list."""
        return [1, {"b": "é"}]

    def nothing() -> None:
        """Nothing."""

    assert call_tool(Tool.of(listing), {}, **RUN).text == '[1, {"b": "é"}]'
    assert call_tool(Tool.of(nothing), {}, **RUN).text == "None"


def test_call_tool_a_raise_becomes_the_error_text():
    result = call_tool(Tool.of(fail), {"x": 3}, **RUN)
    assert result.text == "error: RuntimeError: bad x 3"
    assert result.error == "raised"
    assert result.truncated is False


def test_call_tool_re_raises_base_exceptions():
    with pytest.raises(Fatal, match="stop"):
        call_tool(Tool.of(fatal), {}, **RUN)


def test_call_tool_times_out_fast_and_does_not_block_the_next_call():
    release = threading.Event()

    def hang(seconds: float) -> str:
        """Waits.

        Args:
            seconds: How long.
        """
        release.wait(seconds)
        return "late"

    try:
        start = time.perf_counter()
        first = call_tool(Tool.of(hang), {"seconds": 5.0}, timeout_s=0.2, max_chars=100)
        second = call_tool(Tool.of(hang), {"seconds": 5.0}, timeout_s=0.2, max_chars=100)
        quick = call_tool(SHOUT, {"text": "ok"}, timeout_s=0.2, max_chars=100)
        elapsed = time.perf_counter() - start
    finally:
        release.set()  # let the abandoned threads finish
    assert first.text == "error: the tool timed out after 0.2s"
    assert first.error == "timeout"
    assert 0.19 <= first.seconds < 0.5
    assert second.error == "timeout"
    assert quick.text == "OK" and quick.error is None
    assert elapsed < 1.0  # two hung tools, each abandoned after 0.2 s


def test_call_tool_cuts_a_megabyte_fast():
    def big() -> str:
        """A megabyte."""
        return "x" * 1_000_000

    start = time.perf_counter()
    result = call_tool(Tool.of(big), {}, timeout_s=2.0, max_chars=100)
    assert time.perf_counter() - start < 0.5
    assert result.truncated is True
    assert result.error is None
    assert result.text == "x" * 100 + "... [truncated 999900 chars]"


def test_call_tool_output_of_exactly_max_chars_is_not_cut():
    result = call_tool(SHOUT, {"text": "abcde"}, timeout_s=1.0, max_chars=5)
    assert (result.text, result.truncated) == ("ABCDE", False)


def test_call_tool_cuts_long_error_texts_too():
    result = call_tool(Tool.of(fail), {"x": 10**50}, timeout_s=1.0, max_chars=20)
    assert result.error == "raised"
    assert result.truncated is True
    assert result.text.startswith("error: RuntimeError:")
    assert result.text.endswith("chars]")


def test_call_tool_unknown_and_missing_arguments():
    result = call_tool(ADD, {"x": 1}, **RUN)
    assert result.error == "bad_arguments"
    assert result.text == ("error: bad arguments for add: unexpected 'x'; missing 'a'; "
                           "expected parameters: a (integer), b (number, optional)")


def test_call_tool_wrong_types():
    result = call_tool(ADD, {"a": "two", "b": True}, **RUN)
    assert result.error == "bad_arguments"
    assert "'a' must be integer, got str" in result.text
    assert "'b' must be number, got bool" in result.text
    assert result.text.endswith("expected parameters: a (integer), b (number, optional)")


def test_call_tool_accepts_ints_for_numbers_but_not_floats_for_integers():
    assert call_tool(ADD, {"a": 1, "b": 2}, **RUN).text == "3"
    result = call_tool(ADD, {"a": 1.5}, **RUN)
    assert result.error == "bad_arguments"
    assert "'a' must be integer, got float" in result.text


def test_call_tool_arguments_that_are_not_an_object():
    result = call_tool(SHOUT, ["hi"], **RUN)
    assert result.error == "bad_arguments"
    assert result.text == ("error: bad arguments for shout: the arguments must be an object, got list; "
                           "expected parameters: text (string)")


def test_call_tool_nullable_arguments():
    def maybe(x: int | None) -> str:
        """Maybe.

        Args:
            x: A number or nothing.
        """
        return f"got {x}"

    tool = Tool.of(maybe)
    assert call_tool(tool, {"x": None}, **RUN).text == "got None"
    assert call_tool(tool, {"x": 4}, **RUN).text == "got 4"
    assert call_tool(tool, {"x": "4"}, **RUN).error == "bad_arguments"


def test_run_tool_call_unparsed_and_unknown():
    unparsed = run_tool_call(ToolCall(None, None, "<tool_call>{</tool_call>", "unparsed", "invalid JSON"),
                             [ADD], **RUN)
    assert (unparsed.error, unparsed.text) == ("unparsed", "error: could not read the tool call: invalid JSON")
    unknown = run_tool_call(ToolCall("mul", {"a": 1}, "raw"), [ADD, SHOUT], **RUN)
    assert unknown.error == "unknown_tool"
    assert unknown.text == "error: unknown tool 'mul'; the tools are: add, shout"
    ok = run_tool_call(ToolCall("add", {"a": 1, "b": 2.5}, "raw"), [ADD, SHOUT], **RUN)
    assert (ok.error, ok.text) == (None, "3.5")


# --- Hermes format -----------------------------------------------------------------------------------------------


def test_parse_hermes_several_calls_in_order():
    text = ('Let me compute.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            'and\n<tool_call>\n{"name": "shout", "arguments": {"text": "hi"}}\n</tool_call>')
    calls = parse_hermes_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("add", {"a": 1, "b": 2}, None),
        ("shout", {"text": "hi"}, None),
    ]
    assert calls[0].raw == '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


def test_parse_hermes_malformed_json_is_unparsed():
    text = ('<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>'
            '<tool_call>{"name": "shout", "arguments": {"text": "x"}}</tool_call>')
    bad, good = parse_hermes_calls(text)
    assert (bad.name, bad.arguments, bad.error) == (None, None, "unparsed")
    assert bad.detail.startswith("invalid JSON")
    assert (good.name, good.arguments, good.error) == ("shout", {"text": "x"}, None)


def test_parse_hermes_wrong_shapes_are_unparsed():
    calls = parse_hermes_calls('<tool_call>[1, 2]</tool_call><tool_call>{"arguments": {}}</tool_call>'
                               '<tool_call>{"name": "add", "arguments": [1]}</tool_call>')
    assert [c.error for c in calls] == ["unparsed", "unparsed", "unparsed"]
    assert calls[2].name == "add"
    assert calls[2].detail == '"arguments" must be a JSON object'


def test_parse_hermes_arguments_as_a_json_string_and_missing_arguments():
    calls = parse_hermes_calls('<tool_call>{"name": "add", "arguments": "{\\"a\\": 4}"}</tool_call>'
                               '<tool_call>{"name": "now"}</tool_call>')
    assert [(c.name, c.arguments, c.error) for c in calls] == [("add", {"a": 4}, None), ("now", {}, None)]


def test_parse_hermes_ignores_unclosed_blocks_and_plain_text():
    assert parse_hermes_calls("no calls here") == []
    assert parse_hermes_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1}}') == []
    calls = parse_hermes_calls('<tool_call>{"name": "x"<tool_call>{"name": "add", "arguments": {}}</tool_call>')
    assert [(c.name, c.error) for c in calls] == [("add", None)]


# --- text format -------------------------------------------------------------------------------------------------


def test_parse_text_named_single_parameter_call_keeps_the_raw_string():
    calls = parse_text_calls('So <tool>shout: hello, "world": {x}</tool> ok', [SHOUT, ADD])
    assert len(calls) == 1
    assert (calls[0].name, calls[0].arguments, calls[0].error) == ("shout", {"text": 'hello, "world": {x}'}, None)
    assert calls[0].raw == '<tool>shout: hello, "world": {x}</tool>'


def test_parse_text_name_may_be_left_out_with_one_tool():
    calls = parse_text_calls("<tool>3 * (4 + 5)</tool>", [SHOUT])
    assert [(c.name, c.arguments) for c in calls] == [("shout", {"text": "3 * (4 + 5)"})]


def test_parse_text_one_tool_and_a_colon_in_the_argument():
    calls = parse_text_calls("<tool>note: buy milk</tool><tool>shout: buy milk</tool>", [SHOUT])
    assert [c.arguments for c in calls] == [{"text": "note: buy milk"}, {"text": "buy milk"}]


def test_parse_text_several_calls_in_order_with_multi_parameter_json():
    text = '<tool>add: {"a": 2, "b": 0.5}</tool> then <tool>shout:\nhi\n</tool> <tool>now:</tool>'
    calls = parse_text_calls(text, [ADD, SHOUT, NOW])
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("add", {"a": 2, "b": 0.5}, None),
        ("shout", {"text": "hi"}, None),
        ("now", {}, None),
    ]


def test_parse_text_multi_parameter_bad_json_is_unparsed():
    calls = parse_text_calls("<tool>add: 1, 2</tool><tool>add: [1, 2]</tool>", [ADD, SHOUT])
    assert [(c.name, c.arguments, c.error) for c in calls] == [("add", None, "unparsed"), ("add", None, "unparsed")]
    assert "JSON object" in calls[0].detail


def test_parse_text_single_non_string_parameter_is_json():
    calls = parse_text_calls("<tool>square: 4</tool><tool>square: four</tool>", [SQUARE, SHOUT])
    assert [c.arguments for c in calls] == [{"x": 4}, {"x": "four"}]
    assert call_tool(SQUARE, calls[0].arguments, **RUN).text == "16"
    assert call_tool(SQUARE, calls[1].arguments, **RUN).error == "bad_arguments"


def test_parse_text_unknown_name_and_missing_name_with_several_tools():
    calls = parse_text_calls("<tool>mul: 3</tool><tool>3 * 4</tool>", [ADD, SHOUT])
    assert (calls[0].name, calls[0].arguments, calls[0].error) == ("mul", None, None)
    assert (calls[1].name, calls[1].error) == (None, "unparsed")
    assert run_tool_call(calls[0], [ADD, SHOUT], **RUN).error == "unknown_tool"
    assert run_tool_call(calls[1], [ADD, SHOUT], **RUN).error == "unparsed"


def test_parse_text_unclosed_blocks_are_ignored():
    assert parse_text_calls("<tool>shout: hi", [SHOUT]) == []
    calls = parse_text_calls("<tool>shout: a <tool>shout: b</tool> <tool>c", [SHOUT])
    assert [c.arguments for c in calls] == [{"text": "b"}]


# --- rendering and detection -------------------------------------------------------------------------------------


def test_tags_and_render_text_result():
    assert (TEXT_TOOL_OPEN, TEXT_TOOL_CLOSE, RESULT_OPEN, RESULT_CLOSE) == ("<tool>", "</tool>", "<result>",
                                                                            "</result>")
    assert render_text_result("84") == "<result>84</result>"


def test_text_tool_instructions_with_an_example():
    tool = Tool.of(shout, name="loud", example=("hi", "HI"))
    assert text_tool_instructions([tool, ADD]) == (
        "You can use these tools:\n"
        "- loud(text: string): Upper-case a text.\n"
        "- add(a: integer, b: number): Add two numbers.\n"
        "To use a tool, write <tool>loud: hi</tool>; its answer follows as <result>HI</result>."
    )


def test_text_tool_instructions_placeholders_without_an_example():
    assert text_tool_instructions([SHOUT]).splitlines()[-1] == (
        "To use a tool, write <tool>shout: TEXT</tool>; its answer follows as <result>...</result>.")
    last = text_tool_instructions([ADD]).splitlines()[-1]
    body = last.split("<tool>add: ")[1].split("</tool>")[0]
    assert json.loads(body) == {"a": "...", "b": "..."}


def test_detect_tool_format():
    qwen = "{%- if tools %}...<tools>{{ tool | tojson }}</tools>...<tool_call>\n{{ call }}\n</tool_call>{% endif %}"
    assert detect_tool_format(SimpleNamespace(chat_template=qwen)) == "hermes"
    assert detect_tool_format(SimpleNamespace(chat_template="{{ message['content'] }}")) == "text"
    assert detect_tool_format(SimpleNamespace(chat_template=None)) == "text"
    assert detect_tool_format(SimpleNamespace(chat_template="<tool_call> without the t-word")) == "text"
    assert detect_tool_format(SimpleNamespace(chat_template={"default": "x", "tool_use": qwen})) == "hermes"
    assert detect_tool_format(object()) == "text"
