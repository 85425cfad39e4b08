"""
Attacks on the sandbox and on the verdicts, as a hostile model would write them. Every case asserts that
the attack failed, that the caller (this process) and bystander processes are alive, that planted secrets
(a file, an environment variable) were neither read nor changed, and that nothing the program started is
still running afterwards.

The suite needs the real boundary (bubblewrap, root): on a machine where it cannot be made, every test here
FAILS with the reason; none is skipped. Sandboxes run under a uid range private to this test session, so
"nothing survives" is checked exactly: no process of those uids may remain after a case.
"""
import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nanochat import sandbox
from nanochat.execution import SandboxUnavailable, check_function, execute_code

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "nanochat-planted-" + secrets.token_hex(12)
UID_LO = 2_100_000_000 + secrets.randbelow(40_000_000)
UID_HI = UID_LO + 9_999


# -----------------------------------------------------------------------------
# fixtures: the boundary (or a loud failure), planted secrets, bystanders, listening servers

@pytest.fixture(scope="module", autouse=True)
def boundary():
    saved = {k: os.environ.get(k) for k in ("NANOCHAT_SANDBOX_UIDS", "NANOCHAT_ATTACK_SECRET", "NANOCHAT_SANDBOX_UNSAFE")}
    os.environ["NANOCHAT_SANDBOX_UIDS"] = f"{UID_LO}-{UID_HI}"
    os.environ["NANOCHAT_ATTACK_SECRET"] = SECRET
    os.environ.pop("NANOCHAT_SANDBOX_UNSAFE", None)
    try:
        try:
            assert sandbox.ensure_sandbox(allow_unsafe=False) == "bwrap"
        except SandboxUnavailable as e:
            pytest.fail(f"the sandbox boundary cannot be made on this machine, so these attacks cannot be "
                        f"shown to fail: {e}")
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Planted:
    def __init__(self, root):
        self.dir = root
        self.secret = root / "secret.txt"
        self.secret.write_text(SECRET)
        self.victim = root / "victim.txt"
        self.victim.write_text("keep me")
        self.mtime = self.victim.stat().st_mtime_ns
        # bystanders: a root process and one running as `nobody`, like an unrelated service
        self.bystanders = [subprocess.Popen(["sleep", "3600"]),
                           subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                             "sleep", "3600"])]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    p = Planted(tmp_path_factory.mktemp("planted"))
    yield p
    for proc in p.bystanders:
        proc.kill()
        proc.wait()


def _sandbox_pids():
    """Live (non-zombie) processes of this session's sandbox uids. A finished namespace's init can linger as a
    zombie until the machine's PID 1 reaps it; it runs nothing and holds nothing but its PID."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                uid, state = int(fields["Uid"].split()[0]), fields["State"].split()[0]
            except (OSError, KeyError, ValueError, IndexError):
                continue
            if UID_LO <= uid <= UID_HI and state != "Z":
                found.append(int(name))
    return found


@pytest.fixture(autouse=True)
def aftermath(planted):
    """After every case: nothing of the sandbox runs, the caller's files, environment and bystanders are intact."""
    yield
    deadline = time.monotonic() + 3
    while _sandbox_pids() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _sandbox_pids() == [], "a sandboxed process outlived its run"
    assert planted.secret.read_text() == SECRET
    assert planted.victim.read_text() == "keep me" and planted.victim.stat().st_mtime_ns == planted.mtime
    assert os.environ["NANOCHAT_ATTACK_SECRET"] == SECRET
    assert all(p.poll() is None for p in planted.bystanders), "a bystander process was killed"
    os.kill(os.getppid(), 0)  # our parent too


def clean(result):
    text = result.stdout + result.stderr + getattr(result, "reason", "")
    assert SECRET not in text, "the planted secret leaked into the sandbox"
    assert "ESCAPED" not in text, text[-2000:]
    return result


def run(code, planted, timeout=3.0, **kwargs):
    code = (code.replace("@SECRET_FILE@", str(planted.secret)).replace("@VICTIM@", str(planted.victim))
            .replace("@REPO@", REPO_ROOT).replace("@CALLER@", str(os.getpid()))
            .replace("@CALLER_PGID@", str(os.getpgid(0))))
    return clean(execute_code(textwrap.dedent(code), timeout=timeout, allow_unsafe=False, **kwargs))


def attempt(body):
    """A program that tries `body` and prints BLOCKED when it raises, ESCAPED when it completes."""
    return ("try:\n" + textwrap.indent(textwrap.dedent(body).strip(), "    ")
            + "\n    print('ESCAPED')\nexcept BaseException as e:\n    print('BLOCKED', type(e).__name__, e)\n")


LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n" \
       "def check(rc, what):\n    if rc == -1:\n        raise OSError(ctypes.get_errno(), what)\n"

# name -> the operation; it must raise inside the sandbox
BLOCKED = {
    # files
    "read_planted_secret": "print(open('@SECRET_FILE@').read())",
    "read_project_source": "print(open('@REPO@/nanochat/execution.py').read()[:100])",
    "list_root_home": "print(os.listdir('/root'))",
    "list_work": "print(os.listdir('/work'))",
    "read_etc_shadow": "print(open('/etc/shadow').read())",
    "overwrite_file_outside": "open('@VICTIM@', 'w').write('pwned')",
    "create_file_in_usr": "open('/usr/nanochat-attack', 'w').write('x')",
    "write_sandbox_root": "open('/pwned', 'w').write('x')",
    "write_dev": "open('/dev/pwned', 'w').write('x')",
    "chmod_system_file": "os.chmod('/usr/bin/python3', 0o777)",
    "hardlink_system_file": "os.link('/usr/bin/python3', 'py'); open('py', 'ab').write(b'x')",
    "host_root_via_proc": "print(os.listdir('/proc/1/root/root'))",
    "open_by_handle_at": LIBC + textwrap.dedent("""
        import struct
        handle = ctypes.create_string_buffer(struct.pack('=Ii', 8, 1) + struct.pack('=Q', 2))
        check(libc.open_by_handle_at(os.open("/usr", os.O_RDONLY), handle, 0), "open_by_handle_at")"""),
    "mount_tmpfs": LIBC + "os.mkdir('m')\ncheck(libc.mount(b'none', b'm', b'tmpfs', 0, None), 'mount')",
    "new_user_namespace": LIBC + "check(libc.unshare(0x10000000), 'unshare(CLONE_NEWUSER)')",
    "write_kernel_setting": "open('/proc/sys/kernel/hostname', 'w').write('pwned')",
    # memory outside the address-space limit: SysV shared memory (kept after detaching), memfd
    "sysv_shared_memory": LIBC + "libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]\n"
                                 "check(libc.shmget(0, 200 << 20, 0o1600), 'shmget')",
    "memfd_memory": "fd = os.memfd_create('hoard')\nos.write(fd, b'x' * (1 << 20))",
    "io_uring": LIBC + "check(libc.syscall(425, 8, ctypes.create_string_buffer(120)), 'io_uring_setup')",
    "ptrace_sandbox_init": LIBC + "check(libc.ptrace(16, 1, None, None), 'PTRACE_ATTACH to pid 1')",
    # processes and privileges
    "setuid_root": "os.setuid(0)",
    "setresuid_via_ctypes": LIBC + "check(libc.setresuid(0, 0, 0), 'setresuid')",
    "setuid_binary_mount": """
        import subprocess
        r = subprocess.run(['/usr/bin/mount', '-t', 'tmpfs', 'none', '/tmp'], capture_output=True)
        if r.returncode != 0:
            raise PermissionError(r.stderr.decode()[-200:])""",
    "capabilities": """
        caps = [l for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapAmb'))]
        if all(int(l.split()[1], 16) == 0 for l in caps):
            raise PermissionError('no capabilities: ' + ' '.join(l.strip() for l in caps))""",
    "ptrace_caller": LIBC + "check(libc.ptrace(16, @CALLER@, None, None), 'PTRACE_ATTACH')",
    # the caller
    "read_caller_environ": "print(open('/proc/@CALLER@/environ').read())",
    "read_caller_memory": "f = open('/proc/@CALLER@/mem', 'rb')",
    "signal_caller": "os.kill(@CALLER@, signal.SIGKILL)",
    "signal_caller_group": "os.killpg(@CALLER_PGID@, signal.SIGKILL)",
    "pidfd_caller": "fd = os.pidfd_open(@CALLER@)\nsignal.pidfd_send_signal(fd, signal.SIGKILL)",
    "terminal_injection": "open('/dev/tty', 'w').write('x')",
    # network
    "dns_lookup": "import socket\nprint(socket.getaddrinfo('example.com', 80))",
    "raw_socket": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)",
    "packet_socket": "import socket\nsocket.socket(socket.AF_PACKET, socket.SOCK_RAW)",
}


# an attack that fails for one of these reasons is a bug in the attack, not a block
NOT_A_BLOCK = {"NameError", "SyntaxError", "TypeError", "AttributeError", "ImportError", "ModuleNotFoundError",
               "ValueError", "IndexError", "KeyError", "UnboundLocalError"}


def assert_blocked(r, name):
    assert r.success and r.stdout.startswith("BLOCKED"), (name, r.stdout, r.stderr)
    assert r.stdout.split()[1] not in NOT_A_BLOCK, (name, r.stdout)


@pytest.mark.parametrize("name", sorted(BLOCKED))
def test_blocked(name, planted):
    r = run("import os, signal\n" + attempt(BLOCKED[name]), planted)
    assert_blocked(r, name)
    assert not os.path.exists("/usr/nanochat-attack") and not os.path.exists("/pwned")
    assert os.stat("/usr/bin/python3").st_mode & 0o777 != 0o777


def test_seccomp_filter_in_force(planted):
    r = run("print([l.split()[1] for l in open('/proc/self/status') if l.startswith(('Seccomp:', 'NoNewPrivs:'))])",
            planted)
    assert r.stdout == "['1', '2']\n"  # no_new_privs set, seccomp in filter mode


def test_secrets_not_found_anywhere_in_proc(planted):
    """Everything readable under /proc in the sandbox (cmdlines, environments, of every visible process)."""
    r = run("""
        import os
        seen = []
        for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
            for leaf in ('cmdline', 'environ'):
                try:
                    seen.append(open(f'/proc/{pid}/{leaf}', 'rb').read().decode('latin-1'))
                except OSError:
                    pass
        print(len(seen), 'files;', ' '.join(seen).replace('\\0', ' '))
        """, planted)
    assert r.success and r.stdout.split()[0].isdigit()


# -----------------------------------------------------------------------------
# network: real listeners in this process must never see a connection

@pytest.fixture(scope="module")
def listeners(tmp_path_factory):
    hits = []
    tcp = socket.create_server(("0.0.0.0", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", 0))
    path = str(tmp_path_factory.mktemp("sock") / "s")
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(path)
    unix.listen()
    abstract_name = "nanochat-attack-" + secrets.token_hex(6)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind("\0" + abstract_name)
    abstract.listen()
    stop = threading.Event()

    def watch(sock, kind):
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                if kind == "udp":
                    hits.append(("udp", sock.recvfrom(100)))
                else:
                    conn, _ = sock.accept()
                    hits.append((kind, conn))
            except OSError:
                pass
    threads = [threading.Thread(target=watch, args=(s, k), daemon=True)
               for s, k in ((tcp, "tcp"), (udp, "udp"), (unix, "unix"), (abstract, "abstract"))]
    for t in threads:
        t.start()
    host_ip = socket.gethostbyname(socket.gethostname())
    yield {"port": tcp.getsockname()[1], "udp_port": udp.getsockname()[1], "path": path,
           "abstract": abstract_name, "host_ip": host_ip, "hits": hits}
    stop.set()
    for t in threads:
        t.join(2)
    for s in (tcp, udp, unix, abstract):
        s.close()


NETWORK = {
    "tcp_loopback": "s = socket.create_connection(('127.0.0.1', {port}), timeout=1)",
    "tcp_host_address": "s = socket.create_connection(('{host_ip}', {port}), timeout=1)",
    "tcp_ipv6_loopback": "s = socket.create_connection(('::1', {port}), timeout=1)",
    "socket_class_found_by_introspection": """
        S = [c for c in object.__subclasses__() if c.__module__ == '_socket' and c.__name__ == 'socket'][0]
        s = S(2, 1); s.settimeout(1); s.connect(('127.0.0.1', {port}))""",
    "unix_socket_on_host_path": "s = socket.socket(socket.AF_UNIX); s.connect('{path}')",
    "abstract_unix_socket": "s = socket.socket(socket.AF_UNIX); s.connect('\\0{abstract}')",
    "http_request": "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
}


@pytest.mark.parametrize("name", sorted(NETWORK))
def test_network_blocked(name, planted, listeners):
    r = run("import socket\n" + attempt(NETWORK[name].format(**listeners)), planted)
    assert_blocked(r, name)
    time.sleep(0.2)
    assert listeners["hits"] == [], f"{name} reached a listener in the caller"


def test_udp_to_caller_never_arrives(planted, listeners):
    r = run(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for host in ('127.0.0.1', '{listeners['host_ip']}'):
            try:
                s.sendto(b'hello', (host, {listeners['udp_port']}))
            except OSError as e:
                print('BLOCKED', host, e)
        """, planted)
    assert r.success
    time.sleep(0.3)
    assert listeners["hits"] == []


# -----------------------------------------------------------------------------
# processes: bombs, and descendants that try to outlive the run

def test_fork_bomb(planted):
    t0 = time.monotonic()
    r = run("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", planted, timeout=1.5)
    assert not r.success and r.timed_out and time.monotonic() - t0 < 8


def test_shell_fork_bomb(planted):
    r = run("import subprocess\nsubprocess.run(['/bin/sh', '-c', 'b(){ b|b& }; b'])\nimport time\ntime.sleep(60)",
            planted, timeout=1.5)
    assert not r.success and r.timed_out


def test_thread_bomb_is_bounded(planted):
    r = run("""
        import threading, time
        n = 0
        try:
            while True:
                threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
                n += 1
        except RuntimeError:
            print('BLOCKED after', n)
        """, planted, max_processes=16)
    assert r.success and r.stdout.startswith("BLOCKED after") and int(r.stdout.split()[-1]) < 16


def _marker_alive(marker):
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        return True
            except OSError:
                pass
    return False


@pytest.mark.parametrize("ending", ["exits at once", "runs past the timeout"])
def test_detached_descendants_die_with_the_run(planted, ending):
    marker = "nanochat-survivor-" + secrets.token_hex(6)
    code = ("import os, subprocess, sys\n"
            "if os.fork() == 0:  # double fork + new session: the classic daemon escape from a process group\n"
            "    os.setsid()\n"
            f"    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', '{marker}'],\n"
            "                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "    os._exit(0)\n"
            "os.wait()\n")
    if ending != "exits at once":
        code += "while True:\n    pass\n"
    r = run(code, planted, timeout=5.0 if ending == "exits at once" else 1.5)
    assert r.timed_out == (ending != "exits at once")
    time.sleep(0.2)
    assert not _marker_alive(marker)


def test_kill_everything_visible(planted):
    """kill(-1) and killing the namespace's init reach only the sandbox's own processes."""
    r = run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('parent survived', flush=True)\n"
            "os.kill(-1, signal.SIGKILL)\nprint('kill(-1) sent')", planted)
    assert r.stdout.startswith("parent survived\n")


# -----------------------------------------------------------------------------
# resources

def test_fill_the_disk(planted):
    r = run("""
        import os
        written = 0
        try:
            for i in range(1000):
                with open(f'f{i}', 'wb') as f:
                    f.write(b'x' * (1 << 20))
                written += 1 << 20
        except OSError as e:
            print('BLOCKED', written, e)
        """, planted, disk_mb=16)
    assert r.stdout.startswith("BLOCKED") and int(r.stdout.split()[1]) <= 16 << 20


def test_many_files(planted):
    stat = os.statvfs("/tmp")
    r = run("""
        import os
        n = 0
        try:
            while True:
                open(str(n), 'w').close()
                n += 1
        except OSError as e:
            print('stopped', n, e)
        """, planted, timeout=1.0)
    assert r.timed_out or r.stdout.startswith("stopped")
    after = os.statvfs("/tmp")
    assert after.f_favail >= stat.f_favail - 10_000  # the host's inodes were never the sandbox's to use


def test_memory_in_many_processes_is_bounded_per_process(planted):
    r = run("""
        import os
        for _ in range(3):
            if os.fork() == 0:
                try:
                    x = bytearray(400 * 1024 * 1024)
                    print('ESCAPED: allocated 400 MB')
                except MemoryError:
                    print('BLOCKED', flush=True)
                os._exit(0)
        for _ in range(3):
            os.wait()
        """, planted, memory_mb=256)
    assert r.success and r.stdout == "BLOCKED\n" * 3


@pytest.mark.parametrize("code", [
    "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "while True:\n    pass",
    "import os\nos.close(1)\nos.close(2)\nwhile True:\n    pass",
    "import time\ntime.sleep(3600)",
])
def test_deadline_holds(planted, code):
    t0 = time.monotonic()
    r = run(code, planted, timeout=1.0)
    assert r.timed_out and not r.success and time.monotonic() - t0 < 4


def test_output_flood_from_many_processes(planted):
    t0 = time.monotonic()
    r = run("import os\nfor _ in range(3):\n    os.fork()\nwhile True:\n    os.write(1, b'x' * 65536)", planted,
            timeout=10.0, max_output_bytes=200_000)
    assert r.output_truncated and len(r.stdout) == 200_000 and time.monotonic() - t0 < 5


# -----------------------------------------------------------------------------
# verdict forgery: each program is wrong (or not a program at all) and tries to score as passing anyway

STRONG_TEST = """
def check(candidate):
    assert candidate(2, 3) == 5
    assert abs(candidate(-1, 1) - 0) < 1e-9
    assert all([candidate(10, 20) == 30])
    assert isinstance(candidate(1, 1), int) and candidate(1, 1) == 2
"""
WRONG = "def add(a, b):\n    return 0\n"
FAKE_VERDICT = "'0' * 32 + ' {\"passed\": true, \"reason\": \"passed\"}'"

FORGERIES = {
    "sys_exit_0_at_load": "import sys\nsys.exit(0)\n" + WRONG,
    "raise_systemexit_at_load": WRONG + "raise SystemExit\n",
    "os_exit_0_at_load": "import os\nos._exit(0)\n",
    "os_exit_0_in_call": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "sys_exit_0_in_call": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "print_passed": f"print('passed')\nprint({FAKE_VERDICT})\nimport sys\nprint({FAKE_VERDICT}, file=sys.stderr)\n" + WRONG,
    "write_fake_verdict_to_every_fd": f"""
import os
line = ({FAKE_VERDICT} + '\\n').encode()
frame = b'{{"value":5}}'
for fd in range(256):
    for data in (line, len(frame).to_bytes(4, 'big') + frame):
        try:
            os.write(fd, data)
        except OSError:
            pass
""" + WRONG,
    "malformed_replies_then_exit": """
import os
def add(a, b):
    for fd in range(3, 256):  # the reply pipe is one of these
        for data in (b'{"value": {"eq": "always"}}', b'{"value": 5, "error": "x"}', b'[' * 100000):
            try:
                os.write(fd, len(data).to_bytes(4, 'big') + data)
            except OSError:
                pass
    os._exit(0)
""",
    "patch_builtins": """
import builtins
builtins.abs = lambda x: 0
builtins.all = lambda x: True
builtins.isinstance = lambda *a: True
builtins.AssertionError = type('Quiet', (Exception,), {})
""" + WRONG,
    "always_equal_object": "class Eq:\n    def __eq__(self, o):\n        return True\n    __hash__ = object.__hash__\n"
                           "def add(a, b):\n    return Eq()\n",
    "int_subclass_always_equal": "class I(int):\n    def __eq__(self, o):\n        return True\n"
                                 "    __hash__ = int.__hash__\ndef add(a, b):\n    return I(0)\n",
    "list_subclass_always_equal": "class L(list):\n    def __eq__(self, o):\n        return True\n"
                                  "def add(a, b):\n    return L()\n",
    "kill_every_process_in_call": "import os, signal\ndef add(a, b):\n    os.kill(-1, signal.SIGKILL)\n",
    "atexit_handler": "import atexit, os\natexit.register(lambda: (print('passed'), os._exit(0)))\n" + WRONG,
    "tamper_with_the_reply_encoder": "import sys\nsys.modules['__main__'].encode = lambda value, depth=0: 5\n" + WRONG,
    "shadow_check": "def check(candidate):\n    return True\n" + WRONG,
    "first_right_then_exit": "import os\nn = [0]\ndef add(a, b):\n    n[0] += 1\n"
                             "    if n[0] > 1:\n        os._exit(0)\n    return a + b\n",
    "huge_reply": "def add(a, b):\n    return 'x' * 20_000_000\n",
    "deeply_nested_reply": "def add(a, b):\n    v = 5\n    for _ in range(100_000):\n        v = [v]\n    return v\n",
    "exception_with_hostile_str": "class E(BaseException):\n    def __str__(self):\n        raise RuntimeError\n"
                                  "def add(a, b):\n    raise E()\n",
    "raise_keyboardinterrupt": "def add(a, b):\n    raise KeyboardInterrupt\n",
    "never_returns": "def add(a, b):\n    while True:\n        pass\n",
    "read_the_tester": """
import os
for pid in [p for p in os.listdir('/proc') if p.isdigit()]:
    for leaf in ('cmdline', 'environ', 'fd'):
        try:
            path = f'/proc/{pid}/{leaf}'
            print(pid, leaf, os.listdir(path) if leaf == 'fd' else open(path, 'rb').read()[-3000:])
        except OSError as e:
            print(pid, leaf, 'BLOCKED', e)
""" + WRONG,
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forgery_does_not_pass(name, planted):
    t0 = time.monotonic()
    r = check_function(FORGERIES[name], "add", STRONG_TEST, timeout=1.5, allow_unsafe=False)
    clean(r)
    assert not r.passed, (name, r.reason)
    assert r.reason != "passed" and time.monotonic() - t0 < 6
    assert "def check" not in r.stdout + r.stderr, "the program saw the test code"


def test_the_right_program_still_passes(planted):
    """Control for the forgeries above: the same test accepts a correct program."""
    r = check_function("def add(a, b):\n    return a + b\n", "add", STRONG_TEST, allow_unsafe=False)
    assert r.passed and r.reason == "passed"
