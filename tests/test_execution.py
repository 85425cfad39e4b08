"""The sandbox's contract for legitimate programs (execute_code, check_function), its limits, the value
encoding across the verdict pipe, and its refusal/unsafe behaviour. The attacks are in test_sandbox_attacks.py.
Every test here needs the real boundary (bubblewrap, root): where it cannot be made they fail, loudly."""
import logging
import math
import os
import shutil
import time

import pytest
from hypothesis import given, settings, strategies as st

from nanochat import sandbox, sandbox_child
from nanochat.execution import CheckResult, ExecutionResult, SandboxUnavailable, check_function, execute_code


@pytest.fixture(scope="module", autouse=True)
def boundary():
    try:
        assert sandbox.ensure_sandbox(allow_unsafe=False) == "bwrap"
    except SandboxUnavailable as e:
        pytest.fail(f"the sandbox boundary cannot be made on this machine: {e}")


def run(code, **kwargs):
    return execute_code(code, allow_unsafe=False, **kwargs)


ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def test_normal_code_returns_stdout():
    r = run("import math\nprint(math.factorial(5))\nprint('done')")
    assert isinstance(r, ExecutionResult)
    assert r.success and r.error is None and r.returncode == 0 and r.isolation == "bwrap"
    assert r.stdout == "120\ndone\n"
    assert not r.timed_out and not r.memory_exceeded


def test_runtime_error_is_reported():
    r = run("print('before')\nx = {}['missing']")
    assert not r.success and r.returncode == 1
    assert r.stdout == "before\n"
    assert r.error == "KeyError: 'missing'"
    assert "Traceback" in r.stderr and "<program>" in r.stderr and "sandbox_child" not in r.stderr


def test_syntax_error_and_exit_status():
    assert run("def f(:").error.startswith("SyntaxError")
    assert run("import sys; sys.exit(0)").success
    r = run("import sys; sys.exit(3)")
    assert not r.success and r.returncode == 3 and "status 3" in r.error
    r = run("import os\nprint('hi', flush=True)\nos._exit(0)\nprint('unreached')")
    assert r.success and r.stdout == "hi\n"  # a plain run reports the exit status; verdicts use check_function


def test_infinite_loop_and_sleep_time_out():
    t0 = time.monotonic()
    r = run("while True:\n    pass", timeout=1.0)
    assert time.monotonic() - t0 < 4
    assert r.timed_out and r.error == "timeout" and not r.success
    r = run("import time\ntime.sleep(60)", timeout=0.5)
    assert r.timed_out and not r.success


@pytest.mark.parametrize("code", ["x = bytearray(4 * 1024**3)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"])
def test_memory_bomb(code):
    r = run(code, timeout=5.0, memory_mb=256)
    assert not r.success and r.memory_exceeded and r.error == "memory"


def test_legitimate_programs_work():
    """Temp files, threads, a few MB of memory, the stdlib, child processes and multiprocessing."""
    code = """
import collections, datetime, decimal, fractions, hashlib, heapq, itertools, json, math, os, random, re, string
import statistics, subprocess, sys, tempfile, threading
from concurrent.futures import ThreadPoolExecutor
with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, "a.txt"), "w") as f:
        f.write("x" * 100_000)
    assert os.path.getsize(os.path.join(d, "a.txt")) == 100_000
open("scratch.bin", "wb").write(os.urandom(1 << 20))
block = bytearray(8 * 1024 * 1024)
with ThreadPoolExecutor(4) as pool:
    squares = list(pool.map(lambda x: x * x, range(100)))
t = threading.Thread(target=lambda: None); t.start(); t.join()
out = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True).stdout
import multiprocessing
with multiprocessing.Pool(2) as pool:
    cubes = pool.map(abs, [-1, -2, -3])
print(sum(squares), out.strip(), cubes, json.dumps({"k": re.sub("a", "b", "aa")}), len(block))
"""
    r = run(code, timeout=10.0)
    assert r.success, (r.error, r.stderr)
    assert r.stdout == '328350 42 [1, 2, 3] {"k": "bb"} 8388608\n'


def test_memory_limit_allows_modest_use():
    assert run("x = bytearray(50 * 1024**2)\nprint(len(x))", memory_mb=256).stdout == "52428800\n"


def test_deep_recursion():
    r = run("def f(n):\n    return f(n + 1)\nf(0)")
    assert not r.success and r.error.startswith("RecursionError")
    r = run("import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)", timeout=2.0)
    assert not r.success  # crashes, runs out of memory or times out; in every case the caller is fine


def test_output_caps():
    t0 = time.monotonic()
    r = run("while True:\n    print('x' * 10000)", timeout=10.0, max_output_bytes=100_000)
    assert time.monotonic() - t0 < 5  # killed as soon as the cap is passed, not at the timeout
    assert not r.success and r.error == "output limit exceeded" and r.output_truncated
    assert len(r.stdout) == 100_000
    r = run("import sys\nsys.stderr.write('e' * 3_000_000)", max_output_bytes=1000)
    assert len(r.stderr) <= 1000 and not r.success


def test_each_run_gets_a_fresh_private_work_dir():
    r = run("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd(), sorted(os.listdir('.')))")
    assert r.success and r.stdout.split(" ", 1)[1] == "['scratch.txt']\n"
    r = run("import os\nprint(sorted(os.listdir('.')), sorted(os.listdir('/tmp')))")
    assert r.success and r.stdout == "[] []\n"


def test_file_size_and_disk_limits():
    assert not run("open('big', 'wb').write(b'x' * (4 * 1024**2))", max_file_mb=1).success
    r = run("f = open('a', 'wb')\nfor _ in range(40):\n    f.write(b'x' * 1024**2)\n    f.flush()",
            max_file_mb=64, disk_mb=8)
    assert not r.success and "No space left" in r.stderr


def test_stdin_is_empty():
    r = run("import sys\nprint(repr(sys.stdin.read()))", timeout=2.0)
    assert r.success and r.stdout == "''\n"  # EOF at once, never blocks


def test_bad_arguments():
    with pytest.raises(ValueError, match="code must be a str"):
        run(b"print(1)")
    for bad in ({"timeout": 0}, {"memory_mb": -1}, {"timeout": float("nan")}, {"max_processes": 2},
                {"disk_mb": True}):
        with pytest.raises(ValueError, match="sandbox limit"):
            run("print(1)", **bad)
    with pytest.raises(ValueError, match="identifiers"):
        check_function("x = 1", "not an identifier", ADD_TEST, allow_unsafe=False)
    with pytest.raises(ValueError, match="test must be a str"):
        check_function("x = 1", "add", None, allow_unsafe=False)


def test_sandbox_start_is_cheap():
    """The boundary costs tens of ms a run (bench/sandbox.py measures it properly); this only catches a
    regression by an order of magnitude on a loaded CI machine."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        assert run("pass").success
        times.append(time.perf_counter() - t0)
    assert sorted(times)[2] < 1.0, times


# -----------------------------------------------------------------------------
# verdicts for legitimate programs

def test_check_function_pass_and_fail():
    r = check_function("def add(a, b):\n    return a + b\n", "add", ADD_TEST, allow_unsafe=False)
    assert isinstance(r, CheckResult) and r.passed and r.reason == "passed" and r.isolation == "bwrap"
    r = check_function("def add(a, b):\n    return a - b\n", "add", ADD_TEST, allow_unsafe=False)
    assert not r.passed and r.reason == "AssertionError at <test> line 2: assert candidate(2, 3) == 5"
    r = check_function("def add(a, b):\n    return a +\n", "add", ADD_TEST, allow_unsafe=False)
    assert not r.passed and r.reason.startswith("the program did not load: SyntaxError")
    r = check_function("def plus(a, b):\n    return a + b\n", "add", ADD_TEST, allow_unsafe=False)
    assert not r.passed and "defines no function 'add'" in r.reason


def test_check_function_setup_helpers_kwargs_and_exceptions():
    setup = "import math\n\ndef double(x):\n    return 2 * x\n\ndef half(x):\n    '''Return x / 2.'''\n"
    test = ("def check(candidate):\n"
            "    assert candidate(double(3)) == 3.0 and half(5) == 2.5\n"  # `half` is the candidate by name too
            "    assert candidate(x=1) == 0.5\n"
            "    try:\n        candidate('a')\n    except TypeError as e:\n        assert 'unsupported' in str(e)\n"
            "    else:\n        raise AssertionError('no TypeError')\n")
    program = "def half(x):\n    print('called', x)\n    return x / 2\n"
    r = check_function(program, "half", test, setup=setup, allow_unsafe=False)
    assert r.passed, r.reason
    assert r.stdout == "called 6\ncalled 5\ncalled 1\ncalled a\n"  # the program's own output, kept apart from the verdict


def test_check_function_values_round_trip():
    """Every supported type crosses both ways with its exact type (tuple stays tuple, True is not 1)."""
    value = ("[None, True, 1, -2**70, 10**5000, 1.5, -0.0, float('inf'), 'é\\x00', b'\\x00\\xff', (1, (2,)), "
             "{1, 2}, frozenset({3}), {(1, 2): [3], 'k': {}}, 2+3j]")
    test = ("def check(candidate):\n"
            f"    v = {value}\n"
            "    out = candidate(v)\n"
            "    assert out == v and [type(x) for x in out] == [type(x) for x in v]\n"
            "    assert type(candidate([1.0])[0]) is float and type(candidate([True])[0]) is bool\n"
            "    nan = candidate([float('nan')])[0]\n"
            "    assert nan != nan\n")
    r = check_function("def ident(x):\n    return x\n", "ident", test, allow_unsafe=False)
    assert r.passed, r.reason


def test_check_function_timeout():
    t0 = time.monotonic()
    r = check_function("def add(a, b):\n    while True:\n        pass\n", "add", ADD_TEST, timeout=1.0,
                       allow_unsafe=False)
    assert not r.passed and r.timed_out and r.reason == "timeout" and time.monotonic() - t0 < 4


# -----------------------------------------------------------------------------
# the encoding itself (in-process: the tester's decoder is the trust boundary)

_leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(), st.binary(),
                    st.complex_numbers(allow_nan=False))
_hashable = st.recursive(_leaves, lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
                         max_leaves=10)
_values = st.recursive(_hashable, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner)
                       | st.dictionaries(_hashable, inner, max_size=3) | st.sets(_hashable, max_size=3),
                       max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(_values)
def test_encoding_round_trips(value):
    wire = sandbox_child.dumps(sandbox_child.encode(value))
    assert wire.isascii()
    back = sandbox_child.decode(sandbox_child.loads(wire))
    assert back == value and type(back) is type(value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_decoder_takes_any_input_without_surprises(text):
    """Arbitrary bytes from the program either decode to plain builtins or raise ValueError."""
    try:
        value = sandbox_child.decode(sandbox_child.loads(text))
    except ValueError:
        return
    stack = [value]
    while stack:
        v = stack.pop()
        assert type(v) in (type(None), bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset)
        if type(v) is dict:
            stack += list(v.keys()) + list(v.values())
        elif type(v) in (list, tuple, set, frozenset):
            stack += list(v)


def test_decoder_refuses_malformed_values():
    for text in ['NaN', 'Infinity', '[1,', '{"x": 1}', '{"tuple": 1}', '{"set": [[1]]}', '{"dict": [[[1], 2]]}',
                 '{"tuple": [], "set": []}', '1 2', '[' * 50_000 + ']' * 50_000, '{"int": 5}', '{"float": "1e400"}',
                 '{"bytes": "zz"}', '{"complex": ["1", 2]}']:
        with pytest.raises(ValueError):
            sandbox_child.decode(sandbox_child.loads(text))
    class Sneaky(int):
        def __eq__(self, other):
            return True
    for value in (Sneaky(1), [object()], {"k": Sneaky(2)}, lambda: 1, range(3), bytearray(b"x")):
        with pytest.raises((TypeError, ValueError)):
            sandbox_child.encode(value)
    assert math.isnan(sandbox_child.decode(sandbox_child.loads('{"float": "nan"}')))


# -----------------------------------------------------------------------------
# where the boundary cannot be made: a refusal that says what to do, or an explicit, logged unsafe mode

@pytest.fixture
def no_boundary(monkeypatch):
    """Pretend bwrap is missing: the probe's result is recomputed under the patched lookup."""
    real_which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None if name == "bwrap" else real_which(name))
    monkeypatch.setattr(sandbox, "_probed", {})
    monkeypatch.delenv("NANOCHAT_SANDBOX_UNSAFE", raising=False)


def test_refuses_without_the_boundary(no_boundary):
    with pytest.raises(SandboxUnavailable, match=r"bwrap not found.*apt-get install bubblewrap.*allow_unsafe=True"):
        execute_code("print(1)")
    with pytest.raises(SandboxUnavailable, match="NANOCHAT_SANDBOX_UNSAFE=1"):
        check_function("def add(a, b):\n    return a + b\n", "add", ADD_TEST)


def test_unsafe_mode_is_explicit_and_logged(no_boundary, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        r = execute_code("import os\nprint(os.getcwd() != '/')", allow_unsafe=True)
    assert r.success and r.isolation == "unsafe" and r.stdout == "True\n"
    assert any("UNSAFE" in rec.getMessage() and "WITHOUT isolation" in rec.getMessage() for rec in caplog.records)
    monkeypatch.setenv("NANOCHAT_SANDBOX_UNSAFE", "1")
    c = check_function("def add(a, b):\n    return a + b\n", "add", ADD_TEST)
    assert c.passed and c.isolation == "unsafe"
    c = check_function("import sys\nsys.exit(0)\n", "add", ADD_TEST)  # verdicts stay unforgeable by exiting
    assert not c.passed
    with pytest.raises(SandboxUnavailable):
        execute_code("print(1)", allow_unsafe=False)  # the argument overrides the environment


def test_unusable_interpreter_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "_probed", {})
    monkeypatch.setenv("NANOCHAT_SANDBOX_PYTHON", "/nonexistent/python3")
    with pytest.raises(SandboxUnavailable, match="/nonexistent/python3 does not exist.*NANOCHAT_SANDBOX_PYTHON"):
        execute_code("print(1)", allow_unsafe=False)
    private = tmp_path / "private"  # like a python under /root: the sandbox's uid cannot enter the directory
    (private / "bin").mkdir(parents=True)
    shutil.copy2("/usr/bin/python3", private / "bin" / "python3")
    private.chmod(0o700)
    monkeypatch.setenv("NANOCHAT_SANDBOX_PYTHON", str(private / "bin" / "python3"))
    with pytest.raises(SandboxUnavailable, match="cannot be run by an unprivileged user.*NANOCHAT_SANDBOX_PYTHON"):
        execute_code("print(1)", allow_unsafe=False)
    monkeypatch.setenv("NANOCHAT_SANDBOX_UIDS", "abc")
    with pytest.raises(SandboxUnavailable, match="NANOCHAT_SANDBOX_UIDS"):
        execute_code("print(1)", allow_unsafe=False)


def test_seccomp_numbers_match_the_kernel_headers():
    """The filter's syscall numbers, checked against the uapi headers where they are installed."""
    import re
    headers = {0: "/usr/include/x86_64-linux-gnu/asm/unistd_64.h", 1: "/usr/include/asm-generic/unistd.h"}
    checked = 0
    for column, path in headers.items():
        if not os.path.exists(path):
            continue
        text = open(path).read()
        for name, numbers in sandbox.SECCOMP_DENIED.items():
            found = re.search(rf"#define __NR(?:3264)?_{name}\s+(\d+)\b", text)
            assert found and int(found.group(1)) == numbers[column], (path, name)
            checked += 1
    if not checked:
        pytest.skip("no kernel uapi headers installed (linux-libc-dev) to check the seccomp numbers against")
    assert sandbox.seccomp_filter("riscv64") is None
    assert len(sandbox.seccomp_filter("x86_64")) % 8 == 0


def test_non_root_caller_is_refused():
    """Switching to the sandbox's uid needs root: a non-root caller gets the refusal, not a weaker sandbox.
    Runs a copy of the boundary module as `nobody` under the system python (the module is stdlib-only)."""
    import subprocess
    import tempfile
    root = tempfile.mkdtemp(prefix="nanochat-nonroot-")
    try:
        os.chmod(root, 0o755)
        os.mkdir(os.path.join(root, "nanochat"))
        open(os.path.join(root, "nanochat", "__init__.py"), "w").close()
        for name in ("sandbox.py", "sandbox_child.py"):
            shutil.copy(os.path.join(os.path.dirname(sandbox.__file__), name), os.path.join(root, "nanochat", name))
        code = ("import sys\nsys.path.insert(0, sys.argv[1])\nfrom nanochat import sandbox\n"
                "try:\n    sandbox.ensure_sandbox(allow_unsafe=False)\n    print('ALLOWED')\n"
                "except sandbox.SandboxUnavailable as e:\n    print('REFUSED', e)\n")
        out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                              "-I", "-c", code, root], capture_output=True, text=True, timeout=60)
        assert out.stdout.startswith("REFUSED") and "needs root" in out.stdout, (out.stdout, out.stderr)
    finally:
        shutil.rmtree(root)
