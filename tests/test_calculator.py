"""The calculator tool: whitelisted arithmetic and string counting, everything else refused (None)."""
import json
import math
import re
import time

import pytest

from conftest import require_shared_data
from nanochat.calculator import MAX_INPUT_CHARS, format_result, use_calculator


@pytest.mark.parametrize("expr, expected", [
    ("1+2", "3"), ("48/2", "24"), ("7/2", "3.5"), ("7//2", "3"), ("-7//2", "-4"), ("7%3", "1"),
    ("2**10", "1024"), ("2**-1", "0.5"), ("-3", "-3"), ("+3", "3"), ("-(2+3)*4", "-20"),
    ("(1+2)*(3+4)", "21"), ("1,000*3", "3000"), ("1,234,567 + 1", "1234568"), ("0.1+0.2", "0.3"),
    ("1/3", "0.333333333333"), ("12/60", "0.2"), (".5*18", "9"), ("2*20*.01", "0.4"), ("10**20", "100000000000000000000"),
    ("1e3/4", "250"), ("3.0", "3"), ("  4 * 5  ", "20"),
    ('"strawberry".count("r")', "3"), ("'banana'.count('an')", "2"), ('len("hello")', "5"),
    ('"Hello".lower()', "hello"), ('"a,b,c".count(",")', "2"), ('"1,000".count("0")', "3"),
    ("abs(-2.5)", "2.5"), ("round(2.567, 2)", "2.57"), ("round(7.5)", "8"),
])
def test_answers(expr, expected):
    assert use_calculator(expr) == expected


@pytest.mark.parametrize("expr", [
    # names, attribute access, imports, builtins
    "x", "x + 1", "__import__('os')", "__import__('os').system('echo hi')", "open('/etc/passwd')",
    "().__class__", "(1).__class__.__bases__", "'abc'.__class__", "'abc'.format(1)", "'a'.join(['b'])",
    "print(1)", "eval('1+1')", "exec('x=1')", "int('5')", "globals()", "sum([1, 2])",
    # statements and other syntax
    "import os", "from os import system", "x = 1", "lambda: 1", "(lambda x: x)(1)",
    "[i for i in range(10)]", "{i: i for i in range(3)}", "(i for i in range(3))", "[1, 2]", "(1, 2)",
    "'abc'[0]", "1 if 1 else 2", "1 < 2", "True + 1", "not 1", "~1", "1 << 100", "1j * 2", "f'{1}'",
    # strings only where whitelisted
    "'a' * 10", "'a' + 'b'", "-'a'", "'abc'.count(1)", "'abc'.count('a', 1)", "len(5)", "'x'.upper(1)",
    # bounds: huge powers and products, long inputs, overflow
    "2**10000", "9**9**9", "10**1000", "(10**100)**10", "2.0**100000", "10.0**400", "1e308*10",
    "10**150 * 10**150", "-2**1000", "1" * (MAX_INPUT_CHARS + 1), "+".join(["1"] * 200),
    # errors
    "1/0", "1//0", "1%0", "0**-1", "(-8)**(1/3)", "", "   ", "1+", "((1)", None, 5,
])
def test_refusals(expr):
    assert use_calculator(expr) is None


def test_nesting_and_length_limits_are_fast():
    t0 = time.perf_counter()
    for expr in ["(" * 150 + "1" + ")" * 150, "-" * 299 + "1", "2**" * 99 + "2", "9" * 300, "1.5**1000*" * 30 + "1"]:
        use_calculator(expr)  # refused or answered, never hangs or raises
    assert time.perf_counter() - t0 < 1.0


def test_format_result():
    assert format_result(5) == "5"
    assert format_result(5.0) == "5"
    assert format_result(-0.25) == "-0.25"
    assert format_result(2 / 3) == "0.666666666667"
    assert format_result(1e20) == "1e+20"
    assert format_result("abc") == "abc"


def _matches(got, want):
    """The annotation's result, possibly rounded or truncated to its own number of decimals."""
    g, w = float(got), float(want)
    decimals = len(want.split(".")[1]) if "." in want else 0
    return (math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-9) or round(g, decimals) == w
            or math.trunc(g * 10**decimals) / 10**decimals == w)


def test_gsm8k_train_annotations():
    """Every <<expr=result>> in GSM8K train: at least 99% must agree (in this data all 23,716 do)."""
    path = require_shared_data("eval", "gsm8k", "train.jsonl")
    total, failures = 0, []
    with open(path, encoding="utf-8") as f:
        for line in f:
            for expr, want in re.findall(r"<<([^<>]*?)=([^<>=]*)>>", json.loads(line)["answer"]):
                total += 1
                got = use_calculator(expr)
                if got is None or not _matches(got, want):
                    failures.append((expr, want, got))
    assert total > 20000
    print(f"GSM8K train annotations: {total - len(failures)}/{total} agree; failures: {failures[:20]}")
    assert len(failures) <= 0.01 * total, failures[:50]
