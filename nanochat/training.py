"""
What every training stage (base, mid, SFT, RL) shares, so that each script keeps only its own loop: batch
arithmetic and the learning-rate / momentum schedules; the device-batch-size probe; the loop's skeleton; the
gradient step (accumulation over micro-batches, clipping on the global gradient, the optimizer step); per-step
bookkeeping (StepStats: timing, smoothed loss, throughput/MFU, ETA) and the log (StepLogger: console, JSON lines,
optional wandb); checkpoint state a run resumes from exactly, and the model a chat stage starts from; the end of a
stage (its report section). The command-line side (flag groups, exit-with-message helpers) is scripts/_cli.py.
"""
import dataclasses
import functools
import json
import os
import time

import torch

from nanochat.checkpoint import (CheckpointError, checkpoints_root, find_largest_model, find_last_step, load_checkpoint,
                                 load_model, resolve_checkpoint, save_checkpoint)
from nanochat.common import (all_reduce_sum, autocast_context, autodetect_device_type, compute_cleanup,
                             compute_init, format_duration, get_compute_dtype, get_peak_memory, print0, synchronize)

# -----------------------------------------------------------------------------
# Batch arithmetic and schedules


def grad_accum_steps(total_batch_size, device_batch_size, sequence_len, world_size):
    """Micro-steps per optimizer step so that every step sees exactly `total_batch_size` tokens."""
    tokens_per_fwdbwd = device_batch_size * sequence_len * world_size
    if total_batch_size % tokens_per_fwdbwd != 0:
        raise ValueError(
            f"--total-batch-size={total_batch_size} is not a multiple of device_batch_size x sequence_len x "
            f"world_size = {device_batch_size} x {sequence_len} x {world_size} = {tokens_per_fwdbwd}; "
            f"pick sizes whose product divides it")
    return total_batch_size // tokens_per_fwdbwd


def lr_multiplier(step, num_iterations, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0, warmup_steps=0):
    """Linear warmup, constant, then linear warmdown to `final_lr_frac` over the last fraction of steps
    (the trapezoid schedule nanoGPT-speedrun and nanochat train with). The warmup is `warmup_steps` steps when
    given (what it is for, letting the optimizer's moments settle, takes steps, not a share of the run), else
    warmup_ratio of the run."""
    warmup = warmup_steps or round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(step, start=0.85, end=0.95, ramp_steps=300):
    """Muon's momentum, ramped linearly from `start` to `end` over the first `ramp_steps` steps."""
    frac = min(step / ramp_steps, 1.0)
    return (1 - frac) * start + frac * end


def set_learning_rates(optimizers, lrm, momentum=None, wdm=None):
    """Every group's LR = its initial LR x lrm; Muon's momentum when given; with wdm, every group's weight decay =
    its initial weight decay x wdm (the weight-decay schedule)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lrm
            if momentum is not None and "momentum" in group:
                group["momentum"] = momentum
            if wdm is not None:
                group["weight_decay"] = group["initial_weight_decay"] * wdm


def wd_multiplier(step, num_iterations, schedule="constant"):
    """The weight-decay schedule: constant 1, or linear from 1 at the first step to 0 at the end (upstream measured
    the linear ramp down better than a constant at equal peak)."""
    return 1.0 if schedule == "constant" else 1.0 - step / num_iterations


def throughput(tokens_per_step, step_seconds, flops_per_token, peak_flops):
    """(tokens/s, MFU) of one optimizer step. `tokens_per_step` counts every token the step
    processed: all ranks and all accumulation micro-steps. MFU = achieved FLOP/s / peak FLOP/s."""
    tok_per_sec = tokens_per_step / step_seconds
    return tok_per_sec, tok_per_sec * flops_per_token / peak_flops


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


def init_device(device_type, seed):
    """Join the process group (under torchrun) on the requested or detected device:
    (device_type, rank, world_size, device, dtype, autocast), autocast() being the forward passes' context."""
    device_type = autodetect_device_type(device_type or None)
    _, rank, _, world_size, device = compute_init(device_type, seed=seed)
    dtype = get_compute_dtype(device_type)
    return device_type, rank, world_size, device, dtype, functools.partial(autocast_context, device_type, dtype)

# -----------------------------------------------------------------------------
# The stage loop


def stage_steps(start_step, num_iterations, resumed=False):
    """The skeleton of every stage's loop: (step, last, fresh) for the weights after each `step` steps, which the
    stage evaluates and saves, then (unless `last`) trains one step further. `fresh` is False only on a resumed
    run's first step, whose evaluations its log holds already."""
    for step in range(start_step, num_iterations + 1):
        yield step, step == num_iterations, not (resumed and step == start_step)


def every(step, n):
    """Whether a job run every `n` steps (evaluation, samples, checkpoints; n <= 0: never) falls on `step` > 0."""
    return n > 0 and step > 0 and step % n == 0

# -----------------------------------------------------------------------------
# The gradient step


def accumulate_gradients(train_model, batches, autocast, world_size=1, per_token=True):
    """Forward and backward over one optimizer step's micro-batches [(inputs, targets)]. Returns this rank's
    share of the step's mean training loss as a 0-d tensor: all_reduce_sum of it over ranks is the mean (reduce
    it after the optimizer step, so the reduction and its host sync do not stall the step).

    per_token=False (pretraining, every row full): each micro-batch's mean loss weighs 1/len(batches).
    per_token=True (chat stages, padded rows hold different numbers of tokens): the loss is normalized by the
    target tokens (targets != -1) of the whole step on all ranks, so every token weighs the same whichever
    micro-batch or rank it is in. The distributed optimizers average gradients over ranks, hence the factor
    world_size in both cases."""
    if per_token:
        n = all_reduce_sum(sum((y != -1).sum() for _, y in batches).double()).clamp(min=1)
    else:
        n = len(batches) * world_size
    total = torch.zeros((), dtype=torch.float64, device=batches[0][1].device)
    for x, y in batches:
        with autocast():
            loss = train_model(x, y, loss_reduction="sum") if per_token else train_model(x, y)
        (loss * (world_size / n)).backward()
        total += loss.detach().double()
    return total / n


def optimizer_step(model, optimizers, grad_clip=0.0, world_size=1):
    """Clip, step every optimizer, zero the gradients. Under torchrun the clip must see the global gradient, exactly
    as a single process with gradient accumulation would, so the gradients are first all-reduced to their mean
    across ranks, in place; the distributed optimizers then reduce again (sum / world_size) and get the same mean
    back, so their update is unchanged."""
    if grad_clip > 0:
        if world_size > 1:
            import torch.distributed as dist
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            for work in [dist.all_reduce(g, async_op=True) for g in grads]:
                work.wait()
            for g in grads:
                g.div_(world_size)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


def all_reduce_mean(value, device, world_size):
    """The mean of a Python number over ranks (the number itself without torchrun)."""
    if world_size <= 1:
        return float(value)
    return all_reduce_sum(torch.tensor(float(value), dtype=torch.float64, device=device)).item() / world_size

# -----------------------------------------------------------------------------
# Per-step bookkeeping and the log


class StepStats:
    """The numbers every stage logs after an optimizer step, computed one way:
    - the step's wall time, between begin() and end(), each a device sync so the time is honest; the first
      step of a run (or of a resumed run) pays for compilation and warm-up and is left out of the totals;
    - the training loss smoothed by an EMA with beta 0.9, debiased as Adam's moments are (divided by
      1 - beta^n after n steps) so the first values are not pulled towards 0;
    - throughput: `per_step` units per step (tokens, conversations, samples) / seconds, recorded under
      `rate_key`; with `flops_per_unit` and `peak_flops`, MFU = achieved FLOP/s / peak FLOP/s and the
      cumulative training FLOPs;
    - the ETA: mean timed step x steps left."""

    def __init__(self, num_iterations, start_step, device_type, per_step, rate_key="tok_per_sec", rate_unit="tok/s",
                 flops_per_unit=None, peak_flops=None):
        self.num_iterations, self.start_step, self.device_type = num_iterations, start_step, device_type
        self.per_step, self.rate_key, self.rate_unit = per_step, rate_key, rate_unit
        self.flops_per_unit, self.peak_flops = flops_per_unit, peak_flops
        self.total_time, self.timed_steps, self.smooth_loss, self.t0 = 0.0, 0, 0.0, None

    def begin(self):
        synchronize(self.device_type)
        self.t0 = time.perf_counter()

    def end(self, step, lrm, loss=None, **fields):
        """Close the step that made the weights `step`: (record for the JSON log, console line). `fields` are
        the stage's own numbers (RL: reward, completion length), logged as they are."""
        synchronize(self.device_type)
        dt = time.perf_counter() - self.t0
        if step > self.start_step + 1:
            self.total_time += dt
            self.timed_steps += 1
        record, parts = {"step": step}, [f"step {step:05d}/{self.num_iterations:05d}"]
        if loss is not None:
            self.smooth_loss = 0.9 * self.smooth_loss + 0.1 * loss
            debiased = self.smooth_loss / (1 - 0.9 ** (step - self.start_step))
            record.update(loss=loss, smooth_loss=debiased)
            parts.append(f"loss {debiased:.4f}")
        record.update(fields)
        parts += [f"{k} {v:.4f}" for k, v in fields.items()]
        rate, mfu = throughput(self.per_step, dt, self.flops_per_unit or 0.0, self.peak_flops or 1.0)
        record.update({"lrm": lrm, "dt": dt, self.rate_key: rate})
        parts += [f"lrm {lrm:.2f}", f"{rate:,.{0 if rate >= 100 else 1}f} {self.rate_unit}"]
        if self.flops_per_unit:
            record["total_training_flops"] = self.flops_per_unit * self.per_step * step
            if self.peak_flops:
                record["mfu"] = mfu
                parts.append(f"MFU {100 * record['mfu']:.2f}%")
        eta = self.total_time / max(self.timed_steps, 1) * (self.num_iterations - step)
        parts += [f"{format_duration(self.total_time)} elapsed", f"ETA {format_duration(eta)}"]
        return record, " | ".join(parts)


class StepLogger:
    """One line per step on the console, the same record as JSON lines in the run directory,
    and wandb when a run name is given. Only rank 0 writes."""

    def __init__(self, run_dir, run_name, config, rank=0, project="nanochat", resume=False):
        self.rank, self.path, self.wandb = rank, os.path.join(run_dir, "log.jsonl"), None
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
        if self.wandb:
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
        if self.wandb:
            self.wandb.finish()

class HeldOutLoss:
    """The held-out conversation loss of the chat stages (midtraining, SFT): the mean loss on the assistant tokens
    of a fixed set of validation conversations, the same number in both stages so they compare. Each evaluate()
    logs it and keeps the first and lowest values for the report; `last` carries a resumed run's value."""

    def __init__(self, model, tokenizer, conversations, batch_size, device, autocast, logger, last=None):
        self.model, self.tokenizer, self.conversations = model, tokenizer, conversations
        self.batch_size, self.device, self.autocast, self.logger = batch_size, device, autocast, logger
        self.first, self.min, self.last = None, float("inf"), last

    def evaluate(self, step, **record):
        from nanochat.chat_data import conversation_loss
        self.model.eval()
        with self.autocast():
            self.last = conversation_loss(self.model, self.tokenizer, self.conversations, batch_size=self.batch_size,
                                          device=self.device)
        self.model.train()
        self.first = self.last if self.first is None else self.first
        self.min = min(self.min, self.last)
        self.logger.log({"step": step, "val_loss": self.last, **record},
                        f"step {step:05d} | held-out conversation loss {self.last:.4f}")
        return self.last

    def report_rows(self, resumed):
        start = "n/a (resumed)" if self.first is None or resumed else f"{self.first:.4f}"
        return [("held-out loss at start", start), ("held-out loss at end", f"{self.last:.4f}")]


# -----------------------------------------------------------------------------
# Checkpoint state a run resumes from exactly


def save_training_state(ckpt_dir, step, model, optimizers, loaders, meta, device_type, rank=0, world_size=1):
    """A checkpoint a run can resume from exactly: weights, each rank's optimizer and loader states, RNG; `meta`
    with the model's config first. Collective under torchrun."""
    meta = {"model_config": dataclasses.asdict(model.config), **meta}
    state = {"optimizers": [opt.state_dict() for opt in optimizers], "loaders": [l.state_dict() for l in loaders]}
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device_type == "cuda" else None}
    return save_checkpoint(ckpt_dir, step, model.state_dict(), state, meta, rank=rank, world_size=world_size,
                           rng_state=rng)


def restore_training_state(ckpt_dir, step, optimizers, loaders, device, device_type, rank=0, world_size=1, accum=1,
                           model=None):
    """Load what save_training_state wrote; with `model`, its weights too (from the same read; a chat stage
    has its weights already, from checkpoint.build_model). CheckpointError when the run's world size or
    accumulation differs (the data order would not continue) or `model`'s config is not the checkpoint's."""
    model_state, payload, meta = load_checkpoint(ckpt_dir, step, device, load_optimizer=True, rank=rank)
    if meta.get("world_size") != world_size or meta.get("accum") != accum:
        raise CheckpointError(f"checkpoint was written by {meta.get('world_size')} rank(s) x {meta.get('accum')} "
                              f"accumulation steps, this run has {world_size} x {accum}")
    if model is not None:
        if meta.get("model_config") != dataclasses.asdict(model.config):
            raise CheckpointError(f"checkpoint model config {meta.get('model_config')} differs from the flags' "
                                  f"{dataclasses.asdict(model.config)}")
        model.load_state_dict(model_state)
    for opt, state in zip(optimizers, payload["optimizer"]["optimizers"]):
        opt.load_state_dict(state)
    for loader, state in zip(loaders, payload["optimizer"]["loaders"]):
        loader.load_state_dict(state)
    torch.set_rng_state(payload["rng"]["cpu"])
    if device_type == "cuda" and payload["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(payload["rng"]["cuda"].cpu())
    return meta


def open_stage(stage, input_source, device, model_tag=None, step=None, output_tag=None, resume=False):
    """The model a chat stage trains and where it writes. Fresh: the `input_source` checkpoint (model_tag, step;
    default the largest model's last step), written to <stage>_checkpoints/<output_tag or the input's tag>.
    Resume: the stage's own last checkpoint of output_tag (or model_tag, or the largest).
    Returns (model, tokenizer, ckpt_dir, start_step, resume_meta or None, origin {source, model_tag, step}).
    CheckpointError / OSError / ValueError with a clear message (missing checkpoint, other tokenizer)."""
    root = checkpoints_root(stage)
    if resume:
        source, tag = stage, output_tag or model_tag or find_largest_model(root)
        step = find_last_step(os.path.join(root, tag))
    else:
        in_dir, step = resolve_checkpoint(input_source, model_tag, step)
        source, tag = input_source, os.path.basename(in_dir)
    model, tokenizer, meta = load_model(source, device, phase="train", model_tag=tag, step=step)
    if resume:
        return model, tokenizer, os.path.join(root, tag), step, meta, meta.get("input")
    origin = {"source": input_source, "model_tag": tag, "step": step}
    return model, tokenizer, os.path.join(root, output_tag or tag), 0, None, origin

# -----------------------------------------------------------------------------
# The end of a stage


def finish_stage(title, rows, flags, metrics, stats, logger, world_size, device_type, dtype, summary="", extra=""):
    """Print the closing line, (rank 0) write the stage's report section, finish the log and leave the process
    group. The section holds the stage's `rows` (metric, value) followed by what every stage reports (training
    time, peak memory, world size, device, dtype), `extra` markdown, and the flags the run was given; `metrics` go
    to the summary table, with GPU hours on CUDA."""
    peak_mem = get_peak_memory(device_type)
    print0(f"peak memory {peak_mem / 2**20:,.0f} MiB | training time {format_duration(stats.total_time)}"
           + (f" | {summary}" if summary else ""))
    if int(os.environ.get("RANK", 0)) == 0:
        from nanochat.report import write_section
        rows = rows + [("training time", format_duration(stats.total_time)),
                       ("peak memory (MiB)", f"{peak_mem / 2**20:,.0f}"), ("world size", world_size),
                       ("device", device_type), ("dtype", str(dtype).removeprefix("torch."))]
        body = "| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
        flag_text = " ".join(f"--{k.replace('_', '-')}={v}" for k, v in flags.items() if v not in (None, ""))
        metrics = {**metrics, "training_seconds": stats.total_time}
        if device_type == "cuda":
            metrics["gpu_hours"] = world_size * stats.total_time / 3600
        write_section(title, f"{body}{extra}\n\nflags: `{flag_text}`", metrics=metrics)
    logger.finish()
    compute_cleanup()
