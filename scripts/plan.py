"""
Size a base model to a compute budget before spending it.

    python -m scripts.plan --gpus=8 --gpu=h100 --hours=11
    python -m scripts.plan --gpus=8 --gpu=h100 --hours=11 --tie-embeddings=true --max-seq-len=1024 \\
        --mlp-ratio=3 --kv-head-ratio=4 --activation=silu --softcap=0 --chars-per-token=5.1

For each depth: parameters by group, training tokens at --target-param-data-ratio, FLOPs, hours and
cost at --mfu, KV-cache bytes, and the data needed. Then the largest depth whose base training fits
the budget (less --reserve for the other stages), its base_train flags, and what each planned
architecture change saves at that depth. The architecture flags are base_train's (both take them
from nanochat.recipe.add_model_flags), the planned changes are nanochat.recipe.PLANNED_CHANGES (the list
scripts.ablate trains), and every model-side number comes from nanochat.gpt.GPT itself (built on the
meta device: no memory, no weights) through config_from_flags, the function base_train builds its
model with, so the plan and the run cannot disagree.
"""
import argparse
import dataclasses
import math
import sys

import torch

from nanochat.common import (GPU_PEAK_BF16_FLOPS, gpu_peak_flops, make_parser, non_negative_float, number_type,
                             positive_float, positive_int, str2bool)
from nanochat.gpt import GPT
from nanochat.recipe import (add_model_flags, batch_size_flag, config_from_flags, model_flags, planned_changes,
                             training_horizon)
from nanochat.report import DEFAULT_GPU_HOUR_COST, find_metric, read_section_metrics, write_section

# --gpu -> a device name that nanochat.common.gpu_peak_flops knows (dense bf16 datasheet peak): h100-pcie, rtx4090
GPU_NAMES = {name.lower().replace(" pcie", "-pcie").replace(" ", ""): name for name, _ in GPU_PEAK_BF16_FLOPS}
DEFAULT_CHARS_PER_TOKEN = 4.8  # the reference 65,536-token tokenizer on FineWeb-EDU text
DEFAULT_CHARS_PER_SHARD = 250e6  # one reference FineWeb-EDU parquet shard holds about 250M characters
# the reference architecture: every architecture flag at its default, but the depth, which is swept (--depths)
REFERENCE = {k: v for k, v in vars(model_flags()).items() if k != "depth"}
MODEL_FLAGS = tuple(REFERENCE)
mfu_fraction = number_type(float, lambda x: 0 < x <= 1, "a number in (0, 1]", "mfu_fraction")
reserve_fraction = number_type(float, lambda x: 0 <= x < 1, "a number in [0, 1)", "reserve_fraction")


def parse_depths(spec):
    """'8:40:2' (start:stop[:step], inclusive) or '12,16,20'."""
    try:
        if ":" in spec:
            start, stop, *step = map(int, spec.split(":"))  # fewer than two parts: a ValueError too
            if len(step) > 1 or step and step[0] <= 0:
                raise ValueError
            depths = list(range(start, stop + 1, *step))
        else:
            depths = [int(x) for x in spec.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP[:STEP] or a comma list of depths, got {spec!r}")
    if not depths or min(depths) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive depths, got {spec!r}")
    return sorted(set(depths))


def build_parser():
    p = make_parser(__doc__)
    p.prog = "python -m scripts.plan"
    g = p.add_argument_group("budget")
    g.add_argument("--gpus", type=positive_int, default=8, help="GPUs training together")
    g.add_argument("--gpu", default="h100", choices=sorted(GPU_NAMES), help="GPU kind (sets the peak bf16 FLOP/s)")
    g.add_argument("--peak-tflops", type=positive_float, default=None, help="override the GPU's peak bf16 TFLOP/s")
    g.add_argument("--hours", type=positive_float, default=11.0, help="wall-clock budget for the whole pipeline")
    g.add_argument("--reserve", type=reserve_fraction, default=0.15,
                   help="fraction of --hours kept for tokenizer, evals, midtraining and SFT; base training gets the rest")
    g.add_argument("--mfu", type=mfu_fraction, default=0.4,
                   help="model FLOPs utilization to assume (a measured one when you have it)")
    g.add_argument("--gpu-hour-cost", type=non_negative_float, default=DEFAULT_GPU_HOUR_COST,
                   help="$ per GPU-hour (the default is an H100 assumption)")
    g.add_argument("--depths", type=parse_depths, default="8:40:2", help="START:STOP[:STEP] or a list")
    g = p.add_argument_group("model (the flags of scripts.base_train)")
    g.add_argument("--vocab-size", type=positive_int, default=65536, help="tokenizer vocabulary")
    add_model_flags(g, with_depth=False)
    g.add_argument("--target-param-data-ratio", type=positive_float, default=10.5, help="tokens per scaling parameter")
    g.add_argument("--total-batch-size", type=batch_size_flag, default=-1, help="tokens per optimizer step (-1 = auto)")
    g = p.add_argument_group("data")
    g.add_argument("--chars-per-token", type=positive_float, default=None,
                   help="tokenizer compression (default: the report's tokenizer evaluation, else 4.8)")
    g.add_argument("--chars-per-shard", type=positive_float, default=DEFAULT_CHARS_PER_SHARD,
                   help="characters per data shard (250M: a reference FineWeb-EDU shard)")
    p.add_argument("--report", type=str2bool, default=True, help="write the 'Budget plan' report section")
    return p


def get_args(argv=None):
    return build_parser().parse_args(argv)

# -----------------------------------------------------------------------------
# The arithmetic (importable; main() only prints)

def make_config(args, depth, **overrides):
    """The GPTConfig base_train would build for these flags at this depth."""
    ns = argparse.Namespace(**{**vars(args), **overrides, "depth": depth})
    return config_from_flags(ns, args.vocab_size)


def kv_cache_bytes_per_token(n_layer, n_kv_head, head_dim, bytes_per_element=2):  # a bf16 cache
    return 2 * n_layer * n_kv_head * head_dim * bytes_per_element  # K and V, every layer


def training_hours(total_flops, gpus, peak_flops, mfu):
    return total_flops / (gpus * peak_flops * mfu) / 3600


def data_needed(tokens, chars_per_token, chars_per_shard):
    """(characters, whole shards) of text that tokenize to `tokens`."""
    chars = tokens * chars_per_token
    return chars, math.ceil(chars / chars_per_shard)


def peak_flops_for(args):
    return args.peak_tflops * 1e12 if args.peak_tflops else gpu_peak_flops(GPU_NAMES[args.gpu])


def resolve_chars_per_token(flag):
    """(chars per token, where it came from): the flag, the report's tokenizer evaluation, or the default."""
    if flag:
        return flag, "--chars-per-token"
    metrics = read_section_metrics("Tokenizer evaluation")
    for key in ("chars_per_token", "bytes_per_token"):
        v = find_metric(metrics, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0:
            return float(v), f"the report's tokenizer evaluation ({key})"
    return DEFAULT_CHARS_PER_TOKEN, "default (reference tokenizer on FineWeb-EDU)"


@dataclasses.dataclass
class Plan:
    depth: int
    config: object  # GPTConfig
    params: dict  # GPT.num_params_by_group
    flops_per_token: int
    kv_bytes_per_token: int
    batch: int  # tokens per step
    steps: int
    tokens: int
    total_flops: float
    hours: float
    cost: float
    chars: float
    shards: int


def plan_config(args, config, peak_flops, chars_per_token):
    with torch.device("meta"):  # the model itself, without memory or weights
        model = GPT(config)
    params, flops_per_token = model.num_params_by_group(), model.estimate_flops()
    # the horizon exactly as base_train sets it from --target-param-data-ratio and --total-batch-size
    batch, steps = training_horizon(args, params["scaling"], flops_per_token, config.vocab_size)
    tokens = steps * batch
    total_flops = flops_per_token * tokens
    hours = training_hours(total_flops, args.gpus, peak_flops, args.mfu)
    chars, shards = data_needed(tokens, chars_per_token, args.chars_per_shard)
    kv = kv_cache_bytes_per_token(config.n_layer, config.n_kv_head, config.head_dim)
    return Plan(config.n_layer, config, params, flops_per_token, kv, batch, steps, tokens, total_flops, hours,
                hours * args.gpus * args.gpu_hour_cost, chars, shards)


def plan_or_error(args, depth, peak_flops, chars_per_token, **overrides):
    """The Plan of these flags (with `overrides`) at `depth`, or why they give no valid model (a string)."""
    try:
        config = make_config(args, depth, **overrides)
    except ValueError as e:
        return str(e)
    return plan_config(args, config, peak_flops, chars_per_token)


def choose_depth(plans, budget_hours):
    """The largest planned depth whose base training fits in `budget_hours`, or None."""
    return max((p for p in plans if p.hours <= budget_hours), key=lambda p: p.depth, default=None)


def compare_changes(args, depth, peak_flops, chars_per_token):
    """[(label, Plan or error string)]: the reference, each planned change alone, all together, and
    the given flags when they are none of those, all at `depth`."""
    yours = {k: getattr(args, k) for k in MODEL_FLAGS}
    variants = [("reference", {})] + planned_changes(REFERENCE["max_seq_len"], context_label="seq")
    if yours != REFERENCE and yours != {**REFERENCE, **variants[-1][1]}:
        variants.append(("your flags", yours))
    return [(label, plan_or_error(args, depth, peak_flops, chars_per_token, **{**REFERENCE, **change}))
            for label, change in variants]


def base_train_command(args, depth):
    flags = [f"--depth={depth}"] + [f"--{k.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}"
                                    for k in MODEL_FLAGS if (v := getattr(args, k)) != REFERENCE[k]]
    flags += [f"--target-param-data-ratio={args.target_param_data_ratio:g}", f"--total-batch-size={args.total_batch_size}",
              "--device-batch-size=auto"]
    launcher = f"torchrun --standalone --nproc_per_node={args.gpus} -m scripts.base_train --" if args.gpus > 1 \
        else "python -m scripts.base_train"
    return f"{launcher} {' '.join(flags)}"

# -----------------------------------------------------------------------------
# Printing

def human(n):
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}"


def human_bytes(n):
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n} B"


def table(headers, rows):
    """A markdown table padded to line up in a terminal too."""
    cells = [[str(c) for c in r] for r in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def _delta(x, ref):
    return "-" if x == ref else f"{100 * (x - ref) / ref:+.1f}%"


def render(args, plans, invalid, chosen, comparison, peak_flops, chars_per_token, cpt_source):
    budget = args.hours * (1 - args.reserve)  # base training's share
    out = [
        f"Budget: {args.hours:g} h x {args.gpus} {GPU_NAMES[args.gpu]} = {args.hours * args.gpus:g} GPU-hours "
        f"(${args.hours * args.gpus * args.gpu_hour_cost:,.0f} at ${args.gpu_hour_cost:.2f}/GPU-hour); base training "
        f"gets {100 * (1 - args.reserve):.0f}% = {budget:.2f} h (--reserve {args.reserve:g} for tokenizer, evals, mid, SFT).",
        f"Assumptions: peak {peak_flops / 1e12:.0f} TFLOP/s per GPU (bf16 dense), MFU {args.mfu:g}, "
        f"{args.target_param_data_ratio:g} tokens per scaling parameter (blocks' matrices + head), "
        + ("tokens per step from the token budget (2^19 x (D / D_d12)^0.383), " if args.total_batch_size == -1
           else f"{args.total_batch_size:,} tokens per step, ") +
        f"{chars_per_token:g} chars/token from {cpt_source}, {human(args.chars_per_shard)} chars per shard, "
        f"KV cache in bf16.",
        "", "Model by depth (parameters from GPT.num_params_by_group, FLOPs from GPT.estimate_flops):", "",
        table(["depth", "width", "heads q/kv", "embedding", "head", "attention", "mlp", "value emb", "total", "scaling",
               "FLOPs/token", "KV/token", "KV/1024 seq"],
              [[p.depth, p.config.n_embd, f"{p.config.n_head}/{p.config.n_kv_head}", human(p.params["embedding"]),
                human(p.params["head"]), human(p.params["attention"]), human(p.params["mlp"]),
                human(p.params["value_embeds"]), human(p.params["total"]), human(p.params["scaling"]),
                f"{p.flops_per_token:.3g}", human_bytes(p.kv_bytes_per_token), human_bytes(1024 * p.kv_bytes_per_token)]
               for p in plans]),
        "", "Training at the data ratio:", "",
        table(["depth", "batch", "steps", "tokens", "FLOPs", "hours", "cost", "chars", "shards", f"fits {budget:.2f} h"],
              [[p.depth, f"2^{round(math.log2(p.batch))}" if p.batch & (p.batch - 1) == 0 else f"{p.batch:,}",
                f"{p.steps:,}", human(p.tokens), f"{p.total_flops:.3g}", f"{p.hours:.2f}", f"${p.cost:,.0f}",
                human(p.chars), p.shards, "yes" if p.hours <= budget else "no"] for p in plans]),
    ]
    if invalid:
        out += [""] + [f"depth {d} skipped: {why}" for d, why in invalid.items()]
    out.append("")
    if chosen is None:
        smallest = f"; the smallest, depth {plans[0].depth}, needs {plans[0].hours:.2f} h" if plans else ""
        out.append(f"No listed depth fits {budget:.2f} h{smallest}. Lower the depths, the data ratio, or raise the budget.")
    else:
        out += [f"Chosen: depth {chosen.depth} (the largest listed depth that fits): {human(chosen.params['total'])} "
                f"parameters, {human(chosen.tokens)} tokens, {chosen.hours:.2f} h, ${chosen.cost:,.0f}, "
                f"{human(chosen.chars)} chars of text ({chosen.shards} reference shards).",
                "", "    " + base_train_command(args, chosen.depth)]
        if chosen.hours < 0.9 * budget:  # the depth grid left budget unused: more tokens at this depth can take it
            fill = math.floor(10 * args.target_param_data_ratio * budget / chosen.hours) / 10  # hours scale with tokens
            out += ["", f"Depth {chosen.depth} leaves {budget - chosen.hours:.2f} h of the {budget:.2f} h unused; "
                        f"--target-param-data-ratio={fill:g} spends it on more tokens at this depth "
                        f"({chosen.hours * fill / args.target_param_data_ratio:.2f} h)."]
    if comparison:
        depth = (chosen or plans[0]).depth
        ref = comparison[0][1]
        figures = lambda q: (q.params["total"], q.flops_per_token, q.kv_bytes_per_token, q.hours)  # the Δ columns
        rows, notes = [], []
        for label, p in comparison:
            if isinstance(p, str):
                rows.append([label, "invalid"] + [""] * 8)
                notes.append(f"{label}: {p}")
                continue
            d = [""] * 4 if isinstance(ref, str) else [_delta(x, r) for x, r in zip(figures(p), figures(ref))]
            rows.append([label, human(p.params["total"]), d[0], f"{p.flops_per_token:.3g}", d[1],
                         human_bytes(p.kv_bytes_per_token), d[2], human(p.tokens), f"{p.hours:.2f}", d[3]])
        out += ["", f"What each planned change saves at depth {depth} (tokens and hours at the data ratio; "
                    "activation, softcap and RoPE base change neither parameters nor counted FLOPs; 'all together' = "
                    "tied, seq 1024, MLP 3x, n_kv_head = n_head // 4, SiLU, softcap off, RoPE 100000):", "",
                table(["architecture", "params", "Δ", "FLOPs/token", "Δ", "KV/token", "Δ", "tokens", "hours", "Δ"], rows)]
        out += [f"invalid at depth {depth}: {n}" for n in notes]
    batch = (chosen or plans[0]).batch
    if batch % (args.max_seq_len * args.gpus):
        out += ["", f"warning: {batch} tokens per step (--total-batch-size) is not a multiple of --max-seq-len x --gpus "
                    f"= {args.max_seq_len * args.gpus}; base_train will refuse it"]
    return "\n".join(out)


def main(argv=None):
    args = get_args(argv)
    peak = peak_flops_for(args)
    chars_per_token, source = resolve_chars_per_token(args.chars_per_token)
    results = {depth: plan_or_error(args, depth, peak, chars_per_token) for depth in args.depths}
    plans = [p for p in results.values() if not isinstance(p, str)]
    invalid = {depth: why for depth, why in results.items() if isinstance(why, str)}  # the flags give no model
    if not plans:
        raise SystemExit("no listed depth gives a valid model for these flags:\n" +
                         "\n".join(f"  depth {d}: {why}" for d, why in invalid.items()))
    chosen = choose_depth(plans, args.hours * (1 - args.reserve))
    comparison = compare_changes(args, (chosen or plans[0]).depth, peak, chars_per_token)
    text = render(args, plans, invalid, chosen, comparison, peak, chars_per_token, source)
    print(text)
    if args.report:
        metrics = dict(gpus=args.gpus, gpu=GPU_NAMES[args.gpu], budget_hours=args.hours, mfu=args.mfu,
                       chars_per_token=chars_per_token, depth=None if chosen is None else chosen.depth)
        if chosen is not None:
            metrics.update(parameters=chosen.params["total"], training_tokens=chosen.tokens,
                           training_flops=chosen.total_flops, estimated_hours=chosen.hours,
                           planned_gpu_hours=chosen.hours * args.gpus, estimated_cost=chosen.cost, shards=chosen.shards)
        flags = " ".join(argv if argv is not None else sys.argv[1:])
        write_section("Budget plan", f"command: `python -m scripts.plan {flags}`\n\n{text}", metrics)
    return {"plans": plans, "invalid": invalid, "chosen": chosen, "comparison": comparison, "text": text}


if __name__ == "__main__":
    main(sys.argv[1:])
