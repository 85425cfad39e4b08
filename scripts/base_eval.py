"""
Evaluate a base model checkpoint on the DCLM CORE metric.

python -m scripts.base_eval --eval-dir=../shared/data/eval/core --max-per-task=100
torchrun --nproc_per_node=8 -m scripts.base_eval

Without --eval-dir the bundle is read from $NANOCHAT_BASE_DIR/eval_bundle, downloaded once from
$NANOCHAT_EVAL_BUNDLE_URL (a zip or tar.gz of core.yaml, eval_meta_data.csv and eval_data/).
Prints a results table, writes $NANOCHAT_BASE_DIR/base_eval/core_<tag>.csv and a report section.
"""
import argparse

import torch.distributed as dist

from nanochat.common import (autocast_context, compute_cleanup, compute_init, get_compute_dtype, is_ddp_initialized,
                             make_parser, non_negative_int)
from nanochat.core_eval import evaluate_core, format_results_table, resolve_eval_dir, write_report, write_results_csv


def max_items(value):
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected -1 (all items) or a positive integer, got {value!r}")
    if n == 0 or n < -1:
        raise argparse.ArgumentTypeError(f"expected -1 (all items) or a positive integer, got {value!r}")
    return n


def get_parser():
    p = make_parser(__doc__)
    p.add_argument("--eval-dir", default="", help="unpacked CORE bundle directory; empty: $NANOCHAT_BASE_DIR/eval_bundle, "
                                                  "downloaded from $NANOCHAT_EVAL_BUNDLE_URL if absent")
    p.add_argument("--max-per-task", type=max_items, default=-1, help="items per task (a fixed shuffled sample); -1 = all")
    p.add_argument("--model-tag", default="", help="base checkpoint to load; empty = the largest model")
    p.add_argument("--step", type=non_negative_int, default=None, help="checkpoint step; default = the last one")
    p.add_argument("--device-type", default="", choices=["", "cuda", "mps", "cpu"], help="empty = autodetect")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    from nanochat.checkpoint import load_model  # imported here so this module imports without it
    is_ddp, rank, _, _, device = compute_init(args.device_type or None)
    # Rank 0 fetches the bundle if needed; the others wait and then find it in place.
    eval_dir = resolve_eval_dir(args.eval_dir) if rank == 0 else None
    if is_ddp_initialized():
        dist.barrier()
        eval_dir = eval_dir or resolve_eval_dir(args.eval_dir)
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag or None, step=args.step)
    meta = meta if isinstance(meta, dict) else {}
    with autocast_context(device.type, get_compute_dtype(device.type)):
        out = evaluate_core(model, tokenizer, eval_dir, max_per_task=args.max_per_task, device=device)
    if rank == 0:
        tag = args.model_tag or meta.get("model_tag") or "base"
        step = args.step if args.step is not None else meta.get("step")
        tag = f"{tag}_step{step:06d}" if isinstance(step, int) else tag
        print(format_results_table(out))
        csv_path = write_results_csv(out, tag)
        write_report(out, {"model": tag, "eval dir": out["eval_dir"], "results csv": csv_path})
        print(f"wrote {csv_path}")
    compute_cleanup()
    return out


if __name__ == "__main__":
    main()
