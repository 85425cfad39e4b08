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
import os
import sys
import time

import torch

from nanochat.checkpoint import checkpoints_root
from nanochat.common import (all_reduce_sum, format_duration, get_peak_flops, make_parser, positive_float, positive_int,
                             print0, str2bool)
from nanochat.dataset import DataError
from nanochat.engine import SAMPLE_PROMPTS, greedy_samples
from nanochat.recipe import add_model_flags, batch_size_flag, config_from_flags, training_horizon
from nanochat.training import (StepLogger, StepStats, accumulate_gradients, every, find_device_batch_size, finish_stage,
                               grad_accum_steps, init_device, save_training_state, stage_steps)

from ._cli import (add_optimizer_flags, add_run_flags, check_optimizer_flags, resume_or_exit, setup_stage_optimizers,
                   stage_error, step_optimizers, use_compile)


def get_args(argv=None):
    p = make_parser(__doc__)
    add_run_flags(p)
    p.add_argument("--data", default=None, help="data spec PATH[:WEIGHT],...; default: the downloaded reference shards")
    add_model_flags(p.add_argument_group("model"))
    g = p.add_argument_group("horizon (first that is set wins)")
    g.add_argument("--num-iterations", type=int, default=-1, help="explicit number of steps (-1 = off)")
    g.add_argument("--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1 = off)")
    g.add_argument("--target-param-data-ratio", type=positive_float, default=10.5,
                   help="tokens per scaling parameter (blocks' matrices + head; upstream's compute-optimal fit: 10.5)")
    g = p.add_argument_group("optimization")
    g.add_argument("--device-batch-size", default="32", help="rows per forward pass per device, or 'auto' to probe memory")
    g.add_argument("--total-batch-size", type=batch_size_flag, default=-1,
                   help="tokens per optimizer step (-1 = from the token budget: 2^19 x (D / D_d12)^0.383)")
    add_optimizer_flags(g, init_lr_frac=None, warmdown_ratio=0.65, final_lr_frac=0.05,
                        warmdown_help="fraction of steps of linear decay at the end",
                        with_compile=True, with_warmup=True, with_muon_variants=True)
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int, default=250, help="validation bpb every N steps (-1 = only at the end)")
    g.add_argument("--eval-tokens", type=positive_int, default=20 * 524288)
    g.add_argument("--core-metric-every", type=int, default=-1, help="CORE metric every N steps (-1 = off)")
    g.add_argument("--core-metric-max-per-task", type=int, default=500)
    g.add_argument("--eval-dir", default=None, help="CORE task bundle directory (default: the downloaded one)")
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
    return check_optimizer_flags(p, args)


def main(argv=None):
    args = get_args(argv)
    from nanochat.dataloader import DataLoader, build_val_loader
    from nanochat.gpt import GPT
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes, get_tokenizer

    device_type, rank, world_size, device, dtype, autocast = init_device(args.device_type, args.seed)

    # ---- the model, built from the flags on the meta device and initialized in place
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device)
    config = config_from_flags(args, tokenizer.get_vocab_size())
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
    train_model = torch.compile(model, dynamic=False) if use_compile(args, device_type) else model
    T = config.sequence_len

    # ---- horizon (nanochat/recipe.py): explicit steps, a FLOPs budget (tokens = FLOPs / FLOPs per token), or tokens =
    # ratio x scaling parameters; the batch as given or from the token budget
    try:
        args.total_batch_size, num_iterations = training_horizon(args, params["scaling"], flops_per_token,
                                                                 tokenizer.get_vocab_size())
    except ValueError as e:
        stage_error(f"base_train: {e}")
    total_tokens = args.total_batch_size * num_iterations

    # ---- device batch: fixed, or probed on the device with a real forward+backward
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

    print0(f"batch: {B} rows x {T} tokens x {world_size} rank(s) x {accum} accumulation step(s) = "
           f"{args.total_batch_size:,} tokens/step; {num_iterations:,} steps = {total_tokens:,} tokens "
           f"({total_tokens / params['scaling']:.1f} tokens per scaling parameter, {flops_per_token * total_tokens:e} FLOPs)")

    # ---- optimizers and data: one loader per data-parallel slot (rank x micro-step), so a run on 2 ranks and a
    # run on 1 rank with 2 accumulation steps see exactly the same batches
    optimizers = setup_stage_optimizers(model, args, num_iterations)
    try:
        loaders = [DataLoader(tokenizer, B, T, spec=args.data, split="train", device=device, seed=args.seed,
                              rank=rank * accum + a, world_size=world_size * accum) for a in range(accum)]
    except DataError as e:
        stage_error(f"base_train: data error: {e}")
    eval_dir = None
    if args.core_metric_every > 0:  # find (or fetch) the CORE bundle now, not after hours of training
        from nanochat.core_bundle import resolve_eval_dir
        try:
            eval_dir = resolve_eval_dir(args.eval_dir)
        except (OSError, RuntimeError, ValueError) as e:
            stage_error(f"base_train: CORE bundle: {e}")
    logger = StepLogger(ckpt_dir, args.run, vars(args), rank=rank, resume=args.resume)
    start_step = (resume_or_exit("base_train", logger, ckpt_dir, None, optimizers, loaders, device, device_type, rank,
                                 world_size, accum, model=model) if args.resume else 0)
    stats = StepStats(num_iterations, start_step, device_type, per_step=args.total_batch_size,
                      flops_per_unit=flops_per_token, peak_flops=get_peak_flops(device_type, dtype) * world_size)

    eval_steps = max(1, args.eval_tokens // (B * T * world_size))
    val_bpb, min_val_bpb, core = None, float("inf"), None
    wall_start = time.time()
    for step, last, _ in stage_steps(start_step, num_iterations):
        # ---- evaluation, samples, checkpoint (on the weights after `step` steps)
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            model.eval()
            try:
                val_loader = iter(build_val_loader(tokenizer, B, T, spec=args.data, device=device, rank=rank,
                                                   world_size=world_size))
            except DataError as e:
                stage_error(f"base_train: data error (validation split): {e}")
            with autocast():
                val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
            min_val_bpb = min(min_val_bpb, val_bpb)
            logger.log({"step": step, "val_bpb": val_bpb, "total_training_flops": flops_per_token * args.total_batch_size * step},
                       f"step {step:05d} | validation bpb {val_bpb:.4f}")
            model.train()
        if args.core_metric_every > 0 and (last or every(step, args.core_metric_every)):
            from nanochat.core_eval import evaluate_core
            model.eval()
            with autocast():
                result = evaluate_core(model, tokenizer, eval_dir, max_per_task=args.core_metric_max_per_task, device=device)
            core = result["core"]
            logger.log({"step": step, "core_metric": core}, f"step {step:05d} | CORE {core:.4f}")
            model.train()
        if args.sample_every > 0 and rank == 0 and (last or every(step, args.sample_every)):
            model.eval()
            with autocast():
                for text in greedy_samples(model, tokenizer, SAMPLE_PROMPTS):
                    print0(f"sample: {text!r}")
            model.train()
        if step > start_step and (last or every(step, args.save_every)):
            meta = {"user_config": vars(args), "val_bpb": val_bpb, "accum": accum, "device_batch_size": B,
                    "num_iterations": num_iterations, "tokenizer_vocab_size": tokenizer.get_vocab_size()}
            save_training_state(ckpt_dir, step, model, optimizers, loaders, meta, device_type, rank, world_size)
        if last:
            break

        # ---- one optimizer step over `accum` micro-batches
        stats.begin()
        loss = accumulate_gradients(train_model, [next(loader) for loader in loaders], autocast, world_size,
                                    per_token=False)
        lrm = step_optimizers(args, model, optimizers, step, num_iterations, world_size)
        logger.log(*stats.end(step + 1, lrm, loss=all_reduce_sum(loss).item()))

    total_flops = flops_per_token * total_tokens
    rows = [("model tag", model_tag), ("depth", args.depth), ("parameters", f"{params['total']:,}"),
            ("FLOPs per token", f"{flops_per_token:e}"), ("training tokens", f"{total_tokens:,}"),
            ("steps", num_iterations), ("total FLOPs", f"{total_flops:e}"), ("min validation bpb", f"{min_val_bpb:.4f}"),
            ("final validation bpb", f"{val_bpb:.4f}"), ("CORE", "n/a" if core is None else f"{core:.4f}")]
    finish_stage("Base model training", rows, vars(args), {"val_bpb": min_val_bpb, "CORE": core,
                 "parameters": params["total"], "total_flops": total_flops}, stats, logger, world_size, device_type,
                 dtype, summary=f"wall {format_duration(time.time() - wall_start)} | total FLOPs {total_flops:e} | "
                                f"min validation bpb {min_val_bpb:.4f}")
    return {"val_bpb": val_bpb, "min_val_bpb": min_val_bpb, "steps": num_iterations}


if __name__ == "__main__":
    main(sys.argv[1:])
