"""
Supervised finetuning: one conversation per row (padded per batch), loss only on the tokens the assistant
must learn (its replies and tool calls; never the user's turns or tool outputs). Starts from a mid
checkpoint (or a base one with --source=base) and writes sft checkpoints; evaluates held-out conversation
loss and the chat tasks during and after training.

    python -m scripts.chat_sft                                            # largest mid model, reference mixture
    torchrun --nproc_per_node=8 -m scripts.chat_sft -- --mixture=english-chat
    python -m scripts.chat_sft --model-tag=d4 --device-batch-size=4 --examples-per-step=8 \\
        --num-iterations=50 --eval-max-problems=50                        # tiny, CPU
    python -m scripts.chat_sft --extra-data=my_chats.jsonl:4              # your conversations, 4x per epoch

Rows are truncated to the model's context. The steps of an epoch are the training rows per epoch of the
mixture (SFT weights) / --examples-per-step. Held-out loss (val_loss) is the mean loss on the assistant tokens
of each source's fixed validation slice, the same number midtraining reports.
"""
import sys

from nanochat.common import all_reduce_sum, make_parser, positive_int, print0
from nanochat.training import (HeldOutLoss, StepLogger, StepStats, accumulate_gradients, every, finish_stage,
                               init_device, save_training_state, stage_steps)
from tasks.mixtures import describe_mixtures

from ._cli import (CATEGORICAL, add_chat_data_flags, add_optimizer_flags, add_run_flags, add_stage_io_flags,
                   check_optimizer_flags, load_chat_data_or_exit, open_stage_or_exit, resume_or_exit,
                   setup_stage_optimizers, stage_error, step_optimizers)


def get_args(argv=None):
    p = make_parser(__doc__ + "\nmixtures (--mixture):\n" + describe_mixtures())
    add_run_flags(p)
    add_stage_io_flags(p, "sft", sources=("mid", "base"))
    g = add_chat_data_flags(p, eval_every=100)
    g.add_argument("--eval-metrics-every", type=int, default=200, help="chat tasks every N steps (-1 = end only)")
    g.add_argument("--eval-tasks", default=CATEGORICAL,
                   help="chat tasks, '|'-separated (GSM8K/HumanEval sample through the engine), or 'none'")
    g.add_argument("--eval-max-problems", type=positive_int, default=500, help="problems per chat task")
    g = p.add_argument_group("optimization")
    g.add_argument("--num-epochs", type=positive_int, default=1, help="epochs of the mixture")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = from --num-epochs)")
    g.add_argument("--device-batch-size", type=positive_int, default=4, help="conversations per forward pass per device")
    g.add_argument("--examples-per-step", type=positive_int, default=32, help="conversations per optimizer step")
    add_optimizer_flags(g, init_lr_frac=0.02, warmdown_ratio=1.0)
    return check_optimizer_flags(p, p.parse_args(argv))


def main(argv=None):
    args = get_args(argv)
    from nanochat.chat_data import ConversationStream, PaddedLoader
    from nanochat.chat_eval import report_markdown, run_chat_eval

    device_type, rank, world_size, device, dtype, autocast = init_device(args.device_type, args.seed)

    # ---- the model: a mid (or base) checkpoint, or our own last checkpoint when resuming
    model, tokenizer, ckpt_dir, start_step, resume_meta, origin = open_stage_or_exit("chat_sft", "sft", args.source,
                                                                                     device, args)
    mixture, eval_tasks = load_chat_data_or_exit("chat_sft", "sft", args)
    T, B = model.config.sequence_len, args.device_batch_size
    if args.examples_per_step % (B * world_size):
        stage_error(f"chat_sft: --examples-per-step={args.examples_per_step} is not a multiple of --device-batch-size x "
                    f"world size = {B} x {world_size}")
    accum = args.examples_per_step // (B * world_size)
    input_name = "{source} {model_tag} step {step}".format(**origin)
    mixture_name = args.mixture + (f" + {args.extra_data}" if args.extra_data else "")
    print0(f"finetuning {input_name} -> {ckpt_dir}")
    print0(f"mixture {mixture_name} (SFT weights):\n{mixture.summary()}")

    # ---- data: one padded-row loader per data-parallel slot (rank x micro-step)
    optimizers = setup_stage_optimizers(model, args)
    try:
        streams = [ConversationStream(mixture, rank * accum + a, world_size * accum, seed=args.seed)
                   for a in range(accum)]
    except ValueError as e:
        stage_error(f"chat_sft: {e}")
    loaders = [PaddedLoader(tokenizer, s, B, T, device=device) for s in streams]
    steps_per_epoch = streams[0].rows_per_epoch() // B
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif steps_per_epoch == 0:
        stage_error(f"chat_sft: one epoch of the mixture ({len(mixture)} rows) is less than one step of "
                    f"{args.examples_per_step} examples; lower --examples-per-step or pass --num-iterations")
    else:
        num_iterations = args.num_epochs * steps_per_epoch
    print0(f"batch: {B} conversations x {world_size} rank(s) x {accum} accumulation step(s) = {args.examples_per_step} "
           f"per step; {steps_per_epoch:,} steps per epoch; {num_iterations:,} steps")

    logger = StepLogger(ckpt_dir, args.run, vars(args), rank=rank, resume=args.resume)
    if args.resume:
        resume_or_exit("chat_sft", logger, ckpt_dir, start_step, optimizers, loaders, device, device_type, rank,
                       world_size, accum)
    held_out = HeldOutLoss(model, tokenizer, [mixture.get(r) for r in mixture.val_rows(args.eval_conversations)], B,
                           device, autocast, logger, last=(resume_meta or {}).get("val_loss"))
    stats = StepStats(num_iterations, start_step, device_type, per_step=args.examples_per_step,
                      rate_key="examples_per_sec", rate_unit="conversations/s")

    chat, chat_metrics = None, (resume_meta or {}).get("chat_metrics")
    for step, last, fresh in stage_steps(start_step, num_iterations, args.resume):
        # ---- held-out loss, chat tasks and checkpoint, on the weights after `step` steps
        if fresh and (last or step == 0 or every(step, args.eval_every)):
            held_out.evaluate(step)
        if eval_tasks and fresh and (last or every(step, args.eval_metrics_every)):
            with autocast():
                chat = run_chat_eval(model, tokenizer, None, list(eval_tasks), max_problems=args.eval_max_problems,
                                     batch_size=B, tasks=eval_tasks, device=device)
            chat_metrics = chat["metrics"]
            logger.log({"step": step, **chat_metrics},
                       f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in chat_metrics.items()))
        if step > start_step and (last or every(step, args.save_every)):
            meta = {"user_config": vars(args), "input": origin, "val_loss": held_out.last, "chat_metrics": chat_metrics,
                    "accum": accum, "device_batch_size": B, "num_iterations": num_iterations, "mixture": args.mixture,
                    "extra_data": args.extra_data, "tokenizer_vocab_size": tokenizer.get_vocab_size()}
            save_training_state(ckpt_dir, step, model, optimizers, loaders, meta, device_type, rank, world_size)
        if last:
            break

        # ---- one optimizer step over `accum` micro-batches, every target token weighing the same
        stats.begin()
        loss = accumulate_gradients(model, [next(loader) for loader in loaders], autocast, world_size)
        lrm = step_optimizers(args, model, optimizers, step, num_iterations, world_size)
        logger.log(*stats.end(step + 1, lrm, loss=all_reduce_sum(loss).item()))

    rows = [("input", input_name), ("output", ckpt_dir), ("mixture", mixture_name), ("steps", num_iterations),
            ("conversations per step", args.examples_per_step), *held_out.report_rows(args.resume)]
    extra = f"\n\nmixture (SFT weights):\n\n{mixture.summary()}" + (
        f"\n\nchat evaluation:\n\n{report_markdown(chat)}" if chat is not None else "")
    finish_stage("Chat SFT", rows, vars(args), {"val_loss": held_out.last, **(chat_metrics or {})}, stats, logger,
                 world_size, device_type, dtype, summary=f"held-out loss {held_out.last:.4f}", extra=extra)
    return {"val_loss": held_out.last, "first_val_loss": held_out.first, "min_val_loss": held_out.min,
            "steps": num_iterations, "ckpt_dir": ckpt_dir, "chat_eval": chat_metrics}


if __name__ == "__main__":
    main(sys.argv[1:])
