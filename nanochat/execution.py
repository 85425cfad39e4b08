"""
Run model-written Python in the sandbox (nanochat/sandbox.py), and score it with verdicts that come from
the harness, not from the program.

    result = execute_code("print(1 + 1)", timeout=5.0)          # plain "run this code" (tools)
    result.success, result.stdout                               # True, "2\\n"
    check = check_function(program, "add", test="def check(candidate):\\n    assert candidate(2, 3) == 5\\n")
    check.passed, check.reason                                  # True, "passed"

Verdicts: check_function runs the task's trusted test code in one sandbox (the tester) and the model's
program in another, with separate uids and namespaces, so the program cannot see the tester's process,
memory, files or descriptors. The tester calls the program's function through a pair of pipes with plain
values in a tagged JSON encoding (nanochat/sandbox_child.py), decodes the results itself (only builtins
come out: no object with a forged __eq__ can cross) and runs the asserts with its own, unpatched builtins;
it prints the verdict on a channel only it holds, prefixed by a secret per-run token from the harness.
Exiting early (sys.exit, os._exit, killing everything visible), printing "passed", writing to any file
descriptor, patching builtins or returning forged objects all end as a failed check.
"""
import json
import os
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Optional

from nanochat.sandbox import Limits, SandboxProcess, SandboxUnavailable, ensure_sandbox, pump, run_program, text, \
    work_dir

__all__ = ["CheckResult", "ExecutionResult", "SandboxUnavailable", "check_function", "ensure_sandbox", "execute_code"]

MAX_FRAME_BYTES = 16 * 1024 * 1024  # one call's arguments or result, encoded


@dataclass
class ExecutionResult:
    success: bool              # exit status 0 within every limit
    stdout: str
    stderr: str
    error: Optional[str]       # None on success; "timeout", "memory", "output limit exceeded", the exception line
    timed_out: bool = False    # wall-clock deadline or CPU-time limit
    memory_exceeded: bool = False
    returncode: Optional[int] = None  # negative = killed by that signal
    output_truncated: bool = False
    isolation: str = "bwrap"   # "bwrap" or "unsafe"


@dataclass
class CheckResult:
    passed: bool               # the tester's token-signed verdict said so; nothing else can make this True
    reason: str                # "passed", the failing assertion/exception, "timeout", ...
    stdout: str                # the program's own output (never the tester's)
    stderr: str
    timed_out: bool = False
    output_truncated: bool = False
    isolation: str = "bwrap"


# -----------------------------------------------------------------------------
# the two entry points

def execute_code(code: str, timeout: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 1_000_000,
                 max_file_mb: int = 16, disk_mb: int = 64, max_processes: int = 16,
                 allow_unsafe: Optional[bool] = None) -> ExecutionResult:
    """Run `code` as a program in the sandbox and report what happened. Never raises for anything the code
    does; raises ValueError for bad arguments and SandboxUnavailable when no boundary can be made (see the
    module docstring for the unsafe opt-in). `success` is exit status 0 (sys.exit(0) and os._exit(0) count):
    this is "run this code", not a verdict -- use check_function for pass/fail scoring."""
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    limits = Limits(timeout, memory_mb, max_output_bytes, max_file_mb, disk_mb, max_processes)
    isolation = ensure_sandbox(allow_unsafe)
    with work_dir(isolation) as workdir:
        stdout, stderr, rc, outcome = run_program(code, limits, isolation, workdir=workdir)
    result = ExecutionResult(success=False, stdout=stdout, stderr=stderr, error=None, returncode=rc,
                             output_truncated=outcome == "overflow", isolation=isolation)
    lines = stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    if outcome == "overflow":
        result.error = "output limit exceeded"
    elif outcome == "timeout" or rc in (-signal.SIGXCPU, -signal.SIGKILL):
        result.timed_out, result.error = True, "timeout"  # the deadline, or RLIMIT_CPU (SIGXCPU, then SIGKILL)
    elif last.startswith("MemoryError") or "Cannot allocate memory" in last:
        result.memory_exceeded, result.error = True, "memory"
    elif rc == 0:
        result.success = True
    elif rc is not None and rc < 0:
        result.error = f"killed by signal {-rc}"
    elif rc == 1 and last[:1].isalpha() and ":" in last and " " not in last.split(":")[0]:
        result.error = last[:1000]  # the exception line of the traceback ("KeyError: 'missing'")
    else:
        result.error = f"exited with status {rc}" + (f": {last[:1000]}" if last else "")
    return result


def check_function(program: str, entry_point: str, test: str, setup: str = "", check: str = "check",
                   timeout: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 1_000_000,
                   max_file_mb: int = 16, disk_mb: int = 64, max_processes: int = 16,
                   allow_unsafe: Optional[bool] = None) -> CheckResult:
    """Score `program` (the model's code, untrusted) by calling `check(candidate)` from `test` (trusted, run
    after the trusted `setup`, e.g. a task prompt's helper definitions), where `candidate` -- also bound to
    the name `entry_point` -- calls `program`'s function of that name in a separate sandbox. Arguments and
    results must be plain builtins (None, bool, int, float, complex, str, bytes, list, tuple, dict, set,
    frozenset). `passed` is True only when the tester's token-signed verdict says check() returned normally;
    the limits apply to each of the two sandboxes, the timeout to the whole check."""
    for name, value in (("program", program), ("entry_point", entry_point), ("test", test), ("setup", setup),
                        ("check", check)):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a str, got {type(value).__name__}")
    if not entry_point.isidentifier() or not check.isidentifier():
        raise ValueError(f"entry_point and check must be identifiers, got {entry_point!r} and {check!r}")
    limits = Limits(timeout, memory_mb, max_output_bytes, max_file_mb, disk_mb, max_processes)
    isolation = ensure_sandbox(allow_unsafe)
    token = secrets.token_hex(16)
    roles = (("serve", {"program": program}),
             ("test", {"token": token, "entry_point": entry_point, "setup": setup, "test": test, "check": check}))
    req_r, req_w = os.pipe()  # tester -> program: calls
    res_r, res_w = os.pipe()  # program -> tester: hello, then one reply per call
    fds = {"serve": (req_r, res_w), "test": (req_w, res_r)}
    procs = []
    with work_dir(isolation) as workdir:
        try:
            for role, extra in roles:
                cwd = None
                if isolation == "unsafe":
                    cwd = os.path.join(workdir, role)
                    os.mkdir(cwd)
                config = dict(extra, role=role, req_fd=fds[role][0], res_fd=fds[role][1],
                              max_frame_bytes=MAX_FRAME_BYTES)
                procs.append(SandboxProcess(isolation, limits, config, pass_fds=fds[role], workdir=cwd))
        except BaseException:
            for p in procs:
                p.stop(grace=0.0)
            raise
        finally:
            for fd in (req_r, req_w, res_r, res_w):
                os.close(fd)  # each side holds its own copies now; a dead peer reads as EOF
        server, tester = procs
        outcome = "timeout"
        try:  # done when the tester has closed its output, i.e. exited: its verdict pipe is fully read by then
            outcome = pump(procs, time.monotonic() + limits.timeout, stop=lambda: tester.open_streams == 0)
        finally:
            tester.stop(grace=1.0 if outcome == "done" else 0.0)
            server.stop(grace=0.0)  # the verdict does not wait for the program, whatever it still runs
    result = CheckResult(passed=False, reason="", stdout=text(server.out), stderr=text(server.err),
                         output_truncated=outcome == "overflow", isolation=isolation)
    verdicts = [line[len(token) + 1:] for line in text(tester.out).splitlines() if line.startswith(token + " ")]
    if outcome == "overflow":
        result.reason = "output limit exceeded"
    elif verdicts:
        try:
            data = json.loads(verdicts[0])
            result.passed, result.reason = data["passed"] is True, str(data["reason"])
        except (ValueError, KeyError, TypeError):
            result.reason = "the tester's verdict was malformed"
    elif outcome == "timeout" or tester.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        result.timed_out, result.reason = True, "timeout"
    else:
        tail = text(tester.err).strip()[-1000:]
        result.reason = f"no verdict from the tester (exit status {tester.returncode})" + (f": {tail}" if tail else "")
    return result
