"""
What to train, declared once: the architecture flags (add_model_flags -> config_from_flags -> GPTConfig) that
scripts.base_train, scripts.plan, scripts.ablate, bench/ and `python -m nanochat.gpt` share; the first user's
planned architecture changes (PLANNED_CHANGES: scripts.plan prices them, scripts.ablate trains them); and the
pretraining recipe changes past the late-2025 reference (RECIPE_CHANGES), each with the reference's value, so the
ablation can put every one of them, and all of them together, against the reference recipe.
"""
import argparse
import math

from nanochat.common import make_parser, non_negative_float, non_negative_int, positive_float, positive_int, str2bool
from nanochat.gpt import ACTIVATIONS, config_for_depth, largest_divisor

# -----------------------------------------------------------------------------
# The architecture flags, declared once: scripts.base_train, scripts.plan, scripts.ablate, bench/ and
# `python -m nanochat.gpt` all take them from here. A new knob = its GPTConfig field, its use in the model, one
# flag line in add_model_flags (dest = the field's name: config_from_flags passes it through), and its
# row in docs/model.md.

# Flags config_from_flags reads itself (the sizing rule); every other flag is the GPTConfig field of its name.
SIZING_FLAGS = ("depth", "head_dim", "max_seq_len", "n_kv_head", "kv_head_ratio")


def add_model_flags(parser, with_depth=True, **defaults):
    """Add the architecture flags to `parser`: a nanochat.common.make_parser parser or one of its argument
    groups (so --tie-embeddings also takes the bare and --no- forms). with_depth=False leaves --depth out
    (scripts.plan sweeps --depths instead); `defaults`, by dest, replaces flag defaults (scripts.ablate's
    tiny scale). Bad values are argparse errors that name the flag. Returns the dests added, in order."""
    dests = []

    def add(flag, default, **kw):
        dest = flag[2:].replace("-", "_")
        parser.add_argument(flag, default=defaults.pop(dest, default), **kw)
        dests.append(dest)

    if with_depth:
        add("--depth", 20, type=positive_int, help="number of layers; width is 64 x depth")
    add("--head-dim", 128, type=positive_int, help="channels per attention head")
    add("--max-seq-len", 2048, type=positive_int, help="context length")
    add("--mlp-ratio", 4.0, type=positive_float, help="MLP hidden size / width")
    add("--activation", "relu2", choices=ACTIVATIONS)
    add("--tie-embeddings", False, type=str2bool, help="share wte and lm_head")
    add("--n-kv-head", 0, type=non_negative_int, help="key/value heads (0 = n_head / --kv-head-ratio)")
    add("--kv-head-ratio", 1, type=positive_int, help="n_kv_head = n_head // ratio, rounded down to a divisor of n_head")
    add("--softcap", 15.0, type=non_negative_float, help="logit softcap (0 = off)")
    add("--rope-base", 10000.0, type=positive_float, help="rotary embedding base (theta)")
    add("--residual-scalars", False, type=str2bool, help="learnable per-layer resid/x0 mixing scalars before each block")
    add("--value-embeds", True, type=str2bool, help="gated value embeddings on alternating layers (a vocab-sized table each; "
        "--value-embeds=false for a model transformers' NanoChat can load)")
    add("--window-pattern", "L", type=window_pattern, help="attention per layer, tiled: L full, S half-context window; last layer L")
    if defaults:
        raise ValueError(f"add_model_flags: no architecture flag for default(s) {sorted(defaults)}")
    return dests


def window_pattern(text):
    """argparse type of --window-pattern: letters S and L, e.g. SSSL."""
    value = str(text).strip().upper()
    if not value or len(value) > 64 or set(value) - {"S", "L"}:
        raise argparse.ArgumentTypeError(f"expected 1-64 letters S (half-context window) or L (full context), "
                                         f"e.g. SSSL; got {text!r}")
    return value


def model_flags(**values):
    """The architecture flags as a namespace: their defaults, with `values` (by dest) in place. For
    callers that name a shape their own way (bench/train_step.py's --seq_len) and still build the
    config through config_from_flags, like the scripts."""
    parser = make_parser(None)
    add_model_flags(parser, **values)
    return parser.parse_args([])


MODEL_FLAGS = tuple(vars(model_flags()))  # every architecture flag's dest, in declaration order


def config_from_flags(args, vocab_size):
    """The GPTConfig the architecture flags in `args` describe, for a tokenizer of `vocab_size` tokens:
    config_for_depth's sizing at --depth and --head-dim, context --max-seq-len; n_kv_head = --n-kv-head,
    or when that is 0, n_head // --kv-head-ratio rounded down to a divisor of n_head (GQA needs whole
    groups: at depth 28, 14 heads // 4 = 3 rounds to 2). Every other flag is the GPTConfig field of its
    name; --softcap 0 is stored as None (off). Raises ValueError naming the field when the flags give
    no valid model."""
    knobs = {name: getattr(args, name) for name in MODEL_FLAGS if name not in SIZING_FLAGS}
    knobs["softcap"] = knobs["softcap"] or None
    n_head = config_for_depth(args.depth, vocab_size, head_dim=args.head_dim).n_head
    n_kv_head = args.n_kv_head or largest_divisor(n_head, n_head // args.kv_head_ratio)
    return config_for_depth(args.depth, vocab_size, sequence_len=args.max_seq_len, head_dim=args.head_dim,
                            n_kv_head=n_kv_head, **knobs)


# The first user's planned architecture changes, each one alone, as architecture-flag values over
# the reference: (label, flag values, part of "all together"). A context change is a divisor of the
# reference context, so one list serves the full-size planner (2048 -> 1024, 512) and the tiny
# ablation (256 -> 128, 64). scripts.plan prices them, scripts.ablate trains them (planned_changes).
PLANNED_CHANGES = (
    ("tied embeddings", dict(tie_embeddings=True), True),
    ("context / 2", dict(context_divisor=2), True),
    ("context / 4", dict(context_divisor=4), False),
    ("MLP 3x", dict(mlp_ratio=3.0), True),
    ("MLP 2.5x", dict(mlp_ratio=2.5), False),
    ("n_kv_head = n_head // 4", dict(n_kv_head=0, kv_head_ratio=4), True),
    ("GELU", dict(activation="gelu"), False),
    ("SiLU", dict(activation="silu"), True),
    ("softcap off", dict(softcap=0.0), True),
    ("RoPE base 100000", dict(rope_base=100000.0), True),
)


def planned_changes(max_seq_len, context_label="context"):
    """[(label, flag values)]: each planned change alone, then "all together" (the changes marked for it,
    merged in order). Context changes are resolved against the reference context `max_seq_len` and
    labelled f"{context_label} {length}" (the planner says "seq 1024", the ablation "context 128")."""
    rows, together = [], {}
    for label, change, in_plan in PLANNED_CHANGES:
        change = dict(change)
        if divisor := change.pop("context_divisor", None):
            change["max_seq_len"] = max_seq_len // divisor
            label = f"{context_label} {change['max_seq_len']}"
        rows.append((label, change))
        if in_plan:
            together.update(change)
    return rows + [("all together", together)]


# -----------------------------------------------------------------------------
# The pretraining recipe past the late-2025 reference. REFERENCE_RECIPE: the reference's value of every
# scripts.base_train flag a change sets. RECIPE_CHANGES: (label, flag values, part of the new recipe) per change,
# each from upstream nanochat's 2026 development (docs/recipe.md has the sources, our measurements and the
# decisions). scripts.ablate --suite=recipe trains the reference recipe, each change alone on top of it, and the
# marked ones together; the values marked are base_train's defaults once measured.
REFERENCE_RECIPE = dict(warmup_steps=0, warmdown_ratio=0.2, final_lr_frac=0.0, muon_ortho="newton-schulz",
                        normuon=False, muon_wd=0.0, cautious_wd=False, wd_schedule="constant",
                        residual_scalars=False, value_embeds=False, window_pattern="L", rope_base=10000.0)
RECIPE_CHANGES = (
    ("warmdown 65% to 5%", dict(warmdown_ratio=0.65, final_lr_frac=0.05), True),
    ("warmup 5 steps", dict(warmup_steps=5), False),
    ("Polar Express", dict(muon_ortho="polar-express"), True),
    ("NorMuon", dict(normuon=True), True),
    ("cautious weight decay", dict(muon_wd=10.0, cautious_wd=True, wd_schedule="linear"), True),
    ("residual scalars", dict(residual_scalars=True), False),
    ("value embeddings", dict(value_embeds=True), True),
    ("RoPE base 100000", dict(rope_base=100000.0), False),
    ("window SSSL", dict(window_pattern="SSSL"), False),
)


def recipe_changes():
    """[(label, flag values)]: each recipe change alone, then "new recipe" (the marked ones merged in order)."""
    together = {}
    for _, change, in_recipe in RECIPE_CHANGES:
        if in_recipe:
            together.update(change)
    return [(label, dict(change)) for label, change, _ in RECIPE_CHANGES] + [("new recipe", together)]


# -----------------------------------------------------------------------------
# The horizon and the batch: how many tokens, in steps of how many. Tokens = --target-param-data-ratio x the
# scaling parameters (GPT.num_params_by_group: the matmul parameters a token's compute scales with; lookup tables
# such as the embedding and value embeddings cost no FLOPs and are left out, as in Kaplan et al. 2020). Upstream
# fit the compute-optimal ratio on this basis at 1e18-1e19 FLOPs: ~10.5 tokens per scaling parameter.
# The batch: B_opt grows with the token budget D as D^0.383 (Bergsma et al. 2025, "Power Lines"), anchored where
# upstream tuned it: 2^19 tokens for the depth-12 model of the same flags at the same ratio.
BATCH_REF_TOKENS, BATCH_EXPONENT, BATCH_REF_DEPTH = 2 ** 19, 0.383, 12


def auto_batch_size(tokens, ref_tokens):
    """Tokens per optimizer step for a run of `tokens`: 2^19 x (tokens / ref_tokens)^0.383, rounded to a power of 2
    in log space (so the accumulation split stays exact)."""
    return 2 ** round(math.log2(BATCH_REF_TOKENS * (tokens / ref_tokens) ** BATCH_EXPONENT))


def reference_tokens(args, vocab_size):
    """The batch law's anchor: the depth-12 model of these architecture flags, its tokens at the data ratio."""
    import torch
    from nanochat.gpt import GPT
    with torch.device("meta"):
        model = GPT(config_from_flags(argparse.Namespace(**{**vars(args), "depth": BATCH_REF_DEPTH}), vocab_size))
    return args.target_param_data_ratio * model.num_params_by_group()["scaling"]


def training_horizon(args, scaling_params, flops_per_token, vocab_size):
    """(tokens per step, steps) of scripts.base_train's horizon flags (scripts.plan's, which has no
    --num-iterations / --target-flops, gets the data-ratio rule). The first set of --num-iterations,
    --target-flops, --target-param-data-ratio fixes the token budget; --total-batch-size -1 derives the batch
    from it (auto_batch_size). ValueError naming the flag when the flags give no horizon."""
    num_iterations, target_flops = getattr(args, "num_iterations", -1), getattr(args, "target_flops", -1.0)
    tokens = (None if num_iterations > 0 else target_flops / flops_per_token if target_flops > 0
              else args.target_param_data_ratio * scaling_params)
    batch = args.total_batch_size
    if batch == -1:
        if tokens is None:
            raise ValueError("--total-batch-size=-1 (auto) derives the batch from the token budget, which "
                             "--num-iterations does not give: set --total-batch-size, or use --target-flops")
        batch = auto_batch_size(tokens, reference_tokens(args, vocab_size))
    return batch, max(1, num_iterations if tokens is None else round(tokens / batch))


def batch_size_flag(text):
    """argparse type of --total-batch-size: tokens per step, or -1 for auto_batch_size."""
    value = int(text)
    if value != -1 and value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of tokens or -1 (auto), got {text!r}")
    return value
