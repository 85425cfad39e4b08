"""
Pieces every training stage shares: batch arithmetic, learning-rate and momentum schedules,
throughput/MFU, the per-step logger (console, JSON lines, optional wandb) and the
device-batch-size probe; then what the chat stages (mid, SFT, RL) share: checkpoint state,
and the flags and start-up of their scripts.
"""
import json
import os
import time

import torch

from nanochat.common import (DummyWandb, autocast_context, autodetect_device_type, compute_init, get_compute_dtype,
                             auto_bool, print0, str2bool)


def grad_accum_steps(total_batch_size, device_batch_size, sequence_len, world_size):
    """Micro-steps per optimizer step so that every step sees exactly `total_batch_size` tokens."""
    tokens_per_fwdbwd = device_batch_size * sequence_len * world_size
    if total_batch_size % tokens_per_fwdbwd != 0:
        raise ValueError(
            f"--total-batch-size={total_batch_size} is not a multiple of device_batch_size x sequence_len x "
            f"world_size = {device_batch_size} x {sequence_len} x {world_size} = {tokens_per_fwdbwd}; "
            f"pick sizes whose product divides it")
    return total_batch_size // tokens_per_fwdbwd


def lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0):
    """Linear warmup, constant, then linear warmdown to `final_lr_frac` over the last fraction of steps."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(step, start=0.85, end=0.95, ramp_steps=300):
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end


def set_learning_rates(optimizers, lrm, momentum=None):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if momentum is not None and "momentum" in group:
                group["momentum"] = momentum


def throughput(tokens_per_step, step_seconds, flops_per_token, peak_flops):
    """(tokens/s, MFU) of one optimizer step. `tokens_per_step` counts every token the step
    processed: all ranks and all accumulation micro-steps."""
    tok_per_sec = tokens_per_step / step_seconds
    return tok_per_sec, tok_per_sec * flops_per_token / peak_flops


def format_duration(seconds):
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class StepLogger:
    """One line per step on the console, the same record as JSON lines in the run directory,
    and wandb when a run name is given. Only rank 0 writes."""

    def __init__(self, run_dir, run_name, config, rank=0, project="nanochat", resume=False):
        self.rank = rank
        self.path = os.path.join(run_dir, "log.jsonl")
        self.wandb = DummyWandb()
        if rank != 0:
            return
        os.makedirs(run_dir, exist_ok=True)
        if not resume and os.path.exists(self.path):
            os.remove(self.path)
        if run_name and run_name != "dummy":
            try:
                import wandb
            except ImportError:
                raise SystemExit("--run names a wandb run but wandb is not installed: pip install 'nanochat[wandb]'")
            self.wandb = wandb.init(project=project, name=run_name, config=config)

    def log(self, record, line=None):
        if self.rank != 0:
            return
        if line:
            print0(line)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self.wandb.log(record)

    def truncate_after(self, step):
        """On resume, drop records of steps after the checkpoint so the log reads as one run."""
        if self.rank != 0 or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def finish(self):
        self.wandb.finish()


def average_gradients_(params, world_size):
    """All-reduce gradients to their mean across ranks, in place. Only needed before gradient clipping
    under torchrun: the clip must see the global gradient, exactly as a single process with gradient
    accumulation would. The distributed optimizers then reduce again (sum / world_size) and get the
    same mean back, so their update is unchanged."""
    import torch.distributed as dist
    works = [dist.all_reduce(p.grad, async_op=True) for p in params if p.grad is not None]
    for work in works:
        work.wait()
    for p in params:
        if p.grad is not None:
            p.grad.div_(world_size)


def find_device_batch_size(try_batch, candidates, device_type):
    """Largest candidate batch for which `try_batch(b)` (a forward+backward) runs without running
    out of memory; OOM backs off to the next smaller candidate."""
    for b in sorted(candidates, reverse=True):
        try:
            try_batch(b)
            return b
        except torch.OutOfMemoryError:
            if device_type == "cuda":
                torch.cuda.empty_cache()
            print0(f"device batch size {b} does not fit in memory, trying a smaller one")
    raise RuntimeError(f"even the smallest device batch size {min(candidates)} does not fit in memory")


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def lap(self):
        t = time.perf_counter()
        dt, self.t0 = t - self.t0, t
        return dt

# -----------------------------------------------------------------------------
# Shared by the stages that continue a checkpoint (midtraining, SFT, RL)


def rng_state(device_type):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}


def restore_rng_state(state, device_type):
    torch.set_rng_state(state["cpu"])
    if device_type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu())


def check_tokenizer_vocab(tokenizer, vocab_size, where):
    """CheckpointError unless the tokenizer has the vocabulary size the checkpoint was trained with."""
    from nanochat.checkpoint import CheckpointError
    if tokenizer.get_vocab_size() != vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but {where} was trained with "
                              f"{vocab_size}: use the tokenizer the checkpoint was trained with")


def load_input_model(source, device, model_tag=None, step=None, phase="train"):
    """The checkpoint a stage starts from: (model, tokenizer, meta, ckpt_dir, step). CheckpointError with a
    clear message when it is missing or was trained with another tokenizer."""
    from nanochat.checkpoint import load_model, resolve_checkpoint
    ckpt_dir, step = resolve_checkpoint(source, model_tag, step)
    model, tokenizer, meta = load_model(source, device, phase=phase, model_tag=os.path.basename(ckpt_dir), step=step)
    return model, tokenizer, meta, ckpt_dir, step


def save_training_state(ckpt_dir, step, model, optimizers, loaders, meta, device_type, rank=0, world_size=1):
    """A checkpoint a run can resume from exactly: weights, each rank's optimizer and loader states, RNG.
    Collective under torchrun."""
    from nanochat.checkpoint import save_checkpoint
    state = {"optimizers": [opt.state_dict() for opt in optimizers], "loaders": [l.state_dict() for l in loaders]}
    return save_checkpoint(ckpt_dir, step, model.state_dict(), state, meta, rank=rank, world_size=world_size,
                           rng_state=rng_state(device_type))


def restore_training_state(ckpt_dir, step, optimizers, loaders, device, device_type, rank=0, world_size=1, accum=1):
    """Load what save_training_state wrote (the weights are loaded separately, e.g. by checkpoint.build_model).
    CheckpointError when the run's world size or accumulation differs (the data order would not continue)."""
    from nanochat.checkpoint import CheckpointError, load_checkpoint
    _, payload, meta = load_checkpoint(ckpt_dir, step, device, load_optimizer=True, rank=rank)
    if meta.get("world_size") != world_size or meta.get("accum") != accum:
        raise CheckpointError(f"checkpoint was written by {meta.get('world_size')} rank(s) x {meta.get('accum')} "
                              f"accumulation steps, this run has {world_size} x {accum}")
    for opt, state in zip(optimizers, payload["optimizer"]["optimizers"]):
        opt.load_state_dict(state)
    for loader, state in zip(loaders, payload["optimizer"]["loaders"]):
        loader.load_state_dict(state)
    restore_rng_state(payload["rng"], device_type)
    return meta


def optimizer_step(model, optimizers, grad_clip=0.0, world_size=1):
    """Clip (on the global gradient under torchrun), step every optimizer, zero the gradients."""
    if grad_clip > 0:
        if world_size > 1:
            average_gradients_(list(model.parameters()), world_size)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


def all_reduce_mean(value, device, world_size):
    """The mean of a Python number over ranks (the number itself without torchrun)."""
    if world_size <= 1:
        return float(value)
    import torch.distributed as dist
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)  # gloo has no AVG
    return t.item() / world_size


def accumulate_gradients(train_model, batches, autocast, world_size=1):
    """Forward and backward over one optimizer step's micro-batches [(inputs, targets)], the loss normalized
    by the number of target tokens (targets != -1) of the whole step on all ranks: every token weighs the
    same whichever micro-batch or rank it is in (padded SFT rows hold different numbers of tokens). The
    distributed optimizers average gradients over ranks, hence the factor world_size. Returns the step's
    mean loss per target token (the same on every rank)."""
    device = batches[0][1].device
    count = sum((y != -1).sum() for _, y in batches).double()
    total = torch.zeros((), dtype=torch.float64, device=device)
    if world_size > 1:
        import torch.distributed as dist
        dist.all_reduce(count)
    n = count.clamp(min=1)
    for x, y in batches:
        with autocast():
            loss_sum = train_model(x, y, loss_reduction="sum")
        (loss_sum * (world_size / n)).backward()
        total += loss_sum.detach().double()
    if world_size > 1:
        dist.all_reduce(total)
    return (total / n).item()


def stage_error(message):
    """Leave the process group (if any) and exit with `message`: every rank of a torchrun job hits the same
    missing file or bad flag, and a clean exit beats a hung collective."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(message)


def load_eval_tasks(spec):
    """'ARC-Easy|MMLU' -> {name: task} for nanochat.chat_eval.run_chat_eval; 'none' or '' -> {}.
    ValueError / FileNotFoundError with a clear message."""
    from nanochat.chat_eval import load_task, parse_task_names
    if not spec or spec.strip().lower() == "none":
        return {}
    return {name: load_task(name) for name in parse_task_names(spec)}


def open_stage(stage, input_source, device, model_tag=None, step=None, output_tag=None, resume=False):
    """The model a chat stage trains and where it writes. Fresh: the `input_source` checkpoint (model_tag, step;
    default the largest model's last step), written to <stage>_checkpoints/<output_tag or the input's tag>.
    Resume: the stage's own last checkpoint of output_tag (or model_tag, or the largest).
    Returns (model, tokenizer, ckpt_dir, start_step, resume_meta or None, origin {source, model_tag, step}).
    CheckpointError / OSError / ValueError with a clear message (missing checkpoint, other tokenizer)."""
    from nanochat.checkpoint import build_model, checkpoints_root, find_largest_model, find_last_step, step_dir
    from nanochat.tokenizer import get_tokenizer
    if resume:
        root = checkpoints_root(stage)
        tag = output_tag or model_tag or find_largest_model(root)
        ckpt_dir = os.path.join(root, tag)
        start_step = find_last_step(ckpt_dir)
        model, meta = build_model(ckpt_dir, start_step, device, phase="train")
        tokenizer = get_tokenizer()
        check_tokenizer_vocab(tokenizer, model.config.vocab_size, f"checkpoint {step_dir(ckpt_dir, start_step)}")
        return model, tokenizer, ckpt_dir, start_step, meta, meta.get("input")
    model, tokenizer, _, in_dir, in_step = load_input_model(input_source, device, model_tag, step)
    ckpt_dir = os.path.join(checkpoints_root(stage), output_tag or os.path.basename(in_dir))
    return model, tokenizer, ckpt_dir, 0, None, {"source": input_source, "model_tag": os.path.basename(in_dir), "step": in_step}

# -----------------------------------------------------------------------------
# Flags and start-up shared by the chat-stage scripts (mid_train, chat_sft, chat_rl)


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
                        with_compile=False):
    """The learning-rate flags of a chat stage, appended to its 'optimization' argument group `g` after the
    stage's own batch and horizon flags; the stages differ only in how far they scale the rates down and decay them."""
    g.add_argument("--embedding-lr", type=float, default=0.2)
    g.add_argument("--unembedding-lr", type=float, default=0.004)
    g.add_argument("--matrix-lr", type=float, default=0.02)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--init-lr-frac", type=float, default=init_lr_frac, help="every learning rate above is scaled by this")
    g.add_argument("--warmdown-ratio", type=float, default=warmdown_ratio, help=warmdown_help)
    g.add_argument("--final-lr-frac", type=float, default=0.0)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    if with_compile:
        g.add_argument("--compile", type=auto_bool, default="auto", help="torch.compile (auto = on CUDA)")


def check_optimizer_flags(parser, args):
    """parser.error (exit 2, naming the flag) on add_optimizer_flags values out of range."""
    for name in ("warmdown_ratio", "final_lr_frac"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            parser.error(f"argument --{name.replace('_', '-')}: must be between 0 and 1")
    if not args.init_lr_frac > 0:
        parser.error("argument --init-lr-frac: must be positive")


def init_device(device_type, seed):
    """Join the process group (under torchrun) on the requested or detected device:
    (device_type, rank, world_size, device, dtype, autocast), autocast() being the forward passes' context."""
    device_type = autodetect_device_type(device_type or None)
    _, rank, _, world_size, device = compute_init(device_type, seed=seed)
    dtype = get_compute_dtype(device_type)
    return device_type, rank, world_size, device, dtype, lambda: autocast_context(device_type, dtype)


def open_stage_or_exit(script, stage, source, device, args):
    """open_stage with the add_stage_io_flags flags; exits with '<script>: cannot ...: <why>' when it cannot."""
    from nanochat.checkpoint import CheckpointError
    try:
        return open_stage(stage, source, device, args.model_tag, args.step, args.output_tag, args.resume)
    except (CheckpointError, OSError, ValueError) as e:
        stage_error(f"{script}: cannot {'resume' if args.resume else f'load the {source} model'}: {e}")


def load_chat_data_or_exit(script, stage, args):
    """(the --mixture with the stage's weights plus --extra-data, the --eval-tasks); exits on missing or bad data."""
    from tasks.mixtures import build_mixture
    try:
        return build_mixture(args.mixture, stage, args.extra_data), load_eval_tasks(args.eval_tasks)
    except (OSError, ValueError) as e:
        stage_error(f"{script}: data error: {e}")


def setup_stage_optimizers(model, args):
    """The model's optimizers at the add_optimizer_flags learning rates, each scaled by --init-lr-frac."""
    lr = args.init_lr_frac
    return model.setup_optimizers(unembedding_lr=args.unembedding_lr * lr, embedding_lr=args.embedding_lr * lr,
                                  matrix_lr=args.matrix_lr * lr, weight_decay=args.weight_decay)


def resume_or_exit(script, logger, ckpt_dir, step, optimizers, loaders, device, device_type, rank=0, world_size=1,
                   accum=1):
    """restore_training_state, then drop the log's records after `step`; exits with '<script>: cannot resume: <why>'
    when the checkpoint does not fit this run."""
    from nanochat.checkpoint import CheckpointError
    try:
        restore_training_state(ckpt_dir, step, optimizers, loaders, device, device_type, rank, world_size, accum)
    except (CheckpointError, ValueError) as e:
        stage_error(f"{script}: cannot resume: {e}")
    logger.truncate_after(step)
    print0(f"resumed from {ckpt_dir} step {step}")
