"""
Ablation of the planned architecture changes at equal training FLOPs, tiny scale, on CPU.

Trains the reference architecture, each change alone and all of them together, every run with the
same FLOPs budget (so a cheaper architecture gets more steps), then compares validation bits per
byte on held-out text. Writes a table and a bar chart into the report: the evidence to look at
before spending a real budget on the changes. The changes are nanochat.gpt.PLANNED_CHANGES, the list
scripts.plan prices; the reference takes base_train's architecture flags, at tiny-scale defaults.

    python -m scripts.ablate --data=../shared/data/pretrain/wikipedia:0.45,... --target-flops=2e13
"""
import os

from nanochat.common import make_parser, positive_int, print0
from nanochat.gpt import MODEL_FLAGS, add_model_flags, model_flags, planned_changes

TINY_SCALE = dict(depth=4, head_dim=64, max_seq_len=256)  # the ablation's reference architecture flags


def flag(dest, v):
    """One flag as base_train's parser reads it, as people write it: --tie-embeddings=true, --mlp-ratio=3, 2.5."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"--{dest.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}"


def variants(seq_len, reference=None):
    """[(label, base_train flags)]: the reference, then nanochat.gpt's planned changes at a reference context
    of `seq_len`, each as the flags whose value differs from `reference` (the ablation's architecture flags;
    default: their tiny-scale defaults at --max-seq-len=seq_len)."""
    reference = reference or {**vars(model_flags(**TINY_SCALE)), "max_seq_len": seq_len}
    return [("reference", [])] + [
        (label, [flag(k, v) for k, v in change.items() if v != reference[k]])
        for label, change in planned_changes(seq_len)]


def get_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--data", default=None, help="data spec PATH[:WEIGHT],... (default: the reference shards)")
    add_model_flags(p.add_argument_group("reference architecture (the flags of scripts.base_train, at tiny scale)"),
                    **TINY_SCALE)
    p.add_argument("--target-flops", type=float, default=2e13, help="training FLOPs of every run (about 100 steps of the reference)")
    p.add_argument("--total-batch-size", type=positive_int, default=8192)
    p.add_argument("--device-batch-size", type=positive_int, default=8)
    p.add_argument("--eval-tokens", type=positive_int, default=65536)
    p.add_argument("--only", default="", help="'|'-separated labels to run (default: all)")
    return p.parse_args(argv)


def plot(rows, ref, path):
    """A bar per variant, the reference's value as a dashed line; None without matplotlib."""
    try:
        from matplotlib.figure import Figure  # the object API draws with Agg and touches no global state
    except ImportError:
        return None
    fig = Figure(figsize=(8, 0.45 * len(rows) + 1.2))
    ax = fig.add_subplot()
    labels = [r["label"] for r in rows][::-1]
    values = [r["val_bpb"] for r in rows][::-1]
    ax.barh(labels, values, color=["#4a7" if l != "reference" else "#888" for l in labels])
    if ref is not None:
        ax.axvline(ref, color="k", lw=0.8, ls="--")
    lo = min(values)
    ax.set_xlim(lo - 0.05 * abs(lo), max(values) + 0.02 * abs(lo))
    ax.set_xlabel("validation bits per byte at equal training FLOPs (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    args = get_args(argv)
    from nanochat.report import get_report_dir, write_section
    from . import base_train  # the entry point, run in-process once per variant
    only = set(args.only.split("|")) if args.only else None
    rows = []
    reference = {k: getattr(args, k) for k in MODEL_FLAGS}
    common = [flag(k, v) for k, v in reference.items()]
    common += [f"--target-flops={args.target_flops}", f"--total-batch-size={args.total_batch_size}",
               f"--eval-tokens={args.eval_tokens}", "--eval-every=-1", "--sample-every=-1", "--core-metric-every=-1"]
    if args.data:
        common.append(f"--data={args.data}")
    for label, flags in variants(args.max_seq_len, reference):
        if only and label not in only:
            continue
        print0(f"=== {label}: {' '.join(flags) or '(reference)'}")
        tag = "ablate-" + "".join(c if c.isalnum() else "-" for c in label.lower())
        # a shorter context keeps the tokens per step: more rows per batch
        seq = next((int(f.split("=")[1]) for f in flags if f.startswith("--max-seq-len=")), args.max_seq_len)
        rows_per_batch = args.device_batch_size * args.max_seq_len // seq
        out = base_train.main(common + [f"--model-tag={tag}"] + flags + [f"--device-batch-size={rows_per_batch}"])
        rows.append({"label": label, "flags": " ".join(flags), "val_bpb": out["val_bpb"], "steps": out["steps"]})
    if not rows:
        raise SystemExit(f"--only={args.only!r} matches no variant")
    ref = next((r["val_bpb"] for r in rows if r["label"] == "reference"), None)
    lines = ["| variant | flags | steps | val bpb | vs reference |", "|---|---|---|---|---|"]
    for r in rows:
        delta = "-" if ref is None or r["label"] == "reference" else f"{r['val_bpb'] - ref:+.4f}"
        lines.append(f"| {r['label']} | `{r['flags'] or '-'}` | {r['steps']} | {r['val_bpb']:.4f} | {delta} |")
    table = "\n".join(lines)
    print0(table)
    png = plot(rows, ref, os.path.join(get_report_dir(), "ablation.png"))
    body = (f"Equal training FLOPs ({args.target_flops:.2e}) per run, depth {args.depth}, reference context "
            f"{args.max_seq_len}, data `{args.data or 'reference shards'}`. Validation bpb on held-out text.\n\n{table}")
    if png:
        body += "\n\n![ablation](ablation.png)"
    write_section("Ablation", body, metrics={r["label"]: r["val_bpb"] for r in rows})
    return rows


if __name__ == "__main__":
    main()
