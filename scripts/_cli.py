"""
The command-line plumbing the scripts share: the training stages' (base_train, mid_train, chat_sft, chat_rl)
flag groups, the optimizer step their flags schedule, and start-up steps that turn a missing file or a bad flag
into a one-line exit naming the script. Not an entry point; the library side of the stages (schedules, the
gradient step, step stats, checkpoint state, the report section) is nanochat/training.py.
"""
import sys

from nanochat.checkpoint import CheckpointError, find_last_step, load_model, resolve_checkpoint
from nanochat.common import (auto_bool, autodetect_device_type, non_negative_float, non_negative_int, positive_float,
                             positive_int, print0, str2bool)
from nanochat.training import (lr_multiplier, muon_momentum, open_stage, optimizer_step, restore_training_state,
                               set_learning_rates, wd_multiplier)

CATEGORICAL = "ARC-Easy|ARC-Challenge|MMLU"


def stage_error(message):
    """Leave the process group (if any) and exit with `message`: every rank of a torchrun job hits the same
    missing file or bad flag, and a clean exit beats a hung collective."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(message)

# -----------------------------------------------------------------------------
# Flag groups


def flag(dest, v):
    """One flag as the stages' parsers read it, as people write it: --tie-embeddings=true, --mlp-ratio=3, 2.5."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"--{dest.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}"


def add_run_flags(parser, seed_help=None):
    parser.add_argument("--run", default="dummy", help="wandb run name ('dummy' = no wandb)")
    parser.add_argument("--device-type", default="", choices=["", "cuda", "mps", "cpu"], help="'' = autodetect")
    parser.add_argument("--seed", type=int, default=42, help=seed_help)


def add_stage_io_flags(parser, stage, sources):
    """The 'input and output' group of a stage that writes <stage> checkpoints. `sources` are the checkpoint
    families it may start from, the first the default; with a single one (midtraining: base) there is no --source."""
    g = parser.add_argument_group("input and output")
    if len(sources) == 1:
        what, input_tag = f"{sources[0]} checkpoint", f"the {sources[0]} model's tag"
        g.add_argument("--model-tag", default=None, help=f"{what} to continue (default: the largest)")
    else:
        what, input_tag = "input checkpoint", "the input's tag"
        g.add_argument("--source", default=sources[0], choices=list(sources), help="checkpoint family to start from")
        g.add_argument("--model-tag", default=None, help=f"{what} (default: the largest)")
    g.add_argument("--step", type=int, default=None, help=f"{what} step (default: the last)")
    g.add_argument("--output-tag", default=None, help=f"{stage} checkpoint directory name (default: {input_tag})")
    g.add_argument("--resume", type=str2bool, default=False,
                   help=f"continue from the last {stage} checkpoint of the output tag")
    g.add_argument("--save-every", type=int, default=-1, help="checkpoint every N steps (-1 = only at the end)")


def add_optimizer_flags(g, *, init_lr_frac, warmdown_ratio, warmdown_help="fraction of steps of linear decay (1 = all)",
                        final_lr_frac=0.0, with_compile=False, with_warmup=False, with_muon_variants=False):
    """The learning-rate flags of a stage, appended to its 'optimization' argument group `g` after the stage's
    own batch and horizon flags; the stages differ only in how far they scale the rates down (init_lr_frac=None:
    no --init-lr-frac flag, the rates as given), warm them up and decay them."""
    g.add_argument("--embedding-lr", type=float, default=0.2)
    g.add_argument("--unembedding-lr", type=float, default=0.004)
    g.add_argument("--matrix-lr", type=float, default=0.02)
    g.add_argument("--weight-decay", type=float, default=0.0)
    if init_lr_frac is not None:
        g.add_argument("--init-lr-frac", type=float, default=init_lr_frac, help="every learning rate above is scaled by this")
    if with_warmup:
        g.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear warmup")
        g.add_argument("--warmup-steps", type=non_negative_int, default=0, help="steps of linear warmup (wins over --warmup-ratio)")
    g.add_argument("--warmdown-ratio", type=float, default=warmdown_ratio, help=warmdown_help)
    g.add_argument("--final-lr-frac", type=float, default=final_lr_frac, help="the warmdown ends at this fraction of the LR")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    if with_muon_variants:  # the Muon variants of the 2026 recipe, its defaults (nanochat/optim.py, docs/recipe.md)
        g.add_argument("--muon-ortho", default="polar-express", choices=["newton-schulz", "polar-express"],
                       help="orthogonalization of Muon's update")
        g.add_argument("--normuon", type=str2bool, default=True, help="per-neuron second-moment normalization (NorMuon)")
        g.add_argument("--muon-wd", type=non_negative_float, default=10.0,
                       help="Muon weight decay as a total over training: lambda = this / (matrix LR x steps), so the "
                            "same value means the same relative shrink at any horizon (0 = off)")
        g.add_argument("--cautious-wd", type=str2bool, default=True, help="decay only where the update also shrinks the weight")
        g.add_argument("--wd-schedule", default="linear", choices=["constant", "linear"],
                       help="weight decay over training: constant, or linear from full to 0")
        g.add_argument("--scalar-lr", type=positive_float, default=0.5, help="AdamW LR of the residual scalars (x0; resid gets 1/100)")
    if with_compile:
        g.add_argument("--compile", type=auto_bool, default="auto", help="torch.compile the model (auto = on CUDA)")


def check_optimizer_flags(parser, args):
    """`args`, or parser.error (exit 2, naming the flag) on add_optimizer_flags values out of range."""
    for name in ("warmup_ratio", "warmdown_ratio", "final_lr_frac"):
        if not 0.0 <= getattr(args, name, 0.0) <= 1.0:
            parser.error(f"argument --{name.replace('_', '-')}: must be between 0 and 1")
    if getattr(args, "warmup_ratio", 0.0) + args.warmdown_ratio > 1.0:
        parser.error("--warmup-ratio plus --warmdown-ratio must not exceed 1")
    if not getattr(args, "init_lr_frac", 1.0) > 0:
        parser.error("argument --init-lr-frac: must be positive")
    return args


def add_chat_data_flags(parser, eval_every, with_mask_loss=False):
    """The 'data' group of the conversation stages (midtraining, SFT) and the held-out loss flags of their
    'evaluation' group, which is returned for the stage to add its own."""
    from tasks.mixtures import MIXTURES
    g = parser.add_argument_group("data")
    g.add_argument("--mixture", default="reference", choices=list(MIXTURES), help="named mixture (listed above)")
    g.add_argument("--extra-data", default="", help="your own {'messages': [...]} JSONL(.gz) files: PATH[:WEIGHT],...")
    if with_mask_loss:
        g.add_argument("--mask-loss", type=str2bool, default=False,
                       help="loss only on the assistant's tokens (default: on every token, as the reference)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=eval_every, help="held-out loss every N steps (-1 = start and end only)")
    g.add_argument("--eval-conversations", type=positive_int, default=1000, help="held-out conversations evaluated")
    return g


def use_compile(args, device_type):
    """--compile: auto compiles on CUDA only (on CPU the compile time rarely pays back in a short run)."""
    return args.compile == "true" or (args.compile == "auto" and device_type == "cuda")

# -----------------------------------------------------------------------------
# Start-up steps that exit with '<script>: <what failed>: <why>'


def open_stage_or_exit(script, stage, source, device, args):
    """open_stage with the add_stage_io_flags flags; exits with '<script>: cannot ...: <why>' when it cannot."""
    try:
        return open_stage(stage, source, device, args.model_tag, args.step, args.output_tag, args.resume)
    except (CheckpointError, OSError, ValueError) as e:
        stage_error(f"{script}: cannot {'resume' if args.resume else f'load the {source} model'}: {e}")


def load_chat_data_or_exit(script, stage, args):
    """(the --mixture with the stage's weights plus --extra-data, the --eval-tasks); exits on missing or bad data."""
    from tasks.mixtures import build_mixture
    from tasks.registry import load_tasks
    try:
        return build_mixture(args.mixture, stage, args.extra_data), load_tasks(args.eval_tasks)
    except (OSError, ValueError) as e:
        stage_error(f"{script}: data error: {e}")


def setup_stage_optimizers(model, args, num_iterations=None):
    """The model's optimizers at the add_optimizer_flags learning rates, each scaled by --init-lr-frac; with the
    Muon-variant flags, Muon's orthogonalization, NorMuon and weight decay lambda = --muon-wd / (matrix LR x
    num_iterations) (the decay summed over a constant-LR run: horizon-independent, as the EMA-timescale rule of
    Wang & Aitchison 2024 asks; upstream's tuned d12-d20 values are ~10 in these units, docs/recipe.md)."""
    lr = getattr(args, "init_lr_frac", 1.0)
    muon = {}
    if hasattr(args, "muon_ortho"):
        wd = args.muon_wd / (args.matrix_lr * lr * num_iterations) if args.muon_wd else 0.0
        muon = dict(muon_ortho=args.muon_ortho, normuon_beta2=0.95 if args.normuon else 0.0, muon_weight_decay=wd,
                    cautious_wd=args.cautious_wd, scalar_lr=args.scalar_lr)
    return model.setup_optimizers(unembedding_lr=args.unembedding_lr * lr, embedding_lr=args.embedding_lr * lr,
                                  matrix_lr=args.matrix_lr * lr, weight_decay=args.weight_decay, **muon)


def resume_or_exit(script, logger, ckpt_dir, step, optimizers, loaders, device, device_type, rank=0, world_size=1,
                   accum=1, model=None):
    """restore_training_state from `step` (None: the last complete one; with `model`: its weights too), then drop
    the log's records after it; returns the step. Exits with '<script>: cannot resume: <why>' when there is no
    checkpoint or it does not fit this run."""
    try:
        step = find_last_step(ckpt_dir) if step is None else step
        restore_training_state(ckpt_dir, step, optimizers, loaders, device, device_type, rank, world_size, accum,
                               model=model)
    except (CheckpointError, ValueError) as e:
        stage_error(f"{script}: cannot resume: {e}")
    logger.truncate_after(step)
    print0(f"resumed from {ckpt_dir} step {step}")
    return step


def step_optimizers(args, model, optimizers, step, num_iterations, world_size, momentum=True):
    """The optimizer step after the gradients of `step`: the rates of the add_optimizer_flags schedule (Muon's
    momentum ramp unless momentum=False; the weight-decay schedule where the stage has --wd-schedule), then
    optimizer_step with --grad-clip. Returns the learning-rate multiplier."""
    lrm = lr_multiplier(step, num_iterations, getattr(args, "warmup_ratio", 0.0), args.warmdown_ratio,
                        args.final_lr_frac, getattr(args, "warmup_steps", 0))
    wdm = wd_multiplier(step, num_iterations, args.wd_schedule) if hasattr(args, "wd_schedule") else None
    set_learning_rates(optimizers, lrm, momentum=muon_momentum(step) if momentum else None, wdm=wdm)
    optimizer_step(model, optimizers, args.grad_clip, world_size)
    return lrm

# -----------------------------------------------------------------------------
# The trained model a chat script (chat_cli, chat_web, chat_eval) loads


def add_model_source_flags(parser, source="sft"):
    """-i/--source (source=None: required), -g/--model-tag, -s/--step, --device-type, --compile."""
    parser.add_argument("-i", "--source", default=source, required=source is None, choices=["base", "mid", "sft", "rl"],
                        help="checkpoint family")
    parser.add_argument("-g", "--model-tag", default=None, help="model tag (e.g. d20); default the largest")
    parser.add_argument("-s", "--step", type=non_negative_int, default=None, help="checkpoint step; default the last")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="load from this checkpoint folder (holding step_* directories) instead of -i/-g")
    parser.add_argument("--device-type", choices=["", "cuda", "mps", "cpu"], default="", help="'' = autodetect")
    parser.add_argument("--compile", type=str2bool, default=False,
                        help="compile the decode step (Engine(compile=True): faster tokens after a one-off "
                             "compilation per batch shape; weights frozen)")


def device_type_or_exit(parser, args):
    """--device-type, or the best one here when unset; parser.error (exit 2) when it is not available."""
    try:
        return autodetect_device_type(args.device_type)
    except (ValueError, RuntimeError) as e:
        parser.error(f"--device-type: {e}")


def load_model_or_exit(script, args, device):
    """The add_model_source_flags checkpoint (the largest tag, the last step unless given) loaded on `device` for
    inference: (model, tokenizer, checkpoint dir, step). Exits (status 1) with '<script>: <why>' on stderr when
    there is no checkpoint or tokenizer yet, or they do not fit."""
    try:
        if args.checkpoint_dir:
            ckpt_dir, step = args.checkpoint_dir, find_last_step(args.checkpoint_dir) if args.step is None else args.step
        else:
            ckpt_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
        model, tokenizer, _ = load_model(args.source, device, step=step, ckpt_dir=ckpt_dir)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"{script}: {e}", file=sys.stderr, flush=True)
        stage_error(1)
    return model, tokenizer, ckpt_dir, step
