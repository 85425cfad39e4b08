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
import math
import sys

import torch

from nanochat.common import all_reduce_sum, get_peak_flops, make_parser, positive_int, print0
from nanochat.training import (HeldOutLoss, StepLogger, StepStats, accumulate_gradients, every, finish_stage,
                               grad_accum_steps, init_device, save_training_state, stage_steps)
from tasks.mixtures import describe_mixtures

from ._cli import (CATEGORICAL, add_chat_data_flags, add_optimizer_flags, add_run_flags, add_stage_io_flags,
                   check_optimizer_flags, load_chat_data_or_exit, open_stage_or_exit, resume_or_exit,
                   setup_stage_optimizers, stage_error, step_optimizers, use_compile)


def get_args(argv=None):
    p = make_parser(__doc__ + "\nmixtures (--mixture):\n" + describe_mixtures())
    add_run_flags(p)
    add_stage_io_flags(p, "mid", sources=("base",))
    g = add_chat_data_flags(p, eval_every=150, with_mask_loss=True)
    g.add_argument("--eval-tasks", default=CATEGORICAL, help="chat tasks evaluated at the end, '|'-separated, or 'none'")
    g.add_argument("--eval-max-problems", type=positive_int, default=500, help="problems per chat task")
    g = p.add_argument_group("optimization")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = one epoch of the mixture)")
    g.add_argument("--device-batch-size", type=positive_int, default=32, help="rows per forward pass per device")
    g.add_argument("--total-batch-size", type=positive_int, default=524288, help="tokens per optimizer step")
    add_optimizer_flags(g, init_lr_frac=1.0, warmdown_ratio=0.2,
                        warmdown_help="fraction of steps of linear decay at the end", with_compile=True)
    return check_optimizer_flags(p, p.parse_args(argv))


def main(argv=None):
    args = get_args(argv)
    from nanochat.chat_data import ConversationStream, PackedLoader, estimate_epoch_tokens

    device_type, rank, world_size, device, dtype, autocast = init_device(args.device_type, args.seed)

    # ---- the model: a base checkpoint, or our own last checkpoint when resuming
    model, tokenizer, ckpt_dir, start_step, resume_meta, origin = open_stage_or_exit("mid_train", "mid", "base",
                                                                                     device, args)
    mixture, eval_tasks = load_chat_data_or_exit("mid_train", "mid", args)
    T, B = model.config.sequence_len, args.device_batch_size
    try:
        accum = grad_accum_steps(args.total_batch_size, B, T, world_size)
    except ValueError as e:
        stage_error(f"mid_train: {e} (the context length {T} comes from the checkpoint)")
    input_name = "{source} {model_tag} step {step}".format(**origin)
    mixture_name = args.mixture + (f" + {args.extra_data}" if args.extra_data else "")
    print0(f"continuing {input_name} -> {ckpt_dir}")
    print0(f"mixture {mixture_name} (midtraining weights):\n{mixture.summary()}")

    # ---- data: one packed-row loader per data-parallel slot (rank x micro-step)
    train_model = torch.compile(model, dynamic=False) if use_compile(args, device_type) else model
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

    logger = StepLogger(ckpt_dir, args.run, vars(args), rank=rank, resume=args.resume)
    if args.resume:
        resume_or_exit("mid_train", logger, ckpt_dir, start_step, optimizers, loaders, device, device_type, rank,
                       world_size, accum)
    held_out = HeldOutLoss(model, tokenizer, [mixture.get(r) for r in mixture.val_rows(args.eval_conversations)], B,
                           device, autocast, logger, last=(resume_meta or {}).get("val_loss"))
    flops_per_token = model.estimate_flops()
    stats = StepStats(num_iterations, start_step, device_type, per_step=args.total_batch_size,
                      flops_per_unit=flops_per_token, peak_flops=get_peak_flops(device_type, dtype) * world_size)

    for step, last, fresh in stage_steps(start_step, num_iterations, args.resume):
        # ---- held-out loss and checkpoint, on the weights after `step` steps
        if fresh and (last or step == 0 or every(step, args.eval_every)):
            held_out.evaluate(step, total_training_flops=flops_per_token * args.total_batch_size * step)
        if step > start_step and (last or every(step, args.save_every)):
            meta = {"user_config": vars(args), "input": origin, "val_loss": held_out.last, "accum": accum,
                    "device_batch_size": B, "num_iterations": num_iterations, "mixture": args.mixture,
                    "extra_data": args.extra_data, "tokenizer_vocab_size": tokenizer.get_vocab_size()}
            save_training_state(ckpt_dir, step, model, optimizers, loaders, meta, device_type, rank, world_size)
        if last:
            break

        # ---- one optimizer step over `accum` micro-batches
        stats.begin()
        loss = accumulate_gradients(train_model, [next(loader) for loader in loaders], autocast, world_size)
        lrm = step_optimizers(args, model, optimizers, step, num_iterations, world_size)
        logger.log(*stats.end(step + 1, lrm, loss=all_reduce_sum(loss).item()))

    # ---- the categorical chat evaluations, and the report
    chat = chat_metrics = None
    if eval_tasks:
        from nanochat.chat_eval import report_markdown, run_chat_eval
        with autocast():
            chat = run_chat_eval(model, tokenizer, None, list(eval_tasks), max_problems=args.eval_max_problems,
                                 batch_size=B, tasks=eval_tasks, device=device)
        chat_metrics = chat["metrics"]
    rows = [("input", input_name), ("output", ckpt_dir), ("mixture", mixture_name),
            ("loss on", "assistant tokens only" if args.mask_loss else "all tokens"), ("steps", num_iterations),
            ("training tokens", f"{args.total_batch_size * num_iterations:,}"), *held_out.report_rows(args.resume)]
    extra = f"\n\nmixture (midtraining weights):\n\n{mixture.summary()}" + (
        f"\n\nchat evaluation:\n\n{report_markdown(chat)}" if chat is not None else "")
    finish_stage("Midtraining", rows, vars(args), {"val_loss": held_out.last, **(chat_metrics or {})}, stats, logger,
                 world_size, device_type, dtype, summary=f"held-out loss {held_out.last:.4f}", extra=extra)
    return {"val_loss": held_out.last, "first_val_loss": held_out.first, "min_val_loss": held_out.min,
            "steps": num_iterations, "ckpt_dir": ckpt_dir, "chat_eval": chat_metrics}


if __name__ == "__main__":
    main(sys.argv[1:])
