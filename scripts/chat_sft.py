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
import dataclasses
import sys
import time

from nanochat.common import compute_cleanup, get_peak_memory, make_parser, positive_int, print0, synchronize
from nanochat.training import (StepLogger, accumulate_gradients, add_optimizer_flags, add_run_flags, add_stage_io_flags,
                               check_optimizer_flags, format_duration, init_device, load_chat_data_or_exit, lr_multiplier,
                               muon_momentum, open_stage_or_exit, optimizer_step, resume_or_exit, save_training_state,
                               set_learning_rates, setup_stage_optimizers, stage_error)
from tasks.mixtures import MIXTURES, describe_mixtures

CATEGORICAL = "ARC-Easy|ARC-Challenge|MMLU"


def get_args(argv=None):
    p = make_parser(__doc__ + "\nmixtures (--mixture):\n" + describe_mixtures())
    add_run_flags(p)
    add_stage_io_flags(p, "sft", sources=("mid", "base"))
    g = p.add_argument_group("data")
    g.add_argument("--mixture", default="reference", choices=list(MIXTURES), help="named mixture (listed above)")
    g.add_argument("--extra-data", default="", help="your own {'messages': [...]} JSONL(.gz) files: PATH[:WEIGHT],...")
    g = p.add_argument_group("optimization")
    g.add_argument("--num-epochs", type=positive_int, default=1, help="epochs of the mixture")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = from --num-epochs)")
    g.add_argument("--device-batch-size", type=positive_int, default=4, help="conversations per forward pass per device")
    g.add_argument("--examples-per-step", type=positive_int, default=32, help="conversations per optimizer step")
    add_optimizer_flags(g, init_lr_frac=0.02, warmdown_ratio=1.0)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=100, help="held-out loss every N steps (-1 = start and end only)")
    g.add_argument("--eval-conversations", type=positive_int, default=1000, help="held-out conversations evaluated")
    g.add_argument("--eval-metrics-every", type=int, default=200, help="chat tasks every N steps (-1 = end only)")
    g.add_argument("--eval-tasks", default=CATEGORICAL,
                   help="chat tasks, '|'-separated (GSM8K/HumanEval sample through the engine), or 'none'")
    g.add_argument("--eval-max-problems", type=positive_int, default=500, help="problems per chat task")
    args = p.parse_args(argv)
    check_optimizer_flags(p, args)
    return args


def main(argv=None):
    args = get_args(argv)
    from nanochat.chat_data import ConversationStream, PaddedLoader, conversation_loss

    device_type, rank, world_size, device, dtype, autocast = init_device(args.device_type, args.seed)

    model, tokenizer, ckpt_dir, start_step, resume_meta, origin = open_stage_or_exit("chat_sft", "sft", args.source,
                                                                                     device, args)
    mixture, eval_tasks = load_chat_data_or_exit("chat_sft", "sft", args)
    config = model.config
    T, B = config.sequence_len, args.device_batch_size
    if args.examples_per_step % (B * world_size):
        stage_error(f"chat_sft: --examples-per-step={args.examples_per_step} is not a multiple of --device-batch-size x "
                    f"world size = {B} x {world_size}")
    accum = args.examples_per_step // (B * world_size)
    print0(f"finetuning {origin['source']} {origin['model_tag']} step {origin['step']} -> {ckpt_dir}")
    print0(f"mixture {args.mixture}{' + ' + args.extra_data if args.extra_data else ''} (SFT weights):\n{mixture.summary()}")

    optimizers = setup_stage_optimizers(model, args)
    slots = world_size * accum
    try:
        streams = [ConversationStream(mixture, rank * accum + a, slots, seed=args.seed) for a in range(accum)]
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

    user_config = dict(vars(args))
    logger = StepLogger(ckpt_dir, args.run, user_config, rank=rank, resume=args.resume)
    if args.resume:
        resume_or_exit("chat_sft", logger, ckpt_dir, start_step, optimizers, loaders, device, device_type, rank,
                       world_size, accum)

    val_convs = [mixture.get(r) for r in mixture.val_rows(args.eval_conversations)]

    def save(step, val_loss, chat_metrics):
        meta = {"model_config": dataclasses.asdict(config), "user_config": user_config, "input": origin,
                "val_loss": val_loss, "chat_metrics": chat_metrics, "accum": accum, "device_batch_size": B,
                "num_iterations": num_iterations, "mixture": args.mixture, "extra_data": args.extra_data,
                "tokenizer_vocab_size": tokenizer.get_vocab_size()}
        save_training_state(ckpt_dir, step, model, optimizers, loaders, meta, device_type, rank, world_size)

    def chat_eval():
        from nanochat.chat_eval import run_chat_eval
        with autocast():
            return run_chat_eval(model, tokenizer, None, list(eval_tasks), max_problems=args.eval_max_problems,
                                 batch_size=B, tasks=eval_tasks, device=device)

    val_loss = resume_meta.get("val_loss") if resume_meta else None
    chat = None
    chat_metrics = resume_meta.get("chat_metrics") if resume_meta else None
    first_val_loss, min_val_loss = None, float("inf")
    smooth_loss, total_time, timed_steps = 0.0, 0.0, 0
    step = start_step
    while True:
        last = step == num_iterations
        fresh = not (args.resume and step == start_step)  # a resumed run logged its start already
        if fresh and (last or step == 0 or (args.eval_every > 0 and step % args.eval_every == 0)):
            model.eval()
            with autocast():
                val_loss = conversation_loss(model, tokenizer, val_convs, batch_size=B, device=device)
            model.train()
            first_val_loss = val_loss if first_val_loss is None else first_val_loss
            min_val_loss = min(min_val_loss, val_loss)
            logger.log({"step": step, "val_loss": val_loss}, f"step {step:05d} | held-out conversation loss {val_loss:.4f}")
        if eval_tasks and fresh and (last or (args.eval_metrics_every > 0 and step > 0 and step % args.eval_metrics_every == 0)):
            chat = chat_eval()
            chat_metrics = chat["metrics"]
            logger.log({"step": step, **chat_metrics},
                       f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in chat_metrics.items()))
        if step > start_step and (last or (args.save_every > 0 and step % args.save_every == 0)):
            save(step, val_loss, chat_metrics)
        if last:
            break

        synchronize(device_type)
        t0 = time.perf_counter()
        batches = [next(loader) for loader in loaders]
        train_loss = accumulate_gradients(model, batches, autocast, world_size)
        lrm = lr_multiplier(step, num_iterations, 0.0, args.warmdown_ratio, args.final_lr_frac)
        set_learning_rates(optimizers, lrm, momentum=muon_momentum(step))
        optimizer_step(model, optimizers, args.grad_clip, world_size)
        synchronize(device_type)
        dt = time.perf_counter() - t0
        step += 1
        if step > start_step + 1:
            total_time += dt
            timed_steps += 1
        smooth_loss = 0.9 * smooth_loss + 0.1 * train_loss
        debiased = smooth_loss / (1 - 0.9 ** (step - start_step))
        eta = (total_time / max(timed_steps, 1)) * (num_iterations - step)
        logger.log({"step": step, "loss": train_loss, "smooth_loss": debiased, "lrm": lrm, "dt": dt,
                    "examples_per_sec": args.examples_per_step / dt},
                   f"step {step:05d}/{num_iterations:05d} | loss {debiased:.4f} | lrm {lrm:.2f} | "
                   f"{args.examples_per_step / dt:,.1f} conversations/s | {format_duration(total_time)} elapsed | "
                   f"ETA {format_duration(eta)}")

    peak_mem = get_peak_memory(device_type)
    print0(f"peak memory {peak_mem / 2**20:,.0f} MiB | training time {format_duration(total_time)} | "
           f"held-out loss {val_loss:.4f}")
    if rank == 0:
        from nanochat.chat_eval import report_markdown
        from nanochat.report import write_section
        rows = [("input", f"{origin['source']} {origin['model_tag']} step {origin['step']}"), ("output", ckpt_dir),
                ("mixture", args.mixture + (f" + {args.extra_data}" if args.extra_data else "")),
                ("steps", num_iterations), ("conversations per step", args.examples_per_step),
                ("held-out loss at start", "n/a (resumed)" if first_val_loss is None or args.resume else f"{first_val_loss:.4f}"),
                ("held-out loss at end", f"{val_loss:.4f}"), ("training time", format_duration(total_time)),
                ("peak memory (MiB)", f"{peak_mem / 2**20:,.0f}"), ("world size", world_size), ("device", device_type),
                ("dtype", str(dtype).removeprefix("torch."))]
        body = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
        body += f"\n\nmixture (SFT weights):\n\n{mixture.summary()}"
        if chat is not None:
            body += "\n\nchat evaluation:\n\n" + report_markdown(chat)
        flags = " ".join(f"--{k.replace('_', '-')}={v}" for k, v in user_config.items() if v not in (None, ""))
        metrics = {"val_loss": val_loss, "training_seconds": total_time, **(chat_metrics or {})}
        if device_type == "cuda":
            metrics["gpu_hours"] = world_size * total_time / 3600
        write_section("Chat SFT", f"{body}\n\nflags: `{flags}`", metrics=metrics)
    logger.finish()
    compute_cleanup()
    return {"val_loss": val_loss, "first_val_loss": first_val_loss, "min_val_loss": min_val_loss, "steps": num_iterations,
            "ckpt_dir": ckpt_dir, "chat_eval": chat_metrics}


if __name__ == "__main__":
    main(sys.argv[1:])
