"""
Evaluate a chat model on ARC-Easy, ARC-Challenge, MMLU (multiple choice, scored by the answer letters'
logits) and GSM8K, HumanEval (sampled through the inference engine, pass@k), and report ChatCORE.

python -m scripts.chat_eval -i sft
python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" --max-problems=100
torchrun --nproc_per_node=8 -m scripts.chat_eval -i sft --num-samples=10 --temperature=0.8

Task data is read from $NANOCHAT_DATA_DIR (default ../shared/data; `python -m tasks.download` fetches it).
Prints a results table and writes the report section "Chat evaluation <source>".
"""
import argparse

from nanochat.chat_eval import format_results_table, run_chat_eval, write_report
from nanochat.common import (autocast_context, compute_cleanup, compute_init, get_compute_dtype, make_parser, positive_int,
                             non_negative_float, non_negative_int)
from nanochat.engine import Engine
from tasks.registry import TASK_NAMES, load_tasks, parse_task_names

from ._cli import add_model_source_flags, device_type_or_exit, load_model_or_exit, stage_error


def task_list(value):
    try:
        return parse_task_names(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def get_parser():
    p = make_parser(__doc__)
    add_model_source_flags(p, source=None)
    p.add_argument("-a", "--task-name", type=task_list, default="|".join(TASK_NAMES),
                   help="tasks to evaluate, separated by '|'")
    p.add_argument("--max-problems", type=positive_int, default=None,
                   help="problems per task (a fixed shuffled sample); default all")
    p.add_argument("--batch-size", type=positive_int, default=8, help="prompts per forward pass (categorical tasks)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="samples per problem (generative tasks): pass@k")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=non_negative_int, default=50, help="sample among the k likeliest tokens; 0 = off")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="reply length limit (generative tasks)")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (problem i uses seed + i)")
    return p


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    _, rank, _, _, device = compute_init(device_type_or_exit(parser, args))
    model, tokenizer, _, step = load_model_or_exit("chat_eval", args, device)
    try:
        tasks = load_tasks(args.task_name)  # argparse ran task_list on the default too
    except OSError as e:  # missing data, or no sandbox to score HumanEval in (nanochat.sandbox.SandboxUnavailable)
        stage_error(f"chat_eval: {e}")
    engine = Engine(model, tokenizer, compile=args.compile)  # cheap: compiles on first use, if ever
    with autocast_context(device.type, get_compute_dtype(device.type)):
        out = run_chat_eval(model, tokenizer, engine, args.task_name, max_problems=args.max_problems,
                            batch_size=args.batch_size, num_samples=args.num_samples,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            seed=args.seed, device=device, tasks=tasks)
    if rank == 0:
        info = {"source": args.source, "model tag": args.model_tag or "(largest)", "step": step}
        print(format_results_table(out))
        print(f"wrote {write_report(out, args.source, info)}")
    compute_cleanup()
    return out


if __name__ == "__main__":
    main()
