"""
Run untrusted, model-written Python in a separate, resource-limited process.

    result = execute_code("print(1 + 1)", timeout=5.0)
    result.success, result.stdout  # True, "2\n"

What the child gets (set up by the small bootstrap below, before the program runs):
- a fresh `python -I` process in its own session (process group), so a timeout kills it and anything
  it managed to start; the parent only reads pipes, so nothing the child does can take it down;
- a temporary working directory, deleted afterwards, and a minimal environment (HOME = that dir);
- stdin closed; stdout/stderr captured up to `max_output_bytes` each (the child is killed past that);
- rlimits: address space (`memory_mb`), CPU seconds, file size, no core dumps, no new processes;
- no network: on Linux a fresh network namespace when the kernel lets us create one, and everywhere
  the socket constructors replaced by functions that raise;
- process spawning, signalling, file deletion/renaming, permission and environment changes disabled,
  and `ctypes`, `resource`, `multiprocessing` and friends made unimportable.
Anything the program prints before a failure is still returned; the stdlib stays importable otherwise.

This guards against the accidents of model-written code (loops, bombs, `rm -rf`, stray sockets), not
against a determined attacker: in-process monkeypatching can be undone from Python. Run the whole
program in a container or VM if the code may be adversarial.
"""
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import json
from dataclasses import dataclass
from typing import Optional

# The child reads the program from a file next to it, so stdin can stay closed and argv stays short.
_PROGRAM_FILE = "program.py"
_STATUS_FD_ENV = "NANOCHAT_SANDBOX_STATUS_FD"

# Runs inside the child as `python -I -c BOOTSTRAP <config-json>`. Order matters: read the program and
# set everything up while the real functions still exist, then disable them and run the program.
_BOOTSTRAP = r'''
import builtins, json, os, sys, traceback
cfg = json.loads(sys.argv[1])
status_fd = cfg["status_fd"]
_write, _exit = os.write, os._exit
with open(cfg["program"], encoding="utf-8") as f:
    source = f.read()
os.remove(cfg["program"])  # the program does not need to see itself

# no network, part 1: a private network namespace (Linux; needs root or unprivileged user namespaces)
if cfg["netns"] and sys.platform.startswith("linux"):
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
        if libc.unshare(CLONE_NEWNET) != 0:
            libc.unshare(CLONE_NEWUSER | CLONE_NEWNET)
    except Exception:
        pass

import resource
def limit(name, soft, hard=None):
    which = getattr(resource, name, None)
    if which is None:
        return
    try:
        resource.setrlimit(which, (soft, soft if hard is None else hard))
    except (ValueError, OSError):
        pass
limit("RLIMIT_AS", cfg["memory_bytes"])
limit("RLIMIT_DATA", cfg["memory_bytes"])
limit("RLIMIT_CPU", cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)  # SIGXCPU first, SIGKILL a second later
limit("RLIMIT_FSIZE", cfg["file_bytes"])
limit("RLIMIT_CORE", 0)
limit("RLIMIT_NPROC", 0)  # per user, not per process: only ever lowered here, in the child (root ignores it)

# no network, part 2, and the destructive functions: replace them with functions that raise
def disabled(name):
    def refuse(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in the sandbox")
    return refuse
import socket, _socket, shutil, subprocess, posix
for mod in (socket, _socket):
    for name in ("socket", "SocketType", "socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo"):
        if hasattr(mod, name):
            setattr(mod, name, disabled(f"{mod.__name__}.{name}"))
for mod in (os, posix):
    for name in ("system", "popen", "fork", "forkpty", "vfork", "execv", "execve", "execvp", "execvpe", "execl",
                 "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle",
                 "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "remove", "unlink",
                 "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod",
                 "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir", "chflags", "lchflags",
                 "setuid", "seteuid", "setgid", "setegid", "setsid", "setpgid", "putenv", "unsetenv", "link",
                 "symlink", "mkfifo", "mknod", "plock"):
        if hasattr(mod, name):
            setattr(mod, name, disabled(f"os.{name}"))
for name in ("rmtree", "move", "chown"):
    setattr(shutil, name, disabled(f"shutil.{name}"))
for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
    setattr(subprocess, name, disabled(f"subprocess.{name}"))
for name in ("exit", "quit", "help", "breakpoint"):
    if hasattr(builtins, name):
        setattr(builtins, name, disabled(name))
for name in ("ctypes", "_ctypes", "resource", "multiprocessing", "_multiprocessing", "_posixsubprocess", "pty",
             "psutil", "tkinter", "_tkinter", "cffi"):
    sys.modules[name] = None  # `import name` now raises ImportError
del socket, _socket, shutil, subprocess, posix, resource, limit

def report(status):
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    try:
        _write(status_fd, json.dumps(status).encode())
    except Exception:
        pass
    _exit(0)

scope = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(source, "<program>", "exec"), scope)
except SystemExit as e:
    code = e.code
    if code is None or code == 0:
        report({"status": "ok"})
    report({"status": "exit", "code": code if isinstance(code, int) else 1, "message": str(code)})
except BaseException as e:
    try:
        tb = e.__traceback__.tb_next if e.__traceback__ is not None else None  # hide this bootstrap's frame
        traceback.print_exception(type(e), e, tb)
    except BaseException:
        pass
    report({"status": "exception", "type": type(e).__name__, "message": str(e)[:1000]})
report({"status": "ok"})
'''


@dataclass
class ExecutionResult:
    success: bool              # the program ran to the end (or sys.exit(0)) within every limit
    stdout: str
    stderr: str
    error: Optional[str]       # None on success; "timeout", "memory", "output limit exceeded", or the exception text
    timed_out: bool = False    # wall-clock timeout or CPU-time limit
    memory_exceeded: bool = False
    returncode: Optional[int] = None  # of the child process; negative = killed by that signal
    output_truncated: bool = False


def _reader(fd, cap, chunks, overflow, wakeup):
    """Drain a pipe, keeping at most `cap` bytes; past that, flag the overflow so the child gets killed."""
    kept = 0
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        if kept < cap:
            chunks.append(data[:cap - kept])
        kept += len(data)
        if kept > cap and not overflow.is_set():
            overflow.set()
            wakeup.set()
    os.close(fd)


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def execute_code(code: str, timeout: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 1_000_000,
                 max_file_mb: int = 16, isolate_network: bool = True) -> ExecutionResult:
    """Run `code` in a sandboxed child process and report what happened. Never raises for anything the
    code does; raises ValueError for bad arguments."""
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    if not timeout > 0 or not memory_mb > 0 or not max_output_bytes > 0:
        raise ValueError(f"timeout, memory_mb and max_output_bytes must be positive, "
                         f"got {timeout}, {memory_mb}, {max_output_bytes}")
    with tempfile.TemporaryDirectory(prefix="nanochat-sandbox-", ignore_cleanup_errors=True) as workdir:
        program = os.path.join(workdir, _PROGRAM_FILE)
        with open(program, "w", encoding="utf-8") as f:
            f.write(code)
        status_r, status_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        cfg = {"program": program, "status_fd": status_w, "netns": isolate_network,
               "memory_bytes": int(memory_mb) * 1024 * 1024, "cpu_seconds": max(1, int(timeout + 1)),
               "file_bytes": int(max_file_mb) * 1024 * 1024}
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-X", "utf8", "-c", _BOOTSTRAP, json.dumps(cfg)],
                stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w, pass_fds=(status_w,),
                cwd=workdir, env=env, start_new_session=True, close_fds=True)
        except BaseException:
            for fd in (status_r, out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (status_w, out_w, err_w):
                os.close(fd)  # the child holds its own copies; EOF arrives when it (and any stray child) exits

        wakeup, overflow = threading.Event(), threading.Event()
        out_chunks, err_chunks, status_chunks = [], [], []
        readers = [threading.Thread(target=_reader, args=(fd, cap, chunks, overflow, wakeup), daemon=True)
                   for fd, cap, chunks in ((out_r, max_output_bytes, out_chunks),
                                           (err_r, max_output_bytes, err_chunks),
                                           (status_r, 65536, status_chunks))]
        for t in readers:
            t.start()
        waiter = threading.Thread(target=lambda: (proc.wait(), wakeup.set()), daemon=True)
        waiter.start()

        finished = wakeup.wait(timeout)
        running = proc.poll() is None
        if running:  # timeout or output overflow: the child is still going
            _kill_group(proc.pid)
        timed_out = running and not finished
        proc.wait()
        _kill_group(proc.pid)  # strays that escaped the guards but stayed in the group
        deadline = time.monotonic() + 2.0
        for t in readers:
            t.join(max(0.0, deadline - time.monotonic()))

    stdout = b"".join(out_chunks).decode("utf-8", errors="replace")
    stderr = b"".join(err_chunks).decode("utf-8", errors="replace")
    try:
        status = json.loads(b"".join(status_chunks).decode()) if status_chunks else None
    except ValueError:
        status = None
    rc = proc.returncode
    truncated = overflow.is_set()
    timed_out = timed_out and not truncated
    cpu_killed = rc in (-signal.SIGXCPU, -signal.SIGKILL) and not timed_out and not truncated  # RLIMIT_CPU
    result = ExecutionResult(success=False, stdout=stdout, stderr=stderr, error=None, returncode=rc,
                             output_truncated=truncated)
    if timed_out or cpu_killed:
        result.timed_out, result.error = True, "timeout"
    elif truncated:
        result.error = "output limit exceeded"
    elif status is None:
        if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
            result.memory_exceeded, result.error = True, "memory"
        else:
            result.error = f"process ended without finishing the program (return code {rc})"
    elif status["status"] == "ok":
        result.success = True
    elif status["status"] == "exit":
        result.error = f"exited with status {status['code']}: {status['message']}"
    elif status["type"] == "MemoryError":
        result.memory_exceeded, result.error = True, "memory"
    else:
        result.error = f"{status['type']}: {status['message']}"
    return result
