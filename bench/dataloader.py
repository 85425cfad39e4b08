"""
Data loader benchmark: can the tokenizing loader keep up with training?

Measures, in one run on this machine:
  loader   tokens/s of nanochat.dataloader.DataLoader (read + mix + tokenize + pack) on the first
           user's mix, per process, for each tokenizer thread count
  step     tokens/s a training step of the tiny CPU model consumes (forward, backward, optimizer)
and prints loader / step. Then it computes what one H100 training a depth-20 model consumes,
from the model's FLOPs per token at a stated MFU, and prints loader / that.

    python -m bench.dataloader                    # the run recorded in docs/benchmarks.md
    python -m bench.dataloader --tokens=300000    # quicker
On a GPU machine it also times real depth-20 training steps, next to the assumed-MFU figure.
"""
import os
import time

import torch

from nanochat.common import autocast_context, get_compute_dtype, make_parser, positive_int, str2bool, synchronize
from nanochat.dataloader import DataLoader
from nanochat.gpt import GPT, config_for_depth
from nanochat.tokenizer import PATTERNS, Tokenizer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("NANOCHAT_SHARED_DATA", os.path.join(os.path.dirname(REPO_ROOT), "shared", "data"))
PRETRAIN = os.path.join(SHARED, "pretrain")
DEFAULT_DATA = ",".join(f"{os.path.join(PRETRAIN, s)}:{w}" for s, w in (("wikipedia", 0.45), ("books", 0.40), ("reddit", 0.15)))
H100_BF16_PEAK = 989e12


def loader_rate(tokenizer, spec, B, T, threads, tokens, world_size=1):
    """Average tokens/s of rank 0 from construction on, over `tokens` tokens: many tokenizer batches
    (each up to 128 documents or 4M characters), so it is the sustained rate, not one buffered slice.
    With world_size > 1 the rank also reads (not tokenizes) the other ranks' documents."""
    t0 = time.perf_counter()
    loader = DataLoader(tokenizer, B, T, spec=spec, tokenizer_threads=threads, rank=0, world_size=world_size)
    n = max(1, tokens // (B * T))
    for _ in range(n):
        next(loader)
    return n * B * T / (time.perf_counter() - t0)


def train_step_rate(config, B, device, steps, warmup=2):
    """Tokens/s of full training steps (forward, backward, both optimizers) on random tokens."""
    device_type = torch.device(device).type
    dtype = get_compute_dtype(device_type)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    optimizers = model.setup_optimizers()
    x = torch.randint(0, config.vocab_size, (B, config.sequence_len), device=device)
    y = torch.randint(0, config.vocab_size, (B, config.sequence_len), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device_type)
            t0 = time.perf_counter()
        with autocast_context(device_type, dtype):
            loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    synchronize(device_type)
    return steps * B * config.sequence_len / (time.perf_counter() - t0), dtype


def flops_per_token(config):
    with torch.device("meta"):
        return GPT(config).estimate_flops()


def main(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--data", default=DEFAULT_DATA, help="data spec the loader reads")
    p.add_argument("--tokenizer", default=os.path.join(SHARED, "tokenizers", "tiktoken", "cl100k_base.tiktoken"),
                   help="tiktoken ranks file (GPT-4 pattern) standing in for a 65k trained vocab")
    p.add_argument("--small-vocab", type=int, default=4096, help="also time a tokenizer of this size trained here (0 = skip)")
    p.add_argument("--threads", default="1,2", help="tokenizer thread counts to time")
    p.add_argument("--world-sizes", default="1,8", help="ranks the data is shared between (rank 0 is timed)")
    p.add_argument("--tokens", type=positive_int, default=8_000_000, help="tokens timed per loader measurement")
    p.add_argument("--B", type=positive_int, default=8, help="rows per batch (loader and tiny model)")
    p.add_argument("--T", type=positive_int, default=512, help="sequence length (loader and tiny model)")
    p.add_argument("--cpu-depth", type=positive_int, default=4, help="depth of the tiny CPU model")
    p.add_argument("--steps", type=positive_int, default=5, help="timed training steps")
    p.add_argument("--mfu", type=float, default=0.40, help="assumed model FLOPs utilisation on the H100")
    p.add_argument("--gpu", type=str2bool, default=True, help="on CUDA, also time real depth-20 training steps")
    p.add_argument("--gpu-batch", type=positive_int, default=16, help="rows per step for the CUDA timing")
    p.add_argument("--compile", type=str2bool, default=True, help="torch.compile the CUDA model")
    args = p.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    world_sizes = [int(w) for w in args.world_sizes.split(",")]
    torch.manual_seed(0)

    # -- loader throughput
    big = Tokenizer.from_tiktoken_file(args.tokenizer, pattern=PATTERNS["gpt4"])
    tokenizers = [(f"{os.path.basename(args.tokenizer).split('.')[0]} ({big.get_vocab_size():,} vocab)", big)]
    if args.small_vocab:
        from nanochat.dataset import iter_documents
        def first_chars(it, n):
            for text in it:
                yield text[:n]
                n -= len(text)
                if n <= 0:
                    return
        small = Tokenizer.train_from_iterator(first_chars(iter_documents(args.data, infinite=False), 3_000_000), args.small_vocab)
        tokenizers.append((f"trained here ({small.get_vocab_size():,} vocab)", small))
    print(f"loader: B={args.B} T={args.T}, {args.tokens:,} tokens timed per row, data {args.data}")
    rates = {}
    for name, tok in tokenizers:
        for w in world_sizes:
            for t in threads:
                rates[(name, w, t)] = r = loader_rate(tok, args.data, args.B, args.T, t, args.tokens, w)
                print(f"  {name:<28} world size {w}, threads={t}: {r:>10,.0f} tokens/s per process")
    # the figure to compare with a GPU's need: the slowest world size, at its best thread count
    best_big = min(max(r for (n, w2, _), r in rates.items() if n == tokenizers[0][0] and w2 == w) for w in world_sizes)

    # -- the tiny CPU model's consumption
    vocab = args.small_vocab or 4096
    cpu_config = config_for_depth(args.cpu_depth, vocab, sequence_len=args.T)
    step_rate, dtype = train_step_rate(cpu_config, args.B, "cpu", args.steps)
    loader_small = max(r for (name, w, _), r in rates.items() if name == tokenizers[-1][0] and w == world_sizes[0])
    print(f"\ntiny CPU model (depth {args.cpu_depth}, vocab {vocab}, T={args.T}, B={args.B}, {dtype}): "
          f"{step_rate:,.0f} tokens/s per training step")
    print(f"  loader / step = {loader_small / step_rate:.1f}x  (loader with {tokenizers[-1][0]}, best thread count)")

    # -- what a depth-20 model on one H100 consumes
    print(f"\none H100 at {args.mfu:.0%} MFU of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s (bf16 dense):")
    variants = [("reference d20 (vocab 65536, T 2048)", config_for_depth(20, 65536, sequence_len=2048)),
                ("first user's d20 (tied, MLP 3x, kv heads /4, T 1024)",
                 config_for_depth(20, 65536, sequence_len=1024, tie_embeddings=True, mlp_ratio=3.0, n_kv_head=2))]
    for name, config in variants:
        fpt = flops_per_token(config)
        need = args.mfu * H100_BF16_PEAK / fpt
        print(f"  {name}: {fpt:.3e} FLOPs/token -> {need:,.0f} tokens/s per GPU; "
              f"loader ({tokenizers[0][0]}, world size {max(world_sizes)}) / need = {best_big / need:.1f}x")

    # -- and, on a GPU machine, the measured consumption of the same models
    if torch.cuda.is_available() and args.gpu:
        for name, config in variants:
            rate, dtype = measure_gpu(config, args.gpu_batch, args.compile)
            mfu = rate * flops_per_token(config) / H100_BF16_PEAK
            print(f"  measured on {torch.cuda.get_device_name()}, {name}, B={args.gpu_batch}, {dtype}, "
                  f"compile={args.compile}: {rate:,.0f} tokens/s ({mfu:.0%} of 989 TFLOP/s); "
                  f"loader / measured = {best_big / rate:.1f}x")


def measure_gpu(config, B, compile_model):
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cuda")
    model.init_weights()
    optimizers = model.setup_optimizers()
    run = torch.compile(model, dynamic=False) if compile_model else model
    x = torch.randint(0, config.vocab_size, (B, config.sequence_len), device="cuda")
    dtype = get_compute_dtype("cuda")
    def step():
        with autocast_context("cuda", dtype):
            loss = run(x, x)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 10
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return n * B * config.sequence_len / (time.perf_counter() - t0), dtype


if __name__ == "__main__":
    main()
