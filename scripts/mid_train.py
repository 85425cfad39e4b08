"""
Midtraining: continue a base model on conversations rendered in the chat format, packed into full rows,
so it learns the special tokens, turn taking and (with the reference mixture) multiple-choice answers and
calculator tool calls. Writes mid checkpoints; reports held-out conversation loss and the categorical
chat evaluations.

    python -m scripts.mid_train                                           # largest base model, reference mixture
    torchrun --nproc_per_node=8 -m scripts.mid_train -- --mixture=english-chat
    python -m scripts.mid_train --model-tag=d4 --device-batch-size=4 --total-batch-size=4096 \\
        --num-iterations=50 --eval-max-problems=50                        # tiny, CPU
    python -m scripts.mid_train --extra-data=my_chats.jsonl:2             # your conversations, seen twice per epoch

Held-out loss (val_loss) is the mean loss on the assistant tokens of each source's fixed validation slice,
the same number SFT reports, so the two stages compare.
"""
import dataclasses
import math
import sys
import time

import torch

from nanochat.common import (compute_cleanup, get_peak_flops, get_peak_memory, make_parser, positive_int, print0,
                             str2bool, synchronize)
from nanochat.training import (StepLogger, accumulate_gradients, add_optimizer_flags, add_run_flags, add_stage_io_flags,
                               check_optimizer_flags, format_duration, grad_accum_steps, init_device,
                               load_chat_data_or_exit, lr_multiplier, muon_momentum, open_stage_or_exit, optimizer_step,
                               resume_or_exit, save_training_state, set_learning_rates, setup_stage_optimizers,
                               stage_error, throughput)
from tasks.mixtures import MIXTURES, describe_mixtures

CATEGORICAL = "ARC-Easy|ARC-Challenge|MMLU"


def get_args(argv=None):
    p = make_parser(__doc__ + "\nmixtures (--mixture):\n" + describe_mixtures())
    add_run_flags(p)
    add_stage_io_flags(p, "mid", sources=("base",))
    g = p.add_argument_group("data")
    g.add_argument("--mixture", default="reference", choices=list(MIXTURES), help="named mixture (listed above)")
    g.add_argument("--extra-data", default="", help="your own {'messages': [...]} JSONL(.gz) files: PATH[:WEIGHT],...")
    g.add_argument("--mask-loss", type=str2bool, default=False,
                   help="loss only on the assistant's tokens (default: on every token, as the reference)")
    g = p.add_argument_group("optimization")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = one epoch of the mixture)")
    g.add_argument("--device-batch-size", type=positive_int, default=32, help="rows per forward pass per device")
    g.add_argument("--total-batch-size", type=positive_int, default=524288, help="tokens per optimizer step")
    add_optimizer_flags(g, init_lr_frac=1.0, warmdown_ratio=0.2,
                        warmdown_help="fraction of steps of linear decay at the end", with_compile=True)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=150, help="held-out loss every N steps (-1 = start and end only)")
    g.add_argument("--eval-conversations", type=positive_int, default=1000, help="held-out conversations evaluated")
    g.add_argument("--eval-tasks", default=CATEGORICAL, help="chat tasks evaluated at the end, '|'-separated, or 'none'")
    g.add_argument("--eval-max-problems", type=positive_int, default=500, help="problems per chat task")
    args = p.parse_args(argv)
    check_optimizer_flags(p, args)
    return args


def main(argv=None):
    args = get_args(argv)
    from nanochat.chat_data import ConversationStream, PackedLoader, conversation_loss, estimate_epoch_tokens

    device_type, rank, world_size, device, dtype, autocast = init_device(args.device_type, args.seed)

    # ---- the model: a base checkpoint, or our own last checkpoint when resuming
    model, tokenizer, ckpt_dir, start_step, resume_meta, origin = open_stage_or_exit("mid_train", "mid", "base",
                                                                                     device, args)
    mixture, eval_tasks = load_chat_data_or_exit("mid_train", "mid", args)
    config = model.config
    T, B = config.sequence_len, args.device_batch_size
    try:
        accum = grad_accum_steps(args.total_batch_size, B, T, world_size)
    except ValueError as e:
        stage_error(f"mid_train: {e} (the context length {T} comes from the checkpoint)")
    print0(f"continuing {origin['source']} {origin['model_tag']} step {origin['step']} -> {ckpt_dir}")
    print0(f"mixture {args.mixture}{' + ' + args.extra_data if args.extra_data else ''} (midtraining weights):\n"
           f"{mixture.summary()}")

    flops_per_token = model.estimate_flops()
    use_compile = args.compile == "true" or (args.compile == "auto" and device_type == "cuda")
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    optimizers = setup_stage_optimizers(model, args)
    slots = world_size * accum
    try:
        loaders = [PackedLoader(tokenizer, ConversationStream(mixture, rank * accum + a, slots, seed=args.seed), B, T,
                                device=device, mask_loss=args.mask_loss) for a in range(accum)]
    except ValueError as e:
        stage_error(f"mid_train: {e}")

    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif resume_meta is not None:
        num_iterations = resume_meta["num_iterations"]
    else:
        epoch_tokens = estimate_epoch_tokens(tokenizer, mixture, seed=args.seed)
        num_iterations = max(1, math.ceil(epoch_tokens / args.total_batch_size))
        print0(f"one epoch of the mixture is ~{epoch_tokens:,} tokens")
    print0(f"batch: {B} rows x {T} tokens x {world_size} rank(s) x {accum} accumulation step(s) = "
           f"{args.total_batch_size:,} tokens/step; {num_iterations:,} steps")

    user_config = dict(vars(args))
    logger = StepLogger(ckpt_dir, args.run, user_config, rank=rank, resume=args.resume)
    if args.resume:
        resume_or_exit("mid_train", logger, ckpt_dir, start_step, optimizers, loaders, device, device_type, rank,
                       world_size, accum)

    val_convs = [mixture.get(r) for r in mixture.val_rows(args.eval_conversations)]

    def save(step, val_loss):
        meta = {"model_config": dataclasses.asdict(config), "user_config": user_config, "input": origin,
                "val_loss": val_loss, "accum": accum, "device_batch_size": B, "num_iterations": num_iterations,
                "mixture": args.mixture, "extra_data": args.extra_data, "tokenizer_vocab_size": tokenizer.get_vocab_size()}
        save_training_state(ckpt_dir, step, model, optimizers, loaders, meta, device_type, rank, world_size)

    peak = get_peak_flops(device_type, dtype)
    val_loss = resume_meta.get("val_loss") if resume_meta else None
    first_val_loss, min_val_loss = None, float("inf")
    smooth_loss, total_time, timed_steps = 0.0, 0.0, 0
    step = start_step
    while True:
        last = step == num_iterations
        # ---- held-out loss and checkpoint, on the weights after `step` steps (a resumed run logged its start already)
        if (last or (args.eval_every > 0 and step % args.eval_every == 0) or step == 0) and not (args.resume and step == start_step):
            model.eval()
            with autocast():
                val_loss = conversation_loss(model, tokenizer, val_convs, batch_size=B, device=device)
            model.train()
            first_val_loss = val_loss if first_val_loss is None else first_val_loss
            min_val_loss = min(min_val_loss, val_loss)
            logger.log({"step": step, "val_loss": val_loss, "total_training_flops": flops_per_token * args.total_batch_size * step},
                       f"step {step:05d} | held-out conversation loss {val_loss:.4f}")
        if step > start_step and (last or (args.save_every > 0 and step % args.save_every == 0)):
            save(step, val_loss)
        if last:
            break

        # ---- one optimizer step over `accum` micro-batches
        synchronize(device_type)
        t0 = time.perf_counter()
        batches = [next(loader) for loader in loaders]
        train_loss = accumulate_gradients(train_model, batches, autocast, world_size)
        lrm = lr_multiplier(step, num_iterations, 0.0, args.warmdown_ratio, args.final_lr_frac)
        set_learning_rates(optimizers, lrm, momentum=muon_momentum(step))
        optimizer_step(model, optimizers, args.grad_clip, world_size)
        synchronize(device_type)
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
                   f"step {step:05d}/{num_iterations:05d} | loss {debiased:.4f} | lrm {lrm:.2f} | {tok_per_sec:,.0f} tok/s | "
                   f"MFU {100 * mfu:.2f}% | {format_duration(total_time)} elapsed | ETA {format_duration(eta)}")

    # ---- the categorical chat evaluations
    chat = None
    if eval_tasks:
        from nanochat.chat_eval import report_markdown, run_chat_eval
        with autocast():
            chat = run_chat_eval(model, tokenizer, None, list(eval_tasks), max_problems=args.eval_max_problems,
                                 batch_size=B, tasks=eval_tasks, device=device)
    peak_mem = get_peak_memory(device_type)
    print0(f"peak memory {peak_mem / 2**20:,.0f} MiB | training time {format_duration(total_time)} | "
           f"held-out loss {val_loss:.4f}")
    if rank == 0:
        from nanochat.report import write_section
        tokens = args.total_batch_size * num_iterations
        rows = [("input", f"{origin['source']} {origin['model_tag']} step {origin['step']}"), ("output", ckpt_dir),
                ("mixture", args.mixture + (f" + {args.extra_data}" if args.extra_data else "")),
                ("loss on", "assistant tokens only" if args.mask_loss else "all tokens"),
                ("steps", num_iterations), ("training tokens", f"{tokens:,}"),
                ("held-out loss at start", "n/a (resumed)" if first_val_loss is None or args.resume else f"{first_val_loss:.4f}"),
                ("held-out loss at end", f"{val_loss:.4f}"), ("training time", format_duration(total_time)),
                ("peak memory (MiB)", f"{peak_mem / 2**20:,.0f}"), ("world size", world_size), ("device", device_type),
                ("dtype", str(dtype).removeprefix("torch."))]
        body = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
        body += f"\n\nmixture (midtraining weights):\n\n{mixture.summary()}"
        if chat is not None:
            body += "\n\nchat evaluation:\n\n" + report_markdown(chat)
        flags = " ".join(f"--{k.replace('_', '-')}={v}" for k, v in user_config.items() if v not in (None, ""))
        metrics = {"val_loss": val_loss, "training_seconds": total_time, **(chat["metrics"] if chat else {})}
        if device_type == "cuda":
            metrics["gpu_hours"] = world_size * total_time / 3600
        write_section("Midtraining", f"{body}\n\nflags: `{flags}`", metrics=metrics)
    logger.finish()
    compute_cleanup()
    return {"val_loss": val_loss, "first_val_loss": first_val_loss, "min_val_loss": min_val_loss, "steps": num_iterations,
            "ckpt_dir": ckpt_dir, "chat_eval": chat["metrics"] if chat else None}


if __name__ == "__main__":
    main(sys.argv[1:])
