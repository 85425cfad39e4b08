"""
Shared runtime: device and dtype choice, torch.distributed setup, the base directory,
seeding, atomic file writes and small helpers used by every script.
"""
import argparse
import functools
import gzip
import hashlib
import json
import logging
import os
import random
import tempfile
import time
import zlib
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
logger = logging.getLogger("nanochat")

# -----------------------------------------------------------------------------
# Base directory: every artifact (tokenizer, data shards, checkpoints, report) lives under it.

def get_base_dir():
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base

# -----------------------------------------------------------------------------
# Distributed info (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE)

def is_ddp_initialized():
    return dist.is_available() and dist.is_initialized()

def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from the torchrun environment."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1

def dist_rank_world():
    """(rank, world_size) of the initialized process group; (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if is_ddp_initialized() else (0, 1)

def all_reduce_sum(values):
    """The element-wise sum of a tensor over all ranks, on the tensor's device; the tensor itself without a
    process group. The reduction runs where the backend can: NCCL on the GPU, gloo on the CPU."""
    if not is_ddp_initialized() or dist.get_world_size() == 1:
        return values
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = values.to(on, copy=True)
    dist.all_reduce(t)
    return t.to(values.device)

def print0(*args, **kwargs):
    """print on rank 0 only, so multi-process runs log once."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)

# -----------------------------------------------------------------------------
# Device and dtype policy

def autodetect_device_type(override=None):
    """cuda, then mps, then cpu; `override` (a flag) or NANOCHAT_DEVICE wins when set."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    choice = override or os.environ.get("NANOCHAT_DEVICE")
    if not choice:
        return next(device for device, ok in available.items() if ok)
    if choice not in available:
        raise ValueError(f"device type must be one of {tuple(available)}, got {choice!r}")
    if not available[choice]:
        raise RuntimeError(f"device type {choice!r} was requested but it is not available on this machine")
    return choice

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}

@functools.lru_cache(maxsize=None)
def cpu_bf16_is_faster():
    """Measured, not assumed: CPUs with AMX/AVX512-BF16 run bf16 matmuls several times faster than
    fp32, older ones emulate bf16 and run it slower. Takes a few tens of milliseconds, once per process."""
    try:
        bf16, fp32 = (measure_matmul_flops("cpu", dtype, n=512, reps=8) for dtype in (torch.bfloat16, torch.float32))
        return 0.8 * bf16 > fp32
    except RuntimeError:
        return False

def get_compute_dtype(device_type):
    """bf16 on CUDA sm80+, on CPUs where it measures faster; fp32 otherwise. NANOCHAT_DTYPE overrides."""
    override = os.environ.get("NANOCHAT_DTYPE")
    if override:
        if override not in DTYPES:
            raise ValueError(f"NANOCHAT_DTYPE must be one of {sorted(DTYPES)}, got {override!r}")
        return DTYPES[override]
    if device_type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float32
    if device_type == "cpu":
        return torch.bfloat16 if cpu_bf16_is_faster() else torch.float32
    return torch.float32  # mps: bf16 support varies by OS version; stay safe

def autocast_context(device_type, dtype):
    """Mixed precision for forward passes; a no-op context in fp32."""
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=dtype != torch.float32)

def synchronize(device_type):
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()

def get_peak_memory(device_type):
    """Peak bytes allocated on the accelerator, or the process's peak resident set on CPU."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

# -----------------------------------------------------------------------------
# Seeding and process setup

# glibc mmaps every buffer above a (dynamic) threshold and unmaps it when freed, so on CPU each
# training step faults its big activation buffers in again, zeroed by the kernel: 5-10% of a step
# (bench/base_train.py measured 37-93k minor faults per step). These settings keep freed memory.
MALLOC_SETTINGS = ((-3, 32 << 20), (-1, 1 << 30), (-2, 64 << 20))  # M_MMAP_THRESHOLD (glibc's max), M_TRIM_THRESHOLD, M_TOP_PAD

def keep_freed_memory():
    """Tell glibc malloc to keep freed memory for reuse (CPU training and inference). Does nothing,
    and returns False, off glibc, when NANOCHAT_TUNE_MALLOC=0, or when the user set MALLOC_* tunables."""
    user_set = any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ)
    if os.environ.get("NANOCHAT_TUNE_MALLOC", "1") == "0" or user_set:
        return False  # turned off, or the user's own malloc settings win
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in MALLOC_SETTINGS)
    except (OSError, AttributeError):
        return False  # not glibc (macOS, musl, Windows)

def compute_init(device_type=None, seed=42):
    """Pick the device, join the torchrun process group if there is one, seed, and set precision.
    Returns (is_ddp, rank, local_rank, world_size, device)."""
    device_type = autodetect_device_type(device_type)
    random.seed(seed)
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    if device_type == "cpu":
        keep_freed_memory()
    is_ddp, rank, local_rank, world_size = get_dist_info()
    cuda = device_type == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device(device_type)
    if cuda:
        torch.set_float32_matmul_precision("high")  # tf32 for any fp32 matmul left
        torch.cuda.set_device(device)
    if is_ddp and not is_ddp_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
        dist.barrier()
    return is_ddp, rank, local_rank, world_size, device

def compute_cleanup():
    if is_ddp_initialized():
        gloo = dist.get_backend() == "gloo"
        dist.barrier()
        dist.destroy_process_group()
        if gloo:
            # Gloo's worker threads outlive destroy_process_group and drop their reference to a finished
            # collective's tensors a moment after wait() returns, which takes the GIL; if that happens
            # while the interpreter is finalizing, the thread is killed inside a destructor and the
            # process aborts ("terminate called without an active exception") after a successful run.
            # Releasing the GIL for a moment here lets them finish first.
            time.sleep(0.05)

# -----------------------------------------------------------------------------
# Atomic writes: a reader (or a resumed run) never sees a half-written file.

@contextmanager
def atomic_open(path, mode="wb"):
    """Open a temp file next to `path`; on success fsync and rename it over `path`, on error remove it."""
    assert "w" in mode, "atomic_open is for writing"
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

def atomic_write_bytes(path, data):
    with atomic_open(path, "wb") as f:
        f.write(data)

def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))

def sha256_file(path, chunk=1 << 24):
    """Hex sha256 of a file's contents, read `chunk` bytes at a time so a multi-GB checkpoint is never
    held in memory: the integrity check of checkpoints and downloads."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

def read_jsonl(path, check=None, expected="a valid row"):
    """List of the JSON objects in a .jsonl or gzipped (by name or content) .jsonl.gz file, each passing
    check(row) when given: a false result means the row is not `expected`, a ValueError says what is wrong.
    Every problem (bad JSON, nesting too deep, bad UTF-8, a broken gzip stream) is a ValueError naming the
    file and line."""
    rows, lineno = [], 0
    with open(path, "rb") as f:
        gz = path.endswith(".gz") or f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if gz else open)(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError) as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({str(e)[:200] or type(e).__name__})") from None
                try:
                    ok = check is None or check(row)
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
                if not ok:
                    raise ValueError(f"{path}:{lineno}: expected {expected}")
                rows.append(row)
    except (UnicodeDecodeError, EOFError, OSError, zlib.error) as e:  # OSError: gzip.BadGzipFile
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}:{lineno + 1}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    return rows

def format_duration(seconds):
    """'1h02m03s', or '2m03s' under an hour."""
    h, rem = divmod(int(max(seconds, 0)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"

# -----------------------------------------------------------------------------
# Command-line helpers. Scripts use plain argparse with these so `--help` shows every default,
# `--flag=value` works, and unknown flags or bad values are errors that name the flag.

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _format_action_invocation(self, action):
        if isinstance(action, BoolFlag):  # "--resume[=true|false], --no-resume"
            return ", ".join(o if o in action.negated else f"{o}[={action.metavar}]" for o in action.option_strings)
        return super()._format_action_invocation(action)

def str2bool(value):
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")

def auto_bool(value):
    """A three-way switch: 'auto' or a boolean, as the strings 'auto', 'true', 'false'."""
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return "true" if str2bool(value) else "false"
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {value!r}")

class BoolFlag(argparse.Action):
    """A boolean flag as people type it: `--flag` (on), `--no-flag` (off) and `--flag=VALUE`, VALUE any
    of true/false/yes/no/on/off/1/0 (or 'auto' for `type=auto_bool` switches)."""

    def __init__(self, option_strings, dest, type=str2bool, **kwargs):
        negated = ["--no-" + o[2:] for o in option_strings if o.startswith("--")]
        kwargs.setdefault("metavar", "auto|true|false" if type is auto_bool else "true|false")
        super().__init__(list(option_strings) + negated, dest, nargs="?", type=type, **kwargs)
        self.negated = set(negated)

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string in self.negated:
            if value is not None:
                parser.error(f"argument {option_string}: takes no value (write {option_string.replace('--no-', '--', 1)}=VALUE)")
            value = self.type("false")
        elif value is None:
            value = self.type("true")
        setattr(namespace, self.dest, value)

def _store_or_bool_flag(type=None, **kwargs):
    """The parser's default action: argparse's own, but a BoolFlag for type=str2bool or auto_bool."""
    return (BoolFlag if type in (str2bool, auto_bool) else argparse._StoreAction)(type=type, **kwargs)

class ArgumentParser(argparse.ArgumentParser):
    """Every default shown in --help, no abbreviated flags, boolean flags as BoolFlag; its argument groups
    share its action registry, and its subparsers are of this class too."""

    def __init__(self, *args, formatter_class=HelpFormatter, allow_abbrev=False, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, allow_abbrev=allow_abbrev, **kwargs)
        self.register("action", None, _store_or_bool_flag)

def make_parser(description):
    return ArgumentParser(description=description)

def number_type(cast, ok, expected, name):
    """An argparse type: `cast` the text, and accept it when ok(x); otherwise 'expected <expected>, got ...'."""
    def parse(value):
        try:
            x = cast(value)
        except ValueError:
            x = None
        if x is None or not ok(x):  # the comparisons below are False for nan
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        return x
    parse.__name__ = parse.__qualname__ = name
    return parse

positive_int = number_type(int, lambda n: n > 0, "a positive integer", "positive_int")
non_negative_int = number_type(int, lambda n: n >= 0, "an integer >= 0", "non_negative_int")
positive_float = number_type(float, lambda x: 0 < x < float("inf"), "a finite number > 0", "positive_float")
non_negative_float = number_type(float, lambda x: 0 <= x < float("inf"), "a finite number >= 0", "non_negative_float")

# -----------------------------------------------------------------------------
# Peak throughput, for MFU. GPUs: dense bf16 tensor-core FLOP/s from vendor datasheets (no sparsity).
# CPUs have no datasheet figure we can trust, so we measure a large matmul in the compute dtype.

GPU_PEAK_BF16_FLOPS = (  # (substring of torch.cuda.get_device_name(), FLOP/s); first match wins
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200", 989e12), ("GH200", 989e12),
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 125e12), ("A10", 125e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12),
)

def gpu_peak_flops(device_name):
    """Datasheet dense bf16 FLOP/s for a GPU name, or None when unknown."""
    return next((flops for key, flops in GPU_PEAK_BF16_FLOPS if key.lower() in device_name.lower()), None)

@functools.lru_cache(maxsize=None)
def measure_matmul_flops(device_type="cpu", dtype=torch.bfloat16, n=1024, reps=5):
    """Best-of-reps dense matmul FLOP/s on this device: the practical ceiling to quote MFU against."""
    a, b = torch.randn(2, n, n, dtype=dtype, device=device_type)
    a @ b  # warm up the kernel selection
    synchronize(device_type)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        synchronize(device_type)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best

def get_peak_flops(device_type, dtype):
    """The denominator of MFU: datasheet bf16 peak for known GPUs, a measured matmul rate otherwise."""
    if device_type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name()) or measure_matmul_flops("cuda", dtype, n=8192)
    return measure_matmul_flops(device_type, dtype)
