"""A safe arithmetic calculator tool, and the environment that offers it.

`calculate` never runs eval or exec: it parses the expression with `ast.parse(..., mode="eval")` and walks only
numbers (int and float literals), unary + and -, binary + - * / and parentheses. Anything else (names, calls,
attributes, subscripts, `**`, `//`, `%`, comparisons, ...) is a ValueError that says what is not allowed. The work
is bounded: expressions are at most `MAX_EXPRESSION_CHARS` long and every intermediate value stays within
`MAX_ABS_VALUE`.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import ClassVar

from reasonrl.envs.base import Environment
from reasonrl.envs.tools import Tool
from reasonrl.envs.worked_examples import worked_example

__all__ = ["MAX_ABS_VALUE", "MAX_EXPRESSION_CHARS", "CalculatorEnv", "calculate", "calculator"]

MAX_EXPRESSION_CHARS = 200
MAX_ABS_VALUE = 1e15
DECIMALS = 6

_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}
_UNARY: dict[type, Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_OPERATOR_SYMBOLS = {ast.Pow: "**", ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.BitXor: "^",
                     ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>", ast.Invert: "~",
                     ast.Not: "not"}
_NODE_NAMES = {ast.Name: "names", ast.Call: "function calls", ast.Attribute: "attributes",
               ast.Subscript: "subscripts", ast.Compare: "comparisons", ast.BoolOp: "and/or"}
_ALLOWED = "only numbers, + - * / and parentheses are allowed"


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression with + - * / and parentheses.

    Args:
        expression: The arithmetic expression, for example "12 * (3 + 4)".

    Returns:
        The value: integers without a decimal point, other numbers rounded to 6 decimals.
    """
    text = expression.strip()
    if not text:
        raise ValueError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is too long ({len(text)} chars, at most {MAX_EXPRESSION_CHARS})")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {text!r} ({_ALLOWED})") from err
    return format_number(_evaluate(tree.body))


def format_number(value: float) -> str:
    """84 -> "84", 84.0 -> "84", 2.5 -> "2.5", 1/3 -> "0.333333", -1e-9 -> "0"."""
    if isinstance(value, int):
        return str(value)
    rounded = round(value, DECIMALS)
    if rounded == 0:
        return "0"
    if rounded.is_integer():
        return str(int(rounded))
    return f"{rounded:.{DECIMALS}f}".rstrip("0").rstrip(".")


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant):
        return _checked(_number(node.value))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _checked(_BINARY[type(node.op)](left, right))
    raise ValueError(f"{_describe(node)} not allowed: {_ALLOWED}")


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number: {_ALLOWED}")  # noqa: TRY004 - every bad expression is a ValueError
    return value


def _checked(value: float) -> float:
    if not math.isfinite(value) or abs(value) > MAX_ABS_VALUE:
        raise ValueError(f"a number in the calculation is too large (more than {MAX_ABS_VALUE:g} in size)")
    return value


def _describe(node: ast.AST) -> str:
    """What the disallowed node is, for the error message: "the operator ** is", "names are"."""
    op = getattr(node, "op", None)
    if op is not None and type(op) in _OPERATOR_SYMBOLS:
        return f"the operator {_OPERATOR_SYMBOLS[type(op)]} is"
    if type(node) in _NODE_NAMES:
        return f"{_NODE_NAMES[type(node)]} are"
    return f"{type(node).__name__} is"


calculator = Tool.of(calculate, name="calculator", example=("12 * (3 + 4)", "84"))


# The worked examples' problems, three- and two-operand in turn (the arithmetic task's shapes).
EXAMPLE_PROBLEMS = ("23 * 4 + 17", "56 - 18", "31 + 45 * 12", "72 * 19")


class CalculatorEnv(Environment):
    """An episode with the calculator tool: the model may call it; the recipe's rewards grade the answer.

    examples: worked examples before the question (few-shot, 0..4): each asks one of `EXAMPLE_PROBLEMS` as the
    data template does, calls the calculator on the expression and answers with its result after '####'. A
    small model that never writes a tool call on its own (SmolLM2-135M: 0 of 256 samples) copies the call from them.
    """

    tools: ClassVar[list] = [calculator]
    template = None

    def __init__(self, examples: int = 0):
        if isinstance(examples, bool) or not isinstance(examples, int) or not 0 <= examples <= len(EXAMPLE_PROBLEMS):
            raise ValueError(f"calculator: examples={examples!r} must be an integer in [0, {len(EXAMPLE_PROBLEMS)}]")
        self.examples = int(examples)

    def start(self, row: dict, template: str) -> list[dict]:
        shots = []
        for problem in EXAMPLE_PROBLEMS[: self.examples]:
            value = calculate(problem)
            shots += worked_example(problem, self.template or template, calculator, {"expression": problem}, value,
                                    f"\n#### {value}")
        return shots + super().start(row, template)
