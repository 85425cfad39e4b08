"""
Inference benchmark: prefill and decode throughput of nanochat.engine.Engine against
(a) the same model decoding without a KV cache (every step recomputes the whole sequence), and
(b) a peer: Hugging Face transformers' LlamaForCausalLM.generate with the same width, depth, heads, KV
    heads and vocab (its SwiGLU hidden size is 8/3 * n_embd, so the MLP has our parameter count), greedy,
    the same dtype and exactly the same number of new tokens (min_new_tokens = max_new_tokens, no eos);
(c) a second peer: transformers' NanoChatForCausalLM, this very architecture implemented there, holding our
    model's weights (mapped by nanochat/hf.py, as scripts.export_hf writes them), generated the same way;
    the largest difference between its logits on the prompt and ours is printed first (rounding only).
Plus KV-cache bytes per token for MHA against n_kv_head = n_head // 4, computed and measured, and the time to
sample one token per row with a generator per row (a server's requests): torch.multinomial per row against
engine.draw, at the model's vocabulary and at 65,536.

Prefill tokens/s: one forward of (batch, prompt_len) tokens into a fresh cache, logits of the last position
only (what generation needs: our last_only=True, the peer's logits_to_keep=1).
Decode tokens/s: batch * (new_tokens - 1) / (time to generate new_tokens - time to generate 1 token),
with the same formula for all three, so prompt processing and fixed set-up costs cancel out. Our
Engine prefills the prompt once at batch 1 and replicates its cache, the peer prefills every row. Both
models hold their weights in the benchmark dtype. Timings are the best of --repeats rounds, the
variants timed round robin so a burst of load from other processes hits them alike.

    python -m bench.inference                      # CPU: depth 4, width 256, vocab 8192, prompt 128, 64 new tokens
    python -m bench.inference --dtype=fp32 --repeats=5
    python -m bench.inference --no-nanochat-peer   # without transformers' NanoChatForCausalLM
    python -m bench.inference --gpu                # depth 20 (1280 wide, 10 heads, vocab 65536), batch 1 and 32,
                                                   # prompt 512, 128 new tokens, bf16 (< 2 min on one H100)
"""
import gc
import os
import time

import torch

from bench.train_step import timed
from nanochat.common import compute_init, make_parser, positive_int, str2bool
from nanochat.gpt import GPT, GPTConfig
from nanochat.recipe import config_from_flags, model_flags
from scripts.plan import kv_cache_bytes_per_token

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NoSpecialTokens:
    """Tokenizer stand-in: no stop or tool tokens, so every row generates exactly max_tokens tokens
    (the peer runs without eos). Random weights would otherwise stop at a random <|assistant_end|>."""

    def encode_special(self, name):
        raise ValueError(name)


def build_ours(config, device, dtype):
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    torch.manual_seed(0)
    with torch.no_grad():  # the zero-initialized output projections and head would make all logits equal
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0, 0.02)
    return model.to(dtype).eval()


def build_peer(config, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    d = config.n_embd
    peer_cfg = LlamaConfig(vocab_size=config.vocab_size, hidden_size=d, intermediate_size=2 * config.mlp_hidden_dim // 3,
                           num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                           num_key_value_heads=config.n_kv_head, max_position_embeddings=config.sequence_len,
                           rope_parameters={"rope_type": "default", "rope_theta": config.rope_base},
                           tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    peer_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(peer_cfg)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dtype).eval()


def build_nanochat_peer(model, dtype):
    """transformers' NanoChatForCausalLM with `model`'s config and weights (the export's mapping), in `dtype`."""
    from transformers import NanoChatConfig, NanoChatForCausalLM

    from nanochat.hf import hf_config, to_hf_state
    fields = hf_config(model.config, None, dtype)
    peer_cfg = NanoChatConfig(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type", "dtype")})
    peer_cfg._attn_implementation = "sdpa"
    peer = NanoChatForCausalLM(peer_cfg)
    missing, unexpected = peer.load_state_dict(to_hf_state(model.state_dict(), model.config), strict=False)
    # tied: lm_head.weight is the embedding's parameter itself, so the file (like ours) holds it once
    tied = {"lm_head.weight"} if model.config.tie_embeddings else set()
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    peer.generation_config.eos_token_id = None
    peer.generation_config.pad_token_id = 0
    return peer.to(device=model.get_device(), dtype=dtype).eval()


def kv_bytes_per_token(config, dtype):
    """Keys and values of every layer for one token (the planner's formula), in `dtype`."""
    return kv_cache_bytes_per_token(config.n_layer, config.n_kv_head, config.head_dim,
                                    torch.empty(0, dtype=dtype).element_size())


def measured_kv_bytes_per_token(config, device, dtype):
    """The same, measured on an allocated KVCache: its buffer bytes / (rows * positions)."""
    from nanochat.engine import KVCache
    cache = KVCache(2, config.n_kv_head, 16, config.head_dim, config.n_layer, dtype=dtype, device=device)
    return sum(t.numel() * t.element_size() for t in cache.keys + cache.values) // (2 * 16)


def bench_batch(model, engine, peers, batch, prompt, new_tokens, repeats, device, no_cache, compiled_engine=None):
    """Best-of-repeats seconds for each measurement at one batch size. peers: {name: transformers model}."""
    from nanochat.engine import KVCache
    c = model.config
    rows = prompt.expand(batch, -1).contiguous()

    def ours_prefill():
        cache = KVCache(batch, c.n_kv_head, rows.size(1), c.head_dim, c.n_layer, dtype=model.transformer.wte.weight.dtype,
                        device=device)
        with torch.inference_mode():
            model(rows, kv_cache=cache, last_only=True)

    def ours_generate(n, engine=engine):
        def fn():
            produced = sum(1 for _ in engine.generate(prompt[0].tolist(), num_samples=batch, max_tokens=n, temperature=0.0))
            assert produced == n, f"engine produced {produced} steps, expected {n}"
        return fn

    def recompute(n):  # (a): greedy decoding by full forward passes, no cache
        def fn():
            ids = rows
            with torch.inference_mode():
                for _ in range(n):
                    ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return fn

    def peer_prefill(peer):
        def fn():
            with torch.inference_mode():
                peer(input_ids=rows, use_cache=True, logits_to_keep=1)
        return fn

    def peer_generate(peer, n):
        def fn():
            with torch.inference_mode():
                out = peer.generate(rows, attention_mask=torch.ones_like(rows), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False)
            assert out.size(1) == rows.size(1) + n
        return fn

    fns = {"ours_prefill": ours_prefill, "ours_1": ours_generate(1), "ours_n": ours_generate(new_tokens)}
    compile_s = None
    if compiled_engine is not None:
        fns.update(compiled_1=ours_generate(1, compiled_engine), compiled_n=ours_generate(new_tokens, compiled_engine))
        compile_s = timed(fns["compiled_n"], device)  # the first decode steps compile (batch 1, then batch > 1 once)
    if no_cache:
        fns.update(recompute_1=recompute(1), recompute_n=recompute(new_tokens))
    for name, peer in peers.items():
        fns.update({f"{name}_prefill": peer_prefill(peer), f"{name}_1": peer_generate(peer, 1),
                    f"{name}_n": peer_generate(peer, new_tokens)})
    for fn in fns.values():  # warm-up: kernels, allocator, autocast caches
        fn()
    best = {k: float("inf") for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            best[k] = min(best[k], timed(fn, device))
        gc.collect()
    P, n = rows.size(1), new_tokens
    out = {}
    for name in ("ours", "compiled", "recompute", *peers):
        if f"{name}_n" not in best:
            continue
        decode_s = max(best[f"{name}_n"] - best[f"{name}_1"], 1e-9)
        out[name] = dict(decode=batch * (n - 1) / decode_s, total_s=best[f"{name}_n"])
        if f"{name}_prefill" in best:
            out[name]["prefill"] = batch * P / best[f"{name}_prefill"]
    if compile_s is not None:
        out["compiled"]["compile_s"] = compile_s
    return out


def bench_sampling(batch, vocab, repeats, device):
    """Best seconds to sample one token for each of `batch` rows of `vocab` probabilities, every row with its own
    generator (a server's requests): torch.multinomial per row (the peer) against engine.draw (one uniform per
    row, inverse CDF), timed round robin."""
    from nanochat.engine import draw
    probs = torch.softmax(torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)), dim=-1).to(device)
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]

    def multinomial():
        torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(gens)]).tolist()

    def inverse_cdf():
        draw(probs, torch.cat([torch.rand(1, generator=g, device=device) for g in gens])).tolist()
    times = {multinomial: [], inverse_cdf: []}
    for _ in range(repeats + 1):  # the first round warms up
        for fn, ts in times.items():
            ts.append(timed(fn, device))
    return min(times[multinomial][1:]), min(times[inverse_cdf][1:])


def fmt(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--gpu", action="store_true", help="the GPU preset: depth 20, batch 1 and 32, prompt 512, 128 new, bf16")
    parser.add_argument("--device-type", choices=["cpu", "cuda", "mps"], default=None, help="default: cuda with --gpu, else cpu")
    parser.add_argument("--depth", type=positive_int, default=4)
    parser.add_argument("--n-embd", type=positive_int, default=256)
    parser.add_argument("--n-head", type=positive_int, default=4)
    parser.add_argument("--n-kv-head", type=positive_int, default=None, help="default: n_head (MHA)")
    parser.add_argument("--vocab-size", type=positive_int, default=8192)
    parser.add_argument("--prompt-len", type=positive_int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per row (>= 2)")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights and compute dtype for both models")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--no-cache-baseline", type=str2bool, default=True, help="also time decoding without a KV cache")
    parser.add_argument("--peer", type=str2bool, default=True, help="also time HF transformers LlamaForCausalLM.generate")
    parser.add_argument("--nanochat-peer", type=str2bool, default=True,
                        help="also time HF transformers NanoChatForCausalLM.generate holding our weights")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--sampling", type=str2bool, default=True,
                        help="also time sampling a token per row: torch.multinomial against engine.draw")
    parser.add_argument("--compile", type=str2bool, default=True, help="also time Engine(compile=True): the decode step compiled")
    args = parser.parse_args(argv)
    if args.gpu:
        args.depth, args.n_embd, args.n_head, args.vocab_size = 20, 1280, 10, 65536
        args.prompt_len, args.new_tokens, args.batches, args.dtype = 512, 128, "1,32", "bf16"
        args.device_type = args.device_type or "cuda"
        args.no_cache_baseline = False  # 32 rows x 640 tokens recomputed 128 times adds nothing we do not know
    try:
        batches = [int(b) for b in args.batches.split(",")]
        assert batches and all(b > 0 for b in batches)
    except (ValueError, AssertionError):
        parser.error(f"--batches must be comma-separated positive ints, got {args.batches!r}")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens must be at least 2, got {args.new_tokens}")
    n_kv_head = args.n_kv_head or args.n_head
    try:
        config = GPTConfig(sequence_len=args.prompt_len + args.new_tokens, vocab_size=args.vocab_size, n_layer=args.depth,
                           n_head=args.n_head, n_kv_head=n_kv_head, n_embd=args.n_embd).validate()
    except ValueError as e:
        parser.error(str(e))
    device = torch.device(args.device_type or "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device-type cuda: no CUDA device is visible")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    compute_init(device.type)  # our scripts' process setup (CPU: malloc keeps freed memory; CUDA: tf32); the peer shares it
    dtype = DTYPES[args.dtype]
    os.environ["NANOCHAT_DTYPE"] = args.dtype  # the Engine's autocast dtype = the weights' dtype

    from nanochat.engine import Engine
    log = lambda *a: print(*a, flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
        f"torch {torch.__version__}, dtype {args.dtype}, load average {load:.2f}")
    log(f"model: depth {args.depth}, n_embd {args.n_embd}, {args.n_head} heads, {n_kv_head} kv heads, vocab {args.vocab_size}; "
        f"prompt {args.prompt_len}, {args.new_tokens} new tokens, best of {args.repeats}")
    model = build_ours(config, device, dtype)
    engine = Engine(model, NoSpecialTokens())
    compiled_engine = Engine(model, NoSpecialTokens(), compile=True) if args.compile else None
    peers = {}
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0)).to(device)
    if args.peer:
        try:
            peers["peer"] = build_peer(config, device, dtype)
            import transformers
            log(f"peer: transformers {transformers.__version__} LlamaForCausalLM, intermediate_size {peers['peer'].config.intermediate_size}")
        except ImportError as e:
            log(f"peer skipped: transformers is not installed ({e})")
    if args.nanochat_peer:
        try:
            peers["nanochat"] = build_nanochat_peer(model, dtype)
            with torch.inference_mode():  # same weights: the same function, up to rounding in the benchmark dtype
                a, b = model(prompt).float(), peers["nanochat"](input_ids=prompt).logits.float()
            log(f"nanochat peer: transformers NanoChatForCausalLM with our weights; prompt logits max |ours - peer| = "
                f"{(a - b).abs().max().item():.2e} (max |logit| {a.abs().max().item():.2f}, {args.dtype})")
        except ImportError as e:
            log(f"nanochat peer skipped: transformers (with NanoChat) or safetensors is not installed ({e})")

    results, start = {}, time.perf_counter()
    for b in batches:
        t0 = time.perf_counter()
        try:
            results[b] = bench_batch(model, engine, peers, b, prompt, args.new_tokens, args.repeats, device,
                                     args.no_cache_baseline, compiled_engine)
        except Exception as e:  # the peers' API moves between transformers versions: keep our figures
            if not peers:
                raise
            log(f"peers failed at batch {b} ({type(e).__name__}: {e}); timing without them from now on")
            peers = {}
            results[b] = bench_batch(model, engine, peers, b, prompt, args.new_tokens, args.repeats, device,
                                     args.no_cache_baseline, compiled_engine)
        log(f"batch {b} timed in {time.perf_counter() - t0:.1f}s")
        if device.type == "cuda":
            torch.cuda.empty_cache()

    log("")
    log("| batch | engine prefill tok/s | engine decode tok/s | compiled-decode engine tok/s | no-cache decode tok/s "
        "| engine / no-cache | peer prefill tok/s | peer decode tok/s | engine / peer (decode) "
        "| compiled engine / peer (decode) | engine / peer (prefill) |")
    log("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for b, r in results.items():
        o, c, nc, p = r["ours"], r.get("compiled"), r.get("recompute"), r.get("peer")
        cells = [str(b), fmt(o["prefill"]), fmt(o["decode"]), fmt(c["decode"]) if c else "-"]
        cells += [fmt(nc["decode"]), f"{o['decode'] / nc['decode']:.2f}x"] if nc else ["-", "-"]
        if p:
            cells += [fmt(p["prefill"]), fmt(p["decode"]), f"{o['decode'] / p['decode']:.2f}x",
                      f"{c['decode'] / p['decode']:.2f}x" if c else "-", f"{o['prefill'] / p['prefill']:.2f}x"]
        else:
            cells += ["-"] * 5
        log("| " + " | ".join(cells) + " |")
    if any("nanochat" in r for r in results.values()):
        log("")
        log("transformers' NanoChatForCausalLM (same architecture, same weights):")
        log("| batch | nanochat peer prefill tok/s | nanochat peer decode tok/s | engine / nanochat peer (decode) "
            "| compiled engine / nanochat peer (decode) | engine / nanochat peer (prefill) |")
        log("|---:|---:|---:|---:|---:|---:|")
        for b, r in results.items():
            o, c, p = r["ours"], r.get("compiled"), r.get("nanochat")
            cells = [str(b)] + ([fmt(p["prefill"]), fmt(p["decode"]), f"{o['decode'] / p['decode']:.2f}x",
                                  f"{c['decode'] / p['decode']:.2f}x" if c else "-",
                                  f"{o['prefill'] / p['prefill']:.2f}x"] if p else ["-"] * 5)
            log("| " + " | ".join(cells) + " |")
    for b, r in results.items():
        if "compiled" in r:
            log(f"batch {b}: first compiled generation (incl. compilation) {r['compiled']['compile_s']:.1f}s")
    if args.sampling:
        log("")
        log("Sampling a token for each row, every row with its own generator (temperature 1, no filter):")
        log("| rows | vocab | torch.multinomial per row ms | engine.draw ms | draw speed-up |")
        log("|---:|---:|---:|---:|---:|")
        for b in batches:
            for vocab in sorted({args.vocab_size, 65536}):
                peer_s, ours_s = bench_sampling(b, vocab, args.repeats, device)
                log(f"| {b} | {vocab:,} | {peer_s * 1e3:.3f} | {ours_s * 1e3:.3f} | {peer_s / ours_s:.1f}x |")

    log("")
    log(f"KV cache bytes per token (all layers, keys + values, {args.dtype}), MHA vs n_kv_head = n_head // 4:")
    reference = config_from_flags(model_flags(), 65536)  # base_train's defaults: depth 20, 1280 wide, 10 heads
    for label, cfg in (("this config", config), ("depth 20 reference", reference)):
        sizes = {}
        for kv_heads in (cfg.n_head, max(1, cfg.n_head // 4)):
            if cfg.n_head % kv_heads == 0:
                c = GPTConfig(**{**cfg.__dict__, "n_kv_head": kv_heads})
                computed, measured = kv_bytes_per_token(c, dtype), measured_kv_bytes_per_token(c, "cpu", dtype)
                assert computed == measured, (computed, measured)
                sizes[kv_heads] = computed
        line = ", ".join(f"{h} kv heads: {b:,} B/token" for h, b in sizes.items())
        if len(sizes) == 2:
            mha, gqa = sizes.values()
            line += f" ({mha / gqa:.1f}x smaller with GQA; {mha * cfg.sequence_len / 2**20:,.1f} vs " \
                    f"{gqa * cfg.sequence_len / 2**20:,.1f} MiB per row at {cfg.sequence_len} tokens)"
        log(f"  {label}: {line}")
    log(f"total {time.perf_counter() - start:.1f}s")
    return results


if __name__ == "__main__":
    main()
