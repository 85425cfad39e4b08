"""
Pieces every training stage shares: batch arithmetic, learning-rate and momentum schedules,
throughput/MFU, the per-step logger (console, JSON lines, optional wandb) and the
device-batch-size probe.
"""
import json
import os
import time

import torch

from nanochat.common import DummyWandb, print0


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
