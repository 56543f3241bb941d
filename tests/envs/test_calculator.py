"""The safe calculator: values, number formatting, everything that is not arithmetic rejected, the tool and env."""

import re

import pytest

from reasonrl.envs.base import Environment
from reasonrl.envs.calculator import (
    MAX_EXPRESSION_CHARS,
    CalculatorEnv,
    calculate,
    calculator,
    format_number,
)
from reasonrl.envs.tools import Tool, call_tool, parse_text_calls, text_tool_instructions


@pytest.mark.parametrize(("expression", "value"), [
    ("12 * (3 + 4)", "84"),
    ("2 + 3 * 4", "14"),
    ("(2 + 3) * 4", "20"),
    ("10 - 4 - 3", "3"),
    ("100 / 10 / 5", "2"),
    ("2 * 3 + 4 * 5", "26"),
    ("((((7))))", "7"),
    ("-3", "-3"),
    ("--3", "3"),
    ("+5", "5"),
    ("-(2 + 3) * 2", "-10"),
    ("4 * -2", "-8"),
    ("5 / 2", "2.5"),
    ("1 / 3", "0.333333"),
    ("2 / 3", "0.666667"),
    ("-1 / 8", "-0.125"),
    ("7 / 7", "1"),
    ("0.1 + 0.2", "0.3"),
    ("1.5 * 2", "3"),
    ("3.0", "3"),
    ("0", "0"),
    ("0 * -1", "0"),
    ("1e-9", "0"),
    ("1_000 + 1", "1001"),
    ("  12 *\t3  ", "36"),
    ("999999999999999 + 0", "999999999999999"),
])
def test_calculate_values(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize(("value", "text"), [
    (84, "84"), (-3, "-3"), (84.0, "84"), (2.5, "2.5"), (1 / 3, "0.333333"), (-1e-9, "0"), (0.1234567, "0.123457"),
    (1e15, "1000000000000000"), (-2.50, "-2.5"),
])
def test_format_number(value, text):
    assert format_number(value) == text


@pytest.mark.parametrize(("expression", "message"), [
    ("x + 1", "names are not allowed"),
    ("abs(-3)", "function calls are not allowed"),
    ("__import__('os').system('echo hi')", "not allowed"),
    ("__import__('os')", "function calls are not allowed"),
    ("(1).real", "attributes are not allowed"),
    ("[1, 2][0]", "subscripts are not allowed"),
    ("2 ** 10", "the operator ** is not allowed"),
    ("7 // 2", "the operator // is not allowed"),
    ("7 % 2", "the operator % is not allowed"),
    ("2 ^ 3", "the operator ^ is not allowed"),
    ("~1", "the operator ~ is not allowed"),
    ("1 < 2", "comparisons are not allowed"),
    ("1 and 2", "and/or are not allowed"),
    ("'a' + 'b'", "'a' is not a number"),
    ("True + 1", "True is not a number"),
    ("2j", "2j is not a number"),
    ("[1, 2]", "List is not allowed"),
    ("lambda: 1", "Lambda is not allowed"),
    ("1 if 1 else 2", "IfExp is not allowed"),
    ("import os", "not an arithmetic expression"),
    ("x = 1", "not an arithmetic expression"),
    ("2 +", "not an arithmetic expression"),
    ("3 x 4", "not an arithmetic expression"),
    ("", "the expression is empty"),
    ("   ", "the expression is empty"),
])
def test_calculate_rejects(expression, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        calculate(expression)
    if "not allowed" in message:
        assert "only numbers, + - * / and parentheses are allowed" in str(info.value)


@pytest.mark.parametrize("expression", ["1 / 0", "5 / (3 - 3)", "1 / 0.0", "1 / -0"])
def test_calculate_division_by_zero(expression):
    with pytest.raises(ValueError, match="^division by zero$"):
        calculate(expression)


@pytest.mark.parametrize("expression", [
    "1e16", "9999999999999999", "99999999 * 99999999", "1e308 * 10", "-1e16 + 1", "1 / 0.000000000000000001",
])
def test_calculate_rejects_huge_values(expression):
    with pytest.raises(ValueError, match="too large"):
        calculate(expression)


def test_calculate_length_limit():
    at_limit = "+".join(["1"] * 100)  # 199 chars
    assert len(at_limit) <= MAX_EXPRESSION_CHARS
    assert calculate(at_limit) == "100"
    too_long = "1" + " + 1" * 60
    with pytest.raises(ValueError, match=r"too long \(241 chars, at most 200\)"):
        calculate(too_long)


def test_calculator_tool():
    assert isinstance(calculator, Tool)
    assert calculator.name == "calculator"
    assert calculator.func is calculate
    function = calculator.schema["function"]
    assert function["name"] == "calculator"
    assert function["parameters"]["properties"]["expression"]["type"] == "string"
    assert function["parameters"]["required"] == ["expression"]
    assert calculator("2 + 2") == "4"


def test_calculator_through_call_tool():
    run = {"timeout_s": 1.0, "max_chars": 200}
    assert call_tool(calculator, {"expression": "12 * (3 + 4)"}, **run).text == "84"
    zero = call_tool(calculator, {"expression": "1 / 0"}, **run)
    assert (zero.error, zero.text) == ("raised", "error: ValueError: division by zero")
    name = call_tool(calculator, {"expression": "x"}, **run)
    assert name.error == "raised"
    assert name.text.startswith("error: ValueError: names are not allowed")
    wrong = call_tool(calculator, {"expression": 3}, **run)
    assert wrong.error == "bad_arguments"


def test_calculator_in_the_text_format():
    calls = parse_text_calls("First <tool>3 * (4 + 5)</tool>", [calculator])
    assert [(c.name, c.arguments) for c in calls] == [("calculator", {"expression": "3 * (4 + 5)"})]
    assert text_tool_instructions([calculator]) == (
        "You can use these tools:\n"
        "- calculator(expression: string): Evaluate an arithmetic expression with + - * / and parentheses.\n"
        "To use a tool, write <tool>calculator: 12 * (3 + 4)</tool>; its answer follows as <result>84</result>."
    )


def test_calculator_env():
    env = CalculatorEnv()
    assert isinstance(env, Environment)
    assert env.tools == [calculator]
    assert env.template is None
    assert env.start({"question": "What is 2 + 2?"}, "{question}")[-1] == {"role": "user",
                                                                          "content": "What is 2 + 2?"}
