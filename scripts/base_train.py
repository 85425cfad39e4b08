"""
Pretrain a base model.

    python -m scripts.base_train --depth=20                              # one GPU or CPU
    torchrun --nproc_per_node=8 -m scripts.base_train -- --depth=20      # one node
    python -m scripts.base_train --depth=4 --max-seq-len=256 --device-batch-size=4 \\
        --total-batch-size=4096 --num-iterations=50 --data=../shared/data/pretrain   # tiny, CPU

--depth is the one dial of size: width 64 x depth, heads of dim 128, and (with
--target-param-data-ratio) the number of training tokens.
"""
import dataclasses
import json
import math
import os
import sys
import time

import torch

from nanochat.checkpoint import CheckpointError, checkpoints_root, find_last_step, load_checkpoint, save_checkpoint
from nanochat.common import (autocast_context, autodetect_device_type, compute_cleanup, compute_init, get_base_dir,
                             get_compute_dtype, get_peak_flops, get_peak_memory, make_parser, positive_int, print0,
                             auto_bool, str2bool, synchronize)
from nanochat.dataset import DataError
from nanochat.training import (StepLogger, average_gradients_, find_device_batch_size, format_duration, grad_accum_steps, lr_multiplier,
                               muon_momentum, set_learning_rates, throughput)

SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:"]


def get_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    p.add_argument("--device-type", default="", choices=["", "cuda", "mps", "cpu"], help="'' = autodetect")
    p.add_argument("--data", default=None, help="data spec PATH[:WEIGHT],...; default: the downloaded reference shards")
    p.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=positive_int, default=20, help="number of layers; width is 64 x depth")
    g.add_argument("--head-dim", type=positive_int, default=128)
    g.add_argument("--max-seq-len", type=positive_int, default=2048, help="context length")
    g.add_argument("--mlp-ratio", type=float, default=4.0, help="MLP hidden size / width")
    g.add_argument("--activation", default="relu2", choices=["relu2", "gelu", "silu"])
    g.add_argument("--tie-embeddings", type=str2bool, default=False, help="share wte and lm_head")
    g.add_argument("--n-kv-head", type=int, default=0, help="key/value heads (0 = n_head / --kv-head-ratio)")
    g.add_argument("--kv-head-ratio", type=positive_int, default=1, help="n_kv_head = n_head // ratio")
    g.add_argument("--softcap", type=float, default=15.0, help="logit softcap (0 = off)")
    g.add_argument("--rope-base", type=float, default=10000.0)
    g = p.add_argument_group("horizon (first that is set wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="explicit number of steps (-1 = off)")
    g.add_argument("--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1 = off)")
    g.add_argument("--target-param-data-ratio", type=float, default=20.0, help="tokens per parameter (Chinchilla 20)")
    g = p.add_argument_group("optimization")
    g.add_argument("--device-batch-size", default="32", help="rows per forward pass per device, or 'auto' to probe memory")
    g.add_argument("--total-batch-size", type=positive_int, default=524288, help="tokens per optimizer step")
    g.add_argument("--embedding-lr", type=float, default=0.2)
    g.add_argument("--unembedding-lr", type=float, default=0.004)
    g.add_argument("--matrix-lr", type=float, default=0.02)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    g.add_argument("--warmup-ratio", type=float, default=0.0)
    g.add_argument("--warmdown-ratio", type=float, default=0.2)
    g.add_argument("--final-lr-frac", type=float, default=0.0)
    g.add_argument("--compile", type=auto_bool, default="auto", help="torch.compile the model (auto = on CUDA)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int, default=250, help="validation bpb every N steps (-1 = only at the end)")
    g.add_argument("--eval-tokens", type=positive_int, default=20 * 524288)
    g.add_argument("--core-metric-every", type=int, default=-1, help="CORE metric every N steps (-1 = off)")
    g.add_argument("--core-metric-max-per-task", type=int, default=500)
    g.add_argument("--eval-dir", default=None, help="CORE task bundle directory")
    g.add_argument("--sample-every", type=int, default=2000, help="greedy samples every N steps (-1 = off)")
    g.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")
    g.add_argument("--model-tag", default=None, help="checkpoint directory name (default d<depth>)")
    g.add_argument("--resume", type=str2bool, default=False, help="continue from the last complete checkpoint of --model-tag")
    args = p.parse_args(argv)
    if args.device_batch_size != "auto":
        try:
            args.device_batch_size = positive_int(args.device_batch_size)
        except Exception:
            p.error(f"argument --device-batch-size: expected a positive integer or 'auto', got {args.device_batch_size!r}")
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"argument --{name.replace('_', '-')}: must be between 0 and 1")
    if args.warmup_ratio + args.warmdown_ratio > 1.0:
        p.error("--warmup-ratio plus --warmdown-ratio must not exceed 1")
    return args


def build_config(args, vocab_size):
    """The model config the flags describe. With --kv-head-ratio, n_kv_head = n_head // ratio,
    rounded down to a divisor of n_head (GQA needs whole groups)."""
    from nanochat.gpt import config_for_depth
    knobs = dict(mlp_ratio=args.mlp_ratio, activation=args.activation, tie_embeddings=args.tie_embeddings,
                 softcap=args.softcap or None, rope_base=args.rope_base)
    n_head = config_for_depth(args.depth, vocab_size, head_dim=args.head_dim).n_head
    n_kv_head = args.n_kv_head or max(1, n_head // args.kv_head_ratio)
    if not args.n_kv_head:
        while n_head % n_kv_head:
            n_kv_head -= 1
    return config_for_depth(args.depth, vocab_size, sequence_len=args.max_seq_len, head_dim=args.head_dim,
                            n_kv_head=n_kv_head, **knobs)


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts, max_tokens=16):
    """Greedy continuations by full recomputation: a handful of tokens, so no cache is needed."""
    outs = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        for _ in range(max_tokens):
            x = torch.tensor([ids[-model.config.sequence_len:]], device=model.get_device())
            ids.append(int(model(x)[0, -1].argmax()))
        outs.append(tokenizer.decode(ids[1:]))
    return outs


def main(argv=None):
    args = get_args(argv)
    from nanochat.dataloader import DataLoader, build_val_loader
    from nanochat.gpt import GPT
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes, get_tokenizer

    device_type = autodetect_device_type(args.device_type or None)
    is_ddp, rank, local_rank, world_size, device = compute_init(device_type, seed=args.seed)
    dtype = get_compute_dtype(device_type)
    autocast = lambda: autocast_context(device_type, dtype)

    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    config = build_config(args, tokenizer.get_vocab_size())
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    model_tag = args.model_tag or f"d{args.depth}"
    ckpt_dir = os.path.join(checkpoints_root("base"), model_tag)

    params = model.num_params_by_group()
    flops_per_token = model.estimate_flops()
    print0(f"model config: {json.dumps(dataclasses.asdict(config))}")
    print0("parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()))
    print0(f"FLOPs per token: {flops_per_token:e}; device {device}, dtype {dtype}, world size {world_size}")

    use_compile = args.compile == "true" or (args.compile == "auto" and device_type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    T = config.sequence_len

    # Device batch: fixed, or probed on the device with a real forward+backward.
    if args.device_batch_size == "auto":
        limit = max(1, args.total_batch_size // (T * world_size))
        candidates = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= limit and limit % b == 0]

        def try_batch(b):
            x = torch.randint(0, config.vocab_size, (b, T), device=device)
            with autocast():
                loss = train_model(x, x)
            loss.backward()
            model.zero_grad(set_to_none=True)
        B = find_device_batch_size(try_batch, candidates, device_type)
        print0(f"auto device batch size: {B}")
    else:
        B = args.device_batch_size
    accum = grad_accum_steps(args.total_batch_size, B, T, world_size)

    # Horizon
    total_params = params["total"]
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * args.total_batch_size))
    else:
        num_iterations = round(args.target_param_data_ratio * total_params / args.total_batch_size)
    num_iterations = max(num_iterations, 1)
    total_tokens = args.total_batch_size * num_iterations
    print0(f"batch: {B} rows x {T} tokens x {world_size} rank(s) x {accum} accumulation step(s) = "
           f"{args.total_batch_size:,} tokens/step; {num_iterations:,} steps = {total_tokens:,} tokens "
           f"({total_tokens / total_params:.1f} tokens/param, {flops_per_token * total_tokens:e} FLOPs)")

    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr,
                                        matrix_lr=args.matrix_lr, weight_decay=args.weight_decay)
    # One loader per data-parallel slot (rank x micro-step): a run on 2 ranks and a run on 1 rank
    # with 2 accumulation steps then see exactly the same batches.
    def make_loaders(split):
        return [DataLoader(tokenizer, B, T, spec=args.data, split=split, device=device, seed=args.seed,
                           rank=rank * accum + a, world_size=world_size * accum) for a in range(accum)]
    try:
        loaders = make_loaders("train")
    except DataError as e:
        raise SystemExit(f"data error: {e}")

    start_step = 0
    user_config = {k: v for k, v in vars(args).items()}
    logger = StepLogger(ckpt_dir, args.run, user_config, rank=rank, resume=args.resume)
    if args.resume:
        try:
            start_step = find_last_step(ckpt_dir)
            model_state, payload, meta = load_checkpoint(ckpt_dir, start_step, device, load_optimizer=True, rank=rank)
        except CheckpointError as e:
            raise SystemExit(f"cannot resume: {e}")
        if meta["model_config"] != dataclasses.asdict(config):
            raise SystemExit(f"cannot resume: checkpoint model config {meta['model_config']} differs from the flags' "
                             f"{dataclasses.asdict(config)}")
        if meta.get("world_size") != world_size or meta.get("accum") != accum:
            raise SystemExit(f"cannot resume exactly: checkpoint was written by {meta.get('world_size')} rank(s) x "
                             f"{meta.get('accum')} accumulation steps, this run has {world_size} x {accum}")
        model.load_state_dict(model_state)
        for opt, state in zip(optimizers, payload["optimizer"]["optimizers"]):
            opt.load_state_dict(state)
        for loader, state in zip(loaders, payload["optimizer"]["loaders"]):
            loader.load_state_dict(state)
        torch.set_rng_state(payload["rng"]["cpu"])
        if device_type == "cuda" and payload["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(payload["rng"]["cuda"].cpu())
        logger.truncate_after(start_step)
        print0(f"resumed from {ckpt_dir} step {start_step}")

    def save(step, val_bpb):
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
        meta = {"model_config": dataclasses.asdict(config), "user_config": user_config, "val_bpb": val_bpb,
                "accum": accum, "device_batch_size": B, "num_iterations": num_iterations,
                "tokenizer_vocab_size": tokenizer.get_vocab_size()}
        state = {"optimizers": [opt.state_dict() for opt in optimizers], "loaders": [l.state_dict() for l in loaders]}
        save_checkpoint(ckpt_dir, step, model.state_dict(), state, meta, rank=rank, world_size=world_size, rng_state=rng)

    peak = get_peak_flops(device_type, dtype)
    eval_steps = max(1, args.eval_tokens // (B * T * world_size))
    val_bpb, min_val_bpb, core = None, float("inf"), None
    smooth_loss, total_time, timed_steps = 0.0, 0.0, 0
    wall_start = time.time()
    step = start_step
    while True:
        last = step == num_iterations
        # ---- evaluation, samples, checkpoint (on the weights after `step` steps)
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            try:
                val_loader = iter(build_val_loader(tokenizer, B, T, spec=args.data, device=device, rank=rank,
                                                   world_size=world_size))
            except DataError as e:
                raise SystemExit(f"data error (validation split): {e}")
            with autocast():
                val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
            min_val_bpb = min(min_val_bpb, val_bpb)
            logger.log({"step": step, "val_bpb": val_bpb, "total_training_flops": flops_per_token * args.total_batch_size * step},
                       f"step {step:05d} | validation bpb {val_bpb:.4f}")
            model.train()
        if args.core_metric_every > 0 and (last or (step > 0 and step % args.core_metric_every == 0)):
            from nanochat.core_eval import evaluate_core
            model.eval()
            with autocast():
                result = evaluate_core(model, tokenizer, args.eval_dir, max_per_task=args.core_metric_max_per_task, device=device)
            core = result["core"]
            logger.log({"step": step, "core_metric": core}, f"step {step:05d} | CORE {core:.4f}")
            model.train()
        if args.sample_every > 0 and rank == 0 and (last or (step > 0 and step % args.sample_every == 0)):
            model.eval()
            with autocast():
                for text in greedy_samples(model, tokenizer, SAMPLE_PROMPTS):
                    print0(f"sample: {text!r}")
            model.train()
        if step > start_step and (last or (args.save_every > 0 and step % args.save_every == 0)):
            save(step, val_bpb)
        if last:
            break

        # ---- one optimizer step over `accum` micro-batches
        synchronize(device_type)
        t0 = time.perf_counter()
        train_loss = torch.zeros((), device=device)
        for loader in loaders:
            x, y = next(loader)
            with autocast():
                loss = train_model(x, y)
            (loss / accum).backward()
            train_loss += loss.detach() / accum  # the mean over the whole step, whatever the split
        lrm = lr_multiplier(step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        set_learning_rates(optimizers, lrm, momentum=muon_momentum(step))
        if args.grad_clip > 0:
            if is_ddp:
                average_gradients_(list(model.parameters()), world_size)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if is_ddp:
            torch.distributed.all_reduce(train_loss)  # gloo has no AVG
            train_loss /= world_size
        train_loss = train_loss.item()  # also a sync point, so the timing below is honest
        dt = time.perf_counter() - t0
        step += 1

        if step > start_step + 1:  # the first step pays for compilation and warm-up
            total_time += dt
            timed_steps += 1
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9 ** (step - start_step))
        tok_per_sec, mfu = throughput(args.total_batch_size, dt, flops_per_token, peak * world_size)
        eta = (total_time / max(timed_steps, 1)) * (num_iterations - step)
        logger.log({"step": step, "loss": train_loss, "smooth_loss": debiased, "lrm": lrm, "dt": dt,
                    "tok_per_sec": tok_per_sec, "mfu": mfu, "total_training_flops": flops_per_token * args.total_batch_size * step},
                   f"step {step:05d}/{num_iterations:05d} | loss {debiased:.4f} | lrm {lrm:.2f} | "
                   f"{tok_per_sec:,.0f} tok/s | MFU {100 * mfu:.2f}% | {format_duration(total_time)} elapsed | "
                   f"ETA {format_duration(eta)}")

    wall = time.time() - wall_start
    peak_mem = get_peak_memory(device_type)
    total_flops = flops_per_token * total_tokens
    print0(f"peak memory {peak_mem / 2**20:,.0f} MiB | training time {format_duration(total_time)} | "
           f"wall {format_duration(wall)} | total FLOPs {total_flops:e} | min validation bpb {min_val_bpb:.4f}")
    if rank == 0:
        from nanochat.report import write_section
        rows = [("model tag", model_tag), ("depth", args.depth), ("parameters", f"{total_params:,}"),
                ("FLOPs per token", f"{flops_per_token:e}"), ("training tokens", f"{total_tokens:,}"),
                ("steps", num_iterations), ("total FLOPs", f"{total_flops:e}"), ("min validation bpb", f"{min_val_bpb:.4f}"),
                ("final validation bpb", f"{val_bpb:.4f}"), ("CORE", "n/a" if core is None else f"{core:.4f}"),
                ("training time", format_duration(total_time)), ("peak memory (MiB)", f"{peak_mem / 2**20:,.0f}"),
                ("world size", world_size), ("device", device_type), ("dtype", str(dtype).removeprefix("torch."))]
        flags = " ".join(f"--{k.replace('_', '-')}={v}" for k, v in user_config.items() if v is not None)
        body = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
        metrics = {"val_bpb": min_val_bpb, "CORE": core, "parameters": total_params, "total_flops": total_flops,
                   "training_seconds": total_time}
        if device_type == "cuda":
            metrics["gpu_hours"] = world_size * total_time / 3600
        write_section("Base model training", f"{body}\n\nflags: `{flags}`", metrics=metrics)
    logger.finish()
    compute_cleanup()
    return {"val_bpb": val_bpb, "min_val_bpb": min_val_bpb, "steps": num_iterations}


if __name__ == "__main__":
    main(sys.argv[1:])
