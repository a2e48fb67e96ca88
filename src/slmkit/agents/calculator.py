"""A calculator for the model: arithmetic and math functions evaluated over Python's AST, never `eval`.

Only number literals, + - * / // % ** (and `^`, read as `**` the way calculators write it),
unary signs, parentheses, the constants pi, e and tau and a fixed list of math functions are
allowed; anything else (names, attributes, subscripts, comprehensions, strings) is an error naming
what was refused. Results too large to be useful (a 10**10**10) are refused before they are computed.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_LENGTH = 1000
MAX_BITS = 14_000  # largest integer a power may produce (~4,200 digits, within what Python prints)

CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}
FUNCTIONS = {
    "abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt, "cbrt": math.cbrt, "exp": math.exp,
    "log": math.log, "log10": math.log10, "log2": math.log2, "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "asin": math.asin, "acos": math.acos, "atan": math.atan, "atan2": math.atan2, "sinh": math.sinh,
    "cosh": math.cosh, "tanh": math.tanh, "floor": math.floor, "ceil": math.ceil, "hypot": math.hypot,
    "degrees": math.degrees, "radians": math.radians, "gcd": math.gcd, "lcm": math.lcm, "factorial": None,
}
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: None}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; ValueError saying what is wrong otherwise."""
    text = expression.strip().rstrip("=").strip().replace("^", "**")
    if not text:
        raise ValueError("empty expression")
    if len(text) > MAX_LENGTH:
        raise ValueError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg} at column {e.offset}") from None
    try:
        return _eval(tree.body)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:
        raise ValueError("result too large") from None
    except RecursionError:
        raise ValueError("expression nested too deeply") from None


def format_number(value: int | float) -> str:
    """Integers exactly, floats to 12 significant digits (6.0 -> "6")."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, float):
        return format(value, ".12g")
    try:
        return str(value)
    except ValueError:  # past Python's int-to-str digit limit
        raise ValueError("result too large to print") from None


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            return _power(left, right)
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS and not node.keywords:
        args = [_eval(a) for a in node.args]
        if node.func.id == "factorial":
            return _factorial(*args)
        try:
            return FUNCTIONS[node.func.id](*args)
        except TypeError as e:
            raise ValueError(f"{node.func.id}: {e}") from None
    if isinstance(node, ast.Name):
        raise ValueError(f"unknown name {node.id!r}; known constants: {', '.join(CONSTANTS)}")
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
        raise ValueError(f"unknown function {name!r}; known functions: {', '.join(FUNCTIONS)}")
    raise ValueError(f"{ast.unparse(node)!r} is not allowed: only numbers, + - * / // % ** ^, parentheses and math functions")


def _power(base: int | float, exponent: int | float) -> int | float:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if exponent * math.log2(abs(base)) > MAX_BITS:
            raise ValueError("result too large")
    elif abs(exponent) > MAX_BITS:
        if isinstance(base, float) or abs(base) > 1:
            raise ValueError("result too large")
    result = base ** exponent
    if isinstance(result, complex):
        raise ValueError("the result is not a real number")
    return result


def _factorial(*args: int | float) -> int:
    if len(args) != 1 or not float(args[0]).is_integer() or args[0] < 0:
        raise ValueError("factorial takes one non-negative integer")
    n = int(args[0])
    if n > 1000:
        raise ValueError("result too large")
    return math.factorial(n)
