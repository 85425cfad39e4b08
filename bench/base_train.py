"""
End-to-end training throughput: the real `scripts/base_train.py` (data loading, compile, logging,
final evaluation and checkpoint included) against the bare training step of the same model, so the
cost outside the model is visible (target: steady-state overhead under 5%).

Each round runs, one after the other (so a burst of load from other processes hits both alike):
  script  `python -m scripts.base_train` as a subprocess, as a user would for a throughput run:
          real text, evaluation only at the end (one batch), no samples, no CORE, checkpoint at the
          end; its per-step times come from its JSONL log (the script's own timer) and from the
          arrival of its console lines here (everything, logging included). A two-line wrapper
          stamps the end of the imports and of the tokenizer load.
  bare    the same model config, dtype, compile setting, optimizers (Muon + AdamW), batch,
          accumulation and gradient clipping on fixed random tokens, in a fresh process of its own
          that lives through the rounds: no data loader, no LR schedule, no logging. Started (and
          compiled, and warmed up) after the first script run, so it can use the batch size the
          script chose with --device-batch-size=auto.
Steady state = the steps after the first --skip of each script run (compilation, first data).

    python -m bench.base_train                          # CPU: depth 4, seq 512, batch 8 x 2 accumulation, eager and compiled
    python -m bench.base_train --compile=false --rounds=1 --steps=10   # quicker
    python -m bench.base_train --gpu                    # depth 20, seq 2048, vocab 65536, bf16, compiled, MFU
    python -m bench.base_train --gpu --dry-run          # check the flags and print the plan, run nothing

The script runs in a temporary NANOCHAT_BASE_DIR (deleted at the end) holding a tokenizer trained
here on the training text (or copied from --tokenizer-dir). Without ../shared/data and without
--data, a synthetic corpus of random words is written there instead, with a warning.
"""
import contextlib
import functools
import gzip
import io
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from bench.train_step import PEAK_H100_BF16, build_ours
from nanochat.common import (autocast_context, get_compute_dtype, get_peak_flops, make_parser, non_negative_int,
                             positive_int, str2bool, synchronize)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = (os.environ.get("NANOCHAT_DATA_DIR") or os.environ.get("NANOCHAT_SHARED_DATA")
          or os.path.join(os.path.dirname(REPO_ROOT), "shared", "data"))
MIX = (("wikipedia", 0.45), ("books", 0.40), ("reddit", 0.15))
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Runs the script exactly as `python -m scripts.base_train FLAGS` would, plus time stamps (end of the
# imports, of the tokenizer load, of main) and the process's page faults and system time after each step.
WRAPPER = """\
import resource, sys, time
import scripts.base_train as bt
import nanochat.dataloader, nanochat.gpt, nanochat.loss_eval, nanochat.tokenizer as tk
print(f"[bench] imports {time.time():.6f}", flush=True)
_get, _log = tk.get_tokenizer, bt.StepLogger.log
def get_tokenizer():
    t = _get()
    print(f"[bench] tokenizer {time.time():.6f}", flush=True)
    return t
def log(self, record, line=None):
    _log(self, record, line)
    if "dt" in record:
        r = resource.getrusage(resource.RUSAGE_SELF)
        print(f"[bench] rusage {record['step']} {r.ru_minflt} {r.ru_stime:.6f}", flush=True)
tk.get_tokenizer, bt.StepLogger.log = get_tokenizer, log
bt.main(sys.argv[1:])
print(f"[bench] done {time.time():.6f}", flush=True)
"""
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \|")
RUSAGE_LINE = re.compile(r"^\[bench\] rusage (\d+) (\d+) ([0-9.]+)$")
VAL_LINE = re.compile(r"^step (\d+) \| validation bpb")
MARK_LINE = re.compile(r"^\[bench\] (\w+) ([0-9.]+)$")


def log(s=""):
    print(s, flush=True)


def load_average():
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"

# -----------------------------------------------------------------------------
# Data and tokenizer for the script's temporary base directory


def shared_spec():
    """The users' English mix under ../shared/data/pretrain, or None when it is not there."""
    paths = [(os.path.join(SHARED, "pretrain", name), w) for name, w in MIX]
    if not all(os.path.isdir(p) for p, _ in paths):
        return None
    return ",".join(f"{p}:{w}" for p, w in paths)


def write_synthetic_corpus(directory, chars, seed=0):
    """Documents of Zipf-distributed random words (train shard + val shard, jsonl.gz): stands in for
    real text where ../shared/data is missing (e.g. a GPU machine). Tokenizes faster than English, so
    the loader's share of a step is, if anything, understated."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    lengths = rng.integers(1, 12, size=200_000)
    words = ["".join(rng.choice(letters, n)) for n in lengths]
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    os.makedirs(directory, exist_ok=True)
    for name, n_chars in (("shard_00000.jsonl.gz", chars), ("val_00000.jsonl.gz", max(chars // 50, 100_000))):
        with gzip.open(os.path.join(directory, name), "wt", encoding="utf-8") as f:
            written = 0
            while written < n_chars:
                text = " ".join(words[i] for i in rng.choice(len(words), 800, p=weights)) + "."
                f.write(json.dumps({"text": text}) + "\n")
                written += len(text)
    return directory


def prepare_tokenizer(base_dir, spec, vocab_size, tokenizer_dir, max_chars):
    """Put a tokenizer into base_dir/tokenizer (copied, or trained on `spec`'s training split)."""
    from nanochat.dataset import iter_documents
    from nanochat.tokenizer import Tokenizer
    from scripts.tok_train import training_texts
    target = os.path.join(base_dir, "tokenizer")
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, target)
        return Tokenizer.from_directory(target)
    t0 = time.perf_counter()
    texts = training_texts(iter_documents(spec, split="train", infinite=False), max_chars=max_chars, doc_cap=10_000)
    tok = Tokenizer.train_from_iterator(texts, vocab_size)
    tok.save(target)
    log(f"tokenizer: vocab {tok.get_vocab_size():,} trained on {tok.train_stats['chars']:,} characters in "
        f"{time.perf_counter() - t0:.1f}s")
    return tok

# -----------------------------------------------------------------------------
# The script, as a subprocess


def script_flags(opts, compile_flag, model_tag):
    flags = [f"--device-type={opts.device}", f"--data={opts.data}", f"--depth={opts.depth}", f"--head-dim={opts.head_dim}",
             f"--max-seq-len={opts.seq_len}", f"--device-batch-size={opts.device_batch_size}",
             f"--total-batch-size={opts.total_batch_size}", f"--num-iterations={opts.steps}",
             f"--compile={compile_flag}", "--eval-every=-1", "--core-metric-every=-1", "--sample-every=-1",
             "--save-every=-1", f"--model-tag={model_tag}"]
    # one validation batch at the end: the smallest evaluation the script allows
    B = opts.device_batch_size if opts.device_batch_size != "auto" else 1
    return flags + [f"--eval-tokens={B * opts.seq_len}"]


def run_script(flags, env, timeout):
    """Run the wrapped script; returns the time stamps of its events (this process's clock, which is the
    child's wall clock too), its step records from the JSONL log and the device batch it used."""
    cmd = [sys.executable, "-c", WRAPPER, *flags]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    ev = {"launch": t0, "step_arrivals": {}, "rusage": {}}
    tail = []
    for line in proc.stdout:
        now = time.time()
        line = line.rstrip("\n")
        tail = (tail + [line])[-40:]
        if m := RUSAGE_LINE.match(line):
            ev["rusage"][int(m.group(1))] = (int(m.group(2)), float(m.group(3)))
        elif m := MARK_LINE.match(line):
            ev[m.group(1)] = float(m.group(2))
        elif m := STEP_LINE.match(line):
            ev["step_arrivals"][int(m.group(1))] = now
        elif VAL_LINE.match(line):
            ev["val"] = now
        elif line.startswith("model config:"):
            ev["config"] = now
        elif line.startswith("peak memory"):
            ev["peak"] = now
        elif line.startswith("batch: "):
            ev["batch_rows"] = int(line.split()[1])
    rc = proc.wait()
    ev["exit"] = time.time()
    watchdog.cancel()
    if time.time() - t0 >= timeout:
        raise SystemExit(f"the training script ran past --timeout={timeout}s; last output:\n" + "\n".join(tail))
    missing = [k for k in ("imports", "tokenizer", "config", "val", "peak", "done") if k not in ev]
    if rc != 0 or missing:
        raise SystemExit(f"the training script failed (exit {rc}, missing {missing}); command:\n  "
                         f"python -m scripts.base_train {' '.join(flags)}\nlast output:\n" + "\n".join(tail))
    return ev


def read_step_log(ckpt_dir):
    with open(os.path.join(ckpt_dir, "log.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r for r in records if "dt" in r}


def script_costs(ev, records, steps, skip):
    """Steady per-step times and the one-off costs of one script run (seconds)."""
    arr = ev["step_arrivals"]
    if sorted(arr) != list(range(1, steps + 1)) or sorted(records) != list(range(1, steps + 1)):
        raise SystemExit(f"expected steps 1..{steps} in the script's output and log, got {sorted(arr)} / {sorted(records)}")
    gaps = [arr[k] - arr[k - 1] for k in range(skip + 1, steps + 1)]
    dts = [records[k]["dt"] for k in range(skip + 1, steps + 1)]
    s = statistics.median(gaps)
    loop_start = arr[1] - records[1]["dt"]  # when step 1's timer started
    wall = ev["exit"] - ev["launch"]
    parts = {
        "process start + imports": ev["imports"] - ev["launch"],
        "device init + tokenizer load": ev["tokenizer"] - ev["imports"],
        "model build + init": ev["config"] - ev["tokenizer"],
        "setup: compile wrap, optimizers, loaders, logger, peak FLOPs": loop_start - ev["config"],
        f"first {skip} step(s) beyond steady (compile, first data, warm-up)": (arr[skip] - loop_start) - skip * s,
        "final validation (1 batch)": ev["val"] - arr[steps],
        "final checkpoint": ev["peak"] - ev["val"],
        "report + exit": ev["exit"] - ev["peak"],
    }
    (f0, s0), (f1, s1) = ev["rusage"][skip], ev["rusage"][steps]
    one_off = wall - steps * s
    parts["rest (jitter of the steady steps)"] = one_off - sum(parts.values())
    return dict(gaps=gaps, dts=dts, step=s, wall=wall, one_off=one_off, parts=parts,
                faults=(f1 - f0) / (steps - skip), sys_time=(s1 - s0) / (steps - skip))

# -----------------------------------------------------------------------------
# The bare step, in a process of its own


def make_bare_step(config, args, B, device, dtype, compiled):
    """(step, optimizers): step() runs one optimizer step of the script's model work on fixed random
    tokens and returns its time: `accum` forward+backward micro-steps, gradient clipping, Muon + AdamW,
    through the same nanochat.training functions the script calls."""
    from nanochat.training import accumulate_gradients, grad_accum_steps, optimizer_step
    model = build_ours(config, device)
    run = torch.compile(model, dynamic=False) if compiled else model
    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    accum = grad_accum_steps(args.total_batch_size, B, config.sequence_len, 1)
    g = torch.Generator().manual_seed(0)
    batches = [tuple(torch.randint(0, config.vocab_size, (B, config.sequence_len), generator=g).to(device) for _ in "xy")
               for _ in range(accum)]
    autocast = functools.partial(autocast_context, device.type, dtype)

    def step():
        synchronize(device.type)
        t0 = time.perf_counter()
        loss = accumulate_gradients(run, batches, autocast, per_token=False)
        optimizer_step(model, optimizers, grad_clip=args.grad_clip)
        loss.item()  # the script's sync point
        return time.perf_counter() - t0
    return step, optimizers


def loop_pieces(tokenizer, args, B, T, accum, optimizers, device, work, min_tokens=4_000_000):
    """Seconds per optimizer step of each piece of the script's loop that is not model work, timed alone
    here: {piece: (mean, max)} plus the loaders' first batch. The loaders are the script's (one per
    accumulation slot); their cost comes in bursts (a tokenizer batch is up to 128 documents or 4M
    characters), so they run for at least `min_tokens` tokens and the mean is the amortized cost."""
    from nanochat.dataloader import DataLoader
    from nanochat.training import StepLogger, StepStats, lr_multiplier, muon_momentum, set_learning_rates
    loaders = [DataLoader(tokenizer, B, T, spec=args.data, split="train", device=device, seed=args.seed, rank=a,
                          world_size=accum) for a in range(accum)]
    steps = min(max(20, math.ceil(min_tokens / (B * T * accum))), 2000)

    def timed_steps(fn):
        times = []
        for i in range(steps):
            synchronize(device.type)
            t0 = time.perf_counter()
            fn(i)
            synchronize(device.type)
            times.append(time.perf_counter() - t0)
        return statistics.mean(times), max(times)
    t0 = time.perf_counter()
    for loader in loaders:
        next(loader)
    first = time.perf_counter() - t0
    pieces = {f"data loader: {accum} x next() (mean of {steps} steps)": timed_steps(lambda i: [next(l) for l in loaders])}

    def set_lr(i):
        set_learning_rates(optimizers, lr_multiplier(i, steps, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac),
                           momentum=muon_momentum(i))
    pieces["LR + momentum setting"] = timed_steps(set_lr)
    logger = StepLogger(os.path.join(work, "pieces"), "dummy", {}, rank=0)

    stats = StepStats(steps, 0, device.type, per_step=args.total_batch_size, flops_per_unit=1e9, peak_flops=1e12)

    def log_step(i):  # the script's step stats, record and console line; the console goes to a buffer here
        stats.begin()
        with contextlib.redirect_stdout(io.StringIO()):
            logger.log(*stats.end(i + 1, 1.0, loss=5.0))
    pieces["logging: console line + JSONL append"] = timed_steps(log_step)
    return pieces, first


def bare_worker(conn, config, args, B, device, dtype, compiled, warmup, work):
    """The bare step in a process of its own, started fresh like the script's (the allocator's history
    changes how many pages each step faults in: see the process table). Answers requests on `conn`:
    ("steps", n) -> (times, page faults per step, system seconds per step); ("pieces",) -> loop_pieces;
    ("stop",) -> peak GPU memory. The first reply is the first step's time (compilation included)."""
    try:
        from nanochat.common import compute_init
        device = torch.device(device)
        compute_init(device.type)  # the script's process setup (seed, matmul precision, current device)
        step, optimizers = make_bare_step(config, args, B, device, dtype, compiled)
        first = step()
        for _ in range(warmup):
            step()
        conn.send(("ok", first))
        while True:
            request = conn.recv()
            if request[0] == "steps":
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                times = [step() for _ in range(request[1])]
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                n = len(times)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # leave the GPU's memory to the next script run
                conn.send(("ok", (times, (r1.ru_minflt - r0.ru_minflt) / n, (r1.ru_stime - r0.ru_stime) / n)))
            elif request[0] == "pieces":
                from nanochat.tokenizer import get_tokenizer
                accum = args.total_batch_size // (B * config.sequence_len)
                conn.send(("ok", loop_pieces(get_tokenizer(), args, B, config.sequence_len, accum, optimizers, device, work)))
            else:
                conn.send(("ok", torch.cuda.max_memory_allocated() if device.type == "cuda" else None))
                return
    except BaseException:
        import traceback
        conn.send(("error", traceback.format_exc()))


def ask(conn, *request):
    try:
        if request:
            conn.send(request)
        status, payload = conn.recv()
    except (EOFError, OSError):
        raise SystemExit("the bare-step process died (out of memory?)")
    if status != "ok":
        raise SystemExit(f"the bare-step process failed:\n{payload}")
    return payload

# -----------------------------------------------------------------------------


def parse_args(argv):
    p = make_parser(__doc__)
    p.add_argument("--gpu", action="store_true", help="preset: cuda, depth 20, seq 2048, vocab 65536, bf16, compiled, "
                   "batch 16 x 2 accumulation, 30 steps x 2 rounds, MFU vs 989 TFLOP/s")
    p.add_argument("--depth", type=positive_int, default=4)
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--seq-len", type=positive_int, default=512)
    p.add_argument("--vocab-size", type=positive_int, default=4096,
                   help="tokenizer trained for the run (ignored with --tokenizer-dir)")
    p.add_argument("--device-batch-size", default="8",
                   help="rows per forward pass, or 'auto' (the script probes; the bare step uses its choice)")
    p.add_argument("--accum", type=positive_int, default=2, help="accumulation steps: total batch = batch x seq x accum")
    p.add_argument("--steps", type=positive_int, default=10, help="optimizer steps per script run (and per bare round)")
    p.add_argument("--skip", type=non_negative_int, default=2, help="first steps of each script run left out of the steady state")
    p.add_argument("--rounds", type=positive_int, default=4, help="script run + bare steps, alternated")
    p.add_argument("--compile", default="false,true", help="comma list of false, true: torch.compile the model (both sides)")
    p.add_argument("--dtype", default="", choices=["", "fp32", "bf16"],
                   help="'' = the project's policy (nanochat.common.get_compute_dtype)")
    p.add_argument("--threads", type=non_negative_int, default=1,
                   help="torch threads on both sides (0 = torch's default); steadier on a shared machine")
    p.add_argument("--device", default="", choices=["", "cpu", "cuda"], help="'' = cuda if available")
    p.add_argument("--data", default="",
                   help="data spec for the script (default: ../shared/data/pretrain's English mix, else synthetic)")
    p.add_argument("--tokenizer-dir", default="", help="use this saved tokenizer instead of training one")
    p.add_argument("--tokenizer-chars", type=positive_int, default=3_000_000, help="characters the tokenizer trains on")
    p.add_argument("--timeout", type=positive_int, default=1200, help="seconds one script run may take")
    p.add_argument("--tuned-malloc", type=str2bool, default=True, help="both sides: compute_init's glibc setting "
                   "that keeps freed buffers (nanochat.common.keep_freed_memory); false = glibc's default, which "
                   "unmaps them and faults fresh pages in every step")
    p.add_argument("--dry-run", action="store_true", help="check the flags, print the plan, run nothing")
    opts = p.parse_args(argv)
    if opts.gpu:
        if not torch.cuda.is_available() and not opts.dry_run:
            p.error("argument --gpu: CUDA is not available (use --dry-run to check the plan)")
        opts.device, opts.depth, opts.head_dim, opts.seq_len, opts.vocab_size = "cuda", 20, 128, 2048, 65536
        opts.device_batch_size, opts.accum, opts.steps, opts.skip, opts.rounds = "16", 2, 30, 3, 2
        opts.compile, opts.dtype, opts.threads, opts.tokenizer_chars = "true", "bf16", 0, 20_000_000
    opts.device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if opts.device == "cuda" and not torch.cuda.is_available() and not opts.dry_run:
        p.error("argument --device: CUDA is not available")
    modes = [m.strip().lower() for m in opts.compile.split(",") if m.strip()]
    if not modes or any(m not in ("false", "true") for m in modes):
        p.error(f"argument --compile: expected a comma list of false, true; got {opts.compile!r}")
    opts.modes = list(dict.fromkeys(modes))
    if opts.device_batch_size != "auto":
        try:
            opts.device_batch_size = positive_int(opts.device_batch_size)
        except Exception:
            p.error(f"argument --device-batch-size: expected a positive integer or 'auto', got {opts.device_batch_size!r}")
    if opts.skip >= opts.steps:
        p.error(f"argument --skip: must be below --steps ({opts.steps}), got {opts.skip}")
    if opts.tokenizer_dir and not os.path.isfile(os.path.join(opts.tokenizer_dir, "meta.json")):
        p.error(f"argument --tokenizer-dir: no saved tokenizer (meta.json) in {opts.tokenizer_dir}")
    rows = 16 if opts.device_batch_size == "auto" else opts.device_batch_size
    opts.total_batch_size = rows * opts.seq_len * opts.accum
    return p, opts


def main(argv=None):
    parser, opts = parse_args(argv)
    from nanochat.checkpoint import checkpoints_root
    from nanochat.gpt import GPT
    from nanochat.recipe import config_from_flags
    from scripts import base_train

    if opts.dtype:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[opts.dtype]
    elif opts.device == "cuda" and not torch.cuda.is_available():  # a dry run
        dtype = torch.bfloat16
    else:
        dtype = get_compute_dtype(opts.device)
    work = tempfile.mkdtemp(prefix="nanochat-bench-base-train-")
    synthetic = False
    if not opts.data:
        opts.data = shared_spec() or os.path.join(work, "synthetic")
        synthetic = opts.data.endswith("synthetic")
    try:
        # the flags the script gets, checked by its own parser, and the config it will build
        tags = {m: f"bench_{'compiled' if m == 'true' else 'eager'}" for m in opts.modes}
        flags = {m: script_flags(opts, m, tags[m]) for m in opts.modes}
        for m, f in flags.items():
            try:
                script_args = base_train.get_args(f)
            except SystemExit:
                parser.error(f"the training script rejects the flags {' '.join(f)}")
        log(f"device {opts.device}, dtype {DTYPE_NAMES.get(dtype, dtype)}, torch {torch.__version__}, "
            f"threads {opts.threads or 'default'}, load average {load_average()}")
        for m, f in flags.items():
            log(f"script (compile={m}): python -m scripts.base_train {' '.join(f)}")
        if opts.dry_run:
            from nanochat.tokenizer import Tokenizer
            vocab = Tokenizer.from_directory(opts.tokenizer_dir).get_vocab_size() if opts.tokenizer_dir else opts.vocab_size
            with torch.device("meta"):
                model = GPT(config_from_flags(script_args, vocab))
            log(f"dry run: {opts.rounds} round(s) x {opts.steps} steps per compile mode; model {model.config}; "
                f"{model.estimate_flops():e} FLOPs/token; {opts.total_batch_size:,} tokens/step")
            return None

        if opts.threads:
            torch.set_num_threads(opts.threads)
        # the environment of the script and of the bare-step process (both inherit it)
        os.environ["NANOCHAT_BASE_DIR"] = os.path.join(work, "base")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(work, "inductor")  # the first compile is a cold one
        os.environ["NANOCHAT_DTYPE"] = DTYPE_NAMES[dtype]
        os.environ["PYTHONPATH"] = REPO_ROOT
        if opts.threads:
            os.environ["OMP_NUM_THREADS"] = str(opts.threads)
        if not opts.tuned_malloc:
            os.environ["NANOCHAT_TUNE_MALLOC"] = "0"
        if synthetic:
            log(f"WARNING: {SHARED}/pretrain is missing: the script reads a synthetic corpus of random words")
            write_synthetic_corpus(opts.data, max(opts.tokenizer_chars, 5_000_000))
        tok = prepare_tokenizer(os.environ["NANOCHAT_BASE_DIR"], opts.data, opts.vocab_size, opts.tokenizer_dir, opts.tokenizer_chars)
        device = torch.device(opts.device)
        peak = get_peak_flops(device.type, dtype)
        spawn = multiprocessing.get_context("spawn")

        results = {}
        for m in opts.modes:
            script_args = base_train.get_args(flags[m])
            ckpt_dir = os.path.join(checkpoints_root("base"), tags[m])
            config = config_from_flags(script_args, tok.get_vocab_size())
            with torch.device("meta"):
                flops_per_token = GPT(config).estimate_flops()
            runs, bare_times, bare_rusage, worker = [], [], [], None
            try:
                for r in range(opts.rounds):
                    log(f"[compile={m}] round {r + 1}/{opts.rounds}: script ({opts.steps} steps) ... load average {load_average()}")
                    ev = run_script(flags[m], dict(os.environ, PYTHONUNBUFFERED="1"), opts.timeout)
                    costs = script_costs(ev, read_step_log(ckpt_dir), opts.steps, opts.skip)
                    shutil.rmtree(ckpt_dir)  # a depth-20 checkpoint is gigabytes
                    runs.append(costs)
                    log(f"  script: wall {costs['wall']:.1f}s, steady step {costs['step']:.3f}s (line to line), "
                        f"{statistics.median(costs['dts']):.3f}s (its own timer); device batch {ev['batch_rows']}")
                    if worker is None:  # started after the first script run: it uses the batch the script chose
                        B = ev["batch_rows"]
                        conn, child = spawn.Pipe()
                        worker = spawn.Process(target=bare_worker, args=(child, config, script_args, B, opts.device, dtype,
                                                                           m == "true", max(opts.skip - 1, 0), work))
                        worker.start()
                        child.close()  # so that a dead worker reads as EOF here, not as a hang
                        log(f"  bare: first step (incl. compile) {ask(conn):.1f}s")
                    times, faults, sys_time = ask(conn, "steps", opts.steps)
                    bare_times.append(times)
                    bare_rusage.append((faults, sys_time))
                    log(f"  bare: median step {statistics.median(times):.3f}s")
                pieces, first = ask(conn, "pieces")
                bare_memory = ask(conn, "stop")
            finally:
                if worker is not None:
                    worker.join(timeout=60)
                    if worker.is_alive():
                        worker.kill()
            results[m] = dict(runs=runs, bare=[t for ts in bare_times for t in ts], bare_rounds=bare_times,
                              bare_rusage=bare_rusage, tokens=opts.total_batch_size, flops_per_token=flops_per_token,
                              pieces=pieces, loader_first=first, bare_memory=bare_memory)
        report(results, opts, peak, dtype, device, synthetic)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results, opts, peak, dtype, device, synthetic):
    tok_s = lambda tokens, t: tokens / t
    log(f"\nload average at the end {load_average()}; {opts.rounds} round(s) x {opts.steps} steps, first {opts.skip} of "
        f"each script run left out; data: {'SYNTHETIC (random words)' if synthetic else opts.data}")
    peak_name = f"{peak / 1e12:.1f} TFLOP/s ({'datasheet' if device.type == 'cuda' else 'measured matmul'})"
    log(f"\nSteady state (tokens/s; overhead = extra time per step vs the bare step; MFU vs {peak_name}):\n")
    log("| compile | stat | tokens/step | bare step tok/s | script tok/s (own timer) | script tok/s (line to line) | "
        "overhead (own timer) | overhead (line to line) | MFU bare | MFU script |")
    log("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, res in results.items():
        n = res["tokens"]
        gaps = [g for run in res["runs"] for g in run["gaps"]]
        dts = [d for run in res["runs"] for d in run["dts"]]
        for stat, f in (("median", statistics.median), ("best", min)):
            b, d, g = f(res["bare"]), f(dts), f(gaps)
            mfu = lambda t: 100 * n * res["flops_per_token"] / t / peak
            log(f"| {m} | {stat} | {n:,} | {tok_s(n, b):,.0f} | {tok_s(n, d):,.0f} | {tok_s(n, g):,.0f} | "
                f"{100 * (d / b - 1):+.1f}% | {100 * (g / b - 1):+.1f}% | {mfu(b):.1f}% | {mfu(g):.1f}% |")
    for m, res in results.items():  # each round's script run against the bare steps right after it
        per_round = [100 * (statistics.median(run["gaps"]) / statistics.median(bare) - 1)
                     for run, bare in zip(res["runs"], res["bare_rounds"])]
        log(f"compile={m}: overhead (line to line) round by round " + ", ".join(f"{x:+.1f}%" for x in per_round)
            + f"; median of the rounds {statistics.median(per_round):+.1f}%")
    if device.type == "cuda" and peak != PEAK_H100_BF16:
        log(f"(MFU vs {PEAK_H100_BF16 / 1e12:.0f} TFLOP/s: scale the MFU columns by {peak / PEAK_H100_BF16:.3f})")

    log("\nProcess costs per steady step, by round (minor page faults; system CPU time, which is not model work):\n")
    log("| compile | round | bare faults | script faults | bare system s | script system s |")
    log("|---|---:|---:|---:|---:|---:|")
    for m, res in results.items():
        for i, (run, (faults, sys_time)) in enumerate(zip(res["runs"], res["bare_rusage"])):
            log(f"| {m} | {i + 1} | {faults:,.0f} | {run['faults']:,.0f} | {sys_time:.3f} | {run['sys_time']:.3f} |")

    for m, res in results.items():
        b = statistics.median(res["bare"])
        log(f"\nScript loop pieces outside the model, compile={m}, timed alone in the bare-step process (per optimizer step; "
            f"% of the bare step's median {b:.3f}s):\n")
        log("| piece | mean (ms) | max (ms) | mean, % of step |")
        log("|---|---:|---:|---:|")
        for k, (mean, worst) in res["pieces"].items():
            log(f"| {k} | {1e3 * mean:.3f} | {1e3 * worst:.3f} | {100 * mean / b:.3f}% |")
        total = sum(mean for mean, _ in res["pieces"].values())
        log(f"| sum | {1e3 * total:.3f} | | {100 * total / b:.3f}% |")
        log(f"(the loaders' first batch, a one-off: {1e3 * res['loader_first']:.0f} ms)")

    for m, res in results.items():
        runs = res["runs"]
        log(f"\nOne-off costs of the script, compile={m} (seconds; round 1 compiles with a cold inductor cache):\n")
        log("| cost | " + " | ".join(f"round {i + 1}" for i in range(len(runs))) + " |")
        log("|---|" + "---:|" * len(runs))
        for k in runs[0]["parts"]:
            log(f"| {k} | " + " | ".join(f"{run['parts'][k]:.2f}" for run in runs) + " |")
        rows = [("one-off total", lambda run: f"{run['one_off']:.2f}"),
                ("steady step (line to line)", lambda run: f"{run['step']:.3f}"),
                ("total wall", lambda run: f"{run['wall']:.2f}"),
                ("one-off share of the wall", lambda run: f"{100 * run['one_off'] / run['wall']:.1f}%"),
                ("steps until one-offs < 5% of the wall", lambda run: f"{math.ceil(19 * run['one_off'] / run['step']):,}")]
        for name, fmt in rows:
            log(f"| {name} | " + " | ".join(fmt(run) for run in runs) + " |")
    if device.type == "cuda":
        mem = ", ".join(f"compile={m} {res['bare_memory'] / 2**30:.1f} GiB" for m, res in results.items())
        log(f"\nbare step peak GPU memory: {mem}; device {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main(sys.argv[1:])
