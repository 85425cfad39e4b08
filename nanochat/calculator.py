"""
The calculator tool the inference engine calls on the text between <|python_start|> and <|python_end|>.

    use_calculator("48/2")                 -> "24"
    use_calculator("1,000 * 3.5")          -> "3500"
    use_calculator('"strawberry".count("r")') -> "3"
    use_calculator("__import__('os')")     -> None

The text is parsed with `ast` and evaluated by walking the tree ourselves; `eval` never sees it.
Accepted, and nothing else:
- numbers: int and float literals (not bool/complex); commas between digit groups ("1,000") are dropped;
- arithmetic on numbers: + - * / // % ** and unary + -, with parentheses;
- string literals, only as arguments to the calls below;
- calls: `len(s)`, `abs(x)`, `round(x)`, `round(x, n)`, and on a string literal s:
  s.count(sub), s.find(sub), s.startswith(sub), s.endswith(sub), s.upper(), s.lower(), s.strip().
Refused (the result is None): names, attribute access other than those methods, imports, lambdas,
comprehensions, subscripts, any other call, inputs longer than MAX_INPUT_CHARS, integers beyond
MAX_INT_BITS bits (checked before each operation, so no huge intermediate is ever computed), floats
that overflow, and errors such as division by zero. None means "no output"; the engine then forces
nothing into the stream and generation continues.

Why this is time-bounded: the input is at most MAX_INPUT_CHARS characters, so the tree has at most
that many nodes; every number stays within MAX_INT_BITS bits (a ** b is refused unless
b * log2|a| fits, and products are bounded by the same check on their operands' sizes), so each
arithmetic step is cheap; and each string method is linear in strings no longer than the input.
"""
import ast
import math
import operator
import re

MAX_INPUT_CHARS = 300
MAX_INT_BITS = 512           # about 154 decimal digits
MAX_POW_EXPONENT = 1024      # for floats; ints are bounded by MAX_INT_BITS instead
FLOAT_SIG_DIGITS = 12        # results are rounded to this many significant digits

_STR_METHODS = {"count": 1, "find": 1, "startswith": 1, "endswith": 1, "upper": 0, "lower": 0, "strip": 0}  # -> arguments
_FUNCTIONS = {"len", "abs", "round"}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_STRING_LITERAL = re.compile(r"""("[^"\\]*(?:\\.[^"\\]*)*"|'[^'\\]*(?:\\.[^'\\]*)*')""")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


class Refused(Exception):
    """The expression is outside the whitelist or its bounds."""


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_number(x):
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise Refused("integer too large")
    if isinstance(x, float) and not math.isfinite(x):
        raise Refused("float overflow")
    return x


def _binop(op, a, b):
    if not (_is_number(a) and _is_number(b)):
        raise Refused("arithmetic is for numbers only")
    if isinstance(op, ast.Pow):
        if isinstance(a, int) and isinstance(b, int) and b >= 0:
            if abs(a) > 1 and b * math.log2(abs(a)) > MAX_INT_BITS:
                raise Refused("power too large")
        elif abs(b) > MAX_POW_EXPONENT:
            raise Refused("exponent too large")
    elif isinstance(op, ast.Mult) and isinstance(a, int) and isinstance(b, int):
        if a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
            raise Refused("product too large")
    result = _BINOPS[type(op)](a, b)
    if isinstance(result, complex):  # e.g. (-8) ** (1/3)
        raise Refused("complex result")
    return _check_number(result)


def _call(node):
    if node.keywords:
        raise Refused("keyword arguments")
    args = [_eval(a) for a in node.args]
    func = node.func
    if isinstance(func, ast.Name) and func.id in _FUNCTIONS:
        if func.id == "len" and len(args) == 1 and isinstance(args[0], str):
            return len(args[0])
        if func.id == "abs" and len(args) == 1 and _is_number(args[0]):
            return abs(args[0])
        if func.id == "round" and len(args) in (1, 2) and _is_number(args[0]):
            if len(args) == 2 and not (isinstance(args[1], int) and abs(args[1]) <= 20):  # _eval gives no bools
                raise Refused("round() digits must be a small int")
            return _check_number(round(*args))
        raise Refused(f"bad arguments to {func.id}()")
    if (isinstance(func, ast.Attribute) and func.attr in _STR_METHODS
            and isinstance(func.value, ast.Constant) and isinstance(func.value.value, str)):
        if not all(isinstance(a, str) for a in args):
            raise Refused("string methods take string arguments")
        if len(args) != _STR_METHODS[func.attr]:
            raise Refused(f"{func.attr}() takes {_STR_METHODS[func.attr]} argument(s)")
        return getattr(func.value.value, func.attr)(*args)
    raise Refused("call not allowed")


def _eval(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Constant) and _is_number(node.value):
        return _check_number(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _binop(node.op, _eval(node.left), _eval(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        x = _eval(node.operand)
        if not _is_number(x):
            raise Refused("unary minus is for numbers only")
        return -x if isinstance(node.op, ast.USub) else +x
    if isinstance(node, ast.Call):
        return _call(node)
    raise Refused(f"{type(node).__name__} not allowed")


def _drop_thousands_commas(expr):
    """'1,000 + 2' -> '1000 + 2', leaving string literals alone (odd pieces of the split are literals)."""
    pieces = _STRING_LITERAL.split(expr)
    return "".join(p if i % 2 else _THOUSANDS_COMMA.sub("", p) for i, p in enumerate(pieces))


def format_result(x):
    """Integers without '.0', floats to FLOAT_SIG_DIGITS significant digits, strings as they are."""
    if not isinstance(x, float):
        return str(x)
    x = float(f"{x:.{FLOAT_SIG_DIGITS}g}")
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


def use_calculator(expr):
    """The formatted result of a whitelisted expression, or None when it is refused or fails."""
    try:
        if len(expr) > MAX_INPUT_CHARS:
            return None
        return format_result(_eval(ast.parse(_drop_thousands_commas(expr.strip()), mode="eval").body))
    except Exception:  # Refused, ZeroDivisionError, OverflowError, SyntaxError, RecursionError, MemoryError...
        return None
