"""The sandbox: normal programs work, and every attack fails cleanly while this (parent) process carries on."""
import os
import socket
import threading
import time

import pytest

from nanochat.execution import ExecutionResult, execute_code


def test_normal_code_returns_stdout():
    r = execute_code("import math\nprint(math.factorial(5))\nprint('done')")
    assert isinstance(r, ExecutionResult)
    assert r.success and r.error is None and r.returncode == 0
    assert r.stdout == "120\ndone\n"
    assert not r.timed_out and not r.memory_exceeded


def test_runtime_error_is_reported():
    r = execute_code("print('before')\nx = {}['missing']")
    assert not r.success
    assert r.stdout == "before\n"
    assert r.error.startswith("KeyError")
    assert "Traceback" in r.stderr and "<program>" in r.stderr


def test_syntax_error_and_sys_exit():
    assert execute_code("def f(:").error.startswith("SyntaxError")
    assert execute_code("import sys; sys.exit(0)").success
    r = execute_code("import sys; sys.exit(3)")
    assert not r.success and "status 3" in r.error


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = execute_code("while True:\n    pass", timeout=1.0)
    assert time.monotonic() - t0 < 5
    assert r.timed_out and r.error == "timeout" and not r.success


def test_sleep_times_out():
    r = execute_code("import time\ntime.sleep(60)", timeout=0.5)
    assert r.timed_out and not r.success


def test_fork_bomb_is_refused():
    for code in ("import os\nwhile True:\n    os.fork()",
                 "import posix\nposix.fork()",
                 "import subprocess\nsubprocess.Popen(['sh', '-c', ':(){ :|:& };:'])",
                 "import os\nos.system('echo hi')",
                 "import multiprocessing",
                 "import ctypes"):
        r = execute_code(code, timeout=2.0)
        assert not r.success and not r.timed_out, code
        assert "PermissionError" in r.error or "ModuleNotFoundError" in r.error, (code, r.error)


@pytest.mark.parametrize("code", ["x = bytearray(4 * 1024**3)",
                                  "x = []\nwhile True:\n    x.append(' ' * 10**6)"])
def test_memory_bomb(code):
    r = execute_code(code, timeout=5.0, memory_mb=256)
    assert not r.success and r.memory_exceeded and r.error == "memory"


def test_memory_limit_allows_modest_use():
    assert execute_code("x = bytearray(50 * 1024**2)\nprint(len(x))", memory_mb=256).stdout == "52428800\n"


def test_os_exit_is_not_success():
    r = execute_code("import os\nprint('hi', flush=True)\nos._exit(0)\nprint('unreached')")
    assert not r.success and r.returncode == 0 and r.stdout == "hi\n"
    assert "without finishing" in r.error


def test_deep_recursion():
    r = execute_code("def f(n):\n    return f(n + 1)\nf(0)")
    assert not r.success and r.error.startswith("RecursionError")
    r = execute_code("import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\nf(0)", timeout=2.0)
    assert not r.success  # crashes, runs out of memory or times out; in every case the parent is fine


def test_huge_output_is_capped():
    t0 = time.monotonic()
    r = execute_code("while True:\n    print('x' * 10000)", timeout=10.0, max_output_bytes=100_000)
    assert time.monotonic() - t0 < 5  # killed as soon as the cap is passed, not at the timeout
    assert not r.success and r.error == "output limit exceeded" and r.output_truncated
    assert len(r.stdout) == 100_000
    r = execute_code("import sys\nsys.stderr.write('e' * 3_000_000)", max_output_bytes=1000)
    assert len(r.stderr) <= 1000 and not r.success


def test_destructive_functions_disabled(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for code in (f"import os; os.remove({str(victim)!r})", f"import os; os.unlink({str(victim)!r})",
                 f"import shutil; shutil.rmtree({str(tmp_path)!r})", f"import os; os.rename({str(victim)!r}, 'x')",
                 f"import os; os.chmod({str(victim)!r}, 0)", "import os; os.kill(1, 9)",
                 "import os; os.killpg(0, 9)", "import os; os.putenv('A', 'B')"):
        r = execute_code(code)
        assert not r.success and "PermissionError" in r.error, (code, r.error)
    assert victim.read_text() == "keep me"


def test_temp_workdir_is_private_and_removed():
    code = "import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())"
    r = execute_code(code)
    assert r.success
    workdir = r.stdout.strip()
    assert os.path.basename(workdir).startswith("nanochat-sandbox-")
    assert not os.path.exists(workdir)


def test_file_size_limit():
    r = execute_code("open('big', 'wb').write(b'x' * (64 * 1024**2))", max_file_mb=1)
    assert not r.success


def test_stdin_is_closed():
    r = execute_code("import sys\nprint(repr(sys.stdin.read()))", timeout=2.0)
    assert r.success and r.stdout == "''\n"  # /dev/null: EOF at once, never blocks


def _network_namespace_active():
    r = execute_code("print(open('/proc/net/dev').read())")
    interfaces = [line.split(":")[0].strip() for line in r.stdout.splitlines() if ":" in line]
    return r.success and interfaces == ["lo"]


# the socket class itself, found without the (patched) socket module: only the network namespace stops this
_BYPASS = ("S = [c for c in object.__subclasses__() if c.__module__ == '_socket' and c.__name__ == 'socket'][0]\n"
           "s = S(2, 1)\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))")


def test_no_network():
    """A server in this process; the child must not reach it."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn)
            except OSError:
                pass
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        attempts = [f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
                    f"import socket; s = socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', {port}))",
                    f"import socket; s = socket.SocketType(2, 1); s.connect(('127.0.0.1', {port}))",
                    f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)"]
        if _network_namespace_active():
            attempts.append(_BYPASS.format(port=port))
        for code in attempts:
            r = execute_code(code, timeout=3.0)
            assert not r.success, code
        # control: without isolation the bypass does connect, so the check above can fail
        if _network_namespace_active():
            assert execute_code(_BYPASS.format(port=port), timeout=3.0, isolate_network=False).success
            deadline = time.monotonic() + 2
            while not accepted and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(accepted) == 1
            accepted.pop().close()
        time.sleep(0.3)
        assert accepted == [], "a sandboxed program reached a server on 127.0.0.1"
    finally:
        stop.set()
        thread.join(2)
        server.close()
        for conn in accepted:
            conn.close()


def test_bad_arguments():
    with pytest.raises(ValueError):
        execute_code(b"print(1)")
    with pytest.raises(ValueError):
        execute_code("print(1)", timeout=0)


def test_parent_keeps_running_after_attacks():
    # after all of the above in this process, a plain run still works and is fast
    t0 = time.monotonic()
    assert execute_code("print(sum(range(10)))").stdout == "45\n"
    assert time.monotonic() - t0 < 3
