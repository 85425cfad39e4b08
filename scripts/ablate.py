"""
Ablation of the planned architecture changes at equal training FLOPs, over several seeds, tiny scale, on CPU.

Trains the reference architecture, each change alone and all of them together, --seeds times each (seeds
--seed, --seed + 1, ...; the seed sets the initialization and the data order), every run with the same FLOPs
budget (so a cheaper architecture gets more steps). Each run is then finetuned for a short fixed SFT on
--sft-mixture and scored on held-out conversations. Per variant: mean and standard deviation over seeds of the
validation bits per byte on held-out text (base_train) and of the assistant-turn bits per byte on held-out
conversations (nanochat/chat_quality.py), each difference from the reference marked beyond seed noise or not
(paired t-test over the seeds, p < 0.05: nanochat/ablation.py), and the compute multiplier read off the
reference's own validation curve. Writes a table and a plot into the report. --suite=planned (section "Ablation"):
the changes are nanochat.recipe.PLANNED_CHANGES, the list scripts.plan prices, over base_train's architecture flags
at tiny-scale defaults. --suite=recipe (section "Recipe ablation d<depth>"): the 2026 pretraining recipe changes
(nanochat.recipe.RECIPE_CHANGES) over the late-2025 reference recipe, whose flag values every run is given
explicitly. docs/ablation.md has the rules and a recorded run, docs/recipe.md the recipe's.

    python -m scripts.ablate --data=../shared/data/pretrain/wikipedia:0.45,... --depth=3 --head-dim=48 \\
        --target-flops=4.7e12 --seeds=3                                 # the recorded run (docs/ablation.md)
    python -m scripts.ablate --only="MLP 3x|SiLU" --seeds=2 --sft-steps=0        # text bpb only, two changes
    python -m scripts.ablate --from-runs=$NANOCHAT_BASE_DIR/report/_ablation-runs.json   # re-tabulate, no training

Checkpoints go to base/sft tags ablate-<variant>-s<seed> (recipe-d<depth>-<variant>-s<seed>); the report sections
the runs write on the way ("Base model training", "Chat SFT") are put back as they were. Single process; --resume
keeps the runs already in the record (rewritten after every run) and trains the rest.
"""
import contextlib
import math
import os
import pathlib
import statistics
import sys
import time

from nanochat.ablation import (NOISE_P, compute_multiplier, loss_rise, mean_curve, mean_std, paired_test,
                               plot_ablation, welch_test)
from nanochat.common import make_parser, non_negative_int, positive_float, positive_int, print0, str2bool
from nanochat.recipe import MODEL_FLAGS, REFERENCE_RECIPE, add_model_flags, model_flags, planned_changes, recipe_changes

from ._cli import flag

TINY_SCALE = dict(depth=4, head_dim=64, max_seq_len=256)  # the ablation's reference architecture flags
SUB_RUN_SECTIONS = ("Base model training", "Chat SFT")  # report sections each run rewrites; restored after


def variants(seq_len, reference=None, suite="planned"):
    """[(label, base_train flags)]: the reference, then the suite's changes, each as the flags whose value differs
    from `reference` (the ablation's architecture flags; default: their tiny-scale defaults at --max-seq-len=seq_len).
    Suite "planned": the first user's architecture changes at a reference context of `seq_len`
    (nanochat.recipe.planned_changes); "recipe": the 2026 recipe changes over the reference recipe
    (nanochat.recipe.RECIPE_CHANGES, REFERENCE_RECIPE)."""
    reference = reference or {**vars(model_flags(**TINY_SCALE)), "max_seq_len": seq_len}
    if suite == "recipe":
        reference, changes = {**reference, **REFERENCE_RECIPE}, recipe_changes()
    else:
        changes = planned_changes(seq_len)
    return [("reference", [])] + [
        (label, [flag(k, v) for k, v in change.items() if v != reference[k]]) for label, change in changes]


def suite_names(args):
    """Where a suite's results go: (report section, runs record, plot, checkpoint tag prefix). The recipe suite is
    run at several depths, so its names carry the depth; the planned suite's do away from its tiny-scale depth."""
    d = f"d{args.depth}"
    if args.suite == "recipe":
        return f"Recipe ablation {d}", f"_recipe-ablation-{d}-runs.json", f"recipe-ablation-{d}.png", f"recipe-{d}"
    if args.depth != TINY_SCALE["depth"]:
        return f"Ablation {d}", f"_ablation-{d}-runs.json", f"ablation-{d}.png", f"ablate-{d}"
    return "Ablation", "_ablation-runs.json", "ablation.png", "ablate"


def run_tag(label, seed, prefix="ablate"):
    from nanochat.report import slugify
    return f"{prefix}-{slugify(label)}-s{seed}"


def get_args(argv=None):
    from tasks.mixtures import MIXTURES
    p = make_parser(__doc__)
    p.add_argument("--data", default=None, help="pretraining data spec PATH[:WEIGHT],... (default: the reference shards)")
    p.add_argument("--device-type", default="", choices=["", "cuda", "mps", "cpu"], help="'' = autodetect")
    add_model_flags(p.add_argument_group("reference architecture (the flags of scripts.base_train, at tiny scale)"),
                    **TINY_SCALE)
    g = p.add_argument_group("pretraining (every run)")
    g.add_argument("--target-flops", type=positive_float, default=1.4e13,
                   help="training FLOPs of every run (60 steps of 8192 tokens for the tiny-scale reference; "
                        "4.7e12 = 40 steps at --depth=3 --head-dim=48)")
    g.add_argument("--total-batch-size", type=positive_int, default=8192, help="tokens per optimizer step")
    g.add_argument("--device-batch-size", type=positive_int, default=16, help="rows per forward pass at the reference context")
    g.add_argument("--eval-every", type=int, default=10,
                   help="validation bpb every N steps: the curves and the reference curve the multiplier reads")
    g.add_argument("--eval-tokens", type=positive_int, default=16384, help="held-out text tokens per validation")
    g = p.add_argument_group("seeds and variants")
    g.add_argument("--suite", default="planned", choices=["planned", "recipe"],
                   help="planned: the first user's architecture changes; recipe: the 2026 pretraining recipe changes")
    g.add_argument("--seeds", type=positive_int, default=3, help="runs per variant (>= 2; seed noise needs several)")
    g.add_argument("--seed", type=int, default=42, help="first seed; the runs use seed, seed + 1, ...")
    g.add_argument("--only", default="", help="'|'-separated variant labels to run besides the reference (default: all)")
    g.add_argument("--resume", type=str2bool, default=False,
                   help="keep the runs the suite's record already holds with identical settings; train only the rest")
    g.add_argument("--from-runs", default="", help="no training: rebuild the table, plot and report section from the "
                   "_ablation-runs.json of an earlier ablation (the other flags describe it)")
    g = p.add_argument_group("conversation metric (short fixed SFT, then assistant-turn bpb)")
    g.add_argument("--sft-steps", type=non_negative_int, default=20, help="SFT steps per run (0 = skip the conversation metric)")
    g.add_argument("--sft-mixture", default="english-chat", choices=list(MIXTURES), help="SFT mixture (tasks/mixtures.py)")
    g.add_argument("--sft-examples-per-step", type=positive_int, default=8, help="conversations per SFT step")
    g.add_argument("--sft-device-batch-size", type=positive_int, default=4, help="conversations per SFT forward pass")
    g.add_argument("--sft-init-lr-frac", type=positive_float, default=0.5, help="SFT learning rates x this")
    g.add_argument("--chat-data", default="",
                   help="held-out {'messages': [...]} JSONL(.gz) (default: --sft-mixture's decontaminated held-out slices)")
    g.add_argument("--chat-conversations", type=positive_int, default=200, help="held-out conversations scored (the first N)")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error(f"argument --seeds: at least 2 runs per variant are needed to measure seed noise (3 or more "
                f"recommended), got {args.seeds}")
    if args.eval_every <= 0:
        p.error(f"argument --eval-every: must be positive (the compute multiplier reads the reference's validation "
                f"curve), got {args.eval_every}")
    if args.sft_examples_per_step % args.sft_device_batch_size:
        p.error(f"argument --sft-examples-per-step: {args.sft_examples_per_step} is not a multiple of "
                f"--sft-device-batch-size={args.sft_device_batch_size}")
    labels = [label for label, _ in variants(args.max_seq_len, reference_flags(args), args.suite)]
    args.only = [s.strip() for s in args.only.split("|") if s.strip()]
    unknown = [s for s in args.only if s not in labels]
    if unknown:
        p.error(f"argument --only: no variant named {', '.join(map(repr, unknown))}; the variants are: " + " | ".join(labels))
    return args


def reference_flags(args):
    """The reference run's architecture flags: the parsed ones; the recipe suite pins the reference recipe's model
    flags (value embeddings off, ...) whatever base_train's defaults are now."""
    flags = {k: getattr(args, k) for k in MODEL_FLAGS}
    if args.suite == "recipe":
        flags.update({k: v for k, v in REFERENCE_RECIPE.items() if k in MODEL_FLAGS})
    return flags


@contextlib.contextmanager
def kept_report_sections(titles):
    """Put the report sections `titles` (their .md and .json files) back as they were on exit: every ablation run
    goes through base_train and chat_sft, which write them, and the report card must keep the user's own runs."""
    from nanochat.common import atomic_write_bytes
    from nanochat.report import get_report_dir, slugify
    paths = [os.path.join(get_report_dir(), slugify(t) + ext) for t in titles for ext in (".md", ".json")]
    saved = {path: pathlib.Path(path).read_bytes() if os.path.exists(path) else None for path in paths}
    try:
        yield
    finally:
        for path, data in saved.items():
            if data is not None:
                atomic_write_bytes(path, data)
            elif os.path.exists(path):
                os.remove(path)


def load_heldout(args):
    """(conversations, sources, note) scored by the conversation metric; exits naming the flag when unreadable."""
    from .chat_quality import load_heldout
    try:
        conversations, sources, note = load_heldout(args.chat_data, args.sft_mixture)
    except (OSError, ValueError) as e:
        which = f"--chat-data={args.chat_data}" if args.chat_data else f"--sft-mixture={args.sft_mixture}"
        raise SystemExit(f"ablate: {which}: {e} (--sft-steps=0 skips the conversation metric)")
    if not conversations:
        raise SystemExit(f"ablate: no held-out conversations in {note} (--chat-data)")
    n = min(args.chat_conversations, len(conversations))
    return conversations[:n], sources[:n], f"the first {n} of {note}"


def read_log(tag):
    """([(training FLOPs, validation bpb)], loss rise) of base run `tag` from its log.jsonl (training.StepLogger):
    the validation curve, and nanochat.ablation.loss_rise of its training losses (None without any)."""
    from nanochat.checkpoint import checkpoints_root
    from nanochat.common import read_jsonl
    records = read_jsonl(os.path.join(checkpoints_root("base"), tag, "log.jsonl"))
    losses = [r["loss"] for r in records if "loss" in r]
    curve = [(r["total_training_flops"], r["val_bpb"]) for r in records if "val_bpb" in r]
    return curve, loss_rise(losses) if losses else None


def conversation_bpb(tag, seed, args, heldout):
    """Finetune base run `tag` for --sft-steps on --sft-mixture (sft tag `tag`), then its assistant-turn bpb."""
    import torch
    from nanochat.chat_quality import assistant_bpb
    from nanochat.checkpoint import load_model
    from nanochat.common import autocast_context, autodetect_device_type, get_compute_dtype
    from . import chat_sft
    chat_sft.main([f"--model-tag={tag}", "--source=base", f"--output-tag={tag}", f"--mixture={args.sft_mixture}",
                   f"--num-iterations={args.sft_steps}", f"--examples-per-step={args.sft_examples_per_step}",
                   f"--device-batch-size={args.sft_device_batch_size}", f"--init-lr-frac={args.sft_init_lr_frac}",
                   "--eval-tasks=none", "--eval-every=-1", "--eval-conversations=8", f"--seed={seed}"]
                  + ([f"--device-type={args.device_type}"] if args.device_type else []))
    device_type = autodetect_device_type(args.device_type or None)
    model, tokenizer, _ = load_model("sft", torch.device(device_type), model_tag=tag)
    conversations, sources, _ = heldout
    with autocast_context(device_type, get_compute_dtype(device_type)):
        return assistant_bpb(model, tokenizer, conversations, sources)["bpb"]


def run_variant(label, flags, args, heldout, recorded=None, save=None):
    """One variant's runs, one per seed: [{"seed", "tag", "steps", "flops", "text_bpb", "curve", "chat_bpb", "key"}].
    A run in `recorded` ({(label, seed): run}, --resume) whose key (its base_train argv and SFT settings) is this
    run's is kept, not trained again; save(label, runs) is called after each new run."""
    from . import base_train
    common = [flag(k, v) for k, v in reference_flags(args).items()]
    common += [f"--target-flops={args.target_flops}", f"--total-batch-size={args.total_batch_size}",
               f"--eval-tokens={args.eval_tokens}", f"--eval-every={args.eval_every}", "--sample-every=-1",
               "--core-metric-every=-1"]
    if args.suite == "recipe":  # the reference recipe pinned, whatever base_train's defaults are now
        common += [flag(k, v) for k, v in REFERENCE_RECIPE.items() if k not in MODEL_FLAGS]
    common += [f"--data={args.data}"] if args.data else []
    common += [f"--device-type={args.device_type}"] if args.device_type else []
    # a shorter context keeps the tokens per forward pass: more rows per batch
    seq = next((int(f.split("=")[1]) for f in flags if f.startswith("--max-seq-len=")), args.max_seq_len)
    rows = max(1, args.device_batch_size * args.max_seq_len // seq)
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        tag = run_tag(label, seed, suite_names(args)[3])
        argv = common + [f"--model-tag={tag}", f"--seed={seed}"] + flags + [f"--device-batch-size={rows}"]
        key = argv + [f"sft {args.sft_steps} {args.sft_mixture} {args.sft_examples_per_step} {args.sft_device_batch_size} "
                      f"{args.sft_init_lr_frac} {args.chat_data} {args.chat_conversations}"]
        old = (recorded or {}).get((label, seed))
        if old is not None and old.get("key") == key:
            print0(f"=== {label} seed {seed}: recorded (--resume), text bpb {old['text_bpb']:.4f}")
            if old.get("loss_rise") is None:  # recorded before the stability figure: from its log, when kept
                with contextlib.suppress(OSError):
                    old["loss_rise"] = read_log(tag)[1]
            runs.append(old)
            continue
        print0(f"=== {label} seed {seed}: {' '.join(flags) or '(reference)'} -> {tag}")
        started = time.perf_counter()
        out = base_train.main(argv)
        curve, rise = read_log(tag)
        run = {"label": label, "seed": seed, "tag": tag, "steps": out["steps"], "flops": curve[-1][0],
               "text_bpb": out["val_bpb"], "curve": curve, "loss_rise": rise, "chat_bpb": None, "key": key}
        if args.sft_steps > 0:
            run["chat_bpb"] = conversation_bpb(tag, seed, args, heldout)
        run["seconds"] = round(time.perf_counter() - started, 1)  # pretraining + SFT + scoring, wall
        print0(f"=== {label} seed {seed}: text bpb {run['text_bpb']:.4f}"
               + (f", assistant bpb {run['chat_bpb']:.4f}" if run["chat_bpb"] is not None else ""))
        runs.append(run)
        if save:
            save(label, runs)
    return runs


def summarize(runs_by_label):
    """Per variant (in order, the reference first): its steps, FLOPs, mean/std of text and conversation bpb, the
    paired test of each against the reference's run of the same seed (and Welch's p, unpaired), the mean
    validation curve and the compute multiplier. ValueError when a variant's seeds are not the reference's."""
    ref_runs = runs_by_label["reference"]
    ref_seeds = [r["seed"] for r in ref_runs]
    ref_curve = mean_curve([r["curve"] for r in ref_runs])
    rows = []
    for label, runs in runs_by_label.items():
        if [r["seed"] for r in runs] != ref_seeds:
            raise ValueError(f"variant {label!r} ran seeds {[r['seed'] for r in runs]}, the reference {ref_seeds}")
        rises = [r["loss_rise"] for r in runs if r.get("loss_rise") is not None]  # older records have none
        row = {"label": label, "steps": runs[0]["steps"], "flops": runs[0]["flops"], "seeds": ref_seeds,
               "curve": mean_curve([r["curve"] for r in runs]), "loss_rise": max(rises) if rises else None}
        for metric in ("text_bpb", "chat_bpb"):
            values = [r[metric] for r in runs]
            if None in values:
                continue
            row[metric] = dict(zip(("mean", "std"), mean_std(values)), values=values)
            if label != "reference":
                ref_values = [r[metric] for r in ref_runs]
                row[metric] |= paired_test(ref_values, values) | {"welch_p": welch_test(ref_values, values)["p"]}
        row["multiplier"], row["multiplier_how"] = compute_multiplier(ref_curve, row["text_bpb"]["mean"], row["flops"])
        rows.append(row)
    return rows


def _verdict(m):
    if "p" not in m:
        return "-"
    if not m["beyond_noise"]:
        return "no"
    return "**yes, better**" if m["diff"] < 0 else "**yes, worse**"


def table_markdown(rows, flags_by_label):
    """The results table: mean/std over seeds per metric, the paired difference from the reference (mean +- std over
    seeds), its p and the seed-noise verdict, the compute multiplier and the stability figure (max loss rise)."""
    lines = ["| variant | flags | steps | text bpb mean | text bpb std | text Δ vs ref | text p | text beyond noise "
             "| chat bpb mean | chat bpb std | chat Δ vs ref | chat p | chat beyond noise | compute multiplier "
             "| max loss rise |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["label"], f"`{' '.join(flags_by_label[r['label']]) or '-'}`", str(r["steps"])]
        for metric in ("text_bpb", "chat_bpb"):
            m = r.get(metric)
            if m is None:
                cells += ["-"] * 5
                continue
            cells += [f"{m['mean']:.4f}", f"{m['std']:.4f}", f"{m['diff']:+.4f} ± {m['diff_std']:.4f}" if "diff" in m else "-",
                      f"{m['p']:.3f}" if "p" in m else "-", _verdict(m)]
        mult = r["multiplier"]
        cells.append("not reached" if math.isinf(mult) else f"{mult:.2f}"
                     + (" (extrapolated)" if r["multiplier_how"] == "extrapolated" else ""))
        rise = r.get("loss_rise")
        cells.append("-" if rise is None else "not finite" if math.isinf(rise) else f"{rise:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_runs(path):
    """(runs by variant, held-out note) from a _ablation-runs.json an earlier ablation wrote (--from-runs)."""
    import json
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        runs = record["runs"]
        if "reference" not in runs or not all(isinstance(v, list) and v for v in runs.values()):
            raise ValueError("its 'runs' has no reference or an empty variant")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"ablate: --from-runs={path}: not a readable _ablation-runs.json ({e})")
    return runs, record.get("heldout")


def main(argv=None):
    args = get_args(argv)
    import json
    from nanochat.common import atomic_write_text
    from nanochat.report import get_report_dir, write_section
    all_flags = dict(variants(args.max_seq_len, reference_flags(args), args.suite))
    title, runs_file, png_file, _ = suite_names(args)
    if args.from_runs:
        runs_by_label, note = load_runs(args.from_runs)
        if any(r.get("chat_bpb") is not None for runs in runs_by_label.values() for r in runs) and not note:
            note = load_heldout(args)[2]  # an older record without its note: the flags describe it
    else:
        heldout = load_heldout(args) if args.sft_steps > 0 else None  # a bad --chat-data fails before any training
        note = heldout[2] if heldout else None
        runs_by_label, path = {}, os.path.join(get_report_dir(), runs_file)
        recorded = {}
        if args.resume and os.path.exists(path):
            recorded = {(r["label"], r["seed"]): r for runs in load_runs(path)[0].values() for r in runs}

        def save(label, runs):  # the record so far, after every run: an interrupted ablation resumes from it
            runs_by_label[label] = runs
            atomic_write_text(path, json.dumps({"argv": sys.argv[1:] if argv is None else argv, "heldout": note,
                                                "runs": runs_by_label, "partial": True}, indent=1) + "\n")
        with kept_report_sections(SUB_RUN_SECTIONS):
            for label, flags in all_flags.items():
                if label == "reference" or not args.only or label in args.only:
                    runs_by_label[label] = run_variant(label, flags, args, heldout, recorded, save)
    try:
        rows = summarize(runs_by_label)
    except ValueError as e:  # e.g. a run too short for a curve, or seeds that do not pair
        raise SystemExit(f"ablate: {e}")
    table = table_markdown(rows, {label: all_flags.get(label, ["?"]) for label in runs_by_label})
    print0(table)
    report_dir = get_report_dir()
    record = {"argv": sys.argv[1:] if argv is None else argv, "heldout": note, "runs": runs_by_label, "variants": rows}
    atomic_write_text(os.path.join(report_dir, runs_file), json.dumps(record, indent=1) + "\n")  # "_": no section
    png = plot_ablation(rows, os.path.join(report_dir, png_file))
    ref = rows[0]
    seconds = [r["seconds"] for runs in runs_by_label.values() for r in runs if r.get("seconds") is not None]
    timing = ""
    if seconds:
        timing = (f" The {len(seconds)} timed runs took {sum(seconds) / 60:.1f} minutes of wall time in all (median "
                  f"{statistics.median(seconds):.0f} s a run).")
        print0(timing.strip())
    body = (f"Equal training FLOPs ({ref['flops']:.2e} for the reference) per run, {len(ref['seeds'])} seeds per variant "
            f"({', '.join(map(str, ref['seeds']))}), depth {args.depth}, reference context {args.max_seq_len}, data "
            f"`{args.data or 'reference shards'}`.{timing} Text bpb: validation bits per byte on held-out text at the end of "
            f"pretraining ({args.eval_tokens:,} tokens). "
            + (f"Chat bpb: assistant-turn bits per byte after {args.sft_steps} SFT steps on {args.sft_mixture} "
               f"({args.sft_examples_per_step} conversations per step), on {note}. " if note else "")
            + f"Δ vs ref: mean ± std over seeds of (variant - reference at the same seed). Beyond noise: paired t-test "
            f"on those differences, p < {NOISE_P}. Compute multiplier: reference FLOPs needed to reach the variant's mean "
            f"final text bpb on the reference's mean validation curve (log-log, {len(ref['curve'])} points to "
            f"{ref['flops']:.2e} FLOPs), over the variant's FLOPs; beyond the curve's end it is extrapolated. Max loss rise: the largest rise of a "
            f"run's training loss above its running minimum (nats), worst seed: the reference's is minibatch noise; "
            f"a spike shows as more, a divergence as 'not finite'.\n\n{table}")
    if png:
        body += f"\n\n![{title}]({png_file})"
    metrics = {}
    for r in rows:
        metrics[r["label"]] = r["text_bpb"]["mean"]
        if r.get("chat_bpb"):
            metrics[f"{r['label']} chat"] = r["chat_bpb"]["mean"]
        metrics[f"{r['label']} multiplier"] = r["multiplier"] if math.isfinite(r["multiplier"]) else None
    write_section(title, body, metrics=metrics)
    return {"variants": rows, "runs": runs_by_label, "table": table}


if __name__ == "__main__":
    main()
