"""
Training-step benchmark: our GPT's forward + backward (+ Muon/AdamW step) against the physical
ceiling (this machine's dense matmul rate, measured in the same run) and against a peer, Hugging Face
transformers' LlamaForCausalLM with the same width, depth, heads, KV heads, vocab, sequence length and
dtype, timed on the same optimizer-free forward + backward.

Model FLOPs are each model's own 6 x (matmul params incl. head) + 12 * L * H * D * T per token (the
peer's SwiGLU hidden size is 8/3 * n_embd so its MLP has exactly our parameter count: same FLOPs).
bf16 means autocast with fp32 master weights for both models. --recipe new (default) times the model and
Muon of base_train's defaults (value embeddings; Polar Express, NorMuon, cautious weight decay); --recipe
reference the late-2025 ones (nanochat.recipe.REFERENCE_RECIPE), whose model the peer matches exactly.

    python -m bench.train_step                      # CPU: depth 6, seq 512, fp32+bf16, eager+compiled
    python -m bench.train_step --dtypes=bf16 --modes=compiled --rounds=3   # quicker
    python -m bench.train_step --recipe=reference   # the late-2025 recipe's model and Muon
    python -m bench.train_step --recipe=both --dtypes=bf16 --modes=compiled --peer=false   # new/reference step time
    python -m bench.train_step --gpu                # depth 20, seq 2048, bf16, compiled (< 3 min on one H100/H200)
"""
import gc
import statistics
import time

import torch

from nanochat.common import autocast_context, compute_init, make_parser, positive_int, str2bool, synchronize
from nanochat.gpt import GPT
from nanochat.recipe import MODEL_FLAGS, REFERENCE_RECIPE, config_from_flags, model_flags
from scripts._cli import flag, setup_stage_optimizers
from scripts.base_train import get_args as base_train_args

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAK_H100_BF16 = 989e12  # H100/H200 SXM dense bf16, datasheet


def measure_matmul(device, dtype, n, reps):
    """Best-of-`reps` rate of an n x n x n matmul: the dense ceiling for this dtype on this machine."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device.type)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        synchronize(device.type)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def timed(fn, device):
    synchronize(device.type)
    t0 = time.perf_counter()
    fn()
    synchronize(device.type)
    return time.perf_counter() - t0


def build_ours(config, device):
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def build_peer(config, device):
    """LlamaForCausalLM matched to our config; returns (model, flops_per_token)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = config.n_embd
    hidden = 2 * config.mlp_hidden_dim * d // (3 * d)  # SwiGLU's 3 matrices = our 2 matrices
    peer_cfg = LlamaConfig(vocab_size=config.vocab_size, hidden_size=d, intermediate_size=hidden,
                           num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                           num_key_value_heads=config.n_kv_head, max_position_embeddings=config.sequence_len,
                           rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
                           tie_word_embeddings=False, attention_bias=False, mlp_bias=False, use_cache=False)
    peer_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlamaForCausalLM(peer_cfg)
    model.train()
    n = sum(p.numel() for p in model.parameters()) - model.model.embed_tokens.weight.numel()
    c = config
    return model, 6 * n + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len


def run_variant(config, device, dtype_name, compiled, batch_size, rounds, warmup, peer, log, train_args, others=None):
    """Per-step times for one (dtype, eager/compiled): ours with and without the optimizer step, and the
    peer's fwd+bwd. The three are timed round-robin, one call each per round, so a burst of load from
    other processes hits all of them alike; each gets its best (min) and median over the rounds.
    others: {name: (config, train_args)} more of our models timed in the same rounds ("<name>_step", "<name>_fb"), and
    then each model's optimizer step alone too ("<name>_opt")."""
    dtype = DTYPES[dtype_name]
    ctx = lambda: autocast_context(device.type, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch_size, config.sequence_len), generator=g).to(device)
    y = torch.randint(0, config.vocab_size, (batch_size, config.sequence_len), generator=g).to(device)

    def ours(config, train_args, name):
        model = build_ours(config, device)
        run = torch.compile(model, dynamic=False) if compiled else model
        opts = setup_stage_optimizers(model, train_args, num_iterations=1000)  # the horizon sizes the decay, not the work

        def fb():
            with ctx():
                loss = run(x, y)
            loss.backward()
            model.zero_grad(set_to_none=True)

        def step():
            with ctx():
                loss = run(x, y)
            loss.backward()
            for opt in opts:
                opt.step()
            model.zero_grad(set_to_none=True)

        log(f"  {name} first fwd+bwd (incl. compile): {timed(fb, device):.1f}s")
        fns = {f"{name}_step": step, f"{name}_fb": fb}
        if not others:
            return fns, model.estimate_flops()
        with ctx():
            run(x, y).backward()
        grads = {p: p.grad for p in model.parameters()}  # one fwd+bwd's, given to every opt() call
        model.zero_grad(set_to_none=True)

        def opt():  # the optimizer step alone (the single-process optimizers leave .grad as it is)
            for p, g in grads.items():
                p.grad = g
            for o in opts:
                o.step()
            model.zero_grad(set_to_none=True)  # the next fwd+bwd must not add into the kept gradients

        return fns | {f"{name}_opt": opt}, model.estimate_flops()

    fns, flops = ours(config, train_args, "ours")
    out = {"flops_per_token": flops}
    for name, (c, a) in (others or {}).items():
        fns.update(ours(c, a, name)[0])
    if peer:
        pmodel, out["peer_flops_per_token"] = build_peer(config, device)
        prun = torch.compile(pmodel, dynamic=False) if compiled else pmodel

        def peer_fb():
            with ctx():
                loss = prun(input_ids=x, labels=y).loss
            loss.backward()
            pmodel.zero_grad(set_to_none=True)

        fns["peer_fb"] = peer_fb
        log(f"  peer first fwd+bwd (incl. compile): {timed(peer_fb, device):.1f}s")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    for k, ts in times.items():
        out[k] = min(ts)
        out[k + "_median"] = statistics.median(ts)
    log("  " + ", ".join(f"{k} best {out[k]:.3f}s median {out[k + '_median']:.3f}s" for k in fns))
    return out


def loss_bench(config, device, batch_size, rounds, log, mode="compiled"):
    """The head + loss alone (bf16 autocast, fwd+bwd, `mode` eager or compiled): our ChunkedHeadLoss and
    SoftcapCrossEntropy vs the composed F.cross_entropy(cap * tanh(logits / cap)) vs no softcap at all,
    round-robin, best of `rounds`."""
    import torch.nn.functional as F
    from nanochat.kernels import ChunkedHeadLoss, SoftcapCrossEntropy
    cap = float(config.softcap or 15.0)
    N = batch_size * config.sequence_len
    h = torch.randn(N, config.n_embd, device=device, requires_grad=True)
    W = (torch.randn(config.vocab_size, config.n_embd, device=device) * 0.05).requires_grad_()
    y = torch.randint(0, config.vocab_size, (N,), device=device)

    def head(h, W):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return F.linear(h, W)
    def chunked(h, W, y):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return ChunkedHeadLoss.apply(h, W, y, cap, True) / y.numel()
    variants = {
        "ours (ChunkedHeadLoss: head + loss by chunks of rows, the model's training path)": chunked,
        "SoftcapCrossEntropy on whole logits (the model's per-token path)": lambda h, W, y: SoftcapCrossEntropy.apply(head(h, W), y, cap).mean(),
        "composed tanh + F.cross_entropy": lambda h, W, y: F.cross_entropy(cap * torch.tanh(head(h, W).float() / cap), y),
        "no softcap (F.cross_entropy)": lambda h, W, y: F.cross_entropy(head(h, W).float(), y),
    }
    fns = {}
    for name, f in variants.items():
        c = torch.compile(f, dynamic=False) if mode == "compiled" else f

        def run(c=c):
            c(h, W, y).backward()
            h.grad = W.grad = None
        run()
        run()
        fns[name] = run
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    base = min(times["composed tanh + F.cross_entropy"])
    log(f"\nhead + loss only ({N} tokens x vocab {config.vocab_size}, width {config.n_embd}, bf16, {mode}, fwd+bwd):")
    log("| variant | best (ms) | vs composed |")
    log("|---|---:|---:|")
    for k, ts in times.items():
        log(f"| {k} | {1e3 * min(ts):.1f} | {min(ts) / base:.2f}x |")


def main():
    parser = make_parser(__doc__)
    parser.add_argument("--gpu", action="store_true", help="preset: cuda, depth 20, seq 2048, vocab 65536, bf16, compiled, batch 32 (halved on OOM)")
    parser.add_argument("--depth", type=positive_int, default=6)
    parser.add_argument("--seq_len", type=positive_int, default=512)
    parser.add_argument("--vocab_size", type=positive_int, default=8192)
    parser.add_argument("--n_kv_head", type=positive_int, default=None, help="default: n_head (MHA)")
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--modes", default="eager,compiled", help="comma list of eager, compiled")
    parser.add_argument("--rounds", type=positive_int, default=7, help="timed rounds (each times every variant once; best reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peer", type=str2bool, default=None, help="time HF LlamaForCausalLM too (default: yes, no with --gpu)")
    parser.add_argument("--matmul_n", type=positive_int, default=2048, help="size of the ceiling matmul")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--recipe", default="new", choices=["new", "reference", "both"],
                        help="new: base_train's default model and Muon; reference: the late-2025 ones; both: new, "
                             "with the reference timed in the same rounds (their step-time ratio)")
    parser.add_argument("--loss_bench", type=str2bool, default=True, help="also time the head + softcapped loss alone")
    args = parser.parse_args()

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"argument --dtypes: unknown dtype {d!r} (choose from {sorted(DTYPES)})")
    for m in modes:
        if m not in ("eager", "compiled"):
            parser.error(f"argument --modes: unknown mode {m!r} (choose from eager, compiled)")
    if args.gpu:
        if not torch.cuda.is_available():
            parser.error("argument --gpu: CUDA is not available")
        args.depth, args.seq_len, args.vocab_size, args.batch_size = 20, 2048, 65536, 32
        dtypes, modes, args.matmul_n, args.rounds, args.warmup = ["bf16"], ["compiled"], 8192, 8, 2
        args.device = "cuda"
        args.peer = False if args.peer is None else args.peer
    args.peer = True if args.peer is None else args.peer
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    compute_init(device.type)  # our scripts' process setup (CPU: malloc keeps freed memory; CUDA: tf32); the peer shares it
    # this bench's own flag names (--seq_len, --n_kv_head), the scripts' config rule; n_kv_head 0 = n_head
    def recipe(reference):
        """(GPTConfig, base_train's parsed flags) of the new recipe or the reference: the optimizers exactly as
        base_train builds them from its own flags (its defaults, or the reference's values)."""
        model = {k: v for k, v in REFERENCE_RECIPE.items() if k in MODEL_FLAGS} if reference else {}
        train = base_train_args([flag(k, v) for k, v in REFERENCE_RECIPE.items() if k not in MODEL_FLAGS] if reference else [])
        shape = model_flags(depth=args.depth, max_seq_len=args.seq_len, n_kv_head=args.n_kv_head or 0, **model)
        try:
            return config_from_flags(shape, args.vocab_size), train
        except ValueError as e:
            parser.error(str(e))

    config, train_args = recipe(args.recipe == "reference")
    others = {"reference": recipe(True)} if args.recipe == "both" else None

    log = lambda s: print(s, flush=True)
    log(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), torch {torch.__version__}")
    log(f"config {config}")
    ceilings = {d: measure_matmul(device, DTYPES[d], args.matmul_n, 10) for d in sorted(set(dtypes) | {"bf16"})}
    for d, r in ceilings.items():
        log(f"dense matmul {args.matmul_n}^3 {d}: {r / 1e12:.3f} TFLOP/s")

    rows = []
    batch = args.batch_size
    for d in dtypes:
        for m in modes:
            log(f"[{d} {m}] batch {batch} x {args.seq_len} tokens")
            res = None
            while res is None:
                try:
                    res = run_variant(config, device, d, m == "compiled", batch, args.rounds, args.warmup, args.peer, log,
                                      train_args, others)
                except torch.OutOfMemoryError:
                    if batch == 1:
                        raise
                if res is None:  # cleanup outside the except block, whose traceback pins the tensors
                    batch //= 2
                    torch._dynamo.reset()
                    gc.collect()
                    torch.cuda.empty_cache()
                    log(f"  out of memory: retrying with batch {batch}")
            rows.append((d, m, batch, res))

    # the ceiling is measured again at the end (load from other processes varies): the best counts
    for d in ceilings:
        again = measure_matmul(device, DTYPES[d], args.matmul_n, 10)
        log(f"dense matmul {args.matmul_n}^3 {d} again: {again / 1e12:.3f} TFLOP/s")
        ceilings[d] = max(ceilings[d], again)

    # ---- report (best of the rounds; MFU against the best measured matmul rate in that dtype)
    tok = lambda b: b * args.seq_len
    # the peer as it is usually run (eager: transformers does not compile by default), per dtype
    peer_eager = {d: r["peer_flops_per_token"] * tok(b) / r["peer_fb"] for d, m, b, r in rows if m == "eager" and "peer_fb" in r}
    log("\n| dtype | mode | tokens/step | ours step tok/s | ours step TFLOP/s | MFU step | ours fwd+bwd TFLOP/s | MFU fwd+bwd | "
        "MFU fwd+bwd vs bf16 matmul | peer fwd+bwd TFLOP/s | ours/peer (same mode) | ours/peer eager |")
    log("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for d, m, b, r in rows:
        ceiling = ceilings[d]
        step_flops = r["flops_per_token"] * tok(b) / r["ours_step"]
        fb_flops = r["flops_per_token"] * tok(b) / r["ours_fb"]
        peer = r["peer_flops_per_token"] * tok(b) / r["peer_fb"] if "peer_fb" in r else None
        log(f"| {d} | {m} | {tok(b)} | {tok(b) / r['ours_step']:,.0f} | {step_flops / 1e12:.3f} | {100 * step_flops / ceiling:.1f}% | "
            f"{fb_flops / 1e12:.3f} | {100 * fb_flops / ceiling:.1f}% | {100 * fb_flops / ceilings['bf16']:.1f}% | "
            + (f"{peer / 1e12:.3f} | {fb_flops / peer:.2f}x | " if peer else "- | - | ")
            + (f"{fb_flops / peer_eager[d]:.2f}x |" if d in peer_eager else "- |"))
    if others:  # the same rounds, so the ratio is immune to the load that moves both
        log("\n| dtype | mode | new/reference step time | new/reference fwd+bwd time | new/reference optimizer step "
            "| optimizer step new, reference s | (best, median of rounds) |")
        log("|---|---|---:|---:|---:|---:|---|")
        for d, m, b, r in rows:
            ratio = lambda k, q="": r[f"ours_{k}{q}"] / r[f"reference_{k}{q}"]
            log(f"| {d} | {m} | {ratio('step'):.3f} | {ratio('fb'):.3f} | {ratio('opt'):.3f} | {r['ours_opt']:.3f}, "
                f"{r['reference_opt']:.3f} | medians {ratio('step', '_median'):.3f}, {ratio('fb', '_median'):.3f}, "
                f"{ratio('opt', '_median'):.3f} |")
    if args.loss_bench and not args.gpu:
        for mode in modes:
            loss_bench(config, device, args.batch_size, args.rounds, log, mode)
    if device.type == "cuda":
        for d, m, b, r in rows:
            step_flops = r["flops_per_token"] * tok(b) / r["ours_step"]
            fb_flops = r["flops_per_token"] * tok(b) / r["ours_fb"]
            log(f"[{d} {m}] MFU vs {PEAK_H100_BF16 / 1e12:.0f} TFLOP/s: step {100 * step_flops / PEAK_H100_BF16:.1f}%, "
                f"fwd+bwd {100 * fb_flops / PEAK_H100_BF16:.1f}%; vs measured matmul: step "
                f"{100 * step_flops / ceilings['bf16']:.1f}%, fwd+bwd {100 * fb_flops / ceilings['bf16']:.1f}%; "
                f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
