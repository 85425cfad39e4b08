"""
Serving benchmark: the real chat server (scripts.chat_web's app over nanochat.workers, served by uvicorn on
127.0.0.1 in this process) driven by concurrent streaming clients, at --max-batch N against its peer, the same
server at --max-batch=1 (one request decoded at a time, the server before continuous batching), in the same run.

Model: a randomly initialised GPT (default depth 4, width 256, 4 heads, context 256: the size of runs/runcpu.sh's
model) whose vocabulary is the tokenizer's: --tokenizer-dir, else one trained here on the fixture text
(tests/fixtures/text, --vocab-size). Or a trained checkpoint: -i/-g/-s/--checkpoint-dir (its own tokenizer).

Load: at each concurrency C of --concurrency, C clients each send up to --requests-per-client streaming
/v1/chat/completions requests one after another (closed loop) and start none after --time-limit seconds.
Prompts are held-out conversations (--data, default tests/fixtures/chat): each user turn with the conversation
before it, as a client would send it, assistant tool calls as text; client i sends prompts i, i + C, ...
Request j of client i has seed 1000 i + j and the same temperature and max_tokens on every server, so all
servers get the same work and, in fp32, generate the same replies. End of reply is not suppressed: the tokens
counted are those each reply generated (usage.completion_tokens); a random model at temperature 1 ends a reply
about once in vocab-size steps, so nearly every reply is max_tokens long (the mean is in the table).

Per server and concurrency (timed --rounds times, the servers taking turns), over its requests:
    tokens/s   the replies' tokens / wall time from the first request sent to the last reply finished (the
               median of the rounds)
    TTFT       request sent -> first non-empty content chunk (prefill and any queueing included)
    TPOT       (finish chunk - first content chunk) / (completion tokens - 1), per request
    server TTFT  the server's own part of TTFT: its replica got the job -> the job's first token sampled
               (without the HTTP request, the event loop's delivery of the token and the client's reading)
Client i's first request waits i / C of a lone request's duration (--stagger), so the clients do not arrive in
lockstep; the ramp and the tail count in the wall time (a conservative tokens/s for the batched server).
p50 / p95 by linear interpolation. Issue 17's targets (2-core CPU, tiny model): at 8 streams tokens/s >= 4x
the --max-batch=1 server's, and TTFT p95 <= 2x a lone request's TTFT p95 (1 stream, same server: tail against
tail, so that a host's own jitter, which a lone request's p95 already shows, is not counted as queueing); the
ratio to a lone request's median TTFT, a stricter figure, is printed beside it.
The sweep times --sweep max-batch values at --sweep-concurrency streams, to choose chat_web's default. The
clients run in a process of their own (--client-process), as they would on other machines, but they share the
CPU cores with the server: their per-chunk cost is the same for every server.

    python -m bench.serve                                   # CPU: 1,4,8,16,32 streams, max-batch 8 vs 1, sweep 4,8,16
    python -m bench.serve --concurrency=8 --sweep=          # just the target point
    python -m bench.serve -i sft --max-tokens=128           # a trained chat model instead of random weights
    python -m bench.serve --device-type=cuda --depth=20 --n-embd=1280 --n-head=10 --seq-len=2048 \\
        --tokenizer-dir=$NANOCHAT_BASE_DIR/tokenizer --max-tokens=256 --max-batch=32 --concurrency=1,8,32 \\
        --sweep=16,32,64 --sweep-concurrency=32            # a d20-sized model on a GPU
"""
import asyncio
import glob
import json
import logging
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, redirect_stdout
from functools import partial

import torch

from nanochat.common import make_parser, non_negative_int, positive_float, positive_int, str2bool
from nanochat.conversation import content_text, validate_conversation
from nanochat.serve import serve_in_thread
from scripts._cli import add_model_source_flags, device_type_or_exit, load_model_or_exit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_CHAT = os.path.join(REPO_ROOT, "tests", "fixtures", "chat")
FIXTURE_TEXT = os.path.join(REPO_ROOT, "tests", "fixtures", "text")
TARGET_STREAMS, TARGET_SPEEDUP, TARGET_TTFT = 8, 4.0, 2.0  # issue 17

_OUT = [None]  # where log() writes: the stdout of main()'s caller (the servers' request lines go nowhere)


def log(*a):
    print(*a, file=_OUT[0], flush=True)

# -----------------------------------------------------------------------------
# Model, tokenizer, prompts


def get_tokenizer(args, parser):
    from nanochat.tokenizer import Tokenizer
    if args.tokenizer_dir:
        try:
            return Tokenizer.from_directory(args.tokenizer_dir)
        except (OSError, ValueError) as e:
            parser.error(f"--tokenizer-dir {args.tokenizer_dir}: not a saved tokenizer ({e})")
    from nanochat.dataset import iter_documents
    tok = Tokenizer.train_from_iterator(iter_documents(FIXTURE_TEXT, split="train", infinite=False), args.vocab_size)
    if tok.get_vocab_size() != args.vocab_size:
        parser.error(f"--vocab-size {args.vocab_size}: the fixture text supports {tok.get_vocab_size()}; "
                     "give a smaller one or --tokenizer-dir")
    return tok


def load_model(args, parser, device):
    """(model, tokenizer, model id): a checkpoint when a model-source flag is given, else random weights."""
    if any(getattr(args, k) is not None for k in ("source", "model_tag", "step", "checkpoint_dir")):
        args.source = args.source or "sft"
        model, tokenizer, ckpt_dir, step = load_model_or_exit("bench.serve", args, device)
        return model.eval(), tokenizer, f"{os.path.basename(ckpt_dir)}-step{step}"
    from bench.inference import build_ours
    from nanochat.gpt import GPTConfig
    tokenizer = get_tokenizer(args, parser)
    try:
        config = GPTConfig(sequence_len=args.seq_len, vocab_size=tokenizer.get_vocab_size(), n_layer=args.depth,
                           n_head=args.n_head, n_kv_head=args.n_kv_head or args.n_head, n_embd=args.n_embd).validate()
    except ValueError as e:
        parser.error(str(e))
    return build_ours(config, device, torch.float32), tokenizer, f"random-d{args.depth}-w{args.n_embd}"


def data_files(spec, parser):
    """--data's files: each comma-separated part is a file, or a folder whose *.jsonl and *.jsonl.gz are taken."""
    files = []
    for part in filter(None, spec.split(",")):
        found = sorted(glob.glob(os.path.join(part, "*.jsonl")) + glob.glob(os.path.join(part, "*.jsonl.gz"))) \
            if os.path.isdir(part) else [part] if os.path.isfile(part) else None
        if not found:
            parser.error(f"--data {part}: " + ("no such file or folder" if found is None else "no .jsonl(.gz) file in it"))
        files += found
    if not files:
        parser.error("--data is empty: give conversation JSONL files or folders, comma-separated")
    return files


def load_prompts(files, tokenizer, room, parser):
    """Each user turn of each conversation with the messages before it, as OpenAI text messages, keeping those
    whose rendered prompt has at most `room` tokens (the context less max_tokens)."""
    from nanochat.common import read_jsonl
    prompts, too_long = [], 0
    for path in files:
        try:
            rows = read_jsonl(path, check=validate_conversation, expected="a conversation")
        except ValueError as e:
            parser.error(f"--data: {e}")
        for row in rows:
            messages = [{"role": m["role"], "content": content_text(m["content"])} for m in row["messages"]]
            for i, m in enumerate(messages):
                if m["role"] == "user":
                    prompt = messages[:i + 1]
                    if len(tokenizer.render_for_completion({"messages": prompt})) <= room:
                        prompts.append(prompt)
                    else:
                        too_long += 1
    if not prompts:
        parser.error(f"--data: no user turn fits the model's context less --max-tokens ({room} tokens)")
    return prompts, too_long

# -----------------------------------------------------------------------------
# Servers and clients


def make_app(model, tokenizer, model_id, max_batch, args, device):
    from nanochat.batching import BatchScheduler
    from nanochat.engine import Engine
    from nanochat.serve import ServeConfig
    from nanochat.workers import Worker, WorkerPool
    from scripts.chat_web import create_app
    most = max(args.concurrency + args.sweep_concurrency)
    config = ServeConfig(temperature=args.temperature, max_tokens=args.max_tokens, max_queue=most,
                         queue_timeout=3600.0, max_connections=max(128, 2 * most))
    make_scheduler = partial(BatchScheduler, Engine(model, tokenizer, compile=args.compile), max_batch)
    worker = Worker(make_scheduler, tokenizer, device, context_len=model.config.sequence_len)
    pool = WorkerPool([worker], config.max_queue)
    app = create_app(pool, config, f"nanochat-{model_id}")
    # the server's own view of each job's time to first token (its replica got it -> its first token sampled),
    # without the HTTP request, the event loop's delivery and the client: read and cleared after each round
    app.state.bench_ttft = []

    def record(job):
        if job.first_token_at is not None:
            app.state.bench_ttft.append(job.first_token_at - job.t0)
    pool.listeners.append(record)
    return app


async def one_request(client, messages, seed, args):
    """One streamed reply: {"ttft", "tpot", "tokens", "end", "seconds"} (end: perf_counter), or {"error"}."""
    body = {"messages": messages, "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = end = tokens = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": str(chunk["error"])[:200]}
            now = time.perf_counter()
            for choice in chunk.get("choices") or []:
                if first is None and choice.get("delta", {}).get("content"):
                    first = now
                if choice.get("finish_reason"):
                    end = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if end is None or tokens is None:
        return {"error": "the stream ended without a finish_reason and usage"}
    return {"tokens": tokens, "end": end, "seconds": end - t0, "ttft": None if first is None else first - t0,
            "tpot": (end - first) / (tokens - 1) if first is not None and tokens >= 2 else None}


async def drive(base, prompts, concurrency, args, requests_per_client, spread=0.0):
    """`concurrency` closed-loop clients, client i starting i / concurrency of `spread` seconds after the first;
    returns (the requests' results, wall seconds from the first request sent to the last reply finished)."""
    import httpx
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(600.0)) as client:
        start = time.perf_counter()

        async def client_loop(i):
            await asyncio.sleep(i * spread / concurrency)
            results = []
            for j in range(requests_per_client):
                if j and time.perf_counter() > start + args.time_limit:
                    break
                try:
                    results.append(await one_request(client, prompts[(i + j * concurrency) % len(prompts)],
                                                     1000 * i + j, args))
                except httpx.HTTPError as e:
                    results.append({"error": f"{type(e).__name__}: {e}"})
            return results

        results = [r for rs in await asyncio.gather(*(client_loop(i) for i in range(concurrency))) for r in rs]
    ends = [r["end"] for r in results if "end" in r]
    return results, (max(ends) if ends else time.perf_counter()) - start


def run_clients(*a):
    """drive() on a fresh event loop: in this process, or in the client process (--client-process)."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    return asyncio.run(drive(*a))


def client_process(pool, *a):
    try:
        return pool.submit(run_clients, *a).result()
    except BrokenProcessPool:
        raise SystemExit("bench.serve: the client process died; a script calling bench.serve.main() needs an "
                         "`if __name__ == '__main__':` guard (the clients' process is spawned), or --client-process=false")


def percentile(xs, q):
    """The q-th percentile (0-100) by linear interpolation between the closest ranks; nan when empty."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (k - lo)


def summarize(rounds):
    """One cell's figures from its rounds [(results, wall, server-side TTFTs)]: tokens/s the median of the rounds',
    the latency percentiles over all of its requests."""
    results = [r for rs, *_ in rounds for r in rs]
    server_ttft = [t for *_, ts in rounds for t in ts]
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    rates = [sum(r["tokens"] for r in rs if "error" not in r) / wall for rs, wall, _ in rounds if wall > 0]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    tpot = [r["tpot"] for r in ok if r["tpot"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return dict(requests=len(ok), errors=len(errors), first_error=errors[0] if errors else None, tokens=tokens,
                tokens_per_s=percentile(rates, 50), tokens_per_s_rounds=rates,
                mean_tokens=tokens / len(ok) if ok else float("nan"),
                ttft_p50=percentile(ttft, 50), ttft_p95=percentile(ttft, 95),
                server_ttft_p50=percentile(server_ttft, 50), server_ttft_p95=percentile(server_ttft, 95),
                tpot_p50=percentile(tpot, 50), tpot_p95=percentile(tpot, 95))

# -----------------------------------------------------------------------------


def int_list(text, flag, parser, allow_empty=False):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = None
    if values is None or any(v < 1 for v in values) or (not values and not allow_empty):
        parser.error(f"{flag} must be comma-separated positive integers, got {text!r}")
    return list(dict.fromkeys(values))


def get_parser():
    p = make_parser(__doc__)
    add_model_source_flags(p)
    p.set_defaults(source=None)  # no model-source flag: random weights
    g = p.add_argument_group("random model (when no checkpoint is named)")
    g.add_argument("--depth", type=positive_int, default=4)
    g.add_argument("--n-embd", type=positive_int, default=256)
    g.add_argument("--n-head", type=positive_int, default=4)
    g.add_argument("--n-kv-head", type=non_negative_int, default=0, help="0: n_head (MHA)")
    g.add_argument("--seq-len", type=positive_int, default=256, help="the model's context")
    g.add_argument("--vocab-size", type=positive_int, default=4096, help="of the tokenizer trained on the fixture text")
    g.add_argument("--tokenizer-dir", default="", help="a saved tokenizer instead (its vocabulary is the model's)")
    g = p.add_argument_group("load")
    g.add_argument("--data", default=FIXTURE_CHAT, help="conversation JSONL(.gz) files or folders, comma-separated")
    g.add_argument("--concurrency", default="1,4,8,16,32", help="concurrent streaming clients, comma-separated")
    g.add_argument("--max-batch", type=positive_int, default=None,
                   help="the batched server's --max-batch (default: scripts.chat_web's default)")
    g.add_argument("--sweep", default="4,8,16", help="more --max-batch values to time ('' = none)")
    g.add_argument("--sweep-concurrency", default="8,16", help="streams the sweep is timed at")
    g.add_argument("--requests-per-client", type=positive_int, default=8, help="per round")
    g.add_argument("--rounds", type=positive_int, default=3,
                   help="each server and concurrency is timed this many times, round robin; tokens/s is the median")
    g.add_argument("--stagger", type=str2bool, default=True,
                   help="spread the clients' first requests over a lone request's duration (else all at once)")
    g.add_argument("--time-limit", type=positive_float, default=60.0,
                   help="seconds per round after which clients start no new request")
    g.add_argument("--max-tokens", type=positive_int, default=64, help="max_tokens of every request")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--client-process", type=str2bool, default=True,
                   help="run the clients in a process of their own (else in the server's, sharing its GIL)")
    g.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads (0: torch's default)")
    return p


def main(argv=None):
    _OUT[0] = sys.stdout
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    parser = get_parser()
    args = parser.parse_args(argv)
    from scripts.chat_web import get_parser as chat_web_parser
    default_batch = chat_web_parser().get_default("max_batch")
    args.max_batch = args.max_batch or default_batch
    args.concurrency = int_list(args.concurrency, "--concurrency", parser)
    args.sweep = int_list(args.sweep, "--sweep", parser, allow_empty=True)
    args.sweep_concurrency = int_list(args.sweep_concurrency, "--sweep-concurrency", parser) if args.sweep else []
    if not 0 <= args.temperature <= 2:
        parser.error(f"--temperature must be in [0, 2], got {args.temperature}")
    files = data_files(args.data, parser)
    device = torch.device(device_type_or_exit(parser, args))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, model_id = load_model(args, parser, device)
    c = model.config
    if args.max_tokens >= c.sequence_len:
        parser.error(f"--max-tokens {args.max_tokens} leaves no room for a prompt in the model's {c.sequence_len}-token context")
    prompts, too_long = load_prompts(files, tokenizer, c.sequence_len - args.max_tokens, parser)
    from nanochat.common import get_compute_dtype
    load = "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    log(f"device {device}, {torch.get_num_threads()} threads, compute {str(get_compute_dtype(device.type))[6:]}, "
        f"torch {torch.__version__}, load average {load}")
    log(f"model {model_id}: depth {c.n_layer}, width {c.n_embd}, {c.n_head} heads, {c.n_kv_head} kv heads, "
        f"vocab {c.vocab_size}, context {c.sequence_len}")
    log(f"prompts: {len(prompts)} user turns from {', '.join(os.path.relpath(f) for f in files)} ({too_long} longer "
        f"than {c.sequence_len - args.max_tokens} tokens left out); max_tokens {args.max_tokens}, temperature "
        f"{args.temperature}, {args.requests_per_client} requests per client, time limit {args.time_limit:g}s, "
        f"{args.rounds} round(s), clients {'in a process of their own' if args.client_process else 'in this process'}")
    start = time.perf_counter()
    results, spread = measure(model, tokenizer, model_id, prompts, args, device)
    log(f"clients start spread over {spread * 1000:.0f} ms (a lone request's median duration)" if spread else
        "clients start together (--stagger=false)")
    report(results, args)
    log(f"total {time.perf_counter() - start:.1f}s")
    return dict(model=model_id, max_batch=args.max_batch, default_max_batch=default_batch, stagger_s=spread,
                cells=[dict(max_batch=b, concurrency=n, **r) for (b, n), r in sorted(results.items())],
                recommended_max_batch=recommend(results, args))


def measure(model, tokenizer, model_id, prompts, args, device):
    """{(max_batch, streams): summary} for the main table's and the sweep's cells, and the start spread."""
    cells = {(b, n) for b in (args.max_batch, 1) for n in args.concurrency}
    cells |= {(b, n) for b in args.sweep for n in args.sweep_concurrency}
    batches = sorted({b for b, _ in cells}, reverse=True)  # one live server each, all up for the whole run
    results = {}
    # the servers print a line per request (nanochat.workers.RequestLog): sent nowhere, as they would be to a log file
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull), ExitStack() as stack:
        apps = {b: make_app(model, tokenizer, model_id, b, args, device) for b in batches}
        bases = {b: stack.enter_context(serve_in_thread(app)) for b, app in apps.items()}
        if args.client_process:  # spawned: a fork would copy torch's thread state
            pool = stack.enter_context(ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")))
            clients = partial(client_process, pool)
        else:
            clients = run_clients
        lone = []
        for b, base in bases.items():  # warm-up: first forwards, connections, the cache grown to the batch
            lone += clients(base, prompts, 1, args, 2)[0]
            clients(base, prompts, min(b, max(args.concurrency)), args, 1)
        failed = [r["error"] for r in lone if "error" in r]
        if failed:
            raise SystemExit(f"bench.serve: the server refused or failed a lone request: {failed[0]}")
        spread = percentile([r["seconds"] for r in lone], 50) if args.stagger else 0.0
        rounds = {cell: [] for cell in cells}
        for n in sorted({n for _, n in cells}):  # the servers take turns at each concurrency, round robin
            for r in range(args.rounds):
                for b in batches[r % len(batches):] + batches[:r % len(batches)]:
                    if (b, n) in cells:
                        apps[b].state.bench_ttft.clear()
                        rs, wall = clients(bases[b], prompts, n, args, args.requests_per_client, spread)
                        rounds[b, n].append((rs, wall, list(apps[b].state.bench_ttft)))
                        errors = [x["error"] for x in rs if "error" in x]
                        tokens = sum(x["tokens"] for x in rs if "error" not in x)
                        log(f"round {r + 1}, max-batch {b:>3}, {n:>3} streams: {len(rs) - len(errors)} requests, {tokens} "
                            f"tokens in {wall:.1f}s, {tokens / wall:,.0f} tok/s"
                            + (f", {len(errors)} failed (first: {errors[0]})" if errors else ""))
    return {cell: summarize(rs) for cell, rs in rounds.items()}, spread


def ms(x):
    return "-" if math.isnan(x) else f"{1000 * x:,.0f}" if x >= 0.1 else f"{1000 * x:.1f}"


def p50_95(cell, name):
    return f"{ms(cell[name + '_p50'])} / {ms(cell[name + '_p95'])}"


def recommend(results, args):
    """The smallest --sweep value whose tokens/s is within 5% of the best at every --sweep-concurrency."""
    if not args.sweep:
        return None
    ok = [b for b in sorted(args.sweep)
          if all(results[b, n]["tokens_per_s"] >= 0.95 * max(results[x, n]["tokens_per_s"] for x in args.sweep)
                 for n in args.sweep_concurrency)]
    return ok[0] if ok else max(args.sweep, key=lambda b: sum(results[b, n]["tokens_per_s"] for n in args.sweep_concurrency))


def report(results, args):
    N = args.max_batch
    log("")
    log(f"| streams | tok/s (max-batch {N}) | tok/s (max-batch 1) | ratio | TTFT p50 / p95 ms ({N}) | TTFT p50 / p95 ms (1) "
        f"| TPOT p50 / p95 ms ({N}) | TPOT p50 / p95 ms (1) | requests ({N} / 1) | mean tokens ({N} / 1) "
        f"| server TTFT p50 / p95 ms ({N}) |")
    log("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.concurrency:
        a, p = results[N, n], results[1, n]
        log(f"| {n} | {a['tokens_per_s']:,.0f} | {p['tokens_per_s']:,.0f} | {a['tokens_per_s'] / p['tokens_per_s']:.2f}x "
            f"| {p50_95(a, 'ttft')} | {p50_95(p, 'ttft')} | {p50_95(a, 'tpot')} | {p50_95(p, 'tpot')} "
            f"| {a['requests']} / {p['requests']} | {a['mean_tokens']:.1f} / {p['mean_tokens']:.1f} "
            f"| {p50_95(a, 'server_ttft')} |")
    if {(N, TARGET_STREAMS), (1, TARGET_STREAMS), (N, 1)} <= results.keys():
        a, lone = results[N, TARGET_STREAMS], results[N, 1]
        speedup = a["tokens_per_s"] / results[1, TARGET_STREAMS]["tokens_per_s"]
        ttft = a["ttft_p95"] / lone["ttft_p95"]
        log(f"\ntargets at {TARGET_STREAMS} streams, max-batch {N}: tokens/s {speedup:.2f}x the max-batch 1 server's "
            f"(target >= {TARGET_SPEEDUP:g}x: {'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}); TTFT p95 "
            f"{ms(a['ttft_p95'])} ms = {ttft:.2f}x a lone request's p95 ({ms(lone['ttft_p95'])} ms at 1 stream; "
            f"target <= {TARGET_TTFT:g}x: {'met' if ttft <= TARGET_TTFT else 'NOT met'}); "
            f"{a['ttft_p95'] / lone['ttft_p50']:.2f}x a lone request's median ({ms(lone['ttft_p50'])} ms)")
    if args.sweep:
        log("\n| max-batch | streams | tok/s | vs max-batch 1 | TTFT p50 / p95 ms | TPOT p50 / p95 ms |")
        log("|---:|---:|---:|---:|---:|---:|")
        for n in args.sweep_concurrency:
            for b in sorted(args.sweep):
                r = results[b, n]
                peer = f"{r['tokens_per_s'] / results[1, n]['tokens_per_s']:.2f}x" if (1, n) in results else "-"
                log(f"| {b} | {n} | {r['tokens_per_s']:,.0f} | {peer} | {p50_95(r, 'ttft')} | {p50_95(r, 'tpot')} |")
        log(f"recommended --max-batch: {recommend(results, args)} (the smallest of {sorted(args.sweep)} within 5% of the "
            f"best tokens/s at {', '.join(map(str, args.sweep_concurrency))} streams)")


if __name__ == "__main__":
    main()
