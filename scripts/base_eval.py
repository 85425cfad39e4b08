"""
Evaluate a base model checkpoint on the DCLM CORE metric.

python -m scripts.base_eval --eval-dir=../shared/data/eval/core --max-per-task=100
torchrun --nproc_per_node=8 -m scripts.base_eval

Without --eval-dir the bundle is read from $NANOCHAT_BASE_DIR/eval_bundle, downloaded once from
$NANOCHAT_EVAL_BUNDLE_URL (a zip or tar.gz of core.yaml, eval_meta_data.csv and eval_data/).
Prints a results table, writes $NANOCHAT_BASE_DIR/base_eval/core_<tag>.csv and a report section.
"""
import csv
import os
import re

from nanochat.common import (atomic_open, autocast_context, compute_cleanup, compute_init, get_base_dir,
                             get_compute_dtype, make_parser, non_negative_int, number_type)
from nanochat.core_bundle import resolve_eval_dir
from nanochat.core_eval import evaluate_core


max_items = number_type(int, lambda n: n == -1 or n > 0, "-1 (all items) or a positive integer", "max_items")


# -----------------------------------------------------------------------------
# Output: stdout table, CSV, report section


def format_results_table(out):
    """evaluate_core's result as a fixed-width table, CORE and the missing tasks last."""
    lines = [f"{'Task':<36} {'Accuracy':>9} {'Centered':>9} {'Items':>7}"]
    for label, r in out["results"].items():
        lines.append(f"{label:<36} {r['accuracy']:>9.4f} {r['centered']:>9.4f} {r['num_items']:>7}")
    lines.append(f"{'CORE':<36} {'':>9} {out['core']:>9.4f}")
    if out["missing"]:
        lines.append(f"missing tasks (not in CORE): {', '.join(out['missing'])}")
    return "\n".join(lines)


def write_results_csv(out, tag):
    """$NANOCHAT_BASE_DIR/base_eval/core_<tag>.csv (tag reduced to a safe file name), written atomically;
    returns its path."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(tag)).strip("._") or "model"
    path = os.path.join(get_base_dir(), "base_eval", f"core_{safe}.csv")
    with atomic_open(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["Task", "Accuracy", "Centered", "Items", "Status"])
        w.writerows([label, f"{r['accuracy']:.6f}", f"{r['centered']:.6f}", r["num_items"], "ok"]
                    for label, r in out["results"].items())
        w.writerows([label, "", "", 0, "missing"] for label in out["missing"])
        w.writerow(["CORE", "", f"{out['core']:.6f}", "", ""])
    return path


def write_report(out, info):
    """The report section "Base model evaluation": run info, CORE, the per-task table and the missing tasks,
    with the metric CORE for the summary table; returns its path."""
    from nanochat.report import write_section
    lines = [f"- {k}: {v}" for k, v in info.items()]
    lines += [f"- max per task: {out['max_per_task'] if out['max_per_task'] > 0 else 'all'}",
              f"- CORE: {out['core']:.4f} (mean centered accuracy over {len(out['results'])} tasks)",
              f"- missing tasks: {', '.join(out['missing']) if out['missing'] else 'none'}",
              "", "| Task | Type | Shots | Items | Accuracy | Centered |", "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {r['task_type']} | {r['num_fewshot']} | {r['num_items']} | {r['accuracy']:.4f} | "
              f"{r['centered']:.4f} |" for label, r in out["results"].items()]
    return write_section("Base model evaluation", "\n".join(lines), metrics={"CORE": out["core"]})

# -----------------------------------------------------------------------------


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
    _, rank, _, _, device = compute_init(args.device_type or None)
    eval_dir = resolve_eval_dir(args.eval_dir)  # rank 0 fetches the bundle if needed, the others wait
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag or None, step=args.step)
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
