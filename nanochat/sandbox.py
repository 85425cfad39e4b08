"""
The isolation boundary for model-written code: build it, check once that it works, run one interpreter
behind it with a stdin payload, and collect its capped output against a deadline. nanochat/execution.py
puts programs and verdicts through it; docs/sandbox.md has the threat model and the figures.

What one sandbox is (Linux; the caller must be root to switch uid):
- a fresh unprivileged uid/gid per sandbox, drawn from NANOCHAT_SANDBOX_UIDS (default 2000000000-2099999999),
  never the caller's, with no supplementary groups and no_new_privs (setpriv);
- rlimits (prlimit): address space, CPU seconds, processes (per uid, so per sandbox), file size, open
  files, no core dumps;
- bubblewrap: new user, mount, PID, network, IPC, UTS and cgroup namespaces, no nested user namespaces, a
  new session (no terminal injection), killed with its parent; the filesystem is /usr read-only (plus the
  interpreter's prefix when it lives elsewhere), a private /proc for its own PIDs, a minimal /dev, and one
  size-limited tmpfs (the work dir /tmp, also /dev/shm) as the only writable place -- nothing of the
  project, /root, /work, /home or /etc; the network namespace has only its own loopback;
- a seccomp filter (x86_64, aarch64) refusing the system calls that hold memory outside every rlimit (SysV
  shared memory, memfd) and kernel interfaces a program never needs (ptrace, keyrings, bpf, perf, io_uring,
  userfaultfd, mounts and namespaces, modules, kexec, file handles);
- the harness reads stdout/stderr up to a cap each against a wall-clock deadline, then kills the process
  group: bubblewrap dies, its parent-death signal kills the namespace's init, and the kernel kills every
  process left in the namespace.

Where the boundary cannot be made (no bwrap/prlimit/setpriv, not root, user namespaces refused, the
interpreter unusable) ensure_sandbox raises SandboxUnavailable naming what is missing and the fix, unless
the caller opted in to running WITHOUT isolation (allow_unsafe=True or NANOCHAT_SANDBOX_UNSAFE=1, logged as
UNSAFE): a plain `python -I` child with the same rlimits in a temporary directory. The interpreter inside
is NANOCHAT_SANDBOX_PYTHON (default /usr/bin/python3: it must be readable by an unprivileged user).
"""
import contextlib
import json
import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

logger = logging.getLogger("nanochat")

DEFAULT_PYTHON = "/usr/bin/python3"
DEFAULT_UIDS = (2_000_000_000, 2_099_999_999)  # above any login, system or container-range uid in common use
_CHILD_SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
_INSTALL_HINT = ("install them with `apt-get install bubblewrap util-linux` (runs/setup.sh does this when run "
                 "as root on Debian/Ubuntu)")


class SandboxUnavailable(OSError):
    """The isolation boundary cannot be established here; the message says what is missing and the fix.
    An OSError (the system lacks something), so the scripts' existing data/environment error handling
    reports it as their own clear error."""


@dataclass(frozen=True)
class Limits:
    """Per-run limits; each sandbox (a check has two) gets all of them. Raises ValueError when invalid."""
    timeout: float = 5.0       # wall-clock seconds for the whole run (CPU limit: ceil(timeout) + 1 per process)
    memory_mb: int = 256       # address space per process
    max_output_bytes: int = 1_000_000  # per stream
    max_file_mb: int = 16      # largest file
    disk_mb: int = 64          # the whole writable tmpfs
    max_processes: int = 16    # processes + threads of the sandbox's uid (bubblewrap itself takes 2)

    def __post_init__(self):
        for name in ("timeout", "memory_mb", "max_output_bytes", "max_file_mb", "disk_mb", "max_processes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"sandbox limit {name} must be a positive number, got {value!r}")
        if self.max_processes < 4:
            raise ValueError(f"sandbox limit max_processes must be at least 4 (bubblewrap and the interpreter "
                             f"need them), got {self.max_processes}")


# -----------------------------------------------------------------------------
# settings, and the one-time check that the boundary can be made

def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def uid_range():
    """NANOCHAT_SANDBOX_UIDS ('FIRST-LAST' or one uid), default DEFAULT_UIDS."""
    text = os.environ.get("NANOCHAT_SANDBOX_UIDS", "").strip()
    if not text:
        return DEFAULT_UIDS
    try:
        lo, _, hi = text.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise SandboxUnavailable(f"NANOCHAT_SANDBOX_UIDS={text!r} is not 'FIRST-LAST' or a single uid") from None
    if not 0 < lo <= hi < 2 ** 32 - 1:
        raise SandboxUnavailable(f"NANOCHAT_SANDBOX_UIDS={text!r} must lie within 1..{2 ** 32 - 2}")
    return lo, hi


def new_uid():
    """A fresh uid for one sandbox: its processes then count against their own RLIMIT_NPROC, not a shared one."""
    lo, hi = uid_range()
    return lo + secrets.randbelow(hi - lo + 1)


def interpreter():
    return os.environ.get("NANOCHAT_SANDBOX_PYTHON", "").strip() or DEFAULT_PYTHON


_probed = {}  # (python, uid range) -> None (usable) or why not
_compiled = {}  # interpreter -> sandbox_child.py compiled and marshalled by that interpreter

# What the sandboxed interpreter runs (-c): read a length-prefixed, marshalled code object from stdin and run
# it as __main__; sandbox_child.main() then reads the rest of stdin, the JSON config. The harness compiled
# that code object once with the same interpreter (_runner_code), which saves compiling ~400 lines per
# sandbox (~6 ms); marshal data only ever flows from the harness into the sandbox, never back.
_BOOTSTRAP = ("import os, marshal\n"
              "def read(n):\n"
              "    data = b''\n"
              "    while len(data) < n:\n"
              "        chunk = os.read(0, n - len(data))\n"
              "        if not chunk:\n"
              "            raise SystemExit('sandbox: truncated start-up data')\n"
              "        data += chunk\n"
              "    return data\n"
              "exec(marshal.loads(read(int.from_bytes(read(8), 'big'))))\n")


def _runner_code(python):
    """sandbox_child.py compiled by `python` (outside any sandbox: it is our own source) and marshalled."""
    if python not in _compiled:
        with open(_CHILD_SOURCE_PATH, "rb") as f:
            source = f.read()
        compiler = "import marshal, sys\nsys.stdout.buffer.write(marshal.dumps(compile(sys.stdin.buffer.read(), " \
                   "'<sandbox_child>', 'exec')))"
        done = subprocess.run([python, "-I", "-S", "-B", "-c", compiler], input=source, capture_output=True,
                              timeout=60, env={"PATH": "/usr/bin:/bin"})
        if done.returncode != 0 or not done.stdout:
            raise SandboxUnavailable(f"the sandbox interpreter {python} could not compile the sandbox runner "
                                     f"({done.stderr.decode(errors='replace').strip()[-300:]}); set "
                                     f"NANOCHAT_SANDBOX_PYTHON to a working python3 (>= 3.8)")
        _compiled[python] = done.stdout
    return _compiled[python]


def _why_not(python, uids):
    """None when the full boundary works here, else what is missing and how to fix it."""
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux namespaces; this is {sys.platform}"
    missing = [tool for tool in ("bwrap", "prlimit", "setpriv") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH: {_INSTALL_HINT}"
    if os.geteuid() != 0:
        return ("model-written code runs as a separate unprivileged uid, and switching uid needs root; run as root "
                "(bubblewrap alone would leave the program under your own uid)")
    if not os.path.isfile(python):
        return (f"the sandbox interpreter {python} does not exist: `apt-get install python3`, or set "
                f"NANOCHAT_SANDBOX_PYTHON to a python3 (>= 3.8) readable by every user")
    uid = uids[0] + secrets.randbelow(uids[1] - uids[0] + 1)
    try:
        out, err, rc, _ = run_program("import os, sys\nprint(os.getuid(), os.getgid(), sys.version_info >= (3, 8))",
                                      Limits(timeout=20.0), "bwrap", python=python, uid=uid)
    except (SandboxUnavailable, OSError) as e:
        return str(e)
    if rc == 0 and out.split() == [str(uid), str(uid), "True"]:
        return None
    detail = (err or out).strip()[-600:] or f"exit status {rc}"
    if "namespace" in err or "uid map" in err or "Operation not permitted" in err:
        hint = ("this kernel or container refuses unprivileged user namespaces: check that "
                "`sysctl user.max_user_namespaces` is > 0 (and on Ubuntu `kernel.apparmor_restrict_unprivileged_"
                "userns=0`); in Docker add `--security-opt seccomp=unconfined --security-opt apparmor=unconfined`, "
                "or run in a VM")
    elif python in err or "Permission denied" in err or "No such file" in err:
        hint = (f"the interpreter {python} cannot be run by an unprivileged user (a directory above it may be "
                f"private, like /root); set NANOCHAT_SANDBOX_PYTHON to a world-readable python3, e.g. /usr/bin/python3")
    elif out.split()[-1:] == ["False"]:
        hint = f"{python} is older than Python 3.8; set NANOCHAT_SANDBOX_PYTHON to a newer python3"
    else:
        hint = "see the error above"
    return f"a test program could not run in the sandbox ({detail}); {hint}"


def ensure_sandbox(allow_unsafe=None):
    """'bwrap' when the boundary works (checked once per process), 'unsafe' when it does not and the caller
    opted in (allow_unsafe=True, or None and NANOCHAT_SANDBOX_UNSAFE=1); else raises SandboxUnavailable."""
    python, uids = interpreter(), uid_range()
    key = (python, uids)
    if key not in _probed:
        _probed[key] = _why_not(python, uids)
    why = _probed[key]
    if why is None:
        return "bwrap"
    unsafe = _env_flag("NANOCHAT_SANDBOX_UNSAFE") if allow_unsafe is None else bool(allow_unsafe)
    if not unsafe:
        raise SandboxUnavailable(
            f"cannot isolate model-written code: {why}. To run it WITHOUT isolation anyway (it can then read, "
            f"change and delete anything you can), pass allow_unsafe=True or set NANOCHAT_SANDBOX_UNSAFE=1.")
    if ("unsafe", key) not in _probed:
        _probed[("unsafe", key)] = True
        logger.warning(f"UNSAFE sandbox mode: model-written code runs WITHOUT isolation ({why})")
    return "unsafe"


# -----------------------------------------------------------------------------
# seccomp: refuse (EPERM) the system calls below; any other architecture's calls (i386 on x86_64) are fatal.
# Numbers from the kernel's uapi headers: asm/unistd_64.h for x86_64, asm-generic/unistd.h for aarch64.

SECCOMP_DENIED = {  # name: (x86_64, aarch64)
    # memory that no rlimit counts: SysV shared memory (IPC namespaces default to no size limit), memfd
    "shmget": (29, 194), "shmat": (30, 196), "shmctl": (31, 195), "memfd_create": (319, 279),
    "memfd_secret": (447, 447),
    # kernel interfaces an unprivileged program never needs, and a common source of kernel exploits
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218), "bpf": (321, 280),
    "perf_event_open": (298, 241), "userfaultfd": (323, 282), "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426), "io_uring_register": (427, 427), "unshare": (272, 97), "setns": (308, 268),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "open_tree": (428, 428),
    "move_mount": (429, 429), "mount_setattr": (442, 442), "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264), "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106), "swapon": (167, 224),
    "swapoff": (168, 225), "reboot": (169, 142), "acct": (163, 89),
}
_AUDIT_ARCH = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}  # linux/audit.h; column in the table


def seccomp_filter(machine=None):
    """The classic-BPF program (struct sock_filter[]) for bwrap --seccomp, or None on an architecture
    without a table (the namespaces and rlimits still hold there)."""
    machine = machine or os.uname().machine
    if machine not in _AUDIT_ARCH:
        return None
    arch, column = _AUDIT_ARCH[machine]
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, ..|BPF_JGE.., BPF_RET|BPF_K
    deny, allow, kill = 0x00050000 | 1, 0x7FFF0000, 0x80000000  # SECCOMP_RET_ERRNO|EPERM, _ALLOW, _KILL_PROCESS
    prog = [(ld_abs, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill),  # seccomp_data.arch must be ours
            (ld_abs, 0, 0, 0)]  # seccomp_data.nr
    if machine == "x86_64":
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, deny)]  # the x32 ABI's numbers
    for nr in sorted({numbers[column] for numbers in SECCOMP_DENIED.values()}):
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, deny)]
    prog.append((ret, 0, 0, allow))
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


# -----------------------------------------------------------------------------
# one sandboxed interpreter

def _root_binds(python):
    """/usr read-only, the merged-/usr links (or the real dirs on older layouts), and the interpreter's
    install prefix when it is not under /usr."""
    args = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    real = os.path.realpath(python)
    if not real.startswith("/usr/"):
        prefix = os.path.dirname(os.path.dirname(real))
        args += ["--ro-bind", prefix, prefix]
    return args


def command(isolation, limits, python, uid=None, seccomp_fd=None):
    """The argv of one sandbox ('bwrap') or unsafe child ('unsafe') running sandbox_child.py."""
    rlimits = ["prlimit", f"--as={int(limits.memory_mb) << 20}", f"--cpu={math.ceil(limits.timeout) + 1}",
               f"--nproc={int(limits.max_processes)}", f"--fsize={int(limits.max_file_mb) << 20}", "--nofile=256",
               "--core=0", "--"]
    if isolation == "unsafe":
        return (rlimits if shutil.which("prlimit") else []) + [python, "-I", "-S", "-B", "-c", _BOOTSTRAP]
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "MALLOC_ARENA_MAX": "1"}  # one malloc arena: glibc reserves 64 MB of address space per extra one
    return (rlimits
            + ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs"]
            + ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
               "--hostname", "sandbox"]
            + (["--seccomp", str(seccomp_fd)] if seccomp_fd is not None else [])
            + _root_binds(python)
            + ["--proc", "/proc", "--dev", "/dev",
               # the one writable place: a size-limited tmpfs at /dev/shm, which /tmp points to
               "--size", str(int(limits.disk_mb) << 20), "--tmpfs", "/dev/shm", "--symlink", "dev/shm", "/tmp",
               "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp", "--clearenv"]
            + [arg for key, value in env.items() for arg in ("--setenv", key, value)]
            + [python, "-I", "-S", "-B", "-c", _BOOTSTRAP])


class SandboxProcess:
    """One sandbox (or unsafe child) running sandbox_child.py: its stdin payload (the JSON config) and its
    capped stdout/stderr. `pass_fds` reach the child under the same numbers."""

    def __init__(self, isolation, limits, config, pass_fds=(), python=None, uid=None, workdir=None):
        python = python or interpreter()
        if isolation == "unsafe" and not os.path.isfile(python):
            python = sys.executable  # no boundary to fit: any interpreter will do
        runner = _runner_code(python)
        env = {"PATH": "/usr/bin:/bin"}
        fds, seccomp_fd = list(pass_fds), None
        if isolation == "unsafe":
            env.update(HOME=workdir, TMPDIR=workdir, LANG="C.UTF-8", LC_ALL="C.UTF-8", MALLOC_ARENA_MAX="1")
        else:
            program = seccomp_filter()
            if program is not None:  # bwrap reads the filter from a descriptor, to EOF
                seccomp_fd, w = os.pipe()
                os.write(w, program)  # a few hundred bytes: fits the pipe buffer
                os.close(w)
                fds.append(seccomp_fd)
        try:
            argv = command(isolation, limits, python, uid if uid is not None else new_uid(), seccomp_fd)
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, pass_fds=fds, cwd=workdir or "/", env=env,
                                         start_new_session=True)
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        self.isolation = isolation
        self.stdin = len(runner).to_bytes(8, "big") + runner + json.dumps(config).encode("utf-8")
        self.out, self.err = bytearray(), bytearray()
        self.cap = int(limits.max_output_bytes)
        self.open_streams = 2

    def stop(self, grace):
        """Wait up to `grace` seconds for a natural exit, then kill the whole process group (bubblewrap, then by
        its parent-death signal the namespace's init and everything in it; in unsafe mode the child's session).
        The leader is reaped only after the kill, so its group id cannot have been reused."""
        pid, end = self.proc.pid, time.monotonic() + grace
        while self.proc.returncode is None:
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None \
                        or time.monotonic() >= end:
                    break
            except ChildProcessError:
                break
            time.sleep(0.001)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()

    @property
    def returncode(self):
        rc = self.proc.returncode
        if self.isolation == "bwrap" and rc is not None and 128 < rc < 128 + 65:
            return -(rc - 128)  # bwrap reports a signal-killed child as 128 + signal, like a shell
        return rc


def pump(procs, deadline, stop=lambda: False):
    """Feed every stdin and drain every stdout/stderr until all reach EOF or `stop()` holds ('done'), the
    deadline passes ('timeout') or a stream passes its cap ('overflow')."""
    sel = selectors.DefaultSelector()
    for p in procs:
        os.set_blocking(p.proc.stdin.fileno(), False)
        sel.register(p.proc.stdin.fileno(), selectors.EVENT_WRITE, (p, None))
        sel.register(p.proc.stdout.fileno(), selectors.EVENT_READ, (p, p.out))
        sel.register(p.proc.stderr.fileno(), selectors.EVENT_READ, (p, p.err))
    try:
        while sel.get_map() and not stop():
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            for key, _ in sel.select(left):
                p, buf = key.data
                if buf is None:  # stdin: write what the pipe takes; a child that exits early drops the rest
                    try:
                        p.stdin = p.stdin[os.write(key.fd, p.stdin):]
                    except OSError:
                        p.stdin = b""
                    if not p.stdin:
                        sel.unregister(key.fd)
                        p.proc.stdin.close()
                    continue
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    p.open_streams -= 1
                elif len(buf) + len(data) > p.cap:
                    buf += data[:p.cap - len(buf)]
                    return "overflow"
                else:
                    buf += data
        return "done"
    finally:
        sel.close()


def text(data):
    return bytes(data).decode("utf-8", errors="replace")


def run_program(program, limits, isolation, python=None, uid=None, workdir=None):
    """(stdout, stderr, returncode, outcome) of the `run` role: `program` as __main__ in one sandbox."""
    p = SandboxProcess(isolation, limits, {"role": "run", "program": program}, python=python, uid=uid,
                       workdir=workdir)
    outcome = "timeout"
    try:
        outcome = pump([p], time.monotonic() + limits.timeout)
    finally:
        p.stop(grace=1.0 if outcome == "done" else 0.0)
    return text(p.out), text(p.err), p.returncode, outcome


def work_dir(isolation):
    """The unsafe child's temporary working directory (deleted afterwards); a sandbox brings its own tmpfs."""
    if isolation == "unsafe":
        return tempfile.TemporaryDirectory(prefix="nanochat-sandbox-", ignore_cleanup_errors=True)
    return contextlib.nullcontext(None)
