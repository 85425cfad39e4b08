"""
Reinforcement learning (optional stage): for each GSM8K training problem, sample --num-samples replies through
the inference engine (with calculator tool use), reward 1 for a correct final answer, and take a policy-gradient
step on the sampled tokens weighted by reward minus the group's mean reward (nanochat/rl.py). Forced tool
outputs and the prompt never receive gradient. Evaluates pass@k on GSM8K test problems during training;
writes rl checkpoints.

    python -m scripts.chat_rl                                             # largest sft model, GSM8K
    torchrun --nproc_per_node=8 -m scripts.chat_rl -- --num-samples=16
    python -m scripts.chat_rl --task=toy --model-tag=d4 --prompts-per-step=4 --num-samples=8 \\
        --max-new-tokens=8 --num-iterations=30                            # a toy reward a tiny CPU model can learn

--task=toy asks for a letter repeated and rewards the fraction of the reply's letters that are that letter
(tasks/toy.py): a dense reward for testing the machinery on CPU. Each prompt's samples are seeded by the
prompt's position in the run, so the samples do not depend on how prompts are split across ranks.
"""
import sys

import torch

from nanochat.common import all_reduce_sum, make_parser, positive_int, print0, str2bool
from nanochat.training import (StepLogger, StepStats, all_reduce_mean, every, finish_stage, init_device,
                               save_training_state, stage_steps)

from ._cli import (add_optimizer_flags, add_run_flags, add_stage_io_flags, check_optimizer_flags, open_stage_or_exit,
                   resume_or_exit, setup_stage_optimizers, stage_error, step_optimizers)

TASKS = ("gsm8k", "toy")


def get_args(argv=None):
    p = make_parser(__doc__)
    add_run_flags(p, seed_help="sampling seed")
    add_stage_io_flags(p, "rl", sources=("sft", "mid", "base"))
    g = p.add_argument_group("task and sampling")
    g.add_argument("--task", default="gsm8k", choices=TASKS, help="gsm8k: train split for training, test split for pass@k")
    g.add_argument("--toy-letter", default="e", help="the letter the toy task rewards")
    g.add_argument("--prompts-per-step", type=positive_int, default=16, help="prompts per optimizer step (all ranks)")
    g.add_argument("--num-samples", type=positive_int, default=16, help="completions sampled per prompt")
    g.add_argument("--device-batch-size", type=positive_int, default=8, help="rows per generate call and per forward pass")
    g.add_argument("--max-new-tokens", type=positive_int, default=256)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=50, help="0 = off")
    g.add_argument("--normalize-advantages", type=str2bool, default=False, help="divide advantages by the group's std")
    g = p.add_argument_group("optimization")
    g.add_argument("--num-epochs", type=positive_int, default=1, help="passes over the training prompts")
    g.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1 = from --num-epochs)")
    add_optimizer_flags(g, init_lr_frac=0.05, warmdown_ratio=1.0)
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=60, help="pass@k every N steps (-1 = start and end only)")
    g.add_argument("--eval-problems", type=positive_int, default=400, help="evaluation problems (a fixed sample)")
    g.add_argument("--eval-samples", type=positive_int, default=4, help="samples per problem: pass@1 .. pass@k")
    args = check_optimizer_flags(p, p.parse_args(argv))
    if not args.temperature > 0:
        p.error("argument --temperature: must be positive (RL samples)")
    if args.top_k < 0:
        p.error("argument --top-k: must be >= 0")
    return args


def make_tasks(args):
    """(training task, evaluation task)."""
    if args.task == "toy":
        from tasks.toy import ToyLetters
        return ToyLetters(args.toy_letter), ToyLetters(args.toy_letter, num_examples=64, seed=1)
    from tasks.gsm8k import GSM8K
    return GSM8K(split="train"), GSM8K(split="test")


def main(argv=None):
    args = get_args(argv)
    from nanochat.chat_eval import pass_at_k, problem_order
    from nanochat.rl import group_advantages, policy_gradient_loss, rollout_batch, split_completion

    device_type, rank, world_size, device, dtype, autocast = init_device(args.device_type, args.seed)

    model, tokenizer, ckpt_dir, start_step, resume_meta, origin = open_stage_or_exit("chat_rl", "rl", args.source,
                                                                                     device, args)
    try:
        train_task, eval_task = make_tasks(args)
    except (OSError, ValueError) as e:
        stage_error(f"chat_rl: data error: {e}")
    if args.prompts_per_step % world_size:
        stage_error(f"chat_rl: --prompts-per-step={args.prompts_per_step} is not a multiple of the world size {world_size}")
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    P, B, K = args.prompts_per_step, args.device_batch_size, args.eval_samples
    steps_per_epoch = len(train_task) // P
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif steps_per_epoch == 0:
        stage_error(f"chat_rl: {len(train_task)} training prompts are fewer than --prompts-per-step={P}")
    else:
        num_iterations = args.num_epochs * steps_per_epoch
    input_name = "{source} {model_tag} step {step}".format(**origin)
    print0(f"rl on {args.task}: {input_name} -> {ckpt_dir}")
    print0(f"{P} prompts x {args.num_samples} samples per step over {world_size} rank(s); {num_iterations:,} steps")

    optimizers = setup_stage_optimizers(model, args)
    logger = StepLogger(ckpt_dir, args.run, vars(args), rank=rank, resume=args.resume)
    if args.resume:
        resume_or_exit("chat_rl", logger, ckpt_dir, start_step, optimizers, [], device, device_type, rank, world_size)

    def sample(prompt, n, seed):
        """n completions of one prompt: (token lists, sampled-flag lists)."""
        pairs = []
        for chunk, start in enumerate(range(0, n, B)):
            with autocast():
                results, masks = engine.generate_batch(prompt, num_samples=min(B, n - start), max_tokens=args.max_new_tokens,
                                                       temperature=args.temperature, top_k=args.top_k or None,
                                                       seed=seed * 1009 + chunk)
            pairs += [split_completion(prompt, result, mask) for result, mask in zip(results, masks)]
        return [c for c, _ in pairs], [m for _, m in pairs]

    def evaluate(step):
        """pass@1..K on a fixed sample of evaluation problems, summed over ranks."""
        model.eval()
        order = problem_order(len(eval_task), args.eval_problems)
        counts = torch.zeros(K + 1, dtype=torch.float64)  # pass@1..K, number of problems
        for i in order[rank::world_size]:
            conv = eval_task[i]
            completions, _ = sample(tokenizer.render_for_completion(conv), K, seed=10**9 + args.seed * 100_003 + i)
            outcomes = [eval_task.evaluate(conv, tokenizer.decode(c)) for c in completions]
            counts[:K] += torch.tensor([pass_at_k(outcomes, k) for k in range(1, K + 1)], dtype=torch.float64)
            counts[K] += 1
        counts = all_reduce_sum(counts)
        model.train()
        result = {f"pass@{k}": (counts[k - 1] / counts[K]).item() for k in range(1, K + 1)}
        logger.log({"step": step, **result}, f"step {step:05d} | " + " | ".join(f"{k} {v:.4f}" for k, v in result.items()))
        return result

    first_eval, evals = None, (resume_meta or {}).get("pass_at_k")
    rewards_log = []
    stats = StepStats(num_iterations, start_step, device_type, per_step=P * args.num_samples, rate_key="samples_per_sec",
                      rate_unit="samples/s")
    for step, last, fresh in stage_steps(start_step, num_iterations, args.resume):
        # ---- pass@k and checkpoint, on the weights after `step` steps
        if fresh and (last or step == 0 or every(step, args.eval_every)):
            evals = evaluate(step)
            first_eval = evals if first_eval is None else first_eval
        if step > start_step and (last or every(step, args.save_every)):
            meta = {"user_config": vars(args), "input": origin, "task": args.task, "pass_at_k": evals, "accum": 1,
                    "num_iterations": num_iterations, "tokenizer_vocab_size": tokenizer.get_vocab_size()}
            save_training_state(ckpt_dir, step, model, optimizers, [], meta, device_type, rank, world_size)
        if last:
            break

        stats.begin()
        # ---- sample this rank's prompts (prompt j of the step is global prompt step * P + j)
        model.eval()
        rollouts, rewards_mine, lengths = [], [], []
        for j in range(rank, P, world_size):
            index = step * P + j
            conv = train_task[index % len(train_task)]
            prompt = tokenizer.render_for_completion(conv)
            completions, sampled = sample(prompt, args.num_samples, seed=args.seed * 100_003 + index)
            rewards = [train_task.reward(conv, tokenizer.decode(c)) for c in completions]
            rollouts.append((prompt, completions, sampled, group_advantages(rewards, args.normalize_advantages)))
            rewards_mine += rewards
            lengths += [len(c) for c in completions]
        model.train()
        # ---- one policy-gradient step, normalized by the sampled tokens of the whole step on all ranks
        count = all_reduce_sum(torch.tensor(float(sum(sum(m) for _, _, sampled, _ in rollouts for m in sampled)), device=device))
        normalizer = count.clamp(min=1.0) / world_size  # the distributed optimizers average over ranks
        for prompt, completions, sampled, adv in rollouts:
            for s in range(0, len(completions), B):
                x, y = rollout_batch(prompt, completions[s:s + B], sampled[s:s + B], tokenizer.get_bos_token_id())
                with autocast():
                    loss = policy_gradient_loss(model, x.to(device), y.to(device), adv[s:s + B], normalizer)
                loss.backward()
        lrm = step_optimizers(args, model, optimizers, step, num_iterations, world_size, momentum=False)
        mean_reward = all_reduce_mean(sum(rewards_mine) / len(rewards_mine), device, world_size)
        mean_length = all_reduce_mean(sum(lengths) / len(lengths), device, world_size)
        rewards_log.append(mean_reward)
        logger.log(*stats.end(step + 1, lrm, reward=mean_reward, completion_tokens=mean_length))

    window = max(1, min(10, len(rewards_log) // 4))
    reward_start = sum(rewards_log[:window]) / window if rewards_log else None
    reward_end = sum(rewards_log[-window:]) / window if rewards_log else None
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    rows = [("input", input_name), ("output", ckpt_dir), ("task", args.task), ("steps", num_iterations),
            ("prompts x samples per step", f"{P} x {args.num_samples}"),
            (f"mean reward, first {window} steps", fmt(reward_start)), (f"mean reward, last {window} steps", fmt(reward_end))]
    for k in range(1, K + 1):
        rows.append((f"pass@{k} start -> end ({args.eval_problems} problems max)",
                     f"{fmt((first_eval or {}).get(f'pass@{k}'))} -> {fmt((evals or {}).get(f'pass@{k}'))}"))
    finish_stage("Chat RL", rows, vars(args), {"mean_reward": reward_end, **(evals or {})}, stats, logger, world_size,
                 device_type, dtype, summary=f"mean reward {fmt(reward_end)}")
    return {"rewards": rewards_log, "first_eval": first_eval, "eval": evals, "steps": num_iterations, "ckpt_dir": ckpt_dir}


if __name__ == "__main__":
    main(sys.argv[1:])
